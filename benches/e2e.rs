//! End-to-end benchmark of the real `rcluster-lb` binary: every policy with the built-in demo
//! worker, and (when `node` is on PATH) one node app under Node's cluster module and under
//! rcluster-lb through the preload shim, under connection churn, a heavy-tailed CPU-bound
//! request mix and long-lived keep-alive clients, in interleaved rounds, reporting medians and
//! checking the project's targets. Where `wrk` is on PATH, the node group's churn is measured
//! with `wrk` too, on the same running instance, as a cross-check of the load generator.
//!
//! Run it with `scripts/bench.sh` or `cargo bench --bench e2e`. Environment:
//! - `RCLUSTER_BENCH_QUICK=1`: one round of short runs (a smoke run of about two minutes).
//! - `RCLUSTER_BENCH_WORKERS=N`: workers per system (default: the CPUs this process may use).
//! - `RCLUSTER_BENCH_ROUNDS=R`: rounds (default 3; quick: 1).
//! - `RCLUSTER_BENCH_PIN=none|auto|LIST`: passed to rcluster-lb as `--pin`.
//! - `RCLUSTER_BENCH_ACCEPTOR_CPU=CPU`: passed to rcluster-lb as `--acceptor-cpu`.
//! - `RCLUSTER_BENCH_ONLY=a,b`: only these systems (exact names) or groups (`demo`, `node`).
//! - `RCLUSTER_BENCH_BIN=PATH`: the binary under test (default: the one cargo built for this
//!   bench, `target/release/rcluster-lb`; the preload shim is looked for beside it).
//! - `RCLUSTER_BENCH_WRK=PATH|0`: the `wrk` to cross-check churn with (default: `wrk` on PATH;
//!   `0`: no cross-check).
//! - `RCLUSTER_BENCH_OUT=DIR`: where results go (default `target/bench-results`).
//!
//! Output: markdown tables on stdout and in `target/bench-results/e2e.md`; every run's raw
//! numbers in `target/bench-results/e2e-runs.csv` (`scripts/bench_report.py` plots them).
//!
//! Method:
//! - A round runs every system once, in an order rotated by one each round; each system is
//!   started fresh for the round, warmed up with unrecorded runs of each kind of request (see
//!   [`Running::warm_up`]: a cold node app measured 2–3× slower in its first seconds, and
//!   again for a second after its first keep-alive requests), then runs churn (and `wrk`
//!   churn, first or second by round), the heavy mix at 50/75/90 %, and keep-alive.
//!   Tables show per-system medians over rounds; ratios are medians of the per-round ratios
//!   (each round's runs are close in time, so drift between rounds cancels). The heavy mix's
//!   tables and p99 checks also give the p99 of the paired rounds' requests pooled into one
//!   histogram per system, and its ratio: one round's p99 rests on a few dozen long requests
//!   and moves by tens of percent between rounds; the pooled figure reads it from all of them.
//! - Churn is a closed loop of 16 clients per worker, each opening a new connection per
//!   request; the `wrk` cross-check runs `wrk -t1 -cN -H 'Connection: close'` with the same N
//!   and duration, so both tools measure the same configuration. The two clients share the
//!   CPUs with the servers and differ in what a connection costs them (measured: this
//!   process's CPU for the load generator, the reaped child's for `wrk`), so their absolute
//!   rates differ; the check is that both see the same comparison between systems (each
//!   system's rate ÷ `shared+node`'s, per round).
//! - Capacity for the heavy mix is *measured* once at the start of the run: the throughput of a
//!   closed loop (8 clients per worker) of that mix on `reuseport` with the demo worker (for
//!   the Node group: on Node's cluster with SCHED_NONE, the same node app). If that probe
//!   fails, capacity is computed instead as workers / mean service time (mean of `us=`).
//! - Master CPU is the master process's own utime + stime (all its threads, not its children:
//!   fields 14 and 15 of `/proc/PID/stat`), sampled before and after each run; the clock tick
//!   makes it exact to 10 ms per run.
//!
//! Process ownership: every system is spawned by [`Running::start`] and owned by the
//! [`Running`] guard, whose `Drop` SIGTERMs the master by pid, waits for it (bounded), SIGKILLs
//! it if it has to, reaps it, and SIGKILLs by pid any of its worker processes that outlived it,
//! so a panic or an early return leaves nothing running. Load goes to 127.0.0.1 only (the load
//! generator refuses anything else).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcluster_lb::policy::PolicyKind;
use rcluster_loadgen::wrk::{WrkReport, WrkSpec};
use rcluster_loadgen::{ErrorCounts, Load, LoadSpec, Mix, Report};

/// The heavy-tailed CPU-bound mix of DESIGN.md §6.
const HEAVY_MIX: &str = "98% us=200, 2% us=20000";
/// Offered load for the heavy mix, percent of capacity.
const HEAVY_LEVELS_PERCENT: [u32; 3] = [50, 75, 90];
/// Closed-loop clients per worker for the churn scenario (and `wrk -c`) and for the capacity
/// probe.
const CHURN_CLIENTS_PER_WORKER: usize = 16;
const PROBE_CLIENTS_PER_WORKER: usize = 8;
/// Keep-alive scenario: clients, each sending one request per interval on its connection.
const KEEPALIVE_CLIENTS: usize = 200;
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(100);
/// How long a system may take to print its readiness line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a master gets to exit after SIGTERM before it is SIGKILLed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Stderr lines kept per system for failure reports.
const STDERR_TAIL_LINES: usize = 12;

// ---------------------------------------------------------------------------------------------
// Settings.

struct Settings {
    quick: bool,
    workers: usize,
    rounds: usize,
    warmup: Duration,
    churn: Duration,
    heavy: Duration,
    keepalive: Duration,
    probe: Duration,
    request_timeout: Duration,
    mix: Mix,
    bin: PathBuf,
    node: Option<PathBuf>,
    wrk: Option<PathBuf>,
    pin: Option<String>,
    acceptor_cpu: Option<String>,
    only: Vec<String>,
    out_dir: PathBuf,
    clk_tck: f64,
}

impl Settings {
    fn from_env() -> Settings {
        let quick = env_flag("RCLUSTER_BENCH_QUICK");
        let workers = env_parse("RCLUSTER_BENCH_WORKERS").unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        });
        let rounds = env_parse("RCLUSTER_BENCH_ROUNDS").unwrap_or(if quick { 1 } else { 3 });
        let secs = |full: f64, q: f64| Duration::from_secs_f64(if quick { q } else { full });
        let bin = std::env::var_os("RCLUSTER_BENCH_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_rcluster-lb")));
        let out_dir = std::env::var_os("RCLUSTER_BENCH_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(default_out_dir);
        Settings {
            quick,
            workers: workers.max(1),
            rounds: rounds.max(1),
            warmup: secs(1.5, 0.8),
            churn: secs(3.0, 1.0),
            heavy: secs(4.0, 1.0),
            keepalive: secs(2.0, 1.0),
            probe: secs(4.0, 1.5),
            request_timeout: Duration::from_secs(5),
            mix: HEAVY_MIX.parse().expect("the heavy mix spec is valid"),
            bin,
            node: find_on_path("node"),
            wrk: match std::env::var_os("RCLUSTER_BENCH_WRK") {
                Some(v) if v == "0" || v.is_empty() => None,
                Some(v) => Some(PathBuf::from(v)),
                None => find_on_path("wrk"),
            },
            pin: std::env::var("RCLUSTER_BENCH_PIN").ok(),
            acceptor_cpu: std::env::var("RCLUSTER_BENCH_ACCEPTOR_CPU").ok(),
            only: std::env::var("RCLUSTER_BENCH_ONLY")
                .map(|s| s.split(',').map(|p| p.trim().to_owned()).collect())
                .unwrap_or_default(),
            out_dir,
            clk_tck: clock_ticks_per_second(),
        }
    }

    fn spec(&self, addr: SocketAddr, load: Load, duration: Duration) -> LoadSpec {
        LoadSpec {
            duration,
            request_timeout: self.request_timeout,
            ..LoadSpec::new(addr, load)
        }
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Option<T> {
    let v = std::env::var(name).ok()?;
    match v.parse() {
        Ok(x) => Some(x),
        Err(_) => panic!("{name}={v:?} is not a valid value"),
    }
}

/// `target/bench-results`, found from this executable's place in `target/<profile>/deps/`.
fn default_out_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the bench knows its own path");
    exe.ancestors()
        .nth(3)
        .map(|target| target.join("bench-results"))
        .unwrap_or_else(|| PathBuf::from("bench-results"))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `getconf CLK_TCK` (the unit of utime/stime in proc(5)); 100 if that fails.
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

// ---------------------------------------------------------------------------------------------
// Systems under test.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    /// rcluster-lb with its built-in demo worker.
    Demo,
    /// The node app: under Node's cluster module, and under rcluster-lb.
    Node,
}

impl Group {
    fn name(self) -> &'static str {
        match self {
            Group::Demo => "demo",
            Group::Node => "node",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Launch {
    /// rcluster-lb with this policy and its built-in demo worker.
    Rcluster(PolicyKind),
    /// Node's cluster module running the node app.
    NodeCluster { round_robin: bool },
    /// rcluster-lb with this policy running the node app through the preload shim.
    RclusterNode(PolicyKind),
    /// As `Rcluster`, placed by the kernel-steering program (`--steer kernel`).
    RclusterKernel(PolicyKind),
    /// As `RclusterNode`, placed by the kernel-steering program (`--steer kernel`).
    RclusterNodeKernel(PolicyKind),
}

/// Row-name suffix of a kernel-steered system (`--steer kernel`).
const KERNEL: &str = " kernel";

/// Whether the steering program loads here (the kernel rows run only then).
fn kernel_steering() -> bool {
    match rcluster_lb::steer::Steering::load(1) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("kernel steering unavailable ({e}): no kernel rows");
            false
        }
    }
}

#[derive(Debug, Clone)]
struct System {
    name: String,
    group: Group,
    launch: Launch,
}

impl System {
    /// Whether churn on this system is also measured with `wrk`: the node group, whose peers
    /// (Node's cluster module) are what the ratios in BENCHMARKS.md are taken against.
    fn wrk_checked(&self) -> bool {
        self.group == Group::Node
    }
}

const NODE_RR: &str = "node-cluster-rr";
const NODE_NONE: &str = "node-cluster-none";

/// The name of rcluster-lb with `policy` running the node app.
fn node_name(policy: PolicyKind) -> String {
    format!("{}+node", policy.name())
}

/// rcluster-lb policies run with the node app: the two dispatch policies the issue's targets
/// name and both kernel modes, so every kernel mode has a node row.
const NODE_POLICIES: [PolicyKind; 4] = [
    PolicyKind::LeastConn,
    PolicyKind::RoundRobin,
    PolicyKind::Reuseport,
    PolicyKind::Shared,
];

fn systems(settings: &Settings) -> Vec<System> {
    let mut v: Vec<System> = PolicyKind::ALL
        .iter()
        .map(|&p| System {
            name: p.name().to_owned(),
            group: Group::Demo,
            launch: Launch::Rcluster(p),
        })
        .collect();
    let kernel = kernel_steering();
    if kernel {
        for p in [
            PolicyKind::LeastConn,
            PolicyKind::RoundRobin,
            PolicyKind::P2c,
            PolicyKind::LeastMem,
        ] {
            v.push(System {
                name: format!("{}{KERNEL}", p.name()),
                group: Group::Demo,
                launch: Launch::RclusterKernel(p),
            });
        }
    }
    if settings.node.is_some() {
        let peers = [
            (
                NODE_RR.to_owned(),
                Launch::NodeCluster { round_robin: true },
            ),
            (
                NODE_NONE.to_owned(),
                Launch::NodeCluster { round_robin: false },
            ),
        ];
        let ours = NODE_POLICIES
            .iter()
            .map(|&p| (node_name(p), Launch::RclusterNode(p)))
            .chain(kernel.then(|| {
                let p = PolicyKind::LeastConn;
                (
                    format!("{}{KERNEL}", node_name(p)),
                    Launch::RclusterNodeKernel(p),
                )
            }));
        for (name, launch) in peers.into_iter().chain(ours) {
            v.push(System {
                name,
                group: Group::Node,
                launch,
            });
        }
    }
    if !settings.only.is_empty() {
        v.retain(|s| {
            settings
                .only
                .iter()
                .any(|o| *o == s.name || o == s.group.name())
        });
    }
    v
}

/// The node app and the cluster launcher, written to a fresh directory removed on drop.
struct NodeApp {
    dir: PathBuf,
}

/// An HTTP app equivalent to the demo worker: `X-Worker-Id`, `X-Worker-Pid`, `?us=N` spins.
const NODE_APP_JS: &str = include_str!("node_app.js");

/// Node's cluster module running app.js; prints the same readiness lines as rcluster-lb.
const NODE_CLUSTER_JS: &str = r#"'use strict';
const cluster = require('node:cluster');
const path = require('node:path');
const workers = Number(process.env.WORKERS || 2);
let stopping = false;
let listening = 0;
// The bench also sets NODE_CLUSTER_SCHED_POLICY, which node reads when `cluster` is first
// required; this assignment must come before setupPrimary()/fork(), which freeze the policy.
cluster.schedulingPolicy = process.env.SCHED === 'none' ? cluster.SCHED_NONE : cluster.SCHED_RR;
cluster.setupPrimary({ exec: path.join(__dirname, 'app.js') });
// The policy in force, checked by the bench before it measures anything.
console.error(`scheduling policy: ${cluster.schedulingPolicy === cluster.SCHED_NONE ? 'none' : 'rr'}`);
cluster.on('listening', (worker, address) => {
  if (listening === 0) console.error(`listening on 127.0.0.1:${address.port}`);
  listening += 1;
  if (listening === workers) console.error(`all ${workers} workers ready`);
});
cluster.on('exit', (worker, code, signal) => {
  if (!stopping) console.error(`worker ${worker.id} exited (${signal || code})`);
});
process.on('SIGTERM', () => {
  stopping = true;
  cluster.disconnect(() => process.exit(0));
  setTimeout(() => process.exit(1), 5000).unref();
});
for (let i = 0; i < workers; i += 1) cluster.fork({ PORT: '0' });
"#;

impl NodeApp {
    fn write() -> std::io::Result<NodeApp> {
        let dir = std::env::temp_dir().join(format!("rcluster-bench-node-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let app = NodeApp { dir };
        std::fs::write(app.app_js(), NODE_APP_JS)?;
        std::fs::write(app.dir.join("cluster.js"), NODE_CLUSTER_JS)?;
        Ok(app)
    }

    fn app_js(&self) -> PathBuf {
        self.dir.join("app.js")
    }
}

impl Drop for NodeApp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// A running system and its guard.

enum StderrEvent {
    Listening(SocketAddr),
    Ready,
}

/// One started system: the master process, its address and the tail of its stderr. Dropping it
/// stops everything it started.
struct Running {
    child: Child,
    addr: SocketAddr,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stopped: bool,
}

impl Running {
    fn start(
        system: &System,
        settings: &Settings,
        node: Option<&NodeApp>,
    ) -> Result<Running, String> {
        let workers = settings.workers.to_string();
        let rcluster = |policy: PolicyKind, kernel: bool| {
            let mut c = Command::new(&settings.bin);
            c.args(["--listen", "127.0.0.1:0", "--workers", &workers])
                .args(["--policy", policy.name()])
                .env("RCLUSTER_LOG", "info");
            // Explicit either way: the default (auto) steers in the kernel where it can (every
            // policy but the kernel's own modes).
            if !matches!(policy, PolicyKind::Reuseport | PolicyKind::Shared) {
                c.args(["--steer", if kernel { "kernel" } else { "dispatch" }]);
            }
            if let Some(pin) = &settings.pin {
                c.args(["--pin", pin]);
            }
            if let Some(cpu) = &settings.acceptor_cpu {
                c.args(["--acceptor-cpu", cpu]);
            }
            c
        };
        let node_paths = || -> Result<(&Path, &NodeApp), String> {
            match (settings.node.as_deref(), node) {
                (Some(n), Some(app)) => Ok((n, app)),
                _ => Err("node is not available".to_owned()),
            }
        };
        let mut cmd = match system.launch {
            Launch::Rcluster(policy) => rcluster(policy, false),
            Launch::RclusterKernel(policy) => rcluster(policy, true),
            Launch::NodeCluster { round_robin } => {
                let (node, app) = node_paths()?;
                let mut c = Command::new(node);
                let sched = if round_robin { "rr" } else { "none" };
                c.arg(app.dir.join("cluster.js"))
                    .env("WORKERS", &workers)
                    .env("SCHED", sched)
                    .env("NODE_CLUSTER_SCHED_POLICY", sched);
                c
            }
            Launch::RclusterNode(policy) | Launch::RclusterNodeKernel(policy) => {
                let (node, app) = node_paths()?;
                let kernel = matches!(system.launch, Launch::RclusterNodeKernel(_));
                let mut c = rcluster(policy, kernel);
                c.arg("--").arg(node).arg(app.app_js());
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot spawn {cmd:?}: {e}"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        // The guard exists from here on, so every return below stops the process.
        let mut running = Running {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr_tail: Arc::clone(&stderr_tail),
            stopped: false,
        };
        let (tx, rx) = mpsc::channel();
        // Detached: it ends at EOF, when the master and every worker holding the pipe are gone.
        std::thread::spawn(move || read_stderr(stderr, &stderr_tail, &tx));

        let deadline = Instant::now() + READY_TIMEOUT;
        let (mut listening, mut ready) = (None, false);
        while listening.is_none() || !ready {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(StderrEvent::Listening(a)) => listening = listening.or(Some(a)),
                Ok(StderrEvent::Ready) => ready = true,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "not ready within {READY_TIMEOUT:?} (listening: {listening:?}, ready: {ready}); stderr: {}",
                        running.tail()
                    ));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Stderr closed: the master is exiting; reap it here so that the guard has
                    // nothing left to stop and the status goes into this one message.
                    let status =
                        wait_with_deadline(&mut running.child, Instant::now() + STOP_TIMEOUT);
                    running.stopped = status.is_some();
                    let status = status.map_or("still running".to_owned(), |s| s.to_string());
                    return Err(format!(
                        "exited before it was ready ({status}); stderr: {}",
                        running.tail()
                    ));
                }
            }
        }
        running.addr = listening.expect("loop ends only once listening");
        if let Launch::NodeCluster { round_robin } = system.launch {
            let want = if round_robin { "rr" } else { "none" };
            let line = format!("scheduling policy: {want}");
            if !running.tail().contains(&line) {
                return Err(format!(
                    "node's cluster did not report `{line}`; stderr: {}",
                    running.tail()
                ));
            }
        }
        Ok(running)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn tail(&self) -> String {
        let tail = self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
        let v: Vec<&str> = tail.iter().map(String::as_str).collect();
        v.join(" | ")
    }

    /// Runs one load against the system, with the master's CPU time around it.
    fn measure(&mut self, spec: &LoadSpec, settings: &Settings) -> Result<Metrics, String> {
        let own_pid = std::process::id();
        let cpu_before = cpu_seconds(self.pid(), settings.clk_tck);
        let own_before = cpu_seconds(own_pid, settings.clk_tck);
        let report = spec.run().map_err(|e| format!("load generator: {e}"))?;
        let cpu_after = cpu_seconds(self.pid(), settings.clk_tck);
        let own_after = cpu_seconds(own_pid, settings.clk_tck);
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(format!(
                "master exited during the run ({status}); {}; stderr: {}",
                report,
                self.tail()
            ));
        }
        if report.completed == 0 {
            return Err(format!(
                "no request completed ({}); stderr: {}",
                report.errors,
                self.tail()
            ));
        }
        let delta = |before: Option<f64>, after: Option<f64>| {
            before.zip(after).map(|(b, a)| (a - b).max(0.0))
        };
        Ok(Metrics::new(
            &report,
            settings.workers,
            delta(cpu_before, cpu_after),
            delta(own_before, own_after),
        ))
    }

    /// Unrecorded runs of every kind of request the scenarios send (keep-alive, the heavy mix,
    /// then churn), so that no scenario measures a cold server. Measured on the node app:
    /// node reaches its churn rate only after 1–2 s (its JIT compiling the hot paths), and the
    /// first keep-alive requests a server sees cut the next second of churn to a third
    /// (recompiling for a path not seen before); a second keep-alive run costs nothing.
    fn warm_up(&mut self, settings: &Settings) -> Result<(), String> {
        let clients = CHURN_CLIENTS_PER_WORKER * settings.workers;
        let short = settings.warmup / 4;
        let keepalive = Load::KeepAlive {
            clients: KEEPALIVE_CLIENTS,
            interval: KEEPALIVE_INTERVAL,
        };
        let heavy = LoadSpec {
            mix: settings.mix.clone(),
            ..settings.spec(self.addr, Load::Closed { clients }, short)
        };
        for spec in [
            settings.spec(self.addr, keepalive, short.max(KEEPALIVE_INTERVAL * 2)),
            heavy,
            settings.spec(self.addr, Load::Closed { clients }, settings.warmup),
        ] {
            self.measure(&spec, settings)
                .map_err(|e| format!("warm-up: {e}"))?;
        }
        Ok(())
    }

    /// Runs `wrk` churn against the system (closed loop, `clients` connections, each request
    /// on a new connection), with the master's CPU time around it.
    fn measure_wrk(
        &mut self,
        wrk: &Path,
        clients: usize,
        duration: Duration,
        settings: &Settings,
    ) -> Result<Metrics, String> {
        let spec = WrkSpec {
            wrk: wrk.to_owned(),
            target: self.addr,
            connections: clients,
            duration,
            timeout: settings.request_timeout,
        };
        let cpu_before = cpu_seconds(self.pid(), settings.clk_tck);
        let wrk_before = reaped_children_cpu_seconds(settings.clk_tck);
        let report = spec.run().map_err(|e| e.to_string())?;
        let cpu_after = cpu_seconds(self.pid(), settings.clk_tck);
        let wrk_after = reaped_children_cpu_seconds(settings.clk_tck);
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(format!(
                "master exited during the wrk run ({status}); stderr: {}",
                self.tail()
            ));
        }
        if report.requests == 0 {
            return Err(format!("wrk completed no request: {report:?}"));
        }
        let delta = |before: Option<f64>, after: Option<f64>| {
            before.zip(after).map(|(b, a)| (a - b).max(0.0))
        };
        Ok(Metrics::from_wrk(
            &report,
            delta(cpu_before, cpu_after),
            delta(wrk_before, wrk_after),
        ))
    }

    /// Graceful stop: SIGTERM to the master; an exit status other than 0 is returned as an
    /// error message (the processes are gone either way).
    fn stop(mut self) -> Result<(), String> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), String> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let pid = self.pid();
        let workers = children_of(pid);
        let mut result = Ok(());
        if let Ok(None) = self.child.try_wait() {
            send_signal(pid, "TERM");
            match wait_with_deadline(&mut self.child, Instant::now() + STOP_TIMEOUT) {
                Some(status) if status.success() => {}
                Some(status) => {
                    result = Err(format!(
                        "exited with {status} after SIGTERM; stderr: {}",
                        self.tail()
                    ));
                }
                None => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    result = Err(format!(
                        "did not exit within {STOP_TIMEOUT:?} of SIGTERM, killed"
                    ));
                }
            }
        } else {
            let _ = self.child.wait();
        }
        let stragglers: Vec<u32> = workers.into_iter().filter(|&w| is_alive(w)).collect();
        for &w in &stragglers {
            send_signal(w, "KILL");
        }
        if !stragglers.is_empty() && result.is_ok() {
            result = Err(format!(
                "workers {stragglers:?} outlived the master, killed"
            ));
        }
        result
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("e2e: while stopping pid {}: {e}", self.pid());
        }
    }
}

fn read_stderr(
    stderr: std::process::ChildStderr,
    tail: &Mutex<VecDeque<String>>,
    events: &mpsc::Sender<StderrEvent>,
) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if let Some(rest) = line.split("listening on ").nth(1) {
            let addr = rest.split_whitespace().next().unwrap_or("");
            if let Ok(a) = addr.parse() {
                let _ = events.send(StderrEvent::Listening(a));
            }
        }
        if line.contains("workers ready") && line.contains("all ") {
            let _ = events.send(StderrEvent::Ready);
        }
        let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() == STDERR_TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line);
    }
}

/// `kill -s SIG PID` through kill(1): one process, by pid.
fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits for the child until `deadline`, polling (std has no wait with a timeout).
fn wait_with_deadline(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

/// The children of every thread of `pid` (`/proc/PID/task/TID/children`, proc(5)).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut v: Vec<u32> = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Whether `pid` exists and is not a zombie.
fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s[s.rfind(')')? + 1..].split_whitespace().next()?.to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// utime + stime of `pid` (all its threads, not its children), seconds: fields 14 and 15 of
/// `/proc/PID/stat` (proc(5)), counted after the `)` that ends the command name.
fn cpu_seconds(pid: u32, clk_tck: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // fields[0] is field 3 (state), so field 14 is fields[11].
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clk_tck)
}

/// cutime + cstime of this process, seconds: the CPU time of its children that it has reaped
/// (fields 16 and 17 of `/proc/self/stat`). Around one `wrk` run (spawned, waited for and
/// reaped inside it, while no other child of this process exits) the difference is wrk's own
/// CPU time.
fn reaped_children_cpu_seconds(clk_tck: f64) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // fields[0] is field 3, so field 16 is fields[13].
    let cutime: u64 = fields.get(13)?.parse().ok()?;
    let cstime: u64 = fields.get(14)?.parse().ok()?;
    Some((cutime + cstime) as f64 / clk_tck)
}

// ---------------------------------------------------------------------------------------------
// Scenarios and measurements.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    KeepAlive,
    Churn,
    /// The churn scenario measured by `wrk` instead of the load generator.
    ChurnWrk,
    /// The heavy mix, open loop at this percent of capacity.
    Heavy(u32),
}

impl Scenario {
    fn name(self) -> String {
        match self {
            Scenario::KeepAlive => "keepalive".to_owned(),
            Scenario::Churn => "churn".to_owned(),
            Scenario::ChurnWrk => "churn-wrk".to_owned(),
            Scenario::Heavy(p) => format!("heavy{p}"),
        }
    }

    /// The tool that measures this scenario.
    fn tool(self) -> &'static str {
        match self {
            Scenario::ChurnWrk => "wrk",
            _ => "loadgen",
        }
    }

    /// The scenarios run on `system` in `round`, in order: churn (the `wrk` run, where it
    /// applies, goes right after the load generator's in even rounds and right before it in
    /// odd ones, so that neither tool always gets the warmer server), the heavy mix, and
    /// keep-alive last.
    fn for_system(system: &System, settings: &Settings, round: usize) -> Vec<Scenario> {
        let mut v = Vec::new();
        if settings.wrk.is_some() && system.wrk_checked() {
            if round.is_multiple_of(2) {
                v.extend([Scenario::Churn, Scenario::ChurnWrk]);
            } else {
                v.extend([Scenario::ChurnWrk, Scenario::Churn]);
            }
        } else {
            v.push(Scenario::Churn);
        }
        v.extend(HEAVY_LEVELS_PERCENT.iter().map(|&p| Scenario::Heavy(p)));
        v.push(Scenario::KeepAlive);
        v
    }
}

/// The numbers of one run.
#[derive(Debug, Clone)]
struct Metrics {
    sent: u64,
    completed: u64,
    non_200: u64,
    errors: ErrorCounts,
    duration_s: f64,
    throughput: f64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    share_max_over_mean: f64,
    share_cv: f64,
    per_worker: Vec<u64>,
    conns_per_worker: Vec<u64>,
    conn_spread: u64,
    connections: u64,
    master_cpu_s: Option<f64>,
    /// CPU seconds the client used during the run: this process for the load generator (it
    /// runs in-process), the reaped child for `wrk`.
    client_cpu_s: Option<f64>,
    max_start_lag_ms: f64,
    /// The load generator's whole report (its latency histogram), for quantiles over the
    /// requests of several rounds ([`Results::pooled_p99`]); `None` for `wrk`.
    report: Option<Box<Report>>,
}

impl Metrics {
    fn new(
        r: &Report,
        workers: usize,
        master_cpu_s: Option<f64>,
        client_cpu_s: Option<f64>,
    ) -> Metrics {
        Metrics {
            sent: r.sent,
            completed: r.completed,
            non_200: r.non_200,
            errors: r.errors,
            duration_s: r.duration.as_secs_f64(),
            throughput: r.throughput(),
            p50_us: r.p50_us(),
            p90_us: r.p90_us(),
            p99_us: r.p99_us(),
            p999_us: r.p999_us(),
            max_us: r.max_us(),
            share_max_over_mean: r.share_max_over_mean(workers),
            share_cv: r.share_cv(workers),
            per_worker: r.worker_shares(workers),
            conns_per_worker: r.worker_connections(workers),
            conn_spread: r.connection_spread(workers),
            connections: r.connections,
            master_cpu_s,
            client_cpu_s,
            max_start_lag_ms: r.max_start_lag.as_secs_f64() * 1e3,
            // Open-loop runs only (the heavy mix): a report carries a histogram of some
            // hundreds of KiB.
            report: matches!(r.load, Load::Open { .. }).then(|| Box::new(r.clone())),
        }
    }

    /// A `wrk` run's numbers: no per-worker shares (wrk does not read response headers).
    fn from_wrk(w: &WrkReport, master_cpu_s: Option<f64>, wrk_cpu_s: Option<f64>) -> Metrics {
        Metrics {
            sent: w.requests + w.errors.total(),
            completed: w.requests,
            non_200: w.non_2xx,
            errors: w.errors,
            duration_s: w.duration_s,
            throughput: w.requests_per_s,
            p50_us: w.p50_us,
            p90_us: w.p90_us,
            p99_us: w.p99_us,
            p999_us: w.p99_us,
            max_us: w.max_us,
            share_max_over_mean: f64::NAN,
            share_cv: f64::NAN,
            per_worker: Vec::new(),
            conns_per_worker: Vec::new(),
            conn_spread: 0,
            connections: w.requests,
            master_cpu_s,
            client_cpu_s: wrk_cpu_s,
            max_start_lag_ms: 0.0,
            report: None,
        }
    }

    /// The client's CPU microseconds per request sent.
    fn client_cpu_us_per_req(&self) -> Option<f64> {
        let cpu = self.client_cpu_s?;
        (self.sent > 0).then(|| cpu * 1e6 / self.sent as f64)
    }

    /// Master CPU seconds per 1000 connections.
    fn master_cpu_per_1k(&self) -> Option<f64> {
        let cpu = self.master_cpu_s?;
        (self.connections > 0).then(|| cpu * 1000.0 / self.connections as f64)
    }
}

/// One run: a scenario on a system in a round.
struct Sample {
    round: usize,
    system: String,
    scenario: Scenario,
    offered_per_s: Option<f64>,
    outcome: Result<Metrics, String>,
}

/// Heavy-mix capacity per group, req/s, and how it was obtained.
#[derive(Debug, Clone)]
struct Capacity {
    per_s: f64,
    how: String,
}

fn mean_service_us(mix: &Mix) -> f64 {
    mix.weighted_mean(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("us="))
            .and_then(|v| v.parse().ok())
    })
}

/// Measures the heavy mix's capacity on `system` (closed loop), or computes it.
fn capacity(system: Option<&System>, settings: &Settings, node: Option<&NodeApp>) -> Capacity {
    let computed = || {
        let mean = mean_service_us(&settings.mix);
        settings.workers as f64 * 1e6 / mean
    };
    let Some(system) = system else {
        return Capacity {
            per_s: computed(),
            how: format!(
                "computed: {} workers / {:.0} µs mean service time",
                settings.workers,
                mean_service_us(&settings.mix)
            ),
        };
    };
    let clients = PROBE_CLIENTS_PER_WORKER * settings.workers;
    let probe = || -> Result<Metrics, String> {
        let mut running = Running::start(system, settings, node)?;
        running.warm_up(settings)?;
        let spec = LoadSpec {
            mix: settings.mix.clone(),
            ..settings.spec(running.addr, Load::Closed { clients }, settings.probe)
        };
        let m = running.measure(&spec, settings)?;
        running.stop()?;
        Ok(m)
    };
    match probe() {
        Ok(m) => Capacity {
            per_s: m.throughput,
            how: format!(
                "measured: closed loop, {clients} clients, {:.1} s on {} ({} errors)",
                settings.probe.as_secs_f64(),
                system.name,
                m.errors.total()
            ),
        },
        Err(e) => Capacity {
            per_s: computed(),
            how: format!(
                "computed ({} workers / {:.0} µs mean service time) because the probe on {} failed: {e}",
                settings.workers,
                mean_service_us(&settings.mix),
                system.name
            ),
        },
    }
}

/// Runs every scenario on one fresh instance of `system`.
fn run_system(
    round: usize,
    system: &System,
    settings: &Settings,
    node: Option<&NodeApp>,
    capacity: &Capacity,
    notes: &mut Vec<String>,
) -> Vec<Sample> {
    let sample = |scenario, offered_per_s, outcome| Sample {
        round,
        system: system.name.clone(),
        scenario,
        offered_per_s,
        outcome,
    };
    let scenarios = Scenario::for_system(system, settings, round);
    let mut running = match Running::start(system, settings, node).and_then(|mut r| {
        r.warm_up(settings)?;
        Ok(r)
    }) {
        Ok(r) => r,
        Err(e) => {
            return scenarios
                .into_iter()
                .map(|sc| sample(sc, None, Err(format!("start failed: {e}"))))
                .collect();
        }
    };
    let seed = round as u64 + 1;
    let mut samples = Vec::new();
    for &scenario in &scenarios {
        let addr = running.addr;
        let (spec, offered) = match scenario {
            Scenario::KeepAlive => {
                let load = Load::KeepAlive {
                    clients: KEEPALIVE_CLIENTS,
                    interval: KEEPALIVE_INTERVAL,
                };
                (settings.spec(addr, load, settings.keepalive), None)
            }
            Scenario::Churn | Scenario::ChurnWrk => {
                let clients = CHURN_CLIENTS_PER_WORKER * settings.workers;
                (
                    settings.spec(addr, Load::Closed { clients }, settings.churn),
                    None,
                )
            }
            Scenario::Heavy(percent) => {
                let rate = capacity.per_s * f64::from(percent) / 100.0;
                let spec = LoadSpec {
                    mix: settings.mix.clone(),
                    seed,
                    ..settings.spec(addr, Load::Open { rate_per_s: rate }, settings.heavy)
                };
                (spec, Some(rate))
            }
        };
        let outcome = match (scenario, &settings.wrk) {
            (Scenario::ChurnWrk, Some(wrk)) => {
                let Load::Closed { clients } = spec.load else {
                    unreachable!("churn is a closed loop")
                };
                running.measure_wrk(wrk, clients, spec.duration, settings)
            }
            _ => running.measure(&spec, settings),
        };
        match &outcome {
            Ok(m) => eprintln!(
                "e2e: round {} {:<18} {:<10} {:>8.0}/s p50 {:>7.2} ms p99 {:>7.2} ms errors {} (client {} µs/req, master {} s/1k conn)",
                round + 1,
                system.name,
                scenario.name(),
                m.throughput,
                m.p50_us as f64 / 1e3,
                m.p99_us as f64 / 1e3,
                m.errors.total(),
                num(m.client_cpu_us_per_req(), 1),
                num(m.master_cpu_per_1k(), 4),
            ),
            Err(e) => eprintln!(
                "e2e: round {} {} {} FAILED: {e}",
                round + 1,
                system.name,
                scenario.name()
            ),
        }
        let master_gone = outcome.is_err() && !matches!(running.child.try_wait(), Ok(None));
        samples.push(sample(scenario, offered, outcome));
        if master_gone {
            break;
        }
    }
    // Scenarios not run because the master died are reported as failed too.
    for &scenario in scenarios.iter().skip(samples.len()) {
        samples.push(sample(
            scenario,
            None,
            Err("not run: the master had exited".to_owned()),
        ));
    }
    if let Err(e) = running.stop() {
        notes.push(format!("round {}, {}: stop: {e}", round + 1, system.name));
    }
    samples
}

// ---------------------------------------------------------------------------------------------
// Aggregation and output.

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// All the results, indexed for lookups.
struct Results {
    samples: Vec<Sample>,
}

impl Results {
    fn ok(&self, system: &str, scenario: Scenario) -> Vec<(usize, &Metrics)> {
        self.samples
            .iter()
            .filter(|s| s.system == system && s.scenario == scenario)
            .filter_map(|s| s.outcome.as_ref().ok().map(|m| (s.round, m)))
            .collect()
    }

    fn runs(&self, system: &str, scenario: Scenario) -> usize {
        self.samples
            .iter()
            .filter(|s| s.system == system && s.scenario == scenario)
            .count()
    }

    fn median_of(
        &self,
        system: &str,
        scenario: Scenario,
        f: impl Fn(&Metrics) -> Option<f64>,
    ) -> Option<f64> {
        median(
            self.ok(system, scenario)
                .into_iter()
                .filter_map(|(_, m)| f(m))
                .collect(),
        )
    }

    fn max_of(&self, system: &str, scenario: Scenario, f: impl Fn(&Metrics) -> f64) -> Option<f64> {
        self.ok(system, scenario)
            .into_iter()
            .map(|(_, m)| f(m))
            .max_by(f64::total_cmp)
    }

    /// `f(run of a) / f(run of b)` per round, pairing the runs of the same round, in round
    /// order; `a` and `b` are each a system in a scenario.
    fn per_round(
        &self,
        a: (&str, Scenario),
        b: (&str, Scenario),
        f: impl Fn(&Metrics) -> f64,
    ) -> Vec<f64> {
        let b_runs: BTreeMap<usize, f64> = self
            .ok(b.0, b.1)
            .into_iter()
            .map(|(r, m)| (r, f(m)))
            .collect();
        self.ok(a.0, a.1)
            .into_iter()
            .filter_map(|(r, m)| {
                let d = *b_runs.get(&r)?;
                (d > 0.0).then(|| f(m) / d)
            })
            .collect()
    }

    /// The p99 latency, µs, over every request of the rounds in which both `system` and `base`
    /// ran `scenario` to the end, each system's rounds pooled into one histogram: `(system's,
    /// base's)`. A 4-s run at 75 % load holds about 2 % long requests, so one round's p99
    /// rests on a few dozen of them and moves by tens of percent from round to round;
    /// pooling the rounds reads it from five times as many.
    fn pooled_p99(&self, system: &str, base: &str, scenario: Scenario) -> Option<(f64, f64)> {
        let base_runs: BTreeMap<usize, &Report> = self
            .ok(base, scenario)
            .into_iter()
            .filter_map(|(r, m)| Some((r, m.report.as_deref()?)))
            .collect();
        let mut pooled: Option<(Report, Report)> = None;
        for (round, m) in self.ok(system, scenario) {
            let (Some(a), Some(&b)) = (m.report.as_deref(), base_runs.get(&round)) else {
                continue;
            };
            match pooled.as_mut() {
                None => pooled = Some((a.clone(), b.clone())),
                Some((pa, pb)) => {
                    pa.merge(a);
                    pb.merge(b);
                }
            }
        }
        let (a, b) = pooled?;
        Some((a.p99_us() as f64, b.p99_us() as f64))
    }

    /// Median over rounds of `f(system) / f(base)`, pairing runs of the same round.
    fn paired_ratio(
        &self,
        system: &str,
        base: &str,
        scenario: Scenario,
        f: impl Fn(&Metrics) -> f64,
    ) -> Option<f64> {
        median(self.per_round((system, scenario), (base, scenario), f))
    }
}

fn ms(us: Option<f64>) -> String {
    us.map_or("—".to_owned(), |v| format!("{:.2}", v / 1e3))
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.filter(|v| v.is_finite())
        .map_or("—".to_owned(), |v| format!("{v:.decimals$}"))
}

fn ratio(v: Option<f64>) -> String {
    v.map_or("—".to_owned(), |v| format!("{v:.2}×"))
}

/// Errors summed over the successful runs: `0`, or `12 (reset 10, eof 2)`.
fn errors_cell(results: &Results, system: &str, scenario: Scenario) -> String {
    let mut total = ErrorCounts::default();
    let mut non_200 = 0;
    for (_, m) in results.ok(system, scenario) {
        total.refused += m.errors.refused;
        total.reset += m.errors.reset;
        total.timeout += m.errors.timeout;
        total.eof += m.errors.eof;
        total.other += m.errors.other;
        non_200 += m.non_200;
    }
    let mut parts: Vec<String> = rcluster_loadgen::ErrorKind::ALL
        .iter()
        .filter(|&&k| total.get(k) > 0)
        .map(|&k| format!("{} {}", k.name(), total.get(k)))
        .collect();
    if non_200 > 0 {
        parts.push(format!("non-200 {non_200}"));
    }
    if parts.is_empty() {
        "0".to_owned()
    } else {
        format!("{} ({})", total.total() + non_200, parts.join(", "))
    }
}

fn runs_cell(results: &Results, system: &str, scenario: Scenario) -> String {
    format!(
        "{}/{}",
        results.ok(system, scenario).len(),
        results.runs(system, scenario)
    )
}

fn render_group(
    out: &mut String,
    results: &Results,
    systems: &[&System],
    base: &str,
    capacity: &Capacity,
    settings: &Settings,
) {
    let names: Vec<&str> = systems.iter().map(|s| s.name.as_str()).collect();
    let churn_clients = CHURN_CLIENTS_PER_WORKER * settings.workers;
    let _ = writeln!(
        out,
        "\n### Connection churn: closed loop, {churn_clients} clients, a new connection per request, trivial handler\n"
    );
    let _ = writeln!(
        out,
        "| system | conn/s | × {base} | p50 ms | p99 ms | errors | share max/mean | share CV | master CPU s/1k conn | runs ok |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|");
    let sc = Scenario::Churn;
    for name in &names {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            num(results.median_of(name, sc, |m| Some(m.throughput)), 0),
            ratio(results.paired_ratio(name, base, sc, |m| m.throughput)),
            ms(results.median_of(name, sc, |m| Some(m.p50_us as f64))),
            ms(results.median_of(name, sc, |m| Some(m.p99_us as f64))),
            errors_cell(results, name, sc),
            num(
                results.median_of(name, sc, |m| Some(m.share_max_over_mean)),
                3
            ),
            num(results.median_of(name, sc, |m| Some(m.share_cv)), 3),
            num(results.median_of(name, sc, Metrics::master_cpu_per_1k), 4),
            runs_cell(results, name, sc),
        );
    }
    for &percent in &HEAVY_LEVELS_PERCENT {
        let sc = Scenario::Heavy(percent);
        let _ = writeln!(
            out,
            "\n### Heavy-tailed CPU-bound mix ({}), open loop at {percent} % of capacity = {:.0} req/s\n",
            settings.mix,
            capacity.per_s * f64::from(percent) / 100.0
        );
        let _ = writeln!(
            out,
            "| system | achieved/s | p50 ms | p99 ms | p99.9 ms | max ms | p99 × {base} | pooled p99 ms | pooled p99 × {base} | errors | share max/mean | share CV | master CPU s/1k conn | runs ok |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
        );
        for name in &names {
            let pooled = results.pooled_p99(name, base, sc);
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                num(results.median_of(name, sc, |m| Some(m.throughput)), 0),
                ms(results.median_of(name, sc, |m| Some(m.p50_us as f64))),
                ms(results.median_of(name, sc, |m| Some(m.p99_us as f64))),
                ms(results.median_of(name, sc, |m| Some(m.p999_us as f64))),
                ms(results.median_of(name, sc, |m| Some(m.max_us as f64))),
                ratio(results.paired_ratio(name, base, sc, |m| m.p99_us as f64)),
                ms(pooled.map(|(a, _)| a)),
                ratio(pooled.and_then(|(a, b)| (b > 0.0).then(|| a / b))),
                errors_cell(results, name, sc),
                num(
                    results.median_of(name, sc, |m| Some(m.share_max_over_mean)),
                    3
                ),
                num(results.median_of(name, sc, |m| Some(m.share_cv)), 3),
                num(results.median_of(name, sc, Metrics::master_cpu_per_1k), 4),
                runs_cell(results, name, sc),
            );
        }
    }
    render_wrk_check(out, results, &names, settings);
    let sc = Scenario::KeepAlive;
    let _ = writeln!(
        out,
        "\n### Keep-alive: {KEEPALIVE_CLIENTS} clients, each on one connection, one request per {} ms\n",
        KEEPALIVE_INTERVAL.as_millis()
    );
    let _ = writeln!(
        out,
        "| system | connections per worker (last ok round) | spread max−min (median) | spread per round | req/s | p99 ms | errors | runs ok |"
    );
    let _ = writeln!(out, "|---|---|---:|---|---:|---:|---|---:|");
    for name in &names {
        let ok = results.ok(name, sc);
        let last = ok
            .last()
            .map(|(_, m)| {
                m.conns_per_worker
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" / ")
            })
            .unwrap_or_else(|| "—".to_owned());
        let per_round: Vec<String> = ok.iter().map(|(_, m)| m.conn_spread.to_string()).collect();
        let _ = writeln!(
            out,
            "| {name} | {last} | {} | {} | {} | {} | {} | {} |",
            num(
                results.median_of(name, sc, |m| Some(m.conn_spread as f64)),
                1
            ),
            if per_round.is_empty() {
                "—".to_owned()
            } else {
                per_round.join(", ")
            },
            num(results.median_of(name, sc, |m| Some(m.throughput)), 0),
            ms(results.median_of(name, sc, |m| Some(m.p99_us as f64))),
            errors_cell(results, name, sc),
            runs_cell(results, name, sc),
        );
    }
}

/// How far the load generator's and `wrk`'s figures for a system relative to the reference may
/// differ before the tools are said to disagree: 10 %.
const TOOL_AGREEMENT: f64 = 0.10;

/// The system the churn cross-check compares every other against: the kernel's own `shared`
/// queue with the node app.
fn wrk_reference() -> String {
    node_name(PolicyKind::Shared)
}

/// A system's churn rate relative to `reference` by each tool, per round and as medians.
fn tool_comparison(results: &Results, name: &str, reference: &str) -> ToolComparison {
    let f = |m: &Metrics| m.throughput;
    let loadgen = results.per_round((name, Scenario::Churn), (reference, Scenario::Churn), f);
    let wrk = results.per_round(
        (name, Scenario::ChurnWrk),
        (reference, Scenario::ChurnWrk),
        f,
    );
    let (lg_median, wrk_median) = (median(loadgen.clone()), median(wrk.clone()));
    let agreement = lg_median.zip(wrk_median).map(|(a, b)| a / b);
    ToolComparison {
        loadgen,
        wrk,
        lg_median,
        wrk_median,
        agreement,
    }
}

/// One system's churn rate ÷ the reference's, by the load generator and by `wrk`.
struct ToolComparison {
    /// Per round, loadgen's runs.
    loadgen: Vec<f64>,
    /// Per round, wrk's runs.
    wrk: Vec<f64>,
    /// Medians over rounds.
    lg_median: Option<f64>,
    wrk_median: Option<f64>,
    /// (loadgen's figure) ÷ (wrk's figure): 1 when the tools see the same comparison.
    agreement: Option<f64>,
}

impl ToolComparison {
    /// Whether the two tools' figures are within [`TOOL_AGREEMENT`] of each other.
    fn agrees(&self) -> Option<bool> {
        self.agreement.map(|v| (v - 1.0).abs() <= TOOL_AGREEMENT)
    }
}

/// The churn cross-check: the load generator's and `wrk`'s numbers side by side, for the
/// systems that have `wrk` runs. The two clients differ in what a connection costs them (both
/// share the machine's CPUs with the servers, so the cheaper client drives a higher rate);
/// what must agree is the comparison between systems each tool measures, relative to
/// [`wrk_reference`].
fn render_wrk_check(out: &mut String, results: &Results, names: &[&str], settings: &Settings) {
    let (lg, wrk) = (Scenario::Churn, Scenario::ChurnWrk);
    let checked: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| results.runs(n, wrk) > 0)
        .collect();
    if checked.is_empty() {
        return;
    }
    let reference = wrk_reference();
    let clients = CHURN_CLIENTS_PER_WORKER * settings.workers;
    let _ = writeln!(
        out,
        "\n### Churn cross-check: the load generator against `wrk -t1 -c{clients} -d{}s -H 'Connection: close'`\n",
        settings.churn.as_secs().max(1)
    );
    let _ = writeln!(
        out,
        "Same running instance, back to back (which tool goes first alternates by round). Both \
         clients share the machine's CPUs with the servers, so their absolute rates differ by \
         what a connection costs each client (client CPU column: this process for the load \
         generator, the reaped `wrk` child for wrk). What must agree is the comparison: each \
         system's rate ÷ {reference}'s in the same round, median over rounds, by each tool; \
         the tools agree when those two figures are within {:.0} % of each other.\n",
        TOOL_AGREEMENT * 100.0
    );
    let _ = writeln!(
        out,
        "| system | loadgen conn/s | wrk conn/s | loadgen ÷ wrk | client CPU µs/conn (loadgen / wrk) | ÷ {reference}: loadgen / wrk | per round (loadgen / wrk) | loadgen p99 / wrk p99 ms | wrk errors | master CPU s/1k conn (loadgen / wrk) | agree |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---|---:|---|---:|---|");
    let have_reference = checked.contains(&reference.as_str());
    for name in checked {
        let absolute = median(results.per_round((name, lg), (name, wrk), |m| m.throughput));
        let cmp = tool_comparison(results, name, &reference);
        let verdict = if name == reference {
            "reference"
        } else if !have_reference {
            "— (no reference in this run)"
        } else {
            match cmp.agrees() {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            }
        };
        let per_round = cmp
            .loadgen
            .iter()
            .zip(&cmp.wrk)
            .map(|(a, b)| format!("{a:.2}/{b:.2}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} / {} | {} / {} | {} | {} / {} | {} | {} / {} | {verdict} |",
            num(results.median_of(name, lg, |m| Some(m.throughput)), 0),
            num(results.median_of(name, wrk, |m| Some(m.throughput)), 0),
            ratio(absolute),
            num(
                results.median_of(name, lg, Metrics::client_cpu_us_per_req),
                1
            ),
            num(
                results.median_of(name, wrk, Metrics::client_cpu_us_per_req),
                1
            ),
            ratio(cmp.lg_median),
            ratio(cmp.wrk_median),
            if per_round.is_empty() {
                "—".to_owned()
            } else {
                per_round
            },
            ms(results.median_of(name, lg, |m| Some(m.p99_us as f64))),
            ms(results.median_of(name, wrk, |m| Some(m.p99_us as f64))),
            errors_cell(results, name, wrk),
            num(results.median_of(name, lg, Metrics::master_cpu_per_1k), 4),
            num(results.median_of(name, wrk, Metrics::master_cpu_per_1k), 4),
        );
    }
}

/// One target check: PASS or MISS with its numbers; a check without data is a MISS.
fn check(
    out: &mut String,
    what: &str,
    value: Option<f64>,
    pass: impl Fn(f64) -> bool,
    detail: String,
) {
    let verdict = match value {
        Some(v) if pass(v) => "PASS",
        _ => "MISS",
    };
    let value = value.map_or("no data".to_owned(), |v| format!("{v:.3}"));
    let _ = writeln!(out, "- **{verdict}** {what}: {value} ({detail})");
}

/// A p99 check's detail: both systems' median p99, and the p99 of their paired rounds' requests
/// pooled, with its ratio (the same comparison read from every request of those rounds).
fn p99_detail(r: &Results, system: &str, base: &str, sc: Scenario) -> String {
    let p99 = |name: &str| r.median_of(name, sc, |m| Some(m.p99_us as f64));
    let mut detail = format!("{} ms vs {} ms", ms(p99(system)), ms(p99(base)));
    if let Some((a, b)) = r.pooled_p99(system, base, sc).filter(|&(_, b)| b > 0.0) {
        let _ = write!(
            detail,
            "; rounds pooled: {} ms vs {} ms, {}",
            ms(Some(a)),
            ms(Some(b)),
            ratio(Some(a / b))
        );
    }
    detail
}

/// The kernel-steering targets (issue #14), checked only when the kernel rows ran.
/// `name`'s churn rate (measured as `scenario`: the load generator's or wrk's) at least
/// `at_least` × `base`'s, paired by round; `by` ends the line's label.
fn rate_check(
    out: &mut String,
    r: &Results,
    scenario: Scenario,
    name: &str,
    base: &str,
    at_least: f64,
    by: &str,
) {
    let conn = |n: &str| num(r.median_of(n, scenario, |m| Some(m.throughput)), 0);
    check(
        out,
        &format!("{name} conn rate ≥ {at_least}× {base}{by}"),
        r.paired_ratio(name, base, scenario, |m| m.throughput),
        |v| v >= at_least,
        format!("{}/s vs {}/s", conn(name), conn(base)),
    );
}

fn render_kernel_checks(out: &mut String, r: &Results) {
    let lc = &format!("least-conn{KERNEL}");
    let lc_node = &node_name(PolicyKind::LeastConn);
    let lc_node_kernel = &format!("{lc_node}{KERNEL}");
    if r.runs(lc, Scenario::Churn) == 0 && r.runs(lc_node_kernel, Scenario::Churn) == 0 {
        return;
    }
    let _ = writeln!(out, "\n### Kernel steering\n");
    let churn = Scenario::Churn;
    let shared_node = node_name(PolicyKind::Shared);
    // Each rate by the load generator, then again as wrk measured it on the same instances
    // where it ran (the node group): a claim must hold by both tools.
    for (scenario, by) in [(churn, ""), (Scenario::ChurnWrk, ", by wrk")] {
        for (sys, base, min) in [
            (lc.as_str(), "shared", 0.95),
            (lc.as_str(), "least-conn", 1.0),
            (lc_node_kernel.as_str(), shared_node.as_str(), 0.95),
            (lc_node_kernel.as_str(), NODE_NONE, 0.95),
            (lc_node_kernel.as_str(), lc_node.as_str(), 1.0),
        ] {
            if scenario == Scenario::ChurnWrk
                && (r.runs(sys, scenario) == 0 || r.runs(base, scenario) == 0)
            {
                continue;
            }
            rate_check(out, r, scenario, sys, base, min, by);
        }
    }
    for percent in HEAVY_LEVELS_PERCENT {
        let sc = Scenario::Heavy(percent);
        for (sys, base, max) in [
            (lc.as_str(), "shared", 1.0),
            (lc.as_str(), "least-conn", 1.05),
            (lc_node_kernel.as_str(), shared_node.as_str(), 1.0),
            (lc_node_kernel.as_str(), lc_node.as_str(), 1.05),
        ] {
            check(
                out,
                &format!("{sys} p99 at {percent} % ≤ {max}× {base}"),
                r.paired_ratio(sys, base, sc, |m| m.p99_us as f64),
                |v| v <= max,
                p99_detail(r, sys, base, sc),
            );
        }
    }
    for sys in [lc.as_str(), lc_node_kernel.as_str()] {
        check(
            out,
            &format!("{sys} keep-alive connection spread ≤ 1"),
            r.max_of(sys, Scenario::KeepAlive, |m| m.conn_spread as f64),
            |v| v <= 1.0,
            "worst round, max−min connections per worker".to_owned(),
        );
    }
    check(
        out,
        &format!("{lc} master CPU per 1k connections ≈ 0 (< 0.001 s)"),
        r.median_of(lc, churn, Metrics::master_cpu_per_1k),
        |v| v < 0.001,
        "churn, median".to_owned(),
    );
}

fn render_checks(out: &mut String, r: &Results, names: &[&str]) {
    let _ = writeln!(out, "\n## Target checks\n");
    let _ = writeln!(
        out,
        "Ratios are medians of per-round paired ratios; spreads and shares use the worst round. \
         A check whose systems were not run is left out; one without data is a MISS.\n"
    );
    let has = |name: &str| names.contains(&name);
    let churn = Scenario::Churn;
    let p99 = |name: &str, sc: Scenario| r.median_of(name, sc, |m| Some(m.p99_us as f64));
    let conn_check = |out: &mut String, name: &str, base: &str, at_least: f64| {
        if has(name) && has(base) {
            rate_check(out, r, churn, name, base, at_least, "");
        }
    };
    let p99_check = |out: &mut String, name: &str, base: &str, percent: u32, at_most: f64| {
        let sc = Scenario::Heavy(percent);
        if has(name) && has(base) {
            check(
                out,
                &format!("{name} p99 at {percent} % ≤ {at_most}× {base}"),
                r.paired_ratio(name, base, sc, |m| m.p99_us as f64),
                |v| v <= at_most,
                p99_detail(r, name, base, sc),
            );
        }
    };

    let _ = writeln!(out, "### Demo worker (design targets)\n");
    for policy in ["round-robin", "least-conn"] {
        conn_check(out, policy, "reuseport", 0.95);
    }
    p99_check(out, "least-conn", "reuseport", 75, 0.55);
    p99_check(out, "least-conn", "round-robin", 75, 0.8);
    if has("round-robin") {
        check(
            out,
            "round-robin share max/mean ≤ 1.01 (churn)",
            r.max_of("round-robin", churn, |m| m.share_max_over_mean),
            |v| v <= 1.01,
            "worst round".to_owned(),
        );
    }
    if has("least-conn") {
        check(
            out,
            "least-conn keep-alive connection spread ≤ 1",
            r.max_of("least-conn", Scenario::KeepAlive, |m| m.conn_spread as f64),
            |v| v <= 1.0,
            "worst round, max−min connections per worker".to_owned(),
        );
    }

    let lc_node = node_name(PolicyKind::LeastConn);
    let rr_node = node_name(PolicyKind::RoundRobin);
    let reuse_node = node_name(PolicyKind::Reuseport);
    let shared_node = node_name(PolicyKind::Shared);
    let _ = writeln!(
        out,
        "\n### Least-conn with real servers (node app through the shim unless said)\n"
    );
    for name in [&lc_node, &rr_node] {
        conn_check(out, name, &reuse_node, 0.9);
        conn_check(out, name, NODE_NONE, 0.85);
    }
    for &percent in &HEAVY_LEVELS_PERCENT {
        p99_check(out, &lc_node, &shared_node, percent, 1.0);
        p99_check(out, &lc_node, &reuse_node, percent, 0.6);
    }
    for &percent in &HEAVY_LEVELS_PERCENT {
        p99_check(out, "least-conn", "shared", percent, 1.0);
        p99_check(out, "least-conn", "reuseport", percent, 0.6);
    }
    if has(&lc_node) && has("least-conn") {
        let cpu = |name: &str| r.median_of(name, churn, Metrics::master_cpu_per_1k);
        check(
            out,
            &format!(
                "{lc_node} master CPU per connection ≤ 2× least-conn's with the demo worker (churn)"
            ),
            r.paired_ratio(&lc_node, "least-conn", churn, |m| {
                m.master_cpu_per_1k().unwrap_or(f64::NAN)
            }),
            |v| v <= 2.0,
            // Seconds per 1,000 connections, × 1,000: microseconds per connection.
            format!(
                "{} µs vs {} µs of master CPU per connection",
                num(cpu(&lc_node).map(|v| v * 1e3), 1),
                num(cpu("least-conn").map(|v| v * 1e3), 1)
            ),
        );
    }

    let _ = writeln!(out, "\n### Against Node's cluster module\n");
    conn_check(out, &lc_node, NODE_RR, 1.0);
    if has(&lc_node) && has(NODE_RR) {
        let sc = Scenario::Heavy(75);
        check(
            out,
            &format!("{lc_node} p99 at 75 % < {NODE_RR}"),
            r.paired_ratio(&lc_node, NODE_RR, sc, |m| m.p99_us as f64),
            |v| v < 1.0,
            format!(
                "{} ms vs {} ms",
                ms(p99(&lc_node, sc)),
                ms(p99(NODE_RR, sc))
            ),
        );
    }

    let wrk_checked: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| r.runs(n, Scenario::ChurnWrk) > 0)
        .collect();
    let reference = wrk_reference();
    if !wrk_checked.is_empty() && wrk_checked.contains(&reference.as_str()) {
        let _ = writeln!(out, "\n### Load generator against wrk (churn)\n");
        for name in wrk_checked.into_iter().filter(|&n| n != reference) {
            let cmp = tool_comparison(r, name, &reference);
            check(
                out,
                &format!(
                    "{name} ÷ {reference}: the load generator and wrk agree within {:.0} %",
                    TOOL_AGREEMENT * 100.0
                ),
                cmp.agreement,
                |v| (v - 1.0).abs() <= TOOL_AGREEMENT,
                format!(
                    "loadgen's figure ÷ wrk's; {} by loadgen, {} by wrk",
                    ratio(cmp.lg_median),
                    ratio(cmp.wrk_median)
                ),
            );
        }
    }
}

fn csv(results: &Results, systems: &[System]) -> String {
    let group = |name: &str| {
        systems
            .iter()
            .find(|s| s.name == name)
            .map_or("", |s| s.group.name())
    };
    let mut out = String::from(
        "round,group,system,scenario,tool,offered_per_s,ok,sent,completed,non_200,refused,reset,timeout,eof,other,duration_s,throughput_per_s,p50_us,p90_us,p99_us,p999_us,max_us,share_max_over_mean,share_cv,per_worker,conns_per_worker,conn_spread,connections,master_cpu_s,master_cpu_s_per_1k_conn,client_cpu_s,max_start_lag_ms,failure\n",
    );
    for s in &results.samples {
        let offered = num(s.offered_per_s, 1).replace('—', "");
        match &s.outcome {
            Ok(m) => {
                let join = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
                let _ = writeln!(
                    out,
                    "{},{},{},{},{},{offered},true,{},{},{},{},{},{},{},{},{:.3},{:.1},{},{},{},{},{},{:.4},{:.4},{},{},{},{},{},{},{},{:.2},",
                    s.round + 1,
                    group(&s.system),
                    s.system,
                    s.scenario.name(),
                    s.scenario.tool(),
                    m.sent,
                    m.completed,
                    m.non_200,
                    m.errors.refused,
                    m.errors.reset,
                    m.errors.timeout,
                    m.errors.eof,
                    m.errors.other,
                    m.duration_s,
                    m.throughput,
                    m.p50_us,
                    m.p90_us,
                    m.p99_us,
                    m.p999_us,
                    m.max_us,
                    m.share_max_over_mean,
                    m.share_cv,
                    join(&m.per_worker),
                    join(&m.conns_per_worker),
                    m.conn_spread,
                    m.connections,
                    m.master_cpu_s.map_or(String::new(), |v| format!("{v:.3}")),
                    m.master_cpu_per_1k()
                        .map_or(String::new(), |v| format!("{v:.5}")),
                    m.client_cpu_s.map_or(String::new(), |v| format!("{v:.3}")),
                    m.max_start_lag_ms,
                );
            }
            Err(e) => {
                let e = e.replace(['"', '\n'], "'");
                let _ = writeln!(
                    out,
                    "{},{},{},{},{},{offered},false,,,,,,,,,,,,,,,,,,,,,,,,,,\"{e}\"",
                    s.round + 1,
                    group(&s.system),
                    s.system,
                    s.scenario.name(),
                    s.scenario.tool(),
                );
            }
        }
    }
    out
}

/// The 1-minute load average (`/proc/loadavg`, proc(5)): how busy the shared host was.
fn load_average() -> Option<String> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    s.split_whitespace().next().map(str::to_owned)
}

fn node_version(node: &Path) -> String {
    Command::new(node)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "?".to_owned())
}

fn main() {
    let settings = Settings::from_env();
    let started = Instant::now();
    let load_before = load_average();
    let node_app = match settings.node {
        Some(_) => match NodeApp::write() {
            Ok(app) => Some(app),
            Err(e) => {
                println!("note: cannot write the node app ({e}); skipping the Node peers");
                None
            }
        },
        None => {
            println!("note: `node` is not on PATH; skipping the Node peers");
            None
        }
    };
    let mut all = systems(&settings);
    if node_app.is_none() {
        all.retain(|s| s.group == Group::Demo);
    }
    if !settings.bin.is_file() {
        println!(
            "note: {} does not exist; build it with `cargo build --release --workspace`",
            settings.bin.display()
        );
    }
    eprintln!(
        "e2e: {} systems × {} rounds, {} workers{}",
        all.len(),
        settings.rounds,
        settings.workers,
        if settings.quick { " (quick)" } else { "" }
    );
    let find = |name: &str| all.iter().find(|s| s.name == name);
    let node = node_app.as_ref();
    let has_demo = all.iter().any(|s| s.group == Group::Demo);
    let has_node = all.iter().any(|s| s.group == Group::Node);
    let demo_capacity = has_demo.then(|| capacity(find("reuseport"), &settings, node));
    let node_capacity = has_node.then(|| capacity(find(NODE_NONE), &settings, node));
    for (group, cap) in [("demo", &demo_capacity), ("node", &node_capacity)] {
        if let Some(c) = cap {
            eprintln!("e2e: {group} capacity {:.0} req/s ({})", c.per_s, c.how);
        }
    }

    let mut samples = Vec::new();
    let mut notes = Vec::new();
    for round in 0..settings.rounds {
        let n = all.len();
        for i in 0..n {
            let system = &all[(i + round) % n];
            let cap = match system.group {
                Group::Demo => demo_capacity.as_ref(),
                Group::Node => node_capacity.as_ref(),
            }
            .expect("a group with systems has a capacity");
            samples.extend(run_system(round, system, &settings, node, cap, &mut notes));
        }
    }
    let results = Results { samples };

    let mut out = String::new();
    let _ = writeln!(out, "# rcluster-lb end-to-end benchmark\n");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let _ = writeln!(
        out,
        "{} workers per system, {} round(s){}, Linux {}, {} CPUs; binary {}; node {}; wrk {}. Total {:.0} s; load average (1 min) {} at the start, {} at the end.",
        settings.workers,
        settings.rounds,
        if settings.quick {
            " (QUICK: short runs, a smoke test)"
        } else {
            ""
        },
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        // Relative to the package (cargo runs benches there), so no checkout path is printed.
        std::env::current_dir()
            .ok()
            .and_then(|cwd| settings.bin.strip_prefix(cwd).ok())
            .unwrap_or(&settings.bin)
            .display(),
        settings
            .node
            .as_deref()
            .map_or("absent".to_owned(), node_version),
        if settings.wrk.is_some() {
            "cross-check on"
        } else {
            "absent"
        },
        started.elapsed().as_secs_f64(),
        load_before.as_deref().unwrap_or("?"),
        load_average().as_deref().unwrap_or("?"),
    );
    let groups: [(Group, &str, &Option<Capacity>, &str); 2] = [
        (
            Group::Demo,
            "rcluster-lb policies, built-in demo worker",
            &demo_capacity,
            "reuseport",
        ),
        (
            Group::Node,
            "Node peers, the same node app",
            &node_capacity,
            NODE_RR,
        ),
    ];
    for (group, title, cap, base) in groups {
        let members: Vec<&System> = all.iter().filter(|s| s.group == group).collect();
        let Some(cap) = cap else { continue };
        let _ = writeln!(out, "\n## {title}\n");
        let _ = writeln!(
            out,
            "Heavy-mix capacity: {:.0} req/s ({}).",
            cap.per_s, cap.how
        );
        render_group(&mut out, &results, &members, base, cap, &settings);
    }
    let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
    render_checks(&mut out, &results, &names);
    render_kernel_checks(&mut out, &results);
    // One line per distinct failure: a system that did not start fails every scenario of its
    // round with the same message.
    /// (round, system, message) and the scenarios that failed with it.
    type FailureKey<'a> = (usize, &'a str, &'a str);
    let mut grouped: Vec<(FailureKey<'_>, Vec<String>)> = Vec::new();
    for s in &results.samples {
        let Err(e) = &s.outcome else { continue };
        let key = (s.round, s.system.as_str(), e.as_str());
        match grouped.iter_mut().find(|(k, _)| *k == key) {
            Some((_, scenarios)) => scenarios.push(s.scenario.name()),
            None => grouped.push((key, vec![s.scenario.name()])),
        }
    }
    let failures: Vec<String> = grouped
        .into_iter()
        .map(|((round, system, e), scenarios)| {
            format!(
                "round {}, {system}, {}: {e}",
                round + 1,
                scenarios.join(" ")
            )
        })
        .chain(notes)
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "\n## Failed runs and notes\n");
        for f in &failures {
            let _ = writeln!(out, "- {f}");
        }
    }

    print!("{out}");
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&settings.out_dir)?;
        std::fs::write(settings.out_dir.join("e2e.md"), &out)?;
        std::fs::write(settings.out_dir.join("e2e-runs.csv"), csv(&results, &all))?;
        Ok(())
    };
    match write() {
        Ok(()) => println!(
            "\nwrote {} and e2e-runs.csv",
            settings.out_dir.join("e2e.md").display()
        ),
        Err(e) => println!(
            "\ncannot write results to {}: {e}",
            settings.out_dir.display()
        ),
    }
}
