//! Installing and running as a service: a copy of the binary on its own (what `cargo install`
//! gives), in a directory whose path has a space, runs unmodified python and node servers from
//! another working directory; an untrusted or missing shim is refused with exit 2.
//! `scripts/install-check.sh` does the same with a real `cargo install --path .` in CI.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

const NODE_APP: &str = "require('http').createServer((q,s)=>s.end('pid '+process.pid+'\\n')).listen(process.env.PORT)\n";

/// A copy of the binary alone in `<tmp>/inst all/bin/`, as an installed user has it: no shim
/// file anywhere near it, and a space in its path (which must not reach `LD_PRELOAD`).
fn installed_copy(dir: &TempDir) -> std::path::PathBuf {
    let bin_dir = dir.path().join("inst all").join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let bin = bin_dir.join("rcluster-lb");
    std::fs::copy(BIN, &bin).unwrap();
    bin
}

/// Runs the master copy `bin` from the working directory `cwd` with `args`.
fn start_installed(bin: &std::path::Path, cwd: &std::path::Path, args: &[&str]) -> TestCluster {
    let mut cmd = Command::new(bin);
    cmd.current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .env_remove("RCLUSTER_SHIM")
        .args(["--listen", "127.0.0.1:0", "--workers", "2"])
        .args(args);
    let cluster = TestCluster::spawn_command(cmd, 1);
    cluster.wait_for_log("workers ready", DEADLINE);
    cluster
}

fn serves(cluster: &TestCluster, path: &str, n: usize) {
    for _ in 0..n {
        let resp = get(cluster.addr(), path).expect("request answered");
        assert_eq!(resp.status, 200, "{}", resp.body);
    }
}

#[test]
fn installed_binary_runs_python_http_server_from_another_directory() {
    if !available("python3") {
        return;
    }
    let tmp = TempDir::new("install-py");
    let bin = installed_copy(&tmp);
    let site = tmp.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("hello.txt"), "hello\n").unwrap();
    let cluster = start_installed(
        &bin,
        &site,
        &[
            "--",
            "sh",
            "-c",
            "exec python3 -m http.server \"$PORT\" --bind 127.0.0.1",
        ],
    );
    serves(&cluster, "/hello.txt", 20);
    assert!(!cluster.log_contains("exited unexpectedly"));
}

#[test]
fn installed_binary_runs_node_from_another_directory() {
    if !available("node") {
        return;
    }
    let tmp = TempDir::new("install-node");
    let bin = installed_copy(&tmp);
    let app = tmp.write("app.js", NODE_APP);
    let cluster = start_installed(&bin, tmp.path(), &["--", "node", &app]);
    serves(&cluster, "/", 20);
    assert!(!cluster.log_contains("exited unexpectedly"));
}

/// Runs the master expecting it to refuse to start; returns (exit code, stderr).
fn refused(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--workers", "1"])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_exit_2((code, stderr): (Option<i32>, String), needle: &str) {
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(needle), "{stderr}");
}

#[test]
fn an_untrusted_or_missing_shim_is_refused_with_exit_2() {
    let tmp = TempDir::new("bad-shim");
    let shim = tmp.path().join("librcluster_shim.so");
    std::fs::write(&shim, b"not really").unwrap();
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o666)).unwrap();
    let shim = shim.to_str().unwrap();
    assert_one_line_exit_2(
        refused(&["--shim", shim, "--", "sleep", "60"], &[]),
        "writable by group or others",
    );
    assert_one_line_exit_2(
        refused(&["--", "sleep", "60"], &[("RCLUSTER_SHIM", shim)]),
        "RCLUSTER_SHIM",
    );
    assert_one_line_exit_2(
        refused(&["--shim", "/no/such/shim.so", "--", "sleep", "60"], &[]),
        "/no/such/shim.so",
    );
    // A shim owned by another user, even if nobody else may write it.
    if running_as_root() {
        std::fs::set_permissions(shim, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::chown(shim, Some(65534), Some(65534)).unwrap();
        assert_one_line_exit_2(
            refused(&["--shim", shim, "--", "sleep", "60"], &[]),
            "owned by uid 65534",
        );
    } else {
        eprintln!("note: not root; the another-owner case is skipped");
    }
}

/// Whether the tests run as root (the owner of this test binary's /proc entry).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

// --- systemd: the master's own notifications, socket activation ------------------------------

/// A test `NOTIFY_SOCKET`: a datagram socket at a path in a private temp dir.
struct NotifyListener {
    sock: std::os::unix::net::UnixDatagram,
    path: std::path::PathBuf,
    _dir: TempDir,
}

impl NotifyListener {
    fn new() -> NotifyListener {
        let dir = TempDir::new("notify");
        let path = dir.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(DEADLINE)).unwrap();
        NotifyListener {
            sock,
            path,
            _dir: dir,
        }
    }

    /// Reads datagrams until one contains `needle`; returns it.
    fn wait_for(&self, needle: &str) -> String {
        let mut buf = [0u8; 4096];
        loop {
            let n = self
                .sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no notification with {needle:?}: {e}"));
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.contains(needle) {
                return msg;
            }
        }
    }
}

#[test]
fn master_notifies_ready_reloading_stopping_and_watchdog() {
    let notify = NotifyListener::new();
    let path = notify.path.to_str().unwrap();
    let mut cluster = TestCluster::spawn_with_env(
        &["--workers", "2", "--policy", "round-robin"],
        &[("NOTIFY_SOCKET", path), ("WATCHDOG_USEC", "200000")],
    );
    let ready = notify.wait_for("READY=1");
    assert!(
        ready.contains("STATUS=2/2 workers ready, policy round-robin, generation 0"),
        "{ready}"
    );
    assert!(get(cluster.addr(), "/").is_ok());
    notify.wait_for("WATCHDOG=1");

    cluster.signal(libc::SIGHUP);
    let reloading = notify.wait_for("RELOADING=1");
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(usec.parse::<u64>().unwrap() > 0);
    let done = notify.wait_for("READY=1");
    assert!(done.contains("generation 1"), "{done}");

    cluster.signal(libc::SIGTERM);
    notify.wait_for("STOPPING=1");
    assert_eq!(cluster.wait_exit(DEADLINE).code(), Some(0));
}

/// Starts the master the systemd way: the listening socket `listener` at fd 3, `LISTEN_FDS=1`,
/// `LISTEN_PID` = the master's own pid (a python helper puts the socket, given as its stdin,
/// at fd 3 and execs the master, keeping its pid).
fn socket_activated_master(listener: std::net::TcpListener, args: &[&str]) -> TestCluster {
    const HELPER: &str = "import os, sys\n\
        os.dup2(0, 3)\n\
        null = os.open('/dev/null', os.O_RDONLY)\n\
        os.dup2(null, 0)\n\
        os.close(null)\n\
        os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES='web')\n\
        os.execv(sys.argv[1], sys.argv[1:])\n";
    let mut cmd = Command::new("python3");
    cmd.args(["-c", HELPER, BIN])
        .args(args)
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            listener,
        )));
    TestCluster::spawn_command(cmd, 1)
}

fn socket_activation_serves_the_queued_connection(extra: &[&str]) {
    if !available("python3") {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Queued in the kernel's backlog before any master runs.
    let queued = send_request(addr, "/").unwrap();
    let listen = format!("127.0.0.1:{}", addr.port());
    let mut args = vec!["--workers", "2"];
    if extra.contains(&"--listen") {
        args.extend(["--listen", &listen]);
    }
    args.extend(extra.iter().filter(|a| **a != "--listen"));
    let cluster = socket_activated_master(listener, &args);
    assert_eq!(cluster.addr(), addr, "the master serves the passed socket");
    cluster.wait_for_log("workers ready", DEADLINE);
    let resp = read_response(queued).expect("the queued connection is served");
    assert_eq!(resp.status, 200);
    for _ in 0..10 {
        assert_eq!(get(addr, "/").unwrap().status, 200);
    }
    assert!(cluster.log_contains("socket activation: fd for"));
}

#[test]
fn socket_activation_without_listen_uses_the_passed_socket() {
    socket_activation_serves_the_queued_connection(&[]);
}

#[test]
fn socket_activation_matches_listen_and_works_in_shared_mode() {
    // Binding the same address again would fail (no SO_REUSEPORT): it is adopted, not bound.
    socket_activation_serves_the_queued_connection(&["--listen", "--policy", "shared"]);
}

// --- stopping: --shutdown-delay, --stop-signal, SIGQUIT --------------------------------------

#[test]
fn shutdown_delay_keeps_serving_until_a_second_signal() {
    let mut cluster = TestCluster::start(&["--workers", "2", "--shutdown-delay", "1h"]);
    cluster.signal(libc::SIGTERM);
    cluster.wait_for_log("still serving for --shutdown-delay", DEADLINE);
    for _ in 0..20 {
        assert_eq!(get(cluster.addr(), "/").unwrap().status, 200);
    }
    assert!(cluster.is_running());
    // A second signal during the delay starts the graceful stop at once.
    cluster.signal(libc::SIGQUIT);
    assert_eq!(cluster.wait_exit(DEADLINE).code(), Some(0));
    cluster.wait_for_log("shutdown complete", DEADLINE);
}

/// A worker that says which signal stopped it and which PM2 instance it is, on the master's
/// stderr.
/// The traps are set before it says who it is, so the test signals only a prepared worker.
const SIGNAL_REPORTER: &str = "trap 'echo stop\"\"ped-by-INT >&2; exit 0' INT; \
    trap 'echo stop\"\"ped-by-TERM >&2; exit 0' TERM; \
    echo \"instance=$NODE_APP_INSTANCE\" >&2; \
    while :; do sleep 1 & wait $!; done";

#[test]
fn stop_signal_reaches_workers_and_quit_is_graceful() {
    let mut cluster = TestCluster::start(&[
        "--workers",
        "2",
        "--policy",
        "shared",
        "--no-preload",
        "--ready-delay",
        "1ms",
        "--stop-signal",
        "INT",
        "--",
        "sh",
        "-c",
        SIGNAL_REPORTER,
    ]);
    cluster.wait_for_log("instance=0", DEADLINE);
    cluster.wait_for_log("instance=1", DEADLINE);
    assert!(!cluster.log_lines().iter().any(|l| l == "instance="));
    cluster.signal(libc::SIGQUIT);
    assert_eq!(cluster.wait_exit(DEADLINE).code(), Some(0));
    cluster.wait_for_count("stopped-by-INT", 2, DEADLINE);
    assert!(!cluster.log_contains("stopped-by-TERM"));
    assert!(!cluster.log_contains("SIGKILL"));
}

// --- privilege drop ---------------------------------------------------------------------------

fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[test]
fn user_nobody_runs_the_workers_as_nobody() {
    if !running_as_root() {
        eprintln!("note: not root; --user cannot be tested");
        return;
    }
    let (cluster, path) = if available("node") {
        // An unmodified server through the shim: nobody must be able to read the shim.
        let tmp = TempDir::new("user-node");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let app = tmp.write("app.js", NODE_APP);
        let c = TestCluster::start(&["--workers", "2", "--user", "nobody", "--", "node", &app]);
        (c, tmp)
    } else {
        let tmp = TempDir::new("user-demo");
        (
            TestCluster::start(&["--workers", "2", "--user", "nobody"]),
            tmp,
        )
    };
    for pid in cluster.wait_for_workers(2) {
        assert_eq!(uid_of(pid), 65534, "worker {pid} runs as nobody");
    }
    assert_eq!(uid_of(cluster.pid()), 0, "the master keeps its privileges");
    for _ in 0..10 {
        assert_eq!(get(cluster.addr(), "/").unwrap().status, 200);
    }
    drop(cluster);
    if available("node") {
        // Kernel mode: readiness comes over the worker's NOTIFY_SOCKET, which the worker's
        // user must be able to reach.
        let app = path.write("app.js", NODE_APP);
        let shared = TestCluster::start(&[
            "--workers",
            "2",
            "--policy",
            "shared",
            "--user",
            "nobody",
            "--",
            "node",
            &app,
        ]);
        assert_eq!(shared.wait_for_count("(READY=1", 2, DEADLINE).len(), 2);
        assert!(!shared.log_contains("signalled no readiness"));
        assert_eq!(get(shared.addr(), "/").unwrap().status, 200);
    }
    drop(path);
}

// --- containers: orphans are reaped ---------------------------------------------------------

/// A worker that leaves an orphan behind: its subshell starts `sleep` in the background and
/// exits, so the `sleep` is re-parented to the master (a subreaper), which must reap it.
const ORPHAN_MAKER: &str = "( sleep 2 & echo \"orph\"\"an=$!\" >&2 ); exec sleep 1000";

#[test]
fn orphans_of_workers_are_reaped_by_the_master() {
    let cluster = TestCluster::start(&[
        "--workers",
        "1",
        "--policy",
        "shared",
        "--no-preload",
        "--ready-delay",
        "1ms",
        "--",
        "sh",
        "-c",
        ORPHAN_MAKER,
    ]);
    let line = cluster.wait_for_log("orphan=", DEADLINE);
    let orphan: i32 = line
        .split("orphan=")
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Re-parented to the master, then gone entirely (a zombie would keep its /proc entry)
    // while the master runs.
    let deadline = std::time::Instant::now() + DEADLINE;
    let mut parents = std::collections::BTreeSet::new();
    while let Ok(status) = std::fs::read_to_string(format!("/proc/{orphan}/status")) {
        if let Some(ppid) = status.lines().find_map(|l| l.strip_prefix("PPid:")) {
            parents.insert(ppid.trim().parse::<i32>().unwrap());
        }
        let state = process_state(orphan);
        assert!(
            std::time::Instant::now() < deadline,
            "orphan {orphan} not reaped (state {state:?})"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        parents.contains(&cluster.pid()),
        "the orphan's parents were {parents:?}, not the master {}",
        cluster.pid()
    );
    assert_eq!(
        cluster.worker_pids().len(),
        1,
        "the worker itself still runs"
    );
}

/// Every child of `pid`, zombies included.
fn raw_children(pid: i32) -> std::collections::BTreeSet<i32> {
    let mut out = std::collections::BTreeSet::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
    }
    out
}

#[test]
fn as_pid_1_in_a_new_pid_namespace_the_master_reaps_orphans() {
    let permitted = Command::new("unshare")
        .args(["--pid", "--fork", "true"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !permitted {
        eprintln!("note: unshare --pid is not permitted here; skipped");
        return;
    }
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child", BIN])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--policy",
            "shared",
        ])
        .args([
            "--no-preload",
            "--ready-delay",
            "1ms",
            "--",
            "sh",
            "-c",
            ORPHAN_MAKER,
        ])
        .stdin(std::process::Stdio::null());
    let cluster = TestCluster::spawn_command(cmd, 1);
    cluster.wait_for_log("orphan=", DEADLINE);
    assert!(
        cluster.log_contains("rcluster-lb[1]:"),
        "the master is PID 1 in its namespace"
    );
    let master = *children_of(cluster.pid())
        .first()
        .expect("unshare's child is the master");
    // The orphan shows up as the master's second child, then is reaped: no zombie stays.
    let deadline = std::time::Instant::now() + DEADLINE;
    let mut most = 0;
    loop {
        let children = raw_children(master);
        most = most.max(children.len());
        if most >= 2 && children.len() == 1 {
            break;
        }
        let zombies: Vec<i32> = children.iter().copied().filter(|&p| !alive(p)).collect();
        assert!(
            std::time::Instant::now() < deadline,
            "children of the master {master}: {children:?}, zombies {zombies:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
