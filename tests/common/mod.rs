//! Test harness shared by the integration tests: [`TestCluster`] runs the real `rcluster-lb`
//! binary on port 0, waits for its log lines with deadlines (never sleeps as synchronisation),
//! and kills and reaps the master and every worker on drop, also when a test fails.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
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
        let mut argv: Vec<&str> = Vec::new();
        let listeners = args.iter().filter(|a| **a == "--listen").count();
        if listeners == 0 {
            argv.extend(["--listen", "127.0.0.1:0"]);
        }
        argv.extend_from_slice(args);
        let mut cmd = Command::new(BIN);
        cmd.args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("RCLUSTER_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
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
        let want = listeners.max(1);
        let lines = cluster.wait_for_count("listening on ", want, DEADLINE);
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
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // PDEATHSIG normally takes care of them; make sure, by pid, even if it did not.
        for pid in workers {
            kill(pid, libc::SIGKILL);
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
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(DEADLINE))?;
    s.set_write_timeout(Some(DEADLINE))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
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
