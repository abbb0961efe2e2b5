//! Property tests of the channel decoders: no input panics them, a frame decodes in at most one
//! direction, and whatever decodes is exactly what its encoder writes.

use proptest::prelude::*;
use rcluster_proto::wire::{HEADER_LEN, MAGIC, VERSION};
use rcluster_proto::{ToMaster, ToWorker};

/// Frames near the valid ones (right magic and version, any kind, reserved and value), plus
/// arbitrary byte strings of any length.
fn frames() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (any::<u8>(), any::<u32>(), any::<u64>()).prop_map(|(kind, reserved, value)| {
            let mut f = Vec::with_capacity(HEADER_LEN);
            f.extend_from_slice(&MAGIC);
            f.push(VERSION);
            f.push(kind % 8);
            f.extend_from_slice(&(reserved % 3).to_le_bytes());
            f.extend_from_slice(&value.to_le_bytes());
            f
        }),
        proptest::collection::vec(any::<u8>(), 0..40),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn decoders_never_panic_and_partition_frames(frame in frames()) {
        let to_worker = ToWorker::decode(&frame);
        let to_master = ToMaster::decode(&frame);
        prop_assert!(!(to_worker.is_ok() && to_master.is_ok()));
        if let Ok(msg) = to_worker {
            prop_assert_eq!(&msg.encode()[..], &frame[..]);
        }
        if let Ok(msg) = to_master {
            let encoded = msg.encode();
            // HEARTBEAT and STOPPING carry no value: the decoder ignores it.
            let n = match msg {
                ToMaster::Heartbeat | ToMaster::Stopping => 8,
                _ => HEADER_LEN,
            };
            prop_assert_eq!(&encoded[..n], &frame[..n]);
        }
    }

    #[test]
    fn every_value_round_trips(value in any::<u64>()) {
        for msg in [
            ToMaster::Ready { max_fds: value },
            ToMaster::Closed { count: value },
            ToMaster::Full { lost: value },
        ] {
            prop_assert_eq!(ToMaster::decode(&msg.encode()), Ok(msg));
        }
        let conn = ToWorker::Conn { seq: value };
        prop_assert_eq!(ToWorker::decode(&conn.encode()), Ok(conn));
    }
}
