//! The agent (`--agent CMD`): one process beside the workers that serves no connections —
//! background work done once per host (egg-cluster's model). It runs on the supervisor's
//! thread: the supervisor calls in on the agent's pidfd and NOTIFY_SOCKET tokens, on timers and
//! on signals, and acts on the [`AgentEvent`]s returned.
//!
//! Its life: started before the workers (`RCLUSTER_ROLE=agent`, no listening fds, its own
//! NOTIFY_SOCKET, `RCLUSTER_IPC`); ready on `READY=1`, `--ready-delay`, or (with a warning)
//! `--ready-timeout`; the workers start once it is ready. If it exits it is restarted with
//! capped exponential backoff and an error line each time, and the workers keep serving. On
//! SIGHUP it is reloaded first (stopped, then started again) and the workers' rolling reload
//! begins once the new agent is ready, so a worker of the new generation never runs without
//! an agent of the new generation. On shutdown it is stopped last, after every worker exited.
//!
//! It owns the agent's pidfd and notify socket.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::Context;
use log::{error, info, warn};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use crate::cli::WorkerCommand;
use crate::master::bus::{BusCommand, BusHandle, Peer};
use crate::master::lifecycle::{STABLE_UPTIME, restart_backoff};
use crate::master::notify::{Notice, NotifySocket, RuntimeDir};
use crate::sys::spawn::{SpawnSpec, spawn};
use crate::sys::{self, Pid};
use rcluster_proto::Mode;
use rcluster_proto::env::{ChildEnv, Role};

/// The supervisor's poll token for the agent's pidfd.
pub const PIDFD_TOKEN: Token = Token(usize::MAX - 1);
/// The supervisor's poll token for the agent's NOTIFY_SOCKET.
pub const NOTIFY_TOKEN: Token = Token(usize::MAX - 2);
/// Exits before it was ever ready after which the master gives up starting (exit 1).
pub const START_CRASH_LIMIT: u32 = 5;

/// What the supervisor must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentEvent {
    /// The agent became ready. `first`: for the first time (start the workers);
    /// `reloaded`: after a SIGHUP restart (start the workers' rolling reload).
    Ready {
        /// First readiness since the master started.
        first: bool,
        /// Readiness of the agent started by a reload.
        reloaded: bool,
    },
    /// It exited before it was ever ready [`START_CRASH_LIMIT`] times: the master cannot start.
    GaveUp,
    /// It exited while the master is stopping: nothing left to do for it.
    Stopped,
}

struct Running {
    pid: Pid,
    pidfd: OwnedFd,
    notify: Option<NotifySocket>,
    started: Instant,
    ready: bool,
    kill_at: Option<Instant>,
}

/// The agent's supervision state.
pub struct Agent {
    command: WorkerCommand,
    running: Option<Running>,
    ever_ready: bool,
    crashes: u32,
    restart_at: Option<Instant>,
    /// SIGHUP: start again as soon as the current one exited.
    reloading: bool,
    /// The reload's agent is starting: its readiness starts the workers' reload.
    reload_started: bool,
    stopping: bool,
    generation: u64,
    /// Agent processes started so far (names each one's notify socket).
    spawns: u64,
}

/// What spawning needs from the supervisor.
pub struct SpawnContext<'a> {
    /// The poll the pidfd and notify socket are registered with.
    pub registry: &'a Registry,
    /// The master's environment minus what it owns.
    pub base_env: &'a [Vec<u8>],
    /// The workers' listen addresses (for `RCLUSTER_LISTEN`).
    pub addrs: &'a [SocketAddr],
    /// The bus, to register the pid with and to name in `RCLUSTER_IPC`.
    pub bus: &'a BusHandle,
    /// The private directory of the notify sockets.
    pub runtime: Option<&'a RuntimeDir>,
    /// `--user`/`--group`: the agent drops privileges like the workers.
    pub credentials: Option<&'a crate::sys::Credentials>,
    /// Readiness by delay.
    pub ready_delay: Option<Duration>,
    /// Limit for readiness.
    pub ready_timeout: Duration,
    /// Total time after SIGTERM before SIGKILL.
    pub grace: Duration,
}

impl Agent {
    /// An agent that runs `command`; nothing started yet.
    pub fn new(command: WorkerCommand) -> Agent {
        Agent {
            command,
            running: None,
            ever_ready: false,
            crashes: 0,
            restart_at: None,
            reloading: false,
            reload_started: false,
            stopping: false,
            generation: 0,
            spawns: 0,
        }
    }

    /// Whether an agent process exists.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// The agent's pid, if running.
    pub fn pid(&self) -> Option<Pid> {
        self.running.as_ref().map(|r| r.pid)
    }

    /// Starts the agent process.
    pub fn spawn(&mut self, ctx: &SpawnContext<'_>) -> anyhow::Result<()> {
        let program = self.command.resolve().map_err(|e| anyhow::anyhow!(e))?;
        // Named apart from the workers' (whose ids count up from 0), and fresh per start.
        self.spawns += 1;
        let notify = ctx.runtime.and_then(|dir| {
            NotifySocket::bind(dir, u64::MAX - self.spawns)
                .map_err(|e| warn!("agent: no NOTIFY_SOCKET: {e}"))
                .ok()
        });
        let notify_value = notify
            .as_ref()
            .and_then(|n| n.path().to_str().map(str::to_owned));
        let mut env = ctx.base_env.to_vec();
        env.extend(
            ChildEnv {
                slot: 0,
                generation: self.generation,
                mode: Mode::Dispatch,
                listen: ctx.addrs,
                notify_socket: notify_value.as_deref(),
                role: Role::Agent,
                ipc: ctx.bus.path().to_str(),
                // The agent takes no connections: it never counts on the steering table.
                steer_fd: None,
                overflow_fd: None,
                // Nor holds any: nothing to drain.
                drain_hold: None,
            }
            .entries()
            .into_iter()
            .map(String::into_bytes),
        );
        let mut args: Vec<&OsStr> = vec![self.command.program.as_os_str()];
        args.extend(self.command.args.iter().map(|a| a.as_os_str()));
        let spawned = spawn(&SpawnSpec {
            program: &program,
            args: &args,
            env: &env,
            listen_pid: false,
            fds: &[],
            cpus: None,
            die_with_parent: true,
            // The agent's output goes straight to the master's stdout/stderr (not captured per
            // line like the workers').
            stdout: None,
            stderr: None,
            credentials: ctx.credentials,
        })
        .with_context(|| format!("failed to run the agent {}", program.display()))?;
        let pid = spawned.pid;
        let registered = ctx
            .registry
            .register(
                &mut SourceFd(&spawned.pidfd.as_raw_fd()),
                PIDFD_TOKEN,
                Interest::READABLE,
            )
            .and_then(|()| match &notify {
                Some(n) => ctx.registry.register(
                    &mut SourceFd(&n.raw_fd()),
                    NOTIFY_TOKEN,
                    Interest::READABLE,
                ),
                None => Ok(()),
            });
        if let Err(e) = registered {
            let _ = sys::kill(pid, libc::SIGKILL);
            let _ = sys::waitpid_blocking(pid);
            return Err(e).context("failed to watch the agent");
        }
        ctx.bus.send(BusCommand::Register {
            pid,
            peer: Peer::Agent,
            id: None,
        });
        info!("agent started: pid {pid}, {}", self.command.display());
        self.running = Some(Running {
            pid,
            pidfd: spawned.pidfd,
            notify,
            started: Instant::now(),
            ready: false,
            kill_at: None,
        });
        Ok(())
    }

    /// The agent's NOTIFY_SOCKET is readable.
    pub fn on_notify(&mut self) -> Option<AgentEvent> {
        let r = self.running.as_mut()?;
        let mut ready = false;
        if let Some(sock) = &mut r.notify {
            // Only the agent's process group is believed (notify.rs); a few bursts at most per
            // wake, so a flood cannot hold the supervisor.
            for _ in 0..4 {
                let (notices, more) = sock.read(r.pid, 0);
                ready |= notices.contains(&Notice::Ready);
                if !more {
                    break;
                }
            }
        }
        if ready {
            self.mark_ready("READY=1")
        } else {
            None
        }
    }

    /// Marks the agent ready (`ready` on the bus from `pid`, or READY=1).
    pub fn ready_from(&mut self, pid: Pid, how: &str) -> Option<AgentEvent> {
        if self.pid() != Some(pid) {
            return None;
        }
        self.mark_ready(how)
    }

    fn mark_ready(&mut self, how: &str) -> Option<AgentEvent> {
        let r = self.running.as_mut()?;
        if r.ready || self.stopping || r.kill_at.is_some() {
            return None;
        }
        r.ready = true;
        info!(
            "agent ready: pid {} ({how}, after {:.0?})",
            r.pid,
            r.started.elapsed()
        );
        let first = !self.ever_ready;
        self.ever_ready = true;
        let reloaded = std::mem::take(&mut self.reload_started);
        Some(AgentEvent::Ready { first, reloaded })
    }

    /// The agent's pidfd is readable: reap it and decide what comes next.
    pub fn on_exit(&mut self, ctx: &SpawnContext<'_>) -> Option<AgentEvent> {
        let r = self.running.as_ref()?;
        let status = match sys::waitpid_nohang(r.pid) {
            Ok(Some(status)) => status,
            Ok(None) => return None,
            Err(e) => {
                error!("waitpid({}) failed: {e}", r.pid);
                sys::ExitStatus::Exited(-1)
            }
        };
        let r = self.running.take().expect("checked above");
        let _ = ctx.registry.deregister(&mut SourceFd(&r.pidfd.as_raw_fd()));
        if let Some(n) = &r.notify {
            let _ = ctx.registry.deregister(&mut SourceFd(&n.raw_fd()));
        }
        ctx.bus.send(BusCommand::Forget(r.pid));
        if self.stopping {
            info!("agent (pid {}) exited: {status}", r.pid);
            return Some(AgentEvent::Stopped);
        }
        if self.reloading {
            self.reloading = false;
            info!("agent (pid {}) exited for the reload: {status}", r.pid);
            self.start_or_retry(ctx);
            return None;
        }
        if r.started.elapsed() >= STABLE_UPTIME {
            self.crashes = 0;
        }
        self.crashes += 1;
        if !self.ever_ready && self.crashes >= START_CRASH_LIMIT {
            error!(
                "AGENT FAILED: it exited {} times before it was ever ready (last: {status})",
                self.crashes
            );
            return Some(AgentEvent::GaveUp);
        }
        let backoff = restart_backoff(self.crashes);
        error!(
            "AGENT EXITED (pid {}): {status}; restarting it in {backoff:?} (exit {} in a row); \
             the workers keep serving",
            r.pid, self.crashes
        );
        self.restart_at = Some(Instant::now() + backoff);
        None
    }

    fn start_or_retry(&mut self, ctx: &SpawnContext<'_>) {
        if let Err(e) = self.spawn(ctx) {
            self.crashes += 1;
            let backoff = restart_backoff(self.crashes);
            error!("AGENT: cannot start it: {e:#}; trying again in {backoff:?}");
            self.restart_at = Some(Instant::now() + backoff);
        }
    }

    /// Restarts, readiness by delay or timeout, and SIGKILL after the grace period.
    pub fn on_timers(&mut self, now: Instant, ctx: &SpawnContext<'_>) -> Option<AgentEvent> {
        if self.restart_at.is_some_and(|t| now >= t) && !self.stopping {
            self.restart_at = None;
            self.start_or_retry(ctx);
        }
        let r = self.running.as_mut()?;
        if let Some(t) = r.kill_at
            && now >= t
        {
            warn!(
                "agent (pid {}) still running {:?} after SIGTERM: SIGKILL",
                r.pid, ctx.grace
            );
            let _ = sys::kill(r.pid, libc::SIGKILL);
            r.kill_at = None;
            return None;
        }
        if r.ready || r.kill_at.is_some() {
            return None;
        }
        if ctx.ready_delay.is_some_and(|d| now >= r.started + d) {
            return self.mark_ready("--ready-delay elapsed");
        }
        if now >= r.started + ctx.ready_timeout {
            warn!(
                "agent signalled no readiness within {:?}; treating it as ready (an agent that \
                 signals nothing wants --ready-delay)",
                ctx.ready_timeout
            );
            return self.mark_ready("--ready-timeout elapsed");
        }
        None
    }

    /// The next instant [`Agent::on_timers`] has something to do.
    pub fn next_deadline(
        &self,
        ctx_delay: Option<Duration>,
        ready_timeout: Duration,
    ) -> Option<Instant> {
        let mut next = self.restart_at;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        if let Some(r) = &self.running {
            if let Some(t) = r.kill_at {
                consider(t);
            }
            if !r.ready && r.kill_at.is_none() {
                if let Some(d) = ctx_delay {
                    consider(r.started + d);
                }
                consider(r.started + ready_timeout);
            }
        }
        next
    }

    /// SIGHUP: stop the agent and start it again (of generation `generation`); its readiness
    /// reports [`AgentEvent::Ready`] with `reloaded`. An agent that is down (waiting for its
    /// restart) is started at once.
    pub fn reload(&mut self, generation: u64, grace: Duration, ctx: &SpawnContext<'_>) {
        self.generation = generation;
        self.reload_started = true;
        match &mut self.running {
            Some(r) => {
                info!("SIGHUP: reloading the agent (pid {}) first", r.pid);
                self.reloading = true;
                r.kill_at = Some(Instant::now() + grace);
                let _ = sys::kill(r.pid, libc::SIGTERM);
            }
            None => {
                // Down and waiting for its restart: start the new one now.
                self.restart_at = None;
                self.start_or_retry(ctx);
            }
        }
    }

    /// Shutdown, after the workers exited: SIGTERM, SIGKILL after `grace`. Returns whether
    /// there is a process to wait for.
    pub fn stop(&mut self, grace: Duration) -> bool {
        if self.stopping {
            return self.running.is_some();
        }
        self.stopping = true;
        self.restart_at = None;
        match &mut self.running {
            Some(r) => {
                info!("stopping the agent (pid {})", r.pid);
                r.kill_at = Some(Instant::now() + grace);
                let _ = sys::kill(r.pid, libc::SIGTERM);
                true
            }
            None => false,
        }
    }

    /// SIGKILL at once (a second stop signal, or the master failing).
    pub fn kill(&mut self) {
        if let Some(r) = &self.running {
            let _ = sys::kill(r.pid, libc::SIGKILL);
        }
    }

    /// One status line.
    pub fn log_status(&self) {
        match &self.running {
            Some(r) => info!(
                "status: agent pid {} {} up {:.1?}, {} exits in a row",
                r.pid,
                if r.ready { "Ready" } else { "Starting" },
                r.started.elapsed(),
                self.crashes
            ),
            None => info!(
                "status: agent down, restart {}",
                match self.restart_at {
                    Some(t) => format!("in {:.1?}", t.saturating_duration_since(Instant::now())),
                    None => "not scheduled".into(),
                }
            ),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = sys::kill(r.pid, libc::SIGKILL);
            let _ = sys::waitpid_blocking(r.pid);
        }
    }
}
