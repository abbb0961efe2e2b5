//! The command line: clap parses [`Args`], [`Args::into_config`] validates them into a
//! [`Config`] (two steps, so every check that needs the host — the allowed CPU set, the
//! command's path — happens in one place and fails with one line before anything starts).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use thiserror::Error;

use crate::master::probe::ProbeSpec;
use crate::policy::PolicyKind;
use crate::sys;
use crate::topology;
use rcluster_proto::Mode;

pub use crate::policy::MAX_WORKERS;
/// At most this many `--listen` addresses (one bit each in the load table, one fd each).
pub use rcluster_proto::MAX_LISTENERS;

/// The longest duration any option takes: every deadline is `Instant::now() + option`, which
/// must not overflow (a year is far beyond any sensible grace period or timeout).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// rcluster-lb runs N copies of a server behind one port, the master handing each connection
/// to the worker its policy picks.
#[derive(Debug, Parser)]
#[command(
    name = "rcluster-lb",
    version,
    about = "Run N pinned copies of a server in any language behind one port; the master hands \
             each connection to the worker its policy picks.",
    after_help = "With no COMMAND, runs the built-in demo HTTP worker.\n\
                  Signals: TERM/INT graceful stop, HUP rolling reload, TTIN/TTOU add/remove a \
                  worker, USR1 log per-worker status, USR2 log the acceptor's tables. \
                  `rcluster-lb ctl status` shows a running master (docs/CONTROL.md).",
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    #[command(subcommand)]
    pub subcommand: Option<Sub>,

    /// Address to listen on (repeatable; default 127.0.0.1:8080, or the sockets passed by
    /// socket activation); fd 3+i in a worker belongs to the i-th. `:PORT` = every address,
    /// `[::]:PORT` is dual-stack. Port 0 picks a free port, logged at startup.
    #[arg(long = "listen", short = 'l', value_name = "ADDR")]
    pub listen: Vec<String>,

    /// Number of workers; 0 = one per CPU this process may run on, or fewer under a cgroup CPU
    /// quota (cpu.max, cpu.cfs_quota_us).
    #[arg(long, short = 'w', value_name = "N", default_value_t = 0)]
    pub workers: usize,

    /// How connections are assigned to workers.
    #[arg(long, short = 'p', value_enum, default_value_t = PolicyKind::LeastConn)]
    pub policy: PolicyKind,

    /// Who places connections for least-conn, round-robin, p2c and least-mem: kernel (an
    /// SK_REUSEPORT BPF program picks from the master's load table at SYN time; workers get
    /// their own listening sockets as in reuseport mode; needs CAP_BPF and Linux 5.13, or the
    /// program passed in by `rcluster-lb steer-load`), dispatch (the master accepts and passes
    /// each connection), or auto (kernel when the program loads, dispatch otherwise).
    #[arg(long, value_enum, default_value_t = Steer::Auto)]
    pub steer: Steer,

    /// Worker CPU pinning: none, auto (one per physical core first; see `rcluster-lb
    /// topology`), or a CPU list such as 0-3,6 (worker i gets the i-th CPU, wrapping).
    #[arg(long, value_name = "none|auto|CPU-LIST", default_value = "none")]
    pub pin: String,

    /// Pin the acceptor thread to this CPU (with --pin auto the plan's acceptor CPU is used).
    #[arg(long, value_name = "CPU")]
    pub acceptor_cpu: Option<usize>,

    /// Shutdown: how long the whole stop may take (workers first get up to half of it to take
    /// the connections already dispatched to them, then SIGTERM; SIGKILL at the end). Drain
    /// (reload, recycle, scale-down): how long after the drain signal before SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace: Duration,

    /// How often worker RSS is sampled from /proc/PID/statm (least-mem, --max-rss).
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub rss_interval: Duration,

    /// Consider a worker ready this long after it starts if it signals nothing itself (no READY
    /// on its channel, no READY=1 on NOTIFY_SOCKET). Without it, such a worker is only
    /// considered ready after --ready-timeout, with a warning.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub ready_delay: Option<Duration>,

    /// How long a starting worker may take to become ready.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,

    /// Do not inject the preload shim (LD_PRELOAD) into workers.
    #[arg(long)]
    pub no_preload: bool,

    /// Preload this shim instead of the one built into rcluster-lb (for packagers; also
    /// RCLUSTER_SHIM). It must belong to this user or root and be writable by no one else.
    #[arg(long, value_name = "PATH", conflicts_with = "no_preload")]
    pub shim: Option<PathBuf>,

    /// Signal sent to a worker being drained (reload, recycle, scale-down).
    #[arg(long, value_name = "SIGNAL", default_value = "TERM")]
    pub drain_signal: String,

    /// Signal sent to the workers when the master stops (TERM, INT or QUIT to the master).
    #[arg(long, value_name = "SIGNAL", default_value = "TERM")]
    pub stop_signal: String,

    /// Hold the drain and stop signals until the worker has closed every connection it holds
    /// (at most half of --grace) even when the server catches them: for servers whose handler
    /// ends them at once (nginx with `master_process off`, many C servers). A server without a
    /// handler is held this way anyway. Needs the master's dispatch (not reuseport, shared or
    /// --steer kernel), which counts each worker's connections.
    #[arg(long)]
    pub drain_when_idle: bool,

    /// After TERM/INT/QUIT, keep accepting and dispatching this long before stopping (time for
    /// a load balancer or Kubernetes to take this instance out of its endpoints).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,

    /// Run the workers as this user (name or uid; its groups unless --group). The master
    /// keeps its own privileges.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Run the workers with this group (name or gid).
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Workers replaced at a time during a rolling reload (SIGHUP).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub reload_batch: usize,

    /// Recycle a worker after it was handed this many connections (dispatch policies only: in
    /// the kernel modes the master never sees a connection).
    #[arg(long, value_name = "N")]
    pub max_conns: Option<u64>,

    /// Random extra 0..=J connections per worker for --max-conns, so workers do not recycle
    /// in lockstep.
    #[arg(long, value_name = "J", default_value_t = 0)]
    pub max_conns_jitter: u64,

    /// Recycle a worker whose resident memory exceeds SIZE (e.g. 512MiB).
    #[arg(long, value_name = "SIZE")]
    pub max_rss: Option<bytesize::ByteSize>,

    /// Replace a worker that takes nothing from a non-empty queue this long (its channel in the
    /// dispatch modes, its own listener's accept queue in reuseport mode); what is queued for it
    /// is served by the others.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,

    /// Run CMD (one command line, split into words like a shell does, without a shell) as the
    /// agent: one process beside the workers that serves no connections. It starts first; the
    /// workers start once it is ready.
    #[arg(long, value_name = "CMD")]
    pub agent: Option<String>,

    /// Replace a worker that sent a heartbeat on the message bus and then sent none for this
    /// long (workers that never send one are not checked).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: Option<Duration>,

    /// Active health checks (dispatch mode): every --health-interval send each ready worker a
    /// probe connection with this request ('METHOD /path'); a worker that fails --health-fails
    /// in a row (no 2xx within --health-timeout) is replaced.
    #[arg(long, value_name = "'METHOD /PATH'")]
    pub health_check: Option<String>,

    /// Period of the active health checks.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,

    /// How long a worker has to answer a health check.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_timeout: Duration,

    /// Failed health checks in a row that replace a worker.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub health_fails: u32,
    /// This master's name: its control socket is NAME.sock in $XDG_RUNTIME_DIR/rcluster-lb/
    /// (root: /run/rcluster-lb/control/; otherwise /tmp/rcluster-lb-UID/). Default: the first
    /// listener's port, e.g. 8080.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Control socket path, instead of the one --name gives.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Write the master's pid to PATH (removed at exit).
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,

    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,

    /// Master log lines: text (timestamped) or json (one object per line).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Worker stdout/stderr: capture (line by line on the master's stderr, prefixed with the
    /// worker's slot and pid) or inherit (the master's stdout/stderr, untouched).
    #[arg(long, value_enum, default_value_t = WorkerOutput::Capture)]
    pub worker_output: WorkerOutput,

    /// The server to run as each worker, and its arguments.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// `--steer`: who places connections for the policies the kernel program can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Steer {
    /// The kernel when the program loads here, the master otherwise.
    Auto,
    /// The kernel, or fail to start.
    Kernel,
    /// The master's acceptor.
    Dispatch,
}

impl Steer {
    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Steer::Auto => "auto",
            Steer::Kernel => "kernel",
            Steer::Dispatch => "dispatch",
        }
    }
}

/// Subcommands besides running the cluster.
#[derive(Debug, Subcommand)]
pub enum Sub {
    /// Show this host's CPUs, cores, NUMA nodes, NIC interrupt CPUs and the --pin auto plan.
    Topology {
        /// Plan for this many workers (default: one per allowed CPU).
        #[arg(long, short = 'w')]
        workers: Option<usize>,
    },
    /// Talk to a running master through its control socket.
    Ctl(CtlArgs),
    /// With CAP_BPF (or as root): load the kernel-steering program, drop every capability, exec
    /// COMMAND.
    ///
    /// Creates the steering maps and one program per listening address, passes their fds to
    /// COMMAND in RCLUSTER_STEER_FDS (and plain reuseport mode's spread program in
    /// RCLUSTER_SPREAD_FDS), drops the effective, permitted, inheritable and ambient
    /// capabilities and execs COMMAND, which runs the master without CAP_BPF: e.g. `setpriv
    /// --reuid=app --regid=app --init-groups rcluster-lb --steer kernel -- node app.js`. The
    /// master adopts the fds its mode uses instead of loading the program.
    #[command(
        after_help = "As root, COMMAND must give up root itself (setpriv --reuid, or \
                      --bounding-set -all): a program executed as root gets its capabilities \
                      back. README: Kernel steering."
    )]
    SteerLoad {
        /// One program per listening address: the master's number of --listen addresses.
        #[arg(long, value_name = "N", default_value_t = 1)]
        listeners: usize,
        /// The command to exec: the master, or a wrapper that execs it.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<OsString>,
    },
    /// The built-in demo HTTP worker (started by the master; not for direct use).
    #[command(hide = true)]
    DemoWorker,
}

/// `rcluster-lb ctl`: which master, and what to ask it.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The master's control socket.
    #[arg(long, value_name = "PATH", conflicts_with = "name")]
    pub control: Option<PathBuf>,
    /// The master's --name (default: the only master in the control directory).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// What to ask.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// Requests `rcluster-lb ctl` sends (docs/CONTROL.md).
#[derive(Debug, Clone, Subcommand)]
pub enum CtlCommand {
    /// Per-worker table (pid, generation, state, uptime, connections, RSS, restarts, CPU) and
    /// the master's policy, listeners, counters and imbalance.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The acceptor's per-worker tables as JSON, for bug reports.
    Dump,
    /// Rolling reload; waits for it and prints the new pids, or the reason it aborted.
    Reload,
    /// Run N workers.
    Scale {
        /// Worker count.
        workers: usize,
    },
    /// Graceful stop; waits until the master has exited.
    Stop {
        /// Return once the stop has begun.
        #[arg(long)]
        no_wait: bool,
    },
    /// Replace the worker in SLOT (the new one starts first).
    Recycle {
        /// Worker slot.
        slot: usize,
    },
    /// Switch the dispatch policy (round-robin, least-conn, least-mem, p2c) without dropping a
    /// connection.
    Policy {
        /// Policy name.
        name: String,
    },
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-11-30T21:00:00.123Z rcluster-lb[PID]: info message`.
    Text,
    /// One JSON object per line: ts, level, pid, msg (worker lines: worker, worker_pid, stream).
    Json,
}

/// `--worker-output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkerOutput {
    /// Through a pipe per worker, line by line, prefixed.
    Capture,
    /// The master's own stdout and stderr.
    Inherit,
}

/// A configuration error: exit code 2.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// What each worker runs.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// As given on the command line (re-resolved at each reload, so a new binary is picked up).
    pub program: OsString,
    /// Arguments after the program.
    pub args: Vec<OsString>,
    /// This is the built-in demo worker (the master's own binary).
    pub builtin: bool,
}

impl WorkerCommand {
    /// Resolves the program like `execvp` would (a name without `/` is searched in `PATH`),
    /// failing with a message naming the command if it is missing or not executable.
    pub fn resolve(&self) -> Result<PathBuf, String> {
        let name = Path::new(&self.program);
        let shown = name.display();
        if self.program.is_empty() {
            return Err("empty command".into());
        }
        if name.as_os_str().as_encoded_bytes().contains(&b'/') {
            if !name.exists() {
                return Err(format!("command not found: {shown}"));
            }
            if !sys::is_executable(name) {
                return Err(format!("command is not executable: {shown}"));
            }
            return Ok(name.to_path_buf());
        }
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
        let mut found_not_exec = false;
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if sys::is_executable(&candidate) {
                return Ok(candidate);
            }
            found_not_exec |= candidate.is_file();
        }
        if found_not_exec {
            Err(format!("command is not executable: {shown}"))
        } else {
            Err(format!("command not found: {shown}"))
        }
    }

    /// The command as one string for logs.
    pub fn display(&self) -> String {
        let mut s = self.program.to_string_lossy().into_owned();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }
}

/// CPU assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    /// The scheduler decides.
    None,
    /// Worker `i` is pinned to `cpus[i % len]`.
    Cpus(Vec<usize>),
}

/// The validated configuration the master runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen addresses, in fd order.
    pub listen: Vec<SocketAddr>,
    /// Whether `--listen` was given (otherwise socket-activated sockets replace the default).
    pub listen_explicit: bool,
    /// Number of workers (resolved from 0).
    pub workers: usize,
    /// The policy.
    pub policy: PolicyKind,
    /// Who places connections (`Kernel` only for a policy the program carries; `Auto` is
    /// resolved at startup by loading the program).
    pub steer: Steer,
    /// Worker pinning.
    pub pin: Pin,
    /// CPU for the acceptor thread.
    pub acceptor_cpu: Option<usize>,
    /// What workers run.
    pub command: WorkerCommand,
    /// Shutdown and drain grace period.
    pub grace: Duration,
    /// RSS sampling period.
    pub rss_interval: Duration,
    /// Ready this long after start when the worker signals nothing.
    pub ready_delay: Option<Duration>,
    /// Limit for becoming ready.
    pub ready_timeout: Duration,
    /// The preload shim to inject (`LD_PRELOAD`), checked; `None` with `--no-preload` or for
    /// the built-in demo worker.
    pub preload: Option<PathBuf>,
    /// Signal for draining.
    pub drain_signal: libc::c_int,
    /// Signal sent to the workers on stop.
    pub stop_signal: libc::c_int,
    /// `--drain-when-idle`: the drain and stop signals wait until the worker holds no
    /// connection, whether or not the server catches them (dispatch mode).
    pub drain_when_idle: bool,
    /// How long to keep serving after a stop signal before stopping.
    pub shutdown_delay: Duration,
    /// Who the workers run as (`--user`/`--group`), resolved before any fork.
    pub credentials: Option<sys::Credentials>,
    /// Rolling reload batch size.
    pub reload_batch: usize,
    /// Recycle after this many connections (plus jitter).
    pub max_conns: Option<u64>,
    /// Jitter for `max_conns`.
    pub max_conns_jitter: u64,
    /// Recycle above this RSS, bytes.
    pub max_rss: Option<u64>,
    /// Replace a worker that takes nothing from a non-empty queue this long.
    pub stall_timeout: Duration,
    /// `--name` (default: the first listener's bound port, decided after binding).
    pub name: Option<String>,
    /// `--control`.
    pub control: Option<PathBuf>,
    /// `--pid-file`.
    pub pid_file: Option<PathBuf>,
    /// `--metrics`.
    pub metrics: Option<SocketAddr>,
    /// `--log-format`.
    pub log_format: LogFormat,
    /// `--worker-output`.
    pub worker_output: WorkerOutput,
    /// The agent's command line, split into words.
    pub agent: Option<WorkerCommand>,
    /// Replace a worker whose bus heartbeats stop for this long.
    pub heartbeat_timeout: Option<Duration>,
    /// `--health-check` and its settings.
    pub health_check: Option<HealthCheck>,
}

/// Active health checks, validated.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// The request and the timeout.
    pub spec: ProbeSpec,
    /// Probe period.
    pub interval: Duration,
    /// Failures in a row that replace a worker.
    pub fails: u32,
}

impl Args {
    /// Validates the arguments against this host. `self_exe` is the master's binary (the
    /// demo worker's program).
    pub fn into_config(self, self_exe: &Path) -> Result<Config, UsageError> {
        let listen_explicit = !self.listen.is_empty();
        let listen_text = if listen_explicit {
            self.listen.clone()
        } else {
            vec!["127.0.0.1:8080".to_string()]
        };
        if listen_text.len() > MAX_LISTENERS {
            return Err(usage(format!(
                "too many --listen addresses ({}, at most {MAX_LISTENERS})",
                self.listen.len()
            )));
        }
        let mut listen: Vec<SocketAddr> = Vec::with_capacity(listen_text.len());
        for text in &listen_text {
            let addr = crate::master::listener::parse_listen_addr(text).map_err(usage)?;
            if listen.contains(&addr) && addr.port() != 0 {
                return Err(usage(format!("--listen {addr} given twice")));
            }
            listen.push(addr);
        }
        for &a in &listen {
            if crate::master::listener::is_dual_stack(a) && a.port() != 0 {
                let v4 = SocketAddr::from(([0, 0, 0, 0], a.port()));
                if listen.contains(&v4) {
                    return Err(usage(format!(
                        "--listen {a} is dual-stack and already takes IPv4: drop {v4}"
                    )));
                }
            }
        }
        let allowed = sys::sched_getaffinity()
            .map_err(|e| usage(format!("cannot read the allowed CPU set: {e}")))?
            .cpus();
        let workers = match self.workers {
            0 => workers_for_cpus(allowed.len(), crate::cgroup::cpu_quota()),
            n if n > MAX_WORKERS => {
                return Err(usage(format!(
                    "--workers {n} is too many (at most {MAX_WORKERS})"
                )));
            }
            n => n,
        };
        let check_allowed = |cpu: usize, what: &str| -> Result<(), UsageError> {
            if allowed.contains(&cpu) {
                Ok(())
            } else {
                Err(usage(format!(
                    "{what} names CPU {cpu}, which is not in this process's allowed CPUs ({})",
                    topology::format_cpu_list(&allowed)
                )))
            }
        };
        let mut acceptor_cpu = self.acceptor_cpu;
        let pin = match self.pin.as_str() {
            "none" => Pin::None,
            "auto" => {
                let topo = topology::Topology::detect(&allowed)
                    .map_err(|e| usage(format!("cannot read the CPU topology: {e}")))?;
                let plan = topo.plan(workers);
                if acceptor_cpu.is_none() && self.policy.mode() == rcluster_proto::Mode::Dispatch {
                    acceptor_cpu = plan.acceptor;
                }
                Pin::Cpus(plan.workers)
            }
            list => {
                let cpus = topology::parse_cpu_list(list)
                    .map_err(|e| usage(format!("--pin {list}: {e}")))?;
                if cpus.is_empty() {
                    return Err(usage(format!("--pin {list}: no CPUs")));
                }
                for &cpu in &cpus {
                    check_allowed(cpu, "--pin")?;
                }
                Pin::Cpus(cpus)
            }
        };
        if let Some(cpu) = self.acceptor_cpu {
            check_allowed(cpu, "--acceptor-cpu")?;
        }
        let drain_signal = sys::parse_signal(&self.drain_signal).ok_or_else(|| {
            usage(format!(
                "--drain-signal: unknown signal '{}'",
                self.drain_signal
            ))
        })?;
        let stop_signal = sys::parse_signal(&self.stop_signal).ok_or_else(|| {
            usage(format!(
                "--stop-signal: unknown signal '{}'",
                self.stop_signal
            ))
        })?;
        let credentials = match (&self.user, &self.group) {
            (None, None) => None,
            (user, group) => {
                if sys::geteuid() != 0 {
                    return Err(usage(
                        "--user/--group need the master to run as root (with socket activation, \
                         run the whole service as the user instead)",
                    ));
                }
                Some(sys::Credentials::resolve(user.as_deref(), group.as_deref()).map_err(usage)?)
            }
        };
        if self.reload_batch == 0 {
            return Err(usage("--reload-batch must be at least 1"));
        }
        if self.max_conns == Some(0) {
            return Err(usage("--max-conns must be at least 1"));
        }
        if self.rss_interval.is_zero() {
            return Err(usage("--rss-interval must be greater than 0"));
        }
        if self.stall_timeout.is_zero() {
            return Err(usage("--stall-timeout must be greater than 0"));
        }
        if self.max_rss.is_some_and(|s| s.as_u64() == 0) {
            return Err(usage("--max-rss must be greater than 0"));
        }
        if self.max_conns.is_some() && self.policy.mode() != rcluster_proto::Mode::Dispatch {
            return Err(usage(format!(
                "--max-conns needs a dispatch policy: in {} mode the kernel hands out \
                 connections and the master cannot count them",
                self.policy.mode().as_str()
            )));
        }
        for (name, value) in [
            ("--grace", Some(self.grace)),
            ("--rss-interval", Some(self.rss_interval)),
            ("--ready-delay", self.ready_delay),
            ("--ready-timeout", Some(self.ready_timeout)),
            ("--stall-timeout", Some(self.stall_timeout)),
        ] {
            if let Some(d) = value
                && d > MAX_DURATION
            {
                return Err(usage(format!(
                    "{name} {} is too long (at most {})",
                    humantime::format_duration(d),
                    humantime::format_duration(MAX_DURATION)
                )));
            }
        }
        let command = match self.command.split_first() {
            None => WorkerCommand {
                program: self_exe.as_os_str().to_owned(),
                args: vec!["demo-worker".into()],
                builtin: true,
            },
            Some((program, args)) => WorkerCommand {
                program: program.clone(),
                args: args.to_vec(),
                builtin: false,
            },
        };
        command.resolve().map_err(usage)?;
        let steer = match (
            self.steer,
            crate::steer::SteerPolicy::for_policy(self.policy),
        ) {
            (Steer::Kernel, None) => {
                return Err(usage(format!(
                    "--steer kernel: the kernel program places connections for least-conn, \
                     round-robin, p2c and least-mem, not {}",
                    self.policy
                )));
            }
            // Nothing to steer: the kernel modes have their own placement, the others dispatch.
            (Steer::Auto, None) => Steer::Dispatch,
            (steer, _) => steer,
        };
        // An active health check decides which workers get connections: only the master's
        // dispatch can act on it.
        let steer = match (steer, self.health_check.is_some()) {
            (Steer::Kernel, true) => {
                return Err(usage(
                    "--steer kernel cannot be combined with --health-check (which needs the \
                     master's dispatch to act on); use --heartbeat-timeout there",
                ));
            }
            (Steer::Auto, true) => Steer::Dispatch,
            (steer, _) => steer,
        };
        // Only the master's dispatch counts a worker's connections, so only it can tell when a
        // drained worker holds none.
        let steer = match (steer, self.drain_when_idle) {
            (_, true) if self.policy.mode() != Mode::Dispatch => {
                return Err(usage(format!(
                    "--drain-when-idle needs the master's dispatch, which counts each worker's \
                     connections; {} mode leaves them to the kernel",
                    self.policy
                )));
            }
            (Steer::Kernel, true) => {
                return Err(usage(
                    "--steer kernel cannot be combined with --drain-when-idle (which needs the \
                     master's dispatch to count each worker's connections)",
                ));
            }
            (Steer::Auto, true) => Steer::Dispatch,
            (steer, _) => steer,
        };
        let agent = match &self.agent {
            None => None,
            Some(line) => {
                let words = shell_words::split(line)
                    .map_err(|e| usage(format!("--agent {line:?}: {e}")))?;
                let Some((program, args)) = words.split_first() else {
                    return Err(usage("--agent: empty command"));
                };
                let agent = WorkerCommand {
                    program: program.into(),
                    args: args.iter().map(OsString::from).collect(),
                    builtin: false,
                };
                agent
                    .resolve()
                    .map_err(|e| usage(format!("--agent: {e}")))?;
                Some(agent)
            }
        };
        let health_check = match &self.health_check {
            None => None,
            Some(check) => {
                if self.policy.mode() != Mode::Dispatch {
                    return Err(usage(format!(
                        "--health-check needs a dispatch policy (the master cannot choose which \
                         worker a connection reaches in {} mode); use --heartbeat-timeout there",
                        self.policy.mode()
                    )));
                }
                if self.health_interval.is_zero() || self.health_timeout.is_zero() {
                    return Err(usage(
                        "--health-interval and --health-timeout must be greater than 0",
                    ));
                }
                if self.health_fails == 0 {
                    return Err(usage("--health-fails must be at least 1"));
                }
                let spec = ProbeSpec::parse(check, self.health_timeout)
                    .map_err(|e| usage(format!("--health-check: {e}")))?;
                Some(HealthCheck {
                    spec,
                    interval: self.health_interval,
                    fails: self.health_fails,
                })
            }
        };
        if self.heartbeat_timeout.is_some_and(|d| d.is_zero()) {
            return Err(usage("--heartbeat-timeout must be greater than 0"));
        }
        if let Some(name) = &self.name {
            crate::master::control::check_name(name).map_err(usage)?;
        }
        let metrics = match &self.metrics {
            None => None,
            Some(text) => Some(
                crate::master::listener::parse_listen_addr(text)
                    .map_err(|e| usage(format!("--metrics: {e}")))?,
            ),
        };
        let preload = if self.no_preload || command.builtin {
            None
        } else {
            Some(crate::master::shim::locate(self.shim.as_deref()).map_err(usage)?)
        };
        Ok(Config {
            name: self.name,
            control: self.control,
            pid_file: self.pid_file,
            metrics,
            log_format: self.log_format,
            worker_output: self.worker_output,
            listen,
            listen_explicit,
            workers,
            policy: self.policy,
            steer,
            pin,
            acceptor_cpu,
            command,
            grace: self.grace,
            rss_interval: self.rss_interval,
            ready_delay: self.ready_delay,
            ready_timeout: self.ready_timeout,
            preload,
            drain_signal,
            stop_signal,
            drain_when_idle: self.drain_when_idle,
            shutdown_delay: self.shutdown_delay,
            credentials,
            reload_batch: self.reload_batch,
            max_conns: self.max_conns,
            max_conns_jitter: self.max_conns_jitter,
            max_rss: self.max_rss.map(|s| s.as_u64()),
            stall_timeout: self.stall_timeout,
            agent,
            heartbeat_timeout: self.heartbeat_timeout,
            health_check,
        })
    }
}

/// `--workers 0`: one per allowed CPU, or fewer when the cgroup's CPU quota allows fewer;
/// logs which limit applied.
fn workers_for_cpus(allowed: usize, quota: Option<crate::cgroup::CpuQuota>) -> usize {
    let allowed = allowed.max(1);
    match quota {
        Some(q) if q.cpus < allowed => {
            log::info!(
                "--workers 0: {} workers, the CPU quota ({}) of {allowed} allowed CPUs",
                q.cpus,
                q.source
            );
            q.cpus
        }
        _ => {
            log::info!("--workers 0: {allowed} workers, one per allowed CPU (sched_getaffinity)");
            allowed
        }
    }
}

/// `--policy` values: the names, aliases and help the policies themselves define, so the
/// policy module needs no CLI derive.
impl clap::ValueEnum for PolicyKind {
    fn value_variants<'a>() -> &'a [Self] {
        &PolicyKind::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(
            clap::builder::PossibleValue::new(self.name())
                .aliases(self.aliases().iter().copied())
                .help(self.about()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<Config, UsageError> {
        let mut argv = vec!["rcluster-lb"];
        argv.extend_from_slice(args);
        Args::try_parse_from(argv)
            .map_err(|e| UsageError(e.to_string()))?
            .into_config(Path::new("/bin/sh"))
    }

    #[test]
    fn defaults_run_the_demo_worker_on_8080() {
        let c = config(&[]).unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert!(!c.listen_explicit);
        assert_eq!(c.stop_signal, libc::SIGTERM);
        assert!(c.credentials.is_none());
        assert!(c.command.builtin);
        let allowed = sys::sched_getaffinity().unwrap().cpus().len();
        let quota = crate::cgroup::cpu_quota().map_or(allowed, |q| q.cpus);
        assert_eq!(c.workers, allowed.min(quota));
        assert_eq!(c.policy, PolicyKind::LeastConn);
    }

    #[test]
    fn workers_0_takes_the_quota_when_it_is_tighter() {
        let quota = |cpus| {
            Some(crate::cgroup::CpuQuota {
                cpus,
                source: "fixture".into(),
            })
        };
        assert_eq!(workers_for_cpus(8, quota(2)), 2);
        assert_eq!(workers_for_cpus(2, quota(4)), 2);
        assert_eq!(workers_for_cpus(4, None), 4);
        assert_eq!(workers_for_cpus(0, None), 1);
    }

    #[test]
    fn aliases_and_command() {
        let c = config(&["-p", "rr", "-w", "3", "--", "sh", "-c", "true"]).unwrap();
        assert_eq!(c.policy, PolicyKind::RoundRobin);
        assert_eq!(c.workers, 3);
        assert!(!c.command.builtin);
        assert_eq!(c.command.args, vec![OsString::from("-c"), "true".into()]);
    }

    #[test]
    fn bad_input_names_the_problem() {
        let msg = |args: &[&str]| config(args).unwrap_err().0;
        assert!(msg(&["--listen", "nope"]).contains("nope"));
        assert!(msg(&["--workers", "100000"]).contains("too many"));
        assert!(msg(&["--pin", "4000"]).contains("CPU 4000"));
        assert!(msg(&["--pin", "0-x"]).contains("0-x"));
        assert!(msg(&["--acceptor-cpu", "4000"]).contains("CPU 4000"));
        assert!(msg(&["--", "/no/such/server"]).contains("command not found"));
        assert!(msg(&["--", "no-such-server-anywhere"]).contains("command not found"));
        let plain = std::env::temp_dir().join(format!("rcluster-lb-plain-{}", std::process::id()));
        std::fs::write(&plain, "not a program").unwrap();
        let not_exec = msg(&["--", plain.to_str().unwrap()]);
        std::fs::remove_file(&plain).unwrap();
        assert!(not_exec.contains("not executable"), "{not_exec}");
        assert!(msg(&["--drain-signal", "BOGUS"]).contains("BOGUS"));
        assert!(msg(&["--steer", "kernel", "-p", "reuseport"]).contains("not reuseport"));
        assert!(msg(&["--steer", "kernel", "-p", "shared"]).contains("not shared"));
        assert!(msg(&["--steer", "kernel", "--health-check", "/h"]).contains("--health-check"));
        assert!(msg(&["--drain-when-idle", "-p", "shared"]).contains("shared mode"));
        assert!(msg(&["--drain-when-idle", "-p", "reuseport"]).contains("reuseport mode"));
        assert!(msg(&["--drain-when-idle", "--steer", "kernel"]).contains("--drain-when-idle"));
        assert!(msg(&["--agent", "sh -c 'unterminated"]).contains("--agent"));
        assert!(msg(&["--agent", ""]).contains("empty command"));
        assert!(msg(&["--agent", "/no/such/agent x"]).contains("command not found"));
        assert!(msg(&["--heartbeat-timeout", "0s"]).contains("greater than 0"));
        assert!(msg(&["--health-check", "GET /h", "-p", "shared"]).contains("dispatch policy"));
        assert!(msg(&["--health-check", "nope nope nope"]).contains("--health-check"));
        assert!(msg(&["--health-check", "/h", "--health-fails", "0"]).contains("at least 1"));
        assert!(
            config(&["--health-check", "/healthz"])
                .unwrap()
                .health_check
                .is_some()
        );
        assert!(msg(&["--stop-signal", "NOPE"]).contains("NOPE"));
        if sys::geteuid() == 0 {
            assert!(msg(&["--user", "no-such-user-here"]).contains("no-such-user-here"));
            assert!(msg(&["--group", "no-such-group-here"]).contains("no-such-group-here"));
        } else {
            assert!(msg(&["--user", "nobody"]).contains("run as root"));
        }
        assert!(msg(&["-l", "[::]:7001", "-l", "0.0.0.0:7001"]).contains("dual-stack"));
    }

    #[test]
    fn steer_defaults_to_auto_where_the_program_applies() {
        assert_eq!(config(&[]).unwrap().steer, Steer::Auto);
        assert_eq!(config(&["-p", "rr"]).unwrap().steer, Steer::Auto);
        assert_eq!(config(&["-p", "p2c"]).unwrap().steer, Steer::Auto);
        assert_eq!(config(&["-p", "lm"]).unwrap().steer, Steer::Auto);
        assert_eq!(
            config(&["-p", "least-mem", "--steer", "kernel"])
                .unwrap()
                .steer,
            Steer::Kernel
        );
        assert_eq!(config(&["-p", "reuseport"]).unwrap().steer, Steer::Dispatch);
        assert_eq!(config(&["-p", "shared"]).unwrap().steer, Steer::Dispatch);
        assert_eq!(
            config(&["-p", "lc", "--steer", "dispatch"]).unwrap().steer,
            Steer::Dispatch
        );
        assert_eq!(config(&["--steer", "kernel"]).unwrap().steer, Steer::Kernel);
        assert_eq!(
            config(&["--health-check", "/h"]).unwrap().steer,
            Steer::Dispatch
        );
        let idle = config(&["--drain-when-idle"]).unwrap();
        assert_eq!((idle.steer, idle.drain_when_idle), (Steer::Dispatch, true));
    }

    #[test]
    fn agent_is_split_like_a_shell_without_one() {
        let c = config(&["--agent", "sh -c 'echo \"a b\"; exit 0' $HOME"]).unwrap();
        let agent = c.agent.unwrap();
        assert_eq!(agent.program, "sh");
        assert_eq!(
            agent.args,
            vec![
                OsString::from("-c"),
                "echo \"a b\"; exit 0".into(),
                "$HOME".into()
            ]
        );
    }

    /// Arbitrary command lines built from every option name and values that stress parsing
    /// (huge numbers, huge and zero durations, garbage) never panic: they parse and validate,
    /// or fail with a usage error.
    mod props {
        use super::*;
        use proptest::prelude::*;

        const OPTIONS: &[&str] = &[
            "--listen",
            "--workers",
            "--policy",
            "--pin",
            "--acceptor-cpu",
            "--grace",
            "--rss-interval",
            "--ready-delay",
            "--ready-timeout",
            "--no-preload",
            "--drain-signal",
            "--reload-batch",
            "--max-conns",
            "--max-conns-jitter",
            "--max-rss",
            "--stall-timeout",
            "-w",
            "-p",
            "-l",
            "--",
        ];
        const VALUES: &[&str] = &[
            "0",
            "1",
            "-1",
            "18446744073709551615",
            "18446744073709551616",
            "500000000000years",
            "0s",
            "1ns",
            "10s",
            "1y",
            "auto",
            "none",
            "0-3",
            "4000",
            "rr",
            "reuseport",
            "shared",
            "127.0.0.1:0",
            "[::1]:0",
            "nonsense",
            "TERM",
            "KILL",
            "0B",
            "1EiB",
            "",
            "/bin/sh",
        ];

        fn word() -> impl Strategy<Value = String> {
            prop_oneof![
                proptest::sample::select(OPTIONS).prop_map(str::to_string),
                proptest::sample::select(VALUES).prop_map(str::to_string),
                any::<u64>().prop_map(|n| n.to_string()),
                "[ -~]{0,12}",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2048))]

            #[test]
            fn arbitrary_command_lines_never_panic(words in proptest::collection::vec(word(), 0..8)) {
                let mut argv = vec!["rcluster-lb".to_string()];
                argv.extend(words);
                if let Ok(args) = Args::try_parse_from(&argv) {
                    let _ = args.into_config(Path::new("/bin/sh"));
                }
            }
        }
    }
}
