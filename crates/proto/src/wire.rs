//! The dispatch channel's wire format. Every message on a channel is exactly [`HEADER_LEN`]
//! bytes, little-endian:
//!
//! ```text
//! offset size field
//!      0    2 magic    b"RC"
//!      2    1 version  1
//!      3    1 kind     1 CONN, 2 READY, 3 CLOSED, 4 HEARTBEAT, 5 STOPPING, 6 FULL
//!      4    4 reserved 0 (a decoder rejects anything else)
//!      8    8 value    CONN: sequence number of its first connection; READY: the most fds per
//!                     CONN the worker takes (0 and 1 both mean one); CLOSED: connections
//!                     finished; FULL: connections the kernel closed on receipt since the
//!                     last FULL; else 0
//! ```
//!
//! Each direction has its own type, so a message can only be built for the direction it
//! travels in, and a decoder rejects a well-formed message of the other direction
//! ([`ProtocolError::Direction`]):
//!
//! - [`ToWorker`] (master → worker): CONN, carrying the accepted TCP connections' fds
//!   (`SCM_RIGHTS`): exactly one unless the worker's READY allowed more, then 1 ..= that many, in
//!   accept order.
//! - [`ToMaster`] (worker → master): READY (when it accepts), CLOSED(n) after n connections it
//!   was handed are closed, optional HEARTBEAT, STOPPING (it is draining and wants no more
//!   connections), FULL (it is out of fds: no more connections until its next READY).
//!
//! FULL was added without a version change: a worker that never sends it is unaffected, and a
//! master that predates it rejects it as an unknown kind (the worker then just stops reading).
//!
//! Why several fds per message: the kernel's cost of an `SCM_RIGHTS` message is mostly per
//! message (an skb and an fd list), not per fd; on the reference machine one fd per message
//! costs the sender about 2.6 µs per fd, four per message 0.9 µs, sixteen 0.5 µs (BENCHMARKS.md).

use std::fmt;

/// Size of every message on a dispatch channel.
pub const HEADER_LEN: usize = 16;
/// First two bytes of every message.
pub const MAGIC: [u8; 2] = *b"RC";
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Most connection fds the master puts in one CONN message, whatever a worker's READY allows.
pub const MAX_FDS_PER_CONN: usize = 16;

const KIND_CONN: u8 = 1;
const KIND_READY: u8 = 2;
const KIND_CLOSED: u8 = 3;
const KIND_HEARTBEAT: u8 = 4;
const KIND_STOPPING: u8 = 5;
const KIND_FULL: u8 = 6;

/// A message from the master to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToWorker {
    /// Connections, their fds attached (one unless READY allowed more).
    Conn {
        /// The master's sequence number of the first connection attached; the others follow
        /// in order (for tracing).
        seq: u64,
    },
}

/// A message from a worker to the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToMaster {
    /// The worker accepts connections now.
    Ready {
        /// The most fds the worker takes in one CONN message; 0 and 1 both mean one.
        max_fds: u64,
    },
    /// `count` connections handed to this worker have been closed.
    Closed {
        /// How many connections finished since the last CLOSED.
        count: u64,
    },
    /// Still alive (optional).
    Heartbeat,
    /// Draining: send nothing more.
    Stopping,
    /// Out of file descriptors: send nothing more until the next READY (the worker could not
    /// install the fds of another CONN; the kernel would close them, `MSG_CTRUNC`).
    Full {
        /// Connections the kernel already closed on receipt (truncated CONNs) since the last
        /// FULL; they are also counted in CLOSED.
        lost: u64,
    },
}

/// Why a message was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// Not [`HEADER_LEN`] bytes.
    Length(usize),
    /// First two bytes are not [`MAGIC`].
    Magic([u8; 2]),
    /// A version this build does not speak.
    Version(u8),
    /// Unknown kind byte.
    Kind(u8),
    /// Reserved bytes not zero.
    Reserved(u32),
    /// A valid message kind that travels the other way (a worker sent CONN, say).
    Direction(u8),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Length(n) => write!(f, "message of {n} bytes, expected {HEADER_LEN}"),
            ProtocolError::Magic(m) => write!(f, "bad magic {m:02x?}"),
            ProtocolError::Version(v) => {
                write!(f, "protocol version {v}, this build speaks {VERSION}")
            }
            ProtocolError::Kind(k) => write!(f, "unknown message kind {k}"),
            ProtocolError::Reserved(r) => write!(f, "reserved field is {r:#x}, must be 0"),
            ProtocolError::Direction(k) => {
                write!(f, "message kind {k} travels the other way on a channel")
            }
        }
    }
}

impl std::error::Error for ProtocolError {}

fn encode(kind: u8, value: u64) -> [u8; HEADER_LEN] {
    let mut buf = [0u8; HEADER_LEN];
    buf[0..2].copy_from_slice(&MAGIC);
    buf[2] = VERSION;
    buf[3] = kind;
    buf[8..16].copy_from_slice(&value.to_le_bytes());
    buf
}

/// Checks the frame and returns (kind, value); the kind is not yet checked.
fn decode(buf: &[u8]) -> Result<(u8, u64), ProtocolError> {
    let buf: &[u8; HEADER_LEN] = buf
        .try_into()
        .map_err(|_| ProtocolError::Length(buf.len()))?;
    if buf[0..2] != MAGIC {
        return Err(ProtocolError::Magic([buf[0], buf[1]]));
    }
    if buf[2] != VERSION {
        return Err(ProtocolError::Version(buf[2]));
    }
    let reserved = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if reserved != 0 {
        return Err(ProtocolError::Reserved(reserved));
    }
    let mut value = [0u8; 8];
    value.copy_from_slice(&buf[8..16]);
    Ok((buf[3], u64::from_le_bytes(value)))
}

impl ToWorker {
    /// The message as it goes on the wire.
    pub fn encode(self) -> [u8; HEADER_LEN] {
        match self {
            ToWorker::Conn { seq } => encode(KIND_CONN, seq),
        }
    }

    /// Parses one message, rejecting anything that is not exactly this version's format or
    /// does not travel master → worker.
    pub fn decode(buf: &[u8]) -> Result<ToWorker, ProtocolError> {
        match decode(buf)? {
            (KIND_CONN, seq) => Ok(ToWorker::Conn { seq }),
            (KIND_READY | KIND_CLOSED | KIND_HEARTBEAT | KIND_STOPPING | KIND_FULL, _) => {
                Err(ProtocolError::Direction(buf[3]))
            }
            (other, _) => Err(ProtocolError::Kind(other)),
        }
    }
}

impl ToMaster {
    /// The message as it goes on the wire.
    pub fn encode(self) -> [u8; HEADER_LEN] {
        match self {
            ToMaster::Ready { max_fds } => encode(KIND_READY, max_fds),
            ToMaster::Closed { count } => encode(KIND_CLOSED, count),
            ToMaster::Heartbeat => encode(KIND_HEARTBEAT, 0),
            ToMaster::Stopping => encode(KIND_STOPPING, 0),
            ToMaster::Full { lost } => encode(KIND_FULL, lost),
        }
    }

    /// Parses one message, rejecting anything that is not exactly this version's format or
    /// does not travel worker → master.
    pub fn decode(buf: &[u8]) -> Result<ToMaster, ProtocolError> {
        match decode(buf)? {
            (KIND_READY, max_fds) => Ok(ToMaster::Ready { max_fds }),
            (KIND_CLOSED, count) => Ok(ToMaster::Closed { count }),
            (KIND_HEARTBEAT, _) => Ok(ToMaster::Heartbeat),
            (KIND_STOPPING, _) => Ok(ToMaster::Stopping),
            (KIND_FULL, lost) => Ok(ToMaster::Full { lost }),
            (KIND_CONN, _) => Err(ProtocolError::Direction(KIND_CONN)),
            (other, _) => Err(ProtocolError::Kind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_kind() {
        assert_eq!(
            ToWorker::decode(&ToWorker::Conn { seq: u64::MAX }.encode()),
            Ok(ToWorker::Conn { seq: u64::MAX })
        );
        for msg in [
            ToMaster::Ready { max_fds: 0 },
            ToMaster::Ready { max_fds: 16 },
            ToMaster::Closed { count: 7 },
            ToMaster::Heartbeat,
            ToMaster::Stopping,
            ToMaster::Full { lost: 3 },
        ] {
            assert_eq!(ToMaster::decode(&msg.encode()), Ok(msg));
        }
    }

    #[test]
    fn layout_is_fixed() {
        let buf = ToMaster::Closed { count: 0x0102 }.encode();
        assert_eq!(buf, [b'R', b'C', 1, 3, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0]);
        let buf = ToWorker::Conn { seq: 5 }.encode();
        assert_eq!(buf, [b'R', b'C', 1, 1, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn rejects_the_other_direction() {
        let conn = ToWorker::Conn { seq: 1 }.encode();
        assert_eq!(ToMaster::decode(&conn), Err(ProtocolError::Direction(1)));
        for msg in [ToMaster::Ready { max_fds: 1 }, ToMaster::Stopping] {
            assert!(matches!(
                ToWorker::decode(&msg.encode()),
                Err(ProtocolError::Direction(_))
            ));
        }
    }

    #[test]
    fn rejects_anything_else() {
        let good = ToMaster::Ready { max_fds: 1 }.encode();
        assert_eq!(
            ToMaster::decode(&good[..15]),
            Err(ProtocolError::Length(15))
        );
        let mut bad = good;
        bad[0] = b'X';
        assert!(matches!(
            ToMaster::decode(&bad),
            Err(ProtocolError::Magic(_))
        ));
        let mut bad = good;
        bad[2] = 2;
        assert_eq!(ToMaster::decode(&bad), Err(ProtocolError::Version(2)));
        for kind in [0, 7, 99] {
            let mut bad = good;
            bad[3] = kind;
            assert_eq!(ToMaster::decode(&bad), Err(ProtocolError::Kind(kind)));
            assert_eq!(ToWorker::decode(&bad), Err(ProtocolError::Kind(kind)));
        }
        let mut bad = good;
        bad[5] = 1;
        assert_eq!(ToMaster::decode(&bad), Err(ProtocolError::Reserved(0x100)));
    }

    /// Every 16-byte frame either decodes in exactly one direction or is rejected by both, and
    /// what decodes re-encodes to the same bytes (a small exhaustive sweep over the kind and
    /// reserved bytes, the fields a decoder branches on).
    #[test]
    fn decoders_partition_the_frames() {
        for kind in 0..=255u8 {
            for reserved in [0u8, 1, 0x80] {
                let mut buf = ToMaster::Closed { count: 42 }.encode();
                buf[3] = kind;
                buf[4] = reserved;
                let (w, m) = (ToWorker::decode(&buf), ToMaster::decode(&buf));
                assert!(!(w.is_ok() && m.is_ok()), "kind {kind} decodes both ways");
                if let Ok(msg) = w {
                    assert_eq!(msg.encode(), buf);
                }
                if let Ok(msg) = m {
                    assert_eq!(msg.encode()[..4], buf[..4]);
                }
            }
        }
    }
}
