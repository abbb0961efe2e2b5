//! Hostile neighbours and misbehaving workers (issue 12): another user or an unrelated process
//! cannot steer the master through a worker's NOTIFY_SOCKET; a worker that stops taking
//! connections without filling its channel (SIGSTOP, closing fd 3, a reuseport worker that
//! stops accepting) is detected and what was queued for it is served; a worker's helpers die
//! with it; CLOSED cannot make a worker look idle; a malformed-message flood writes a bounded
//! log; per-listener READY; options that used to panic exit 2.
//!
//! Every test runs the real binary on port 0 (through [`common::TestCluster`], which kills and
//! reaps everything on drop) and asserts counts: requests answered, processes left, log lines,
//! exit codes. Tests that act as another user or grab a worker's fd (`pidfd_getfd`) need root
//! and skip with a note otherwise.

mod common;

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{BIN, DEADLINE, Load, Tally, TestCluster, get, kill, wait_stopped};

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    euid == 0
}

fn assert_all_answered(what: &str, tally: &Tally, expected: usize) {
    println!("{what}: {}", tally.summary());
    assert_eq!(
        (tally.ok, tally.errors()),
        (expected, 0),
        "{what}: {}; first failures: {:?}",
        tally.summary(),
        tally.examples
    );
}

/// A dup of fd `fd` of process `pid` (`pidfd_getfd(2)`, needs ptrace rights: root here).
fn grab_fd(pid: i32, fd: i32) -> OwnedFd {
    #[allow(unsafe_code)]
    // SAFETY: raw syscalls on integers; each returns a new fd we own, or -1.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        assert!(
            pidfd >= 0,
            "pidfd_open({pid}): {}",
            std::io::Error::last_os_error()
        );
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        assert!(
            got >= 0,
            "pidfd_getfd({pid}, {fd}): {}",
            std::io::Error::last_os_error()
        );
        OwnedFd::from_raw_fd(got as i32)
    }
}

/// Sends one message on a channel end, non-blocking; false if the channel is full or gone.
fn send_msg(fd: &OwnedFd, msg: &[u8]) -> std::io::Result<()> {
    #[allow(unsafe_code)]
    // SAFETY: msg is valid for its length.
    let n = unsafe {
        libc::send(
            fd.as_fd().as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A worker → master message (docs/PROTOCOL.md: 16 bytes, "RC", version 1, kind, value).
fn message(kind: u8, value: u64) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[0..2].copy_from_slice(b"RC");
    m[2] = 1;
    m[3] = kind;
    m[8..].copy_from_slice(&value.to_le_bytes());
    m
}

/// The worker's `NOTIFY_SOCKET`, from its environment.
fn notify_socket_of(pid: i32) -> String {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    env.split(|&b| b == 0)
        .filter_map(|e| std::str::from_utf8(e).ok())
        .find_map(|e| e.strip_prefix("NOTIFY_SOCKET="))
        .unwrap_or_else(|| panic!("worker {pid} has no NOTIFY_SOCKET"))
        .to_string()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rcluster-harden-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// --- notifications ---------------------------------------------------------------------------

#[test]
fn another_user_cannot_reach_a_workers_notify_socket() {
    let setpriv = Command::new("setpriv").arg("--version").output();
    if !is_root() || !std::path::Path::new("/usr/bin/python3").exists() || setpriv.is_err() {
        eprintln!("skipped: needs root (to act as nobody), setpriv and /usr/bin/python3");
        return;
    }
    let cluster = TestCluster::start(&["--workers", "2", "--policy", "round-robin"]);
    let workers = cluster.wait_for_workers(2);
    for &pid in &workers {
        let path = notify_socket_of(pid);
        assert!(
            path.starts_with('/'),
            "a filesystem socket, not abstract: {path}"
        );
        let dir = std::path::Path::new(&path).parent().unwrap();
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o700, "{}", dir.display());
        let script = format!(
            "import socket,sys\ns=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\n\
             try:\n  s.sendto(b'STOPPING=1',{path:?})\nexcept OSError as e:\n  print(e);sys.exit(3)\n"
        );
        let out = Command::new("setpriv")
            .args([
                "--reuid",
                "nobody",
                "--regid",
                "nogroup",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                &script,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "nobody reached {path}: {out:?}");
    }
    let mut tally = Tally::default();
    for _ in 0..10 {
        tally.add(&get(cluster.addr(), "/"));
    }
    assert_all_answered("after nobody's STOPPING=1", &tally, 10);
    assert!(!cluster.log_contains("is stopping"));
}

#[test]
fn notifications_from_outside_the_workers_process_group_are_dropped_and_logged_boundedly() {
    let cluster = TestCluster::start(&["--workers", "2", "--policy", "round-robin"]);
    let workers = cluster.wait_for_workers(2);
    let client = UnixDatagram::unbound().unwrap();
    let before = cluster.log_lines().len();
    let until = Instant::now() + Duration::from_secs(2);
    let mut sent = 0u64;
    while Instant::now() < until {
        for &pid in &workers {
            let path = notify_socket_of(pid);
            let _ = client.send_to(b"STOPPING=1", &path);
            let status = format!("STATUS={}", "x".repeat(2000));
            if client.send_to(status.as_bytes(), &path).is_ok() {
                sent += 1;
            }
        }
    }
    cluster.sync_acceptor();
    let mut tally = Tally::default();
    for _ in 0..10 {
        tally.add(&get(cluster.addr(), "/"));
    }
    assert_all_answered("after a notification flood from a stranger", &tally, 10);
    let lines = cluster.log_lines();
    let new = &lines[before..];
    println!("{sent} datagrams sent; {} log lines written", new.len());
    assert!(sent > 100, "the flood ran ({sent})");
    assert!(
        !new.iter().any(|l| l.contains("is stopping")),
        "STOPPING=1 was heard"
    );
    assert!(
        !new.iter().any(|l| l.contains(" status: x")),
        "STATUS= was heard"
    );
    let dropped = new
        .iter()
        .filter(|l| l.contains("dropped a notification"))
        .count();
    assert!(dropped >= 1, "rejections are logged");
    assert!(new.len() < 100, "bounded log: {} lines", new.len());
}

// --- stall detection ---------------------------------------------------------------------------

#[test]
fn a_stopped_worker_at_a_low_rate_is_detected_and_every_request_answered() {
    let cluster = TestCluster::start(&[
        "--workers",
        "2",
        "--policy",
        "round-robin",
        "--stall-timeout",
        "1s",
        "--grace",
        "2s",
    ]);
    let victim = cluster.wait_for_workers(2)[0];
    kill(victim, libc::SIGSTOP);
    wait_stopped(victim);
    // 20 requests per second: the stopped worker's channel never fills.
    let tally = Load::start(cluster.addr(), "/", 40, 20.0, 40).join();
    assert_all_answered("SIGSTOP, round-robin at 20 req/s", &tally, 40);
    assert!(!tally.by_pid.contains_key(&victim));
    cluster.wait_for_log(&format!("(pid {victim}): took no connection"), DEADLINE);
}

#[test]
fn a_worker_that_closes_its_channel_is_replaced_and_every_request_answered() {
    let dir = temp_dir("close-fd3");
    // Slot 1's first worker closes fd 3 and idles; every other worker is the demo worker.
    let script = format!(
        r#"if [ "$RCLUSTER_WORKER_ID" = 1 ] && mkdir {}/once 2>/dev/null; then exec 3>&-; exec sleep 1000; fi; exec {BIN} demo-worker"#,
        dir.display()
    );
    let cluster = TestCluster::start(&[
        "--workers",
        "2",
        "--policy",
        "round-robin",
        "--stall-timeout",
        "1s",
        "--grace",
        "1s",
        "--ready-delay",
        "300ms",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let tally = Load::start(cluster.addr(), "/", 20, 20.0, 20).join();
    assert_all_answered("a worker that closed fd 3", &tally, 20);
    cluster.wait_for_log("took no connection", DEADLINE);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reuseport_stopped_worker_is_replaced_and_its_queue_served() {
    let cluster = TestCluster::start(&[
        "--workers",
        "2",
        "--policy",
        "reuseport",
        "--stall-timeout",
        "1s",
        "--grace",
        "1s",
    ]);
    let victim = cluster.wait_for_workers(2)[0];
    kill(victim, libc::SIGSTOP);
    wait_stopped(victim);
    let tally = Load::start(cluster.addr(), "/", 12, 12.0, 12).join();
    assert_all_answered("reuseport, one worker stopped", &tally, 12);
    cluster.wait_for_log(
        &format!("(pid {victim}): its accept queue did not go down"),
        DEADLINE,
    );
}

// --- the worker's process tree -----------------------------------------------------------------

#[test]
fn a_workers_helper_dies_with_it_and_a_new_master_on_the_port_loses_nothing() {
    let dir = temp_dir("helper");
    let pids = dir.join("helpers");
    // Each worker forks a helper that inherits its reuseport listener (fd 3) and sleeps.
    let script = format!(
        r#"sleep 1000 & echo $! >> {}; exec {BIN} demo-worker"#,
        pids.display()
    );
    let mut first = TestCluster::start(&[
        "--workers",
        "2",
        "--policy",
        "reuseport",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let port = first.addr().port();
    let helpers: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(helpers.len(), 2);
    first.signal(libc::SIGTERM);
    assert!(first.wait_exit(DEADLINE).success());
    // No helper outlives the master (reaped by init once killed).
    let deadline = Instant::now() + DEADLINE;
    while helpers.iter().any(|&p| common::alive(p)) {
        assert!(
            Instant::now() < deadline,
            "helpers still alive: {helpers:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let listen = format!("127.0.0.1:{port}");
    let second = TestCluster::start(&[
        "--workers",
        "2",
        "--policy",
        "reuseport",
        "--listen",
        &listen,
    ]);
    let tally = Load::start(second.addr(), "/", 12, 100.0, 4).join();
    assert_all_answered("a new master on the same port", &tally, 12);
    let _ = std::fs::remove_dir_all(&dir);
}

// --- accounting ----------------------------------------------------------------------------------

#[test]
fn closed_beyond_what_was_dispatched_does_not_make_a_worker_look_idle() {
    if !is_root() {
        eprintln!("skipped: pidfd_getfd of a worker's channel needs root");
        return;
    }
    let cluster = TestCluster::start(&["--workers", "2", "--policy", "least-conn"]);
    let workers = cluster.wait_for_workers(2);
    let liar = workers[1];
    let chan = grab_fd(liar, 3);
    send_msg(&chan, &message(3, u64::MAX)).unwrap();
    cluster.wait_for_log("protocol violation: CLOSED(18446744073709551615)", DEADLINE);
    // 20 connections held open (no request yet): least-conn must split them.
    let mut held = Vec::new();
    for _ in 0..20 {
        let s = std::net::TcpStream::connect(cluster.addr()).unwrap();
        cluster.wait_for_holder(&s);
        held.push(s);
    }
    let status = cluster.status();
    let to_liar = status.iter().find(|w| w.pid == liar).unwrap();
    println!("status after the lie: {status:?}");
    assert!(to_liar.closed <= to_liar.dispatched);
    assert!(
        (9..=11).contains(&to_liar.active),
        "the liar holds {} of 20",
        to_liar.active
    );
}

#[test]
fn a_malformed_flood_writes_a_bounded_log_and_replaces_the_worker() {
    if !is_root() {
        eprintln!("skipped: pidfd_getfd of a worker's channel needs root");
        return;
    }
    let cluster = TestCluster::start(&["--workers", "2", "--policy", "least-conn"]);
    let flooder = cluster.wait_for_workers(2)[1];
    let chan = grab_fd(flooder, 3);
    let before = cluster.log_lines().len();
    let until = Instant::now() + Duration::from_secs(4);
    let mut sent = 0u64;
    let mut bad = message(3, 1);
    bad[4] = 0xff; // reserved byte set
    while Instant::now() < until {
        match send_msg(&chan, &bad) {
            Ok(()) => sent += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(_) => break, // the master retired the channel
        }
    }
    cluster.wait_for_log("it broke the channel protocol", DEADLINE);
    let mut tally = Tally::default();
    for _ in 0..10 {
        tally.add(&get(cluster.addr(), "/"));
    }
    assert_all_answered("after a malformed flood", &tally, 10);
    let new = cluster.log_lines().len() - before;
    println!("{sent} malformed messages; {new} log lines");
    assert!(sent >= 16);
    assert!(new < 100, "bounded log: {new} lines for {sent} messages");
}

// --- readiness -----------------------------------------------------------------------------------

#[test]
fn ready_on_one_listener_opens_only_that_listener() {
    if !is_root() {
        eprintln!("skipped: pidfd_getfd of a worker's channel needs root");
        return;
    }
    // Slot 1 runs a process that speaks nothing; the test sends READY on its first channel.
    let script = format!(
        r#"if [ "$RCLUSTER_WORKER_ID" = 1 ]; then exec sleep 1000; fi; exec {BIN} demo-worker"#
    );
    let cluster = TestCluster::spawn(&[
        "--workers",
        "2",
        "--policy",
        "round-robin",
        "--listen",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
        "--no-preload",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    cluster.wait_for_log("worker 0 ready", DEADLINE);
    // The worker's sh execs sleep: wait until one worker is sleep.
    let deadline = Instant::now() + DEADLINE;
    let silent = loop {
        let found = cluster.worker_pids().into_iter().find(|&p| {
            std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e.ends_with("sleep"))
        });
        if let Some(p) = found {
            break p;
        }
        assert!(Instant::now() < deadline, "no worker became sleep");
        std::thread::sleep(Duration::from_millis(10));
    };
    let chan0 = grab_fd(silent, 3);
    send_msg(&chan0, &message(2, 1)).unwrap();
    cluster.wait_for_log("worker 1 ready", DEADLINE);
    let mut tally = Tally::default();
    for _ in 0..10 {
        tally.add(&common::get_with_timeout(
            cluster.addrs[1],
            "/",
            Duration::from_secs(10),
        ));
    }
    assert_all_answered("listener 1, where only worker 0 is ready", &tally, 10);
    let status = cluster.status();
    let s = status.iter().find(|w| w.pid == silent).unwrap();
    assert_eq!(s.dispatched, 0, "{status:?}");
}

#[test]
fn status_reports_rss_whatever_the_policy() {
    let cluster = TestCluster::start(&["--workers", "1", "--policy", "round-robin"]);
    let status = cluster.status();
    assert!(status.iter().all(|w| w.rss_kib > 0), "{status:?}");
}

// --- options -------------------------------------------------------------------------------------

#[test]
fn nonsense_option_values_exit_2_with_one_line_and_no_panic() {
    let not_elf =
        std::env::temp_dir().join(format!("rcluster-harden-noexec-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&not_elf).unwrap();
        f.write_all(b"\x7fELF garbage that is no program").unwrap();
    }
    std::fs::set_permissions(
        &not_elf,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let not_elf = not_elf.to_str().unwrap().to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec!["--ready-timeout", "500000000000years"],
        vec!["--grace", "500000000000years"],
        vec!["--stall-timeout", "0s"],
        vec!["--max-rss", "0"],
        vec!["--policy", "reuseport", "--max-conns", "10"],
        vec!["--listen", "127.0.0.1:0", "--workers", "1", "--", &not_elf],
    ];
    for args in cases {
        let out = Command::new(BIN).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let errors: Vec<_> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    let _ = std::fs::remove_file(&not_elf);
}

#[test]
fn huge_jitter_and_grace_do_not_panic() {
    let mut cluster = TestCluster::start(&[
        "--workers",
        "1",
        "--max-conns",
        "5",
        "--max-conns-jitter",
        "18446744073709551615",
        "--grace",
        "300days",
    ]);
    let mut tally = Tally::default();
    for _ in 0..10 {
        tally.add(&get(cluster.addr(), "/"));
    }
    assert_all_answered("huge jitter", &tally, 10);
    cluster.signal(libc::SIGTERM);
    let status = cluster.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{status:?}");
}

// --- a worker out of fds -----------------------------------------------------------------------

#[test]
fn a_worker_out_of_fds_says_full_and_loses_no_connection() {
    if !std::path::Path::new("/usr/bin/prlimit").exists() {
        eprintln!("skipped: needs prlimit");
        return;
    }
    // Slot 1 runs with 32 fds: room for a few connections only.
    let script = format!(
        r#"if [ "$RCLUSTER_WORKER_ID" = 1 ]; then exec /usr/bin/prlimit --nofile=32:32 {BIN} demo-worker; fi; exec {BIN} demo-worker"#
    );
    let cluster = TestCluster::start(&[
        "--workers",
        "2",
        "--policy",
        "round-robin",
        "--no-preload",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    // 60 connections held open at once (no request yet), then a request on each.
    let mut held = Vec::new();
    for _ in 0..60 {
        held.push(std::net::TcpStream::connect(cluster.addr()).unwrap());
    }
    cluster.wait_for_log("is out of file descriptors", DEADLINE);
    let mut tally = Tally::default();
    for mut s in held {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let r = common::send_on(&mut s, "/", false).and_then(|()| common::read_response(s));
        tally.add(&r);
    }
    assert_all_answered("60 connections, one worker at 32 fds", &tally, 60);
    let lost: u64 = cluster
        .log_lines()
        .iter()
        .filter_map(|l| l.split("file descriptors (").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(lost, 0, "connections lost on receipt");
}

/// Two workers running `/usr/bin/python3 ARGS` with 24 fds each (round-robin, dispatch), and 60
/// connections held open at once (no request yet), returned once one of the workers said FULL:
/// together they hold fewer than 60 connections, so at least one says FULL whatever the
/// distribution, and what neither can take waits in the master (or the kernel backlog) until
/// they have room again. `None` (with a note) without prlimit or python3.
fn pythons_at_24_fds(args: &str) -> Option<(TestCluster, Vec<std::net::TcpStream>)> {
    let python = "/usr/bin/python3";
    if !std::path::Path::new("/usr/bin/prlimit").exists() || !std::path::Path::new(python).exists()
    {
        eprintln!("skipped: needs prlimit and {python}");
        return None;
    }
    let script = format!("cd /; exec /usr/bin/prlimit --nofile=24:24 {python} {args}");
    let cluster = TestCluster::start(&[
        "--workers",
        "2",
        "--policy",
        "round-robin",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let held = (0..60)
        .map(|_| std::net::TcpStream::connect(cluster.addr()).unwrap())
        .collect();
    cluster.wait_for_log("is out of file descriptors", DEADLINE);
    Some((cluster, held))
}

#[test]
fn an_unmodified_server_out_of_fds_loses_no_connection_through_the_shim() {
    let Some((_cluster, held)) = pythons_at_24_fds(r#"-m http.server --bind 127.0.0.1 "$PORT""#)
    else {
        return;
    };
    // Every connection gets an answer. (Python itself may answer 404 to a request it cannot
    // open a file for at its limit: its own shortage, but no lost connection.)
    let (mut answered, mut ok, mut failed) = (0, 0, Vec::new());
    for mut s in held {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        match common::send_on(&mut s, "/", false).and_then(|()| common::read_response(s)) {
            Ok(r) => {
                answered += 1;
                ok += usize::from(r.status == 200);
            }
            Err(e) => failed.push(e.to_string()),
        }
    }
    println!("python at 24 fds: {answered} of 60 answered ({ok} with 200); failures {failed:?}");
    assert_eq!((answered, failed.len()), (60, 0), "{failed:?}");
}

/// The server of [`a_threaded_server_racing_for_its_last_fd_loses_no_connection_through_the_shim`].
const FD_RACE_APP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/fd_race_server.py"
);

/// A threaded server at its fd limit whose other thread opens and closes a file without pause
/// (so the last free fd is often gone between the shim's check and its read of the channel):
/// every one of 60 connections held open at once is answered, and no CONN arrives without its
/// fd (the kernel closes a received fd that does not fit, losing the client).
#[test]
fn a_threaded_server_racing_for_its_last_fd_loses_no_connection_through_the_shim() {
    let Some((cluster, held)) = pythons_at_24_fds(FD_RACE_APP) else {
        return;
    };
    let mut tally = Tally::default();
    for mut s in held {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let r = common::send_on(&mut s, "/", false).and_then(|()| common::read_response(s));
        tally.add(&r);
    }
    let without_fd = cluster
        .log_lines()
        .iter()
        .filter(|l| l.contains("CONN message without an fd"))
        .count();
    assert_eq!(without_fd, 0, "connections whose fd did not fit on receipt");
    assert_all_answered("60 connections, two threaded pythons at 24 fds", &tally, 60);
}

#[test]
fn workers_running_as_another_user_can_notify_and_a_third_user_cannot() {
    if !is_root() {
        eprintln!("skipped: --user needs root");
        return;
    }
    let cluster = TestCluster::start(&["--workers", "2", "--user", "nobody"]);
    let workers = cluster.wait_for_workers(2);
    let mut tally = Tally::default();
    for _ in 0..10 {
        tally.add(&get(cluster.addr(), "/"));
    }
    assert_all_answered("workers as nobody", &tally, 10);
    for &pid in &workers {
        let path = notify_socket_of(pid);
        let meta = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((meta.uid(), meta.mode() & 0o777), (65534, 0o600), "{path}");
        let dir = std::fs::metadata(std::path::Path::new(&path).parent().unwrap()).unwrap();
        assert_eq!((dir.uid(), dir.mode() & 0o777), (0, 0o711));
    }
    // The workers' own READY=1 was heard: no rejection logged.
    assert!(!cluster.log_contains("dropped a notification"));
}
