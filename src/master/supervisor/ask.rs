//! The supervisor's side of the control socket and the metrics endpoint, on the main thread:
//! [`Hooks`] holds what they need (the control server, the pid file, clients waiting for a
//! reload), and `on_asks` answers each [`Ask`] at once — a status is the supervisor's own view
//! plus a receiver for the acceptor's copy of its table, merged on the asking thread; a reload
//! is answered when it completes or aborts (`reload_finished`).

use std::path::PathBuf;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use log::info;
use serde_json::json;

use super::{Command, Lifecycle, Mode, Reason, Supervisor};
use crate::master::control::{self, Answer, Ask, Request};
use crate::master::status::{SupervisorView, SupervisorWorker};
use crate::policy::PolicyKind;
use crate::sys;

/// Control and metrics state kept by the supervisor.
#[derive(Default)]
pub(super) struct Hooks {
    asks: Option<Receiver<Ask>>,
    control: Option<control::Server>,
    metrics: Option<crate::master::metrics::Server>,
    pid_file: Option<PathBuf>,
    /// Clients waiting for a reload to reach a generation.
    reload_waiters: Vec<(u64, Sender<Answer>)>,
    reloads: u64,
    reloads_aborted: u64,
    last_abort: String,
    started: Option<Instant>,
    name: String,
}

impl Drop for Hooks {
    fn drop(&mut self) {
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

    /// Answers every request waiting from the control socket and the metrics endpoint.
    pub(super) fn on_asks(&mut self) {
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
        let stopping = self.shutdown_deadline.is_some();
        let answer = match request {
            Request::Status | Request::Dump => {
                let acc = self.acceptor.as_ref().map(|a| {
                    let (tx, rx) = crossbeam_channel::bounded(1);
                    a.send(Command::Snapshot(tx));
                    rx
                });
                Answer::View(Box::new(self.view()), acc)
            }
            Request::Reload if stopping => Answer::Failed("the master is stopping".into()),
            Request::Reload => {
                info!("ctl reload (from pid {peer_pid})");
                let (done, aborted) = (self.hooks.reloads, self.hooks.reloads_aborted);
                self.request_reload();
                if self.hooks.reloads_aborted != aborted {
                    Answer::Failed(format!("reload aborted: {}", self.hooks.last_abort))
                } else if self.hooks.reloads != done && !self.reload_requested {
                    self.reload_answer()
                } else {
                    let target = self.generation + u64::from(self.reload_requested);
                    self.hooks.reload_waiters.push((target, reply));
                    return;
                }
            }
            Request::Scale { .. } | Request::Recycle { .. } if stopping => {
                Answer::Failed("the master is stopping".into())
            }
            Request::Scale { workers } => self.scale_to(workers, peer_pid),
            Request::Stop => {
                if !stopping {
                    info!("ctl stop (from pid {peer_pid})");
                    self.begin_shutdown(libc::SIGTERM);
                }
                Answer::Done(json!({"stopping": true, "pid": sys::getpid()}))
            }
            Request::Recycle { slot } => self.recycle_slot(slot, peer_pid),
            Request::Policy { name } => self.switch_policy(&name, peer_pid),
        };
        let _ = reply.send(answer);
    }

    /// Called when a reload completed (`Ok`) or aborted.
    pub(super) fn reload_finished(&mut self, result: Result<(), &str>) {
        match result {
            Ok(()) => self.hooks.reloads += 1,
            Err(why) => {
                self.hooks.reloads_aborted += 1;
                self.hooks.last_abort = why.to_string();
            }
        }
        let waiters = std::mem::take(&mut self.hooks.reload_waiters);
        for (target, reply) in waiters {
            match result {
                Ok(()) if self.generation >= target => {
                    let _ = reply.send(self.reload_answer());
                }
                Ok(()) => self.hooks.reload_waiters.push((target, reply)),
                Err(why) => {
                    let _ = reply.send(Answer::Failed(format!("reload aborted: {why}")));
                }
            }
        }
    }

    fn reload_answer(&self) -> Answer {
        let pids: Vec<sys::Pid> = self
            .workers
            .iter()
            .filter(|w| w.generation == self.generation && w.state != Lifecycle::Draining)
            .map(|w| w.pid)
            .collect();
        Answer::Done(json!({"generation": self.generation, "pids": pids}))
    }

    fn scale_to(&mut self, want: usize, peer_pid: sys::Pid) -> Answer {
        if want == 0 || want > crate::cli::MAX_WORKERS {
            return Answer::Failed(format!(
                "scale {want}: the worker count must be 1 to {}",
                crate::cli::MAX_WORKERS
            ));
        }
        info!("ctl scale {want} (from pid {peer_pid})");
        let active = |s: &Supervisor| s.slots.iter().filter(|s| s.active).count();
        let mut before = active(self);
        while active(self) < want {
            self.scale_up();
            if active(self) == before {
                break;
            }
            before = active(self);
        }
        while active(self) > want {
            self.scale_down();
            if active(self) == before {
                break;
            }
            before = active(self);
        }
        let now = active(self);
        if now != want {
            return Answer::Failed(format!("scale {want}: running {now} workers"));
        }
        Answer::Done(json!({"workers": now}))
    }

    fn recycle_slot(&mut self, slot: usize, peer_pid: sys::Pid) -> Answer {
        let Some(old) = self
            .workers
            .iter()
            .filter(|w| w.slot == slot && w.state != Lifecycle::Draining)
            .filter(|w| !self.replacements.iter().any(|r| r.new == w.id))
            .min_by_key(|w| w.id)
        else {
            return Answer::Failed(format!("no running worker in slot {slot}"));
        };
        let (id, pid) = (old.id, old.pid);
        if self.replacements.iter().any(|r| r.old == id) {
            return Answer::Failed(format!("worker {slot} is already being replaced"));
        }
        self.replace(
            id,
            Reason::Recycle,
            &format!("ctl recycle (from pid {peer_pid})"),
        );
        let Some(new) = self
            .replacements
            .iter()
            .find(|r| r.old == id)
            .map(|r| r.new)
        else {
            return Answer::Failed(format!("could not start a replacement for worker {slot}"));
        };
        let new_pid = self.index_of(new).map(|i| self.workers[i].pid).unwrap_or(0);
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
        SupervisorView {
            name: self.hooks.name.clone(),
            pid: sys::getpid(),
            policy: self.config.policy.name().to_string(),
            mode: self.mode.as_str().to_string(),
            listeners: self.addrs.iter().map(|a| a.to_string()).collect(),
            generation: self.generation,
            uptime: self.hooks.started.map(|t| t.elapsed()).unwrap_or_default(),
            workers: self
                .workers
                .iter()
                .map(|w| SupervisorWorker {
                    id: w.id,
                    slot: w.slot,
                    pid: w.pid,
                    generation: w.generation,
                    state: match w.state {
                        Lifecycle::Starting => "starting",
                        Lifecycle::Ready => "ready",
                        Lifecycle::Draining => "draining",
                    },
                    uptime: w.started.elapsed(),
                    restarts: self.slots.get(w.slot).map_or(0, |s| s.restarts),
                })
                .collect(),
            slots: self.slots.iter().filter(|s| s.active).count(),
            given_up: self.slots.iter().filter(|s| s.active && s.given_up).count(),
            reloads: self.hooks.reloads,
            reloads_aborted: self.hooks.reloads_aborted,
            restarts: self.slots.iter().map(|s| s.restarts).sum(),
            reloading: self.reload_running,
            stopping: self.shutdown_deadline.is_some(),
            listen_queues,
            log_lines_dropped: 0,
        }
    }
}
