//! The supervisor: worker lifecycle, on the master's main thread (which lives as long as the
//! master, so `PR_SET_PDEATHSIG` in workers fires exactly when the master dies). It spawns
//! workers with the worker contract, reaps them through pidfds in its mio poll loop, handles
//! signals, restarts crashed workers with capped exponential backoff, runs rolling reloads,
//! recycling and scaling, samples RSS, and shuts down gracefully.
//!
//! It owns the pidfds, each worker's NOTIFY_SOCKET, and in reuseport/shared modes the listening
//! sockets workers inherit. In dispatch mode the acceptor thread owns the listeners and channels;
//! the supervisor creates each channel pair, hands the worker its end at spawn, and gives both
//! ends to the acceptor.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use crossbeam_channel::Receiver;
use log::{error, info, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR1};
use signal_hook_mio::v1_0::Signals;
use socket2::Socket;

use crate::cli::{Config, Pin};
use crate::master::acceptor::{self, AcceptorHandle, ChannelEnds, Command, Event, WorkerId};
use crate::master::listener;
use crate::sys::spawn::{SpawnSpec, spawn};
use crate::sys::{self, CpuSet, ExitStatus, Pid};
use rcluster_proto::Mode;
use rcluster_proto::env::ChildEnv;

/// The supervisor's side of the control socket and metrics: answering
/// [`crate::master::control::Ask`]s.
mod ask;

/// First restart delay after a crash; doubles per consecutive crash.
pub const RESTART_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest restart delay.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A worker that stayed up this long resets its slot's crash count.
pub const STABLE_UPTIME: Duration = Duration::from_secs(10);
/// Consecutive short-lived crashes after which a slot is given up.
pub const CRASH_LOOP_LIMIT: u32 = 5;
/// File name of the preload shim, looked for next to the master's binary.
pub const SHIM_FILE: &str = "librcluster_shim.so";

const SIGNALS: Token = Token(0);
const WAKER: Token = Token(1);

fn pidfd_token(id: WorkerId) -> Token {
    Token(2 + 2 * id as usize)
}
fn notify_token(id: WorkerId) -> Token {
    Token(3 + 2 * id as usize)
}

/// Where a worker is in its life. Dispatch goes only to `Ready` workers (to `Starting` ones only
/// while none is ready).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Spawned, not yet ready (no READY on its channel, no READY=1, delay not elapsed).
    Starting,
    /// Takes connections.
    Ready,
    /// Gets no new connections; was sent the drain signal; SIGKILLed after the grace period.
    Draining,
}

struct Worker {
    id: WorkerId,
    slot: usize,
    generation: u64,
    pid: Pid,
    pidfd: OwnedFd,
    notify: Option<UnixDatagram>,
    state: Lifecycle,
    started: Instant,
    kill_at: Option<Instant>,
}

struct Slot {
    cpus: Option<CpuSet>,
    /// Reuseport mode: this slot's listening sockets, one per listener, kept across restarts.
    reuseport: Vec<Socket>,
    crashes: u32,
    restart_at: Option<Instant>,
    given_up: bool,
    /// False once scaled down (SIGTTOU).
    active: bool,
    /// Restarts after crashes, for status and metrics.
    restarts: u64,
}

/// Why a worker is being replaced by a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Reload,
    Recycle,
}

struct Replacement {
    new: WorkerId,
    old: WorkerId,
    reason: Reason,
    deadline: Instant,
}

/// Runs the cluster until shutdown. Returns an error (exit code 1) if it cannot start or if no
/// worker can run any more.
pub fn run(config: Config) -> anyhow::Result<()> {
    let mut sup = Supervisor::new(config)?;
    sup.open_hooks()?;
    sup.start()?;
    sup.run_loop()
}

struct Supervisor {
    config: Config,
    mode: Mode,
    poll: Poll,
    signals: Signals,
    waker: Arc<Waker>,
    events: Receiver<Event>,
    events_tx: crossbeam_channel::Sender<Event>,
    acceptor: Option<AcceptorHandle>,
    /// Bound addresses (real ports).
    addrs: Vec<SocketAddr>,
    /// Dispatch mode: the listening sockets until the acceptor takes them. Shared mode: the
    /// sockets every worker inherits.
    sockets: Vec<Socket>,
    slots: Vec<Slot>,
    workers: Vec<Worker>,
    next_id: WorkerId,
    generation: u64,
    base_env: Vec<Vec<u8>>,
    preload: Option<PathBuf>,
    shutdown_deadline: Option<Instant>,
    /// While shutting down in dispatch mode: when to SIGTERM the workers if the acceptor has
    /// not reported the channels drained by then.
    shutdown_signal_at: Option<Instant>,
    all_ready_announced: bool,
    next_rss_sample: Option<Instant>,
    replacements: Vec<Replacement>,
    /// Old workers a reload still has to replace.
    reload_queue: VecDeque<WorkerId>,
    reload_requested: bool,
    /// A reload started and has neither completed nor been aborted.
    reload_running: bool,
    /// Control socket, metrics endpoint, pid file and the requests they bring.
    hooks: ask::Hooks,
}

impl Supervisor {
    fn new(config: Config) -> anyhow::Result<Self> {
        let mode = config.policy.mode();
        let poll = Poll::new().context("failed to create the supervisor's poll")?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP, SIGTTIN, SIGTTOU, SIGUSR1])
            .context("failed to install signal handlers")?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (events_tx, events) = crossbeam_channel::unbounded();

        // Bind every listener now, so a port in use fails before any worker starts.
        let mut sockets = Vec::new();
        let mut addrs = Vec::new();
        for &addr in &config.listen {
            let socket = listener::bind_listener(addr, mode == Mode::Reuseport)
                .with_context(|| format!("failed to bind {addr}"))?;
            let bound = listener::local_addr(&socket)?;
            info!("listening on {bound}");
            addrs.push(bound);
            sockets.push(socket);
        }

        let mut slots = Vec::new();
        for i in 0..config.workers {
            slots.push(Slot {
                cpus: slot_cpus(&config.pin, i),
                reuseport: Vec::new(),
                crashes: 0,
                restart_at: None,
                given_up: false,
                active: true,
                restarts: 0,
            });
        }
        if mode == Mode::Reuseport {
            // Slot 0 takes the sockets bound above (they fixed the ports); the other slots get
            // their own sockets on the same ports.
            slots[0].reuseport = std::mem::take(&mut sockets);
            for slot in slots.iter_mut().skip(1) {
                slot.reuseport = bind_reuseport_group(&addrs)?;
            }
        }

        let preload = if config.preload && !config.command.builtin {
            find_shim()
        } else {
            None
        };
        Ok(Supervisor {
            base_env: base_environment(),
            mode,
            poll,
            signals,
            waker,
            events,
            events_tx,
            acceptor: None,
            addrs,
            sockets,
            slots,
            workers: Vec::new(),
            next_id: 0,
            generation: 0,
            preload,
            shutdown_deadline: None,
            shutdown_signal_at: None,
            all_ready_announced: false,
            next_rss_sample: None,
            replacements: Vec::new(),
            reload_queue: VecDeque::new(),
            reload_requested: false,
            reload_running: false,
            hooks: ask::Hooks::default(),
            config,
        })
    }

    fn start(&mut self) -> anyhow::Result<()> {
        if self.mode == Mode::Dispatch {
            let listeners = std::mem::take(&mut self.sockets)
                .into_iter()
                .map(std::net::TcpListener::from)
                .collect();
            let policy = self
                .config
                .policy
                .build()
                .expect("dispatch policies build a policy object");
            let handle = acceptor::spawn(
                acceptor::AcceptorConfig {
                    listeners,
                    policy,
                    cpu: self.config.acceptor_cpu,
                    stall_timeout: self.config.stall_timeout,
                },
                self.events_tx.clone(),
                Arc::clone(&self.waker),
            )
            .context("failed to start the acceptor thread")?;
            self.acceptor = Some(handle);
        }
        if self.config.policy.needs_rss() || self.config.max_rss.is_some() {
            self.next_rss_sample = Some(Instant::now());
        }
        info!(
            "starting {} workers: {} (policy {}, mode {})",
            self.config.workers,
            self.config.command.display(),
            self.config.policy,
            self.mode.as_str()
        );
        for slot in 0..self.slots.len() {
            // A command that cannot start at all (exec fails) is a startup error, not a crash.
            self.spawn_worker(slot)
                .with_context(|| format!("failed to start worker {slot}"))?;
        }
        Ok(())
    }

    fn send(&self, cmd: Command) {
        if let Some(a) = &self.acceptor {
            a.send(cmd);
        }
    }

    fn spawn_worker(&mut self, slot: usize) -> anyhow::Result<WorkerId> {
        let program = self
            .config
            .command
            .resolve()
            .map_err(|e| anyhow::anyhow!(e))?;
        let id = self.next_id;
        self.next_id += 1;
        let generation = self.generation;

        let mut channels = Vec::new();
        let mut worker_fds: Vec<OwnedFd> = Vec::new();
        let fds: Vec<BorrowedFd<'_>> = match self.mode {
            Mode::Dispatch => {
                for _ in &self.addrs {
                    let (master, worker) =
                        sys::socketpair_seqpacket().context("failed to create a channel")?;
                    worker_fds.push(worker);
                    channels.push(master);
                }
                worker_fds.iter().map(|f| f.as_fd()).collect()
            }
            Mode::Reuseport => self.slots[slot]
                .reuseport
                .iter()
                .map(|s| s.as_fd())
                .collect(),
            Mode::Shared => self.sockets.iter().map(|s| s.as_fd()).collect(),
        };

        let notify_name = format!("rcluster-lb/{}/{}", sys::getpid(), id);
        let notify =
            UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(notify_name.as_bytes())?)
                .and_then(|s| s.set_nonblocking(true).map(|()| s))
                .map_err(|e| warn!("worker {slot}: no NOTIFY_SOCKET: {e}"))
                .ok();

        let mut env = self.base_env.clone();
        let notify_value = format!("@{notify_name}");
        let contract = ChildEnv {
            slot,
            generation,
            mode: self.mode,
            listen: &self.addrs,
            notify_socket: notify.as_ref().map(|_| notify_value.as_str()),
        };
        env.extend(contract.entries().into_iter().map(String::into_bytes));
        if let Some(shim) = &self.preload {
            let mut v = b"LD_PRELOAD=".to_vec();
            v.extend_from_slice(shim.as_os_str().as_bytes());
            if let Some(existing) = std::env::var_os("LD_PRELOAD") {
                v.push(b':');
                v.extend_from_slice(existing.as_bytes());
            }
            env.retain(|e| !e.starts_with(b"LD_PRELOAD="));
            env.push(v);
        }

        let mut args: Vec<&OsStr> = vec![self.config.command.program.as_os_str()];
        args.extend(self.config.command.args.iter().map(|a| a.as_os_str()));
        let spawned = spawn(&SpawnSpec {
            program: &program,
            args: &args,
            env: &env,
            listen_pid: true,
            fds: &fds,
            cpus: self.slots[slot].cpus,
            die_with_parent: true,
        })
        .with_context(|| format!("failed to run {}", program.display()))?;
        drop(fds);

        let pid = spawned.pid;
        let raw = spawned.pidfd.as_raw_fd();
        let registered = self
            .poll
            .registry()
            .register(&mut SourceFd(&raw), pidfd_token(id), Interest::READABLE)
            .and_then(|()| match &notify {
                Some(n) => self.poll.registry().register(
                    &mut SourceFd(&n.as_raw_fd()),
                    notify_token(id),
                    Interest::READABLE,
                ),
                None => Ok(()),
            });
        if let Err(e) = registered {
            // A worker the supervisor cannot watch must not run: kill and reap it here.
            let _ = sys::kill(pid, libc::SIGKILL);
            let _ = sys::waitpid_blocking(pid);
            return Err(e).context("failed to watch the new worker");
        }
        if self.mode == Mode::Dispatch {
            let ends = channels
                .into_iter()
                .zip(worker_fds)
                .map(|(master, worker)| ChannelEnds { master, worker })
                .collect();
            let max_conns = self
                .config
                .max_conns
                .map(|n| n + jitter(self.config.max_conns_jitter, id));
            self.send(Command::Add {
                id,
                slot,
                pid,
                channels: ends,
                max_conns,
            });
        }
        info!(
            "worker {slot} started: pid {pid}, generation {generation}{}",
            match self.slots[slot].cpus {
                Some(c) => format!(", CPU {}", crate::topology::format_cpu_list(&c.cpus())),
                None => String::new(),
            }
        );
        self.workers.push(Worker {
            id,
            slot,
            generation,
            pid,
            pidfd: spawned.pidfd,
            notify,
            state: Lifecycle::Starting,
            started: Instant::now(),
            kill_at: None,
        });
        Ok(id)
    }

    fn run_loop(&mut self) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self
                .next_deadline()
                .map(|t| t.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("supervisor poll failed");
            }
            for event in events.iter() {
                match event.token() {
                    SIGNALS => {
                        let sigs: Vec<i32> = self.signals.pending().collect();
                        for sig in sigs {
                            self.on_signal(sig);
                        }
                    }
                    WAKER => {}
                    Token(t) if t % 2 == 0 => self.reap(((t - 2) / 2) as WorkerId),
                    Token(t) => self.read_notify(((t - 3) / 2) as WorkerId),
                }
            }
            while let Ok(ev) = self.events.try_recv() {
                self.on_event(ev);
            }
            self.on_asks();
            self.on_timers();
            if self.shutdown_deadline.is_some() {
                if self.workers.is_empty() {
                    if let Some(a) = self.acceptor.take() {
                        a.shutdown();
                    }
                    info!("all workers exited; shutdown complete");
                    return Ok(());
                }
            } else if self.workers.is_empty()
                && self
                    .slots
                    .iter()
                    .all(|s| !s.active || s.given_up || s.restart_at.is_none())
            {
                if let Some(a) = self.acceptor.take() {
                    a.shutdown();
                }
                bail!("no worker can run: every worker slot gave up after repeated crashes");
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        consider(self.shutdown_deadline);
        consider(self.shutdown_signal_at);
        consider(self.next_rss_sample);
        for s in &self.slots {
            consider(s.restart_at);
        }
        for w in &self.workers {
            consider(w.kill_at);
            if w.state == Lifecycle::Starting {
                consider(self.config.ready_delay.map(|d| w.started + d));
                consider(Some(w.started + self.config.ready_timeout));
            }
        }
        for r in &self.replacements {
            consider(Some(r.deadline));
        }
        next
    }

    fn index_of(&self, id: WorkerId) -> Option<usize> {
        self.workers.iter().position(|w| w.id == id)
    }

    fn on_signal(&mut self, sig: i32) {
        match sig {
            SIGTERM | SIGINT => {
                if self.shutdown_deadline.is_some() {
                    warn!("{} again: killing the workers now", sys::signal_name(sig));
                    for w in &self.workers {
                        let _ = sys::kill(w.pid, libc::SIGKILL);
                    }
                } else {
                    self.begin_shutdown(sig);
                }
            }
            SIGHUP => self.request_reload(),
            SIGTTIN => self.scale_up(),
            SIGTTOU => self.scale_down(),
            SIGUSR1 => self.log_status(),
            _ => {}
        }
    }

    fn begin_shutdown(&mut self, sig: i32) {
        let now = Instant::now();
        self.shutdown_deadline = Some(now + self.config.grace);
        self.reload_queue.clear();
        self.replacements.clear();
        for s in &mut self.slots {
            s.restart_at = None;
        }
        for w in &mut self.workers {
            // Exits from now on are expected: nothing is restarted.
            w.state = Lifecycle::Draining;
            w.kill_at = None;
        }
        if self.acceptor.is_some() {
            // Stop accepting first, and let the workers take what is already in their channels
            // (up to half the grace period) before they are told to stop: a connection the
            // master accepted is served, not dropped with a channel.
            let drain_for = self.config.grace / 2;
            info!(
                "{}: stopping; no new connections; workers get up to {drain_for:?} to take what is queued for them, then SIGTERM, and SIGKILL after {:?}",
                sys::signal_name(sig),
                self.config.grace
            );
            self.send(Command::Shutdown { drain_for });
            self.shutdown_signal_at = Some(now + drain_for);
        } else {
            info!(
                "{}: stopping; workers get SIGTERM and {:?} to exit",
                sys::signal_name(sig),
                self.config.grace
            );
            self.signal_shutdown();
        }
    }

    /// Sends every worker SIGTERM, once, as the second step of shutting down.
    fn signal_shutdown(&mut self) {
        self.shutdown_signal_at = None;
        for w in &self.workers {
            let _ = sys::kill(w.pid, libc::SIGTERM);
        }
    }

    fn log_status(&self) {
        for w in &self.workers {
            info!(
                "status: worker {} pid {} generation {} {:?} up {:.1?}",
                w.slot,
                w.pid,
                w.generation,
                w.state,
                w.started.elapsed()
            );
        }
        self.send(Command::Status);
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Ready(id) => self.mark_ready(id, "READY on its channel"),
            Event::Stopping(id) => {
                if let Some(i) = self.index_of(id) {
                    info!(
                        "worker {} (pid {}) is stopping",
                        self.workers[i].slot, self.workers[i].pid
                    );
                }
            }
            Event::Stalled(id) => self.replace(id, Reason::Recycle, "it stopped accepting"),
            Event::MaxConns(id) => self.replace(id, Reason::Recycle, "it reached --max-conns"),
            Event::Reclaimed(..) => {}
            Event::Drained => {
                if self.shutdown_signal_at.is_some() {
                    info!("every dispatched connection was taken; stopping the workers");
                    self.signal_shutdown();
                }
            }
        }
    }

    fn read_notify(&mut self, id: WorkerId) {
        let Some(i) = self.index_of(id) else {
            return;
        };
        let mut lines = Vec::new();
        if let Some(sock) = &self.workers[i].notify {
            let mut buf = [0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                lines.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        let (slot, pid) = (self.workers[i].slot, self.workers[i].pid);
        for msg in lines {
            for line in msg.lines() {
                if line == "READY=1" {
                    self.mark_ready(id, "READY=1");
                } else if line == "STOPPING=1" {
                    info!("worker {slot} (pid {pid}) is stopping");
                    self.send(Command::Drain(id));
                } else if let Some(status) = line.strip_prefix("STATUS=") {
                    info!("worker {slot} (pid {pid}) status: {status}");
                }
            }
        }
    }

    fn mark_ready(&mut self, id: WorkerId, how: &str) {
        let Some(i) = self.index_of(id) else {
            return;
        };
        let w = &mut self.workers[i];
        if w.state != Lifecycle::Starting {
            return;
        }
        w.state = Lifecycle::Ready;
        info!(
            "worker {} ready: pid {} ({how}, after {:.0?})",
            w.slot,
            w.pid,
            w.started.elapsed()
        );
        self.send(Command::Ready(id));
        if !self.all_ready_announced {
            let ready = self
                .workers
                .iter()
                .filter(|w| w.state == Lifecycle::Ready)
                .count();
            if ready == self.slots.iter().filter(|s| s.active).count() {
                self.all_ready_announced = true;
                info!("all {ready} workers ready");
            }
        }
        // A replacement that became ready lets its old worker go.
        if let Some(r) = self.replacements.iter().position(|r| r.new == id) {
            let r = self.replacements.swap_remove(r);
            self.drain(r.old);
            self.continue_reload();
        }
    }

    /// Stops dispatching to a worker, reclaims what is queued in its channel, sends it the drain
    /// signal, and arms the SIGKILL deadline.
    fn drain(&mut self, id: WorkerId) {
        let Some(i) = self.index_of(id) else {
            return;
        };
        self.send(Command::Drain(id));
        let sig = self.config.drain_signal;
        let w = &mut self.workers[i];
        if w.state == Lifecycle::Draining {
            return;
        }
        w.state = Lifecycle::Draining;
        w.kill_at = Some(Instant::now() + self.config.grace);
        info!(
            "draining worker {} (pid {}, generation {}) with {}",
            w.slot,
            w.pid,
            w.generation,
            sys::signal_name(sig)
        );
        let _ = sys::kill(w.pid, sig);
    }

    /// Starts a replacement for `old` in its slot; `old` is drained once the replacement is
    /// ready, so the slot never goes without a ready worker.
    fn replace(&mut self, old: WorkerId, reason: Reason, why: &str) {
        if self.shutdown_deadline.is_some() || self.replacements.iter().any(|r| r.old == old) {
            return;
        }
        let Some(i) = self.index_of(old) else {
            return;
        };
        if self.workers[i].state == Lifecycle::Draining {
            return;
        }
        let slot = self.workers[i].slot;
        info!(
            "replacing worker {slot} (pid {}): {why}",
            self.workers[i].pid
        );
        match self.spawn_worker(slot) {
            Ok(new) => self.replacements.push(Replacement {
                new,
                old,
                reason,
                deadline: Instant::now() + self.config.ready_timeout,
            }),
            Err(e) => error!("cannot start a replacement for worker {slot}: {e:#}"),
        }
    }

    fn request_reload(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        if !self.reload_queue.is_empty()
            || self.replacements.iter().any(|r| r.reason == Reason::Reload)
        {
            if !self.reload_requested {
                info!("SIGHUP during a reload: one more reload queued");
            }
            self.reload_requested = true;
            return;
        }
        self.generation += 1;
        self.reload_running = true;
        self.reload_queue = self
            .workers
            .iter()
            .filter(|w| w.state != Lifecycle::Draining)
            .map(|w| w.id)
            .collect();
        info!(
            "SIGHUP: rolling reload to generation {} ({} workers, {} at a time)",
            self.generation,
            self.reload_queue.len(),
            self.config.reload_batch
        );
        self.continue_reload();
    }

    fn continue_reload(&mut self) {
        while self
            .replacements
            .iter()
            .filter(|r| r.reason == Reason::Reload)
            .count()
            < self.config.reload_batch
        {
            let Some(old) = self.reload_queue.pop_front() else {
                break;
            };
            // Gone, drained meanwhile (SIGTTOU, recycling), or already being replaced by a
            // recycle (whose replacement, if of the old generation, is itself in the queue):
            // nothing left to replace.
            if self
                .index_of(old)
                .is_none_or(|i| self.workers[i].state == Lifecycle::Draining)
                || self.replacements.iter().any(|r| r.old == old)
            {
                continue;
            }
            let before = self.replacements.len();
            self.replace(old, Reason::Reload, "reload");
            if self.replacements.len() == before {
                self.abort_reload("the replacement could not be started");
                return;
            }
        }
        let reloading = self.replacements.iter().any(|r| r.reason == Reason::Reload);
        if !reloading && self.reload_queue.is_empty() {
            // Once per reload (recycles and restarts call this too), when the last old worker
            // is draining: that may be a worker the reload skipped because a recycle was
            // replacing it.
            if self.reload_running
                && self
                    .workers
                    .iter()
                    .all(|w| w.generation == self.generation || w.state == Lifecycle::Draining)
            {
                self.reload_running = false;
                info!("reload to generation {} complete", self.generation);
                self.reload_finished(Ok(()));
            }
            if std::mem::take(&mut self.reload_requested) {
                self.request_reload();
            }
        }
    }

    fn abort_reload(&mut self, why: &str) {
        error!("reload aborted: {why}; the running workers keep serving");
        self.reload_finished(Err(why));
        self.reload_queue.clear();
        self.reload_requested = false;
        self.reload_running = false;
        let failed: Vec<WorkerId> = self
            .replacements
            .iter()
            .filter(|r| r.reason == Reason::Reload)
            .map(|r| r.new)
            .collect();
        self.replacements.retain(|r| r.reason != Reason::Reload);
        for id in failed {
            if let Some(i) = self.index_of(id) {
                self.send(Command::Drain(id));
                self.workers[i].state = Lifecycle::Draining;
                let _ = sys::kill(self.workers[i].pid, libc::SIGKILL);
            }
        }
    }

    fn scale_up(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        let slot = self.slots.len();
        let reuseport = if self.mode == Mode::Reuseport {
            match bind_reuseport_group(&self.addrs) {
                Ok(s) => s,
                Err(e) => {
                    error!("SIGTTIN: cannot add a worker: {e:#}");
                    return;
                }
            }
        } else {
            Vec::new()
        };
        self.slots.push(Slot {
            cpus: slot_cpus(&self.config.pin, slot),
            reuseport,
            crashes: 0,
            restart_at: None,
            given_up: false,
            active: true,
            restarts: 0,
        });
        info!("SIGTTIN: adding worker {slot}");
        if let Err(e) = self.spawn_worker(slot) {
            error!("cannot start worker {slot}: {e:#}");
            self.slots[slot].given_up = true;
        }
    }

    fn scale_down(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        let active: Vec<usize> = (0..self.slots.len())
            .filter(|&s| self.slots[s].active)
            .collect();
        if active.len() <= 1 {
            warn!("SIGTTOU: keeping the last worker");
            return;
        }
        let slot = *active.last().expect("two or more");
        info!("SIGTTOU: removing worker {slot}");
        if self.mode == Mode::Reuseport {
            // Closing a SO_REUSEPORT listener resets what is queued on it unless the host has
            // net.ipv4.tcp_migrate_req=1 (which moves them to another socket of the group).
            warn!(
                "reuseport mode: connections still queued on worker {slot}'s own socket when it \
                 exits are reset unless net.ipv4.tcp_migrate_req=1"
            );
        }
        self.slots[slot].active = false;
        self.slots[slot].restart_at = None;
        let ids: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|w| w.slot == slot)
            .map(|w| w.id)
            .collect();
        for &id in &ids {
            self.drain(id);
        }
        // A replacement starting in this slot has nothing left to replace: forget it, so a
        // reload moves on now instead of waiting for it until --ready-timeout and aborting.
        let before = self.replacements.len();
        self.replacements.retain(|r| !ids.contains(&r.new));
        if self.replacements.len() != before {
            self.continue_reload();
        }
    }

    fn reap(&mut self, id: WorkerId) {
        let Some(i) = self.index_of(id) else {
            return;
        };
        let status = match sys::waitpid_nohang(self.workers[i].pid) {
            Ok(Some(status)) => status,
            Ok(None) => return,
            Err(e) => {
                error!("waitpid({}) failed: {e}", self.workers[i].pid);
                ExitStatus::Exited(-1)
            }
        };
        let w = self.workers.swap_remove(i);
        let raw = w.pidfd.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        if let Some(n) = &w.notify {
            let raw = n.as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        }
        // Connections still queued in its channel go to another worker.
        self.send(Command::Remove(id));
        // Reuseport mode: a removed slot's listening sockets leave the kernel's group with
        // their last worker, or new connections would keep being hashed to a socket nobody
        // accepts from.
        if !self.slots[w.slot].active && self.workers.iter().all(|o| o.slot != w.slot) {
            self.slots[w.slot].reuseport.clear();
        }

        if self.shutdown_deadline.is_some() || w.state == Lifecycle::Draining {
            info!("worker {} (pid {}) exited: {status}", w.slot, w.pid);
            return;
        }
        // A replacement that dies before it is ready fails its reload or recycle.
        if let Some(r) = self.replacements.iter().position(|r| r.new == id) {
            let r = self.replacements.swap_remove(r);
            error!(
                "replacement worker {} (pid {}) exited before it was ready: {status}",
                w.slot, w.pid
            );
            if r.reason == Reason::Reload {
                self.abort_reload("a replacement exited before it was ready");
            }
            return;
        }
        // The old worker of a pending replacement crashed: the replacement takes its place.
        if let Some(r) = self.replacements.iter().position(|r| r.old == id) {
            self.replacements.swap_remove(r);
            warn!(
                "worker {} (pid {}) exited while being replaced: {status}",
                w.slot, w.pid
            );
            self.continue_reload();
            return;
        }
        if !self.slots[w.slot].active {
            return;
        }
        let slot = &mut self.slots[w.slot];
        if w.started.elapsed() >= STABLE_UPTIME {
            slot.crashes = 0;
        }
        slot.crashes += 1;
        if slot.crashes >= CRASH_LOOP_LIMIT {
            slot.given_up = true;
            error!(
                "worker {} crash-looped ({} exits in a row, last: {status}); giving up on \
                 slot {}, {} workers left",
                w.slot,
                slot.crashes,
                w.slot,
                self.workers.len()
            );
            return;
        }
        let backoff = RESTART_BACKOFF_INITIAL
            .saturating_mul(1 << (slot.crashes - 1).min(16))
            .min(RESTART_BACKOFF_MAX);
        slot.restart_at = Some(Instant::now() + backoff);
        slot.restarts += 1;
        warn!(
            "worker {} (pid {}) exited unexpectedly: {status}; restarting in {backoff:?}",
            w.slot, w.pid
        );
        self.continue_reload();
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        if self.shutdown_signal_at.is_some_and(|t| now >= t) {
            self.signal_shutdown();
        }
        if let Some(deadline) = self.shutdown_deadline
            && now >= deadline
        {
            for w in &self.workers {
                warn!(
                    "worker {} (pid {}) did not exit within {:?}: SIGKILL",
                    w.slot, w.pid, self.config.grace
                );
                let _ = sys::kill(w.pid, libc::SIGKILL);
            }
            // Keep waiting for the pidfds; push the deadline so this fires once.
            self.shutdown_deadline = Some(now + Duration::from_secs(3600));
        }
        for w in &mut self.workers {
            if let Some(t) = w.kill_at
                && now >= t
            {
                warn!(
                    "worker {} (pid {}) still running {:?} after the drain signal: SIGKILL",
                    w.slot, w.pid, self.config.grace
                );
                let _ = sys::kill(w.pid, libc::SIGKILL);
                w.kill_at = None;
            }
        }
        let due: Vec<usize> = (0..self.slots.len())
            .filter(|&s| self.slots[s].restart_at.is_some_and(|t| now >= t))
            .collect();
        for slot in due {
            self.slots[slot].restart_at = None;
            if let Err(e) = self.spawn_worker(slot) {
                error!("cannot restart worker {slot}: {e:#}");
                let s = &mut self.slots[slot];
                s.crashes += 1;
                if s.crashes >= CRASH_LOOP_LIMIT {
                    s.given_up = true;
                    error!("giving up on worker slot {slot}");
                } else {
                    s.restart_at = Some(
                        now + RESTART_BACKOFF_MAX
                            .min(RESTART_BACKOFF_INITIAL.saturating_mul(1 << s.crashes.min(16))),
                    );
                }
            }
        }
        // Readiness by delay, or by timeout with a warning.
        let starting: Vec<(WorkerId, Instant)> = self
            .workers
            .iter()
            .filter(|w| w.state == Lifecycle::Starting)
            .map(|w| (w.id, w.started))
            .collect();
        for (id, started) in starting {
            if self.config.ready_delay.is_some_and(|d| now >= started + d) {
                self.mark_ready(id, "--ready-delay elapsed");
            } else if now >= started + self.config.ready_timeout
                && !self.replacements.iter().any(|r| r.new == id)
            {
                warn!(
                    "worker with id {id} signalled no readiness within {:?}; treating it as \
                     ready (servers that signal nothing want --ready-delay)",
                    self.config.ready_timeout
                );
                self.mark_ready(id, "--ready-timeout elapsed");
            }
        }
        // Replacements not ready in time.
        let late: Vec<(WorkerId, Reason)> = self
            .replacements
            .iter()
            .filter(|r| now >= r.deadline)
            .map(|r| (r.new, r.reason))
            .collect();
        for (new, reason) in late {
            if reason == Reason::Reload {
                self.abort_reload("a replacement was not ready within --ready-timeout");
            } else {
                self.replacements.retain(|r| r.new != new);
                if let Some(i) = self.index_of(new) {
                    error!("recycle replacement not ready in time; keeping the old worker");
                    self.workers[i].state = Lifecycle::Draining;
                    let _ = sys::kill(self.workers[i].pid, libc::SIGKILL);
                }
            }
        }
        if let Some(t) = self.next_rss_sample
            && now >= t
        {
            self.sample_rss();
            self.next_rss_sample = Some(now + self.config.rss_interval);
        }
    }

    fn sample_rss(&mut self) {
        let mut samples = Vec::with_capacity(self.workers.len());
        let mut over = Vec::new();
        for w in &self.workers {
            if let Ok(bytes) = sys::rss_bytes(w.pid) {
                samples.push((w.id, (bytes / 1024).min(u64::from(u32::MAX)) as u32));
                if self.config.max_rss.is_some_and(|max| bytes > max) && w.state == Lifecycle::Ready
                {
                    over.push(w.id);
                }
            }
        }
        self.send(Command::Rss(samples));
        for id in over {
            self.replace(id, Reason::Recycle, "its RSS exceeds --max-rss");
        }
    }
}

fn slot_cpus(pin: &Pin, slot: usize) -> Option<CpuSet> {
    match pin {
        Pin::None => None,
        Pin::Cpus(cpus) => Some(CpuSet::from_cpus(&[cpus[slot % cpus.len()]])),
    }
}

fn bind_reuseport_group(addrs: &[SocketAddr]) -> anyhow::Result<Vec<Socket>> {
    addrs
        .iter()
        .map(|&a| listener::bind_listener(a, true).with_context(|| format!("failed to bind {a}")))
        .collect()
}

/// The master's environment minus what belongs to the master's own supervisor (LISTEN_*,
/// NOTIFY_SOCKET) or is set per worker (RCLUSTER_*).
fn base_environment() -> Vec<Vec<u8>> {
    std::env::vars_os()
        .filter(|(k, _)| !rcluster_proto::env::is_master_owned(k.as_bytes()))
        .map(|(k, v)| {
            let mut e = k.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            e
        })
        .collect()
}

/// The preload shim next to the master's binary (also where cargo puts it). Warns clearly when
/// it is missing.
fn find_shim() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // Next to the binary (an install; `cargo build` copies the library up to target/<profile>/),
    // one level up, and in deps/: `cargo test` builds the library only there and never copies it
    // up, so on a fresh checkout `cargo test --workspace` has no other copy.
    let candidates = [
        dir.join(SHIM_FILE),
        dir.join("..").join(SHIM_FILE),
        dir.join("deps").join(SHIM_FILE),
    ];
    if let Some(found) = newest_file(&candidates) {
        return found.canonicalize().ok();
    }
    warn!(
        "preload shim {SHIM_FILE} not found next to {} : unmodified servers will not see \
         dispatched connections (build it with `cargo build --release -p rcluster-shim`, or \
         pass --no-preload for workers that speak LISTEN_FDS or the channel protocol)",
        exe.display()
    );
    None
}

/// The most recently modified of the existing regular files among `paths` (the first on a tie),
/// so a copy an earlier `cargo build` left next to the binary does not shadow the library a later
/// `cargo test` rebuilt in deps/.
fn newest_file(paths: &[PathBuf]) -> Option<&PathBuf> {
    let mut best: Option<(&PathBuf, std::time::SystemTime)> = None;
    for p in paths {
        let Ok(meta) = std::fs::metadata(p) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
        if best.is_none_or(|(_, t)| mtime > t) {
            best = Some((p, mtime));
        }
    }
    best.map(|(p, _)| p)
}

/// Deterministic per-worker jitter in 0..=max (no RNG dependency for one number).
fn jitter(max: u64, id: WorkerId) -> u64 {
    if max == 0 {
        return 0;
    }
    let mut x = id.wrapping_add(0x9E37_79B9_7F4A_7C15) ^ u64::from(sys::getpid() as u32);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x % (max + 1)
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // On an error return, leave no worker behind.
        for w in &self.workers {
            let _ = sys::kill(w.pid, libc::SIGKILL);
        }
        for w in &self.workers {
            let _ = sys::waitpid_blocking(w.pid);
        }
        if let Some(a) = self.acceptor.take() {
            a.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_shim_copy_wins() {
        let dir = std::env::temp_dir().join(format!("rcluster-find-shim-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("deps")).unwrap();
        let (up, deps, missing) = (dir.join("a.so"), dir.join("deps/a.so"), dir.join("none.so"));
        std::fs::write(&up, b"old").unwrap();
        std::fs::write(&deps, b"new").unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&up)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let all = [up.clone(), missing.clone(), deps.clone()];
        assert_eq!(newest_file(&all), Some(&deps));
        assert_eq!(newest_file(&[missing.clone(), up.clone()]), Some(&up));
        assert_eq!(
            newest_file(&[missing, dir.join("deps")]),
            None,
            "directories are not files"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
