//! The agent, the message bus and heartbeats, against the real binary with real node and
//! python processes using the clients in `clients/`. What each child observes it prints on
//! stderr, which it shares with the master, so the harness reads it from the master's log.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

fn available(program: &str) -> bool {
    let ok = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("note: {program} not found; skipping this test");
    }
    ok
}

/// A directory of scripts, removed on drop.
struct Scripts(PathBuf);

impl Scripts {
    fn new(tag: &str) -> Scripts {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rcluster-bus-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scripts(dir)
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }
}

impl Drop for Scripts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn node_client() -> String {
    format!("{}/clients/node/rcluster.js", env!("CARGO_MANIFEST_DIR"))
}

fn python_clients() -> String {
    format!("{}/clients/python", env!("CARGO_MANIFEST_DIR"))
}

/// A node agent: ready on the bus once connected; counts `hi` broadcasts and prints each; after
/// an `after` from `workers` distinct senders (each sent after its `hi` on the same connection,
/// so every `hi` is in by then) prints the total; answers a `hi` from worker N with a `greet`
/// to N; with `FLOOD_WHEN_ALL` set, once all have said `after` (so all are connected), sends
/// 10,000 messages to worker 0 and then a `probe` to worker 1.
fn agent_script(workers: usize) -> String {
    format!(
        r#"const bus = require({client:?}).connect();
let his = 0; const after = new Set();
bus.on('connect', () => {{ console.error('AGENT up pid ' + process.pid); bus.send('master', 'ready'); }});
bus.on('message', (m) => {{
  if (m.type === 'hi') {{
    his++;
    console.error('AGENT hi from ' + JSON.stringify(m.from) + ' id ' + JSON.stringify(m.data && m.data.id));
    bus.send(m.from, 'greet', {{ n: his }});
  }} else if (m.type === 'after') {{
    after.add(m.from);
    if (after.size === {workers}) {{
      console.error('AGENT total hi=' + his);
      if (process.env.FLOOD_WHEN_ALL) flood();
    }}
  }}
}});
function flood() {{
    const pad = 'x'.repeat(1000);
    for (let i = 0; i < 10000; i++) bus.send(0, 'flood', {{ i, pad }});
    bus.send(1, 'probe', null);
    console.error('AGENT flooded');
}}
"#,
        client = node_client()
    )
}

/// A node HTTP worker that broadcasts `hi` (with its id) and then tells the agent `after`.
fn node_worker_script() -> String {
    format!(
        r#"const bus = require({client:?}).connect();
const id = Number(process.env.RCLUSTER_WORKER_ID);
bus.broadcast('hi', {{ id }});
bus.send('agent', 'after', null);
bus.on('message', (m) => console.error('WORKER ' + id + ' got ' + m.type + ' from ' + JSON.stringify(m.from)));
require('http').createServer((q, s) => s.end('pid ' + process.pid + '\n')).listen(process.env.PORT);
"#,
        client = node_client()
    )
}

#[test]
fn agent_counts_exactly_one_broadcast_from_each_of_four_node_workers() {
    if !available("node") {
        return;
    }
    let dir = Scripts::new("broadcast");
    let agent = dir.write("agent.js", &agent_script(4));
    let worker = dir.write("worker.js", &node_worker_script());
    let agent_cmd = format!("node {agent}");
    let cluster = TestCluster::start(&["-w", "4", "--agent", &agent_cmd, "--", "node", &worker]);
    let total = cluster.wait_for_log("AGENT total hi=", DEADLINE);
    assert!(total.ends_with("AGENT total hi=4"), "{total}");
    let mut from: BTreeMap<String, String> = BTreeMap::new();
    for line in cluster.log_lines() {
        if let Some(rest) = line.split("AGENT hi from ").nth(1) {
            let (f, id) = rest.split_once(" id ").unwrap();
            assert!(
                from.insert(f.to_string(), id.to_string()).is_none(),
                "{line}"
            );
        }
    }
    let expect: BTreeMap<String, String> = (0..4).map(|i| (i.to_string(), i.to_string())).collect();
    assert_eq!(from, expect, "`from` is the sender's worker id");
    // Every worker gets the agent's answer, addressed to its id, from "agent".
    for i in 0..4 {
        cluster.wait_for_log(&format!("WORKER {i} got greet from \"agent\""), DEADLINE);
    }
    // A worker never hears its own broadcast (it hears those of the workers already connected
    // when it was sent), and the agent's answers go to one worker each.
    for i in 0..4 {
        assert_eq!(cluster.log_count(&format!("WORKER {i} got hi from {i}")), 0);
    }
    assert_eq!(cluster.log_count("got greet"), 4);
    // The workers started only after the agent was ready.
    let lines = cluster.log_lines();
    let ready = lines
        .iter()
        .position(|l| l.contains("agent ready"))
        .unwrap();
    let first_worker = lines
        .iter()
        .position(|l| l.contains("worker 0 started"))
        .unwrap();
    assert!(ready < first_worker, "{}", lines.join("\n"));
}

#[test]
fn workers_wait_for_the_agent_to_be_ready() {
    if !available("python3") {
        return;
    }
    let dir = Scripts::new("gate");
    let gate = dir.0.join("go");
    // The agent says READY=1 on its NOTIFY_SOCKET only once the test creates the file.
    let agent = dir.write(
        "agent.py",
        &format!(
            "import os, socket, time, sys\n\
             sys.stderr.write('AGENT waiting\\n'); sys.stderr.flush()\n\
             while not os.path.exists({gate:?}): time.sleep(0.02)\n\
             s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
             a = os.environ['NOTIFY_SOCKET']\n\
             s.sendto(b'READY=1', '\\0' + a[1:] if a.startswith('@') else a)\n\
             assert 'LISTEN_FDS' not in os.environ and 'PORT' not in os.environ\n\
             sys.stderr.write('AGENT role ' + os.environ['RCLUSTER_ROLE'] + '\\n'); sys.stderr.flush()\n\
             time.sleep(3600)\n"
        ),
    );
    let agent_cmd = format!("python3 {agent}");
    let cluster = TestCluster::spawn(&["-w", "2", "--agent", &agent_cmd]);
    cluster.wait_for_log("AGENT waiting", DEADLINE);
    // The agent is running and not ready: the master has one child, the agent.
    assert_eq!(cluster.wait_for_workers(1).len(), 1);
    assert!(!cluster.log_contains("worker 0 started"));
    std::fs::write(&gate, b"").unwrap();
    cluster.wait_for_log("all 2 workers ready", DEADLINE);
    cluster.wait_for_log("AGENT role agent", DEADLINE);
    assert!(get(cluster.addr(), "/").is_ok());
}

#[test]
fn python_worker_hears_the_master_and_the_agent() {
    if !available("python3") || !available("node") {
        return;
    }
    let dir = Scripts::new("python");
    let agent = dir.write("agent.js", &agent_script(2));
    let worker = dir.write(
        "worker.py",
        &format!(
            "import os, sys, http.server\n\
             sys.path.insert(0, {clients:?})\n\
             import rcluster\n\
             bus = rcluster.connect()\n\
             def show(m):\n    sys.stderr.write('PY %s got %s from %s %s\\n' % (bus.id, m['type'], m['from'], m['data'])); sys.stderr.flush()\n\
             bus.on_message(show)\n\
             bus.send('master', 'ping', {{'id': bus.id}})\n\
             bus.broadcast('hi', {{'id': bus.id}})\n\
             bus.send('agent', 'after')\n\
             http.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), http.server.SimpleHTTPRequestHandler).serve_forever()\n",
            clients = python_clients()
        ),
    );
    let agent_cmd = format!("node {agent}");
    let cluster = TestCluster::spawn(&["-w", "2", "--agent", &agent_cmd, "--", "python3", &worker]);
    for i in 0..2 {
        // master → worker: the master's own answer to the worker's ping.
        cluster.wait_for_log(
            &format!("PY {i} got pong from master {{'id': {i}}}"),
            DEADLINE,
        );
        // agent → worker, relayed by the master to the worker's id.
        cluster.wait_for_log(&format!("PY {i} got greet from agent"), DEADLINE);
    }
    cluster.wait_for_log("AGENT total hi=2", DEADLINE);
}

fn agent_pid(cluster: &TestCluster, nth: usize) -> i32 {
    let line = cluster.wait_for_count("agent started: pid ", nth, DEADLINE)[nth - 1].clone();
    let rest = line.split("agent started: pid ").nth(1).unwrap();
    rest.split(',').next().unwrap().trim().parse().unwrap()
}

#[test]
fn killing_the_agent_restarts_it_while_requests_succeed() {
    if !available("node") {
        return;
    }
    let dir = Scripts::new("restart");
    let agent = dir.write("agent.js", &agent_script(1));
    let agent_cmd = format!("node {agent}");
    let cluster = TestCluster::start(&["-w", "2", "--agent", &agent_cmd]);
    let first = agent_pid(&cluster, 1);
    let load = Load::start(cluster.addr(), "/", 400, 400.0, 4);
    load.wait_completed(50, DEADLINE);
    kill(first, libc::SIGKILL);
    cluster.wait_for_log("AGENT EXITED", DEADLINE);
    let second = agent_pid(&cluster, 2);
    assert_ne!(first, second);
    cluster.wait_for_count("agent ready", 2, DEADLINE);
    let tally = load.join();
    assert_eq!(tally.errors(), 0, "{}", tally.summary());
    assert_eq!(tally.ok, 400);
    cluster.wait_for_count("AGENT up pid", 2, DEADLINE);
}

fn bus_path(cluster: &TestCluster) -> String {
    let line = cluster.wait_for_log("message bus at ", DEADLINE);
    line.split("message bus at ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string()
}

/// Resident memory of a process, KiB (`VmRSS` in /proc/PID/status).
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_worker_that_reads_nothing_loses_messages_not_the_master_memory() {
    if !available("node") || !available("python3") {
        return;
    }
    let dir = Scripts::new("slow");
    let agent = dir.write("agent.js", &agent_script(2));
    // Worker 0 connects and never reads; worker 1 prints what it receives. Once both told the
    // agent they are there, it floods worker 0 and then probes worker 1. Both serve HTTP.
    let worker = dir.write(
        "worker.py",
        &format!(
            "import os, sys, http.server\n\
             sys.path.insert(0, {clients:?})\n\
             import rcluster\n\
             bus = rcluster.connect()\n\
             if bus.id == 1: bus.on_message(lambda m: sys.stderr.write('PY 1 got ' + m['type'] + '\\n'))\n\
             bus.send('agent', 'after')\n\
             sys.stderr.write('PY %s connected\\n' % bus.id); sys.stderr.flush()\n\
             http.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), http.server.SimpleHTTPRequestHandler).serve_forever()\n",
            clients = python_clients()
        ),
    );
    let agent_cmd = format!("node {agent}");
    let cluster = TestCluster::spawn_with_env(
        &["-w", "2", "--agent", &agent_cmd, "--", "python3", &worker],
        &[("FLOOD_WHEN_ALL", "1")],
    );
    // Before any worker or the agent: the master's baseline.
    let before = rss_kib(cluster.pid());
    cluster.wait_for_log("PY 0 connected", DEADLINE);
    cluster.wait_for_log("AGENT flooded", DEADLINE);
    // Worker 1 keeps receiving: the probe sent after the 10,000 arrives.
    cluster.wait_for_log("PY 1 got probe", DEADLINE);
    let dropped = cluster.wait_for_log("is not reading its messages", DEADLINE);
    assert!(dropped.contains("worker 0"), "{dropped}");
    cluster.signal(libc::SIGUSR1);
    let status = cluster.wait_for_log("status: bus worker 0", DEADLINE);
    let n: u64 = status
        .split(" queued (")
        .nth(1)
        .and_then(|r| r.split("), ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no drop count in {status}"));
    assert!(n > 0 && n < 10_000, "{status}");
    let after = rss_kib(cluster.pid());
    eprintln!(
        "master RSS {before} KiB before, {after} KiB after 10,000 1-KiB messages to a non-reader; {n} dropped"
    );
    // The queue is bounded at 256 KiB (the rest waits in the kernel's socket buffer or is
    // dropped): the master's growth, workers and agent included, stays far below the 10 MB sent.
    assert!(after < before + 4 * 1024, "{before} KiB → {after} KiB");
    assert!(get(cluster.addr(), "/").is_ok());
}

#[test]
fn a_worker_that_stops_heartbeating_is_replaced() {
    if !available("node") {
        return;
    }
    let dir = Scripts::new("heartbeat");
    // Heartbeats from the event loop; /hang blocks the loop for good (the application hangs),
    // so the heartbeats stop while the process lives.
    let worker = dir.write(
        "worker.js",
        &format!(
            "const bus = require({client:?}).connect();\n\
             bus.heartbeat(100);\n\
             require('http').createServer((q, s) => {{\n\
               if (q.url === '/hang') {{ console.error('WORKER hanging pid ' + process.pid); for (;;) {{}} }}\n\
               s.end('pid ' + process.pid + '\\n');\n\
             }}).listen(process.env.PORT);\n",
            client = node_client()
        ),
    );
    let cluster = TestCluster::start(&[
        "-w",
        "2",
        "--heartbeat-timeout",
        "1s",
        "--grace",
        "2s",
        "--",
        "node",
        &worker,
    ]);
    let before = cluster.wait_for_workers(2);
    let _hung = send_request(cluster.addr(), "/hang").unwrap();
    let line = cluster.wait_for_log("WORKER hanging pid ", DEADLINE);
    let hung: i32 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(before.contains(&hung));
    cluster.wait_for_log("sent no heartbeat", DEADLINE);
    cluster.wait_for_log(&format!("pid {hung}) exited"), DEADLINE);
    let after = cluster.wait_for_workers(2);
    assert!(!after.contains(&hung));
    let results: Vec<_> = (0..20).map(|_| get(cluster.addr(), "/")).collect();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
}

#[test]
fn strangers_are_refused() {
    let cluster = TestCluster::start(&["-w", "1"]);
    let path = bus_path(&cluster);
    let dir = std::path::Path::new(&path).parent().unwrap();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700, "the bus lives in a private directory");
    // Same uid, but not a worker, the agent nor a descendant (this test process): refused.
    let mut s = UnixStream::connect(&path).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"{\"to\":\"master\",\"type\":\"ping\"}\n")
        .unwrap();
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(n) => assert_eq!(n, 0, "closed without an answer"),
        // Closed with our line unread.
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    cluster.wait_for_log("refused a connection from pid", DEADLINE);
    // Another uid: the directory already refuses it.
    // SAFETY: geteuid takes no arguments.
    #[allow(unsafe_code)]
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !available("python3") {
        eprintln!("note: not root (or no python3); skipping the other-uid half of this test");
        return;
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, socket, sys\n\
             os.setgid(65534); os.setuid(65534)\n\
             s = socket.socket(socket.AF_UNIX)\n\
             try:\n    s.connect(sys.argv[1]); s.sendall(b'{\"to\":\"all\",\"type\":\"x\"}\\n'); print('read', len(s.recv(100)))\n\
             except OSError as e:\n    print('refused', e.errno)\n",
            &path,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("refused") || text.trim() == "read 0",
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_agent_reloads_before_the_workers_and_stops_after_them() {
    if !available("python3") {
        return;
    }
    let dir = Scripts::new("order");
    let agent = dir.write(
        "agent.py",
        "import os, socket, signal, sys, time\n\
         gen = os.environ['RCLUSTER_GENERATION']\n\
         def term(*_):\n    sys.stderr.write('AGENT %s got SIGTERM\\n' % gen); sys.exit(0)\n\
         signal.signal(signal.SIGTERM, term)\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
         a = os.environ['NOTIFY_SOCKET']\n\
         s.sendto(b'READY=1', '\\0' + a[1:] if a.startswith('@') else a)\n\
         while True: time.sleep(3600)\n",
    );
    let agent_cmd = format!("python3 {agent}");
    let mut cluster = TestCluster::start(&["-w", "2", "--agent", &agent_cmd]);
    let first = agent_pid(&cluster, 1);
    cluster.signal(libc::SIGHUP);
    cluster.wait_for_log("reload to generation 1 complete", DEADLINE);
    let second = agent_pid(&cluster, 2);
    assert_ne!(first, second);
    let lines = cluster.log_lines();
    let pos = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in\n{}", lines.join("\n")))
    };
    // The master's own lines give the order (an agent's stderr reaches the log through a pipe,
    // so its lines may land after master lines written later).
    assert!(
        pos(&format!("agent (pid {first}) exited")) < pos(&format!("agent started: pid {second}")),
        "one agent at a time: the old one is stopped before the new one starts"
    );
    cluster.wait_for_log("AGENT 0 got SIGTERM", DEADLINE);
    assert!(
        pos(&format!("agent started: pid {second}")) < pos("SIGHUP: rolling reload"),
        "the new agent starts before the workers' reload"
    );
    cluster.signal(libc::SIGTERM);
    assert!(cluster.wait_exit(DEADLINE).success());
    let lines = cluster.log_lines();
    let last_worker_exit = lines
        .iter()
        .rposition(|l| l.contains("worker ") && l.contains(") exited"))
        .unwrap();
    let agent_stop = lines
        .iter()
        .position(|l| l.contains(&format!("stopping the agent (pid {second})")))
        .unwrap();
    assert!(last_worker_exit < agent_stop, "{}", lines.join("\n"));
    cluster.wait_for_log("AGENT 1 got SIGTERM", DEADLINE);
    assert!(!alive(second));
}

#[test]
fn a_worker_whose_handlers_hang_is_replaced_by_active_health_checks() {
    if !available("node") {
        return;
    }
    let dir = Scripts::new("probe");
    let flag = dir.0.join("hung-once");
    // The first process of slot 0 answers nothing, /healthz included (its event loop runs: a
    // stuck promise, not a busy loop, so heartbeats would not catch it); its replacement finds
    // the flag and serves.
    let worker = dir.write(
        "worker.js",
        &format!(
            "const fs = require('fs');\n\
             let hang = false;\n\
             if (process.env.RCLUSTER_WORKER_ID === '0' && !fs.existsSync({flag:?})) {{ fs.writeFileSync({flag:?}, ''); hang = true; }}\n\
             require('http').createServer((q, s) => {{\n\
               if (hang) {{ console.error('WORKER hanging ' + q.url + ' pid ' + process.pid); return; }}\n\
               s.end('pid ' + process.pid + '\\n');\n\
             }}).listen(process.env.PORT);\n"
        ),
    );
    let cluster = TestCluster::start(&[
        "-w",
        "2",
        "--health-check",
        "GET /healthz",
        "--health-interval",
        "300ms",
        "--health-timeout",
        "200ms",
        "--health-fails",
        "3",
        "--grace",
        "1s",
        "--",
        "node",
        &worker,
    ]);
    let line = cluster.wait_for_log("WORKER hanging /healthz pid ", DEADLINE);
    let first_probe = std::time::Instant::now();
    let hung: i32 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let replacing = cluster.wait_for_log("active health checks in a row", DEADLINE);
    let took = first_probe.elapsed();
    assert!(replacing.contains(&format!("pid {hung}")), "{replacing}");
    eprintln!(
        "hung worker replaced {took:?} after its first failed probe (bound: interval × fails + timeout = 1.1s)"
    );
    cluster.wait_for_log(&format!("pid {hung}) exited"), DEADLINE);
    let results: Vec<_> = (0..20).map(|_| get(cluster.addr(), "/")).collect();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let hung_body = format!("pid {hung}\n");
    assert!(results.iter().all(|r| r.as_ref().unwrap().status == 200));
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().unwrap().body != hung_body)
    );
    // The other worker passed every probe: it is still the one it was.
    assert_eq!(cluster.log_count("replacing worker"), 1);
}

#[test]
fn a_rust_worker_whose_loop_blocks_misses_heartbeats_and_is_replaced_without_losing_its_request() {
    // The demo worker heartbeats through the Rust worker API from its event loop; `?us=` spins
    // that loop, so its heartbeats stop for the spin.
    let cluster = TestCluster::start(&["-w", "2", "--heartbeat-timeout", "1s"]);
    let before = cluster.wait_for_workers(2);
    let slow = send_request(cluster.addr(), "/?us=3000000").unwrap();
    let replacing = cluster.wait_for_log("no heartbeat within --heartbeat-timeout", DEADLINE);
    let pid: i32 = replacing
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {replacing}"));
    assert!(before.contains(&pid));
    // The request it was spinning on is answered: draining lets it finish.
    let resp = read_response(slow).unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.pid(), pid);
    cluster.wait_for_log(&format!("pid {pid}) exited"), DEADLINE);
    let results: Vec<_> = (0..20).map(|_| get(cluster.addr(), "/")).collect();
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_ok_and(|r| r.status == 200))
    );
}

#[test]
fn an_agent_that_never_gets_ready_fails_the_start_with_exit_1() {
    let mut cluster = TestCluster::spawn(&["-w", "2", "--agent", "sh -c 'exit 3'"]);
    let status = cluster.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(1), "{}", cluster.log_lines().join("\n"));
    assert_eq!(
        cluster.log_count("AGENT EXITED"),
        4,
        "restarted with backoff"
    );
    assert!(cluster.log_contains("AGENT FAILED: it exited 5 times"));
    assert!(
        !cluster.log_contains("worker 0 started"),
        "no worker without an agent"
    );
}

#[test]
fn workers_running_as_another_user_speak_on_the_bus() {
    // SAFETY: geteuid takes no arguments.
    #[allow(unsafe_code)]
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !available("node") {
        eprintln!("note: needs root (for --user) and node; skipping");
        return;
    }
    let dir = Scripts::new("user");
    let worker = dir.write(
        "worker.js",
        &format!(
            "const bus = require({client:?}).connect();\n\
             bus.send('master', 'ping', {{ uid: process.getuid() }});\n\
             bus.on('message', (m) => console.error('WORKER ' + bus.id + ' got ' + m.type + ' ' + JSON.stringify(m.data)));\n\
             require('http').createServer((q, s) => s.end('ok')).listen(process.env.PORT);\n",
            client = node_client()
        ),
    );
    let cluster = TestCluster::start(&["-w", "2", "--user", "nobody", "--", "node", &worker]);
    for i in 0..2 {
        cluster.wait_for_log(&format!("WORKER {i} got pong {{\"uid\":65534}}"), DEADLINE);
    }
}
