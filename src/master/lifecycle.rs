//! The worker lifecycle as a pure state machine: every decision the master takes about its
//! worker processes — start, ready, restart with backoff, give up and retry, rolling reload,
//! recycle, scale, drain, stop — and nothing else. It performs no I/O: it takes an [`Input`]
//! (a signal, an exit, a worker's READY or STOPPING, a stall, a timer tick) together with the
//! current time, and answers with [`Action`]s (spawn, open or close dispatch, send a signal,
//! exit) that the supervisor carries out. Time comes only from the `now` passed in, so tests
//! drive it with a fake clock, no processes and no sleeps.
//!
//! It is the one source of truth for a worker's state ([`WorkerState`]), a slot's
//! ([`SlotState`]) and the master's ([`Phase`]); the acceptor only applies what it is told
//! ([`Action::Open`], [`Action::Close`]). docs/LIFECYCLE.md draws the states and ties each
//! transition to the function here that makes it.
//!
//! Runs on the master's main thread, inside the supervisor; owns no fd.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use rcluster_sys::{ExitStatus, Pid};

/// Identifies one worker process for its whole life (slots are reused, ids are not).
pub type WorkerId = u64;

/// First restart delay after a crash; doubles per consecutive crash.
pub const RESTART_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest restart delay.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A worker that stayed up this long resets its slot's crash count.
pub const STABLE_UPTIME: Duration = Duration::from_secs(10);
/// Consecutive short-lived crashes after which a slot is given up (for now).
pub const CRASH_LOOP_LIMIT: u32 = 5;
/// How often a given-up slot is tried again (SIGHUP tries at once).
pub const GIVE_UP_RETRY: Duration = Duration::from_secs(30);

/// The restart delay after the `crashes`-th consecutive crash (1-based): 100 ms, 200 ms, 400 ms …
/// capped at [`RESTART_BACKOFF_MAX`]. The one place the backoff is computed.
pub fn restart_backoff(crashes: u32) -> Duration {
    let doublings = crashes.saturating_sub(1).min(16);
    RESTART_BACKOFF_INITIAL
        .saturating_mul(1 << doublings)
        .min(RESTART_BACKOFF_MAX)
}

/// The numbers the lifecycle needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Worker slots at start.
    pub workers: usize,
    /// Stop: how long the whole stop may take before SIGKILL. Drain: how long after the drain
    /// signal before SIGKILL. STOPPING: how long a worker may stay stopping before it is
    /// replaced.
    pub grace: Duration,
    /// A worker that signals nothing is ready this long after its start.
    pub ready_delay: Option<Duration>,
    /// How long a starting worker may take to become ready.
    pub ready_timeout: Duration,
    /// Workers a reload replaces at a time (at least 1).
    pub reload_batch: usize,
    /// Recycle a ready worker whose RSS exceeds this many bytes.
    pub max_rss: Option<u64>,
    /// Dispatch mode: on stop, first stop accepting and give the workers up to half the grace
    /// period to take what is queued in their channels, then send the stop signal.
    pub drain_channels_on_stop: bool,
    /// The drain signal's name, for logs.
    pub drain_signal: &'static str,
    /// The stop signal's name (`--stop-signal`), for logs.
    pub stop_signal: &'static str,
}

/// Where a worker process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Spawned, not yet ready (no READY, no READY=1, `--ready-delay` not elapsed). Dispatch
    /// goes to it only while no worker is ready.
    Starting,
    /// Takes connections.
    Ready,
    /// The worker said STOPPING (it closed its listener): no dispatch. READY makes it
    /// [`WorkerState::Ready`] again; an exit with status 0 is a planned exit, replaced at once
    /// and not counted as a crash; still stopping after the grace period, it is replaced.
    Stopping {
        /// When it said STOPPING.
        since: Instant,
    },
    /// The master is retiring it (reload, recycle, scale-down, stop): no dispatch, the drain
    /// signal was sent, SIGKILL at `kill_at` (`None` once sent, or while stopping, where the
    /// stop's own deadline applies). Final.
    Draining {
        /// When to SIGKILL it.
        kill_at: Option<Instant>,
    },
}

/// What a slot is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Has a worker (starting, ready or on its way out with a replacement).
    Running,
    /// Its worker crashed; the next one starts at `at`.
    Restarting {
        /// When to start it.
        at: Instant,
    },
    /// Crash-looped: tried again at `retry_at` (or at SIGHUP).
    GaveUp {
        /// When to try again.
        retry_at: Instant,
    },
    /// Scaled down (SIGTTOU): never started again.
    Removed,
}

/// One worker slot (`RCLUSTER_WORKER_ID`).
#[derive(Debug, Clone)]
pub struct Slot {
    /// What it is doing.
    pub state: SlotState,
    /// Consecutive short-lived crashes.
    pub crashes: u32,
    /// Restarts scheduled after crashes, in all (for status and metrics).
    pub restarts: u64,
}

/// One worker process as the lifecycle knows it.
#[derive(Debug, Clone)]
pub struct Worker {
    /// Its id.
    pub id: WorkerId,
    /// Its slot.
    pub slot: usize,
    /// The reload generation it was started in.
    pub generation: u64,
    /// Its pid, once spawned.
    pub pid: Option<Pid>,
    /// Where it is.
    pub state: WorkerState,
    /// When it was spawned.
    pub started: Instant,
}

/// The master's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving: workers are started, restarted, reloaded and scaled.
    Running,
    /// Stopping: nothing is started; the workers get the stop signal at `signal_at` (dispatch
    /// mode: once the acceptor reports the channels drained, at the latest half the grace
    /// period in), SIGKILL at `kill_at` (`None` once sent).
    Stopping {
        /// When to send the stop signal (`None` once sent).
        signal_at: Option<Instant>,
        /// When to SIGKILL what is left (`None` once sent).
        kill_at: Option<Instant>,
    },
}

/// Why a worker is being replaced by a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A rolling reload (SIGHUP): a failure aborts the reload.
    Reload,
    /// Recycling one worker (max-conns, max-rss, stalled, stuck stopping): a failure keeps the
    /// old one.
    Recycle,
}

/// A replacement in progress: `new` is starting in `old`'s slot; `old` is drained once `new`
/// is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replacement {
    /// The new worker.
    pub new: WorkerId,
    /// The worker it replaces.
    pub old: WorkerId,
    /// Why.
    pub reason: Reason,
    /// `new` must be ready by then.
    pub deadline: Instant,
}

/// A rolling reload in progress.
#[derive(Debug, Clone, Default)]
struct ReloadRun {
    /// Old workers still to replace.
    queue: VecDeque<WorkerId>,
    /// SIGHUP arrived during this reload: run one more when it completes.
    again: bool,
}

/// Which signal to send; the supervisor maps it to the configured signal number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    /// `--drain-signal`: finish what you have, take nothing new, exit.
    Drain,
    /// The stop signal (`--stop-signal`, SIGTERM by default), sent to every worker when the
    /// master stops.
    Stop,
    /// SIGKILL.
    Kill,
}

/// Something that happened, for the lifecycle to decide on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Start one worker per slot.
    Start,
    /// [`Action::Spawn`] succeeded.
    Spawned {
        /// The worker.
        id: WorkerId,
        /// Its pid.
        pid: Pid,
    },
    /// [`Action::Spawn`] failed (fork, exec, or the command is missing).
    SpawnFailed {
        /// The worker that could not be started.
        id: WorkerId,
        /// Why, for the log.
        error: String,
    },
    /// The worker is ready (READY on its channel, `READY=1`).
    Ready {
        /// The worker.
        id: WorkerId,
        /// How the master learned it, for the log.
        how: &'static str,
    },
    /// The worker said STOPPING (on its channel or `STOPPING=1`).
    Stopping {
        /// The worker.
        id: WorkerId,
    },
    /// The worker exited and was reaped.
    Exited {
        /// The worker.
        id: WorkerId,
        /// How.
        status: ExitStatus,
    },
    /// The worker stopped taking connections (stall detection).
    Stalled {
        /// The worker.
        id: WorkerId,
    },
    /// A health check failed the worker: its heartbeats on the message bus stopped for
    /// `--heartbeat-timeout`, or it failed `--health-fails` active probes in a row.
    Unhealthy {
        /// The worker.
        id: WorkerId,
        /// Which check, for the log.
        why: &'static str,
    },
    /// The worker was handed its `--max-conns` connections.
    MaxConns {
        /// The worker.
        id: WorkerId,
    },
    /// `ctl recycle`: replace the worker (the new one starts first).
    Recycle {
        /// The worker.
        id: WorkerId,
    },
    /// The worker broke the channel protocol repeatedly (accounting's violation limit).
    Misbehaving {
        /// The worker.
        id: WorkerId,
    },
    /// A resident-memory sample.
    Rss {
        /// The worker.
        id: WorkerId,
        /// Resident bytes.
        bytes: u64,
    },
    /// SIGHUP: rolling reload (and retry given-up slots now).
    Reload,
    /// SIGTTIN: one more slot (the supervisor has prepared its resources).
    ScaleUp,
    /// SIGTTOU: one slot fewer.
    ScaleDown,
    /// SIGTERM/SIGINT/SIGQUIT: stop (a second one kills at once).
    Stop {
        /// The signal's name, for the log.
        signal: &'static str,
    },
    /// Dispatch mode, stopping: the acceptor reports every dispatched connection taken.
    Drained,
    /// Time passed: run what is due.
    Tick,
}

/// What the supervisor must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start worker `id` in `slot`; answer with [`Input::Spawned`] or [`Input::SpawnFailed`].
    Spawn {
        /// The new worker's id.
        id: WorkerId,
        /// Its slot.
        slot: usize,
        /// Its generation.
        generation: u64,
    },
    /// Dispatch to the worker from now on.
    Open(WorkerId),
    /// Dispatch nothing more to the worker and take back what is queued for it.
    Close(WorkerId),
    /// Send a signal to the worker.
    Signal(WorkerId, Sig),
    /// The worker is gone: forget it (take back what is queued, drop its channels).
    Forget(WorkerId),
    /// A crash-looping slot was given up until its next retry (every 30 s, or SIGHUP); no
    /// worker serves it meanwhile.
    SlotGaveUp(usize),
    /// A scaled-down slot (SIGTTOU) begins to drain. It is never started again, so what
    /// only its workers use can be released now: the master's copies of its reuseport
    /// sockets, which then leave the kernel's group as soon as the draining worker closes
    /// its own (at the latest when it exits), before the exit is reported.
    SlotRemoved(usize),
    /// Stopping in dispatch mode: stop accepting, let the workers take what is queued for up
    /// to `drain_for`, then report [`Input::Drained`].
    StopAccepting {
        /// Longest wait for the channels to empty.
        drain_for: Duration,
    },
    /// The master is done: `Ok` after a stop, `Err` when no worker can ever run.
    Exit(Result<(), String>),
}

/// Running totals of reloads, for status, metrics and `ctl reload`'s answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Reloads completed.
    pub reloads: u64,
    /// The generation the last completed reload reached.
    pub reloaded_generation: u64,
    /// Reloads aborted.
    pub reloads_aborted: u64,
    /// Why the last reload aborted.
    pub last_abort: String,
}

/// The lifecycle of every worker of one master.
#[derive(Debug)]
pub struct Lifecycle {
    settings: Settings,
    phase: Phase,
    slots: Vec<Slot>,
    workers: Vec<Worker>,
    replacements: Vec<Replacement>,
    reload: Option<ReloadRun>,
    generation: u64,
    next_id: WorkerId,
    /// Some worker has been ready since the start: the command can run, so a crash loop is an
    /// outage to retry, not a configuration error to exit on.
    ever_ready: bool,
    counts: Counts,
    all_ready_announced: bool,
    exited: bool,
    out: Vec<Action>,
}

impl Lifecycle {
    /// A lifecycle with `settings.workers` slots, nothing started yet ([`Input::Start`]).
    pub fn new(settings: Settings) -> Lifecycle {
        let slots = (0..settings.workers)
            .map(|_| Slot {
                state: SlotState::Running,
                crashes: 0,
                restarts: 0,
            })
            .collect();
        Lifecycle {
            settings,
            phase: Phase::Running,
            slots,
            workers: Vec::new(),
            replacements: Vec::new(),
            reload: None,
            generation: 0,
            next_id: 0,
            ever_ready: false,
            counts: Counts::default(),
            all_ready_announced: false,
            exited: false,
            out: Vec::new(),
        }
    }

    /// Reload totals.
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// The master's phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The current reload generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every live worker (spawned or being spawned, not yet reaped).
    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    /// One live worker.
    pub fn worker(&self, id: WorkerId) -> Option<&Worker> {
        self.workers.iter().find(|w| w.id == id)
    }

    /// Every slot, by slot number.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Replacements in progress.
    pub fn replacements(&self) -> &[Replacement] {
        &self.replacements
    }

    /// Whether a reload is in progress.
    pub fn reloading(&self) -> bool {
        self.reload.is_some()
    }

    /// Whether a SIGTTIN would add a slot (the supervisor prepares the slot's resources first).
    pub fn accepts_scale_up(&self) -> bool {
        self.phase == Phase::Running && !self.exited
    }

    /// Takes one input and returns what to do about it.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Action> {
        if self.exited {
            return Vec::new();
        }
        match input {
            Input::Start => {
                for slot in 0..self.slots.len() {
                    self.spawn(now, slot);
                }
            }
            Input::Spawned { id, pid } => {
                if let Some(w) = self.worker_mut(id) {
                    w.pid = Some(pid);
                }
            }
            Input::SpawnFailed { id, error } => self.spawn_failed(now, id, &error),
            Input::Ready { id, how } => self.mark_ready(now, id, how),
            Input::Stopping { id } => self.stopping(now, id),
            Input::Exited { id, status } => self.exited(now, id, status),
            Input::Stalled { id } => self.replace(now, id, Reason::Recycle, "it stopped accepting"),
            Input::MaxConns { id } => {
                self.replace(now, id, Reason::Recycle, "it reached --max-conns")
            }
            Input::Unhealthy { id, why } => self.replace(now, id, Reason::Recycle, why),
            Input::Recycle { id } => self.replace(now, id, Reason::Recycle, "ctl recycle"),
            Input::Misbehaving { id } => {
                self.replace(now, id, Reason::Recycle, "it broke the channel protocol")
            }
            Input::Rss { id, bytes } => {
                let over = self.settings.max_rss.is_some_and(|max| bytes > max);
                if over
                    && self
                        .worker(id)
                        .is_some_and(|w| w.state == WorkerState::Ready)
                {
                    self.replace(now, id, Reason::Recycle, "its RSS exceeds --max-rss");
                }
            }
            Input::Reload => self.request_reload(now),
            Input::ScaleUp => self.scale_up(now),
            Input::ScaleDown => self.scale_down(now),
            Input::Stop { signal } => self.stop(now, signal),
            Input::Drained => {
                if let Phase::Stopping {
                    signal_at: Some(_), ..
                } = self.phase
                {
                    info!("every dispatched connection was taken; stopping the workers");
                    self.signal_stop(now);
                }
            }
            Input::Tick => self.tick(now),
        }
        self.check_done();
        std::mem::take(&mut self.out)
    }

    /// The earliest instant at which [`Input::Tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        if let Phase::Stopping { signal_at, kill_at } = self.phase {
            consider(signal_at);
            consider(kill_at);
        }
        for s in &self.slots {
            match s.state {
                SlotState::Restarting { at } => consider(Some(at)),
                SlotState::GaveUp { retry_at } => consider(Some(retry_at)),
                SlotState::Running | SlotState::Removed => {}
            }
        }
        for w in &self.workers {
            match w.state {
                WorkerState::Starting => {
                    consider(self.settings.ready_delay.map(|d| at(w.started, d)));
                    consider(Some(at(w.started, self.settings.ready_timeout)));
                }
                WorkerState::Stopping { since } => consider(Some(at(since, self.settings.grace))),
                WorkerState::Draining { kill_at } => consider(kill_at),
                WorkerState::Ready => {}
            }
        }
        for r in &self.replacements {
            consider(Some(r.deadline));
        }
        next
    }

    fn worker_mut(&mut self, id: WorkerId) -> Option<&mut Worker> {
        self.workers.iter_mut().find(|w| w.id == id)
    }

    /// `(slot, pid)` for logs.
    fn who(&self, id: WorkerId) -> (usize, Pid) {
        self.worker(id)
            .map_or((usize::MAX, 0), |w| (w.slot, w.pid.unwrap_or(0)))
    }

    fn spawn(&mut self, now: Instant, slot: usize) -> Option<WorkerId> {
        if self.phase != Phase::Running || self.slots[slot].state == SlotState::Removed {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.slots[slot].state = SlotState::Running;
        self.workers.push(Worker {
            id,
            slot,
            generation: self.generation,
            pid: None,
            state: WorkerState::Starting,
            started: now,
        });
        self.out.push(Action::Spawn {
            id,
            slot,
            generation: self.generation,
        });
        Some(id)
    }

    fn spawn_failed(&mut self, now: Instant, id: WorkerId, why: &str) {
        let Some(i) = self.workers.iter().position(|w| w.id == id) else {
            return;
        };
        let w = self.workers.swap_remove(i);
        if let Some(r) = self.replacements.iter().position(|r| r.new == id) {
            let r = self.replacements.swap_remove(r);
            match r.reason {
                Reason::Reload => {
                    self.abort_reload(now, &format!("the replacement could not be started: {why}"))
                }
                Reason::Recycle => error!(
                    "cannot start a replacement for worker {}: {why}; keeping the old worker",
                    w.slot
                ),
            }
            return;
        }
        error!("cannot start worker {}: {why}", w.slot);
        self.crashed(now, w.slot, "it could not be started");
    }

    /// Counts a crash of `slot` and schedules its restart, or gives it up for now.
    fn crashed(&mut self, now: Instant, slot: usize, what: &str) {
        let s = &mut self.slots[slot];
        if s.state == SlotState::Removed {
            return;
        }
        s.crashes += 1;
        if s.crashes >= CRASH_LOOP_LIMIT {
            s.state = SlotState::GaveUp {
                retry_at: at(now, GIVE_UP_RETRY),
            };
            self.out.push(Action::SlotGaveUp(slot));
            let left = self
                .workers
                .iter()
                .filter(|w| w.state == WorkerState::Ready)
                .count();
            error!(
                "worker {slot} crash-looped ({} exits in a row, last: {what}); giving up on \
                 slot {slot} for now (retried every {GIVE_UP_RETRY:?} and on SIGHUP), {left} \
                 workers left",
                s.crashes
            );
        } else {
            let backoff = restart_backoff(s.crashes);
            s.restarts += 1;
            s.state = SlotState::Restarting {
                at: at(now, backoff),
            };
            warn!("worker {slot}: {what}; restarting in {backoff:?}");
        }
    }

    fn mark_ready(&mut self, now: Instant, id: WorkerId, how: &str) {
        let Some(w) = self.worker_mut(id) else {
            return;
        };
        let again = match w.state {
            WorkerState::Starting => false,
            WorkerState::Stopping { .. } => true,
            WorkerState::Ready | WorkerState::Draining { .. } => return,
        };
        w.state = WorkerState::Ready;
        let (slot, pid, up) = (
            w.slot,
            w.pid.unwrap_or(0),
            now.saturating_duration_since(w.started),
        );
        if again {
            info!("worker {slot} (pid {pid}) is ready again ({how})");
        } else {
            info!("worker {slot} ready: pid {pid} ({how}, after {up:.0?})");
        }
        self.ever_ready = true;
        self.out.push(Action::Open(id));
        if !self.all_ready_announced {
            let ready = self
                .workers
                .iter()
                .filter(|w| w.state == WorkerState::Ready)
                .count();
            let wanted = self
                .slots
                .iter()
                .filter(|s| s.state != SlotState::Removed)
                .count();
            if ready == wanted {
                self.all_ready_announced = true;
                info!("all {ready} workers ready");
            }
        }
        // A replacement that became ready lets its old worker go. That old worker may itself
        // have been a replacement still starting (a recycle that a reload overtook): the worker
        // it was to replace goes too, since the new one now holds the slot.
        if let Some(r) = self.replacements.iter().position(|r| r.new == id) {
            let r = self.replacements.swap_remove(r);
            if let Some(inner) = self.replacements.iter().position(|x| x.new == r.old) {
                let inner = self.replacements.swap_remove(inner);
                self.drain(now, inner.old);
            }
            self.drain(now, r.old);
            self.continue_reload(now);
        }
    }

    fn stopping(&mut self, now: Instant, id: WorkerId) {
        let Some(w) = self.worker_mut(id) else {
            return;
        };
        if !matches!(w.state, WorkerState::Starting | WorkerState::Ready) {
            return;
        }
        w.state = WorkerState::Stopping { since: now };
        let (slot, pid) = (w.slot, w.pid.unwrap_or(0));
        info!("worker {slot} (pid {pid}) is stopping");
        self.out.push(Action::Close(id));
    }

    /// Stops dispatching to a worker, takes back what is queued for it, sends it the drain
    /// signal, and arms the SIGKILL deadline.
    fn drain(&mut self, now: Instant, id: WorkerId) {
        let grace = self.settings.grace;
        let signal = self.settings.drain_signal;
        let Some(w) = self.worker_mut(id) else {
            return;
        };
        if matches!(w.state, WorkerState::Draining { .. }) {
            return;
        }
        w.state = WorkerState::Draining {
            kill_at: Some(at(now, grace)),
        };
        info!(
            "draining worker {} (pid {}, generation {}) with {signal}",
            w.slot,
            w.pid.unwrap_or(0),
            w.generation
        );
        self.out.push(Action::Close(id));
        self.out.push(Action::Signal(id, Sig::Drain));
    }

    /// Starts a replacement for `old` in its slot; `old` is drained once the replacement is
    /// ready, so the slot never goes without a ready worker.
    fn replace(&mut self, now: Instant, old: WorkerId, reason: Reason, why: &str) {
        if self.phase != Phase::Running || self.replacements.iter().any(|r| r.old == old) {
            return;
        }
        let Some(w) = self.worker(old) else {
            return;
        };
        if matches!(w.state, WorkerState::Draining { .. }) {
            return;
        }
        let (slot, pid) = (w.slot, w.pid.unwrap_or(0));
        info!("replacing worker {slot} (pid {pid}): {why}");
        if let Some(new) = self.spawn(now, slot) {
            self.replacements.push(Replacement {
                new,
                old,
                reason,
                deadline: at(now, self.settings.ready_timeout),
            });
        }
    }

    fn exited(&mut self, now: Instant, id: WorkerId, status: ExitStatus) {
        let Some(i) = self.workers.iter().position(|w| w.id == id) else {
            return;
        };
        let w = self.workers.swap_remove(i);
        let pid = w.pid.unwrap_or(0);
        self.out.push(Action::Forget(id));
        if matches!(self.phase, Phase::Stopping { .. })
            || matches!(w.state, WorkerState::Draining { .. })
        {
            info!("worker {} (pid {pid}) exited: {status}", w.slot);
            // A drained replacement (aborted, late, overtaken) replaces nothing any more.
            self.replacements.retain(|r| r.new != id);
            self.continue_reload(now);
            return;
        }
        // A replacement that dies before it is ready fails its reload or recycle.
        if let Some(r) = self.replacements.iter().position(|r| r.new == id) {
            let r = self.replacements.swap_remove(r);
            error!(
                "replacement worker {} (pid {pid}) exited before it was ready: {status}",
                w.slot
            );
            if r.reason == Reason::Reload {
                self.abort_reload(now, "a replacement exited before it was ready");
            }
            return;
        }
        // The old worker of a pending replacement exited: the replacement takes its place.
        if let Some(r) = self.replacements.iter().position(|r| r.old == id) {
            self.replacements.swap_remove(r);
            warn!(
                "worker {} (pid {pid}) exited while being replaced: {status}",
                w.slot
            );
            self.continue_reload(now);
            return;
        }
        if self.slots[w.slot].state == SlotState::Removed {
            return;
        }
        if matches!(w.state, WorkerState::Stopping { .. }) && status == ExitStatus::Exited(0) {
            // It said it was stopping and then exited cleanly: a planned exit (a server that
            // recycles itself), replaced at once and not a crash.
            info!(
                "worker {} (pid {pid}) exited after STOPPING: {status}; starting its successor",
                w.slot
            );
            self.spawn(now, w.slot);
            self.continue_reload(now);
            return;
        }
        if now.saturating_duration_since(w.started) >= STABLE_UPTIME {
            self.slots[w.slot].crashes = 0;
        }
        warn!(
            "worker {} (pid {pid}) exited unexpectedly: {status}",
            w.slot
        );
        self.crashed(now, w.slot, &format!("exited with {status}"));
        self.continue_reload(now);
    }

    fn request_reload(&mut self, now: Instant) {
        if self.phase != Phase::Running {
            return;
        }
        if let Some(run) = &mut self.reload {
            if !run.again {
                info!("SIGHUP during a reload: one more reload queued");
            }
            run.again = true;
            return;
        }
        self.generation += 1;
        let queue: VecDeque<WorkerId> = self
            .workers
            .iter()
            .filter(|w| !matches!(w.state, WorkerState::Draining { .. }))
            .map(|w| w.id)
            .collect();
        info!(
            "SIGHUP: rolling reload to generation {} ({} workers, {} at a time)",
            self.generation,
            queue.len(),
            self.settings.reload_batch
        );
        self.reload = Some(ReloadRun {
            queue,
            again: false,
        });
        // Slots given up (or waiting to restart) get a worker of the new generation now.
        for slot in 0..self.slots.len() {
            if matches!(
                self.slots[slot].state,
                SlotState::GaveUp { .. } | SlotState::Restarting { .. }
            ) {
                info!("SIGHUP: trying worker slot {slot} again");
                self.slots[slot].crashes = self.slots[slot].crashes.min(CRASH_LOOP_LIMIT - 1);
                self.spawn(now, slot);
            }
        }
        self.continue_reload(now);
    }

    fn continue_reload(&mut self, now: Instant) {
        let Some(mut run) = self.reload.take() else {
            return;
        };
        let batch = self.settings.reload_batch.max(1);
        while self
            .replacements
            .iter()
            .filter(|r| r.reason == Reason::Reload)
            .count()
            < batch
        {
            let Some(old) = run.queue.pop_front() else {
                break;
            };
            // Gone, drained meanwhile (SIGTTOU, recycling), or already being replaced by a
            // recycle (whose replacement, if of the old generation, is itself in the queue):
            // nothing left to replace.
            if self
                .worker(old)
                .is_none_or(|w| matches!(w.state, WorkerState::Draining { .. }))
                || self.replacements.iter().any(|r| r.old == old)
            {
                continue;
            }
            let before = self.replacements.len();
            self.replace(now, old, Reason::Reload, "reload");
            if self.replacements.len() == before {
                self.reload = Some(run);
                self.abort_reload(now, "the replacement could not be started");
                return;
            }
        }
        let reloading = self.replacements.iter().any(|r| r.reason == Reason::Reload);
        if reloading || !run.queue.is_empty() {
            self.reload = Some(run);
            return;
        }
        // Complete once every worker left of an older generation is on its way out (one the
        // reload skipped because a recycle was replacing it counts once it drains).
        let stragglers = self.workers.iter().any(|w| {
            w.generation != self.generation && !matches!(w.state, WorkerState::Draining { .. })
        });
        if stragglers {
            self.reload = Some(run);
            return;
        }
        info!("reload to generation {} complete", self.generation);
        self.counts.reloads += 1;
        self.counts.reloaded_generation = self.generation;
        if run.again {
            self.request_reload(now);
        }
    }

    fn abort_reload(&mut self, now: Instant, why: &str) {
        error!("reload aborted: {why}; the running workers keep serving");
        self.counts.reloads_aborted += 1;
        self.counts.last_abort = why.to_string();
        self.reload = None;
        let failed: Vec<WorkerId> = self
            .replacements
            .iter()
            .filter(|r| r.reason == Reason::Reload)
            .map(|r| r.new)
            .collect();
        self.replacements.retain(|r| r.reason != Reason::Reload);
        // A replacement may already be serving (kernel modes: it accepts from the shared or
        // reuseport socket as soon as it listens): drain it, never SIGKILL it outright.
        for id in failed {
            self.drain(now, id);
        }
    }

    fn scale_up(&mut self, now: Instant) {
        if !self.accepts_scale_up() {
            return;
        }
        let slot = self.slots.len();
        self.slots.push(Slot {
            state: SlotState::Running,
            crashes: 0,
            restarts: 0,
        });
        info!("SIGTTIN: adding worker {slot}");
        self.spawn(now, slot);
    }

    fn scale_down(&mut self, now: Instant) {
        if self.phase != Phase::Running {
            return;
        }
        let active: Vec<usize> = (0..self.slots.len())
            .filter(|&s| self.slots[s].state != SlotState::Removed)
            .collect();
        if active.len() <= 1 {
            warn!("SIGTTOU: keeping the last worker");
            return;
        }
        let slot = active[active.len() - 1];
        info!("SIGTTOU: removing worker {slot}");
        self.slots[slot].state = SlotState::Removed;
        self.out.push(Action::SlotRemoved(slot));
        let ids: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|w| w.slot == slot)
            .map(|w| w.id)
            .collect();
        for &id in &ids {
            self.drain(now, id);
        }
        // A replacement starting in this slot has nothing left to replace: forget it, so a
        // reload moves on now instead of waiting for it until --ready-timeout and aborting.
        let before = self.replacements.len();
        self.replacements.retain(|r| !ids.contains(&r.new));
        if self.replacements.len() != before {
            self.continue_reload(now);
        }
    }

    fn stop(&mut self, now: Instant, signal: &'static str) {
        if matches!(self.phase, Phase::Stopping { .. }) {
            warn!("{signal} again: killing the workers now");
            for w in &self.workers {
                self.out.push(Action::Signal(w.id, Sig::Kill));
            }
            return;
        }
        let grace = self.settings.grace;
        let stop_signal = self.settings.stop_signal;
        self.reload = None;
        self.replacements.clear();
        for w in &mut self.workers {
            // Exits from now on are expected: nothing is restarted.
            w.state = WorkerState::Draining { kill_at: None };
        }
        let kill_at = Some(at(now, grace));
        if self.settings.drain_channels_on_stop {
            // Stop accepting first, and let the workers take what is already in their channels
            // (up to half the grace period) before they are told to stop: a connection the
            // master accepted is served, not dropped with a channel.
            let drain_for = grace / 2;
            info!(
                "{signal}: stopping; no new connections; workers get up to {drain_for:?} to take \
                 what is queued for them, then {stop_signal}, and SIGKILL after {grace:?}"
            );
            self.out.push(Action::StopAccepting { drain_for });
            self.phase = Phase::Stopping {
                signal_at: Some(at(now, drain_for)),
                kill_at,
            };
        } else {
            info!("{signal}: stopping; workers get {stop_signal} and {grace:?} to exit");
            self.phase = Phase::Stopping {
                signal_at: Some(now),
                kill_at,
            };
            self.signal_stop(now);
        }
    }

    /// Sends every worker the stop signal, once, as the second step of stopping.
    fn signal_stop(&mut self, _now: Instant) {
        if let Phase::Stopping { signal_at, .. } = &mut self.phase {
            if signal_at.take().is_none() {
                return;
            }
            for w in &self.workers {
                self.out.push(Action::Signal(w.id, Sig::Stop));
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        if let Phase::Stopping { signal_at, kill_at } = self.phase {
            if signal_at.is_some_and(|t| now >= t) {
                self.signal_stop(now);
            }
            if kill_at.is_some_and(|t| now >= t) {
                for w in &self.workers {
                    warn!(
                        "worker {} (pid {}) did not exit within {:?}: SIGKILL",
                        w.slot,
                        w.pid.unwrap_or(0),
                        self.settings.grace
                    );
                    self.out.push(Action::Signal(w.id, Sig::Kill));
                }
                if let Phase::Stopping { kill_at, .. } = &mut self.phase {
                    *kill_at = None;
                }
            }
        }
        let grace = self.settings.grace;
        let mut stuck = Vec::new();
        for w in &mut self.workers {
            match &mut w.state {
                WorkerState::Draining { kill_at } if kill_at.is_some_and(|t| now >= t) => {
                    warn!(
                        "worker {} (pid {}) still running {grace:?} after the drain signal: SIGKILL",
                        w.slot,
                        w.pid.unwrap_or(0)
                    );
                    *kill_at = None;
                    self.out.push(Action::Signal(w.id, Sig::Kill));
                }
                WorkerState::Stopping { since } if now >= at(*since, grace) => stuck.push(w.id),
                _ => {}
            }
        }
        for id in stuck {
            self.replace(
                now,
                id,
                Reason::Recycle,
                "it said STOPPING and neither exited nor became ready again within --grace",
            );
        }
        for slot in 0..self.slots.len() {
            match self.slots[slot].state {
                SlotState::Restarting { at } if now >= at => {
                    self.spawn(now, slot);
                }
                SlotState::GaveUp { retry_at } if now >= retry_at => {
                    info!("trying given-up worker slot {slot} again");
                    // One more crash gives it up again.
                    self.slots[slot].crashes = CRASH_LOOP_LIMIT - 1;
                    self.spawn(now, slot);
                }
                _ => {}
            }
        }
        // Readiness by delay, or by timeout with a warning.
        let starting: Vec<(WorkerId, Instant)> = self
            .workers
            .iter()
            .filter(|w| w.state == WorkerState::Starting)
            .map(|w| (w.id, w.started))
            .collect();
        for (id, started) in starting {
            if self
                .settings
                .ready_delay
                .is_some_and(|d| now >= at(started, d))
            {
                self.mark_ready(now, id, "--ready-delay elapsed");
            } else if now >= at(started, self.settings.ready_timeout)
                && !self.replacements.iter().any(|r| r.new == id)
            {
                warn!(
                    "worker with id {id} signalled no readiness within {:?}; treating it as \
                     ready (servers that signal nothing want --ready-delay)",
                    self.settings.ready_timeout
                );
                self.mark_ready(now, id, "--ready-timeout elapsed");
            }
        }
        // Replacements not ready in time.
        let late: Vec<Replacement> = self
            .replacements
            .iter()
            .filter(|r| now >= r.deadline)
            .copied()
            .collect();
        for r in late {
            match r.reason {
                Reason::Reload => {
                    self.abort_reload(now, "a replacement was not ready within --ready-timeout")
                }
                Reason::Recycle => {
                    self.replacements.retain(|x| x.new != r.new);
                    let (slot, _) = self.who(r.new);
                    error!(
                        "worker {slot}: recycle replacement not ready in time; keeping the old \
                         worker"
                    );
                    self.drain(now, r.new);
                }
            }
        }
    }

    /// Ends the master when it is done: after a stop once every worker is reaped; while
    /// running, when nothing can ever run (no worker left, every slot given up or removed, and
    /// no worker was ever ready, so the command itself does not work).
    fn check_done(&mut self) {
        if !self.workers.is_empty() {
            return;
        }
        match self.phase {
            Phase::Stopping { .. } => {
                info!("all workers exited; shutdown complete");
                self.exited = true;
                self.out.push(Action::Exit(Ok(())));
            }
            Phase::Running => {
                let none_coming = self
                    .slots
                    .iter()
                    .all(|s| matches!(s.state, SlotState::GaveUp { .. } | SlotState::Removed));
                if none_coming && !self.ever_ready {
                    self.exited = true;
                    self.out.push(Action::Exit(Err(
                        "no worker can run: every worker slot gave up after repeated crashes \
                         and none was ever ready"
                            .into(),
                    )));
                }
            }
        }
    }
}

/// `t + d`, saturating about a century ahead instead of panicking on overflow (a huge
/// `--grace`).
pub(crate) fn at(t: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    t.checked_add(d).or_else(|| t.checked_add(FAR)).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    //! Table tests of every transition, on a fake clock: no processes, no sleeps. `Harness`
    //! answers every [`Action::Spawn`] like the supervisor would (pid = 1000 + id), unless told
    //! that spawning fails.
    use super::*;

    const GRACE: Duration = Duration::from_secs(10);
    const READY_TIMEOUT: Duration = Duration::from_secs(30);

    fn settings(workers: usize) -> Settings {
        Settings {
            workers,
            grace: GRACE,
            ready_delay: None,
            ready_timeout: READY_TIMEOUT,
            reload_batch: 1,
            max_rss: None,
            drain_channels_on_stop: true,
            drain_signal: "SIGTERM",
            stop_signal: "SIGTERM",
        }
    }

    struct Harness {
        lc: Lifecycle,
        t0: Instant,
        now: Instant,
        spawn_fails: bool,
    }

    impl Harness {
        fn new(settings: Settings) -> Harness {
            let t0 = Instant::now();
            Harness {
                lc: Lifecycle::new(settings),
                t0,
                now: t0,
                spawn_fails: false,
            }
        }

        /// Started, every worker ready.
        fn running(workers: usize) -> Harness {
            let mut h = Harness::new(settings(workers));
            h.input(Input::Start);
            for id in 0..workers as u64 {
                h.ready(id);
            }
            h
        }

        fn at_ms(&mut self, ms: u64) -> &mut Self {
            self.now = self.t0 + Duration::from_millis(ms);
            self
        }

        fn after(&mut self, d: Duration) -> &mut Self {
            self.now += d;
            self
        }

        fn input(&mut self, input: Input) -> Vec<Action> {
            let mut all = Vec::new();
            let mut todo: VecDeque<Action> = self.lc.handle(self.now, input).into();
            while let Some(a) = todo.pop_front() {
                if let Action::Spawn { id, .. } = a {
                    let answer = if self.spawn_fails {
                        Input::SpawnFailed {
                            id,
                            error: "exec failed".into(),
                        }
                    } else {
                        Input::Spawned {
                            id,
                            pid: 1000 + id as Pid,
                        }
                    };
                    todo.extend(self.lc.handle(self.now, answer));
                }
                all.push(a);
            }
            all
        }

        fn ready(&mut self, id: WorkerId) -> Vec<Action> {
            self.input(Input::Ready { id, how: "test" })
        }

        fn exit(&mut self, id: WorkerId, code: i32) -> Vec<Action> {
            self.input(Input::Exited {
                id,
                status: ExitStatus::Exited(code),
            })
        }

        fn tick(&mut self) -> Vec<Action> {
            self.input(Input::Tick)
        }

        fn state(&self, id: WorkerId) -> Option<WorkerState> {
            self.lc.worker(id).map(|w| w.state)
        }

        fn live(&self) -> Vec<WorkerId> {
            let mut ids: Vec<_> = self.lc.workers().iter().map(|w| w.id).collect();
            ids.sort();
            ids
        }
    }

    fn spawns(actions: &[Action]) -> Vec<(WorkerId, usize)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Spawn { id, slot, .. } => Some((*id, *slot)),
                _ => None,
            })
            .collect()
    }

    fn signals(actions: &[Action]) -> Vec<(WorkerId, Sig)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Signal(id, s) => Some((*id, *s)),
                _ => None,
            })
            .collect()
    }

    fn draining(state: Option<WorkerState>) -> bool {
        matches!(state, Some(WorkerState::Draining { .. }))
    }

    #[test]
    fn backoff_doubles_from_100ms_and_caps_at_10s() {
        let ms = |c| restart_backoff(c).as_millis();
        assert_eq!([ms(1), ms(2), ms(3), ms(4)], [100, 200, 400, 800]);
        assert_eq!(ms(8), 10_000);
        assert_eq!(ms(u32::MAX), 10_000);
        assert_eq!(ms(0), 100);
    }

    #[test]
    fn start_spawns_one_worker_per_slot_and_ready_opens_it() {
        let mut h = Harness::new(settings(3));
        let a = h.input(Input::Start);
        assert_eq!(spawns(&a), [(0, 0), (1, 1), (2, 2)]);
        assert_eq!(h.state(1), Some(WorkerState::Starting));
        assert_eq!(h.lc.worker(1).unwrap().pid, Some(1001));
        assert_eq!(h.ready(1), [Action::Open(1)]);
        assert_eq!(h.state(1), Some(WorkerState::Ready));
        assert_eq!(h.ready(1), [], "a second READY changes nothing");
    }

    #[test]
    fn ready_delay_and_ready_timeout_make_silent_workers_ready() {
        let mut s = settings(1);
        s.ready_delay = Some(Duration::from_millis(500));
        let mut h = Harness::new(s);
        h.input(Input::Start);
        assert_eq!(
            h.lc.next_deadline(),
            Some(h.t0 + Duration::from_millis(500))
        );
        assert_eq!(h.at_ms(499).tick(), []);
        assert_eq!(h.at_ms(500).tick(), [Action::Open(0)]);

        let mut h = Harness::new(settings(1));
        h.input(Input::Start);
        assert_eq!(h.after(READY_TIMEOUT).tick(), [Action::Open(0)]);
    }

    #[test]
    fn crashes_restart_with_backoff_then_the_slot_is_given_up_and_retried() {
        let mut h = Harness::running(2);
        let mut id = 1;
        for (crash, backoff_ms) in [(1, 100), (2, 200), (3, 400), (4, 800)] {
            let a = h.exit(id, 1);
            assert!(
                spawns(&a).is_empty(),
                "crash {crash}: no restart before the backoff"
            );
            assert_eq!(h.lc.slots()[1].crashes, crash);
            assert_eq!(h.tick(), []);
            let a = h.after(Duration::from_millis(backoff_ms)).tick();
            let new = spawns(&a);
            assert_eq!(new.len(), 1, "crash {crash}");
            assert_eq!(new[0].1, 1);
            id = new[0].0;
        }
        let a = h.exit(id, 1);
        assert!(matches!(h.lc.slots()[1].state, SlotState::GaveUp { .. }));
        assert_eq!(a, [Action::Forget(id), Action::SlotGaveUp(1)]);
        assert_eq!(h.after(RESTART_BACKOFF_MAX).tick(), []);
        assert_eq!(h.lc.phase(), Phase::Running, "slot 0 still serves");
        let a = h.after(GIVE_UP_RETRY).tick();
        assert_eq!(spawns(&a).len(), 1, "a given-up slot is tried again");
        let retry = spawns(&a)[0].0;
        h.exit(retry, 1);
        assert!(
            matches!(h.lc.slots()[1].state, SlotState::GaveUp { .. }),
            "one more crash gives it up again"
        );
    }

    #[test]
    fn a_worker_that_ran_long_enough_resets_its_slot_crash_count() {
        let mut h = Harness::running(1);
        h.exit(0, 1);
        let a = h.after(Duration::from_millis(100)).tick();
        let id = spawns(&a)[0].0;
        h.ready(id);
        h.after(STABLE_UPTIME).exit(id, 1);
        assert_eq!(h.lc.slots()[0].crashes, 1);
    }

    #[test]
    fn sighup_retries_a_given_up_slot_at_once() {
        let mut h = Harness::running(2);
        for _ in 0..CRASH_LOOP_LIMIT {
            let id = *h
                .live()
                .iter()
                .find(|&&i| h.lc.worker(i).unwrap().slot == 1)
                .unwrap();
            h.exit(id, 1);
            h.after(RESTART_BACKOFF_MAX).tick();
        }
        assert!(matches!(h.lc.slots()[1].state, SlotState::GaveUp { .. }));
        let a = h.input(Input::Reload);
        assert!(spawns(&a).iter().any(|&(_, slot)| slot == 1), "{a:?}");
    }

    #[test]
    fn every_slot_crashing_before_any_is_ready_exits_with_an_error() {
        let mut h = Harness::new(settings(2));
        h.input(Input::Start);
        let mut exit = None;
        for _ in 0..CRASH_LOOP_LIMIT {
            for id in h.live() {
                for a in h.exit(id, 3) {
                    if let Action::Exit(r) = a {
                        exit = Some(r);
                    }
                }
            }
            h.after(RESTART_BACKOFF_MAX).tick();
        }
        let why = exit.expect("the master exits").unwrap_err();
        assert!(why.contains("no worker can run"), "{why}");
        assert_eq!(h.input(Input::Tick), [], "nothing happens after the exit");
    }

    #[test]
    fn every_slot_crash_looping_after_serving_keeps_the_master_retrying() {
        let mut h = Harness::running(1);
        for _ in 0..CRASH_LOOP_LIMIT {
            let id = h.live()[0];
            let a = h.exit(id, 3);
            assert!(!a.iter().any(|a| matches!(a, Action::Exit(_))), "{a:?}");
            h.after(RESTART_BACKOFF_MAX).tick();
        }
        assert!(h.live().is_empty());
        let a = h.after(GIVE_UP_RETRY).tick();
        assert_eq!(spawns(&a).len(), 1, "the outage is retried");
    }

    #[test]
    fn stopping_closes_dispatch_and_ready_again_reopens() {
        let mut h = Harness::running(2);
        assert_eq!(h.input(Input::Stopping { id: 0 }), [Action::Close(0)]);
        assert!(matches!(h.state(0), Some(WorkerState::Stopping { .. })));
        assert_eq!(h.ready(0), [Action::Open(0)]);
        assert_eq!(h.state(0), Some(WorkerState::Ready));
    }

    #[test]
    fn stopping_then_a_clean_exit_is_replaced_at_once_and_is_no_crash() {
        let mut h = Harness::running(2);
        h.input(Input::Stopping { id: 1 });
        let a = h.exit(1, 0);
        assert_eq!(spawns(&a), [(2, 1)]);
        assert_eq!(h.lc.slots()[1].crashes, 0);
        // Self-recycling forever never gives the slot up.
        let mut id = 2;
        for _ in 0..3 * CRASH_LOOP_LIMIT {
            h.ready(id);
            h.input(Input::Stopping { id });
            let a = h.exit(id, 0);
            id = spawns(&a)[0].0;
        }
        assert_eq!(h.lc.slots()[1].state, SlotState::Running);
    }

    #[test]
    fn stopping_then_a_failed_exit_is_a_crash() {
        let mut h = Harness::running(1);
        h.input(Input::Stopping { id: 0 });
        let a = h.exit(0, 1);
        assert!(spawns(&a).is_empty());
        assert_eq!(h.lc.slots()[0].crashes, 1);
    }

    #[test]
    fn a_worker_stuck_stopping_past_the_grace_period_is_replaced() {
        let mut h = Harness::running(1);
        h.input(Input::Stopping { id: 0 });
        assert_eq!(h.after(GRACE / 2).tick(), []);
        let a = h.after(GRACE).tick();
        assert_eq!(spawns(&a), [(1, 0)]);
        let a = h.ready(1);
        assert!(a.contains(&Action::Signal(0, Sig::Drain)), "{a:?}");
        assert!(draining(h.state(0)));
    }

    #[test]
    fn reload_replaces_workers_one_at_a_time_and_completes() {
        let mut h = Harness::running(2);
        let a = h.input(Input::Reload);
        assert_eq!(spawns(&a), [(2, 0)], "batch of one");
        assert_eq!(h.lc.generation(), 1);
        let a = h.ready(2);
        assert_eq!(
            a,
            [
                Action::Open(2),
                Action::Close(0),
                Action::Signal(0, Sig::Drain),
                Action::Spawn {
                    id: 3,
                    slot: 1,
                    generation: 1
                }
            ]
        );
        assert!(h.lc.reloading());
        h.ready(3);
        assert!(
            !h.lc.reloading(),
            "complete once the last old worker drains"
        );
        assert!(draining(h.state(1)));
        h.exit(0, 0);
        h.exit(1, 0);
        assert_eq!(h.live(), [2, 3]);
        assert_eq!(h.lc.slots()[0].crashes, 0, "a drained exit is no crash");
    }

    #[test]
    fn reload_batch_replaces_that_many_at_a_time() {
        let mut s = settings(3);
        s.reload_batch = 2;
        let mut h = Harness::new(s);
        h.input(Input::Start);
        (0..3).for_each(|id| {
            h.ready(id);
        });
        let a = h.input(Input::Reload);
        assert_eq!(spawns(&a).len(), 2);
        let a = h.ready(3);
        assert_eq!(
            spawns(&a).len(),
            1,
            "the third starts when one of the two is ready"
        );
    }

    #[test]
    fn a_replacement_that_exits_aborts_the_reload_and_old_workers_keep_serving() {
        let mut h = Harness::running(2);
        h.input(Input::Reload);
        h.exit(2, 1);
        assert!(!h.lc.reloading());
        assert_eq!(h.live(), [0, 1]);
        assert_eq!(h.state(0), Some(WorkerState::Ready));
        assert_eq!(
            h.lc.slots()[0].crashes,
            0,
            "a failed replacement is no crash"
        );
    }

    #[test]
    fn an_aborted_reload_drains_its_replacements_instead_of_killing_them() {
        let mut s = settings(2);
        s.reload_batch = 2;
        let mut h = Harness::new(s);
        h.input(Input::Start);
        h.ready(0);
        h.ready(1);
        h.input(Input::Reload);
        // Replacement 3 fails; replacement 2 may already be serving (kernel modes).
        let a = h.exit(3, 1);
        assert_eq!(signals(&a), [(2, Sig::Drain)], "{a:?}");
        assert!(draining(h.state(2)));
        let a = h.after(GRACE).tick();
        assert_eq!(
            signals(&a),
            [(2, Sig::Kill)],
            "SIGKILL only after the grace period"
        );
    }

    #[test]
    fn a_replacement_not_ready_in_time_aborts_the_reload() {
        let mut h = Harness::running(1);
        h.input(Input::Reload);
        let a = h.after(READY_TIMEOUT).tick();
        assert_eq!(signals(&a), [(1, Sig::Drain)]);
        assert!(!h.lc.reloading());
        assert_eq!(h.state(0), Some(WorkerState::Ready));
    }

    #[test]
    fn a_replacement_that_cannot_be_spawned_aborts_the_reload() {
        let mut h = Harness::running(1);
        h.spawn_fails = true;
        h.input(Input::Reload);
        assert!(!h.lc.reloading());
        assert_eq!(h.live(), [0]);
        assert_eq!(h.lc.slots()[0].crashes, 0);
    }

    #[test]
    fn a_restart_that_cannot_be_spawned_counts_as_a_crash() {
        let mut h = Harness::running(1);
        h.exit(0, 1);
        h.spawn_fails = true;
        h.after(Duration::from_millis(100)).tick();
        assert_eq!(h.lc.slots()[0].crashes, 2);
        assert!(matches!(
            h.lc.slots()[0].state,
            SlotState::Restarting { .. }
        ));
    }

    #[test]
    fn sighup_during_a_reload_queues_exactly_one_more() {
        let mut h = Harness::running(1);
        h.input(Input::Reload);
        assert!(spawns(&h.input(Input::Reload)).is_empty());
        assert!(spawns(&h.input(Input::Reload)).is_empty());
        let a = h.ready(1);
        assert_eq!(h.lc.generation(), 2, "the queued reload started");
        assert_eq!(spawns(&a).len(), 1);
        h.ready(2);
        assert!(!h.lc.reloading());
        assert_eq!(h.lc.generation(), 2, "exactly one more");
    }

    #[test]
    fn the_old_worker_exiting_during_its_replacement_lets_the_reload_go_on() {
        let mut h = Harness::running(2);
        h.input(Input::Reload);
        let a = h.exit(0, 1);
        assert_eq!(
            spawns(&a),
            [(3, 1)],
            "the reload moves on to the next worker"
        );
        assert_eq!(
            h.lc.slots()[0].crashes,
            0,
            "the replacement takes its place"
        );
        h.ready(2);
        h.ready(3);
        assert!(!h.lc.reloading());
    }

    #[test]
    fn a_reload_that_overtakes_a_recycle_in_progress_completes() {
        // The interleaving of tests/lifecycle.rs's reloads_while_max_conns_recycles: worker 0
        // is being recycled (2 starting in its place) when SIGHUP comes; the reload replaces
        // the starting 2 with 3; once 3 is ready, both 2 and 0 must go.
        let mut h = Harness::running(1);
        h.input(Input::MaxConns { id: 0 });
        assert_eq!(h.live(), [0, 1]);
        let a = h.input(Input::Reload);
        assert_eq!(
            spawns(&a),
            [(2, 0)],
            "0 is skipped (being recycled); 1 is replaced"
        );
        let a = h.ready(2);
        assert!(a.contains(&Action::Signal(1, Sig::Drain)), "{a:?}");
        assert!(a.contains(&Action::Signal(0, Sig::Drain)), "{a:?}");
        assert!(!h.lc.reloading(), "no generation-0 worker is left serving");
        assert!(h.lc.replacements().is_empty());
        h.exit(1, 0);
        h.exit(0, 0);
        assert_eq!(h.live(), [2]);
    }

    #[test]
    fn an_exit_during_a_drain_is_expected() {
        let mut h = Harness::running(2);
        h.input(Input::ScaleDown);
        let a = h.exit(1, 137);
        assert_eq!(a, [Action::Forget(1)], "not restarted");
        assert_eq!(h.lc.slots()[1].crashes, 0);
    }

    #[test]
    fn scale_down_drains_the_last_slot_and_keeps_the_last_worker() {
        let mut h = Harness::running(2);
        let a = h.input(Input::ScaleDown);
        assert_eq!(
            a,
            [
                Action::SlotRemoved(1),
                Action::Close(1),
                Action::Signal(1, Sig::Drain)
            ]
        );
        assert_eq!(h.input(Input::ScaleDown), [], "the last worker stays");
        h.exit(1, 0);
        let a = h.input(Input::ScaleUp);
        assert_eq!(spawns(&a), [(2, 2)], "a new slot number");
    }

    #[test]
    fn scaling_down_the_slot_a_reload_is_replacing_completes_the_reload() {
        let mut h = Harness::running(2);
        h.input(Input::Reload);
        h.ready(2); // slot 0 replaced; slot 1's replacement (3) starts
        assert!(h.live().contains(&3));
        h.input(Input::ScaleDown); // removes slot 1: workers 1 and 3
        assert!(draining(h.state(1)) && draining(h.state(3)));
        assert!(!h.lc.reloading(), "nothing left to replace");
    }

    #[test]
    fn sigttou_during_a_reload_drains_a_worker_the_reload_then_skips() {
        let mut h = Harness::running(3);
        h.input(Input::Reload); // replacing 0 with 3
        h.input(Input::ScaleDown); // drains slot 2 (worker 2), still queued in the reload
        h.ready(3); // 0 drains; next in queue: 1
        let a = h.ready(4);
        assert!(spawns(&a).is_empty(), "worker 2 is skipped: {a:?}");
        assert!(!h.lc.reloading());
    }

    #[test]
    fn stop_in_dispatch_mode_drains_channels_then_signals_then_kills() {
        let mut h = Harness::running(2);
        let a = h.input(Input::Stop { signal: "SIGTERM" });
        assert_eq!(
            a,
            [Action::StopAccepting {
                drain_for: GRACE / 2
            }]
        );
        assert!(draining(h.state(0)) && draining(h.state(1)));
        let a = h.input(Input::Drained);
        assert_eq!(signals(&a), [(0, Sig::Stop), (1, Sig::Stop)]);
        assert_eq!(h.input(Input::Drained), [], "the stop signal goes once");
        h.exit(0, 0);
        let a = h.after(GRACE).tick();
        assert_eq!(signals(&a), [(1, Sig::Kill)]);
        let a = h.exit(1, 137);
        assert!(a.contains(&Action::Exit(Ok(()))), "{a:?}");
    }

    #[test]
    fn stop_without_channels_signals_at_once_and_the_drain_timer_also_signals() {
        let mut s = settings(1);
        s.drain_channels_on_stop = false;
        let mut h = Harness::new(s);
        h.input(Input::Start);
        let a = h.input(Input::Stop { signal: "SIGINT" });
        assert_eq!(signals(&a), [(0, Sig::Stop)]);

        let mut h = Harness::running(1);
        h.input(Input::Stop { signal: "SIGTERM" });
        let a = h.after(GRACE / 2).tick();
        assert_eq!(
            signals(&a),
            [(0, Sig::Stop)],
            "no Drained in time: signal anyway"
        );
    }

    #[test]
    fn a_second_stop_kills_at_once_and_nothing_restarts_while_stopping() {
        let mut h = Harness::running(2);
        h.input(Input::Stop { signal: "SIGTERM" });
        let a = h.input(Input::Stop { signal: "SIGTERM" });
        assert_eq!(signals(&a), [(0, Sig::Kill), (1, Sig::Kill)]);
        let a = h.exit(0, 1);
        assert!(spawns(&a).is_empty());
        assert!(spawns(&h.input(Input::Reload)).is_empty());
        assert!(spawns(&h.input(Input::ScaleUp)).is_empty());
        assert!(!h.lc.accepts_scale_up());
    }

    #[test]
    fn stop_during_a_reload_cancels_it() {
        let mut h = Harness::running(2);
        h.input(Input::Reload);
        h.input(Input::Stop { signal: "SIGTERM" });
        assert!(!h.lc.reloading());
        let a = h.ready(2);
        assert!(
            !a.iter()
                .any(|a| matches!(a, Action::Open(_) | Action::Spawn { .. }))
        );
        assert!(h.lc.replacements().is_empty());
    }

    #[test]
    fn stop_with_no_worker_left_exits_at_once() {
        let mut h = Harness::running(1);
        h.exit(0, 1);
        let a = h.input(Input::Stop { signal: "SIGTERM" });
        assert!(a.contains(&Action::Exit(Ok(()))), "{a:?}");
    }

    #[test]
    fn max_rss_recycles_only_ready_workers_above_the_limit() {
        let mut s = settings(2);
        s.max_rss = Some(100 << 20);
        let mut h = Harness::new(s);
        h.input(Input::Start);
        h.ready(0);
        let bytes = 200 << 20;
        assert!(
            spawns(&h.input(Input::Rss { id: 1, bytes })).is_empty(),
            "1 is starting"
        );
        assert!(
            spawns(&h.input(Input::Rss {
                id: 0,
                bytes: 99 << 20
            }))
            .is_empty()
        );
        assert_eq!(spawns(&h.input(Input::Rss { id: 0, bytes })), [(2, 0)]);
        assert!(
            spawns(&h.input(Input::Rss { id: 0, bytes })).is_empty(),
            "one replacement at a time"
        );
    }

    #[test]
    fn a_recycle_whose_replacement_is_late_keeps_the_old_worker() {
        let mut h = Harness::running(1);
        h.input(Input::MaxConns { id: 0 });
        let a = h.after(READY_TIMEOUT).tick();
        assert_eq!(signals(&a), [(1, Sig::Drain)]);
        assert_eq!(h.state(0), Some(WorkerState::Ready));
    }

    #[test]
    fn a_stalled_worker_is_replaced_and_drained_once_its_successor_is_ready() {
        let mut h = Harness::running(2);
        let a = h.input(Input::Stalled { id: 1 });
        assert_eq!(spawns(&a), [(2, 1)]);
        assert_eq!(
            h.state(1),
            Some(WorkerState::Ready),
            "it keeps its slot until then"
        );
        let a = h.ready(2);
        assert!(a.contains(&Action::Close(1)) && a.contains(&Action::Signal(1, Sig::Drain)));
        assert!(
            h.input(Input::Stalled { id: 1 }).is_empty(),
            "draining: nothing more"
        );
    }

    #[test]
    fn an_unhealthy_worker_is_replaced_like_a_stalled_one() {
        let mut h = Harness::running(2);
        let a = h.input(Input::Unhealthy { id: 1, why: "test" });
        assert_eq!(spawns(&a), [(2, 1)]);
        assert_eq!(h.state(1), Some(WorkerState::Ready));
        let a = h.ready(2);
        assert!(a.contains(&Action::Close(1)) && a.contains(&Action::Signal(1, Sig::Drain)));
    }

    #[test]
    fn a_huge_grace_period_does_not_overflow() {
        let mut s = settings(1);
        s.grace = Duration::MAX;
        s.ready_timeout = Duration::MAX;
        let mut h = Harness::new(s);
        h.input(Input::Start);
        h.ready(0);
        h.input(Input::Stop { signal: "SIGTERM" });
        assert!(h.lc.next_deadline().is_some());
        assert_eq!(h.after(Duration::from_secs(3600)).tick(), []);
    }

    #[test]
    fn next_deadline_is_the_earliest_timer() {
        let mut h = Harness::running(2);
        assert_eq!(h.lc.next_deadline(), None, "nothing pending");
        h.exit(1, 1);
        assert_eq!(h.lc.next_deadline(), Some(h.now + RESTART_BACKOFF_INITIAL));
        h.input(Input::Stopping { id: 0 });
        assert_eq!(h.lc.next_deadline(), Some(h.now + RESTART_BACKOFF_INITIAL));
    }

    #[test]
    fn unknown_workers_are_ignored() {
        let mut h = Harness::running(1);
        for input in [
            Input::Ready { id: 99, how: "x" },
            Input::Stopping { id: 99 },
            Input::Exited {
                id: 99,
                status: ExitStatus::Signaled(9),
            },
            Input::Stalled { id: 99 },
            Input::MaxConns { id: 99 },
        ] {
            assert_eq!(h.input(input), []);
        }
    }
}
