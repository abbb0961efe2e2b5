//! The master's log output: its own lines (timestamped text or JSON, `--log-format`) and its
//! workers' stdout/stderr (`--worker-output capture`), all written to the master's stderr by one
//! writer thread, one whole line per `write`, so lines never interleave.
//!
//! Nothing in the master waits for stderr: lines go to the writer through a bounded queue of
//! [`QUEUE_LINES`]; when the queue is full (nobody reads the master's stderr fast enough), the
//! line is dropped and counted ([`dropped`], reported by `ctl status` and `/metrics`).
//!
//! Threads and fds: [`init`] starts the `log-writer` thread (it owns nothing but the queue);
//! the first [`Capture::add`] starts the `worker-output` thread, which owns the read ends of the
//! workers' output pipes (non-blocking, in its own mio poll) and splits what it reads into lines
//! ([`MAX_LINE`] at most; a longer one is cut into pieces). A pipe is forgotten at end of file,
//! when the worker and everything it started have closed their copies.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::cli::LogFormat;
use crate::sys::{self, Pid};

/// Lines waiting for the writer at most; more are dropped.
pub const QUEUE_LINES: usize = 4096;
/// Longest worker line passed on whole, bytes; a longer one is cut into pieces this long.
pub const MAX_LINE: usize = 16 * 1024;

enum Msg {
    Line(Vec<u8>),
    Flush(Sender<()>),
}

struct Sink {
    tx: Sender<Msg>,
    dropped: AtomicU64,
    format: LogFormat,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Starts the writer thread and installs the master's logger (level from `RCLUSTER_LOG`,
/// default info). Lines: `2026-11-30T21:00:00.123Z rcluster-lb[PID]: info message`, or one JSON
/// object per line with `ts`, `level`, `pid`, `msg`.
pub fn init(format: LogFormat) {
    let (tx, rx) = crossbeam_channel::bounded(QUEUE_LINES);
    let sink = Sink {
        tx,
        dropped: AtomicU64::new(0),
        format,
    };
    if SINK.set(sink).is_err() {
        return;
    }
    let started = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_lines(&rx));
    if let Err(e) = started {
        // Not eprintln!, which panics when stderr is a closed pipe.
        let _ = writeln!(
            io::stderr(),
            "rcluster-lb: cannot start the log writer thread: {e}"
        );
    }
    let pid = sys::getpid();
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("RCLUSTER_LOG", "info"))
        .target(env_logger::Target::Pipe(Box::new(LineSender::default())))
        .format(move |buf, record| {
            let level = record.level().as_str().to_ascii_lowercase();
            match format {
                LogFormat::Text => writeln!(
                    buf,
                    "{} rcluster-lb[{pid}]: {level} {}",
                    buf.timestamp_millis(),
                    record.args()
                ),
                LogFormat::Json => writeln!(
                    buf,
                    "{}",
                    serde_json::json!({
                        "ts": buf.timestamp_millis().to_string(),
                        "level": level,
                        "pid": pid,
                        "msg": record.args().to_string(),
                    })
                ),
            }
        })
        .init();
}

/// Lines dropped because the queue to stderr was full.
pub fn dropped() -> u64 {
    SINK.get().map_or(0, |s| s.dropped.load(Ordering::Relaxed))
}

/// Waits (at most `timeout`) until every line queued so far is written: called before the
/// master exits, so its last lines are not lost.
pub fn flush(timeout: Duration) {
    let Some(sink) = SINK.get() else {
        return;
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    if sink.tx.send_timeout(Msg::Flush(tx), timeout).is_ok() {
        let _ = rx.recv_timeout(timeout);
    }
}

fn send_line(line: Vec<u8>) {
    let Some(sink) = SINK.get() else {
        let _ = io::stderr().write_all(&line);
        return;
    };
    match sink.tx.try_send(Msg::Line(line)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            sink.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn write_lines(rx: &Receiver<Msg>) {
    let mut err = io::stderr();
    for msg in rx {
        match msg {
            // One write_all per line on unbuffered stderr: whole lines, in queue order.
            Msg::Line(line) => {
                let _ = err.write_all(&line);
            }
            Msg::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// env_logger's target: collects what it writes and queues each complete line.
#[derive(Default)]
struct LineSender {
    partial: Vec<u8>,
}

impl Write for LineSender {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let rest = self.partial.split_off(end + 1);
            send_line(std::mem::replace(&mut self.partial, rest));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Which of a worker's streams a pipe carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// fd 1.
    Stdout,
    /// fd 2.
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Formats one worker line (without its newline) for the master's stderr.
pub fn format_worker_line(
    format: LogFormat,
    slot: usize,
    pid: Pid,
    stream: Stream,
    line: &[u8],
) -> Vec<u8> {
    let text = String::from_utf8_lossy(line);
    let ts = humantime::format_rfc3339_millis(SystemTime::now());
    let mut out = match format {
        LogFormat::Text => format!("{ts} [w{slot} {pid}] {text}"),
        LogFormat::Json => serde_json::json!({
            "ts": ts.to_string(),
            "worker": slot,
            "worker_pid": pid,
            "stream": stream.as_str(),
            "msg": text,
        })
        .to_string(),
    }
    .into_bytes();
    out.push(b'\n');
    out
}

/// A worker's output pipes: the write ends go to the spawn (fd 1 and 2), the read ends to
/// [`Capture::add`].
pub struct Pipes {
    /// For the worker's stdout.
    pub stdout: (OwnedFd, OwnedFd),
    /// For the worker's stderr.
    pub stderr: (OwnedFd, OwnedFd),
}

impl Pipes {
    /// Two pipes, close-on-exec.
    pub fn new() -> io::Result<Pipes> {
        Ok(Pipes {
            stdout: sys::pipe()?,
            stderr: sys::pipe()?,
        })
    }
}

struct Source {
    slot: usize,
    pid: Pid,
    stream: Stream,
    pipe: std::fs::File,
    partial: Vec<u8>,
}

enum CaptureMsg {
    Add(Source),
    /// Read everything the pipes hold now, then answer.
    Flush(Sender<()>),
}

/// The `worker-output` thread's handle: hands it new workers' pipes.
pub struct Capture {
    tx: Sender<CaptureMsg>,
    waker: Arc<Waker>,
}

const WAKER: Token = Token(usize::MAX);

impl Capture {
    /// Starts the thread.
    pub fn start() -> io::Result<Capture> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let format = SINK.get().map_or(LogFormat::Text, |s| s.format);
        std::thread::Builder::new()
            .name("worker-output".into())
            .spawn(move || read_loop(poll, &rx, format))?;
        Ok(Capture { tx, waker })
    }

    /// Reads worker `pid`'s output from the read ends of `pipes` (the caller has already given
    /// the write ends to the worker and dropped its own copies).
    pub fn add(&self, slot: usize, pid: Pid, stdout: OwnedFd, stderr: OwnedFd) {
        for (stream, fd) in [(Stream::Stdout, stdout), (Stream::Stderr, stderr)] {
            let _ = sys::set_nonblocking(fd.as_fd(), true);
            let _ = self.tx.send(CaptureMsg::Add(Source {
                slot,
                pid,
                stream,
                pipe: std::fs::File::from(fd),
                partial: Vec::new(),
            }));
        }
        let _ = self.waker.wake();
    }

    /// Waits (at most `timeout`) until the thread has queued what the pipes hold now: called
    /// when the master stops, so the workers' last lines are not lost.
    pub fn flush(&self, timeout: Duration) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send(CaptureMsg::Flush(tx)).is_ok() {
            let _ = self.waker.wake();
            let _ = rx.recv_timeout(timeout);
        }
    }
}

fn read_loop(mut poll: Poll, rx: &Receiver<CaptureMsg>, format: LogFormat) {
    let mut sources: HashMap<usize, Source> = HashMap::new();
    let mut next_key = 0usize;
    let mut events = Events::with_capacity(64);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("worker output: poll failed: {e}");
            return;
        }
        for event in events.iter() {
            if event.token() == WAKER {
                continue;
            }
            let key = event.token().0;
            if sources
                .get_mut(&key)
                .is_some_and(|src| drain(src, &mut buf, format))
            {
                forget(&poll, &mut sources, key);
            }
        }
        for msg in rx.try_iter() {
            let src = match msg {
                CaptureMsg::Add(src) => src,
                CaptureMsg::Flush(done) => {
                    let keys: Vec<usize> = sources.keys().copied().collect();
                    for key in keys {
                        if sources
                            .get_mut(&key)
                            .is_some_and(|src| drain(src, &mut buf, format))
                        {
                            forget(&poll, &mut sources, key);
                        }
                    }
                    let _ = done.send(());
                    continue;
                }
            };
            let raw = src.pipe.as_raw_fd();
            let key = next_key;
            next_key = next_key.wrapping_add(1) % (usize::MAX - 1);
            sources.insert(key, src);
            if let Err(e) =
                poll.registry()
                    .register(&mut SourceFd(&raw), Token(key), Interest::READABLE)
            {
                log::warn!("worker output: cannot watch a pipe: {e}");
                sources.remove(&key);
                continue;
            }
            // Output written before registration is read now (edge-triggered).
            if sources
                .get_mut(&key)
                .is_some_and(|src| drain(src, &mut buf, format))
            {
                forget(&poll, &mut sources, key);
            }
        }
    }
}

fn forget(poll: &Poll, sources: &mut HashMap<usize, Source>, key: usize) {
    if let Some(src) = sources.remove(&key) {
        let raw = src.pipe.as_raw_fd();
        let _ = poll.registry().deregister(&mut SourceFd(&raw));
    }
}

/// Reads what the pipe has and queues every complete line; true at end of file.
fn drain(src: &mut Source, buf: &mut [u8], format: LogFormat) -> bool {
    loop {
        match (&src.pipe).read(buf) {
            Ok(0) => {
                if !src.partial.is_empty() {
                    let line = std::mem::take(&mut src.partial);
                    send_line(format_worker_line(
                        format, src.slot, src.pid, src.stream, &line,
                    ));
                }
                return true;
            }
            Ok(n) => {
                split_lines(&mut src.partial, &buf[..n], |line| {
                    send_line(format_worker_line(
                        format, src.slot, src.pid, src.stream, line,
                    ));
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// Appends `data` to `partial` and calls `emit` for every complete line (without its newline)
/// and for every [`MAX_LINE`] piece of a longer one; what is left stays in `partial`.
pub fn split_lines(partial: &mut Vec<u8>, data: &[u8], mut emit: impl FnMut(&[u8])) {
    partial.extend_from_slice(data);
    let mut start = 0;
    while let Some(off) = partial[start..].iter().position(|&b| b == b'\n') {
        let end = start + off;
        let mut line = &partial[start..end];
        while line.len() > MAX_LINE {
            emit(&line[..MAX_LINE]);
            line = &line[MAX_LINE..];
        }
        emit(line);
        start = end + 1;
    }
    while partial.len() - start > MAX_LINE {
        emit(&partial[start..start + MAX_LINE]);
        start += MAX_LINE;
    }
    partial.drain(..start);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut partial = Vec::new();
        let mut lines = Vec::new();
        for c in chunks {
            split_lines(&mut partial, c, |l| lines.push(l.to_vec()));
        }
        (lines, partial)
    }

    #[test]
    fn lines_are_whole_across_reads() {
        let (lines, rest) = split_all(&[b"ab", b"c\nde", b"f\n\nx"]);
        assert_eq!(lines, vec![b"abc".to_vec(), b"def".to_vec(), Vec::new()]);
        assert_eq!(rest, b"x");
    }

    #[test]
    fn a_long_line_is_cut_into_max_line_pieces() {
        let long = vec![b'a'; MAX_LINE * 2 + 10];
        let (lines, rest) = split_all(&[&long]);
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l.len() == MAX_LINE));
        assert_eq!(rest.len(), 10);
    }

    #[test]
    fn worker_lines_carry_slot_and_pid() {
        let text = format_worker_line(LogFormat::Text, 3, 42, Stream::Stdout, b"hello");
        let text = String::from_utf8(text).unwrap();
        assert!(text.ends_with(" [w3 42] hello\n"), "{text}");
        let json = format_worker_line(LogFormat::Json, 3, 42, Stream::Stderr, b"a \"q\"");
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["worker"], 3);
        assert_eq!(v["worker_pid"], 42);
        assert_eq!(v["stream"], "stderr");
        assert_eq!(v["msg"], "a \"q\"");
    }
}
