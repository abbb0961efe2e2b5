//! Unmodified servers in other languages through the real master: python's `http.server` and a
//! node http app under every kind of policy (1,000 connections each), the least-conn accounting
//! the preload shim reports, a multi-threaded accept loop, what a worker's children inherit,
//! socket-activated servers without the shim, and `NOTIFY_SOCKET` readiness.
//!
//! Every server is started by name (`python3`, `node`) the way a user would, through whatever
//! wrapper PATH holds (pyenv's `python3` is a bash script that execs the interpreter: the shim
//! follows that exec). A test whose interpreter is absent prints a note and passes.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Connections per (server, policy), each a new TCP connection: the issue's number.
const CONNECTIONS: usize = 1_000;
/// Client threads for the load.
const CLIENTS: usize = 4;
const WORKERS: usize = 4;

// --- the servers ---------------------------------------------------------------------------

/// The issue's node app, verbatim: the pid of the serving process in the body.
const NODE_APP: &str = "require('http').createServer((q,s)=>s.end('pid '+process.pid+'\\n')).listen(process.env.PORT)\n";

/// The node app with a CPU spin: `?us=N` busy-loops N µs before answering `pid P`.
const NODE_SPIN_APP: &str = "const us=u=>{const m=/[?&]us=(\\d+)/.exec(u);return m?BigInt(m[1]):0n};\
require('http').createServer((q,s)=>{const end=process.hrtime.bigint()+us(q.url)*1000n;\
while(process.hrtime.bigint()<end);s.end('pid '+process.pid+'\\n')}).listen(process.env.PORT)\n";

/// How to run one server and how to tell, from a response, which process served it.
struct Server {
    name: &'static str,
    /// Master arguments before `--` besides the policy (e.g. a fixed `--listen`).
    master_args: Vec<String>,
    /// The worker command.
    command: Vec<String>,
    /// What to GET.
    path: &'static str,
    /// The body is `pid P`: the serving process's own pid.
    pid_in_body: bool,
    _dir: TempDir,
}

/// python's http.server, each worker serving its own directory holding a file `pid` with its
/// pid, so the body names the process that served it. `sh` makes the directory, then `exec`s
/// the server (same pid, and the shim follows the exec) on `$PORT` from the contract.
fn python_http_server() -> Server {
    let dir = TempDir::new("py");
    let root = dir.path().to_str().unwrap();
    let script = format!(
        "d='{root}'/$$ && mkdir -p \"$d\" && echo \"pid $$\" > \"$d/pid\" && cd \"$d\" && \
         exec python3 -m http.server \"$PORT\" --bind 127.0.0.1"
    );
    Server {
        name: "python http.server",
        master_args: Vec::new(),
        command: vec!["sh".into(), "-c".into(), script],
        path: "/pid",
        pid_in_body: true,
        _dir: dir,
    }
}

/// The literal, unmodified `python3 -m http.server PORT` (binding every address, dual-stack):
/// the port must be on its command line, so the master listens on a port chosen up front.
/// Responses do not say who served them; the master's per-worker counts do.
fn python_http_server_literal() -> Server {
    let dir = TempDir::new("py-literal");
    let port = free_port().to_string();
    Server {
        name: "python3 -m http.server PORT",
        master_args: vec!["--listen".into(), format!("127.0.0.1:{port}")],
        command: ["python3", "-m", "http.server", &port]
            .map(String::from)
            .to_vec(),
        // Served from the test's working directory: the crate root.
        path: "/Cargo.toml",
        pid_in_body: false,
        _dir: dir,
    }
}

fn node_app() -> Server {
    let dir = TempDir::new("node");
    let app = dir.write("app.js", NODE_APP);
    Server {
        name: "node app.js",
        master_args: Vec::new(),
        command: vec!["node".into(), app],
        path: "/",
        pid_in_body: true,
        _dir: dir,
    }
}

/// A free port outside the kernel's ephemeral range, so the port-0 binds and outgoing
/// connections of concurrently running tests cannot take it between this probe and the
/// master's bind.
fn free_port() -> u16 {
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low: u32 = range
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 12_000 {
        (10_000, low)
    } else {
        (61_000, 65_535)
    };
    let mut x = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = (from + (x % u64::from(to - from)) as u32) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {from}..{to}");
}

// --- the master's view ---------------------------------------------------------------------

/// Waits until the master's books balance after `total` connections: every worker reported
/// every connection it was handed as closed (`active` 0, `closed` = `dispatched`) and the
/// dispatched counts add up to `total`. Returns the last status.
fn wait_settled(cluster: &TestCluster, total: u64) -> Vec<WorkerStatus> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let stats = cluster.status();
        let dispatched: u64 = stats.iter().map(|s| s.dispatched).sum();
        if dispatched == total
            && stats
                .iter()
                .all(|s| s.active == 0 && s.closed == s.dispatched)
        {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "the master's counts did not settle to {total} dispatched, all closed: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kernel steering: waits until the table's books balance after `total` connections: the
/// placements (less write-offs) add up to `total`, and every slot's worker reports and accepted
/// and closed exactly what was placed on it. Returns the last status.
fn wait_steer_settled(cluster: &TestCluster, slots: usize, total: i64) -> Vec<SteerSlotStatus> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let st = cluster.steering_status(slots);
        let placed: i64 = st.iter().map(|s| s.assigned - s.forgiven).sum();
        if placed == total
            && st.iter().all(|s| {
                s.reporting && s.accepted == s.assigned - s.forgiven && s.closed == s.accepted
            })
        {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "the steering table did not settle to {total} placed, accepted and closed: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pid in a `pid P` body.
fn body_pid(resp: &Response) -> i32 {
    resp.body
        .trim()
        .strip_prefix("pid ")
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in body {:?}", resp.body))
}

/// Requests served per pid (empty if the body does not say); panics on any failure, showing
/// the first few.
fn tally(results: &[std::io::Result<Response>], pid_in_body: bool) -> BTreeMap<i32, u64> {
    let mut by_pid = BTreeMap::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(resp) if resp.status == 200 => {
                if pid_in_body {
                    *by_pid.entry(body_pid(resp)).or_default() += 1;
                }
            }
            Ok(resp) => failures.push(format!("status {}: {:?}", resp.status, resp.body)),
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, first: {:?}",
        failures.len(),
        results.len(),
        &failures[..failures.len().min(5)]
    );
    by_pid
}

// --- 1 and 2: every connection answered, by more than one worker, books balanced ----------------

/// Runs `server` under `policy` with 4 workers, 1,000 connections, and checks: all answered
/// 200; more than one worker served, each response by one of the master's workers (pid in the
/// body or, for a server that does not say, the master's per-worker close counts, which only
/// the worker's shim can report); in dispatch modes the master's books balance (least-conn's
/// `active` back to 0, every dispatched connection reported closed) and agree per worker with
/// who actually answered.
fn serve_everything(server: Server, policy: &str) {
    let mut args: Vec<String> = server.master_args.clone();
    args.extend(["--workers", &WORKERS.to_string(), "--policy", policy].map(String::from));
    args.push("--".into());
    args.extend(server.command.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cluster = TestCluster::start(&args);
    let workers: BTreeSet<i32> = cluster.wait_for_workers(WORKERS).into_iter().collect();

    let results = get_many(cluster.addr(), server.path, CONNECTIONS, CLIENTS);
    assert_eq!(results.len(), CONNECTIONS);
    let by_pid = tally(&results, server.pid_in_body);
    let what = format!("{} under {policy}", server.name);

    // No worker crashed or was replaced on the way.
    let after: BTreeSet<i32> = cluster.wait_for_workers(WORKERS).into_iter().collect();
    assert_eq!(after, workers, "{what}: the workers changed");
    if server.pid_in_body {
        assert_eq!(by_pid.values().sum::<u64>(), CONNECTIONS as u64);
        for pid in by_pid.keys() {
            assert!(workers.contains(pid), "{what}: pid {pid} is no worker");
        }
        assert!(
            by_pid.len() > 1,
            "{what}: one worker served all: {by_pid:?}"
        );
    }

    if policy == "reuseport" || policy == "shared" {
        eprintln!("{what}: {CONNECTIONS} answered; per worker pid {by_pid:?}");
        return;
    }
    if cluster.kernel_steered() {
        // The shim counted every connection on the steering table: placed = accepted = closed.
        let slots = wait_steer_settled(&cluster, WORKERS, CONNECTIONS as i64);
        eprintln!(
            "{what}, kernel-steered: {CONNECTIONS} answered; per worker pid {by_pid:?}; table {slots:?}"
        );
        if policy == "round-robin" {
            let placed: Vec<i64> = slots.iter().map(|s| s.assigned - s.forgiven).collect();
            let (min, max) = (placed.iter().min().unwrap(), placed.iter().max().unwrap());
            assert!(max - min <= 1, "{what}: unequal turns {placed:?}");
        }
        return;
    }
    let stats = wait_settled(&cluster, CONNECTIONS as u64);
    let dispatched: BTreeMap<i32, u64> = stats.iter().map(|s| (s.pid, s.dispatched)).collect();
    eprintln!(
        "{what}: {CONNECTIONS} answered; per worker pid: answered {by_pid:?}, dispatched \
         {dispatched:?}, rss_kib {:?}",
        stats.iter().map(|s| s.rss_kib).collect::<Vec<_>>()
    );
    assert_eq!(
        dispatched.keys().copied().collect::<BTreeSet<_>>(),
        workers,
        "{what}: {stats:?}"
    );
    if server.pid_in_body {
        // Who the master says it handed each connection to is who answered it.
        let answered: BTreeMap<i32, u64> = workers
            .iter()
            .map(|p| (*p, by_pid.get(p).copied().unwrap_or(0)))
            .collect();
        assert_eq!(answered, dispatched, "{what}");
    } else {
        let closing = stats.iter().filter(|s| s.closed > 0).count();
        assert!(closing > 1, "{what}: one worker served all: {stats:?}");
    }
    if policy == "round-robin" {
        let (min, max) = (
            dispatched.values().min().unwrap(),
            dispatched.values().max().unwrap(),
        );
        assert!(max - min <= 1, "{what}: unequal turns {dispatched:?}");
    }
}

#[test]
fn python_http_server_round_robin() {
    if available("python3") {
        serve_everything(python_http_server(), "round-robin");
    }
}

#[test]
fn python_http_server_literal_least_conn() {
    if available("python3") {
        serve_everything(python_http_server_literal(), "least-conn");
    }
}

#[test]
fn python_http_server_least_conn() {
    if available("python3") {
        serve_everything(python_http_server(), "least-conn");
    }
}

#[test]
fn python_http_server_least_mem() {
    if available("python3") {
        serve_everything(python_http_server(), "least-mem");
    }
}

#[test]
fn python_http_server_reuseport() {
    if available("python3") {
        serve_everything(python_http_server(), "reuseport");
    }
}

#[test]
fn node_round_robin() {
    if available("node") {
        serve_everything(node_app(), "round-robin");
    }
}

#[test]
fn node_least_conn() {
    if available("node") {
        serve_everything(node_app(), "least-conn");
    }
}

#[test]
fn node_least_mem() {
    if available("node") {
        serve_everything(node_app(), "least-mem");
    }
}

#[test]
fn node_reuseport() {
    if available("node") {
        serve_everything(node_app(), "reuseport");
    }
}

// --- 3: a multi-threaded accept loop gets every connection exactly once ------------------------

/// Four threads blocking in `accept()` on one socket the script binds to `$PORT` itself. Each
/// answer names the process, the thread and a per-process sequence number; on SIGTERM the
/// process prints how many connections it served.
const THREADED_ACCEPT: &str = r#"
import os, signal, socket, sys, threading

srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(os.environ["PORT"])))
srv.listen(64)
lock = threading.Lock()
served = 0

reported = False

def on_term(signum, frame):
    # Two SIGTERMs come (the master's, and the shim's when the master closes the channel); a
    # second one can run this handler again inside the first: report once.
    global reported
    if reported:
        return
    reported = True
    with lock:
        n = served
    sys.stderr.write(f"threaded-accept: pid {os.getpid()} served {n}\n")
    sys.stderr.flush()
    os._exit(0)

signal.signal(signal.SIGTERM, on_term)

def serve(name):
    global served
    while True:
        conn, _ = srv.accept()
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            with lock:
                served += 1
                seq = served
            body = f"pid {os.getpid()} thread {name} seq {seq}\n".encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
        finally:
            conn.close()

for i in range(4):
    threading.Thread(target=serve, args=(f"t{i}",), daemon=True).start()
while True:
    signal.pause()
"#;

#[test]
fn threaded_accept_gets_every_connection_exactly_once() {
    if !available("python3") {
        return;
    }
    const N: usize = 400;
    let dir = TempDir::new("threaded");
    let script = dir.write("threaded_accept.py", THREADED_ACCEPT);
    let mut cluster = TestCluster::start(&[
        "--workers",
        "2",
        "--policy",
        "least-conn",
        "--",
        "python3",
        &script,
    ]);
    let workers: BTreeSet<i32> = cluster.wait_for_workers(2).into_iter().collect();
    let results = get_many(cluster.addr(), "/", N, 8);
    tally(&results, true);

    // Exactly one answer per connection, and each process's sequence numbers are 1..=k: no
    // connection was answered twice or accepted and dropped.
    let mut seqs: BTreeMap<i32, Vec<u64>> = BTreeMap::new();
    let mut threads: BTreeSet<(i32, String)> = BTreeSet::new();
    for r in &results {
        let body = &r.as_ref().unwrap().body;
        let f: Vec<&str> = body.split_whitespace().collect();
        assert!(
            f.len() == 6 && f[0] == "pid" && f[2] == "thread" && f[4] == "seq",
            "not exactly one answer: {body:?}"
        );
        let pid: i32 = f[1].parse().unwrap();
        assert!(workers.contains(&pid), "pid {pid} is no worker");
        threads.insert((pid, f[3].to_string()));
        seqs.entry(pid).or_default().push(f[5].parse().unwrap());
    }
    for (pid, s) in &mut seqs {
        s.sort();
        let want: Vec<u64> = (1..=s.len() as u64).collect();
        assert_eq!(
            *s, want,
            "worker {pid} answered some connection twice or not at all"
        );
    }
    let dispatched: Vec<u64> = if cluster.kernel_steered() {
        wait_steer_settled(&cluster, 2, N as i64)
            .iter()
            .map(|s| s.accepted as u64)
            .collect()
    } else {
        wait_settled(&cluster, N as u64)
            .iter()
            .map(|s| s.dispatched)
            .collect()
    };

    // The servers' own totals, printed on SIGTERM.
    cluster.signal(libc::SIGTERM);
    assert_eq!(cluster.wait_exit(DEADLINE).code(), Some(0));
    // The master's last line follows every line its workers wrote before they exited.
    cluster.wait_for_log("shutdown complete", DEADLINE);
    let mut reported = BTreeMap::new();
    for line in cluster.log_lines() {
        let Some(report) = line.split("threaded-accept: pid ").nth(1) else {
            continue;
        };
        let f: Vec<&str> = report.split_whitespace().collect();
        let pid: i32 = f[0].parse().unwrap();
        let served: usize = f[2].parse().unwrap();
        assert_eq!(served, seqs.get(&pid).map_or(0, Vec::len), "{line}");
        assert!(
            reported.insert(pid, served).is_none(),
            "two reports: {line}"
        );
    }
    assert_eq!(
        reported.keys().copied().collect::<BTreeSet<_>>(),
        workers,
        "every worker reported"
    );
    let total: usize = reported.values().sum();
    eprintln!(
        "threaded accept: {N} connections, served per pid {:?}, {} (pid, thread) pairs \
         answered, master dispatched {:?}",
        seqs.iter()
            .map(|(p, s)| (*p, s.len()))
            .collect::<BTreeMap<_, _>>(),
        threads.len(),
        dispatched
    );
    assert_eq!(total, N, "the servers' own count");
    assert!(
        threads.len() > 1,
        "more than one accepting thread served: {threads:?}"
    );
}

// --- 4: a worker's children get neither the shim nor the listener --------------------------

/// Binds `$PORT` (the shim puts the listener there), then runs `env` and lists a child shell's
/// fds, and reports on one stderr line; then serves.
const CHILD_ENV_PY: &str = r#"
import os, socket, subprocess, sys

srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.bind(("127.0.0.1", int(os.environ["PORT"])))
srv.listen(16)
listener = os.readlink("/proc/self/fd/3")
same = os.readlink(f"/proc/self/fd/{srv.fileno()}") == listener
env = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout.splitlines()
leaked = [l.split("=", 1)[0] for l in env if l.startswith(("LD_PRELOAD=", "RCLUSTER_"))]
fds = subprocess.run(["sh", "-c", 'for f in /proc/$$/fd/*; do readlink "$f"; done; true'],
                     capture_output=True, text=True, close_fds=False, check=True).stdout.split()
own = [k for k in os.environ if k.startswith("RCLUSTER_") or k == "LD_PRELOAD"]
sys.stderr.write(
    f"child-report: pid {os.getpid()} bound-fd-is-fd3 {same} child-env-lines {len(env)} "
    f"child-leaked {','.join(leaked) or 'none'} child-has-listener {listener in fds} "
    f"child-fds {len(fds)} worker-env {','.join(own) or 'none'}\n")
sys.stderr.flush()
while True:
    conn, _ = srv.accept()
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        body = f"pid {os.getpid()}\n".encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
"#;

/// The same in node: libuv spawns the children.
const CHILD_ENV_JS: &str = r#"
const http = require('http'), fs = require('fs'), cp = require('child_process');
const server = http.createServer((q, s) => s.end('pid ' + process.pid + '\n'));
server.listen(process.env.PORT, () => {
  const listener = fs.readlinkSync('/proc/self/fd/3');
  const same = fs.readlinkSync('/proc/self/fd/' + server._handle.fd) === listener;
  const env = cp.execFileSync('env').toString().split('\n').filter(l => l);
  const leaked = env.filter(l => l.startsWith('LD_PRELOAD=') || l.startsWith('RCLUSTER_'))
    .map(l => l.split('=')[0]);
  const fds = cp.execFileSync('sh', ['-c', 'for f in /proc/$$/fd/*; do readlink "$f"; done; true'])
    .toString().split('\n').filter(l => l);
  const own = Object.keys(process.env).filter(k => k.startsWith('RCLUSTER_') || k === 'LD_PRELOAD');
  process.stderr.write(`child-report: pid ${process.pid} bound-fd-is-fd3 ${same ? 'True' : 'False'} ` +
    `child-env-lines ${env.length} child-leaked ${leaked.join(',') || 'none'} ` +
    `child-has-listener ${fds.includes(listener) ? 'True' : 'False'} child-fds ${fds.length} ` +
    `worker-env ${own.join(',') || 'none'}\n`);
});
"#;

fn children_get_no_shim(command: &[&str]) {
    let mut args = vec!["--workers", "2", "--policy", "round-robin", "--"];
    args.extend_from_slice(command);
    let cluster = TestCluster::start(&args);
    let workers = cluster.wait_for_workers(2);
    let reports = cluster.wait_for_count("child-report: pid ", 2, DEADLINE);
    for line in &reports {
        let report = line.split("child-report: ").nth(1).unwrap();
        let f: Vec<&str> = report.split_whitespace().collect();
        let field = |name: &str| f[f.iter().position(|x| *x == name).unwrap() + 1];
        let pid: i32 = field("pid").parse().unwrap();
        assert!(workers.contains(&pid), "{line}");
        // The worker got the listener through the shim: its own bound socket is fd 3's.
        assert_eq!(field("bound-fd-is-fd3"), "True", "{line}");
        // The server itself reads its contract (worker id, mode...), but the shim took its own
        // LD_PRELOAD entry out before the server's main, so nothing it starts loads the shim.
        let own: Vec<&str> = field("worker-env").split(',').collect();
        assert!(own.contains(&"RCLUSTER_WORKER_ID"), "{line}");
        assert!(own.contains(&"RCLUSTER_MODE"), "{line}");
        assert!(!own.contains(&"LD_PRELOAD"), "{line}");
        // Its children get neither the shim nor the contract's private variables nor the fd.
        assert!(
            field("child-env-lines").parse::<usize>().unwrap() > 0,
            "{line}"
        );
        assert_eq!(field("child-leaked"), "none", "{line}");
        assert_eq!(field("child-has-listener"), "False", "{line}");
        assert!(field("child-fds").parse::<usize>().unwrap() >= 3, "{line}");
    }
    // And the workers serve.
    let by_pid = tally(&get_many(cluster.addr(), "/", 20, 2), true);
    assert_eq!(by_pid.len(), 2, "{by_pid:?}");
    eprintln!("{}: {}", command[0], reports.join(" / "));
}

#[test]
fn python_workers_children_get_no_shim() {
    if available("python3") {
        let dir = TempDir::new("child-py");
        let script = dir.write("child_env.py", CHILD_ENV_PY);
        children_get_no_shim(&["python3", &script]);
    }
}

#[test]
fn node_workers_children_get_no_shim() {
    if available("node") {
        let dir = TempDir::new("child-js");
        let script = dir.write("child_env.js", CHILD_ENV_JS);
        children_get_no_shim(&["node", &script]);
    }
}

// --- 5 and 6: socket activation without the shim; NOTIFY_SOCKET readiness ---------------------

/// A socket-activated server: takes fd 3 from `LISTEN_FDS` as its listening socket. With
/// `notify` it sends `READY=1` and `STATUS=hello` to `NOTIFY_SOCKET` first; with `quiet` it
/// signals nothing.
const LISTEN_FDS_PY: &str = r#"
import os, socket, sys

assert os.environ["LISTEN_PID"] == str(os.getpid()), "LISTEN_PID is not this process"
assert os.environ["LISTEN_FDS"] == "1"
listener = socket.socket(fileno=3)
assert listener.type == socket.SOCK_STREAM
preload = os.environ.get("LD_PRELOAD") or "none"
mode = os.environ.get("RCLUSTER_MODE")
if sys.argv[1] == "notify":
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as n:
        n.sendto(b"READY=1\nSTATUS=hello", addr)
while True:
    conn, _ = listener.accept()
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        body = f"pid {os.getpid()} preload {preload} mode {mode}\n".encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
"#;

/// Runs the socket-activated server with `--no-preload` under `policy` (reuseport or shared)
/// with `extra` master arguments, waits until every worker is ready, and checks that 200
/// connections are answered by more than one worker, none of which had the shim.
fn socket_activated(policy: &str, readiness: &str, extra: &[&str]) -> TestCluster {
    let dir = TempDir::new("listen-fds");
    let script = dir.write("listen_fds.py", LISTEN_FDS_PY);
    let mut args = vec!["--workers", "4", "--policy", policy, "--no-preload"];
    args.extend_from_slice(extra);
    args.extend(["--", "python3", &script, readiness]);
    let cluster = TestCluster::start(&args);
    let workers = cluster.wait_for_workers(4);
    let results = get_many(cluster.addr(), "/", 200, CLIENTS);
    let by_pid = tally(&results, true);
    for r in &results {
        let body = &r.as_ref().unwrap().body;
        assert!(
            body.ends_with(&format!(" preload none mode {policy}\n")),
            "{policy}: {body:?}"
        );
    }
    assert!(by_pid.keys().all(|p| workers.contains(p)), "{by_pid:?}");
    assert!(
        by_pid.len() > 1,
        "{policy}: one worker served all: {by_pid:?}"
    );
    eprintln!("socket-activated python under {policy} ({readiness}): {by_pid:?}");
    cluster
}

#[test]
fn listen_fds_server_without_shim_shared_notify() {
    if !available("python3") {
        return;
    }
    // No --ready-delay: only the server's own READY=1 makes it ready before --ready-timeout.
    let cluster = socket_activated("shared", "notify", &[]);
    for pid in cluster.wait_for_workers(4) {
        cluster.wait_for_log(&format!("ready: pid {pid} (READY=1"), DEADLINE);
    }
}

#[test]
fn listen_fds_server_without_shim_reuseport_ready_delay() {
    if !available("python3") {
        return;
    }
    let cluster = socket_activated("reuseport", "quiet", &["--ready-delay", "100ms"]);
    for pid in cluster.wait_for_workers(4) {
        cluster.wait_for_log(
            &format!("ready: pid {pid} (--ready-delay elapsed"),
            DEADLINE,
        );
    }
}

#[test]
fn notify_socket_ready_and_status_or_ready_delay() {
    if !available("python3") {
        return;
    }
    let dir = TempDir::new("notify");
    let script = dir.write("listen_fds.py", LISTEN_FDS_PY);

    // Signals READY=1 and STATUS=hello: ready by its word (no delay configured), its status
    // line in the master's log.
    let told = TestCluster::start(&[
        "--workers",
        "2",
        "--policy",
        "shared",
        "--no-preload",
        "--",
        "python3",
        &script,
        "notify",
    ]);
    for pid in told.wait_for_workers(2) {
        let ready = told.wait_for_log(&format!("ready: pid {pid} ("), DEADLINE);
        assert!(ready.contains("(READY=1,"), "{ready}");
        told.wait_for_log(&format!("(pid {pid}) status: hello"), DEADLINE);
    }
    tally(&get_many(told.addr(), "/", 20, 2), true);

    // Signals nothing: ready once --ready-delay elapsed, and serving.
    let quiet = TestCluster::start(&[
        "--workers",
        "2",
        "--policy",
        "shared",
        "--no-preload",
        "--ready-delay",
        "300ms",
        "--",
        "python3",
        &script,
        "quiet",
    ]);
    for pid in quiet.wait_for_workers(2) {
        let ready = quiet.wait_for_log(&format!("ready: pid {pid} ("), DEADLINE);
        assert!(ready.contains("(--ready-delay elapsed,"), "{ready}");
    }
    assert!(!quiet.log_contains(" status: "), "no STATUS= was sent");
    tally(&get_many(quiet.addr(), "/", 20, 2), true);
}

// --- issue 9: least-conn never ties onto a busy worker ----------------------------------------

/// The busy-worker scenario with an unmodified node server through the shim: 2 workers, a 2 s
/// request on one, 20 sequential short requests, 0 of them to the busy worker, in each of 20
/// trials.
#[test]
fn node_least_conn_never_ties_onto_a_busy_worker() {
    if !available("node") {
        return;
    }
    let (_dir, cluster) = node_spin_cluster("dispatch");
    busy_worker_trials(&cluster, "/", body_pid);
}

/// The path of a single-threaded python server that waits in `select` (argument `select`) or
/// `poll` (`poll`) on its non-blocking listener and accepts until `EAGAIN`, as gunicorn's sync
/// worker does; `?us=N` spins N µs before answering `pid P`.
const PY_WAIT_APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/wait_server.py");

/// Two workers running `command` (a server answering `pid P`, spinning on `?us=N`) under
/// least-conn with `--steer STEER` (`dispatch`: the master's own, whose status dump counts
/// dispatches; `kernel`: every slot eligible in the table), both serving.
fn spin_cluster(steer: &str, command: &[&str]) -> TestCluster {
    let mut args = vec![
        "--workers",
        "2",
        "--policy",
        "least-conn",
        "--steer",
        steer,
        "--",
    ];
    args.extend_from_slice(command);
    let cluster = TestCluster::start(&args);
    cluster.wait_for_workers(2);
    if steer == "kernel" {
        for slot in 0..2 {
            cluster.wait_for_log(&format!("steering: slot {slot} eligible"), DEADLINE);
        }
    }
    for _ in 0..4 {
        assert_eq!(get(cluster.addr(), "/").unwrap().status, 200);
    }
    cluster
}

/// Two node workers running [`NODE_SPIN_APP`] ([`spin_cluster`]). The directory holds the app.
fn node_spin_cluster(steer: &str) -> (TempDir, TestCluster) {
    let dir = TempDir::new("node-spin");
    let app = dir.write("app.js", NODE_SPIN_APP);
    let cluster = spin_cluster(steer, &["node", &app]);
    (dir, cluster)
}

/// [`node_spin_cluster`] under kernel steering; `None` (with a note) where node or the
/// steering program is not available.
fn node_kernel_spin_cluster() -> Option<(TempDir, TestCluster)> {
    if !available("node") || !steering_available() {
        return None;
    }
    Some(node_spin_cluster("kernel"))
}

/// Two [`PY_WAIT_APP`] workers waiting in `wait` (`select` or `poll`) under kernel steering
/// ([`spin_cluster`]); `None` (with a note) where python3 or the steering program is not
/// available.
fn py_wait_kernel_cluster(wait: &str) -> Option<TestCluster> {
    if !available("python3") || !steering_available() {
        return None;
    }
    Some(spin_cluster("kernel", &["python3", PY_WAIT_APP, wait]))
}

/// A server that waits in `select` (gunicorn's sync worker does) watches the overflow queue
/// through the shim, which adds the queue's bit beside its listener's: with both workers inside
/// long requests, new connections wait there and the worker that comes free first takes them
/// all.
#[test]
fn select_server_kernel_overflow_queue_goes_to_the_first_worker_free() {
    let Some(cluster) = py_wait_kernel_cluster("select") else {
        return;
    };
    overflow_trial(&cluster, body_pid, Some(1));
}

/// As [`select_server_kernel_overflow_queue_goes_to_the_first_worker_free`], for a server that
/// waits in `poll` (the shim appends the queue to a copy of its array).
#[test]
fn poll_server_kernel_overflow_queue_goes_to_the_first_worker_free() {
    let Some(cluster) = py_wait_kernel_cluster("poll") else {
        return;
    };
    overflow_trial(&cluster, body_pid, Some(1));
}

/// The path of a single-threaded python server that waits in epoll and calls `accept` once per
/// report of its listener, as node does; `/stats` answers the most reports of its listener one
/// wait returned.
const PY_EPOLL_APP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/epoll_server.py"
);

/// Under kernel steering a server waiting in epoll is told of its listener at most once per
/// wait, when connections wait both on its own listener and in the overflow queue, as epoll
/// tells of one fd once: a server that calls `accept` once per report (node) takes one
/// connection per pass of its loop, as from a listener of its own, instead of a second one that
/// would wait behind the first's request. The worker is stopped in its wait; the first
/// connection is placed on its listener (its loop waits), the second in the queue (a placement
/// on its listener is still untaken); then it runs again. Without the shim turning the queue's
/// report into the listener's, that wait reports the listener twice.
#[test]
fn kernel_steering_reports_a_listener_once_per_wait() {
    if !available("python3") || !steering_available() {
        return;
    }
    let cluster = TestCluster::start(&[
        "--workers",
        "1",
        "--policy",
        "least-conn",
        "--steer",
        "kernel",
        "--",
        "python3",
        PY_EPOLL_APP,
    ]);
    let pid = cluster.wait_for_workers(1)[0];
    cluster.wait_for_log("steering: slot 0 eligible", DEADLINE);
    assert_eq!(get(cluster.addr(), "/").unwrap().status, 200);
    assert!(
        cluster.steering_status(1)[0].watches,
        "the worker watches the overflow queue"
    );
    wait_in_epoll_wait(pid);
    let before = cluster.overflow_status();
    kill(pid, libc::SIGSTOP);
    wait_stopped(pid);
    let own = send_request(cluster.addr(), "/").expect("first request");
    let queued = send_request(cluster.addr(), "/").expect("second request");
    let after = cluster.overflow_status();
    kill(pid, libc::SIGCONT);
    assert_eq!(
        after.assigned - before.assigned,
        1,
        "the second connection waits in the overflow queue, the first on the listener"
    );
    for s in [own, queued] {
        let r = read_response(s).expect("response");
        assert_eq!((r.status, body_pid(&r)), (200, pid), "{r:?}");
    }
    let stats = get(cluster.addr(), "/stats").expect("stats");
    assert_eq!(
        stats.body.trim(),
        "listener_reports_max 1",
        "reports of the listener in one wait"
    );
}

/// Under kernel steering the shim stamps the node loop's waits on the table: a node worker
/// inside a long request is passed over 1 ms into it although it holds fewer connections.
#[test]
fn node_kernel_least_conn_passes_over_a_worker_stuck_in_a_long_request() {
    let Some((_dir, cluster)) = node_kernel_spin_cluster() else {
        return;
    };
    kernel_stuck_trial(&cluster, body_pid);
}

/// Under kernel steering the shim registers the overflow queue in node's epoll set beside its
/// listener: with both node workers inside long requests, new connections wait there and the
/// worker that comes free first takes them all.
#[test]
fn node_kernel_overflow_queue_goes_to_the_first_worker_free() {
    let Some((_dir, cluster)) = node_kernel_spin_cluster() else {
        return;
    };
    overflow_trial(&cluster, body_pid, Some(0));
}

/// A node worker inside a long request holds fewer connections than its peer, so by counts it
/// would win every pick: once a connection has sat untaken on it, none of the next short
/// requests goes there.
#[test]
fn node_least_conn_passes_over_a_worker_stuck_in_a_long_request() {
    if !available("node") {
        return;
    }
    let (_dir, cluster) = node_spin_cluster("dispatch");
    stuck_worker_trial(&cluster, "/", body_pid);
}
