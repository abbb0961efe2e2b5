//! Kernel steering (`--steer`), against the real binary: the program places connections by the
//! load table (least-conn, round-robin, p2c, least-mem), a busy or stalled worker is passed over,
//! a worker grown big is avoided under least-mem, a closed listener's queue migrates, abandoned
//! handshakes do not inflate a slot's load for long, without CAP_BPF the master falls back to
//! dispatch, a program loaded by a privileged `steer-load` steers a master without
//! capabilities, a stop that comes while the program loads is obeyed, and `ctl status` shows the
//! table. Each test that needs the program skips with a note where it cannot load here.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    DEADLINE, TestCluster, get, kill, per_worker, read_response, send_request, steering_available,
};

/// The `status: steering slot N: ...` lines of one SIGUSR1, as (slot, load, forgiven).
fn steering_status(cluster: &TestCluster, slots: usize) -> Vec<(usize, i64, i64)> {
    cluster
        .steering_status(slots)
        .into_iter()
        .map(|s| (s.slot, s.load, s.forgiven))
        .collect()
}

/// Starts a kernel-steered cluster and waits until its first `slots` slots are eligible (the
/// master logs each change of the table).
fn start_steered(args: &[&str], slots: usize) -> TestCluster {
    let cluster = TestCluster::start(args);
    for slot in 0..slots {
        cluster.wait_for_log(&format!("steering: slot {slot} eligible"), DEADLINE);
    }
    cluster
}

/// Two kernel-steered python workers running `script` with `args`, which write the table
/// themselves (`--no-preload`) and count as ready after 100 ms; `extra` options before the
/// command.
fn start_table_writers(extra: &[&str], script: &str, args: &[&str]) -> TestCluster {
    let mut all = vec!["--steer", "kernel", "-w", "2", "--no-preload"];
    all.extend_from_slice(&["--ready-delay", "100ms"]);
    all.extend_from_slice(extra);
    all.extend_from_slice(&["--", "python3", script]);
    all.extend_from_slice(args);
    start_steered(&all, 2)
}

/// [`start_steered`] with `--steer kernel -p POLICY -w WORKERS` and `extra`, all slots eligible.
fn start_policy(policy: &str, workers: usize, extra: &[&str]) -> TestCluster {
    let n = workers.to_string();
    let mut args = vec!["--steer", "kernel", "-p", policy, "-w", &n];
    args.extend_from_slice(extra);
    start_steered(&args, workers)
}

#[test]
fn kernel_steering_is_announced_and_serves() {
    if !steering_available() {
        return;
    }
    let cluster = TestCluster::start(&["--steer", "kernel", "-w", "2"]);
    assert!(cluster.log_contains("steering: kernel"));
    let results: Vec<_> = (0..20).map(|_| get(cluster.addr(), "/")).collect();
    let counts = per_worker(&results);
    assert_eq!(counts.values().sum::<usize>(), 20);
}

/// Sends a request on each held connection and reads the answers.
fn answer_held(held: Vec<TcpStream>) -> Vec<std::io::Result<common::Response>> {
    held.into_iter()
        .map(|mut s| {
            s.set_read_timeout(Some(DEADLINE)).unwrap();
            write!(s, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
            read_response(s)
        })
        .collect()
}

#[test]
fn held_connections_split_exactly() {
    if !steering_available() {
        return;
    }
    let cluster = start_steered(&["--steer", "kernel", "-w", "4"], 4);
    // 40 connections held open, each to the least loaded of four, so 10 each, whatever the hash.
    let counts = per_worker(&answer_held(hold_one_at_a_time(&cluster, 40, 4)));
    assert_eq!(counts.len(), 4, "{counts:?}");
    assert!(counts.values().all(|&n| n == 10), "{counts:?}");
}

/// Opens `n` connections and holds them, one at a time: each is opened once every worker's
/// loop (of `slots`) waits for events and is accepted before the next, so none is stuck or
/// serving and the program places each by the load alone (a stuck or serving pick would send
/// it to the overflow queue).
fn hold_one_at_a_time(cluster: &TestCluster, n: i64, slots: usize) -> Vec<TcpStream> {
    let deadline = Instant::now() + DEADLINE;
    let pids = cluster.wait_for_workers(slots);
    (0..n)
        .map(|i| {
            // Every loop back in its wait first, so none looks stuck (a loaded machine can keep
            // one from its wait for over 1 ms) and the connection goes by the load alone.
            pids.iter().for_each(|&p| common::wait_in_epoll_wait(p));
            let s = TcpStream::connect(cluster.addr()).unwrap();
            while cluster
                .steering_status(slots)
                .iter()
                .map(|st| st.accepted)
                .sum::<i64>()
                < i + 1
            {
                assert!(
                    Instant::now() < deadline,
                    "connection {i} was never accepted"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            s
        })
        .collect()
}

/// `n` requests for `/`, each sent once every worker in `pids` waits for events.
fn gets_when_waiting(
    cluster: &TestCluster,
    pids: &[i32],
    n: usize,
) -> Vec<std::io::Result<common::Response>> {
    (0..n)
        .map(|_| {
            pids.iter().for_each(|&p| common::wait_in_epoll_wait(p));
            get(cluster.addr(), "/")
        })
        .collect()
}

#[test]
fn p2c_held_connections_split_within_one() {
    if !steering_available() {
        return;
    }
    let cluster = start_policy("p2c", 2, &[]);
    assert!(cluster.log_contains("steering: kernel"));
    // Two eligible slots: both are drawn for every connection, so the less loaded takes it.
    let counts = per_worker(&answer_held(hold_one_at_a_time(&cluster, 41, 2)));
    assert_eq!(counts.values().sum::<usize>(), 41, "{counts:?}");
    let (a, b) = (counts.get(&0).copied(), counts.get(&1).copied());
    assert!(
        matches!((a, b), (Some(20), Some(21)) | (Some(21), Some(20))),
        "{counts:?}"
    );
}

#[test]
fn an_added_worker_is_steered_to_once_ready() {
    if !steering_available() {
        return;
    }
    let cluster = TestCluster::start(&["--steer", "kernel", "-w", "1"]);
    cluster.signal(libc::SIGTTIN);
    cluster.wait_for_log("steering: slot 1 eligible", DEADLINE);
    // Held one at a time, so each goes by load alone (none to the overflow queue).
    let counts = per_worker(&answer_held(hold_one_at_a_time(&cluster, 10, 2)));
    assert_eq!(
        (counts.get(&0), counts.get(&1)),
        (Some(&5), Some(&5)),
        "{counts:?}"
    );
}

#[test]
fn a_rust_worker_under_the_shim_is_counted_once() {
    if !steering_available() {
        return;
    }
    // The demo worker run as an external command gets the preload shim; it also counts through
    // the Rust worker API, and the shim must stand aside.
    let cluster = TestCluster::start(&[
        "--steer",
        "kernel",
        "-w",
        "2",
        "--",
        common::BIN,
        "demo-worker",
    ]);
    assert!(!cluster.log_contains("librcluster_shim.so not found"));
    let results: Vec<_> = (0..30).map(|_| get(cluster.addr(), "/")).collect();
    assert_eq!(per_worker(&results).values().sum::<usize>(), 30);
    wait_counted_once(&cluster, 2, 30);
}

/// Waits until the table of a cluster with `slots` slots shows `n` placements, each accepted
/// and closed exactly once by a worker that reports.
fn wait_counted_once(cluster: &TestCluster, slots: usize, n: i64) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let st = cluster.steering_status(slots);
        let placed: i64 = st.iter().map(|s| s.assigned - s.forgiven).sum();
        let balanced = st
            .iter()
            .all(|s| s.reporting && s.accepted == s.assigned && s.closed == s.accepted);
        if placed == n && balanced {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counted twice or not at all: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn busy_worker_gets_none_of_the_next_20() {
    busy_worker_trial("least-conn");
}

#[test]
fn p2c_busy_worker_gets_none_of_the_next_20() {
    // With two workers p2c compares both every time.
    busy_worker_trial("p2c");
}

#[test]
fn least_mem_busy_worker_gets_none_of_the_next_20() {
    // Two demo workers of about the same size tie on RSS: the load decides.
    busy_worker_trial("least-mem");
}

/// The demo worker's loop says when it waits (`Worker::loop_waiting`): one long request makes
/// its slot stuck, so neither idle connections nor short requests go there although it holds
/// fewer connections.
#[test]
fn least_conn_passes_over_a_worker_stuck_in_a_long_request() {
    if !steering_available() {
        return;
    }
    let cluster = start_policy("least-conn", 2, &[]);
    common::kernel_stuck_trial(&cluster, common::Response::pid);
}

/// The demo worker registers the overflow queue beside its listener (the Rust worker API):
/// with both workers inside long requests, new connections wait there and the worker that
/// comes free first takes them all.
#[test]
fn overflow_queue_goes_to_the_first_worker_free() {
    if !steering_available() {
        return;
    }
    let cluster = start_policy("least-conn", 2, &[]);
    common::overflow_trial(&cluster, common::Response::pid, None);
}

/// `ctl status` under kernel steering: the mode says the kernel steers, the steering section
/// carries the table, its placements account for every connection made, each ready worker's
/// counts come from its slot's line, and the loads fall back to 0 once the connections close.
#[test]
fn ctl_status_shows_the_steering_table() {
    if !steering_available() {
        return;
    }
    let dir = common::temp_dir("steer-status");
    let sock = dir.join("ctl.sock");
    let cluster = start_policy("least-conn", 2, &["--control", sock.to_str().unwrap()]);
    let held: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(cluster.addr()).unwrap())
        .collect();
    let answered = (0..10)
        .map(|_| get(cluster.addr(), "/"))
        .filter(|r| r.is_ok())
        .count();
    assert_eq!(answered, 10);
    let made = (held.len() + answered) as u64;
    let status = common::ctl_status(&sock);
    assert_eq!(status["mode"], "kernel-steered reuseport", "{status:#}");
    let steering = &status["steering"];
    let slots = steering["slots"].as_array().expect("a steering section");
    assert_eq!(slots.len(), 2, "{status:#}");
    let build = steering["build"].as_str().unwrap();
    assert!(
        ["bpf_loop", "bpf_for_each_map_elem"].contains(&build),
        "{status:#}"
    );
    // A connection the program spilled is counted on the overflow queue's line, and again on
    // the line of the slot whose worker took it.
    let placed: u64 = slots
        .iter()
        .map(|s| s["assigned"].as_u64().unwrap())
        .sum::<u64>()
        + steering["overflow"]["assigned"].as_u64().unwrap();
    assert!(placed >= made, "{made} connections made: {status:#}");
    for w in status["workers"].as_array().unwrap() {
        assert_eq!(w["state"], "ready", "{status:#}");
        let line = &slots[w["slot"].as_u64().unwrap() as usize];
        assert_eq!(w["dispatched"], line["assigned"], "{status:#}");
        assert_eq!(w["closed"], line["closed"], "{status:#}");
    }
    let table = common::ctl(&sock, &["status"]);
    assert_eq!(table.code, 0, "{table:?}");
    assert!(
        table.stdout.contains("(kernel-steered reuseport mode)")
            && table
                .stdout
                .contains(&format!("steering: kernel ({build} scan)")),
        "{}",
        table.stdout
    );
    drop(held);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = common::ctl_status(&sock);
        let slots = status["steering"]["slots"].as_array().unwrap();
        let idle = slots.iter().all(|s| s["load"] == 0)
            && status["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| w["active"] == 0);
        if idle {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "loads stay above 0 with every connection closed: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

/// `ctl policy` under kernel steering switches the program's pick: with one connection held
/// open on worker X, least-conn sends the short requests to the other worker (all of them but
/// when that one looks stuck for a moment on a loaded machine); once switched to round-robin
/// (X has had at most 3 placements, the other at least 8), the next 5 all go to X.
#[test]
fn ctl_policy_switches_the_program() {
    if !steering_available() {
        return;
    }
    let dir = common::temp_dir("steer-policy");
    let sock = dir.join("ctl.sock");
    let cluster = start_policy("least-conn", 2, &["--control", sock.to_str().unwrap()]);
    let pids = cluster.wait_for_workers(2);
    let _held = TcpStream::connect(cluster.addr()).unwrap();
    // Each request once both loops wait again: least-conn places by load alone (a pick whose
    // loop were still serving the last request would send it to the overflow queue, which the
    // worker holding the connection may take first).
    let results = gets_when_waiting(&cluster, &pids, 10);
    let counts = per_worker(&results);
    let (&other, &most) = counts.iter().max_by_key(|(_, n)| **n).unwrap();
    assert!(
        most >= 8,
        "least-conn: the worker holding nothing takes the short requests: {counts:?}"
    );
    let out = common::ctl(&sock, &["policy", "round-robin"]);
    assert_eq!(out.code, 0, "{out:?}");
    // The reply may reach us before the master's log line reaches the test's log reader.
    cluster.wait_for_log(
        "ctl policy round-robin (was least-conn; kernel-steered",
        DEADLINE,
    );
    let results: Vec<_> = (0..5).map(|_| get(cluster.addr(), "/")).collect();
    let counts = per_worker(&results);
    assert_eq!(
        counts.get(&other),
        None,
        "round-robin: all to the worker with fewer placements: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), 5);
    let bad = common::ctl(&sock, &["policy", "shared"]);
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(bad.stderr.contains("under kernel steering"), "{bad:?}");
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

/// One long request on one of two workers, then 20 short ones: none goes to the busy worker.
fn busy_worker_trial(policy: &str) {
    if !steering_available() {
        return;
    }
    let cluster = start_policy(policy, 2, &[]);
    // One long request, running (not merely placed) before the short ones start.
    let (long, busy) = common::send_long_request(&cluster);
    let results: Vec<_> = (0..20).map(|_| get(cluster.addr(), "/").unwrap()).collect();
    let table = cluster.steering_status(2);
    let long = read_response(long).unwrap();
    assert_eq!(long.pid(), busy, "the long request's worker");
    let to_busy = results.iter().filter(|r| r.pid() == busy).count();
    assert_eq!(
        to_busy, 0,
        "{policy}: the busy worker {busy} got {to_busy} of 20; table during the long request: \
         {table:?}"
    );
}

#[test]
fn least_mem_avoids_a_grown_worker() {
    if !steering_available() {
        return;
    }
    let cluster = start_policy("least-mem", 2, &["--rss-interval", "20ms"]);
    // One worker keeps 256 MiB; the master writes its RSS into the table.
    let big = get(cluster.addr(), "/?alloc=256").unwrap();
    assert_eq!(big.status, 200);
    let big_slot = big.worker();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let st = cluster.steering_status(2);
        if st[big_slot].rss_kib > 200 * 1024 && st[1 - big_slot].rss_kib > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "RSS not in the table: {st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Held or not, every new connection goes to the small worker. Each is sent once both
    // loops wait: a small worker that a loaded machine kept from its wait for 1 ms would look
    // stuck, and its connection would go to the overflow queue, which the big one watches too.
    let counts = per_worker(&answer_held(hold_one_at_a_time(&cluster, 10, 2)));
    assert_eq!(counts.get(&(1 - big_slot)), Some(&10), "{counts:?}");
    let results = gets_when_waiting(&cluster, &cluster.wait_for_workers(2), 20);
    let counts = per_worker(&results);
    assert_eq!(counts.get(&(1 - big_slot)), Some(&20), "{counts:?}");
}

#[test]
fn closed_listener_queue_migrates_without_resets() {
    if !steering_available() {
        return;
    }
    // Round-robin: half of the connections go to worker 1 even while it is stopped, so they
    // wait in its listener's queue.
    let cluster = start_steered(
        &[
            "--steer",
            "kernel",
            "-p",
            "round-robin",
            "-w",
            "2",
            "--grace",
            "1s",
        ],
        2,
    );
    let pids = cluster.wait_for_workers(2);
    let stopped = {
        // Worker 1's pid: ask it.
        let mut pid = None;
        for _ in 0..20 {
            let r = get(cluster.addr(), "/").unwrap();
            if r.worker() == 1 {
                pid = Some(r.pid());
                break;
            }
        }
        pid.expect("worker 1 answered one of 20")
    };
    assert!(pids.contains(&stopped));
    common::kill(stopped, libc::SIGSTOP);
    // kill(2) returns before the target stops; until it has, it may still take connections.
    common::wait_stopped(stopped);
    let pending: Vec<TcpStream> = (0..20)
        .map(|_| send_request(cluster.addr(), "/").unwrap())
        .collect();
    // About half of them wait in the stopped worker's queue (its load counts them): 9 or 10,
    // by how round-robin's ties fell for the requests that found the pid.
    let status = steering_status(&cluster, 2);
    assert!(
        status[1].1 >= 9,
        "worker 1 holds too few to test: {status:?}"
    );
    // Scale down: the last slot (worker 1) becomes ineligible, is SIGKILLed after --grace, and
    // its listener closes; the program re-places its queue on worker 0.
    cluster.signal(libc::SIGTTOU);
    cluster.wait_for_log(&format!("(pid {stopped}) exited"), DEADLINE);
    let results: Vec<_> = pending.into_iter().map(read_response).collect();
    let counts = per_worker(&results);
    assert_eq!(counts.get(&0), Some(&20), "{counts:?}");
}

#[test]
fn a_stalled_worker_is_passed_over_and_replaced() {
    if !steering_available() {
        return;
    }
    let cluster = start_steered(
        &[
            "--steer",
            "kernel",
            "-w",
            "2",
            "--stall-timeout",
            "500ms",
            "--grace",
            "1s",
        ],
        2,
    );
    let stopped = (0..40)
        .map(|_| get(cluster.addr(), "/").unwrap())
        .find(|r| r.worker() == 1)
        .expect("worker 1 answered one of 40")
        .pid();
    // Stopped in its wait for events (not on the way back to it, where its loop would look
    // busy and the program would spill its share to the overflow queue instead).
    common::wait_in_epoll_wait(stopped);
    common::kill(stopped, libc::SIGSTOP);
    // Some of these wait in the stopped worker's queue (until its load shows them).
    let pending: Vec<TcpStream> = (0..20)
        .map(|_| send_request(cluster.addr(), "/").unwrap())
        .collect();
    // Found stalled (by the table's counts or by the accept-queue watch), its slot leaves the
    // table and the worker is replaced.
    cluster.wait_for_log(&format!("replacing worker 1 (pid {stopped})"), DEADLINE);
    cluster.wait_for_log("steering: slot 1 ineligible", DEADLINE);
    // Every request is answered: the replacement takes the queue the master kept.
    let results: Vec<_> = pending.into_iter().map(read_response).collect();
    assert_eq!(per_worker(&results).values().sum::<usize>(), 20);
    cluster.wait_for_log(&format!("(pid {stopped}) exited"), DEADLINE);
}

/// A loopback address of this test process's own (127.N.N.1 from its pid, never 127.0.0.1), as
/// the source of abandoned handshakes: a SYN from 127.0.0.1 could match a connection an earlier
/// test left in TIME_WAIT on the same four-tuple, and such a SYN is answered by that socket
/// without reaching the listener's program.
fn private_loopback_source() -> std::net::Ipv4Addr {
    let pid = std::process::id();
    std::net::Ipv4Addr::new(127, 100 + (pid % 100) as u8, (pid / 100 % 256) as u8, 1)
}

/// Sends one TCP SYN from a raw socket bound to `src`, from a port nobody listens on: the
/// SYN-ACK is answered with a reset, so the handshake is abandoned after the program placed it.
fn abandoned_syn(raw: &socket2::Socket, src: std::net::Ipv4Addr, to: SocketAddr, src_port: u16) {
    let std::net::SocketAddr::V4(to4) = to else {
        panic!("IPv4 only")
    };
    let src = src.octets();
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&to.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    // Checksum over the pseudo header and the segment.
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for pair in b.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&src);
    add(&to4.ip().octets());
    add(&[0, libc::IPPROTO_TCP as u8]);
    add(&(tcp.len() as u16).to_be_bytes());
    add(&tcp);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    raw.send_to(&tcp, &to.into()).unwrap();
}

#[test]
fn abandoned_handshakes_are_written_off() {
    if !steering_available() {
        return;
    }
    let raw = match socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::TCP),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("note: no raw socket ({e}); skipping this test");
            return;
        }
    };
    let src = private_loopback_source();
    raw.bind(&SocketAddr::from((src, 0)).into())
        .unwrap_or_else(|e| panic!("binding the raw socket to {src}: {e}"));
    let cluster = TestCluster::start(&["--steer", "kernel", "-w", "2"]);
    // A request first, so both workers have said they report.
    for _ in 0..4 {
        get(cluster.addr(), "/").unwrap();
    }
    for i in 0..100u16 {
        abandoned_syn(&raw, src, cluster.addr(), 40_000 + i);
    }
    // Every placement above is reconciled away within a few periods: each slot's load
    // returns to what is really open (nothing) and the write-offs add up to the SYNs (some
    // placed on the overflow queue once both slots had a placement untaken for 1 ms).
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = steering_status(&cluster, 2);
        let overflow = cluster.overflow_status();
        let forgiven: i64 = status.iter().map(|s| s.2).sum::<i64>() + overflow.forgiven;
        if status.iter().all(|s| s.1 == 0) && forgiven == 100 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "placements not reconciled: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And the steering still places by real load.
    let results: Vec<_> = (0..10).map(|_| get(cluster.addr(), "/")).collect();
    assert_eq!(per_worker(&results).values().sum::<usize>(), 10);
}

/// `setpriv ARGS --`, as the words to put before a command, where setpriv can do that here;
/// prints a note otherwise, so the caller can skip.
fn setpriv(args: &[&'static str]) -> Option<Vec<&'static str>> {
    let ok = Command::new("setpriv")
        .args(args)
        .args(["--", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "note: setpriv {} does not work here; skipping this test",
            args.join(" ")
        );
        return None;
    }
    Some([&["setpriv"][..], args, &["--"][..]].concat())
}

/// A command running `words`, then the binary under test.
fn command_then_bin(words: &[&str]) -> Command {
    let mut cmd = Command::new(words[0]);
    cmd.args(&words[1..]).arg(common::BIN);
    cmd
}

/// Whether this kernel's release (`/proc/sys/kernel/osrelease`) is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

/// `setpriv` that drops CAP_BPF and CAP_SYS_ADMIN from the bounding set, so the exec'd master
/// (root or not) has neither.
fn without_cap_bpf() -> Option<Command> {
    setpriv(&["--bounding-set", "-bpf,-sys_admin"]).map(|words| command_then_bin(&words))
}

#[test]
fn cap_bpf_alone_is_enough() {
    if !steering_available() {
        return;
    }
    let Some(words) = setpriv(&["--bounding-set", "-all,+bpf"]) else {
        return;
    };
    let cmd = command_then_bin(&words);
    let cluster = TestCluster::spawn_with_command(cmd, &["--steer", "kernel", "-w", "2"]);
    cluster.wait_for_log("workers ready", DEADLINE);
    assert!(cluster.log_contains("steering: kernel"));
    // The verifier is stricter without CAP_PERFMON and CAP_SYS_ADMIN: the bpf_loop build must
    // still load wherever the kernel has bpf_loop.
    if kernel_at_least(5, 17) {
        assert!(
            !cluster.log_contains("refused the bpf_loop build"),
            "{:?}",
            cluster.log_lines()
        );
    }
    let results: Vec<_> = (0..10).map(|_| get(cluster.addr(), "/")).collect();
    assert_eq!(per_worker(&results).values().sum::<usize>(), 10);
    // The workers map the table and count on it.
    let before = cluster.log_lines().len();
    steering_status(&cluster, 2);
    let lines = cluster.log_lines();
    assert!(
        lines[before..]
            .iter()
            .filter(|l| l.contains("status: steering slot"))
            .all(|l| !l.contains("does not report")),
        "{lines:?}"
    );
}

/// A SIGTERM that comes while the master loads the steering program (its first bpf object
/// exists, the program is not yet verified) is obeyed once the master runs: exit code 0, not
/// death by the signal.
#[test]
fn a_stop_while_the_program_loads_is_obeyed() {
    if !steering_available() {
        return;
    }
    /// Ends the master and any worker it started, if the test fails before it stops.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            if let Ok(None) = self.0.try_wait() {
                for worker in common::children_of(self.0.id() as i32) {
                    common::kill(worker, libc::SIGKILL);
                }
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut master = Reap(
        Command::new(common::BIN)
            .args(["--steer", "kernel", "-w", "1", "--listen", "127.0.0.1:0"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = master.0.id();
    let has_bpf_object = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .any(|l| l.to_string_lossy().starts_with("anon_inode:bpf"))
    };
    let deadline = Instant::now() + DEADLINE;
    while !has_bpf_object() {
        assert!(Instant::now() < deadline, "no bpf object appeared");
        std::thread::yield_now();
    }
    common::kill(pid as i32, libc::SIGTERM);
    let status = loop {
        if let Some(status) = master.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the master did not stop");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn without_cap_bpf_auto_falls_back_and_kernel_fails() {
    let Some(mut cmd) = without_cap_bpf() else {
        return;
    };
    // --steer kernel: a clear error, exit 1.
    let out = cmd
        .args(["--steer", "kernel", "-w", "1", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--steer kernel") && stderr.contains("CAP_BPF"),
        "{stderr}"
    );

    // auto: one line says why, and dispatch serves.
    let cluster = TestCluster::spawn_with_command(
        without_cap_bpf().unwrap(),
        &["--steer", "auto", "-w", "2", "--listen", "127.0.0.1:0"],
    );
    cluster.wait_for_log("workers ready", DEADLINE);
    assert!(cluster.log_contains("steering: dispatch, kernel steering unavailable"));
    assert!(cluster.log_contains("mode dispatch"));
    let results: Vec<_> = (0..10).map(|_| get(cluster.addr(), "/")).collect();
    assert_eq!(per_worker(&results).values().sum::<usize>(), 10);
}

/// Bits of the `Cap*:` line `field` (`CapEff`, `CapPrm`, ...) of process `pid`.
fn capabilities(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// What each of process `pid`'s fds is (`/proc/PID/fd` links).
fn fd_links(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .collect()
}

/// A master with `args` under `steer-load` (root here), which loads the programs, drops its
/// capabilities and execs setpriv, which empties the bounding, inheritable and ambient sets
/// before it execs the master: the master, root or not, holds no capability at all. `None`
/// (with a note) where setpriv cannot do that.
fn master_without_capabilities(args: &[&str]) -> Option<TestCluster> {
    let words = setpriv(&[
        "--bounding-set",
        "-all",
        "--inh-caps",
        "-all",
        "--ambient-caps",
        "-all",
    ])?;
    let mut cmd = Command::new(common::BIN);
    cmd.args(["steer-load", "--"]).args(&words).arg(common::BIN);
    Some(TestCluster::spawn_with_command(cmd, args))
}

#[test]
fn a_program_passed_in_steers_a_master_without_cap_bpf() {
    if !steering_available() {
        return;
    }
    let Some(cluster) = master_without_capabilities(&["--steer", "kernel", "-w", "2"]) else {
        return;
    };
    cluster.wait_for_log("workers ready", DEADLINE);
    assert!(cluster.log_contains("steer-load: steering program loaded for 1 listening address"));
    assert!(cluster.log_contains(
        "steering: kernel: an SK_REUSEPORT program passed in by steer-load (RCLUSTER_STEER_FDS)"
    ));
    for field in ["CapEff", "CapPrm", "CapBnd"] {
        let caps = capabilities(cluster.pid(), field);
        assert_eq!(
            caps & ((1 << CAP_BPF) | (1 << CAP_SYS_ADMIN)),
            0,
            "the master's {field} is {caps:#x}"
        );
    }
    // Steered, served, and counted on the table the program places by.
    cluster.wait_for_log("steering: slot 1 eligible", DEADLINE);
    let results: Vec<_> = (0..30).map(|_| get(cluster.addr(), "/")).collect();
    assert_eq!(per_worker(&results).values().sum::<usize>(), 30);
    wait_counted_once(&cluster, 2, 30);
    // No worker inherits a program, a map other than the table, or the variable.
    for pid in cluster.wait_for_workers(2) {
        let links = fd_links(pid);
        let count = |what: &str| links.iter().filter(|l| l.as_str() == what).count();
        assert_eq!(count("anon_inode:bpf-prog"), 0, "worker {pid}: {links:?}");
        assert!(count("anon_inode:bpf-map") <= 1, "worker {pid}: {links:?}");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(
            !String::from_utf8_lossy(&environ).contains("RCLUSTER_STEER_FDS="),
            "worker {pid} got RCLUSTER_STEER_FDS"
        );
    }
}

/// `steer-load` passes plain `reuseport` mode's program on too: a master without any
/// capability, run with `--policy reuseport`, adopts it, and from the moment a slot is removed
/// its socket gets no new connection although its stopped worker keeps it in the kernel's
/// group (without the program about half of these requests would wait there, unanswered).
#[test]
fn a_spread_program_passed_in_serves_a_reuseport_master_without_cap_bpf() {
    if let Err(e) = rcluster_lb::steer::spread::Spread::load(1) {
        eprintln!("note: the spread program does not load here ({e}); skipping this test");
        return;
    }
    let Some(cluster) =
        master_without_capabilities(&["--policy", "reuseport", "-w", "2", "--grace", "60s"])
    else {
        return;
    };
    cluster.wait_for_log("workers ready", DEADLINE);
    assert!(cluster.log_contains("RCLUSTER_SPREAD_FDS=select"));
    assert!(cluster.log_contains(
        "spreads connections over the worker slots in service (a removed slot's socket gets \
         none while its worker drains)"
    ));
    assert!(cluster.log_contains("(program passed in by steer-load, RCLUSTER_SPREAD_FDS)"));
    assert!(cluster.log_contains("RCLUSTER_STEER_FDS unused: --policy reuseport"));
    let caps = capabilities(cluster.pid(), "CapEff");
    assert_eq!(caps & (1 << CAP_BPF), 0, "the master's CapEff is {caps:#x}");
    let served = common::get_many(cluster.addr(), "/", 40, 2);
    let pid_of = |worker| {
        served
            .iter()
            .flatten()
            .find(|r| r.worker() == worker)
            .unwrap_or_else(|| panic!("worker {worker} answered none"))
            .pid()
    };
    let (kept, removed) = (pid_of(0), pid_of(1));
    kill(removed, libc::SIGSTOP);
    common::wait_stopped(removed);
    cluster.signal(libc::SIGTTOU);
    // Logged once the master has handled the removal.
    cluster.wait_for_log("still queued on worker 1's own socket", DEADLINE);
    for i in 0..40 {
        let r = common::get_with_timeout(cluster.addr(), "/", Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("request {i} after the scale-down failed: {e}"));
        assert_eq!(r.worker(), 0, "request {i}");
    }
    assert!(common::alive(removed), "the removed worker still drains");
    // No worker inherits a program or the variables.
    let pid = kept;
    let links = fd_links(pid);
    assert!(
        !links.iter().any(|l| l.starts_with("anon_inode:bpf")),
        "worker {pid}: {links:?}"
    );
    let environ = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap())
        .into_owned();
    for var in ["RCLUSTER_STEER_FDS=", "RCLUSTER_SPREAD_FDS="] {
        assert!(!environ.contains(var), "worker {pid} got {var}");
    }
    // Spare the grace period.
    kill(removed, libc::SIGKILL);
    cluster.wait_for_log(&format!("(pid {removed}) exited"), DEADLINE);
}

#[test]
fn a_program_passed_in_must_match_the_listeners() {
    if !steering_available() {
        return;
    }
    let out = Command::new(common::BIN)
        .args(["steer-load", "--listeners", "1", "--", common::BIN])
        .args(["--steer", "kernel", "-w", "1"])
        .args(["--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("programs for 1 listening address passed in")
            && stderr.contains("the master listens on 2"),
        "{stderr}"
    );
}

/// The master under `sh`, with `/dev/null` at fd 9 and `RCLUSTER_STEER_FDS` naming fds 9..12:
/// not BPF objects.
fn with_bogus_steer_fds() -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "exec \"$@\" 9</dev/null", "sh", common::BIN])
        .env("RCLUSTER_STEER_FDS", "select-or-migrate:9,10,11,12");
    cmd
}

#[test]
fn a_bogus_program_passed_in_is_refused_or_falls_back() {
    // --steer kernel: one line naming the variable and the fd, exit 2.
    let out = with_bogus_steer_fds()
        .args(["--steer", "kernel", "-w", "1", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let error: Vec<&str> = stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(error.len(), 1, "{stderr}");
    assert!(
        error[0].contains("--steer kernel: RCLUSTER_STEER_FDS: fd 9 is not a BPF map (/dev/null)"),
        "{stderr}"
    );

    // auto: a warning, and dispatch serves.
    let cluster = TestCluster::spawn_with_command(
        with_bogus_steer_fds(),
        &["--steer", "auto", "-w", "2", "--listen", "127.0.0.1:0"],
    );
    cluster.wait_for_log("workers ready", DEADLINE);
    assert!(cluster.log_contains(
        "steering: dispatch, the steering program passed in is unusable: RCLUSTER_STEER_FDS: \
         fd 9 is not a BPF map"
    ));
    assert!(cluster.log_contains("mode dispatch"));
    let results: Vec<_> = (0..10).map(|_| get(cluster.addr(), "/")).collect();
    assert_eq!(per_worker(&results).values().sum::<usize>(), 10);
}

/// A worker that says it watches the overflow queue, looks stuck, and takes nothing from it:
/// `$1/liedN` not yet there, it keeps writing a watcher and an ancient `busy_ns` into its slot's
/// line (docs/PROTOCOL.md §7) and serves only its own listener; otherwise (its replacement) it also
/// accepts from the overflow queue, as a watcher must.
const LIAR: &str = r#"
import mmap, os, select, socket, struct, sys
slot = int(os.environ["RCLUSTER_WORKER_ID"])
marker = os.path.join(sys.argv[1], "lied%d" % slot)
lie = not os.path.exists(marker)
if lie:
    open(marker, "w").close()
table = mmap.mmap(int(os.environ["RCLUSTER_STEER_FD"]), 65536)
own = socket.socket(fileno=3)
queue = socket.socket(fileno=int(os.environ["RCLUSTER_STEER_OVERFLOW_FD"]))
socks = [own] if lie else [own, queue]
while True:
    if lie:
        # Again and again: the master clears busy_ns when the slot becomes eligible.
        struct.pack_into("<I", table, 64 * slot + 36, 2 | 0x100)
        struct.pack_into("<Q", table, 64 * slot + 56, 1)
    ready, _, _ = select.select(socks, [], [], 0.05)
    for s in ready:
        try:
            c, _ = s.accept()
        except BlockingIOError:
            continue
        c.setblocking(True)
        if s is queue:
            # A connection taken from the queue: this slot's (assigned and accepted here) and
            # taken from the queue's line (1023). Single writers here, so plain adds.
            for off in (64 * slot, 64 * slot + 8, 64 * 1023 + 8):
                (n,) = struct.unpack_from("<Q", table, off)
                struct.pack_into("<Q", table, off, n + 1)
        c.recv(4096)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
        c.close()
"#;

/// Workers that claim to watch the overflow queue while stuck, and take nothing from it: the
/// program spills to the queue, and after `--stall-timeout` the master replaces them instead of
/// giving up; the replacements take from the queue and every connection waiting there is
/// answered.
#[test]
fn lying_watchers_are_replaced_and_the_overflow_queue_is_served() {
    if !steering_available() || !common::available("python3") {
        return;
    }
    let dir = common::TempDir::new("liar");
    let script = dir.write("liar.py", LIAR);
    let cluster = start_table_writers(
        &["--stall-timeout", "1s"],
        &script,
        &[dir.path().to_str().unwrap()],
    );
    // Both slots look stuck and watch (the liars write it again every 50 ms: the master clears
    // busy_ns when a slot becomes eligible): what comes now waits in the overflow queue.
    let deadline = Instant::now() + DEADLINE;
    while !cluster
        .steering_status(2)
        .iter()
        .all(|s| s.stuck && s.watches)
    {
        assert!(Instant::now() < deadline, "the liars never looked stuck");
        std::thread::sleep(Duration::from_millis(50));
    }
    let waiting: Vec<TcpStream> = (0..3)
        .map(|_| send_request(cluster.addr(), "/").expect("request"))
        .collect();
    cluster.wait_for_log("watches the overflow queue but took none", DEADLINE);
    assert!(cluster.overflow_status().assigned >= 3);
    for s in waiting {
        let r = read_response(s).expect("a connection that waited in the overflow queue");
        assert_eq!(r.status, 200);
    }
    let after = cluster.overflow_status();
    assert_eq!(after.accepted, 3, "{after:?}");
}

/// A worker that writes another slot's line: on `GET /lie` the worker of slot 0 stores 0 in
/// slot 1's `eligible` word (the master's field; docs/PROTOCOL.md §7), once; every request is
/// answered with the slot in `X-Worker-Id`.
const TAMPERER: &str = r#"
import mmap, os, socket, struct
slot = int(os.environ["RCLUSTER_WORKER_ID"])
table = mmap.mmap(int(os.environ["RCLUSTER_STEER_FD"]), 65536)
own = socket.socket(fileno=3)
own.setblocking(True)
while True:
    c, _ = own.accept()
    head = c.makefile("rb")
    request_line = head.readline()
    while head.readline() not in (b"\r\n", b""):
        pass
    if slot == 0 and request_line.startswith(b"GET /lie "):
        struct.pack_into("<I", table, 64 * 1 + 32, 0)
    c.sendall(b"HTTP/1.1 200 OK\r\nX-Worker-Id: %d\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n" % slot)
    head.close()
    c.close()
"#;

/// `eligible` is the master's to write, but every worker maps the whole table read-write: a
/// worker that marks another slot ineligible has the word put back within the reconcile period
/// (logged), and the other slot gets connections again. Without that, slot 1 would get none
/// for as long as its worker lives.
#[test]
fn a_worker_that_marks_another_slot_ineligible_is_overruled() {
    if !steering_available() || !common::available("python3") {
        return;
    }
    let dir = common::TempDir::new("tamper");
    let script = dir.write("tamper.py", TAMPERER);
    let cluster = start_table_writers(&[], &script, &[]);
    // Until slot 0 got one (ties between equally loaded slots go by the connection's hash).
    let deadline = Instant::now() + DEADLINE;
    while get(cluster.addr(), "/lie").expect("GET /lie").worker() != 0 {
        assert!(Instant::now() < deadline, "slot 0 never got GET /lie");
    }
    cluster.wait_for_log(
        "steering: line 1 of the table was marked ineligible by something other than the master",
        DEADLINE,
    );
    let status = cluster.steering_status(2);
    assert!(status.iter().all(|s| s.eligible), "{status:?}");
    let results: Vec<_> = (0..20).map(|_| get(cluster.addr(), "/")).collect();
    let counts = per_worker(&results);
    assert_eq!(counts.values().sum::<usize>(), 20, "{counts:?}");
    assert!(
        counts.get(&1).copied().unwrap_or(0) > 0,
        "slot 1 got nothing: {counts:?}"
    );
}

/// A prefork server under the shim: the parent binds and listens but never waits on the
/// listener; it keeps two children, each serving three requests through `select` (which
/// watches the overflow queue) and then exiting normally (`exit(3)`), replaced at once.
const RECYCLER: &str = r#"
import ctypes, os, select, socket
s = socket.socket()
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen(128)
s.setblocking(False)

def child():
    served = 0
    while served < 3:
        if not select.select([s], [], [], 1.0)[0]:
            continue
        try:
            c, _ = s.accept()
        except BlockingIOError:
            continue
        c.setblocking(True)
        head = c.makefile("rb")
        while head.readline() not in (b"\r\n", b""):
            pass
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
        head.close()
        c.close()
        served += 1
    # exit(3) as a C server would: the listener stays open until the kernel closes it (Python's
    # own sys.exit would close it first, which withdraws the watch by itself).
    ctypes.CDLL(None).exit(0)

children = set()
while True:
    while len(children) < 2:
        pid = os.fork()
        if pid == 0:
            child()
        children.add(pid)
    pid, _ = os.wait()
    children.discard(pid)
"#;

/// Each process of a slot that watches the overflow queue adds one watcher to the slot's line;
/// one that exits normally withdraws it. A prefork server whose children come and go (here 2
/// at a time, about 15 in all) leaves only its live children's watchers, not one per child it
/// ever had.
#[test]
fn a_recycled_child_withdraws_its_watch_when_it_exits() {
    if !steering_available() || !common::available("python3") {
        return;
    }
    let dir = common::TempDir::new("recycle");
    let script = dir.write("recycle.py", RECYCLER);
    let cluster = start_steered(
        &["--steer", "kernel", "-w", "1", "--", "python3", &script],
        1,
    );
    for i in 0..30 {
        let r = get(cluster.addr(), "/").unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status, 200, "request {i}");
    }
    let status = cluster.steering_status(1);
    println!("after 30 requests: {status:?}");
    assert!(
        status[0].watchers <= 2,
        "watchers of children long gone are still counted: {status:?}"
    );
}
