//! The message bus from Rust (docs/PROTOCOL.md section 6): connect to `RCLUSTER_IPC`, then
//! [`Bus::send`], [`Bus::broadcast`], [`Bus::recv`] and [`Bus::heartbeat`]. Blocking I/O on a
//! unix stream socket; [`Bus::sender`] gives a [`BusSender`] to send from other threads while
//! one thread receives.
//!
//! `data` is arbitrary JSON written by a process in any language, so the envelope is parsed
//! with serde_json (a hand-written decoder would have to handle every escape, number form and
//! nesting of JSON to be correct; serde_json is the well-kept crate that does).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

pub use serde_json;

/// Where an envelope goes (`to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum To {
    /// The master (`heartbeat`; `ping` is answered with `pong`).
    Master,
    /// The agent.
    Agent,
    /// Every worker and the agent, except the sender.
    All,
    /// The current worker of this slot (`RCLUSTER_WORKER_ID`).
    Worker(u32),
}

impl To {
    fn to_json(self) -> Value {
        match self {
            To::Master => "master".into(),
            To::Agent => "agent".into(),
            To::All => "all".into(),
            To::Worker(id) => id.into(),
        }
    }
}

/// Who sent an envelope (`from`, stamped by the master).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// The master.
    Master,
    /// The agent.
    Agent,
    /// The worker of this slot.
    Worker(u32),
}

/// One envelope received.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Who sent it.
    pub from: From,
    /// Its `type`.
    pub kind: String,
    /// Its `data` (`null` when absent).
    pub data: Value,
}

/// Sends envelopes; cheap to clone, usable from any thread (one line is written at a time).
#[derive(Debug, Clone)]
pub struct BusSender {
    stream: Arc<Mutex<UnixStream>>,
}

impl BusSender {
    /// Sends `{"to", "type", "data"}` as one line.
    pub fn send(&self, to: To, kind: &str, data: Value) -> io::Result<()> {
        let mut envelope = Map::new();
        envelope.insert("to".into(), to.to_json());
        envelope.insert("type".into(), kind.into());
        envelope.insert("data".into(), data);
        let mut line = serde_json::to_vec(&envelope).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        stream.write_all(&line)
    }

    /// Sends to every worker and the agent but this process.
    pub fn broadcast(&self, kind: &str, data: Value) -> io::Result<()> {
        self.send(To::All, kind, data)
    }

    /// One heartbeat (for `--heartbeat-timeout`); send it from the loop whose progress it
    /// vouches for.
    pub fn heartbeat(&self) -> io::Result<()> {
        self.send(To::Master, "heartbeat", Value::Null)
    }
}

/// A connection to the master's message bus.
#[derive(Debug)]
pub struct Bus {
    sender: BusSender,
    reader: BufReader<UnixStream>,
}

impl Bus {
    /// Connects to the bus named by `RCLUSTER_IPC`.
    pub fn connect() -> io::Result<Bus> {
        let path = std::env::var_os(rcluster_proto::env::RCLUSTER_IPC).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "RCLUSTER_IPC is not set (is this process started by rcluster-lb?)",
            )
        })?;
        Bus::connect_to(Path::new(&path))
    }

    /// Connects to the bus at `path`.
    pub fn connect_to(path: &Path) -> io::Result<Bus> {
        let stream = UnixStream::connect(path)?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Bus {
            sender: BusSender {
                stream: Arc::new(Mutex::new(stream)),
            },
            reader,
        })
    }

    /// A sender for other threads.
    pub fn sender(&self) -> BusSender {
        self.sender.clone()
    }

    /// See [`BusSender::send`].
    pub fn send(&self, to: To, kind: &str, data: Value) -> io::Result<()> {
        self.sender.send(to, kind, data)
    }

    /// See [`BusSender::broadcast`].
    pub fn broadcast(&self, kind: &str, data: Value) -> io::Result<()> {
        self.sender.broadcast(kind, data)
    }

    /// See [`BusSender::heartbeat`].
    pub fn heartbeat(&self) -> io::Result<()> {
        self.sender.heartbeat()
    }

    /// Blocks for the next envelope; `Ok(None)` when the master closed the connection. Lines
    /// that are not envelopes are skipped.
    pub fn recv(&mut self) -> io::Result<Option<Message>> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Ok(None);
            }
            if let Some(msg) = parse(&line) {
                return Ok(Some(msg));
            }
        }
    }
}

/// Parses one envelope line as the master writes it.
pub fn parse(line: &str) -> Option<Message> {
    let Value::Object(mut map) = serde_json::from_str(line.trim_end()).ok()? else {
        return None;
    };
    let from = match map.get("from")? {
        Value::String(s) if s == "master" => From::Master,
        Value::String(s) if s == "agent" => From::Agent,
        Value::Number(n) => From::Worker(u32::try_from(n.as_u64()?).ok()?),
        _ => return None,
    };
    let kind = map.get("type")?.as_str()?.to_owned();
    let data = map.remove("data").unwrap_or(Value::Null);
    Some(Message { from, kind, data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_what_the_master_writes() {
        let m = parse("{\"from\":3,\"to\":\"all\",\"type\":\"t\",\"data\":{\"a\":[1,\"\\n\"]}}\n")
            .unwrap();
        assert_eq!(m.from, From::Worker(3));
        assert_eq!(m.kind, "t");
        assert_eq!(m.data, json!({"a": [1, "\n"]}));
        assert_eq!(
            parse("{\"from\":\"agent\",\"type\":\"x\"}").unwrap().data,
            Value::Null
        );
        assert!(parse("{\"from\":\"nobody\",\"type\":\"x\"}").is_none());
        assert!(parse("[1]").is_none());
        assert!(parse("{\"type\":\"x\"}").is_none());
    }

    #[test]
    fn sends_one_line_per_envelope() {
        let (a, b) = UnixStream::pair().unwrap();
        let bus = Bus {
            sender: BusSender {
                stream: Arc::new(Mutex::new(a)),
            },
            reader: BufReader::new(b.try_clone().unwrap()),
        };
        bus.send(To::Worker(2), "hello", json!({"x": 1})).unwrap();
        bus.heartbeat().unwrap();
        let mut r = BufReader::new(b);
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v, json!({"to": 2, "type": "hello", "data": {"x": 1}}));
        l.clear();
        r.read_line(&mut l).unwrap();
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(
            v,
            json!({"to": "master", "type": "heartbeat", "data": null})
        );
    }
}
