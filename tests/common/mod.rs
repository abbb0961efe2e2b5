//! Test harness shared by the integration tests: [`TestCluster`] runs the real `rcluster-lb`
//! binary on port 0, waits for its log lines with deadlines (never sleeps as synchronisation),
//! and kills and reaps the master and every worker on drop, also when a test fails.
#![allow(dead_code)]

mod busy;
#[allow(unused_imports)]
pub use busy::*;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_rcluster-lb");

/// Generous deadline for conditions (a loaded 2-core CI machine is slow, never wrong).
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Lines the master printed on stderr, shared with the reader thread.
#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

/// A running master with its workers.
pub struct TestCluster {
    child: Option<Child>,
    log: Arc<Log>,
    /// The listeners' bound addresses, in order.
    pub addrs: Vec<SocketAddr>,
    /// Every worker pid ever seen, so drop can kill stragglers.
    seen_workers: Mutex<Vec<i32>>,
}

impl TestCluster {
    /// Starts `rcluster-lb ARGS` (with `--listen 127.0.0.1:0` unless ARGS has `--listen`) and
    /// waits for every listener's line and for "all N workers ready".
    pub fn start(args: &[&str]) -> TestCluster {
        let cluster = Self::spawn(args);
        cluster.wait_for_log("workers ready", DEADLINE);
        cluster
    }

    /// Starts the master and waits only for its listening lines.
    pub fn spawn(args: &[&str]) -> TestCluster {
        Self::spawn_with_env(args, &[])
    }

    /// As [`TestCluster::spawn`] with extra environment variables for the master.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> TestCluster {
        let mut cmd = Command::new(BIN);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn_with_command(cmd, args)
    }

    /// As [`TestCluster::spawn`], running the master through `cmd` (the binary itself, or a
    /// wrapper such as `setpriv ... -- BIN`), to which the arguments are added.
    pub fn spawn_with_command(mut cmd: Command, args: &[&str]) -> TestCluster {
        let mut argv: Vec<&str> = Vec::new();
        let listeners = args.iter().filter(|a| **a == "--listen").count();
        if listeners == 0 {
            argv.extend(["--listen", "127.0.0.1:0"]);
        }
        // The suites were written for the master's own dispatch; RCLUSTER_TEST_STEER=auto runs
        // them with kernel steering where it applies (tests/steer.rs always chooses itself).
        let steer = std::env::var("RCLUSTER_TEST_STEER").unwrap_or_else(|_| "dispatch".into());
        if !args.contains(&"--steer") {
            argv.extend(["--steer", steer.as_str()]);
        }
        argv.extend_from_slice(args);
        cmd.args(&argv).stdin(Stdio::null());
        Self::spawn_command(cmd, listeners.max(1))
    }

    /// Starts a prepared master command (another copy of the binary, another working
    /// directory, a socket as stdin) and waits for `listeners` listening lines.
    pub fn spawn_command(mut cmd: Command, listeners: usize) -> TestCluster {
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("RCLUSTER_LOG", "info");
        let mut child = cmd.spawn().expect("spawn rcluster-lb");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Log::default());
        let reader_log = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("| {line}");
                reader_log.lines.lock().unwrap().push(line);
                reader_log.changed.notify_all();
            }
        });
        let mut cluster = TestCluster {
            child: Some(child),
            log,
            addrs: Vec::new(),
            seen_workers: Mutex::new(Vec::new()),
        };
        let lines = cluster.wait_for_count("listening on ", listeners, DEADLINE);
        cluster.addrs = lines
            .iter()
            .map(|l| {
                let addr = l.split("listening on ").nth(1).unwrap().trim();
                addr.parse()
                    .unwrap_or_else(|_| panic!("bad address in {l}"))
            })
            .collect();
        cluster
    }

    /// The first listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The master's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Every log line so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lines.lock().unwrap().clone()
    }

    /// Whether some log line contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    /// Waits until a log line contains `needle`; returns the first such line.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_count(needle, 1, timeout).remove(0)
    }

    /// Waits until `count` log lines contain `needle`; returns them.
    pub fn wait_for_count(&self, needle: &str, count: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            let hits: Vec<String> = lines
                .iter()
                .filter(|l| l.contains(needle))
                .cloned()
                .collect();
            if hits.len() >= count {
                return hits;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                panic!(
                    "timed out after {timeout:?} waiting for {count} log lines with {needle:?}; \
                     log:\n{}",
                    self.log_lines().join("\n")
                );
            }
            lines = self
                .log
                .changed
                .wait_timeout(lines, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Sends a signal to the master.
    pub fn signal(&self, sig: i32) {
        kill(self.pid(), sig);
    }

    /// The master's current child processes (its workers).
    pub fn worker_pids(&self) -> Vec<i32> {
        let pids = children_of(self.pid());
        let mut seen = self.seen_workers.lock().unwrap();
        for &p in &pids {
            if !seen.contains(&p) {
                seen.push(p);
            }
        }
        pids
    }

    /// Waits until the master has exactly `n` children.
    pub fn wait_for_workers(&self, n: usize) -> Vec<i32> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let pids = self.worker_pids();
            if pids.len() == n {
                return pids;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} workers, have {pids:?}; log:\n{}",
                self.log_lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the master to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "master did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the master still runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// SIGKILLs the master without reaping its workers (for the PDEATHSIG test).
    pub fn kill_master(&mut self) -> ExitStatus {
        self.worker_pids();
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap()
    }

    /// Every worker pid this cluster ever had.
    pub fn all_seen_workers(&self) -> Vec<i32> {
        self.worker_pids();
        self.seen_workers.lock().unwrap().clone()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let workers = self.all_seen_workers_quiet();
        // Workers lead their own process groups, which also hold what they forked (a prefork
        // server's children): named now, while the leaders live, since PDEATHSIG reaches only
        // the workers themselves.
        let groups: Vec<i32> = workers
            .iter()
            .copied()
            .filter(|&pid| process_group(pid) == Some(pid))
            .collect();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // PDEATHSIG normally takes care of them; make sure, by pid, even if it did not.
        for pid in workers {
            kill(pid, libc::SIGKILL);
        }
        for pgid in groups {
            kill(-pgid, libc::SIGKILL);
        }
    }
}

impl TestCluster {
    fn all_seen_workers_quiet(&self) -> Vec<i32> {
        let mut seen = self
            .seen_workers
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        if let Some(child) = &self.child {
            for p in children_of(child.id() as i32) {
                if !seen.contains(&p) {
                    seen.push(p);
                }
            }
        }
        seen
    }
}

/// The process group of `pid`, while it lives.
fn process_group(pid: i32) -> Option<i32> {
    rcluster_sys::getpgid(pid).ok().filter(|&pgid| pgid > 0)
}

/// `kill(2)`, ignoring "no such process".
pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill takes plain integers.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
            state != Some('Z') && state != Some('X')
        }
        Err(_) => false,
    }
}

/// Children of `pid`, from every thread's `/proc/PID/task/TID/children`.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            for p in text.split_whitespace().filter_map(|p| p.parse().ok()) {
                if alive(p) && !out.contains(&p) {
                    out.push(p);
                }
            }
        }
    }
    out.sort();
    out
}

/// One HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Response {
    /// `X-Worker-Id`.
    pub fn worker(&self) -> usize {
        self.headers["x-worker-id"]
            .parse()
            .expect("numeric worker id")
    }
    /// `X-Worker-Pid`.
    pub fn pid(&self) -> i32 {
        self.headers["x-worker-pid"].parse().expect("numeric pid")
    }
}

/// `GET path` on a new connection with `Connection: close`.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    get_with_timeout(addr, path, DEADLINE)
}

/// Parses a complete response.
pub fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let text = String::from_utf8_lossy(raw);
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("bad response: {text:?}"),
        )
    };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_string(),
    })
}

/// `n` GETs over `concurrency` threads, each on a new connection. Returns every result.
pub fn get_many(
    addr: SocketAddr,
    path: &str,
    n: usize,
    concurrency: usize,
) -> Vec<std::io::Result<Response>> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let next = Arc::clone(&next);
            let path = path.to_string();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                    out.push(get(addr, &path));
                }
                out
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect()
}

/// Counts responses per worker id; panics on any error, naming it.
pub fn per_worker(results: &[std::io::Result<Response>]) -> HashMap<usize, usize> {
    let mut counts = HashMap::new();
    for r in results {
        match r {
            Ok(resp) => {
                assert_eq!(resp.status, 200, "{resp:?}");
                *counts.entry(resp.worker()).or_insert(0) += 1;
            }
            Err(e) => panic!("request failed: {e}"),
        }
    }
    counts
}

/// `GET path` on new connections, `concurrency` at a time, in batches of 10, until every worker
/// of `workers` has answered at least one (or DEADLINE: then it panics, naming who answered).
/// Every request must succeed. Returns the answers per worker. For "this worker serves again"
/// checks where the first few connections may, by the policy's ties, all go to another.
pub fn until_served_by(
    addr: SocketAddr,
    path: &str,
    workers: &[usize],
    concurrency: usize,
) -> HashMap<usize, usize> {
    let deadline = Instant::now() + DEADLINE;
    let mut counts: HashMap<usize, usize> = HashMap::new();
    loop {
        for (worker, n) in per_worker(&get_many(addr, path, 10, concurrency)) {
            *counts.entry(worker).or_insert(0) += n;
        }
        if workers.iter().all(|w| counts.contains_key(w)) {
            return counts;
        }
        assert!(
            Instant::now() < deadline,
            "workers {workers:?} did not all answer within {DEADLINE:?}: {counts:?}"
        );
    }
}

/// `GET path` on a new connection with `Connection: close`, giving up after `timeout` for the
/// connect and for each read or write.
pub fn get_with_timeout(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<Response> {
    read_response(send_request_with_timeout(addr, path, timeout)?)
}

/// Connects and sends `GET path` (`Connection: close`) without reading the answer, so a test
/// can hold many requests in flight from one thread; read it with [`read_response`].
pub fn send_request(addr: SocketAddr, path: &str) -> std::io::Result<TcpStream> {
    send_request_with_timeout(addr, path, DEADLINE)
}

fn send_request_with_timeout(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    Ok(s)
}

/// Reads the whole answer to a request sent with [`send_request`].
pub fn read_response(mut s: TcpStream) -> std::io::Result<Response> {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

impl Response {
    /// `X-Worker-Generation`.
    pub fn generation(&self) -> u64 {
        self.headers["x-worker-generation"]
            .parse()
            .expect("numeric generation")
    }
}

/// What became of each request of a load run.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// 200 responses.
    pub ok: usize,
    /// A response with another status.
    pub bad_status: usize,
    /// `ECONNREFUSED`.
    pub refused: usize,
    /// `ECONNRESET`, `ECONNABORTED`, `EPIPE`.
    pub reset: usize,
    /// The connection closed before a complete response.
    pub eof: usize,
    /// No answer within the timeout.
    pub timeout: usize,
    /// Any other error.
    pub other: usize,
    /// 200 responses per `X-Worker-Generation`.
    pub by_generation: std::collections::BTreeMap<u64, usize>,
    /// 200 responses per `X-Worker-Id`.
    pub by_worker: std::collections::BTreeMap<usize, usize>,
    /// 200 responses per `X-Worker-Pid`.
    pub by_pid: std::collections::BTreeMap<i32, usize>,
    /// The first few failures, for the assertion message.
    pub examples: Vec<String>,
}

impl Tally {
    /// Requests that did not get a 200.
    pub fn errors(&self) -> usize {
        self.bad_status + self.refused + self.reset + self.eof + self.timeout + self.other
    }

    /// Requests counted.
    pub fn total(&self) -> usize {
        self.ok + self.errors()
    }

    /// Counts one result.
    pub fn add(&mut self, result: &std::io::Result<Response>) {
        use std::io::ErrorKind as K;
        let failure = match result {
            Ok(r) if r.status == 200 => {
                self.ok += 1;
                // The demo worker's headers; other servers' answers are only counted.
                if r.headers.contains_key("x-worker-id") {
                    *self.by_generation.entry(r.generation()).or_default() += 1;
                    *self.by_worker.entry(r.worker()).or_default() += 1;
                    *self.by_pid.entry(r.pid()).or_default() += 1;
                }
                return;
            }
            Ok(r) => {
                self.bad_status += 1;
                format!("status {}", r.status)
            }
            Err(e) => {
                match e.kind() {
                    K::ConnectionRefused => self.refused += 1,
                    K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => self.reset += 1,
                    K::UnexpectedEof => self.eof += 1,
                    K::WouldBlock | K::TimedOut => self.timeout += 1,
                    _ => self.other += 1,
                }
                e.to_string()
            }
        };
        if self.examples.len() < 10 {
            // The time of day (UTC, as the master's log has it), to find the failure there.
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() % 86_400_000);
            self.examples.push(format!(
                "{failure} at {:02}:{:02}:{:02}.{:03}Z",
                ms / 3_600_000,
                ms / 60_000 % 60,
                ms / 1000 % 60,
                ms % 1000
            ));
        }
    }

    /// Adds another tally's counts to this one.
    pub fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.bad_status += other.bad_status;
        self.refused += other.refused;
        self.reset += other.reset;
        self.eof += other.eof;
        self.timeout += other.timeout;
        self.other += other.other;
        for (k, v) in other.by_generation {
            *self.by_generation.entry(k).or_default() += v;
        }
        for (k, v) in other.by_worker {
            *self.by_worker.entry(k).or_default() += v;
        }
        for (k, v) in other.by_pid {
            *self.by_pid.entry(k).or_default() += v;
        }
        for e in other.examples {
            if self.examples.len() < 10 {
                self.examples.push(e);
            }
        }
    }

    /// One line with every loss count, for the test output.
    pub fn summary(&self) -> String {
        format!(
            "{} requests: ok {}, refused {}, reset {}, eof {}, timeout {}, bad status {}, other {}; \
             {} worker pids, generations {:?}",
            self.total(),
            self.ok,
            self.refused,
            self.reset,
            self.eof,
            self.timeout,
            self.bad_status,
            self.other,
            self.by_pid.len(),
            self.by_generation
        )
    }
}

/// Per-request timeout of a [`Load`]: far above any service time the tests ask for.
pub const LOAD_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Background client load: `total` GETs, each on a new connection, from a pool of threads,
/// paced to at most `rate` requests per second (request `i` is not started before
/// `start + i / rate`). Stops early when dropped.
pub struct Load {
    completed: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Tally>>,
}

impl Load {
    /// Starts the load.
    pub fn start(addr: SocketAddr, path: &str, total: usize, rate: f64, threads: usize) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let next = Arc::new(AtomicUsize::new(0));
        let completed = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let threads = (0..threads)
            .map(|_| {
                let (next, completed, stop) =
                    (Arc::clone(&next), Arc::clone(&completed), Arc::clone(&stop));
                let path = path.to_string();
                std::thread::spawn(move || {
                    let mut tally = Tally::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= total || stop.load(Ordering::Relaxed) {
                            return tally;
                        }
                        // Pacing, not synchronisation: keeps the offered rate bounded.
                        let due = start + Duration::from_secs_f64(i as f64 / rate);
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        tally.add(&get_with_timeout(addr, &path, LOAD_REQUEST_TIMEOUT));
                        completed.fetch_add(1, Ordering::Release);
                    }
                })
            })
            .collect();
        Load {
            completed,
            stop,
            threads,
        }
    }

    /// Requests finished so far (answered or failed).
    pub fn completed(&self) -> usize {
        self.completed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until `n` requests have finished.
    pub fn wait_completed(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.completed() < n {
            assert!(
                Instant::now() < deadline,
                "load: only {} of {n} requests finished within {timeout:?}",
                self.completed()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts no more requests, waits for those under way and returns the tally.
    pub fn stop(self) -> Tally {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.join()
    }

    /// Waits for every request and returns the tally.
    pub fn join(mut self) -> Tally {
        let mut tally = Tally::default();
        for t in self.threads.drain(..) {
            tally.merge(t.join().expect("load thread panicked"));
        }
        tally
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Open fds of a process (`/proc/PID/fd` entries).
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Threads of a process (`/proc/PID/task` entries).
pub fn thread_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A process's state letter from `/proc/PID/stat` (`R`, `S`, `T` for stopped, ...).
pub fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(") ").next().and_then(|s| s.chars().next())
}

/// Waits until `pid`'s main thread sleeps in `epoll_wait` (`/proc/PID/wchan`): its event loop
/// waits for events.
pub fn wait_in_epoll_wait(pid: i32) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        if wchan.contains("epoll_wait") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} never waited in epoll_wait (wchan {wchan:?})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// TCP connections (sockets in any state but `LISTEN`) that process `pid` holds an fd of,
/// from `/proc/PID/fd` and `/proc/net/tcp{,6}`.
pub fn tcp_connections_held(pid: i32) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let held: std::collections::HashSet<u64> = dir
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?;
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|t| std::fs::read_to_string(t).ok())
        .map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|line| {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    // f[3]: the state, 0A = LISTEN; f[9]: the inode.
                    f.len() > 9
                        && f[3] != "0A"
                        && f[9].parse::<u64>().is_ok_and(|i| held.contains(&i))
                })
                .count()
        })
        .sum()
}

/// Stops `pid` (SIGSTOP) at a moment it holds no TCP connection, so that what a test then
/// counts as lost cannot be a request it had accepted and was serving when it stopped (that
/// one is the worker's, and only its own exit ends it). Under load this may take a few
/// tries: a worker that holds one is let go on (SIGCONT) for a moment first.
pub fn stop_between_connections(pid: i32) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        kill(pid, libc::SIGSTOP);
        wait_stopped(pid);
        let held = tcp_connections_held(pid);
        if held == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} always held a connection when stopped ({held} the last time)"
        );
        kill(pid, libc::SIGCONT);
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until `pid` is stopped (after SIGSTOP).
pub fn wait_stopped(pid: i32) {
    let deadline = Instant::now() + DEADLINE;
    while process_state(pid) != Some('T') {
        assert!(Instant::now() < deadline, "process {pid} did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends `GET path` on an open connection (`Connection: keep-alive` or `close`) and reads one
/// response, delimited by its `Content-Length`.
pub fn get_on(s: &mut TcpStream, path: &str, keep_alive: bool) -> std::io::Result<Response> {
    send_on(s, path, keep_alive)?;
    read_one(s)
}

/// Sends `GET path` on an open connection without reading the answer.
pub fn send_on(s: &mut TcpStream, path: &str, keep_alive: bool) -> std::io::Result<()> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: {connection}\r\n\r\n"
    )
}

/// Reads one response, delimited by its `Content-Length`, from an open connection.
pub fn read_one(s: &mut TcpStream) -> std::io::Result<Response> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "eof in the response head: {:?}",
                    String::from_utf8_lossy(&raw)
                ),
            ));
        }
        raw.push(byte[0]);
    }
    let head = parse_response(&raw)?;
    let len: usize = head
        .headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    raw.extend_from_slice(&body);
    parse_response(&raw)
}

impl TestCluster {
    /// Asks the master for its status (SIGUSR1) and returns the acceptor's
    /// `dispatched` count for the worker with `pid`.
    pub fn dispatched_to(&self, pid: i32) -> u64 {
        self.status()
            .iter()
            .find(|w| w.pid == pid)
            .unwrap_or_else(|| panic!("no status line for worker pid {pid}"))
            .dispatched
    }

    /// Asks the master for one status dump (SIGUSR1) and returns its lines (`status: ...`).
    ///
    /// A dump ends with the bus's line and, in dispatch mode, the acceptor's summary: separate
    /// threads, so in either order. The dump is complete only when both are logged, and every
    /// caller waits for that: a dump still being written when the next is asked for would be
    /// taken for the next one (and two signals pending at once are one).
    pub fn status_dump(&self) -> Vec<String> {
        const BUS_END: &str = " messages to nobody";
        const ACCEPTOR_END: &str = "connections waiting in the master";
        let acceptor = self.log_contains("mode dispatch)");
        let start = self.log_lines().len();
        let (bus_before, acceptor_before) = (self.log_count(BUS_END), self.log_count(ACCEPTOR_END));
        self.signal(libc::SIGUSR1);
        self.wait_for_count(BUS_END, bus_before + 1, DEADLINE);
        if acceptor {
            self.wait_for_count(ACCEPTOR_END, acceptor_before + 1, DEADLINE);
        }
        self.log_lines()
            .split_off(start)
            .into_iter()
            .filter(|l| l.contains("status: "))
            .collect()
    }

    /// Asks the master for a status dump ([`Self::status_dump`]) and parses the acceptor's
    /// lines of it, one per worker in dispatch mode.
    pub fn status(&self) -> Vec<WorkerStatus> {
        let mut out = Vec::new();
        for line in self.status_dump() {
            let Some(rest) = line.split("status: worker ").nth(1) else {
                continue;
            };
            if !rest.contains(" active ") {
                continue; // the supervisor's line for the same worker
            }
            let f: Vec<&str> = rest.split_whitespace().collect();
            let field = |name: &str| -> u64 {
                let i = f.iter().position(|x| *x == name).unwrap();
                f[i + 1].parse().unwrap()
            };
            out.push(WorkerStatus {
                pid: field("pid") as i32,
                active: field("active"),
                dispatched: field("dispatched"),
                closed: field("closed"),
                rss_kib: field("rss_kib"),
                stuck: f.iter().position(|x| *x == "stuck").map(|i| f[i + 1]) == Some("true"),
            });
        }
        out
    }

    /// Whether the master said the kernel steers (`--steer kernel`, or `auto` where it loaded).
    pub fn kernel_steered(&self) -> bool {
        self.log_contains("steering: kernel")
    }

    /// Asks the master for a status dump ([`Self::status_dump`]) and parses its kernel-steering
    /// lines, one per slot in use (`slots` of them).
    pub fn steering_status(&self, slots: usize) -> Vec<SteerSlotStatus> {
        const LINE: &str = "status: steering slot ";
        let lines: Vec<String> = self
            .status_dump()
            .into_iter()
            .filter(|l| l.contains(LINE))
            .collect();
        assert!(lines.len() >= slots, "steering status lines: {lines:?}");
        lines[..slots]
            .iter()
            .map(|l| {
                let rest = l.split(LINE).nth(1).unwrap();
                let field = |name: &str| -> i64 {
                    let after = rest.split(&format!(" {name} ")).nth(1).unwrap();
                    after.split_whitespace().next().unwrap().parse().unwrap()
                };
                SteerSlotStatus {
                    slot: rest.split(':').next().unwrap().parse().unwrap(),
                    eligible: !rest.contains("ineligible"),
                    load: field("load"),
                    assigned: field("assigned"),
                    accepted: field("accepted"),
                    closed: field("closed"),
                    forgiven: field("forgiven"),
                    rss_kib: field("rss_kib"),
                    reporting: !rest.contains("does not report"),
                    stuck: rest.contains(" stuck true"),
                    watches: rest.contains(" watches true"),
                    watchers: field("watchers"),
                }
            })
            .collect()
    }

    /// Waits until every one of the first `slots` steering slots watches the overflow queue
    /// and returns their status. A worker is counted once its server first waits on its
    /// listener, which can come a moment after it was reported ready and eligible.
    pub fn wait_for_watchers(&self, slots: usize) -> Vec<SteerSlotStatus> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let status = self.steering_status(slots);
            if status.iter().all(|s| s.watches) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "every worker watches the overflow queue: {status:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The overflow queue's counts ([`Self::status_dump`]), under kernel steering.
    pub fn overflow_status(&self) -> OverflowStatus {
        const LINE: &str = "status: steering overflow queue: ";
        let line = self
            .status_dump()
            .into_iter()
            .find(|l| l.contains(LINE))
            .expect("the overflow queue's status line");
        let rest = line.split(LINE).nth(1).unwrap();
        let field = |name: &str| -> i64 {
            let after = rest.split(&format!("{name} ")).nth(1).unwrap();
            after.split_whitespace().next().unwrap().parse().unwrap()
        };
        OverflowStatus {
            assigned: field("assigned"),
            accepted: field("accepted"),
            forgiven: field("forgiven"),
        }
    }

    /// Returns once the acceptor thread has handled every command the supervisor sent it so
    /// far: asks for a status dump ([`Self::status_dump`]), whose request goes down the same
    /// ordered command channel, and waits for all of it.
    pub fn sync_acceptor(&self) {
        self.status_dump();
    }

    /// How many log lines contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

impl TestCluster {
    /// Waits up to `timeout` for a log line containing `needle`; `None` if none came (for
    /// loops that do something else between checks).
    pub fn poll_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = self
                .log
                .changed
                .wait_timeout(lines, deadline - now)
                .unwrap()
                .0;
        }
    }
}

/// The inode of the server side of the TCP connection `client` has open (the socket whose
/// local address is `client`'s peer and whose remote address is `client`'s local address),
/// from `/proc/net/tcp`.
pub fn server_socket_inode(client: &TcpStream) -> Option<u64> {
    let local = client.local_addr().ok()?;
    let peer = client.peer_addr().ok()?;
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port_of = |field: &str| {
        field
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 9 && port_of(f[1]) == Some(peer.port()) && port_of(f[2]) == Some(local.port())
        {
            f[9].parse().ok().filter(|&inode| inode != 0)
        } else {
            None
        }
    })
}

/// Whether process `pid` has the socket with `inode` open.
pub fn holds_socket(pid: i32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
}

impl TestCluster {
    /// Waits until one of the workers holds the server side of `client` (it took the
    /// connection from its channel); returns that worker's pid. For connections that stay
    /// open meanwhile (the client has not sent its request yet).
    pub fn wait_for_holder(&self, client: &TcpStream) -> i32 {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(inode) = server_socket_inode(client)
                && let Some(pid) = self
                    .worker_pids()
                    .into_iter()
                    .find(|&p| holds_socket(p, inode))
            {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "no worker took the connection (server socket inode {:?}, workers {:?})",
                server_socket_inode(client),
                self.worker_pids()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// One worker's line of the acceptor's status dump (dispatch modes):
/// `status: worker S pid P state X active A dispatched D closed C rss_kib R`.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    pub pid: i32,
    pub active: u64,
    pub dispatched: u64,
    pub closed: u64,
    pub rss_kib: u64,
    /// The acceptor has marked it stuck (connections untaken for a while, no progress).
    pub stuck: bool,
}

/// One slot's line of the kernel-steering status (see `SteerControl::log_status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SteerSlotStatus {
    pub slot: usize,
    pub eligible: bool,
    pub load: i64,
    pub assigned: i64,
    pub accepted: i64,
    pub closed: i64,
    pub forgiven: i64,
    pub rss_kib: i64,
    pub reporting: bool,
    /// The program's stuck rule holds for the slot now (placement untaken or loop busy > 1 ms).
    pub stuck: bool,
    /// A process of the slot watches the overflow queue.
    pub watches: bool,
    /// How many of the slot's processes say they watch it.
    pub watchers: i64,
}

/// The kernel-steering overflow queue's counts, from the master's status (SIGUSR1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverflowStatus {
    /// Connections the program placed on the queue.
    pub assigned: i64,
    /// Connections workers took from it.
    pub accepted: i64,
    /// Placements written off (handshakes that never completed).
    pub forgiven: i64,
}

/// A fresh private directory for one test's files (control sockets, scripts), removed by the
/// caller or left in the system temp dir on failure for inspection.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "rcluster-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the test dir");
    dir
}

/// The result of one `rcluster-lb ctl` run.
#[derive(Debug)]
pub struct CtlOutput {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `rcluster-lb ctl --control SOCKET ARGS`.
pub fn ctl(socket: &std::path::Path, args: &[&str]) -> CtlOutput {
    let mut argv: Vec<&std::ffi::OsStr> = vec!["ctl".as_ref(), "--control".as_ref()];
    argv.push(socket.as_os_str());
    argv.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
    let out = Command::new(BIN)
        .args(&argv)
        .stdin(Stdio::null())
        .output()
        .expect("run rcluster-lb ctl");
    CtlOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `rcluster-lb ARGS` with stdout a pipe whose reading end is closed before the binary
/// starts (so every write to it fails with `EPIPE`, as under `| head -1` once `head` is done),
/// stderr captured, stdin empty.
pub fn run_into_closed_pipe<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> CtlOutput {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run rcluster-lb");
    CtlOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::new(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A reader that closed stdout early ends the command quietly with exit code 0: no panic, no
/// message (src/output.rs).
pub fn assert_quiet_on_closed_stdout(out: &CtlOutput) {
    assert!(!out.stderr.contains("panicked"), "{out:?}");
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stderr, "", "{out:?}");
}

/// Runs `rcluster-lb ARGS` with stdout `/dev/full` (every write fails with `ENOSPC`): one line
/// on stderr and exit code 1.
pub fn assert_full_stdout_is_one_line(args: &[&str]) {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(full)
        .output()
        .expect("run rcluster-lb");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        ["rcluster-lb: error: cannot write to stdout: No space left on device (os error 28)"],
        "{out:?}"
    );
}

/// `ctl status --json`, parsed; panics with the output if it failed.
pub fn ctl_status(socket: &std::path::Path) -> serde_json::Value {
    let out = ctl(socket, &["status", "--json"]);
    assert_eq!(out.code, 0, "ctl status failed: {out:?}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {out:?}"))
}

/// Whether this process may load the steering program; prints why not, so the caller can
/// skip. A program the kernel rejects is a bug, not a missing permission: it panics.
pub fn steering_available() -> bool {
    match rcluster_lb::steer::Steering::load(1) {
        Ok(_) => true,
        Err(e) if e.is_program_rejected() => panic!("{e}"),
        Err(e) => {
            eprintln!("note: kernel steering unavailable here ({e}); skipping this test");
            false
        }
    }
}

/// Whether `program` runs; prints a note when it does not, so the caller can skip.
pub fn available(program: &str) -> bool {
    let ok = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("note: {program} not found; skipping this test");
    }
    ok
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rcluster-servers-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Writes `name` in the directory; returns its absolute path.
    pub fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
