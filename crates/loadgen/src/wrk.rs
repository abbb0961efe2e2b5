//! `wrk` as a second opinion on connection churn: runs the `wrk` HTTP benchmarking tool in
//! its closed-loop, one-connection-per-request form (`-H 'Connection: close'`) against a
//! loopback target and reads its report into the load generator's terms, so that the
//! end-to-end benchmark can put both tools' numbers for the same running server side by side.
//!
//! Ownership: [`WrkSpec::run`] spawns one `wrk` child, waits for it (bounded by the run's
//! duration plus [`WRK_GRACE`]) and kills and reaps it on every path; nothing outlives a call.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::ErrorCounts;

/// How long after its `-d` a `wrk` run may take to exit before it is killed.
pub const WRK_GRACE: Duration = Duration::from_secs(15);

/// Why a `wrk` run gave no report.
#[derive(Debug, thiserror::Error)]
pub enum WrkError {
    /// The target is not a loopback address; nothing was run.
    #[error("wrk target {0} is not a loopback address")]
    NotLoopback(SocketAddr),
    /// `wrk` could not be started.
    #[error("cannot run {path}: {source}")]
    Spawn {
        /// The `wrk` that was to run.
        path: PathBuf,
        /// Why it did not start.
        source: std::io::Error,
    },
    /// `wrk` did not exit within its duration plus [`WRK_GRACE`]; it was killed.
    #[error("wrk did not exit within {0:?}; killed")]
    Hung(Duration),
    /// `wrk` exited with a failure status.
    #[error("wrk failed ({status}): {stderr}")]
    Failed {
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// `wrk`'s report could not be read.
    #[error("cannot read wrk's report ({why}): {output:?}")]
    Report {
        /// What was missing or malformed.
        why: &'static str,
        /// What wrk printed on stdout.
        output: String,
    },
}

/// One `wrk -t1 -cN -dS --latency -H 'Connection: close'` run.
#[derive(Debug, Clone)]
pub struct WrkSpec {
    /// The `wrk` executable.
    pub wrk: PathBuf,
    /// Where to send load; must be a loopback address.
    pub target: SocketAddr,
    /// Concurrent connections (`-c`), one request each.
    pub connections: usize,
    /// How long to run (`-d`; wrk takes whole seconds, so this is rounded down, at least 1 s).
    pub duration: Duration,
    /// wrk's `--timeout` (whole seconds, at least 1 s): a response slower than this counts as
    /// a timeout.
    pub timeout: Duration,
}

impl WrkSpec {
    /// The arguments `wrk` is run with.
    pub fn args(&self) -> Vec<String> {
        vec![
            "-t1".to_owned(),
            format!("-c{}", self.connections.max(1)),
            format!("-d{}s", whole_secs(self.duration)),
            "--latency".to_owned(),
            "--timeout".to_owned(),
            format!("{}s", whole_secs(self.timeout)),
            "-H".to_owned(),
            "Connection: close".to_owned(),
            format!("http://{}/", self.target),
        ]
    }

    /// Runs `wrk` and reads its report. Blocks for about [`WrkSpec::duration`].
    pub fn run(&self) -> Result<WrkReport, WrkError> {
        if !self.target.ip().is_loopback() {
            return Err(WrkError::NotLoopback(self.target));
        }
        let mut child = Command::new(&self.wrk)
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| WrkError::Spawn {
                path: self.wrk.clone(),
                source,
            })?;
        let limit = Duration::from_secs(whole_secs(self.duration)) + WRK_GRACE;
        let Some(status) = wait_until(&mut child, Instant::now() + limit) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(WrkError::Hung(limit));
        };
        // wrk has exited, so its pipes hold all it wrote (a report of well under a pipe's
        // capacity) and reading them cannot block.
        let (mut stdout, mut stderr) = (String::new(), String::new());
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_string(&mut stdout);
        }
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        if !status.success() {
            return Err(WrkError::Failed {
                status,
                stderr: stderr.trim().to_owned(),
            });
        }
        WrkReport::parse(&stdout).map_err(|why| WrkError::Report {
            why,
            output: stdout,
        })
    }
}

fn whole_secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}

/// Waits for `child` until `deadline`, polling (std has no wait with a timeout).
fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

/// What one `wrk --latency` run reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WrkReport {
    /// Complete responses (`N requests in …`).
    pub requests: u64,
    /// How long wrk ran, seconds.
    pub duration_s: f64,
    /// wrk's `Requests/sec` (with `Connection: close`, connections per second).
    pub requests_per_s: f64,
    /// Latency percentiles and maximum, microseconds.
    pub p50_us: u64,
    /// 90th percentile, µs.
    pub p90_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// Largest latency, µs.
    pub max_us: u64,
    /// wrk's socket errors in the load generator's kinds: `connect` → refused, `read` (a read
    /// error, or EOF before a complete response) → eof, `write` → reset, `timeout` → timeout.
    pub errors: ErrorCounts,
    /// Responses whose status was not 2xx or 3xx.
    pub non_2xx: u64,
}

/// `3.41ms`, `812.00us`, `1.20s`, `1.00m` → microseconds.
fn time_us(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(n * scale)
}

impl WrkReport {
    /// Reads the report `wrk --latency` prints on stdout.
    pub fn parse(out: &str) -> Result<WrkReport, &'static str> {
        let mut r = WrkReport::default();
        let (mut have_total, mut have_rate) = (false, false);
        for line in out.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["Latency", _avg, _stdev, max, ..] => {
                    r.max_us = time_us(max).ok_or("bad latency maximum")? as u64;
                }
                [pct, value] if pct.ends_with('%') => {
                    let us = time_us(value).ok_or("bad latency percentile")? as u64;
                    match *pct {
                        "50%" => r.p50_us = us,
                        "90%" => r.p90_us = us,
                        "99%" => r.p99_us = us,
                        _ => {}
                    }
                }
                [n, "requests", "in", took, ..] => {
                    r.requests = n.parse().map_err(|_| "bad request count")?;
                    r.duration_s = time_us(took.trim_end_matches(',')).ok_or("bad run time")? / 1e6;
                    have_total = true;
                }
                ["Socket", "errors:", rest @ ..] => {
                    // "connect 0, read 0, write 0, timeout 0"
                    for pair in rest.chunks(2) {
                        let [kind, n] = pair else {
                            return Err("bad socket error line");
                        };
                        let n: u64 = n
                            .trim_end_matches(',')
                            .parse()
                            .map_err(|_| "bad socket error count")?;
                        match *kind {
                            "connect" => r.errors.refused += n,
                            "read" => r.errors.eof += n,
                            "write" => r.errors.reset += n,
                            "timeout" => r.errors.timeout += n,
                            _ => r.errors.other += n,
                        }
                    }
                }
                ["Non-2xx", "or", "3xx", "responses:", n] => {
                    r.non_2xx = n.parse().map_err(|_| "bad non-2xx count")?;
                }
                ["Requests/sec:", n] => {
                    r.requests_per_s = n.parse().map_err(|_| "bad Requests/sec")?;
                    have_rate = true;
                }
                _ => {}
            }
        }
        if !have_total {
            return Err("no `N requests in` line");
        }
        if !have_rate {
            return Err("no `Requests/sec:` line");
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    const CLEAN: &str = "Running 3s test @ http://127.0.0.1:45777/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     9.25ms    7.80ms  96.17ms   87.58%
    Req/Sec     3.78k   312.20     4.21k    70.00%
  Latency Distribution
     50%    7.50ms
     75%   10.00ms
     90%   15.00ms
     99%   40.00ms
  11318 requests in 3.01s, 1.29MB read
Requests/sec:   3759.48
Transfer/sec:    440.56KB
";

    #[test]
    fn parses_a_clean_report() {
        let r = WrkReport::parse(CLEAN).unwrap();
        assert_eq!(r.requests, 11318);
        assert!((r.duration_s - 3.01).abs() < 1e-9);
        assert!((r.requests_per_s - 3759.48).abs() < 1e-9);
        assert_eq!((r.p50_us, r.p90_us, r.p99_us), (7500, 15000, 40000));
        assert_eq!(r.max_us, 96170);
        assert_eq!(r.errors.total(), 0);
        assert_eq!(r.non_2xx, 0);
    }

    #[test]
    fn maps_socket_errors_and_non_2xx() {
        let out = "  Latency   812.00us    1.20s    1.00m   99.00%
     50%  812.00us
     90%    1.20s
     99%    1.00m
  20 requests in 1.00m, 2.00KB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 5
Requests/sec:      0.33
";
        let r = WrkReport::parse(out).unwrap();
        assert_eq!((r.p50_us, r.p90_us, r.p99_us), (812, 1_200_000, 60_000_000));
        assert!((r.duration_s - 60.0).abs() < 1e-9);
        let e = r.errors;
        assert_eq!(
            (e.refused, e.eof, e.reset, e.timeout, e.other),
            (1, 2, 3, 4, 0)
        );
        assert_eq!(r.non_2xx, 5);
    }

    #[test]
    fn refuses_a_report_without_totals() {
        assert_eq!(WrkReport::parse(""), Err("no `N requests in` line"));
        let no_rate = "  10 requests in 1.00s, 1.00KB read\n";
        assert_eq!(WrkReport::parse(no_rate), Err("no `Requests/sec:` line"));
        let bad = "  x requests in 1.00s, 1.00KB read\nRequests/sec: 10\n";
        assert_eq!(WrkReport::parse(bad), Err("bad request count"));
        let bad_unit = "     50%    7.50parsecs\n";
        assert_eq!(WrkReport::parse(bad_unit), Err("bad latency percentile"));
    }

    #[test]
    fn args_are_whole_seconds_and_close_each_connection() {
        let spec = WrkSpec {
            wrk: PathBuf::from("wrk"),
            target: "127.0.0.1:8080".parse().unwrap(),
            connections: 32,
            duration: Duration::from_millis(2500),
            timeout: Duration::from_millis(10),
        };
        assert_eq!(
            spec.args(),
            [
                "-t1",
                "-c32",
                "-d2s",
                "--latency",
                "--timeout",
                "1s",
                "-H",
                "Connection: close",
                "http://127.0.0.1:8080/"
            ]
        );
    }

    #[test]
    fn refuses_a_target_off_loopback() {
        let spec = WrkSpec {
            wrk: PathBuf::from("/nonexistent/wrk"),
            target: "192.0.2.1:80".parse().unwrap(),
            connections: 1,
            duration: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(spec.run(), Err(WrkError::NotLoopback(_))));
    }

    #[test]
    fn a_missing_wrk_is_a_spawn_error() {
        let spec = WrkSpec {
            wrk: PathBuf::from("/nonexistent/wrk"),
            target: "127.0.0.1:9".parse().unwrap(),
            connections: 1,
            duration: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(spec.run(), Err(WrkError::Spawn { .. })));
    }

    fn wrk_on_path() -> Option<PathBuf> {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|dir| dir.join("wrk"))
            .find(|p| p.is_file())
    }

    /// Against a one-response-per-connection server on loopback, wrk's request count equals
    /// the connections the server answered.
    #[test]
    fn counts_what_a_real_server_answered() {
        let Some(wrk) = wrk_on_path() else {
            eprintln!("skipped: wrk is not on PATH (apt-get install wrk)");
            return;
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let target = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let server = {
            let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            s.set_nonblocking(false).unwrap();
                            let mut got = Vec::new();
                            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                                match std::io::Read::read(&mut s, &mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => got.extend_from_slice(&buf[..n]),
                                }
                            }
                            let ok = s.write_all(
                                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                            );
                            if ok.is_ok() {
                                answered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
            })
        };
        let spec = WrkSpec {
            wrk,
            target,
            connections: 2,
            duration: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
        };
        let report = spec.run();
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
        let report = report.unwrap();
        assert!(report.requests > 0, "{report:?}");
        assert!(report.requests_per_s > 0.0);
        assert_eq!(report.non_2xx, 0);
        // Every complete response wrk counted was one the server sent (wrk may close a
        // connection whose response was under way when its time ran out).
        assert!(report.requests <= answered.load(Ordering::Relaxed));
    }
}
