//! The dispatch channel's 16-byte message, as the shim speaks it. This is a deliberately small
//! twin of `src/protocol.rs` in the main crate (the shim cannot depend on that crate: it must stay
//! a libc-only cdylib); docs/PROTOCOL.md is the normative description both follow, and the tests
//! below pin the same byte layout as the main crate's `layout_is_fixed`.

/// Size of every message on a dispatch channel.
pub const HEADER_LEN: usize = 16;
const MAGIC: [u8; 2] = *b"RC";
const VERSION: u8 = 1;

/// Message kinds (byte 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Master → worker: a connection, its fd attached.
    Conn = 1,
    /// Worker → master: accepting now.
    Ready = 2,
    /// Worker → master: `value` handed-out connections were closed.
    Closed = 3,
    /// Worker → master: still alive.
    Heartbeat = 4,
    /// Worker → master: draining, send nothing more.
    Stopping = 5,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Conn,
            2 => Kind::Ready,
            3 => Kind::Closed,
            4 => Kind::Heartbeat,
            5 => Kind::Stopping,
            _ => return None,
        })
    }
}

/// The wire form of one message.
pub fn encode(kind: Kind, value: u64) -> [u8; HEADER_LEN] {
    let mut buf = [0u8; HEADER_LEN];
    buf[0..2].copy_from_slice(&MAGIC);
    buf[2] = VERSION;
    buf[3] = kind as u8;
    buf[8..16].copy_from_slice(&value.to_le_bytes());
    buf
}

/// Parses one message; `None` for anything that is not exactly this version's format (wrong
/// length, magic, version, non-zero reserved bytes, unknown kind).
pub fn decode(buf: &[u8]) -> Option<(Kind, u64)> {
    let buf: &[u8; HEADER_LEN] = buf.try_into().ok()?;
    if buf[0..2] != MAGIC || buf[2] != VERSION || buf[4..8] != [0; 4] {
        return None;
    }
    let mut value = [0u8; 8];
    value.copy_from_slice(&buf[8..16]);
    Some((Kind::from_u8(buf[3])?, u64::from_le_bytes(value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_main_crate() {
        assert_eq!(
            encode(Kind::Closed, 0x0102),
            [b'R', b'C', 1, 3, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn round_trips_and_rejects() {
        for kind in [
            Kind::Conn,
            Kind::Ready,
            Kind::Closed,
            Kind::Heartbeat,
            Kind::Stopping,
        ] {
            assert_eq!(decode(&encode(kind, 42)), Some((kind, 42)));
        }
        let good = encode(Kind::Conn, 1);
        assert_eq!(decode(&good[..15]), None);
        for (at, byte) in [(0, b'X'), (2, 2), (3, 0), (3, 6), (5, 1)] {
            let mut bad = good;
            bad[at] = byte;
            assert_eq!(decode(&bad), None, "byte {at} = {byte}");
        }
    }
}
