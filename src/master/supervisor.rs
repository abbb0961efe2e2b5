//! The supervisor: the I/O driver of the worker lifecycle, on the master's main thread (which
//! lives as long as the master, so `PR_SET_PDEATHSIG` in workers fires exactly when the master
//! dies). Every decision is [`Lifecycle`]'s; this module turns the world into its
//! [`Input`]s — signals, pidfd exits, `NOTIFY_SOCKET` datagrams, the acceptor's events, timers —
//! and carries out its [`Action`]s: fork/exec a worker with the contract, tell the acceptor,
//! send a signal, exit.
//!
//! It owns the pidfds, each worker's NOTIFY_SOCKET, and in reuseport/shared modes the listening
//! sockets workers inherit. In dispatch mode the acceptor thread owns the listeners and channels;
//! the supervisor creates each channel pair, hands the worker its end at spawn, and gives both
//! ends to the acceptor.
//!
//! Service hooks, each a call into its own module: listeners passed by socket activation are
//! taken instead of bound (`activation`); after every lifecycle step the master's own service
//! manager hears what changed (`service_notify`); a stop signal waits `--shutdown-delay` before it
//! becomes [`Input::Stop`]; as a child subreaper (or PID 1) the master reaps on SIGCHLD every
//! orphan its workers leave, while a worker's exit still goes through the pidfd path's reap.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use crossbeam_channel::Receiver;
use log::{error, info, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use rcluster_proto::Mode;
use rcluster_proto::env::{ChildEnv, Role};
use signal_hook::consts::signal::{
    SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2,
};
use signal_hook_mio::v1_0::Signals;
use socket2::Socket;

use crate::cli::{Config, Pin};
use crate::master::acceptor::{self, AcceptorHandle, ChannelEnds, Command, Event};
use crate::master::activation::{Activated, ListenerSource};
use crate::master::agent::{self, Agent, AgentEvent};
use crate::master::bus::{self, BusCommand, BusEvent, BusHandle, Peer};
use crate::master::diagnose;
use crate::master::health::Heartbeats;
use crate::master::lifecycle::{
    Action, Input, Lifecycle, Phase, Settings, Sig, WorkerId, WorkerState,
};
use crate::master::notify::{Notice, NotifySocket, RuntimeDir};
use crate::master::probe::{self, ProbeResult, ProbeSpec, Probes};
use crate::master::service_notify::ServiceNotifier;
use crate::master::stall::{self, QueueWatch};
use crate::master::status::KERNEL_STEERED;
use crate::master::steer::{self as steer, SteerControl};
use crate::master::{listener, tree};
use crate::steer::spread::Spread;
use crate::sys::spawn::{SpawnSpec, spawn};
use crate::sys::{self, CpuSet, ExitStatus, Pid};

/// What the agent module needs to spawn and reap, borrowed field by field so the agent
/// itself (another field) can be borrowed mutably beside it.
macro_rules! agent_ctx {
    ($sup:expr) => {
        agent::SpawnContext {
            registry: $sup.poll.registry(),
            base_env: &$sup.base_env,
            addrs: &$sup.addrs,
            bus: &$sup.bus,
            runtime: $sup.runtime.as_ref(),
            credentials: $sup.config.credentials.as_ref(),
            ready_delay: $sup.config.ready_delay,
            ready_timeout: $sup.config.ready_timeout,
            grace: $sup.config.grace,
        }
    };
}
/// The supervisor's side of the control socket and metrics: answering
/// [`crate::master::control::Ask`]s.
mod ask;

const SIGNALS: Token = Token(0);
const WAKER: Token = Token(1);

fn pidfd_token(id: WorkerId) -> Token {
    Token(2 + 2 * id as usize)
}
fn notify_token(id: WorkerId) -> Token {
    Token(3 + 2 * id as usize)
}

/// A running worker process as the supervisor holds it.
struct Proc {
    id: WorkerId,
    slot: usize,
    pid: Pid,
    pidfd: OwnedFd,
    notify: Option<NotifySocket>,
}

/// What a slot needs besides its worker.
struct SlotIo {
    cpus: Option<CpuSet>,
    /// Reuseport mode: this slot's listening sockets, one per listener, kept across restarts.
    reuseport: Vec<Socket>,
    /// Reuseport mode: progress of each of those sockets' accept queues (see [`stall`]).
    watches: Vec<QueueWatch>,
    /// Reuseport mode: the slot was given up and its sockets taken out of the kernel's group
    /// (`shutdown(SHUT_RD)`); they listen again before its next worker starts.
    paused: bool,
}

/// Runs the cluster until shutdown, with the listeners socket activation passed (if any).
/// Returns an error (exit code 1) if it cannot start or if no worker can run at all.
pub fn run(config: Config, activated: Activated) -> anyhow::Result<()> {
    let mut sup = Supervisor::new(config, activated)?;
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
    /// Kernel steering (`--steer`): the program places connections on the slots' listeners.
    steer: Option<SteerControl>,
    /// Plain reuseport mode: the program attached to every group ([`ReuseportProgram`]);
    /// `None` where none can load, or in other modes.
    reuseport_prog: Option<ReuseportProgram>,
    /// Bound addresses (real ports).
    addrs: Vec<SocketAddr>,
    /// Dispatch mode: the listening sockets until the acceptor takes them. Shared mode: the
    /// sockets every worker inherits.
    sockets: Vec<Socket>,
    slots: Vec<SlotIo>,
    procs: Vec<Proc>,
    lifecycle: Lifecycle,
    base_env: Vec<Vec<u8>>,
    preload: Option<PathBuf>,
    /// The private directory of the workers' NOTIFY_SOCKETs (none if it cannot be created:
    /// workers then signal readiness on their channel or by --ready-delay).
    runtime: Option<RuntimeDir>,
    next_rss_sample: Option<Instant>,
    /// Reuseport mode: when the slots' accept queues are sampled next.
    next_queue_sample: Option<Instant>,
    /// Workers whose notify socket had more datagrams than one read takes: read again after
    /// the next poll, which then does not wait.
    notify_backlog: Vec<WorkerId>,
    /// While starting, a worker that cannot be spawned is a startup error, kept here.
    startup_error: Option<anyhow::Error>,
    starting: bool,
    /// Set by [`Action::Exit`] (once the agent, if any, has exited too).
    exit: Option<Result<(), String>>,
    /// [`Action::Exit`] came while the agent still runs: it is being stopped, last.
    exit_after_agent: Option<Result<(), String>>,
    /// The message bus (its own thread); `bus_events` brings heartbeats and `ready`s.
    bus: BusHandle,
    bus_events: Receiver<BusEvent>,
    /// `--agent`.
    agent: Option<Agent>,
    /// What the agent module answered where no error can be returned (SIGCHLD reaping).
    pending_agent_event: Option<AgentEvent>,
    /// [`Input::Start`] was fed (with an agent: once it was first ready).
    workers_started: bool,
    /// `--heartbeat-timeout`.
    heartbeats: Option<Heartbeats>,
    /// `--health-check`: the failure counts and the request; results come on `probe_results`.
    probes: Option<(Probes, Arc<ProbeSpec>)>,
    probe_results: Receiver<ProbeResult>,
    probe_tx: crossbeam_channel::Sender<ProbeResult>,
    /// Reaped workers whose exit waits for [`Event::ChannelsRead`].
    exits_waiting: Vec<(WorkerId, ExitStatus)>,
    /// Control socket, metrics endpoint, pid file and the requests they bring.
    hooks: ask::Hooks,
    /// Whether a worker exiting before it was ready has been explained (diagnose.rs; once).
    early_exit_explained: bool,
    /// The master's own service manager (NOTIFY_SOCKET), if any.
    service: ServiceNotifier,
    /// `--shutdown-delay`: when the deferred stop begins, and the signal that asked for it.
    delayed_stop: Option<(Instant, &'static str)>,
    /// Dispatch mode: draining or stopping workers whose drain or stop signal (the third
    /// field) waits until they hold no connection ([`Event::Idle`]), or until the time given
    /// (half of `--grace`) at the latest.
    deferred_drains: Vec<(WorkerId, Instant, libc::c_int)>,
}

impl Supervisor {
    fn new(config: Config, activated: Activated) -> anyhow::Result<Self> {
        // The handlers first: a stop asked for while the steering program loads (which takes a
        // while) waits in the queue and is obeyed once the loop runs, rather than ending the
        // master by the default action.
        let mut signals = Signals::new([
            SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2, SIGCHLD,
        ])
        .context("failed to install signal handlers")?;
        // Kernel steering gives the workers their own listeners, as in reuseport mode: not with
        // sockets a service manager handed over (they need not be SO_REUSEPORT).
        let mut steer = if activated.is_empty() {
            steer::start(&config)?
        } else {
            if config.steer == crate::cli::Steer::Kernel {
                bail!(
                    "--steer kernel: the listeners are socket-activated; the steering program needs the master's own SO_REUSEPORT listeners"
                );
            }
            if config.steer == crate::cli::Steer::Auto
                && crate::steer::SteerPolicy::for_policy(config.policy).is_some()
            {
                info!("steering: dispatch: the listeners are socket-activated");
            }
            None
        };
        let mode = match steer {
            Some(_) => Mode::Reuseport,
            None => config.policy.mode(),
        };
        let poll = Poll::new().context("failed to create the supervisor's poll")?;
        // Orphaned descendants of the workers come to the master, which reaps them (as PID 1
        // in a container it gets every orphan anyway).
        if let Err(e) = sys::set_child_subreaper() {
            warn!("cannot become a child subreaper: {e}");
        }
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (events_tx, events) = crossbeam_channel::unbounded();
        let (bus_tx, bus_events) = crossbeam_channel::unbounded();
        let (probe_tx, probe_results) = crossbeam_channel::unbounded();
        let children = config.credentials.as_ref().map(|c| (c.uid, c.gid));
        // What this user's killed masters left (rundir.rs), before this one makes its own.
        let base = super::rundir::base();
        let swept = super::rundir::sweep_stale(&base, super::rundir::STALE_AFTER);
        if swept > 0 {
            info!(
                "removed {swept} private directories that killed masters left in {}",
                base.display()
            );
        }
        let bus = bus::spawn(bus_tx, Arc::clone(&waker), children)
            .context("failed to start the message bus")?;

        // Bind every listener now, so a port in use fails before any worker starts.
        let mut sockets = Vec::new();
        let mut addrs = Vec::new();
        for source in activated.assign(&config.listen, config.listen_explicit) {
            let socket = match source {
                ListenerSource::Inherited(socket) => socket,
                ListenerSource::Bind(addr) => {
                    listener::bind_listener(addr, mode == Mode::Reuseport)
                        .with_context(|| format!("failed to bind {addr}"))?
                }
            };
            let bound = listener::local_addr(&socket)?;
            info!("listening on {bound}");
            addrs.push(bound);
            sockets.push(socket);
        }

        let mut slots: Vec<SlotIo> = (0..config.workers)
            .map(|i| SlotIo {
                cpus: slot_cpus(&config.pin, i),
                reuseport: Vec::new(),
                watches: Vec::new(),
                paused: false,
            })
            .collect();
        if mode == Mode::Reuseport {
            // Slot 0 takes the sockets bound above (they fixed the ports); the other slots get
            // their own sockets on the same ports.
            slots[0].reuseport = std::mem::take(&mut sockets);
            for slot in slots.iter_mut().skip(1) {
                slot.reuseport = bind_reuseport_group(&addrs)?;
            }
        }
        if let Some(st) = &mut steer {
            for (i, slot) in slots.iter().enumerate() {
                st.add_slot(i, &slot.reuseport)?;
            }
            st.open_overflow(&addrs)?;
        }
        let reuseport_prog = if mode == Mode::Reuseport && steer.is_none() {
            reuseport_program(&slots, addrs.len())
        } else {
            None
        };

        let preload = config.preload.clone();
        let lifecycle = Lifecycle::new(Settings {
            workers: config.workers,
            grace: config.grace,
            ready_delay: config.ready_delay,
            ready_timeout: config.ready_timeout,
            reload_batch: config.reload_batch,
            max_rss: config.max_rss,
            drain_channels_on_stop: mode == Mode::Dispatch,
            drain_signal: sys::signal_name(config.drain_signal),
            stop_signal: sys::signal_name(config.stop_signal),
        });
        Ok(Supervisor {
            base_env: base_environment(),
            mode,
            poll,
            signals,
            waker,
            events,
            events_tx,
            acceptor: None,
            steer,
            reuseport_prog,
            addrs,
            sockets,
            slots,
            procs: Vec::new(),
            lifecycle,
            preload,
            next_rss_sample: None,
            startup_error: None,
            starting: false,
            exit: None,
            exit_after_agent: None,
            bus,
            bus_events,
            agent: config.agent.clone().map(Agent::new),
            pending_agent_event: None,
            workers_started: false,
            heartbeats: config.heartbeat_timeout.map(Heartbeats::new),
            probes: config.health_check.as_ref().map(|h| {
                (
                    Probes::new(h.interval, h.fails, Instant::now()),
                    Arc::new(h.spec.clone()),
                )
            }),
            probe_results,
            probe_tx,
            exits_waiting: Vec::new(),
            hooks: ask::Hooks::default(),
            early_exit_explained: false,
            runtime: RuntimeDir::create(notify_owner(config.credentials.as_ref()))
                .map_err(|e| warn!("no NOTIFY_SOCKET for workers: {e}"))
                .ok(),
            next_queue_sample: (mode == Mode::Reuseport).then(Instant::now),
            notify_backlog: Vec::new(),
            service: ServiceNotifier::from_env(),
            delayed_stop: None,
            deferred_drains: Vec::new(),
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
                .context("the policy has no dispatch implementation")?;
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
        if self.agent.is_some() {
            let ctx = agent_ctx!(self);
            if let Some(a) = self.agent.as_mut() {
                a.spawn(&ctx).context("failed to start the agent")?;
            }
            info!("the workers start once the agent is ready");
            return Ok(());
        }
        self.start_workers()
    }

    /// Starts every worker slot (at startup, or once the agent is first ready).
    fn start_workers(&mut self) -> anyhow::Result<()> {
        self.workers_started = true;
        info!(
            "starting {} workers: {} (policy {}, mode {})",
            self.config.workers,
            self.config.command.display(),
            self.config.policy,
            self.mode_name()
        );
        // A command that cannot start at all (exec fails) is a startup error, not a crash.
        self.starting = true;
        self.feed(Input::Start);
        self.starting = false;
        match self.startup_error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The workers' mode as logs and status name it: [`KERNEL_STEERED`] under kernel steering.
    fn mode_name(&self) -> &'static str {
        if self.steer.is_some() {
            KERNEL_STEERED
        } else {
            self.mode.as_str()
        }
    }

    fn send(&self, cmd: Command) {
        if let Some(a) = &self.acceptor {
            a.send(cmd);
        }
    }

    /// Gives the lifecycle one input and carries out what it answers (which may feed it more:
    /// a spawn's result).
    fn feed(&mut self, input: Input) {
        let mut todo: VecDeque<Action> = self.lifecycle.handle(Instant::now(), input).into();
        // Kernel steering: the table follows each decision before it is carried out, so a
        // draining or dead worker's slot is out of it before the worker is signalled.
        self.steer_sync();
        while let Some(action) = todo.pop_front() {
            if let Some(more) = self.apply(action) {
                todo.extend(self.lifecycle.handle(Instant::now(), more));
                self.steer_sync();
            }
        }
        self.service
            .observe(&self.lifecycle, &self.config.policy.to_string());
    }

    /// Kernel steering: a slot is eligible exactly while a ready worker serves it.
    fn steer_sync(&mut self) {
        if let Some(st) = &mut self.steer {
            let workers = self.lifecycle.workers();
            st.sync(|slot| {
                workers
                    .iter()
                    .any(|w| w.slot == slot && w.state == WorkerState::Ready)
            });
        }
    }

    /// Kernel steering, every loop: reconciliation, stalled slots, --max-conns by placements.
    fn steer_tick(&mut self) {
        let Some(st) = &mut self.steer else {
            return;
        };
        let slots = &self.slots;
        let stalled = st.tick(Instant::now(), |s| &slots[s].reuseport);
        let at_max = st.reached_max_conns();
        for slot in stalled {
            let ids: Vec<WorkerId> = self
                .lifecycle
                .workers()
                .iter()
                .filter(|w| w.slot == slot && w.state == WorkerState::Ready)
                .map(|w| w.id)
                .collect();
            for id in ids {
                self.feed(Input::Stalled { id });
            }
        }
        for id in at_max {
            self.feed(Input::MaxConns { id });
        }
    }

    /// Carries out one action; returns the input it produces, if any.
    fn apply(&mut self, action: Action) -> Option<Input> {
        match action {
            Action::Spawn {
                id,
                slot,
                generation,
            } => {
                if self.startup_error.is_some() {
                    return None;
                }
                match self.spawn_worker(id, slot, generation) {
                    Ok(pid) => return Some(Input::Spawned { id, pid }),
                    Err(e) if self.starting => {
                        // A program the kernel refuses to execute (no valid format, no
                        // permission) is a usage error: no retry fixes it.
                        self.startup_error = Some(match exec_failure(&e) {
                            Some(exec) => crate::cli::UsageError(format!(
                                "cannot run {}: {exec}",
                                self.config.command.display()
                            ))
                            .into(),
                            None => e.context(format!("failed to start worker {slot}")),
                        });
                    }
                    Err(e) => {
                        return Some(Input::SpawnFailed {
                            id,
                            error: format!("{e:#}"),
                        });
                    }
                }
            }
            Action::Open(id) => self.send(Command::Ready(id)),
            Action::Close(id) => {
                self.send(Command::Drain(id));
                if let Some(h) = &mut self.heartbeats {
                    h.forget(id);
                }
                if let Some((p, _)) = &mut self.probes {
                    p.forget(id);
                }
            }
            Action::Signal(id, sig) => {
                let signal = match sig {
                    Sig::Drain => self.config.drain_signal,
                    Sig::Stop => self.config.stop_signal,
                    Sig::Kill => libc::SIGKILL,
                };
                self.deferred_drains.retain(|d| d.0 != id);
                if sig != Sig::Kill && self.defer_drain(id, signal) {
                    return None;
                }
                if let Some(p) = self.procs.iter().find(|p| p.id == id) {
                    tree::signal(p.pid, signal);
                }
            }
            Action::Forget(id) => {
                if let Some(st) = &mut self.steer {
                    st.forget(id);
                }
                self.forget(id)
            }
            Action::SlotGaveUp(slot) => self.pause_slot(slot),
            Action::SlotRemoved(slot) => {
                // Reuseport mode: the master lets go of the slot's listening sockets now, so
                // they leave the kernel's group when the draining worker closes its copies
                // (at the latest, on exit). Kept until the exit was reaped, they would take
                // new connections in that window and reset them when closed.
                if let Some(s) = self.slots.get_mut(slot) {
                    s.reuseport.clear();
                    s.watches.clear();
                }
                // And where the spread program runs, new connections stop going to them now,
                // not when the worker closes its copies (as long as its longest request).
                self.serve_slots();
                // With SELECT_OR_MIGRATE the steering program, or plain reuseport mode's own,
                // re-places that queue instead.
                if self.mode == Mode::Reuseport && self.migrates() {
                    info!(
                        "reuseport mode: connections still queued on worker {slot}'s own socket \
                         when it exits move to the other workers' sockets"
                    );
                } else if self.mode == Mode::Reuseport
                    && !self.steer.as_ref().is_some_and(|s| s.migrates())
                {
                    // Closing a SO_REUSEPORT listener resets what is queued on it unless the
                    // host has net.ipv4.tcp_migrate_req=1 (which moves them to another socket
                    // of the group).
                    warn!(
                        "reuseport mode: connections still queued on worker {slot}'s own socket \
                         when it exits are reset unless net.ipv4.tcp_migrate_req=1"
                    );
                }
            }
            Action::StopAccepting { drain_for } => self.send(Command::Shutdown { drain_for }),
            Action::Exit(result) => {
                // The agent is stopped last, once every worker exited.
                let grace = self.config.grace;
                if self.agent.as_mut().is_some_and(|a| a.stop(grace)) {
                    self.exit_after_agent = Some(result);
                } else {
                    self.exit = Some(result);
                }
            }
        }
        None
    }

    /// Dispatch mode: whether `signal`, the drain or stop signal for worker `id`, waits. A
    /// server that neither catches nor ignores it (`python3 -m http.server`, waitress, most C
    /// servers) would die of it at once and cut the requests it is serving: it gets no more
    /// connections already (drained, or the acceptor stopped accepting before the stop signal
    /// goes out), so it is signalled once it holds none ([`Event::Idle`]: every connection dispatched to it
    /// closed), or after half of `--grace` at the latest (a keep-alive connection a client
    /// never closes); SIGKILL still follows at `--grace`. Node catches SIGTERM itself (a
    /// one-shot handler that restores the terminal and exits): for it the shim holds that
    /// handler back in the same way, in every mode (shim/src/drain.rs). In the kernel modes a
    /// drained worker shares its slot's listener until it exits, so it would never run out of
    /// connections: the signal goes at once there, and a server finishes what it holds if it
    /// stops taking connections itself (`server.close()`) or through the shim, which there
    /// holds node's exit and the default action alike. With `--drain-when-idle` every server
    /// is held this way, for those whose own handler ends them at once (nginx with
    /// `master_process off` exits at the end of its current event loop turn, cutting the
    /// connections it accepted and has not answered).
    fn defer_drain(&mut self, id: WorkerId, signal: libc::c_int) -> bool {
        let Some(p) = self.procs.iter().find(|p| p.id == id) else {
            return false;
        };
        if self.acceptor.is_none() {
            return false;
        }
        let name = sys::signal_name(signal);
        let why = if tree::dies_of(p.pid, signal) == Some(true) {
            format!("has no handler for {name}, which would end it at once")
        } else if self.config.drain_when_idle {
            "is drained when idle (--drain-when-idle)".to_string()
        } else {
            return false;
        };
        let wait = self.config.grace / 2;
        info!(
            "worker {} (pid {}) {why}: {name} waits until it has closed every connection it \
             holds (at most {wait:?})",
            p.slot, p.pid,
        );
        self.deferred_drains
            .push((id, super::lifecycle::at(Instant::now(), wait), signal));
        self.send(Command::WhenIdle(id));
        true
    }

    /// Sends the signal that [`Supervisor::defer_drain`] held back for worker `id`.
    fn send_deferred_drain(&mut self, id: WorkerId, why: &str) {
        let Some(i) = self.deferred_drains.iter().position(|d| d.0 == id) else {
            return;
        };
        let (_, _, signal) = self.deferred_drains.swap_remove(i);
        if let Some(p) = self.procs.iter().find(|p| p.id == id) {
            info!(
                "worker {} (pid {}) {why}: {}",
                p.slot,
                p.pid,
                sys::signal_name(signal)
            );
            tree::signal(p.pid, signal);
        }
    }

    /// Plain reuseport mode: a given-up slot's sockets leave the kernel's group until it is
    /// tried again, or about one connection in N would wait on them with nobody accepting
    /// (up to 30 s, until the retry). What is already queued there moves to the rest of the
    /// group where a program that migrates is attached, and is reset where it is not: no worker is
    /// left to take it. (Kernel steering already skips a slot without a ready worker.)
    fn pause_slot(&mut self, slot: usize) {
        if self.mode != Mode::Reuseport
            || self.steer.is_some()
            || self.lifecycle.workers().iter().any(|w| w.slot == slot)
        {
            return;
        }
        let Some(io) = self.slots.get_mut(slot) else {
            return;
        };
        let mut reset = 0u64;
        for sock in &io.reuseport {
            reset += sys::listen_queue(sock.as_fd()).map_or(0, |(q, _)| u64::from(q));
            if let Err(e) = sock.shutdown(std::net::Shutdown::Read) {
                warn!("worker {slot}: cannot take its socket out of the reuseport group: {e}");
                continue;
            }
            io.paused = true;
        }
        if io.paused {
            self.serve_slots();
            let fate = if self.migrates() {
                "moved to the other workers' sockets"
            } else {
                "reset"
            };
            warn!(
                "reuseport mode: worker {slot}'s sockets leave the group while it is given up \
                 ({reset} queued connections {fate})"
            );
        }
    }

    /// Puts a given-up slot's sockets back into the reuseport group before its next worker.
    fn resume_slot(&mut self, slot: usize) -> anyhow::Result<()> {
        let io = &mut self.slots[slot];
        if io.paused {
            for sock in &io.reuseport {
                sock.listen(listener::somaxconn())
                    .context("failed to listen again on a given-up slot's socket")?;
            }
            io.paused = false;
            // Rejoined, perhaps a group that emptied meanwhile and lost the program.
            attach_program(self.reuseport_prog.as_ref(), &io.reuseport);
            self.serve_slots();
        }
        Ok(())
    }

    /// Plain reuseport mode: whether the program attached has the kernel move a closing
    /// socket's queue to the rest of its group (`SELECT_OR_MIGRATE`, 5.14+).
    fn migrates(&self) -> bool {
        match &self.reuseport_prog {
            Some(ReuseportProgram::Spread(s)) => s.migrates(),
            Some(ReuseportProgram::Migrate(_)) => true,
            None => false,
        }
    }

    /// Plain reuseport mode with the spread program: the sockets of every slot that has them
    /// and is not given up are the ones new connections are spread over.
    fn serve_slots(&mut self) {
        let Some(ReuseportProgram::Spread(spread)) = &mut self.reuseport_prog else {
            return;
        };
        // A failure is logged there; the kernel's hash then still reaches every socket.
        let _ = serve_slots(spread, &self.slots, self.addrs.len());
    }

    fn spawn_worker(&mut self, id: WorkerId, slot: usize, generation: u64) -> anyhow::Result<Pid> {
        let program = self
            .config
            .command
            .resolve()
            .map_err(|e| anyhow::anyhow!(e))?;

        let pipes = self.output_pipes();
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
            Mode::Reuseport => {
                self.resume_slot(slot)?;
                let mut fds: Vec<BorrowedFd<'_>> = self.slots[slot]
                    .reuseport
                    .iter()
                    .map(|s| s.as_fd())
                    .collect();
                // Kernel steering: the table follows the listeners (RCLUSTER_STEER_FD), then
                // the overflow queue's listeners (RCLUSTER_STEER_OVERFLOW_FD).
                if let Some(st) = &self.steer {
                    fds.push(st.table_fd());
                    fds.extend(st.overflow_fds());
                }
                fds
            }
            Mode::Shared => self.sockets.iter().map(|s| s.as_fd()).collect(),
        };

        let notify = self.runtime.as_ref().and_then(|dir| {
            NotifySocket::bind(dir, id)
                .map_err(|e| warn!("worker {slot}: no NOTIFY_SOCKET: {e}"))
                .ok()
        });

        let mut env = self.base_env.clone();
        let notify_value = notify
            .as_ref()
            .and_then(|n| n.path().to_str().map(str::to_owned));
        let contract = ChildEnv {
            slot,
            generation,
            mode: self.mode,
            listen: &self.addrs,
            notify_socket: notify_value.as_deref(),
            // Kernel steering: the table's fd follows the listeners.
            steer_fd: self
                .steer
                .as_ref()
                .map(|_| rcluster_proto::LISTEN_FDS_START + self.addrs.len() as i32),
            overflow_fd: self
                .steer
                .as_ref()
                .filter(|st| st.overflow_fds().next().is_some())
                .map(|_| rcluster_proto::LISTEN_FDS_START + self.addrs.len() as i32 + 1),
            role: Role::Worker,
            ipc: self.bus.path().to_str(),
            // The shim's hold of a signal the server would die of ends here, as the master's
            // own (`defer_drain`) does.
            drain_hold: Some(self.config.grace / 2),
        };
        env.extend(contract.entries().into_iter().map(String::into_bytes));
        // PM2 apps read their instance number here.
        env.retain(|e| !e.starts_with(b"NODE_APP_INSTANCE="));
        env.push(format!("NODE_APP_INSTANCE={slot}").into_bytes());
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
            stdout: pipes.as_ref().map(|p| p.stdout.1.as_fd()),
            stderr: pipes.as_ref().map(|p| p.stderr.1.as_fd()),
            credentials: self.config.credentials.as_ref(),
        })
        .with_context(|| format!("failed to run {}", program.display()))?;
        drop(fds);
        if let Some(pipes) = pipes {
            self.capture_output(slot, spawned.pid, pipes);
        }

        let pid = spawned.pid;
        let raw = spawned.pidfd.as_raw_fd();
        let registered = self
            .poll
            .registry()
            .register(&mut SourceFd(&raw), pidfd_token(id), Interest::READABLE)
            .and_then(|()| match &notify {
                Some(n) => self.poll.registry().register(
                    &mut SourceFd(&n.raw_fd()),
                    notify_token(id),
                    Interest::READABLE,
                ),
                None => Ok(()),
            });
        if let Err(e) = registered {
            // A worker the supervisor cannot watch must not run: kill and reap it here.
            let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
            let _ = sys::kill(pid, libc::SIGKILL);
            let _ = sys::waitpid_blocking(pid);
            return Err(e).context("failed to watch the new worker");
        }
        if let Some(st) = &mut self.steer
            && let Some(n) = self.config.max_conns
        {
            st.watch_max_conns(
                id,
                slot,
                n.saturating_add(jitter(self.config.max_conns_jitter, id)),
            );
        }
        self.bus.send(BusCommand::Register {
            pid,
            peer: Peer::Worker(slot),
            id: Some(id),
        });
        if self.mode == Mode::Dispatch {
            let ends = channels
                .into_iter()
                .zip(worker_fds)
                .map(|(master, worker)| ChannelEnds { master, worker })
                .collect();
            let max_conns = self
                .config
                .max_conns
                .map(|n| n.saturating_add(jitter(self.config.max_conns_jitter, id)));
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
        self.procs.push(Proc {
            id,
            slot,
            pid,
            pidfd: spawned.pidfd,
            notify,
        });
        Ok(pid)
    }

    /// Drops a reaped worker's pidfd and notify socket and tells the acceptor: connections
    /// still queued in its channel go to another worker.
    fn forget(&mut self, id: WorkerId) {
        self.deferred_drains.retain(|d| d.0 != id);
        let Some(i) = self.procs.iter().position(|p| p.id == id) else {
            return;
        };
        let p = self.procs.swap_remove(i);
        if let Some(st) = &self.steer
            && !self.procs.iter().any(|q| q.slot == p.slot)
        {
            st.slot_vacant(p.slot);
        }
        let raw = p.pidfd.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        if let Some(n) = &p.notify {
            let raw = n.raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        }
        self.send(Command::Remove(id));
        self.bus.send(BusCommand::Forget(p.pid));
        if let Some(h) = &mut self.heartbeats {
            h.forget(id);
        }
        if let Some((p, _)) = &mut self.probes {
            p.forget(id);
        }
    }

    fn run_loop(&mut self) -> anyhow::Result<()> {
        let mut events = Events::with_capacity(256);
        loop {
            if let Some(result) = self.exit.take() {
                if let Some(a) = self.acceptor.take() {
                    a.shutdown();
                }
                return match result {
                    Ok(()) => Ok(()),
                    Err(why) => bail!("{why}"),
                };
            }
            let next = [
                self.lifecycle.next_deadline(),
                self.next_rss_sample,
                self.heartbeats.as_ref().and_then(Heartbeats::next_deadline),
                self.probes
                    .as_ref()
                    .filter(|_| self.workers_started)
                    .map(|(p, _)| p.next_round),
                self.agent.as_ref().and_then(|a| {
                    a.next_deadline(self.config.ready_delay, self.config.ready_timeout)
                }),
                self.next_queue_sample,
                self.steer.as_ref().map(|s| s.next_deadline()),
                self.service.next_deadline(),
                self.delayed_stop.map(|(t, _)| t),
                self.deferred_drains.iter().map(|d| d.1).min(),
            ]
            .into_iter()
            .flatten()
            .min();
            let timeout = if self.notify_backlog.is_empty() {
                next.map(|t| t.saturating_duration_since(Instant::now()))
            } else {
                Some(std::time::Duration::ZERO)
            };
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
                    agent::PIDFD_TOKEN => {
                        let ctx = agent_ctx!(self);
                        let ev = self.agent.as_mut().and_then(|a| a.on_exit(&ctx));
                        self.on_agent_event(ev)?;
                    }
                    agent::NOTIFY_TOKEN => {
                        let ev = self.agent.as_mut().and_then(Agent::on_notify);
                        self.on_agent_event(ev)?;
                    }
                    Token(t) if t % 2 == 0 => self.reap(((t - 2) / 2) as WorkerId),
                    Token(t) => self.read_notify(((t - 3) / 2) as WorkerId),
                }
            }
            for id in std::mem::take(&mut self.notify_backlog) {
                self.read_notify(id);
            }
            while let Ok(ev) = self.events.try_recv() {
                self.on_event(ev);
            }
            // Stopping: STOPPING no longer matters, and the acceptor may be gone.
            if self.lifecycle.phase() != Phase::Running {
                for (id, status) in std::mem::take(&mut self.exits_waiting) {
                    self.feed(Input::Exited { id, status });
                }
            }
            self.service.on_timer(Instant::now());
            let now = Instant::now();
            let late: Vec<WorkerId> = self
                .deferred_drains
                .iter()
                .filter(|d| now >= d.1)
                .map(|d| d.0)
                .collect();
            for id in late {
                self.send_deferred_drain(id, "still holds connections after half of --grace");
            }
            if let Some((at, signal)) = self.delayed_stop
                && Instant::now() >= at
            {
                self.delayed_stop = None;
                self.feed(Input::Stop { signal });
            }
            while let Ok(ev) = self.bus_events.try_recv() {
                self.on_bus_event(ev)?;
            }
            let ev = self.pending_agent_event.take();
            self.on_agent_event(ev)?;
            {
                let ctx = agent_ctx!(self);
                let ev = self
                    .agent
                    .as_mut()
                    .and_then(|a| a.on_timers(Instant::now(), &ctx));
                self.on_agent_event(ev)?;
            }
            let silent = self
                .heartbeats
                .as_mut()
                .map_or_else(Vec::new, |h| h.expired(Instant::now()));
            for id in silent {
                self.feed(Input::Unhealthy {
                    id,
                    why: "it sent no heartbeat within --heartbeat-timeout",
                });
            }
            self.run_probes();
            self.feed(Input::Tick);
            self.steer_tick();
            self.on_asks();
            if let Some(t) = self.next_rss_sample
                && Instant::now() >= t
            {
                self.sample_rss();
                self.next_rss_sample = Some(Instant::now() + self.config.rss_interval);
            }
            if let Some(t) = self.next_queue_sample
                && Instant::now() >= t
            {
                self.sample_accept_queues();
                self.next_queue_sample =
                    Some(Instant::now() + stall::sample_period(self.config.stall_timeout));
            }
        }
    }

    /// Reuseport mode: a slot whose own listeners' accept queues do not go down for the stall
    /// timeout has a worker that stopped accepting; it is replaced, and the replacement, which
    /// inherits the same sockets, takes the queue over.
    fn sample_accept_queues(&mut self) {
        let now = Instant::now();
        let timeout = self.config.stall_timeout;
        let mut stalled = Vec::new();
        for (slot, io) in self.slots.iter_mut().enumerate() {
            io.watches.resize(io.reuseport.len(), QueueWatch::new(now));
            let ready = self
                .lifecycle
                .workers()
                .iter()
                .filter(|w| w.slot == slot && w.state == WorkerState::Ready)
                .map(|w| (w.id, w.pid.unwrap_or(0)))
                .collect::<Vec<_>>();
            if ready.is_empty() {
                // Only time with a ready worker counts (a slow start is not a stall).
                for w in &mut io.watches {
                    w.reset(now);
                }
                continue;
            }
            let mut idle = false;
            for (sock, watch) in io.reuseport.iter().zip(io.watches.iter_mut()) {
                let queued = sys::listen_queue(sock.as_fd()).map_or(0, |(q, _)| q);
                idle |= watch.sample(u64::from(queued), now, timeout);
            }
            if !idle {
                continue;
            }
            for (id, pid) in ready {
                warn!(
                    "worker {slot} (pid {pid}): its accept queue did not go down for \
                     {timeout:?}; it stopped accepting"
                );
                stalled.push(id);
            }
            for w in &mut io.watches {
                w.reset(now);
            }
        }
        for id in stalled {
            if let Some(st) = &mut self.steer
                && let Some(w) = self.lifecycle.worker(id)
            {
                st.mark_stalled(w.slot);
            }
            self.feed(Input::Stalled { id });
        }
    }

    fn on_signal(&mut self, sig: i32) {
        match sig {
            SIGTERM | SIGINT | SIGQUIT => {
                if self.lifecycle.phase() != Phase::Running
                    && let Some(a) = &mut self.agent
                {
                    // A second stop signal kills at once, the agent too.
                    a.kill();
                }
                let signal = sys::signal_name(sig);
                if !self.delay_stop(signal) {
                    self.delayed_stop = None;
                    self.feed(Input::Stop { signal });
                }
            }
            SIGCHLD => self.reap_exited(),
            SIGHUP if self.agent.is_some() && self.lifecycle.phase() == Phase::Running => {
                // The agent is reloaded first; the workers' reload starts once it is ready.
                let generation = self.lifecycle.generation() + 1;
                let grace = self.config.grace;
                let ctx = agent_ctx!(self);
                if let Some(a) = self.agent.as_mut() {
                    a.reload(generation, grace, &ctx);
                }
            }
            SIGHUP => self.feed(Input::Reload),
            // Before the agent is first ready there are no workers to scale.
            SIGTTIN | SIGTTOU if !self.workers_started => {}
            SIGTTIN => self.scale_up(),
            SIGTTOU => self.feed(Input::ScaleDown),
            SIGUSR1 => self.log_status(),
            SIGUSR2 => self.log_dump(),
            _ => {}
        }
    }

    /// `--shutdown-delay`: the first stop signal only schedules the stop (everything keeps
    /// serving meanwhile); a second one during the delay starts it at once. Returns whether
    /// the stop was deferred.
    fn delay_stop(&mut self, signal: &'static str) -> bool {
        let delay = self.config.shutdown_delay;
        let running = self.lifecycle.phase() == crate::master::lifecycle::Phase::Running;
        if delay.is_zero() || self.delayed_stop.is_some() || !running {
            return false;
        }
        info!("{signal}: still serving for --shutdown-delay {delay:?}, then stopping");
        self.service.stopping(&format!("stopping in {delay:?}"));
        self.delayed_stop = Some((Instant::now() + delay, signal));
        true
    }

    /// Reaps every exited child: a worker through [`Self::reap`] (so its exit is handled like
    /// one its pidfd reported), anything else — an orphan re-parented to the master as PID 1
    /// or subreaper — directly, so no zombie is left.
    fn reap_exited(&mut self) {
        // Bounded: each pass reaps the child it peeked.
        for _ in 0..4096 {
            let pid = match sys::waitid_peek_exited() {
                Ok(Some(pid)) => pid,
                Ok(None) => return,
                Err(e) => {
                    warn!("waitid failed: {e}");
                    return;
                }
            };
            if self.agent.as_ref().and_then(Agent::pid) == Some(pid) {
                // The agent: reaped by its own module, which decides what comes next.
                let ctx = agent_ctx!(self);
                let ev = self.agent.as_mut().and_then(|a| a.on_exit(&ctx));
                self.pending_agent_event = ev.or(self.pending_agent_event);
                if self.agent.as_ref().and_then(Agent::pid) == Some(pid) {
                    let _ = sys::waitpid_nohang(pid);
                }
                continue;
            }
            if let Some(id) = self.procs.iter().find(|p| p.pid == pid).map(|p| p.id) {
                self.reap(id);
                if self.procs.iter().any(|p| p.pid == pid) {
                    // Not collected by reap() (its waitpid failed): take it here so the loop
                    // moves on.
                    let _ = sys::waitpid_nohang(pid);
                }
                continue;
            }
            match sys::waitpid_nohang(pid) {
                Ok(Some(status)) => log::debug!("reaped orphan {pid}: {status}"),
                Ok(None) => return,
                Err(e) => {
                    warn!("waitpid({pid}) failed: {e}");
                    return;
                }
            }
        }
    }

    /// Prepares one more slot's resources, then lets the lifecycle start its worker.
    fn scale_up(&mut self) {
        if !self.lifecycle.accepts_scale_up() {
            return;
        }
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
        let slot = self.slots.len();
        if let Some(st) = &mut self.steer
            && let Err(e) = st.add_slot(slot, &reuseport)
        {
            error!("SIGTTIN: cannot add a worker: {e:#}");
            return;
        }
        attach_program(self.reuseport_prog.as_ref(), &reuseport);
        self.slots.push(SlotIo {
            cpus: slot_cpus(&self.config.pin, slot),
            reuseport,
            watches: Vec::new(),
            paused: false,
        });
        self.serve_slots();
        self.feed(Input::ScaleUp);
    }

    fn log_status(&mut self) {
        // The acceptor's status lines show RSS: sample it now, whatever the policy.
        self.sample_rss();
        let now = Instant::now();
        for w in self.lifecycle.workers() {
            let state = match w.state {
                WorkerState::Starting => "Starting",
                WorkerState::Ready => "Ready",
                WorkerState::Stopping { .. } => "Stopping",
                WorkerState::Draining { .. } => "Draining",
            };
            info!(
                "status: worker {} pid {} generation {} {state} up {:.1?}",
                w.slot,
                w.pid.unwrap_or(0),
                w.generation,
                now.saturating_duration_since(w.started)
            );
        }
        if let Some(st) = &self.steer {
            st.log_status();
        }
        if let Some(ReuseportProgram::Spread(spread)) = &self.reuseport_prog
            && let Some((runs, per_run)) = spread.cost()
        {
            info!(
                "status: reuseport program: {runs} runs, {per_run} ns per run \
                 (kernel.bpf_stats_enabled)"
            );
        }
        if let Some(a) = &self.agent {
            a.log_status();
        }
        self.send(Command::Status);
        self.bus.send(BusCommand::Status);
    }

    /// Takes the probes' results (replacing a worker that failed `--health-fails` in a row)
    /// and starts a round when one is due.
    fn run_probes(&mut self) {
        let Some((probes, spec)) = &mut self.probes else {
            return;
        };
        let mut failed = Vec::new();
        while let Ok(result) = self.probe_results.try_recv() {
            if let Err(why) = &result.outcome {
                let pid = self.lifecycle.worker(result.id).and_then(|w| w.pid);
                warn!(
                    "health check of worker id {} (pid {}) failed: {why}",
                    result.id,
                    pid.unwrap_or(0)
                );
            }
            if probes.record(&result) {
                failed.push(result.id);
            }
        }
        let now = Instant::now();
        let mut round = Vec::new();
        if self.workers_started && now >= probes.next_round {
            let ready: Vec<WorkerId> = self
                .lifecycle
                .workers()
                .iter()
                .filter(|w| w.state == WorkerState::Ready)
                .filter(|w| !self.lifecycle.replacements().iter().any(|r| r.old == w.id))
                .map(|w| w.id)
                .collect();
            round = probes.round(now, &ready);
        }
        let spec = Arc::clone(spec);
        if let Some(acceptor) = &self.acceptor {
            for id in round {
                if let Err(e) = probe::spawn_probe(
                    id,
                    Arc::clone(&spec),
                    acceptor.commander(),
                    self.probe_tx.clone(),
                    Arc::clone(&self.waker),
                ) {
                    warn!("cannot start a health probe: {e}");
                    let _ = self.probe_tx.send(ProbeResult {
                        id,
                        outcome: Ok(()),
                    });
                }
            }
        }
        for id in failed {
            self.feed(Input::Unhealthy {
                id,
                why: "it failed --health-fails active health checks in a row",
            });
        }
    }

    fn on_agent_event(&mut self, ev: Option<AgentEvent>) -> anyhow::Result<()> {
        match ev {
            None => Ok(()),
            Some(AgentEvent::Stopped) => {
                if let Some(result) = self.exit_after_agent.take() {
                    self.exit = Some(result);
                }
                Ok(())
            }
            Some(AgentEvent::GaveUp) => bail!(
                "the agent exited {} times before it was ever ready",
                agent::START_CRASH_LIMIT
            ),
            Some(AgentEvent::Ready { first, reloaded }) => {
                if self.lifecycle.phase() != Phase::Running {
                    return Ok(());
                }
                if first && !self.workers_started {
                    return self.start_workers();
                }
                if reloaded {
                    self.feed(Input::Reload);
                }
                Ok(())
            }
        }
    }

    fn on_bus_event(&mut self, ev: BusEvent) -> anyhow::Result<()> {
        match ev {
            BusEvent::Heartbeat { id: Some(id), .. } => {
                // Checked while it serves and nobody replaces it already.
                let ready = self
                    .lifecycle
                    .worker(id)
                    .is_some_and(|w| w.state == WorkerState::Ready)
                    && !self.lifecycle.replacements().iter().any(|r| r.old == id);
                if let Some(h) = &mut self.heartbeats
                    && ready
                {
                    h.beat(id, Instant::now());
                }
            }
            BusEvent::Heartbeat { id: None, .. } => {}
            BusEvent::Ready { id: Some(id), .. } => self.feed(Input::Ready {
                id,
                how: "ready on the bus",
            }),
            BusEvent::Ready { pid, id: None } => {
                let ev = self
                    .agent
                    .as_mut()
                    .and_then(|a| a.ready_from(pid, "ready on the bus"));
                self.on_agent_event(ev)?;
            }
        }
        Ok(())
    }

    fn on_event(&mut self, ev: Event) {
        let input = match ev {
            Event::Ready(id) => Input::Ready {
                id,
                how: "READY on its channel",
            },
            Event::Stopping(id) => Input::Stopping { id },
            Event::Stalled(id) => Input::Stalled { id },
            Event::MaxConns(id) => Input::MaxConns { id },
            Event::Misbehaving(id) => Input::Misbehaving { id },
            Event::Reclaimed(..) => return,
            Event::Idle(id) => {
                self.send_deferred_drain(id, "holds no connection now");
                return;
            }
            Event::ChannelsRead(id) => match self.exits_waiting.iter().position(|e| e.0 == id) {
                Some(i) => {
                    let (id, status) = self.exits_waiting.swap_remove(i);
                    Input::Exited { id, status }
                }
                None => return,
            },
            Event::Drained => Input::Drained,
        };
        self.feed(input);
    }

    fn reap(&mut self, id: WorkerId) {
        let Some(p) = self.procs.iter().find(|p| p.id == id) else {
            return;
        };
        if self.exits_waiting.iter().any(|e| e.0 == id) {
            return;
        }
        // Whatever the worker left running in its process group goes with it.
        tree::kill_leftovers(p.pid);
        let status = match sys::waitpid_nohang(p.pid) {
            Ok(Some(status)) => status,
            Ok(None) => return,
            Err(e) => {
                error!("waitpid({}) failed: {e}", p.pid);
                ExitStatus::Exited(-1)
            }
        };
        let slot = p.slot;
        let never_ready = self.lifecycle.phase() == Phase::Running
            && self
                .lifecycle
                .worker(id)
                .is_some_and(|w| w.state == WorkerState::Starting);
        if never_ready {
            self.explain_early_exit(slot);
        }
        // Dispatch mode: a worker may have said STOPPING on its channel just before exiting.
        // The acceptor reads the channel first, so the lifecycle learns of STOPPING before the
        // exit (events arrive in order) and a planned exit is not taken for a crash.
        if self.acceptor.is_some() && self.lifecycle.phase() == Phase::Running {
            self.exits_waiting.push((id, status));
            self.send(Command::ReadChannels(id));
            return;
        }
        self.feed(Input::Exited { id, status });
    }

    /// A worker that exits before it was ready most often cannot work in this mode (the shim
    /// did not reach the server, which then bound the port itself): say so in one line, once.
    fn explain_early_exit(&mut self, slot: usize) {
        if self.config.command.builtin || std::mem::replace(&mut self.early_exit_explained, true) {
            return;
        }
        let binary = self
            .config
            .command
            .resolve()
            .map_or(diagnose::Binary::Unknown, |p| diagnose::inspect(&p));
        let program = self.config.command.program.to_string_lossy();
        warn!(
            "worker {slot} exited before it was ready: {}",
            diagnose::early_exit_hint(self.mode, self.preload.is_some(), binary, &program)
        );
    }

    fn read_notify(&mut self, id: WorkerId) {
        let Some(p) = self.procs.iter_mut().find(|p| p.id == id) else {
            return;
        };
        let (slot, pid) = (p.slot, p.pid);
        let (notices, more) = match &mut p.notify {
            Some(sock) => sock.read(pid, slot),
            None => return,
        };
        if more && !self.notify_backlog.contains(&id) {
            self.notify_backlog.push(id);
        }
        for notice in notices {
            match notice {
                Notice::Ready => self.feed(Input::Ready { id, how: "READY=1" }),
                Notice::Stopping => self.feed(Input::Stopping { id }),
            }
        }
    }

    fn sample_rss(&mut self) {
        let mut samples = Vec::with_capacity(self.procs.len());
        for p in &self.procs {
            if let Ok(bytes) = sys::rss_bytes(p.pid) {
                samples.push((p.id, bytes));
            }
        }
        self.send(Command::Rss(
            samples
                .iter()
                .map(|&(id, bytes)| (id, (bytes / 1024).min(u64::from(u32::MAX)) as u32))
                .collect(),
        ));
        if let Some(st) = &self.steer {
            st.record_rss(&slot_rss_kib(self.lifecycle.workers(), &samples));
        }
        for (id, bytes) in samples {
            self.feed(Input::Rss { id, bytes });
        }
    }
}

/// Kernel-steered least-mem: per slot, the largest RSS (KiB) among its workers that are starting
/// or ready (the ones that serve, or are about to serve, its listeners; a draining or stopping
/// worker takes no new connection), 0 where none was sampled.
fn slot_rss_kib(
    workers: &[crate::master::lifecycle::Worker],
    samples: &[(WorkerId, u64)],
) -> Vec<u64> {
    let bytes: std::collections::HashMap<WorkerId, u64> = samples.iter().copied().collect();
    let mut kib = Vec::new();
    for w in workers {
        if !matches!(w.state, WorkerState::Starting | WorkerState::Ready) {
            continue;
        }
        if let Some(b) = bytes.get(&w.id) {
            if kib.len() <= w.slot {
                kib.resize(w.slot + 1, 0);
            }
            kib[w.slot] = kib[w.slot].max(b / 1024);
        }
    }
    kib
}

fn slot_cpus(pin: &Pin, slot: usize) -> Option<CpuSet> {
    match pin {
        Pin::None => None,
        Pin::Cpus(cpus) => Some(CpuSet::from_cpus(&[cpus[slot % cpus.len()]])),
    }
}

/// Plain reuseport mode's program, by what could load.
enum ReuseportProgram {
    /// `bpf/spread.bpf.c`: the kernel's hash over the slots in service (a removed slot's socket
    /// gets no new connection while its worker drains on it), and where 5.14+ a closing
    /// socket's queue re-placed the same way.
    Spread(Spread),
    /// Only the two-instruction `SELECT_OR_MIGRATE` program
    /// (`crate::steer::load_migrate_only`): the kernel's hash over the whole group, a closing
    /// socket's queue moved to the rest of it.
    Migrate(OwnedFd),
}

/// Plain reuseport mode: loads the spread program (or adopts the one a privileged `steer-load`
/// passed in `RCLUSTER_SPREAD_FDS`), or failing that the migrate-only one, and
/// attaches it to each address's group (through slot 0's sockets), logging in one line what a
/// removed slot's socket and a closing socket's queue will meet; `None` (logged) where neither
/// loads.
fn reuseport_program(slots: &[SlotIo], listeners: usize) -> Option<ReuseportProgram> {
    let first = slots.first()?;
    // A privileged `steer-load` loaded it: adopt it (no CAP_BPF needed); else load it here.
    let passed = std::env::var_os(crate::steer::spread::RCLUSTER_SPREAD_FDS);
    let loaded = match &passed {
        Some(value) => Spread::adopt(value, listeners).map_err(|e| {
            warn!("reuseport: the spread program passed in is unusable: {e}");
            e.to_string()
        }),
        None => Spread::load(listeners).map_err(|e| e.to_string()),
    };
    let spread_error = match loaded {
        Ok(mut spread) => {
            let attached = first
                .reuseport
                .iter()
                .enumerate()
                .try_for_each(|(i, s)| spread.attach(i, s.as_fd()));
            match attached.and_then(|()| serve_slots(&mut spread, slots, listeners)) {
                Ok(()) => {
                    let queue = if spread.migrates() {
                        "a closing worker socket's queue moves to the others (SELECT_OR_MIGRATE)"
                    } else {
                        "a closing worker socket's queue is reset (SELECT_OR_MIGRATE needs Linux \
                         5.14), unless net.ipv4.tcp_migrate_req=1"
                    };
                    info!(
                        "reuseport: the kernel's hash spreads connections over the worker slots \
                         in service (a removed slot's socket gets none while its worker drains); \
                         {queue}{}",
                        if passed.is_some() {
                            " (program passed in by steer-load, RCLUSTER_SPREAD_FDS)"
                        } else {
                            ""
                        }
                    );
                    return Some(ReuseportProgram::Spread(spread));
                }
                Err(e) => {
                    // Not left attached with a set the supervisor no longer keeps: a slot
                    // added later would get nothing.
                    for sock in &first.reuseport {
                        let _ = sys::bpf::detach_reuseport_bpf(sock.as_fd());
                    }
                    e.to_string()
                }
            }
        }
        Err(e) => e,
    };
    let spread_error = spread_error.lines().next().unwrap_or_default().to_string();
    match crate::steer::load_migrate_only() {
        Ok(prog) => {
            if let Err(e) = attach_all(&prog, &first.reuseport) {
                info!("reuseport: a closing worker socket's queue is reset (cannot attach: {e})");
                return None;
            }
            info!(
                "reuseport: a closing worker socket's queue moves to the others \
                 (SELECT_OR_MIGRATE); a removed slot's socket takes new connections until its \
                 worker exits (no spread program: {spread_error})"
            );
            Some(ReuseportProgram::Migrate(prog))
        }
        Err(e) => {
            let e = e.to_string();
            let first = e.lines().next().unwrap_or_default();
            info!(
                "reuseport: a closing worker socket's queue is reset (no migrate program: {first})"
            );
            None
        }
    }
}

/// Has `spread` place new connections on the sockets of every slot that holds them and is not
/// given up, per listening address.
fn serve_slots(spread: &mut Spread, slots: &[SlotIo], listeners: usize) -> std::io::Result<()> {
    for listener in 0..listeners {
        let socks: Vec<BorrowedFd<'_>> = slots
            .iter()
            .filter(|s| !s.paused)
            .filter_map(|s| s.reuseport.get(listener).map(|s| s.as_fd()))
            .collect();
        if let Err(e) = spread.serve(listener, &socks) {
            warn!("reuseport: cannot update the slots the program spreads over: {e}");
            return Err(e);
        }
    }
    Ok(())
}

fn attach_all(prog: &OwnedFd, sockets: &[Socket]) -> std::io::Result<()> {
    sockets
        .iter()
        .try_for_each(|s| sys::bpf::attach_reuseport_ebpf(s.as_fd(), prog.as_fd()))
}

/// Attaches plain reuseport mode's program (if any) to the groups of `sockets`, one per
/// listening address (again is harmless).
fn attach_program(prog: Option<&ReuseportProgram>, sockets: &[Socket]) {
    let attached = match prog {
        Some(ReuseportProgram::Spread(spread)) => sockets
            .iter()
            .enumerate()
            .try_for_each(|(i, s)| spread.attach(i, s.as_fd())),
        Some(ReuseportProgram::Migrate(prog)) => attach_all(prog, sockets),
        None => Ok(()),
    };
    if let Err(e) = attached {
        warn!("reuseport: cannot attach the program: {e}");
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

/// The workers' uid and gid when they run as another user than the master (their notify
/// sockets must then be theirs).
fn notify_owner(credentials: Option<&sys::Credentials>) -> Option<(u32, u32)> {
    let c = credentials?;
    let uid = c.uid?;
    (uid != sys::geteuid()).then_some((uid, c.gid))
}

/// The `execve` failure inside a spawn error, if that is what it is.
fn exec_failure(e: &anyhow::Error) -> Option<crate::sys::spawn::SpawnError> {
    e.chain()
        .filter_map(|c| c.downcast_ref::<io::Error>())
        .filter_map(|io| io.get_ref())
        .filter_map(|inner| inner.downcast_ref::<crate::sys::spawn::SpawnError>())
        .find(|s| s.is_exec())
        .copied()
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
    match max.checked_add(1) {
        Some(modulus) => x % modulus,
        // 0..=u64::MAX: every value is in range.
        None => x,
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // On an error return, leave no worker behind.
        for p in &self.procs {
            tree::signal(p.pid, libc::SIGKILL);
        }
        for p in &self.procs {
            let _ = sys::waitpid_blocking(p.pid);
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
    fn jitter_stays_in_range_up_to_u64_max() {
        for id in 0..64 {
            assert!(jitter(3, id) <= 3);
            assert_eq!(jitter(0, id), 0);
            let _ = jitter(u64::MAX, id);
        }
    }

    #[test]
    fn a_slots_rss_is_its_largest_serving_worker() {
        let w = |id, slot, state| crate::master::lifecycle::Worker {
            id,
            slot,
            generation: 0,
            pid: None,
            state,
            started: Instant::now(),
        };
        let workers = [
            w(1, 0, WorkerState::Ready),
            w(2, 0, WorkerState::Draining { kill_at: None }),
            w(3, 1, WorkerState::Starting),
            w(4, 1, WorkerState::Ready),
            w(5, 3, WorkerState::Ready),
        ];
        // Worker 2 drains (no new connections): its RSS does not count; worker 5 has no
        // sample, so slot 3 reads 0 (not known); slot 2 has no worker.
        let samples = [(1, 10 << 20), (2, 900 << 20), (3, 30 << 20), (4, 20 << 20)];
        assert_eq!(slot_rss_kib(&workers, &samples), vec![10 << 10, 30 << 10]);
    }
}
