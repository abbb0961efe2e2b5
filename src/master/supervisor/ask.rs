//! The supervisor's side of the control socket, the metrics endpoint and worker output capture,
//! on the main thread: [`Hooks`] holds what they need (the control server, the metrics server,
//! the pid file, clients waiting for a reload, the output capture thread's handle), and `on_asks` answers each [`Ask`] at once — a status is the
//! supervisor's view (from the lifecycle) plus a receiver for the acceptor's copy of its table,
//! merged on the asking thread; a reload is answered when the lifecycle counts it completed or
//! aborted.

use std::path::PathBuf;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use log::info;
use serde_json::json;

use super::{Command, Input, Mode, Supervisor};
use crate::cli::WorkerOutput;
use crate::master::control::{self, Answer, Ask, Request};
use crate::master::lifecycle::{Phase, SlotState, WorkerState};
use crate::master::logs;
use crate::master::status::{SupervisorView, SupervisorWorker};
use crate::policy::PolicyKind;
use crate::sys;

/// How long the master waits at exit for the workers' last output lines.
const CAPTURE_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Control and metrics state kept by the supervisor.
#[derive(Default)]
pub(super) struct Hooks {
    asks: Option<Receiver<Ask>>,
    control: Option<control::Server>,
    metrics: Option<crate::master::metrics::Server>,
    pid_file: Option<PathBuf>,
    /// Clients waiting for a reload to reach a generation.
    reload_waiters: Vec<(u64, Sender<Answer>)>,
    /// Aborted reloads already reported to waiters.
    aborts_seen: u64,
    started: Option<Instant>,
    name: String,
    capture: Option<logs::Capture>,
    /// Output capture could not start: workers inherit the master's stdout and stderr.
    capture_failed: bool,
}

impl Drop for Hooks {
    fn drop(&mut self) {
        if let Some(c) = &self.capture {
            c.flush(CAPTURE_FLUSH_TIMEOUT);
        }
        if let Some(path) = &self.pid_file {
            // Only our own pid file: another master may have been started with the same path.
            let ours = std::fs::read_to_string(path)
                .is_ok_and(|text| text.trim() == sys::getpid().to_string());
            if ours {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl Supervisor {
    /// Opens the control socket, the metrics endpoint and the pid file (after the listeners
    /// are bound, so the default name can be the first port).
    pub(super) fn open_hooks(&mut self) -> anyhow::Result<()> {
        let name = match &self.config.name {
            Some(n) => n.clone(),
            None => self.addrs.first().map_or(0, |a| a.port()).to_string(),
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let asker = control::Asker::new(tx, std::sync::Arc::clone(&self.waker));
        self.hooks.started = Some(Instant::now());
        self.hooks.asks = Some(rx);
        self.hooks.control = control::open(self.config.control.as_deref(), &name, asker.clone())
            .map_err(crate::cli::UsageError)?;
        if let Some(addr) = self.config.metrics {
            let server = crate::master::metrics::Server::start(addr, asker)
                .map_err(|e| anyhow::anyhow!("failed to serve metrics on {addr}: {e}"))?;
            self.hooks.metrics = Some(server);
        }
        self.hooks.name = name;
        if let Some(path) = &self.config.pid_file {
            std::fs::write(path, format!("{}\n", sys::getpid())).map_err(|e| {
                anyhow::anyhow!("cannot write the pid file {}: {e}", path.display())
            })?;
            self.hooks.pid_file = Some(path.clone());
        }
        Ok(())
    }

    /// `--worker-output capture`: a new worker's stdout and stderr pipes (`None`: inherit).
    pub(super) fn output_pipes(&mut self) -> Option<logs::Pipes> {
        if self.config.worker_output != WorkerOutput::Capture || self.hooks.capture_failed {
            return None;
        }
        if self.hooks.capture.is_none() {
            match logs::Capture::start() {
                Ok(c) => self.hooks.capture = Some(c),
                Err(e) => {
                    log::error!("cannot capture worker output ({e}); workers inherit stderr");
                    self.hooks.capture_failed = true;
                    return None;
                }
            }
        }
        logs::Pipes::new()
            .map_err(|e| log::warn!("no output pipes for a worker ({e}); it inherits stderr"))
            .ok()
    }

    /// Hands a spawned worker's pipe read ends to the capture thread; the write ends, now the
    /// worker's, are closed here.
    pub(super) fn capture_output(&mut self, slot: usize, pid: sys::Pid, pipes: logs::Pipes) {
        let logs::Pipes { stdout, stderr } = pipes;
        if let Some(c) = &self.hooks.capture {
            c.add(slot, pid, stdout.0, stderr.0);
        }
    }

    /// SIGUSR2: logs the acceptor's per-worker tables as one JSON line (what `ctl dump` prints),
    /// from a short-lived thread so the supervisor does not wait for the acceptor.
    pub(super) fn log_dump(&self) {
        let Some(a) = &self.acceptor else {
            info!("dump: no acceptor in {} mode", self.mode_name());
            return;
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        a.send(Command::Snapshot(tx));
        let spawned = std::thread::Builder::new()
            .name("dump".into())
            .spawn(
                move || match rx.recv_timeout(std::time::Duration::from_secs(5)) {
                    Ok(snapshot) => info!("dump: {}", control::dump_json(snapshot)),
                    Err(_) => log::warn!("dump: the acceptor did not answer"),
                },
            );
        if let Err(e) = spawned {
            log::warn!("dump: cannot start a thread: {e}");
        }
    }

    /// Answers clients waiting for a reload that ended, then every request waiting from the
    /// control socket and the metrics endpoint.
    pub(super) fn on_asks(&mut self) {
        self.answer_reload_waiters();
        let asks: Vec<Ask> = match &self.hooks.asks {
            Some(rx) => rx.try_iter().collect(),
            None => return,
        };
        for ask in asks {
            self.on_ask(ask);
        }
    }

    fn on_ask(&mut self, ask: Ask) {
        let Ask {
            request,
            peer_pid,
            reply,
        } = ask;
        let stopping = self.lifecycle.phase() != Phase::Running;
        let answer = match request {
            Request::Status | Request::Dump => {
                let acc = self.acceptor.as_ref().map(|a| {
                    let (tx, rx) = crossbeam_channel::bounded(1);
                    a.send(Command::Snapshot(tx));
                    rx
                });
                Answer::View(Box::new(self.view()), acc)
            }
            Request::Reload | Request::Scale { .. } | Request::Recycle { .. } if stopping => {
                Answer::Failed("the master is stopping".into())
            }
            Request::Reload => {
                info!("ctl reload (from pid {peer_pid})");
                let before = self.lifecycle.counts().clone();
                let was_reloading = self.lifecycle.reloading();
                let generation = self.lifecycle.generation();
                self.feed(Input::Reload);
                let after = self.lifecycle.counts().clone();
                if after.reloads_aborted != before.reloads_aborted {
                    self.hooks.aborts_seen = after.reloads_aborted;
                    Answer::Failed(format!("reload aborted: {}", after.last_abort))
                } else {
                    // A reload asked for during another runs after it: wait for the next
                    // generation.
                    let target = if was_reloading {
                        generation + 1
                    } else {
                        self.lifecycle.generation()
                    };
                    self.hooks.reload_waiters.push((target, reply));
                    self.answer_reload_waiters();
                    return;
                }
            }
            Request::Scale { workers } => self.scale_to(workers, peer_pid),
            Request::Stop => {
                if !stopping {
                    info!("ctl stop (from pid {peer_pid})");
                    self.feed(Input::Stop { signal: "ctl stop" });
                }
                Answer::Done(json!({"stopping": true, "pid": sys::getpid()}))
            }
            Request::Recycle { slot } => self.recycle_slot(slot, peer_pid),
            Request::Policy { name } => self.switch_policy(&name, peer_pid),
        };
        let _ = reply.send(answer);
    }

    /// Answers the clients waiting for a reload that completed or aborted.
    fn answer_reload_waiters(&mut self) {
        if self.hooks.reload_waiters.is_empty() {
            return;
        }
        let counts = self.lifecycle.counts().clone();
        let aborted = counts.reloads_aborted != self.hooks.aborts_seen;
        self.hooks.aborts_seen = counts.reloads_aborted;
        let waiters = std::mem::take(&mut self.hooks.reload_waiters);
        for (target, reply) in waiters {
            if aborted {
                let _ = reply.send(Answer::Failed(format!(
                    "reload aborted: {}",
                    counts.last_abort
                )));
            } else if counts.reloads > 0 && counts.reloaded_generation >= target {
                let _ = reply.send(self.reload_answer(counts.reloaded_generation));
            } else {
                self.hooks.reload_waiters.push((target, reply));
            }
        }
    }

    fn reload_answer(&self, generation: u64) -> Answer {
        let pids: Vec<sys::Pid> = self
            .lifecycle
            .workers()
            .iter()
            .filter(|w| w.generation == generation)
            .filter(|w| !matches!(w.state, WorkerState::Draining { .. }))
            .filter_map(|w| w.pid)
            .collect();
        Answer::Done(json!({"generation": generation, "pids": pids}))
    }

    fn active_slots(&self) -> usize {
        self.lifecycle
            .slots()
            .iter()
            .filter(|s| s.state != SlotState::Removed)
            .count()
    }

    fn scale_to(&mut self, want: usize, peer_pid: sys::Pid) -> Answer {
        if want == 0 || want > crate::cli::MAX_WORKERS {
            return Answer::Failed(format!(
                "scale {want}: the worker count must be 1 to {}",
                crate::cli::MAX_WORKERS
            ));
        }
        info!("ctl scale {want} (from pid {peer_pid})");
        let mut before = self.active_slots();
        while self.active_slots() < want {
            self.scale_up();
            if self.active_slots() == before {
                break;
            }
            before = self.active_slots();
        }
        while self.active_slots() > want {
            self.feed(Input::ScaleDown);
            if self.active_slots() == before {
                break;
            }
            before = self.active_slots();
        }
        let now = self.active_slots();
        if now != want {
            return Answer::Failed(format!("scale {want}: running {now} workers"));
        }
        Answer::Done(json!({"workers": now}))
    }

    fn recycle_slot(&mut self, slot: usize, peer_pid: sys::Pid) -> Answer {
        let replacements = self.lifecycle.replacements();
        let Some(old) = self
            .lifecycle
            .workers()
            .iter()
            .filter(|w| w.slot == slot)
            .filter(|w| matches!(w.state, WorkerState::Ready | WorkerState::Starting))
            .filter(|w| !replacements.iter().any(|r| r.new == w.id))
            .min_by_key(|w| w.id)
        else {
            return Answer::Failed(format!("no running worker in slot {slot}"));
        };
        let (id, pid) = (old.id, old.pid.unwrap_or(0));
        if replacements.iter().any(|r| r.old == id) {
            return Answer::Failed(format!("worker {slot} is already being replaced"));
        }
        info!("ctl recycle {slot} (from pid {peer_pid})");
        self.feed(Input::Recycle { id });
        let new = self
            .lifecycle
            .replacements()
            .iter()
            .find(|r| r.old == id)
            .map(|r| r.new);
        let Some(new) = new else {
            return Answer::Failed(format!("could not start a replacement for worker {slot}"));
        };
        let new_pid = self.lifecycle.worker(new).and_then(|w| w.pid).unwrap_or(0);
        Answer::Done(json!({"slot": slot, "old_pid": pid, "new_pid": new_pid}))
    }

    fn switch_policy(&mut self, name: &str, peer_pid: sys::Pid) -> Answer {
        let Some(kind) = PolicyKind::ALL
            .into_iter()
            .find(|k| k.name() == name || k.aliases().contains(&name))
        else {
            return Answer::Failed(format!(
                "unknown policy '{name}' (dispatch policies: round-robin, least-conn, least-mem, p2c)"
            ));
        };
        let previous = self.config.policy;
        if let Some(st) = &mut self.steer {
            // Kernel steering: the program switches; the workers' mode (reuseport) stays.
            if kind.mode() != Mode::Dispatch {
                return Answer::Failed(format!(
                    "cannot switch from {previous} to {kind} at run time: under kernel steering \
                     only the program's policies (round-robin, least-conn, least-mem, p2c) switch"
                ));
            }
            if let Err(e) = st.set_policy(kind) {
                return Answer::Failed(e);
            }
            info!("ctl policy {kind} (was {previous}; kernel-steered; from pid {peer_pid})");
            return self.policy_switched(kind, previous);
        }
        if self.mode != Mode::Dispatch || kind.mode() != Mode::Dispatch {
            return Answer::Failed(format!(
                "cannot switch from {previous} to {kind} at run time: only dispatch policies \
                 (round-robin, least-conn, least-mem, p2c) switch; reuseport and shared are \
                 chosen at start"
            ));
        }
        let Some(policy) = kind.build() else {
            return Answer::Failed(format!("{kind} builds no dispatch policy"));
        };
        info!("ctl policy {kind} (was {previous}; from pid {peer_pid})");
        self.send(Command::SetPolicy(policy));
        self.policy_switched(kind, previous)
    }

    /// Records a switched policy and starts RSS sampling if it needs it.
    fn policy_switched(&mut self, kind: PolicyKind, previous: PolicyKind) -> Answer {
        self.config.policy = kind;
        if kind.needs_rss() && self.next_rss_sample.is_none() {
            self.next_rss_sample = Some(Instant::now());
        }
        Answer::Done(json!({"policy": kind.name(), "previous": previous.name()}))
    }

    /// What the supervisor knows, for status and metrics.
    fn view(&self) -> SupervisorView {
        let queue = |sockets: &mut dyn Iterator<Item = &socket2::Socket>| {
            let mut total: Option<(u32, u32)> = None;
            for s in sockets {
                if let Ok((q, l)) = sys::listen_queue(std::os::fd::AsFd::as_fd(s)) {
                    let t = total.get_or_insert((0, 0));
                    t.0 += q;
                    t.1 += l;
                }
            }
            total
        };
        let listen_queues = (0..self.addrs.len())
            .map(|i| match self.mode {
                Mode::Dispatch => None,
                Mode::Shared => queue(&mut self.sockets.get(i).into_iter()),
                Mode::Reuseport => queue(&mut self.slots.iter().filter_map(|s| s.reuseport.get(i))),
            })
            .collect();
        let slots = self.lifecycle.slots();
        let now = Instant::now();
        let counts = self.lifecycle.counts();
        SupervisorView {
            name: self.hooks.name.clone(),
            pid: sys::getpid(),
            policy: self.config.policy.name().to_string(),
            mode: self.mode_name().to_string(),
            listeners: self.addrs.iter().map(|a| a.to_string()).collect(),
            generation: self.lifecycle.generation(),
            uptime: self.hooks.started.map(|t| t.elapsed()).unwrap_or_default(),
            workers: self
                .lifecycle
                .workers()
                .iter()
                .filter_map(|w| {
                    Some(SupervisorWorker {
                        id: w.id,
                        slot: w.slot,
                        pid: w.pid?,
                        generation: w.generation,
                        state: match w.state {
                            WorkerState::Starting => "starting",
                            WorkerState::Ready => "ready",
                            WorkerState::Stopping { .. } => "stopping",
                            WorkerState::Draining { .. } => "draining",
                        },
                        uptime: now.saturating_duration_since(w.started),
                        restarts: slots.get(w.slot).map_or(0, |s| s.restarts),
                    })
                })
                .collect(),
            slots: self.active_slots(),
            given_up: slots
                .iter()
                .filter(|s| matches!(s.state, SlotState::GaveUp { .. }))
                .count(),
            reloads: counts.reloads,
            reloads_aborted: counts.reloads_aborted,
            restarts: slots.iter().map(|s| s.restarts).sum(),
            reloading: self.lifecycle.reloading(),
            stopping: self.lifecycle.phase() != Phase::Running,
            listen_queues,
            log_lines_dropped: logs::dropped(),
            steering: self.steer.as_ref().map(|st| st.status()),
        }
    }
}
