//! The control socket and `rcluster-lb ctl` (also into a closed pipe), the metrics endpoint,
//! and worker output capture, against the real binary.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// Starts a cluster with its control socket in a fresh directory.
fn cluster_with_control(tag: &str, args: &[&str]) -> (TestCluster, PathBuf, PathBuf) {
    let dir = temp_dir(tag);
    let sock = dir.join("ctl.sock");
    let mut argv = vec!["--control", sock.to_str().unwrap()];
    argv.extend_from_slice(args);
    let cluster = TestCluster::start(&argv);
    (cluster, sock, dir)
}

fn workers(status: &Value) -> &Vec<Value> {
    status["workers"].as_array().expect("workers array")
}

fn pids_of(status: &Value) -> Vec<i32> {
    let mut pids: Vec<i32> = workers(status)
        .iter()
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect();
    pids.sort();
    pids
}

fn ready_count(status: &Value) -> usize {
    workers(status)
        .iter()
        .filter(|w| w["state"] == "ready")
        .count()
}

#[test]
fn ctl_status_json_reports_pids_and_counts() {
    let (cluster, sock, dir) = cluster_with_control("status", &["-w", "2"]);
    let mut expected: HashMap<i32, u64> = HashMap::new();
    for _ in 0..20 {
        let r = get(cluster.addr(), "/").expect("request");
        *expected.entry(r.pid()).or_default() += 1;
    }
    let status = ctl_status(&sock);
    let mut want = cluster.worker_pids();
    want.sort();
    assert_eq!(pids_of(&status), want);
    assert_eq!(status["policy"], "least-conn");
    assert_eq!(status["mode"], "dispatch");
    assert_eq!(status["pid"].as_i64().unwrap() as i32, cluster.pid());
    assert_eq!(status["acceptor"]["accepts"], 20);
    for w in workers(&status) {
        let pid = w["pid"].as_i64().unwrap() as i32;
        assert_eq!(
            w["dispatched"].as_u64().unwrap(),
            expected.get(&pid).copied().unwrap_or(0),
            "worker {pid}: {status:#}"
        );
        assert!(w["rss_kib"].as_u64().unwrap() > 0, "RSS is read: {w}");
        assert_eq!(w["generation"], 0);
        assert_eq!(w["state"], "ready");
    }
    // The table form carries the same pids.
    let table = ctl(&sock, &["status"]);
    assert_eq!(table.code, 0, "{table:?}");
    for pid in &want {
        assert!(table.stdout.contains(&pid.to_string()), "{}", table.stdout);
    }
    assert!(table.stdout.contains("imbalance"), "{}", table.stdout);
    let dump = ctl(&sock, &["dump"]);
    assert_eq!(dump.code, 0, "{dump:?}");
    let dump: Value = serde_json::from_str(&dump.stdout).unwrap();
    assert_eq!(dump["counters"]["accepts"], 20);
    assert_eq!(dump["workers"].as_array().unwrap().len(), 2);
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ctl_reload_reports_success_and_the_new_pids() {
    let (cluster, sock, dir) = cluster_with_control("reload", &["-w", "2"]);
    let old = cluster.worker_pids();
    let out = ctl(&sock, &["reload"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("generation 1 complete"), "{out:?}");
    let new: Vec<i32> = out
        .stdout
        .split("workers:")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(new.len(), 2, "{out:?}");
    for p in &new {
        assert!(!old.contains(p), "{p} is an old worker: {out:?}");
    }
    let status = ctl_status(&sock);
    let gen1: Vec<i32> = workers(&status)
        .iter()
        .filter(|w| w["generation"] == 1)
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect();
    let mut sorted = new.clone();
    sorted.sort();
    let mut gen1_sorted = gen1.clone();
    gen1_sorted.sort();
    assert_eq!(gen1_sorted, sorted);
    assert_eq!(status["reloads"], 1);
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_failing_ctl_reload_reports_the_abort() {
    let dir = temp_dir("reload-fail");
    let script = dir.join("server.sh");
    std::fs::write(&script, format!("#!/bin/sh\nexec {BIN} demo-worker\n")).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sock = dir.join("ctl.sock");
    let cluster = TestCluster::start(&[
        "--control",
        sock.to_str().unwrap(),
        "-w",
        "2",
        "--no-preload",
        "--",
        script.to_str().unwrap(),
    ]);
    let before = cluster.worker_pids();
    // The command is resolved again at each reload: gone now, so the replacement cannot start.
    std::fs::remove_file(&script).unwrap();
    let out = ctl(&sock, &["reload"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("reload aborted"), "{out:?}");
    let status = ctl_status(&sock);
    assert_eq!(status["reloads_aborted"], 1);
    let mut pids = pids_of(&status);
    pids.sort();
    let mut before = before;
    before.sort();
    assert_eq!(pids, before, "the old workers keep serving");
    get(cluster.addr(), "/").expect("still serving");
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ctl_scale_up_then_down() {
    let (cluster, sock, dir) = cluster_with_control("scale", &["-w", "2"]);
    let out = ctl(&sock, &["scale", "3"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("running 3 workers"), "{out:?}");
    cluster.wait_for_log("worker 2 ready", DEADLINE);
    let status = ctl_status(&sock);
    assert_eq!(status["slots"], 3);
    assert_eq!(ready_count(&status), 3, "{status:#}");
    let removed = workers(&status)
        .iter()
        .find(|w| w["id"] == 2)
        .and_then(|w| w["pid"].as_i64())
        .expect("worker 2's pid");

    let out = ctl(&sock, &["scale", "2"]);
    assert_eq!(out.code, 0, "{out:?}");
    // Its exit, not the "draining worker 2 (pid ..." line before it: until the master has
    // reaped it, the status still lists it as draining.
    cluster.wait_for_log(&format!("worker 2 (pid {removed}) exited"), DEADLINE);
    cluster.wait_for_workers(2);
    let status = ctl_status(&sock);
    assert_eq!(status["slots"], 2);
    assert_eq!(workers(&status).len(), 2, "{status:#}");

    let bad = ctl(&sock, &["scale", "0"]);
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(bad.stderr.contains("1 to"), "{bad:?}");
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ctl_policy_switches_under_load_without_errors() {
    let (cluster, sock, dir) = cluster_with_control("policy", &["-w", "2", "-p", "least-conn"]);
    let load = Load::start(cluster.addr(), "/", 1500, 1500.0, 4);
    for (i, name) in ["round-robin", "p2c", "least-mem", "rr"].iter().enumerate() {
        load.wait_completed(300 * (i + 1), DEADLINE);
        let out = ctl(&sock, &["policy", name]);
        assert_eq!(out.code, 0, "{out:?}");
    }
    let tally = load.join();
    assert_eq!(tally.errors(), 0, "{}", tally.summary());
    assert_eq!(tally.total(), 1500);
    let status = ctl_status(&sock);
    assert_eq!(status["policy"], "round-robin");
    assert_eq!(status["acceptor"]["policy_switches"], 4);
    assert_eq!(status["acceptor"]["accepts"], 1500);
    let bad = ctl(&sock, &["policy", "shared"]);
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(bad.stderr.contains("chosen at start"), "{bad:?}");
    let bad = ctl(&sock, &["policy", "nope"]);
    assert_eq!(bad.code, 1, "{bad:?}");
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ctl_recycle_and_stop() {
    let (mut cluster, sock, dir) = cluster_with_control("recycle", &["-w", "2"]);
    let out = ctl(&sock, &["recycle", "1"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("replacing worker 1"), "{out:?}");
    let bad = ctl(&sock, &["recycle", "7"]);
    assert_eq!(bad.code, 1, "{bad:?}");
    let out = ctl(&sock, &["stop"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("exited"), "{out:?}");
    let status = cluster.wait_exit(DEADLINE);
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "the socket is removed at exit");
    let _ = std::fs::remove_dir_all(dir);
}

/// `ctl ... | head -1`: the reader is gone before the answer is printed. Every printing
/// command ends with 0 and says nothing; `stop` still stops the master.
#[test]
fn ctl_into_a_closed_pipe_ends_quietly() {
    let (mut cluster, sock, dir) = cluster_with_control("closed-pipe", &["-w", "1"]);
    let ctl_args = |rest: &[&str]| {
        let mut argv = vec!["ctl", "--control", sock.to_str().unwrap()];
        argv.extend_from_slice(rest);
        argv.iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    for cmd in [
        &["status", "--json"][..],
        &["status"],
        &["dump"],
        &["policy", "round-robin"],
        &["scale", "1"],
    ] {
        let out = run_into_closed_pipe(&ctl_args(cmd));
        assert_quiet_on_closed_stdout(&out);
    }
    // The master is unaffected by its client's closed stdout.
    assert_eq!(ctl_status(&sock)["policy"], "round-robin");
    let out = run_into_closed_pipe(&ctl_args(&["stop"]));
    assert_quiet_on_closed_stdout(&out);
    let status = cluster.wait_exit(DEADLINE);
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Other output failures are one line on stderr and exit code 1; a failure with stderr itself
/// a closed pipe still exits 1 (nothing to say it on), not with a panic.
#[test]
fn ctl_output_errors_are_one_line_and_exit_1() {
    let (cluster, sock, dir) = cluster_with_control("full", &["-w", "1"]);
    assert_full_stdout_is_one_line(&["ctl", "--control", sock.to_str().unwrap(), "status"]);
    drop(cluster);
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(BIN)
        .args(["ctl", "--control", sock.to_str().unwrap(), "status"])
        .stderr(writer)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "no master any more: {out:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn another_uid_is_refused() {
    // The effective uid, from /proc.
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"));
    let setpriv = Path::new("/usr/bin/setpriv");
    if !root || !setpriv.exists() {
        eprintln!("skipped: needs root and setpriv to connect as another uid");
        return;
    }
    let (cluster, sock, dir) = cluster_with_control("uid", &["-w", "1"]);
    // Let the other uid reach the socket, so the refusal comes from the peer check.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = std::process::Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args(["ctl", "--control", sock.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let line = cluster.wait_for_log("refused pid", DEADLINE);
    assert!(line.contains("uid 65534"), "{line}");
    // The owner is still served.
    ctl_status(&sock);
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_stale_socket_from_a_killed_master_is_replaced() {
    let (mut cluster, sock, dir) = cluster_with_control("stale", &["-w", "1"]);
    // A second master on the same socket is refused while the first lives.
    let second = std::process::Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "-w", "1", "--control"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(2), "{second:?}");
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another master"),
        "{second:?}"
    );
    // The old workers die by PDEATHSIG; the harness kills any straggler on drop.
    cluster.kill_master();
    assert!(sock.exists(), "SIGKILL leaves the socket behind");
    let next = TestCluster::start(&["--control", sock.to_str().unwrap(), "-w", "1"]);
    assert!(next.log_contains("removed stale control socket"));
    let status = ctl_status(&sock);
    assert_eq!(status["pid"].as_i64().unwrap() as i32, next.pid());
    drop(next);
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

#[test]
fn metrics_parse_and_count_the_requests_sent() {
    let dir = temp_dir("metrics");
    let sock = dir.join("ctl.sock");
    let cluster = TestCluster::start(&[
        "--control",
        sock.to_str().unwrap(),
        "--metrics",
        "127.0.0.1:0",
        "-w",
        "2",
    ]);
    let line = cluster.wait_for_log("metrics on http://", DEADLINE);
    let addr: SocketAddr = line
        .split("http://")
        .nth(1)
        .unwrap()
        .trim_end_matches("/metrics")
        .parse()
        .unwrap();
    const N: usize = 37;
    for _ in 0..N {
        get(cluster.addr(), "/").expect("request");
    }
    let body = scrape(addr);
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition text");
    let value = |name: &str| -> Vec<(HashMap<String, String>, f64)> {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .map(|s| {
                let v = match s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    _ => panic!("unexpected type for {name}"),
                };
                let labels = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                (labels, v)
            })
            .collect()
    };
    assert_eq!(value("rcluster_accepts_total")[0].1, N as f64, "{body}");
    assert_eq!(value("rcluster_dispatches_total")[0].1, N as f64, "{body}");
    let dispatched: f64 = value("rcluster_worker_dispatched_total")
        .iter()
        .map(|(_, v)| v)
        .sum();
    assert_eq!(dispatched, N as f64, "{body}");
    let per_worker = value("rcluster_worker_rss_bytes");
    assert_eq!(per_worker.len(), 2, "{body}");
    let mut pids: Vec<i32> = per_worker
        .iter()
        .map(|(l, _)| l["pid"].parse().unwrap())
        .collect();
    pids.sort();
    let mut want = cluster.worker_pids();
    want.sort();
    assert_eq!(pids, want);
    assert_eq!(value("rcluster_build_info").len(), 1);
    assert!(value("rcluster_imbalance_ratio")[0].1 >= 1.0);
    assert_eq!(value("rcluster_listen_backlog").len(), 1, "{body}");
    // Only /metrics is served.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 404"), "{raw}");
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn worker_lines_come_out_prefixed_and_whole_under_two_chatty_workers() {
    const LINES: usize = 400;
    let dir = temp_dir("chatty");
    let script = dir.join("chatty.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             pad=$(printf '%0300d' 0)\n\
             i=0\n\
             while [ $i -lt {LINES} ]; do echo \"chatty $RCLUSTER_WORKER_ID $i $pad\"; i=$((i+1)); done\n\
             echo \"oops $RCLUSTER_WORKER_ID\" >&2\n\
             echo \"chatty-done $RCLUSTER_WORKER_ID\"\n\
             exec {BIN} demo-worker\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sock = dir.join("ctl.sock");
    let cluster = TestCluster::start(&[
        "--control",
        sock.to_str().unwrap(),
        "-w",
        "2",
        "--no-preload",
        "--",
        script.to_str().unwrap(),
    ]);
    cluster.wait_for_count("chatty-done ", 2, DEADLINE);
    cluster.wait_for_count("oops ", 2, DEADLINE);
    let status = ctl_status(&sock);
    let dropped = status["log_lines_dropped"].as_u64().unwrap() as usize;
    let pid_of: HashMap<u64, i64> = workers(&status)
        .iter()
        .map(|w| (w["slot"].as_u64().unwrap(), w["pid"].as_i64().unwrap()))
        .collect();
    let pad = "0".repeat(300);
    let mut seen = [0usize; 2];
    for line in cluster.log_lines() {
        let Some(at) = line.find(" chatty ") else {
            continue;
        };
        // "<timestamp> [wS PID] chatty S I 000…": prefix and payload of one worker, whole.
        let prefix_start = line.find(" [w").expect("a worker prefix");
        let prefix = &line[prefix_start + 1..at];
        let f: Vec<&str> = line[at + 1..].split(' ').collect();
        assert_eq!(f.len(), 4, "one whole line: {line}");
        let slot: u64 = f[1].parse().unwrap();
        assert_eq!(prefix, format!("[w{slot} {}]", pid_of[&slot]), "{line}");
        assert_eq!(f[3], pad, "payload intact: {line}");
        seen[slot as usize] += 1;
    }
    if dropped == 0 {
        assert_eq!(seen, [LINES, LINES]);
    } else {
        assert!(
            seen[0] + seen[1] + dropped >= 2 * LINES,
            "{seen:?} {dropped}"
        );
    }
    for slot in 0..2u64 {
        let want = format!("[w{slot} {}] oops {slot}", pid_of[&slot]);
        assert!(cluster.log_contains(&want), "stderr line {want}");
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_clean_stop_logs_no_warning_and_usr2_dumps_the_tables() {
    let (mut cluster, sock, dir) = cluster_with_control("clean", &["-w", "2"]);
    for _ in 0..5 {
        get(cluster.addr(), "/").expect("request");
    }
    cluster.signal(libc::SIGUSR2);
    let line = cluster.wait_for_log("dump: {", DEADLINE);
    let dump: Value = serde_json::from_str(line.split("dump: ").nth(1).unwrap()).unwrap();
    assert_eq!(dump["counters"]["accepts"], 5);
    assert_eq!(dump["workers"].as_array().unwrap().len(), 2);
    let out = ctl(&sock, &["stop"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(cluster.wait_exit(DEADLINE).success());
    let noisy: Vec<String> = cluster
        .log_lines()
        .into_iter()
        .filter(|l| l.contains(" warn ") || l.contains(" error "))
        .collect();
    assert!(noisy.is_empty(), "a clean stop warns: {noisy:#?}");
    // Timestamped master lines.
    let first = &cluster.log_lines()[0];
    assert!(
        first.len() > 24 && first.as_bytes()[4] == b'-' && first[..24].ends_with('Z'),
        "{first}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn log_format_json_gives_one_object_per_line() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let dir = temp_dir("json");
    let sock = dir.join("ctl.sock");
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "-w", "1", "--log-format", "json"])
        .arg("--control")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let (mut ready, mut worker_line) = (false, false);
    while !(ready && worker_line) {
        let Ok(line) = rx.recv_timeout(DEADLINE) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no readiness in JSON logs: {lines:#?}");
        };
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            let _ = child.kill();
            panic!("not JSON ({e}): {line}")
        });
        if v["msg"].as_str().unwrap_or("").contains("workers ready") {
            assert_eq!(v["level"], "info");
            assert_eq!(v["pid"].as_i64().unwrap(), i64::from(child.id()));
            ready = true;
        }
        if v["worker"] == 0 {
            assert!(v["worker_pid"].as_i64().unwrap() > 0, "{line}");
            assert_eq!(v["stream"], "stderr");
            worker_line = true;
        }
        lines.push(line);
    }
    let out = ctl(&sock, &["stop"]);
    assert_eq!(out.code, 0, "{out:?}");
    let status = child.wait().unwrap();
    assert!(status.success());
    let _ = std::fs::remove_dir_all(dir);
}
