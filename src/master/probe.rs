//! Active health probes (`--health-check 'GET /healthz'`, dispatch mode): every
//! `--health-interval` the supervisor probes each ready worker. A probe is a real loopback TCP
//! connection the master makes to itself (a private listener on 127.0.0.1, port 0, one per
//! probe); its server end is handed to the chosen worker through the acceptor
//! ([`Command::Probe`]: straight onto that worker's channel, outside the policy and the user
//! traffic counts), and the client end sends the request and waits up to `--health-timeout`
//! for a `2xx` status line. [`Probes`] counts failures in a row; `--health-fails` of them
//! replace the worker (start a replacement, then drain the old one).
//!
//! Each probe runs on a short-lived thread of its own (blocking I/O with timeouts), so a hung
//! worker delays no one; results come back to the supervisor over a channel plus its waker.
//! In the kernel modes the master cannot choose which worker a connection reaches, so there
//! are no per-worker probes there (heartbeats work in every mode).

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use mio::Waker;

use crate::master::acceptor::Command;
use crate::master::lifecycle::WorkerId;

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// The worker probed.
    pub id: WorkerId,
    /// `Ok` on a 2xx status line within the timeout, else why not.
    pub outcome: Result<(), String>,
}

/// What to send and how long to wait.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    /// The request bytes (`METHOD PATH HTTP/1.1`, `Host`, `Connection: close`).
    pub request: Vec<u8>,
    /// Limit for the whole probe.
    pub timeout: Duration,
}

impl ProbeSpec {
    /// Builds the request from `--health-check`'s `METHOD PATH` (or just `PATH`, meaning GET).
    pub fn parse(check: &str, timeout: Duration) -> Result<ProbeSpec, String> {
        let words: Vec<&str> = check.split_ascii_whitespace().collect();
        let (method, path) = match words.as_slice() {
            [path] => ("GET", *path),
            [method, path] => (*method, *path),
            _ => return Err(format!("expected 'METHOD /path', got {check:?}")),
        };
        if !method.bytes().all(|b| b.is_ascii_uppercase()) || method.is_empty() {
            return Err(format!("{method:?} is not an HTTP method"));
        }
        if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_control()) {
            return Err(format!("{path:?} is not a request path starting with /"));
        }
        Ok(ProbeSpec {
            request: format!(
                "{method} {path} HTTP/1.1\r\nHost: rcluster-lb-health\r\nUser-Agent: \
                 rcluster-lb-health\r\nConnection: close\r\n\r\n"
            )
            .into_bytes(),
            timeout,
        })
    }
}

/// Whether `head` (the first bytes of a response) starts with a 2xx status line; `None` while
/// the status line is incomplete.
pub fn status_ok(head: &[u8]) -> Option<Result<(), String>> {
    let end = head.iter().position(|&b| b == b'\n')?;
    let line = String::from_utf8_lossy(&head[..end]);
    let mut parts = line.split_ascii_whitespace();
    let version = parts.next().unwrap_or("");
    let code = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/") {
        return Some(Err(format!("not an HTTP response: {:?}", line.trim_end())));
    }
    Some(if code.len() == 3 && code.starts_with('2') {
        Ok(())
    } else {
        Err(format!("status {code}"))
    })
}

/// Starts one probe of worker `id` on a thread of its own.
pub fn spawn_probe(
    id: WorkerId,
    spec: Arc<ProbeSpec>,
    acceptor: (Sender<Command>, Arc<Waker>),
    results: Sender<ProbeResult>,
    supervisor_waker: Arc<Waker>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("health-probe".into())
        .spawn(move || {
            let outcome = probe(id, &spec, &acceptor).map_err(|e| e.to_string());
            let _ = results.send(ProbeResult { id, outcome });
            let _ = supervisor_waker.wake();
        })
        .map(drop)
}

fn probe(
    id: WorkerId,
    spec: &ProbeSpec,
    acceptor: &(Sender<Command>, Arc<Waker>),
) -> io::Result<()> {
    let deadline = Instant::now() + spec.timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "timed out"))
    };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let mut client = TcpStream::connect(listener.local_addr()?)?;
    let (server, peer) = listener.accept()?;
    drop(listener);
    // Like every dispatched connection (docs/PROTOCOL.md §2).
    server.set_nonblocking(true)?;
    if peer != client.local_addr()? {
        // Another local process connected to the private port first.
        return Err(io::Error::other("the probe listener accepted a stranger"));
    }
    let (commands, waker) = acceptor;
    commands
        .send(Command::Probe {
            id,
            fd: OwnedFd::from(server),
        })
        .map_err(|_| io::Error::other("the acceptor is gone"))?;
    let _ = waker.wake();
    client.set_write_timeout(Some(left()?))?;
    client.write_all(&spec.request)?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        client.set_read_timeout(Some(left()?))?;
        let n = match client.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {:?}", spec.timeout),
                ));
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed without a status line",
            ));
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(result) = status_ok(&head) {
            return result.map_err(io::Error::other);
        }
        if head.len() > 8192 {
            return Err(io::Error::other("no status line in the first 8 KiB"));
        }
    }
}

/// Failures in a row per worker, and which probes are out.
#[derive(Debug)]
pub struct Probes {
    /// Probe period.
    pub interval: Duration,
    /// Failures in a row that replace a worker.
    pub fails: u32,
    /// When the next round starts.
    pub next_round: Instant,
    in_row: HashMap<WorkerId, u32>,
    in_flight: HashSet<WorkerId>,
}

impl Probes {
    /// A probe round every `interval`, the first one an interval from `now`.
    pub fn new(interval: Duration, fails: u32, now: Instant) -> Probes {
        Probes {
            interval,
            fails,
            next_round: now + interval,
            in_row: HashMap::new(),
            in_flight: HashSet::new(),
        }
    }

    /// The workers of this round out of `ready` (one probe at a time per worker); moves the
    /// next round an interval on.
    pub fn round(&mut self, now: Instant, ready: &[WorkerId]) -> Vec<WorkerId> {
        self.next_round = now + self.interval;
        let out: Vec<WorkerId> = ready
            .iter()
            .copied()
            .filter(|id| !self.in_flight.contains(id))
            .collect();
        self.in_flight.extend(out.iter().copied());
        out
    }

    /// Records a result; returns true when the worker has now failed `fails` in a row (its
    /// count restarts, so it is reported once per `fails` failures).
    pub fn record(&mut self, result: &ProbeResult) -> bool {
        self.in_flight.remove(&result.id);
        if result.outcome.is_ok() {
            self.in_row.remove(&result.id);
            return false;
        }
        let n = self.in_row.entry(result.id).or_insert(0);
        *n += 1;
        if *n >= self.fails {
            self.in_row.remove(&result.id);
            return true;
        }
        false
    }

    /// Stops counting for `id` (draining, exited).
    pub fn forget(&mut self, id: WorkerId) {
        self.in_row.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        let spec = ProbeSpec::parse("GET /healthz", Duration::from_secs(1)).unwrap();
        assert!(spec.request.starts_with(b"GET /healthz HTTP/1.1\r\n"));
        assert!(spec.request.ends_with(b"\r\n\r\n"));
        assert!(ProbeSpec::parse("/up", Duration::from_secs(1)).is_ok());
        assert!(ProbeSpec::parse("get /x", Duration::from_secs(1)).is_err());
        assert!(ProbeSpec::parse("GET x", Duration::from_secs(1)).is_err());
        assert!(ProbeSpec::parse("GET /a b", Duration::from_secs(1)).is_err());
        assert!(ProbeSpec::parse("", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn only_2xx_is_healthy() {
        assert_eq!(status_ok(b"HTTP/1.1 200 OK\r\n"), Some(Ok(())));
        assert_eq!(status_ok(b"HTTP/1.0 204 No Content\r\n"), Some(Ok(())));
        assert!(matches!(status_ok(b"HTTP/1.1 503 Busy\r\n"), Some(Err(_))));
        assert!(matches!(status_ok(b"SSH-2.0\r\n"), Some(Err(_))));
        assert_eq!(status_ok(b"HTTP/1.1 200"), None, "incomplete");
    }

    #[test]
    fn failures_in_a_row_count_once() {
        let t = Instant::now();
        let mut p = Probes::new(Duration::from_secs(1), 3, t);
        let fail = |id| ProbeResult {
            id,
            outcome: Err("x".into()),
        };
        assert_eq!(p.round(t, &[1, 2]), [1, 2]);
        assert_eq!(
            p.round(t, &[1, 2]),
            Vec::<WorkerId>::new(),
            "still in flight"
        );
        assert!(!p.record(&fail(1)));
        assert!(!p.record(&ProbeResult {
            id: 2,
            outcome: Ok(())
        }));
        assert!(!p.record(&fail(1)));
        assert!(
            !p.record(&ProbeResult {
                id: 1,
                outcome: Ok(())
            }),
            "a success resets"
        );
        assert!(!p.record(&fail(1)));
        assert!(!p.record(&fail(1)));
        assert!(p.record(&fail(1)));
        assert!(!p.record(&fail(1)), "counted again from zero");
    }

    #[test]
    fn a_probe_reaches_the_fd_it_hands_over() {
        // The acceptor's side is played here: take the Probe command and answer on its fd.
        let (tx, rx) = crossbeam_channel::unbounded();
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let server = std::thread::spawn(move || {
            let Ok(Command::Probe { id, fd }) = rx.recv() else {
                panic!("no probe")
            };
            assert_eq!(id, 7);
            // Connections are handed over non-blocking; a worker that did not ask for that
            // gets a blocking one (the shim's accept4), so the request is waited for.
            let mut s = TcpStream::from(fd);
            s.set_nonblocking(false).unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
        });
        let spec = ProbeSpec::parse("GET /healthz", Duration::from_secs(10)).unwrap();
        probe(7, &spec, &(tx, waker)).unwrap();
        server.join().unwrap();
    }
}
