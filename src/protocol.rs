//! The dispatch channel's wire format, shared by the master, the Rust worker API and the preload
//! shim (docs/PROTOCOL.md is the normative description for workers in other languages).
//!
//! Every message on a channel is exactly [`HEADER_LEN`] bytes, little-endian:
//!
//! ```text
//! offset size field
//!      0    2 magic    b"RC"
//!      2    1 version  1
//!      3    1 kind     1 CONN, 2 READY, 3 CLOSED, 4 HEARTBEAT, 5 STOPPING
//!      4    4 reserved 0 (a decoder rejects anything else)
//!      8    8 value    CONN: sequence number of its first connection; READY: the most fds per
//!                     CONN the worker takes (0 and 1 both mean one); CLOSED: connections
//!                     finished; else 0
//! ```
//!
//! Master → worker: CONN, carrying the accepted TCP connections' fds (`SCM_RIGHTS`): exactly one
//! unless the worker's READY allowed more, then 1 ..= that many, in accept order.
//! Worker → master: READY (once, when it accepts), CLOSED(n) after n connections it was handed
//! are closed, optional HEARTBEAT, STOPPING (it is draining and wants no more connections).
//!
//! Why several fds per message: the kernel's cost of an `SCM_RIGHTS` message is mostly per
//! message (an skb and an fd list), not per fd; on the reference machine one fd per message
//! costs the sender about 2.6 µs per fd, four per message 0.9 µs, sixteen 0.5 µs (BENCHMARKS.md).

use thiserror::Error;

/// Size of every message on a dispatch channel.
pub const HEADER_LEN: usize = 16;
/// First two bytes of every message.
pub const MAGIC: [u8; 2] = *b"RC";
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Most connection fds the master puts in one CONN message, whatever a worker's READY allows.
pub const MAX_FDS_PER_CONN: usize = 16;

/// One message of the dispatch channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// Master → worker: connections, their fds attached (one unless READY allowed more).
    Conn {
        /// The master's sequence number of the first connection attached; the others follow
        /// in order (for tracing).
        seq: u64,
    },
    /// Worker → master: the worker accepts connections now.
    Ready {
        /// The most fds the worker takes in one CONN message; 0 and 1 both mean one.
        max_fds: u64,
    },
    /// Worker → master: `count` connections handed to this worker have been closed.
    Closed {
        /// How many connections finished since the last CLOSED.
        count: u64,
    },
    /// Worker → master: still alive (optional).
    Heartbeat,
    /// Worker → master: draining, send nothing more.
    Stopping,
}

/// Why a message was rejected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// Not [`HEADER_LEN`] bytes.
    #[error("message of {0} bytes, expected {HEADER_LEN}")]
    Length(usize),
    /// First two bytes are not [`MAGIC`].
    #[error("bad magic {0:02x?}")]
    Magic([u8; 2]),
    /// A version this build does not speak.
    #[error("protocol version {0}, this build speaks {VERSION}")]
    Version(u8),
    /// Unknown kind byte.
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// Reserved bytes not zero.
    #[error("reserved field is {0:#x}, must be 0")]
    Reserved(u32),
}

const KIND_CONN: u8 = 1;
const KIND_READY: u8 = 2;
const KIND_CLOSED: u8 = 3;
const KIND_HEARTBEAT: u8 = 4;
const KIND_STOPPING: u8 = 5;

impl Message {
    /// The message as it goes on the wire.
    pub fn encode(self) -> [u8; HEADER_LEN] {
        let (kind, value) = match self {
            Message::Conn { seq } => (KIND_CONN, seq),
            Message::Ready { max_fds } => (KIND_READY, max_fds),
            Message::Closed { count } => (KIND_CLOSED, count),
            Message::Heartbeat => (KIND_HEARTBEAT, 0),
            Message::Stopping => (KIND_STOPPING, 0),
        };
        let mut buf = [0u8; HEADER_LEN];
        buf[0..2].copy_from_slice(&MAGIC);
        buf[2] = VERSION;
        buf[3] = kind;
        buf[8..16].copy_from_slice(&value.to_le_bytes());
        buf
    }

    /// Parses one message, rejecting anything that is not exactly this version's format.
    pub fn decode(buf: &[u8]) -> Result<Message, ProtocolError> {
        if buf.len() != HEADER_LEN {
            return Err(ProtocolError::Length(buf.len()));
        }
        if buf[0..2] != MAGIC {
            return Err(ProtocolError::Magic([buf[0], buf[1]]));
        }
        if buf[2] != VERSION {
            return Err(ProtocolError::Version(buf[2]));
        }
        let reserved = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
        if reserved != 0 {
            return Err(ProtocolError::Reserved(reserved));
        }
        let value = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        match buf[3] {
            KIND_CONN => Ok(Message::Conn { seq: value }),
            KIND_READY => Ok(Message::Ready { max_fds: value }),
            KIND_CLOSED => Ok(Message::Closed { count: value }),
            KIND_HEARTBEAT => Ok(Message::Heartbeat),
            KIND_STOPPING => Ok(Message::Stopping),
            other => Err(ProtocolError::Kind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_kind() {
        for msg in [
            Message::Conn { seq: u64::MAX },
            Message::Ready { max_fds: 0 },
            Message::Ready { max_fds: 16 },
            Message::Closed { count: 7 },
            Message::Heartbeat,
            Message::Stopping,
        ] {
            assert_eq!(Message::decode(&msg.encode()), Ok(msg));
        }
    }

    #[test]
    fn layout_is_fixed() {
        let buf = Message::Closed { count: 0x0102 }.encode();
        assert_eq!(buf, [b'R', b'C', 1, 3, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn rejects_anything_else() {
        let good = Message::Ready { max_fds: 1 }.encode();
        assert_eq!(Message::decode(&good[..15]), Err(ProtocolError::Length(15)));
        let mut bad = good;
        bad[0] = b'X';
        assert!(matches!(
            Message::decode(&bad),
            Err(ProtocolError::Magic(_))
        ));
        let mut bad = good;
        bad[2] = 2;
        assert_eq!(Message::decode(&bad), Err(ProtocolError::Version(2)));
        let mut bad = good;
        bad[3] = 99;
        assert_eq!(Message::decode(&bad), Err(ProtocolError::Kind(99)));
        let mut bad = good;
        bad[5] = 1;
        assert_eq!(Message::decode(&bad), Err(ProtocolError::Reserved(0x100)));
    }
}
