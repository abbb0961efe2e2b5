//! Lifecycle under load: nothing the master accepted is lost across rolling reloads, recycling
//! (--max-conns), crashed, stopped and stalled workers, and scaling (SIGTTIN/SIGTTOU).
//!
//! Every test runs the real binary on port 0 with the built-in demo worker (through
//! [`common::TestCluster`], which kills and reaps everything on drop), drives bounded load at
//! 127.0.0.1, waits on log lines and process states with deadlines, and asserts counts. Each
//! prints its loss counts (`cargo test --test lifecycle -- --nocapture` shows them).

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{
    BIN, DEADLINE, Load, Response, Tally, TestCluster, fd_count, get, get_many, get_on, kill,
    read_one, read_response, send_on, send_request, stop_between_connections, thread_count,
    until_served_by, wait_stopped,
};

/// The two 20,000-connection tests take turns, so they do not starve each other (and the
/// lighter tests) on a 2-core machine.
static HEAVY_LOAD: Mutex<()> = Mutex::new(());

fn heavy_load() -> std::sync::MutexGuard<'static, ()> {
    HEAVY_LOAD.lock().unwrap_or_else(|e| e.into_inner())
}

fn assert_no_loss(what: &str, tally: &Tally, expected: usize) {
    println!("{what}: {}", tally.summary());
    assert_eq!(
        tally.errors(),
        0,
        "{what}: {}; first failures: {:?}",
        tally.summary(),
        tally.examples
    );
    assert_eq!(tally.ok, expected, "{what}: {}", tally.summary());
}

/// The slot of the worker with `pid`, from its "started" line.
fn slot_of(cluster: &TestCluster, pid: i32) -> usize {
    let line = cluster.wait_for_log(&format!(" started: pid {pid},"), DEADLINE);
    line.split("worker ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no slot in {line}"))
}

/// A `sh -c` worker command: the demo worker at generation 0, `later` (shell code) at every
/// later generation.
fn command_by_generation(later: &str) -> String {
    format!(r#"if [ "$RCLUSTER_GENERATION" = 0 ]; then exec "$0" demo-worker; fi; {later}"#)
}

#[test]
fn ten_rolling_reloads_under_load_lose_no_connection_and_old_worker_finishes_long_request() {
    const TOTAL: usize = 20_000;
    const RELOADS: u64 = 10;
    const EVERY: usize = 1_800;
    let _turn = heavy_load();
    let cluster = TestCluster::start(&["--workers", "2", "--grace", "5s"]);
    let addr = cluster.addr();
    let load = Load::start(addr, "/?us=50", TOTAL, 800.0, 16);

    let mut long = None;
    for generation in 1..=RELOADS {
        load.wait_completed(EVERY * generation as usize, Duration::from_secs(120));
        if generation > 1 {
            cluster.wait_for_log(
                &format!("reload to generation {} complete", generation - 1),
                DEADLINE,
            );
        }
        if generation == 1 {
            // A long request on a connection a generation-0 worker holds (it answered a first
            // request on it) when the reload starts: the worker is drained while the request
            // runs and must still answer it.
            let mut conn = std::net::TcpStream::connect(addr).expect("connect");
            conn.set_read_timeout(Some(DEADLINE)).unwrap();
            let first = get_on(&mut conn, "/", true).expect("first request");
            assert_eq!(first.generation(), 0);
            send_on(&mut conn, "/long?us=2000000", true).expect("long request");
            long = Some((first.pid(), std::thread::spawn(move || read_one(&mut conn))));
        }
        cluster.signal(libc::SIGHUP);
    }
    cluster.wait_for_log(
        &format!("reload to generation {RELOADS} complete"),
        DEADLINE,
    );
    let tally = load.join();
    assert_no_loss("10 reloads", &tally, TOTAL);
    assert!(
        tally.by_generation.len() >= 8,
        "load should have seen most generations: {:?}",
        tally.by_generation
    );

    let (holder, long) = long.expect("long request started");
    let long = long.join().unwrap().expect("long request answered");
    println!(
        "long request: status {}, generation {}, pid {} (held by {holder})",
        long.status,
        long.generation(),
        long.pid()
    );
    assert_eq!(long.status, 200, "{long:?}");
    assert_eq!(long.generation(), 0, "{long:?}");
    assert_eq!(long.pid(), holder, "{long:?}");
    assert!(
        cluster.log_contains(&format!(
            "draining worker {} (pid {holder}, generation 0)",
            long.worker()
        )),
        "the long request's worker was drained by the reload"
    );
    for r in get_many(addr, "/", 20, 2) {
        assert_eq!(r.expect("request after the reloads").generation(), RELOADS);
    }
}

#[test]
fn connections_queued_to_a_stopped_worker_are_answered_by_others_after_it_is_killed() {
    const CONNS: usize = 200;
    let cluster = TestCluster::start(&[
        "--steer",
        "dispatch",
        "--workers",
        "2",
        "--policy",
        "round-robin",
        "--grace",
        "2s",
    ]);
    let addr = cluster.addr();
    let pids = cluster.wait_for_workers(2);
    let victim = pids[0];
    kill(victim, libc::SIGSTOP);
    wait_stopped(victim);

    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let readers: Vec<_> = (0..CONNS)
        .map(|_| {
            let stream = send_request(addr, "/").expect("connect");
            let answered = std::sync::Arc::clone(&answered);
            std::thread::spawn(move || {
                let r = read_response(stream);
                answered.fetch_add(1, std::sync::atomic::Ordering::Release);
                r
            })
        })
        .collect();
    // Round-robin: the live worker answers its half while the other half waits unread in the
    // stopped worker's channel.
    let deadline = std::time::Instant::now() + DEADLINE;
    let queued = loop {
        let queued = cluster.dispatched_to(victim) as usize;
        let done = answered.load(std::sync::atomic::Ordering::Acquire);
        if queued + done == CONNS {
            break queued;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "queued {queued}, answered {done}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    println!("stopped worker {victim} has {queued} connections queued; killing it");
    assert!(
        (CONNS / 2 - 5..=CONNS / 2 + 5).contains(&queued),
        "round-robin split: {queued}"
    );
    kill(victim, libc::SIGKILL);

    let mut tally = Tally::default();
    for r in readers {
        tally.add(&r.join().unwrap());
    }
    assert_no_loss("stopped then killed worker", &tally, CONNS);
    assert!(!tally.by_pid.contains_key(&victim), "{:?}", tally.by_pid);
    cluster.wait_for_log(
        &format!("reclaimed {queued} queued connections from worker"),
        DEADLINE,
    );
    assert!(cluster.log_contains(&format!("(pid {victim}) exited unexpectedly")));
}

#[test]
fn max_conns_recycles_workers_many_times_without_losing_connections() {
    const TOTAL: usize = 20_000;
    let _turn = heavy_load();
    let cluster = TestCluster::start(&["--workers", "2", "--max-conns", "200", "--grace", "2s"]);
    let tally = Load::start(cluster.addr(), "/", TOTAL, 1500.0, 16).join();
    let recycled = cluster.log_count("it reached --max-conns");
    println!(
        "max-conns 200: {recycled} recycles, {} distinct workers served",
        tally.by_pid.len()
    );
    assert_no_loss("max-conns 200", &tally, TOTAL);
    // 20,000 / 200 = 100 worker lifetimes' worth; a replacement keeps taking connections until
    // it is ready, so a few lifetimes run long.
    assert!(recycled >= 50, "only {recycled} recycles");
    assert!(
        tally.by_pid.len() >= 50,
        "only {} workers served",
        tally.by_pid.len()
    );
    assert!(cluster.log_count("draining worker") >= 50);
}

#[test]
fn reload_whose_replacement_exits_is_aborted_and_old_workers_keep_serving() {
    let script = command_by_generation("exit 3");
    let mut cluster = TestCluster::start(&[
        "--workers",
        "2",
        "--grace",
        "2s",
        "--no-preload",
        "--",
        "sh",
        "-c",
        &script,
        BIN,
    ]);
    let before = cluster.wait_for_workers(2);
    let load = Load::start(cluster.addr(), "/", 3_000, 600.0, 8);
    load.wait_completed(500, DEADLINE);
    cluster.signal(libc::SIGHUP);
    cluster.wait_for_log(
        "reload aborted: a replacement exited before it was ready",
        DEADLINE,
    );
    load.wait_completed(1_500, DEADLINE);
    cluster.signal(libc::SIGHUP);
    cluster.wait_for_count("reload aborted", 2, DEADLINE);
    let tally = load.join();
    assert_no_loss("aborted reloads (replacement exits)", &tally, 3_000);
    assert_eq!(
        tally.by_generation.keys().copied().collect::<Vec<_>>(),
        vec![0]
    );
    assert!(cluster.is_running());
    assert_eq!(
        cluster.wait_for_workers(2),
        before,
        "the old workers keep serving"
    );
    assert!(!cluster.log_contains("complete"));
}

#[test]
fn reload_whose_replacement_never_gets_ready_is_aborted_and_old_workers_keep_serving() {
    let script = command_by_generation("exec sleep 60");
    let mut cluster = TestCluster::start(&[
        "--workers",
        "2",
        "--grace",
        "2s",
        "--ready-timeout",
        "1s",
        "--no-preload",
        "--",
        "sh",
        "-c",
        &script,
        BIN,
    ]);
    let before = cluster.wait_for_workers(2);
    let load = Load::start(cluster.addr(), "/", 2_000, 600.0, 8);
    load.wait_completed(300, DEADLINE);
    cluster.signal(libc::SIGHUP);
    cluster.wait_for_log(
        "reload aborted: a replacement was not ready within --ready-timeout",
        DEADLINE,
    );
    let tally = load.join();
    assert_no_loss("aborted reload (replacement never ready)", &tally, 2_000);
    assert_eq!(
        tally.by_generation.keys().copied().collect::<Vec<_>>(),
        vec![0]
    );
    assert!(cluster.is_running());
    assert_eq!(
        cluster.wait_for_workers(2),
        before,
        "the replacement was killed"
    );
}

#[test]
fn sighup_during_a_reload_queues_exactly_one_more() {
    // Later generations take a while to start, so the reload is still running when the
    // next SIGHUPs arrive.
    let script = command_by_generation(r#"sleep 1; exec "$0" demo-worker"#);
    let cluster = TestCluster::start(&[
        "--workers",
        "2",
        "--grace",
        "2s",
        "--no-preload",
        "--",
        "sh",
        "-c",
        &script,
        BIN,
    ]);
    cluster.signal(libc::SIGHUP);
    cluster.wait_for_log("rolling reload to generation 1", DEADLINE);
    cluster.signal(libc::SIGHUP);
    cluster.signal(libc::SIGHUP);
    cluster.signal(libc::SIGHUP);
    cluster.wait_for_log("one more reload queued", DEADLINE);
    cluster.wait_for_log("reload to generation 1 complete", DEADLINE);
    cluster.wait_for_log("reload to generation 2 complete", DEADLINE);
    // The status lines come after anything the end of the reload logged.
    cluster.signal(libc::SIGUSR1);
    cluster.wait_for_count("status: worker", 2, DEADLINE);
    assert!(!cluster.log_contains("generation 3"));
    assert_eq!(cluster.log_count("one more reload queued"), 1);
    // In the kernel modes a drained worker shares its slot's listener with its replacement
    // until it exits: the requests below are for generation 2 alone once the four workers of
    // generations 0 and 1 are gone.
    cluster.wait_for_count(") exited: exit code 0", 4, DEADLINE);
    for r in get_many(cluster.addr(), "/", 10, 2) {
        assert_eq!(r.expect("request after the reloads").generation(), 2);
    }
}

#[test]
fn hundred_reloads_leave_master_fd_and_thread_counts_unchanged() {
    const RELOADS: usize = 100;
    let cluster = TestCluster::start(&["--steer", "dispatch", "--workers", "2", "--grace", "2s"]);
    let master = cluster.pid();
    // After reload n: its line is logged, both old workers were reaped, and the acceptor has
    // closed their channels.
    let settle = |n: usize| {
        cluster.wait_for_log(&format!("reload to generation {n} complete"), DEADLINE);
        cluster.wait_for_count(") exited: ", 2 * n, DEADLINE);
        cluster.wait_for_workers(2);
        cluster.sync_acceptor();
    };
    // The master reads /proc briefly (RSS every --rss-interval, 100 ms): a single read of its
    // fd table can include such a file. The baseline is the smallest of 20 reads in a row, and
    // the count after the reloads must come back to it within DEADLINE (a leaked fd never
    // does).
    let steady_fds = || (0..20).map(|_| fd_count(master)).min().unwrap_or(0);
    cluster.signal(libc::SIGHUP);
    settle(1);
    let (fds, threads) = (steady_fds(), thread_count(master));
    for n in 2..=RELOADS {
        cluster.signal(libc::SIGHUP);
        cluster.wait_for_log(&format!("reload to generation {n} complete"), DEADLINE);
    }
    settle(RELOADS);
    println!(
        "master after 1 reload: {fds} fds, {threads} threads; after {RELOADS}: {} fds, {} threads",
        fd_count(master),
        thread_count(master)
    );
    let deadline = Instant::now() + DEADLINE;
    while steady_fds() != fds && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(steady_fds(), fds, "fds leaked over {RELOADS} reloads");
    assert_eq!(
        thread_count(master),
        threads,
        "threads leaked over {RELOADS} reloads"
    );
    // Both new workers serve.
    until_served_by(cluster.addr(), "/", &[0, 1], 2);
}

#[test]
fn ttin_and_ttou_add_and_drain_workers_without_losing_connections() {
    let cluster = TestCluster::start(&["--workers", "2", "--grace", "2s"]);
    let load = Load::start(cluster.addr(), "/?us=200", 6_000, 600.0, 8);
    let steps = [
        (libc::SIGTTIN, 3),
        (libc::SIGTTIN, 4),
        (libc::SIGTTOU, 3),
        (libc::SIGTTOU, 2),
    ];
    for (i, (sig, workers)) in steps.into_iter().enumerate() {
        load.wait_completed(1_000 * (i + 1), DEADLINE);
        cluster.signal(sig);
        cluster.wait_for_workers(workers);
    }
    let tally = load.join();
    assert_no_loss("SIGTTIN/SIGTTOU", &tally, 6_000);
    assert!(
        tally.by_worker.contains_key(&2) && tally.by_worker.contains_key(&3),
        "{:?}",
        tally.by_worker
    );
    // Removed workers were drained and exited on their own, not killed.
    for slot in [3, 2] {
        cluster.wait_for_log(&format!("SIGTTOU: removing worker {slot}"), DEADLINE);
        let drained = cluster.wait_for_log(&format!("draining worker {slot} (pid "), DEADLINE);
        let pid = drained
            .split("(pid ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap();
        cluster.wait_for_log(
            &format!("worker {slot} (pid {pid}) exited: exit code 0"),
            DEADLINE,
        );
    }
    assert!(!cluster.log_contains("SIGKILL"));
}

#[test]
fn stalled_worker_is_replaced_and_its_queued_connections_served_elsewhere() {
    let cluster = TestCluster::start(&[
        "--steer",
        "dispatch",
        "--workers",
        "2",
        "--policy",
        "round-robin",
        "--stall-timeout",
        "1s",
        "--grace",
        "2s",
    ]);
    let addr = cluster.addr();
    let victim = cluster.wait_for_workers(2)[0];
    let slot = slot_of(&cluster, victim);
    kill(victim, libc::SIGSTOP);
    wait_stopped(victim);
    // Connections until the stopped worker's channel has been full for the stall timeout.
    let mut streams = Vec::new();
    while cluster
        .poll_log("it stopped accepting", Duration::from_millis(50))
        .is_none()
    {
        assert!(streams.len() < 8_000, "channel never filled");
        for _ in 0..25 {
            streams.push(send_request(addr, "/").expect("connect"));
        }
    }
    let sent = streams.len();
    let reclaimed_line = cluster.wait_for_log(
        &format!("queued connections from worker {slot} (pid {victim})"),
        DEADLINE,
    );
    cluster.wait_for_log(
        &format!("replacing worker {slot} (pid {victim}): it stopped accepting"),
        DEADLINE,
    );
    let mut tally = Tally::default();
    for s in streams {
        tally.add(&read_response(s));
    }
    println!("stalled worker: {sent} connections sent; {reclaimed_line}");
    assert_no_loss("stalled worker", &tally, sent);
    assert!(!tally.by_pid.contains_key(&victim));
    // The stopped worker ignored the drain signal and was killed after the grace period.
    cluster.wait_for_log(&format!("worker {slot} (pid {victim}) exited"), DEADLINE);
    assert_eq!(cluster.wait_for_workers(2).len(), 2);
}

#[test]
fn crashed_worker_is_restarted_alone_and_service_continues() {
    let cluster = TestCluster::start(&["--workers", "3", "--grace", "2s"]);
    let before = cluster.wait_for_workers(3);
    let victim = before[1];
    kill(victim, libc::SIGKILL);
    cluster.wait_for_log(&format!("(pid {victim}) exited unexpectedly"), DEADLINE);
    let deadline = std::time::Instant::now() + DEADLINE;
    let after = loop {
        let now = cluster.worker_pids();
        if now.len() == 3 && !now.contains(&victim) {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no replacement: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    for pid in [before[0], before[2]] {
        assert!(
            after.contains(&pid),
            "worker {pid} was restarted too: {before:?} -> {after:?}"
        );
    }
    cluster.wait_for_count(" ready: pid ", 4, DEADLINE);
    let mut tally = Tally::default();
    for r in get_many(cluster.addr(), "/", 300, 4) {
        tally.add(&r);
    }
    assert_no_loss("after a crash", &tally, 300);
    assert!(!tally.by_pid.contains_key(&victim));
    assert_eq!(cluster.log_count("exited unexpectedly"), 1);
    let _ = get(cluster.addr(), "/").expect("still serving");
}

#[test]
fn sigttou_during_a_reload_drains_a_worker_the_reload_then_skips_and_completes() {
    // Later generations take a while to start, so the reload is still running at SIGTTOU.
    let script = command_by_generation(r#"sleep 1; exec "$0" demo-worker"#);
    let cluster = TestCluster::start(&[
        "--workers",
        "3",
        "--grace",
        "10s",
        "--no-preload",
        "--",
        "sh",
        "-c",
        &script,
        BIN,
    ]);
    // The removed worker is still draining when the reload comes to it (stopped, it ignores
    // the drain signal until the grace period ends).
    let line = cluster.wait_for_log("worker 2 started: pid ", DEADLINE);
    let removed: i32 = line
        .split("pid ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let load = Load::start(cluster.addr(), "/", 3_000, 500.0, 8);
    load.wait_completed(300, DEADLINE);
    cluster.signal(libc::SIGHUP);
    cluster.wait_for_log("replacing worker", DEADLINE);
    // Not while it serves a request: that one would be cut when the grace period ends, the
    // one loss no balancer can prevent (the worker took it, then stopped).
    stop_between_connections(removed);
    cluster.signal(libc::SIGTTOU);
    cluster.wait_for_log("SIGTTOU: removing worker 2", DEADLINE);
    cluster.wait_for_log("reload to generation 1 complete", DEADLINE);
    let tally = load.join();
    assert_no_loss("SIGTTOU during a reload", &tally, 3_000);
    assert!(!cluster.log_contains("reload aborted"));
    // Spare the grace period: the removed worker would be SIGKILLed after it anyway.
    kill(removed, libc::SIGKILL);
    cluster.wait_for_workers(2);
    let served = get_many(cluster.addr(), "/", 20, 2);
    for r in &served {
        assert_eq!(
            r.as_ref().expect("request after the reload").generation(),
            1
        );
    }
}

#[test]
fn sigttou_of_the_slot_a_reload_is_replacing_completes_the_reload() {
    // Later generations take a while to start, so slot 2's replacement is still starting when
    // SIGTTOU removes slot 2.
    let script = command_by_generation(r#"sleep 1; exec "$0" demo-worker"#);
    let cluster = TestCluster::start(&[
        "--workers",
        "3",
        "--grace",
        "2s",
        "--ready-timeout",
        "20s",
        "--no-preload",
        "--",
        "sh",
        "-c",
        &script,
        BIN,
    ]);
    let load = Load::start(cluster.addr(), "/", 3_000, 500.0, 8);
    load.wait_completed(300, DEADLINE);
    cluster.signal(libc::SIGHUP);
    cluster.wait_for_log("replacing worker 2 ", DEADLINE);
    cluster.signal(libc::SIGTTOU);
    cluster.wait_for_log("SIGTTOU: removing worker 2", DEADLINE);
    // Well before --ready-timeout would end a replacement that is waited for in vain.
    cluster.wait_for_log("reload to generation 1 complete", Duration::from_secs(10));
    let tally = load.join();
    assert_no_loss("SIGTTOU of the slot being replaced", &tally, 3_000);
    assert!(!cluster.log_contains("reload aborted"));
    cluster.wait_for_workers(2);
    for r in get_many(cluster.addr(), "/", 20, 2) {
        let r = r.expect("request after the reload");
        assert_eq!(r.generation(), 1);
        assert!(r.worker() < 2, "slot 2 was removed: {r:?}");
    }
}

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("rcluster-lifecycle-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes an executable `sh` script.
fn write_script(path: &std::path::Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    // Written beside and renamed over, so a worker being exec'd never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).expect("install script");
}

#[test]
fn max_rss_recycles_only_the_big_worker_gracefully() {
    let cluster = TestCluster::start(&[
        "--workers",
        "2",
        "--grace",
        "2s",
        "--max-rss",
        "48MiB",
        "--rss-interval",
        "50ms",
    ]);
    let load = Load::start(cluster.addr(), "/", 2_000, 500.0, 8);
    load.wait_completed(300, DEADLINE);
    let big = get(cluster.addr(), "/?alloc=64").expect("alloc request");
    assert_eq!(big.status, 200, "{big:?}");
    let (slot, pid) = (big.worker(), big.pid());
    cluster.wait_for_log(
        &format!("replacing worker {slot} (pid {pid}): its RSS exceeds --max-rss"),
        DEADLINE,
    );
    cluster.wait_for_log(&format!("draining worker {slot} (pid {pid}, "), DEADLINE);
    cluster.wait_for_log(
        &format!("worker {slot} (pid {pid}) exited: exit code 0"),
        DEADLINE,
    );
    let tally = load.join();
    assert_no_loss("max-rss", &tally, 2_000);
    assert_eq!(
        cluster.log_count("its RSS exceeds --max-rss"),
        1,
        "only the big worker"
    );
    assert_eq!(cluster.wait_for_workers(2).len(), 2);
}

#[test]
fn reload_batch_replaces_that_many_workers_at_a_time() {
    // Later generations take a while to start, so the batch is visible in the log.
    let script = command_by_generation(r#"sleep 1; exec "$0" demo-worker"#);
    let cluster = TestCluster::start(&[
        "--workers",
        "4",
        "--reload-batch",
        "2",
        "--grace",
        "2s",
        "--no-preload",
        "--",
        "sh",
        "-c",
        &script,
        BIN,
    ]);
    let load = Load::start(cluster.addr(), "/", 2_000, 500.0, 8);
    load.wait_completed(200, DEADLINE);
    cluster.signal(libc::SIGHUP);
    cluster.wait_for_log("reload to generation 1 complete", DEADLINE);
    let tally = load.join();
    assert_no_loss("reload batch 2", &tally, 2_000);
    // Two replacements were started before the first of them was ready, and never more.
    let log = cluster.log_lines();
    let mut starting = 0usize;
    let mut most = 0usize;
    for line in log.iter().skip_while(|l| !l.contains("rolling reload")) {
        if line.contains("started: pid ") && line.contains("generation 1") {
            starting += 1;
        } else if line.contains(" ready: pid ") {
            starting -= 1;
        }
        most = most.max(starting);
    }
    assert_eq!(most, 2, "replacements starting at once");
    assert_eq!(cluster.log_count("replacing worker"), 4);
}

#[test]
fn reload_re_resolves_the_command_and_aborts_while_it_is_missing() {
    let dir = TempDir::new("resolve");
    let server = dir.0.join("server");
    write_script(&server, &format!("exec {BIN} demo-worker"));
    let server_arg = server.to_str().unwrap();
    let mut cluster = TestCluster::start(&[
        "--workers",
        "2",
        "--grace",
        "2s",
        "--no-preload",
        "--",
        server_arg,
    ]);
    let before = cluster.wait_for_workers(2);
    let load = Load::start(cluster.addr(), "/", 2_000, 500.0, 8);
    load.wait_completed(300, DEADLINE);

    std::fs::remove_file(&server).unwrap();
    cluster.signal(libc::SIGHUP);
    cluster.wait_for_log(
        "reload aborted: the replacement could not be started",
        DEADLINE,
    );
    assert!(cluster.log_contains("command not found"));
    assert_eq!(
        cluster.wait_for_workers(2),
        before,
        "the old workers keep serving"
    );

    // Put back (as a new file): the next reload resolves it again and completes.
    write_script(&server, &format!("exec {BIN} demo-worker"));
    cluster.signal(libc::SIGHUP);
    cluster.wait_for_log("reload to generation 2 complete", DEADLINE);
    let tally = load.join();
    assert_no_loss("reload with the command missing, then back", &tally, 2_000);
    assert!(cluster.is_running());
    for r in get_many(cluster.addr(), "/", 10, 2) {
        assert_eq!(r.expect("request after the reload").generation(), 2);
    }
}

#[test]
fn crash_looping_slot_is_given_up_and_the_others_keep_serving() {
    let dir = TempDir::new("crashloop");
    let flag = dir.0.join("slot1-crashes");
    let script = format!(
        r#"if [ "$RCLUSTER_WORKER_ID" = 1 ] && [ -e "{}" ]; then exit 7; fi; exec "$0" demo-worker"#,
        flag.display()
    );
    let mut cluster = TestCluster::start(&[
        "--workers",
        "3",
        "--grace",
        "2s",
        "--no-preload",
        "--",
        "sh",
        "-c",
        &script,
        BIN,
    ]);
    let before = cluster.wait_for_workers(3);
    let line = cluster.wait_for_log("worker 1 started: pid ", DEADLINE);
    let victim: i32 = line
        .split("pid ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    std::fs::write(&flag, "").unwrap();
    kill(victim, libc::SIGKILL);
    cluster.wait_for_log("giving up on slot 1", DEADLINE);
    let survivors: Vec<i32> = before.iter().copied().filter(|&p| p != victim).collect();
    assert_eq!(
        cluster.wait_for_workers(2),
        survivors,
        "the other slots were not restarted"
    );
    let mut tally = Tally::default();
    for r in get_many(cluster.addr(), "/", 200, 4) {
        tally.add(&r);
    }
    assert_no_loss("after slot 1 gave up", &tally, 200);
    assert!(!tally.by_worker.contains_key(&1));
    assert!(cluster.is_running());
}

#[test]
fn reloads_while_max_conns_recycles_workers_all_complete() {
    const RELOADS: usize = 5;
    // Workers take a while to start, so recycle replacements are often in flight at SIGHUP.
    let script = r#"sleep 0.3; exec "$0" demo-worker"#;
    let cluster = TestCluster::start(&[
        "--workers",
        "2",
        "--max-conns",
        "100",
        "--grace",
        "2s",
        "--no-preload",
        "--",
        "sh",
        "-c",
        script,
        BIN,
    ]);
    let load = Load::start(cluster.addr(), "/", 6_000, 600.0, 8);
    for n in 1..=RELOADS {
        load.wait_completed(1_000 * n, DEADLINE);
        if n > 1 {
            cluster.wait_for_log(
                &format!("reload to generation {} complete", n - 1),
                DEADLINE,
            );
        }
        cluster.signal(libc::SIGHUP);
    }
    cluster.wait_for_log(
        &format!("reload to generation {RELOADS} complete"),
        DEADLINE,
    );
    let tally = load.join();
    assert_no_loss("reloads during recycling", &tally, 6_000);
    assert!(!cluster.log_contains("reload aborted"));
    for n in 1..=RELOADS {
        let complete = format!("reload to generation {n} complete");
        assert_eq!(
            cluster.log_count(&complete),
            1,
            "{complete:?} once per reload"
        );
    }
    for r in get_many(cluster.addr(), "/", 20, 2) {
        assert_eq!(
            r.expect("request after the reloads").generation(),
            RELOADS as u64
        );
    }
}

#[test]
fn connection_handed_to_a_worker_before_its_drain_is_answered_when_its_request_comes_later() {
    let cluster = TestCluster::start(&["--workers", "1", "--grace", "5s"]);
    // Connected, taken by the worker, but no request yet (a slow client).
    let mut slow = std::net::TcpStream::connect(cluster.addr()).expect("connect");
    slow.set_read_timeout(Some(DEADLINE)).unwrap();
    let holder = cluster.wait_for_holder(&slow);
    cluster.signal(libc::SIGHUP);
    cluster.wait_for_log(
        &format!("worker[{holder}]: info SIGTERM: draining 1 connections"),
        DEADLINE,
    );
    let late = get_on(&mut slow, "/late", true).expect("late request answered");
    println!(
        "late request: status {}, generation {}, connection {}",
        late.status,
        late.generation(),
        late.headers["connection"]
    );
    assert_eq!(late.status, 200, "{late:?}");
    assert_eq!(late.pid(), holder, "{late:?}");
    assert_eq!(late.generation(), 0, "{late:?}");
    assert_eq!(
        late.headers["connection"], "close",
        "a draining worker closes after answering"
    );
    cluster.wait_for_log(&format!("(pid {holder}) exited: exit code 0"), DEADLINE);
}

// --- workers that stop, recycle themselves or fail for a while (docs/LIFECYCLE.md) -----------

/// Whether node runs; prints a note when it does not, so the caller can skip.
fn node_available() -> bool {
    let ok = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("note: node not found; skipping this test");
    }
    ok
}

/// An unmodified node server that closes its listener and listens again (the shim reports
/// STOPPING, then READY): the master sends it connections again instead of blackholing the slot.
#[test]
fn node_server_that_closes_and_reopens_its_listener_is_served_again() {
    if !node_available() {
        return;
    }
    let app = "const s=require('http').createServer((q,r)=>{r.end('pid '+process.pid+'\\n');\
               if(q.url==='/reopen'){s.close(()=>s.listen(process.env.PORT));}});\
               s.listen(process.env.PORT);";
    let mut cluster = TestCluster::start(&["--workers", "1", "--", "node", "-e", app]);
    let first = get(cluster.addr(), "/reopen").expect("the /reopen request");
    assert_eq!(first.status, 200);
    cluster.wait_for_log("is stopping", DEADLINE);
    cluster.wait_for_log("is ready again", DEADLINE);
    let results = get_many(cluster.addr(), "/", 20, 2);
    let ok = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status == 200))
        .count();
    assert_eq!(ok, 20, "the only worker is used again after READY");
    assert!(cluster.is_running());
}

/// A node server that serves three requests and exits 0 after closing its listener (like
/// node-cluster's "die after N requests"): a planned exit, replaced at once, never a crash.
#[test]
fn self_recycling_node_workers_are_replaced_and_never_given_up() {
    if !node_available() {
        return;
    }
    let app = "let n=0;const s=require('http').createServer((q,r)=>{r.end('pid '+process.pid+'\\n');\
               if(++n>=3){s.close(()=>process.exit(0));}});s.listen(process.env.PORT);";
    let mut cluster = TestCluster::start(&["--workers", "2", "--", "node", "-e", app]);
    let mut failures = Vec::new();
    for i in 0..30 {
        match get(cluster.addr(), "/") {
            Ok(r) if r.status == 200 => {}
            other => failures.push((i, other.map(|r| r.status))),
        }
    }
    assert!(failures.is_empty(), "requests lost: {failures:?}");
    assert!(
        cluster.log_count("exited after STOPPING") >= 5,
        "workers recycled themselves"
    );
    assert_eq!(cluster.log_count("exited unexpectedly"), 0);
    assert!(!cluster.log_contains("giving up"));
    assert!(cluster.is_running());
}

/// A slot that crash-loops during an outage is given up for now, and SIGHUP brings it back once
/// its server works again.
#[test]
fn a_given_up_slot_comes_back_on_sighup() {
    let dir = TempDir::new("giveup-sighup");
    let flag = dir.0.join("slot1-fails");
    std::fs::write(&flag, "").unwrap();
    let script = format!(
        r#"if [ "$RCLUSTER_WORKER_ID" = 1 ] && [ -e "{}" ]; then exit 7; fi; exec "$0" demo-worker"#,
        flag.display()
    );
    let mut cluster = TestCluster::spawn(&[
        "--workers",
        "2",
        "--no-preload",
        "--",
        "sh",
        "-c",
        &script,
        BIN,
    ]);
    cluster.wait_for_log("giving up on slot 1", DEADLINE);
    assert!(cluster.is_running(), "slot 0 serves, the master stays");
    std::fs::remove_file(&flag).unwrap();
    cluster.signal(libc::SIGHUP);
    cluster.wait_for_log("worker 1 ready", DEADLINE);
    // Slot 1 serves again (every request answered on the way).
    until_served_by(cluster.addr(), "/", &[1], 2);
}

/// Shared mode: a reload whose replacement serves from the shared socket but never says it is
/// ready is aborted; the replacement is drained (it finishes what it took), not SIGKILLed, so
/// no request is reset.
#[test]
fn an_aborted_reload_in_shared_mode_drains_the_replacement_and_loses_nothing() {
    // Generation 1 serves but never signals readiness (no NOTIFY_SOCKET).
    let script = r#"if [ "$RCLUSTER_GENERATION" = 0 ]; then exec "$0" demo-worker; fi; unset NOTIFY_SOCKET; exec "$0" demo-worker"#;
    let mut cluster = TestCluster::start(&[
        "--workers",
        "2",
        "--policy",
        "shared",
        "--grace",
        "5s",
        "--ready-timeout",
        "2s",
        "--no-preload",
        "--",
        "sh",
        "-c",
        script,
        BIN,
    ]);
    let load = Load::start(cluster.addr(), "/?us=2000", 1_500, 300.0, 8);
    load.wait_completed(200, DEADLINE);
    cluster.signal(libc::SIGHUP);
    cluster.wait_for_log(
        "reload aborted: a replacement was not ready within --ready-timeout",
        DEADLINE,
    );
    let tally = load.join();
    assert_no_loss("aborted reload in shared mode", &tally, 1_500);
    assert!(
        cluster.log_contains("draining worker"),
        "the replacement is drained"
    );
    assert!(cluster.is_running());
}

/// A python server (threads, HTTP/1.1 keep-alive) that answers `/slow` after 3 s (it logs
/// `slow PID` when the request arrives) and anything else at once, with its pid; it installs no handler for SIGTERM (python's default: SIGTERM
/// ends it at once). (Node's runtime catches SIGTERM itself; the shim's part for node is
/// [`reload_of_a_node_app_without_a_sigterm_handler_lets_it_finish_its_requests`].)
const PY_SLOW_APP: &str = "import http.server, os, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def do_GET(self):
        if self.path == '/slow':
            print('slow %d' % os.getpid(), flush=True)
            time.sleep(3)
        b = ('pid %d\\n' % os.getpid()).encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()
";

/// A dispatch-mode cluster of one [`PY_SLOW_APP`] worker with `extra` master arguments;
/// `None` (with a note) without python3.
fn py_slow_cluster(extra: &[&str]) -> Option<TestCluster> {
    if !common::available("python3") {
        return None;
    }
    let mut args = vec!["--steer", "dispatch", "--workers", "1"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "python3", "-c", PY_SLOW_APP]);
    let cluster = TestCluster::start(&args);
    cluster.wait_for_workers(1);
    Some(cluster)
}

/// A server with no handler for the drain signal would die of it at once, cutting what it is
/// serving. In dispatch mode the master holds the signal back until the worker has closed every
/// connection it holds: a reload lets the old worker finish its slow request, then signals it.
#[test]
fn reload_of_a_server_without_a_drain_handler_lets_it_finish_its_requests() {
    let Some(cluster) = py_slow_cluster(&[]) else {
        return;
    };
    slow_request_across_a_reload(&cluster);
    cluster.wait_for_log("has no handler for SIGTERM", DEADLINE);
    cluster.wait_for_log("holds no connection now: SIGTERM", DEADLINE);
    assert!(!cluster.log_contains("still holds connections"));
}

/// [`PY_SLOW_APP`] with a SIGTERM handler that ends the process at once (`os._exit(0)`), as
/// nginx's `master_process off` does on its graceful-stop signal: the master sees the signal
/// caught and, by default, sends it at once.
fn py_abrupt_app() -> String {
    format!(
        "import os, signal\nsignal.signal(signal.SIGTERM, lambda *a: os._exit(0))\n{PY_SLOW_APP}"
    )
}

/// `--drain-when-idle`: a server whose drain handler ends it at once is held like one with no
/// handler, so a reload lets the old worker answer its slow request before it gets SIGTERM.
/// Without the option the same reload cuts the request (which shows the test can fail).
#[test]
fn drain_when_idle_holds_the_signal_of_a_server_whose_handler_exits_at_once() {
    if !common::available("python3") {
        return;
    }
    let app = py_abrupt_app();
    let start = |extra: &[&str]| {
        let mut args = vec!["--steer", "dispatch", "--workers", "1"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "python3", "-c", &app]);
        let cluster = TestCluster::start(&args);
        cluster.wait_for_workers(1);
        cluster
    };

    let mut held = start(&["--drain-when-idle"]);
    let (old, answer) = slow_request_in_a_reload(&held);
    let r = answer.expect("the slow request's answer");
    assert_eq!((r.status, r.body), (200, old.body), "held until idle");
    held.wait_for_log("is drained when idle (--drain-when-idle)", DEADLINE);
    held.wait_for_log("holds no connection now: SIGTERM", DEADLINE);
    let exited = held.wait_for_log(") exited", DEADLINE);
    assert!(exited.contains("code 0"), "{exited}");
    // The stop signal is held in the same way: the new worker answers its slow request first.
    let (pid, answer) = slow_request_at_stop(&held);
    let r = answer.expect("the slow request's answer at stop");
    assert_eq!((r.status, r.body), (200, format!("pid {pid}\n")));
    assert_eq!(held.wait_exit(DEADLINE).code(), Some(0));

    let cut = start(&[]);
    let (_, answer) = slow_request_in_a_reload(&cut);
    assert!(
        answer.is_err(),
        "without --drain-when-idle the handler cuts the slow request: {answer:?}"
    );
    let (_, answer) = slow_request_at_stop(&cut);
    assert!(
        answer.is_err(),
        "without --drain-when-idle the stop cuts the slow request: {answer:?}"
    );
    assert!(!cut.log_contains("--drain-when-idle"));
}

/// Once the reload of `cluster` is complete, sends `/slow` to its new worker and stops the
/// master while the request is in progress: the worker's pid and what the request got.
fn slow_request_at_stop(cluster: &TestCluster) -> (i32, std::io::Result<Response>) {
    cluster.wait_for_log("reload to generation 1 complete", DEADLINE);
    let pid = cluster.wait_for_workers(1)[0];
    let slow = send_request(cluster.addr(), "/slow").expect("a slow request at stop");
    cluster.wait_for_log(&format!("slow {pid}"), DEADLINE);
    cluster.signal(libc::SIGTERM);
    (pid, read_response(slow))
}

/// Sends `/` and then `/slow` to the one worker of `cluster` (dispatch mode), reloads while the
/// slow request is in progress, and returns the first answer and what the slow request got.
fn slow_request_in_a_reload(cluster: &TestCluster) -> (Response, std::io::Result<Response>) {
    let old = get(cluster.addr(), "/").expect("first request");
    let pid = cluster.worker_pids()[0];
    let slow = send_request(cluster.addr(), "/slow").expect("the slow request");
    cluster.wait_for_log(&format!("slow {pid}"), DEADLINE);
    cluster.signal(libc::SIGHUP);
    cluster.wait_for_log("draining worker 0", DEADLINE);
    (old, read_response(slow))
}

/// The one worker of `cluster` (dispatch mode) serves `/` and a `/slow` request that is in
/// progress when SIGHUP reloads it: the slow request is answered by the old worker, which then
/// ends of SIGTERM, and the new one serves.
fn slow_request_across_a_reload(cluster: &TestCluster) {
    let old = get(cluster.addr(), "/").expect("first request");
    let slow = send_request(cluster.addr(), "/slow").expect("the slow request");
    // The slow request is the worker's own before the reload begins.
    let deadline = Instant::now() + DEADLINE;
    while cluster.status().first().map(|w| w.active) != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the slow request never reached the worker"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    cluster.signal(libc::SIGHUP);
    cluster.wait_for_log("draining worker 0", DEADLINE);
    let r = read_response(slow).expect("the slow request's answer");
    assert_eq!((r.status, r.body.clone()), (200, old.body.clone()), "{r:?}");
    cluster.wait_for_log("reload to generation 1 complete", DEADLINE);
    let exited = cluster.wait_for_log(") exited", DEADLINE);
    assert!(exited.contains("signal 15 (SIGTERM)"), "{exited}");
    let new = get(cluster.addr(), "/").expect("a request after the reload");
    assert_eq!(new.status, 200);
    assert_ne!(new.body, old.body, "served by the new worker");
}

/// The same at stop: the stop signal (SIGTERM) waits until the worker has answered its slow
/// request, in dispatch mode (the master holds it back, the acceptor reading the worker's
/// closes after it stopped accepting) and in `shared` mode (the shim holds the default
/// action); the master then exits 0. Without either, the request is cut.
#[test]
fn stop_of_a_server_without_a_stop_handler_lets_it_finish_its_requests() {
    if !common::available("python3") {
        return;
    }
    for mode in [["--steer", "dispatch"], ["--policy", "shared"]] {
        let mut args = mode.to_vec();
        args.extend(["--workers", "1", "--", "python3", "-c", PY_SLOW_APP]);
        let mut cluster = TestCluster::start(&args);
        let pid = cluster.wait_for_workers(1)[0];
        let slow = send_request(cluster.addr(), "/slow").expect("the slow request");
        cluster.wait_for_log(&format!("slow {pid}"), DEADLINE);
        cluster.signal(libc::SIGTERM);
        let r = read_response(slow).expect("the slow request's answer");
        assert_eq!(r.status, 200, "{mode:?}: {r:?}");
        assert_eq!(r.body, format!("pid {pid}\n"), "{mode:?}");
        let status = cluster.wait_exit(DEADLINE);
        assert_eq!(status.code(), Some(0), "{mode:?}");
        let exited = cluster.wait_for_log(&format!("(pid {pid}) exited"), DEADLINE);
        assert!(exited.contains("signal 15 (SIGTERM)"), "{mode:?}: {exited}");
        if mode[0] == "--steer" {
            assert!(cluster.log_contains("holds no connection now: SIGTERM"));
        }
    }
}

/// A connection the client keeps open holds such a worker only up to half of `--grace`: then
/// it gets the drain signal (and dies of it) while the new worker serves.
#[test]
fn a_server_without_a_drain_handler_is_signalled_after_half_the_grace() {
    let Some(cluster) = py_slow_cluster(&["--grace", "2s"]) else {
        return;
    };
    let mut held = std::net::TcpStream::connect(cluster.addr()).expect("connect");
    held.set_read_timeout(Some(DEADLINE)).unwrap();
    let old = get_on(&mut held, "/", true).expect("a keep-alive request");
    assert_eq!(old.status, 200);
    let started = Instant::now();
    cluster.signal(libc::SIGHUP);
    cluster.wait_for_log("has no handler for SIGTERM", DEADLINE);
    cluster.wait_for_log(
        "still holds connections after half of --grace: SIGTERM",
        DEADLINE,
    );
    let exited = cluster.wait_for_log(") exited", DEADLINE);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "signalled after {:?}",
        started.elapsed()
    );
    assert!(exited.contains("signal 15 (SIGTERM)"), "{exited}");
    let new = get(cluster.addr(), "/").expect("a request after the reload");
    assert_ne!(new.body, old.body, "served by the new worker");
}

/// A node app that answers `/slow` after 3 s (a timer: its loop stays free; it logs `slow PID`
/// when the request arrives) and anything else at once, with its pid. It has no SIGTERM handler
/// of its own: node's runtime has one, which restores the terminal and ends the process.
const NODE_SLOW_APP: &str = "require('http').createServer((q,r)=>{const a=()=>r.end('pid '+process.pid+'\\n');\
if(q.url==='/slow'){console.log('slow '+process.pid);setTimeout(a,3000)}else{a()}}).listen(process.env.PORT);";

/// Node's own SIGTERM handler ends the process at once; in dispatch mode the shim holds it
/// back (shim/src/drain.rs) until the drained worker has closed its last connection: a reload
/// lets a plain node app finish its slow request, and then it ends of SIGTERM as before.
#[test]
fn reload_of_a_node_app_without_a_sigterm_handler_lets_it_finish_its_requests() {
    if !node_available() {
        return;
    }
    let cluster = TestCluster::start(&[
        "--steer",
        "dispatch",
        "--workers",
        "1",
        "--",
        "node",
        "-e",
        NODE_SLOW_APP,
    ]);
    cluster.wait_for_workers(1);
    slow_request_across_a_reload(&cluster);
    // The master saw SIGTERM caught (node's own handler) and signalled at once.
    assert!(!cluster.log_contains("has no handler for SIGTERM"));
}

/// In the kernel modes a drained worker shares its listener with its replacement (in `shared`
/// mode with every worker). On SIGTERM the shim holds node's exit back and the worker stops
/// taking connections (shim/src/drain.rs): it answers its slow request and then ends of
/// SIGTERM, while every connection that arrives in the meantime is the new worker's. Without
/// the hold the slow request is cut; without the stop, the old worker, its loop free, takes
/// some of the new connections.
#[test]
fn reload_of_a_node_app_without_a_sigterm_handler_in_the_kernel_modes_lets_it_finish() {
    if !node_available() {
        return;
    }
    slow_request_across_a_reload_in_the_kernel_modes(&["node", "-e", NODE_SLOW_APP]);
}

/// The shim's hold lasts at most half of `--grace` (`RCLUSTER_DRAIN_HOLD_MS`), as the master's
/// own hold does in dispatch mode: an idle keep-alive connection the client keeps open (node
/// closes one after 5 s, longer than this `--grace`) no longer keeps a plain node app until the
/// master's SIGKILL. At the deadline the app ends of SIGTERM, its own action, and the new worker
/// serves. The shim holds node's exit in every mode, so each is tried. Without the bound the
/// old worker dies of SIGKILL at `--grace` (which shows the test can fail).
#[test]
fn a_held_drain_signal_takes_effect_after_half_the_grace() {
    if !node_available() {
        return;
    }
    let mut modes = vec![
        vec!["--steer", "dispatch"],
        vec!["--policy", "shared"],
        vec!["--policy", "reuseport"],
    ];
    if common::steering_available() {
        modes.push(vec!["--policy", "least-conn", "--steer", "kernel"]);
    }
    for mode in modes {
        let mut args = mode.clone();
        args.extend(["--grace", "4s", "--workers", "1", "--", "node", "-e"]);
        args.push(NODE_SLOW_APP);
        let cluster = TestCluster::start(&args);
        let old_pid = cluster.wait_for_workers(1)[0];
        let mut held = std::net::TcpStream::connect(cluster.addr()).expect("connect");
        held.set_read_timeout(Some(DEADLINE)).unwrap();
        let old = get_on(&mut held, "/", true).expect("a keep-alive request");
        assert_eq!(old.body, format!("pid {old_pid}\n"), "{mode:?}");
        cluster.signal(libc::SIGHUP);
        let exited = cluster.wait_for_log(&format!("(pid {old_pid}) exited"), DEADLINE);
        assert!(exited.contains("signal 15 (SIGTERM)"), "{mode:?}: {exited}");
        let new = get(cluster.addr(), "/").expect("a request after the reload");
        assert_eq!(new.status, 200, "{mode:?}");
        assert_ne!(new.body, old.body, "{mode:?}: served by the new worker");
    }
}

/// Node's runtime ends the process on SIGINT the same way (a one-shot handler): with
/// `--drain-signal INT` (PM2's signal) the shim holds that one, and the old worker ends of
/// SIGINT once it has answered its slow request.
#[test]
fn reload_with_drain_signal_int_lets_a_plain_node_app_finish_its_requests() {
    if !node_available() {
        return;
    }
    slow_request_across_kernel_mode_reloads(
        &[vec!["--policy", "shared", "--drain-signal", "INT"]],
        &["node", "-e", NODE_SLOW_APP],
        "signal 2 (SIGINT)",
    );
}

/// The same for a python server that leaves SIGTERM at its default action, which the shim
/// holds in the kernel modes (it waits in `poll`, its listener blocking).
#[test]
fn reload_of_a_server_without_a_drain_handler_in_the_kernel_modes_lets_it_finish() {
    if !common::available("python3") {
        return;
    }
    slow_request_across_a_reload_in_the_kernel_modes(&["python3", "-c", PY_SLOW_APP]);
}

/// A reload of one worker running `command` (an app as [`NODE_SLOW_APP`]) in `shared`,
/// `reuseport` and, where it loads, kernel-steered mode, with a slow request in flight: that
/// request is answered by the old worker, which then ends of SIGTERM, and ten requests made
/// meanwhile are all the new worker's.
fn slow_request_across_a_reload_in_the_kernel_modes(command: &[&str]) {
    let mut modes = vec![vec!["--policy", "shared"], vec!["--policy", "reuseport"]];
    if common::steering_available() {
        modes.push(vec!["--policy", "least-conn", "--steer", "kernel"]);
    }
    slow_request_across_kernel_mode_reloads(&modes, command, "signal 15 (SIGTERM)");
}

/// [`slow_request_across_a_reload_in_the_kernel_modes`] with each of `modes` (master
/// arguments), the old worker's exit line saying `died_of`.
fn slow_request_across_kernel_mode_reloads(modes: &[Vec<&str>], command: &[&str], died_of: &str) {
    for mode in modes {
        let mut args = mode.clone();
        args.extend(["--workers", "1", "--"]);
        args.extend_from_slice(command);
        let cluster = TestCluster::start(&args);
        let old_pid = cluster.wait_for_workers(1)[0];
        let old = get(cluster.addr(), "/").expect("first request");
        let slow = send_request(cluster.addr(), "/slow").expect("the slow request");
        cluster.wait_for_log(&format!("slow {old_pid}"), DEADLINE);
        cluster.signal(libc::SIGHUP);
        cluster.wait_for_log("draining worker 0", DEADLINE);
        for i in 0..10 {
            let r = get(cluster.addr(), "/").expect("a request during the drain");
            assert_eq!(r.status, 200, "{mode:?}: request {i}");
            assert_ne!(
                r.body, old.body,
                "{mode:?}: request {i} went to the draining worker"
            );
        }
        let r = read_response(slow).expect("the slow request's answer");
        assert_eq!(
            (r.status, r.body.clone()),
            (200, old.body.clone()),
            "{mode:?}: {r:?}"
        );
        let exited = cluster.wait_for_log(&format!("(pid {old_pid}) exited"), DEADLINE);
        assert!(exited.contains(died_of), "{mode:?}: {exited}");
    }
}
