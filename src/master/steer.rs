//! The supervisor's side of kernel steering: deciding at startup whether the kernel steers
//! (`--steer`; with a program it loads, or with one a privileged `steer-load` passed in,
//! [`crate::steer::handoff`]), registering each worker slot's listeners with the program,
//! keeping the table's eligibility equal to "a ready worker serves this slot", reconciling
//! placements that never reached a worker, and (for least-mem) writing each slot's worker RSS
//! into the table. Owned and called by the supervisor on the main thread; it holds the
//! [`Steering`] (maps, programs), never the listening sockets (the supervisor's slots do).

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use log::{info, warn};
use socket2::Socket;

use crate::cli::{Config, Steer, UsageError};
use crate::master::lifecycle::WorkerId;
use crate::master::ratelimit::{LogLimiter, Verdict};
use crate::master::status::{OverflowStatus, SteerSlotStatus, SteeringStatus};
use crate::steer::{SteerPolicy, Steering, handoff};
use crate::sys;
use rcluster_proto::steer as page;

/// How often placements are reconciled with the listeners' accept queues.
pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(100);

/// Kernel steering as the supervisor runs it.
#[derive(Debug)]
pub struct SteerControl {
    steering: Steering,
    policy: SteerPolicy,
    /// Slots the program scans (the supervisor's slot count).
    slots: usize,
    /// What the table says, so a change is logged once.
    eligible: Vec<bool>,
    /// Per slot: since when its queue has been non-empty while its worker accepted nothing,
    /// and the `accepted` count then.
    stall: Vec<Option<(Instant, u64)>>,
    /// Slots found stalled: ineligible until their worker (or its replacement) accepts again.
    stalled: Vec<bool>,
    /// `--stall-timeout`.
    stall_timeout: Duration,
    /// `--max-conns` under kernel steering: per worker, its slot, the slot's `assigned` when it
    /// started, and its limit. A slot's placements are its ready workers' connections.
    max_conns: Vec<(WorkerId, usize, u64, u64)>,
    next_reconcile: Instant,
    /// Placements written off (+) or taken back (-) since start, for the status line.
    forgiven_total: i64,
    /// The overflow queue: one listener per address, at the socket arrays' overflow index,
    /// inherited by every worker (`RCLUSTER_STEER_OVERFLOW_FD`).
    overflow: Vec<Socket>,
    /// Since when the overflow queue has held connections while no worker took one from it,
    /// and its `accepted` count then.
    overflow_stall: Option<(Instant, u64)>,
    /// Lines about `eligible` words a worker changed (a worker can flood it).
    tamper_log: LogLimiter,
}

/// Decides who places connections. `Ok(None)`: the master dispatches (`--steer dispatch`, a
/// policy the program cannot carry, or `auto` where the program does not load or what
/// `RCLUSTER_STEER_FDS` passed in is unusable: logged with the reason). `Err`: `--steer kernel`
/// and the program does not load (exit 1) or what was passed in is unusable (exit 2).
pub fn start(config: &Config) -> anyhow::Result<Option<SteerControl>> {
    let passed = std::env::var_os(handoff::RCLUSTER_STEER_FDS);
    let Some(policy) = SteerPolicy::for_policy(config.policy) else {
        // steer-load passes plain reuseport mode's program beside this one: not a mistake.
        if passed.is_some() {
            info!(
                "steering: {} unused: --policy {} leaves placement to the kernel",
                handoff::RCLUSTER_STEER_FDS,
                config.policy
            );
        }
        return Ok(None);
    };
    if config.steer == Steer::Dispatch {
        info!("steering: dispatch (--steer dispatch): the master accepts and passes connections");
        ignore_passed(passed.is_some(), "--steer dispatch");
        return Ok(None);
    }
    if config.workers > page::WORKER_SLOTS {
        let why = format!(
            "{} workers exceed the steering table's {} slots",
            config.workers,
            page::WORKER_SLOTS
        );
        return fallback(config.steer, &why);
    }
    let loaded = match &passed {
        // A privileged `steer-load` loaded the program: adopt it (no CAP_BPF needed).
        Some(value) => match handoff::adopt(value, config.listen.len()) {
            Ok(objects) => Steering::new(objects),
            Err(e) if config.steer == Steer::Kernel => {
                return Err(UsageError(format!("--steer kernel: {e}")).into());
            }
            Err(e) => {
                warn!("steering: dispatch, the steering program passed in is unusable: {e}");
                return Ok(None);
            }
        },
        None => Steering::load(config.listen.len()),
    };
    match loaded {
        Ok(steering) => {
            info!(
                "steering: kernel: an SK_REUSEPORT program {}places each connection on the {} \
                 worker's own listener{}{} (--steer {})",
                if passed.is_some() {
                    "passed in by steer-load (RCLUSTER_STEER_FDS) "
                } else {
                    ""
                },
                config.policy,
                if steering.migrates() {
                    "; a closed listener's queue is re-placed the same way"
                } else {
                    "; this kernel cannot migrate a closed listener's queue (5.14+)"
                },
                steering.scan().map_or("", |scan| scan.note()),
                config.steer.name()
            );
            Ok(Some(SteerControl {
                steering,
                policy,
                slots: 0,
                eligible: Vec::new(),
                stall: Vec::new(),
                stalled: Vec::new(),
                stall_timeout: config.stall_timeout,
                max_conns: Vec::new(),
                next_reconcile: Instant::now() + RECONCILE_INTERVAL,
                forgiven_total: 0,
                overflow: Vec::new(),
                overflow_stall: None,
                tamper_log: LogLimiter::default(),
            }))
        }
        Err(e) => fallback(config.steer, &e.to_string()),
    }
}

/// What one sample says about a slot's stall watch.
#[derive(Debug, PartialEq, Eq)]
enum StallStep {
    /// Nothing waits, or the worker accepted since the watch began (or it does not report).
    Clear,
    /// Connections wait and nothing was accepted: watching since then, at that `accepted`.
    Watch((Instant, u64)),
    /// Watched for the whole timeout.
    Stalled,
}

/// The connections waiting in `sockets`' accept queues.
fn queue_length(sockets: &[Socket]) -> u64 {
    sockets
        .iter()
        .filter_map(|s| sys::listen_queue(s.as_fd()).ok())
        .map(|(q, _)| u64::from(q))
        .sum()
}

fn stall_step(
    watch: Option<(Instant, u64)>,
    now: Instant,
    queued: u64,
    c: crate::steer::SlotCounts,
    timeout: Duration,
) -> StallStep {
    if queued == 0 || !c.reporting {
        return StallStep::Clear;
    }
    match watch {
        Some((_, accepted)) if accepted != c.accepted => StallStep::Clear,
        Some((since, _)) if now.duration_since(since) >= timeout => StallStep::Stalled,
        Some(w) => StallStep::Watch(w),
        None => StallStep::Watch((now, c.accepted)),
    }
}

/// `RCLUSTER_STEER_FDS` was given to a master that does not steer: said once, the fds stay
/// unused (no worker inherits them: the spawner marks every fd it does not place close-on-exec).
fn ignore_passed(passed: bool, why: &str) {
    if passed {
        warn!(
            "steering: {} ignored: the master dispatches ({why})",
            handoff::RCLUSTER_STEER_FDS
        );
    }
}

fn fallback(steer: Steer, why: &str) -> anyhow::Result<Option<SteerControl>> {
    if steer == Steer::Kernel {
        anyhow::bail!("--steer kernel: {why}");
    }
    warn!("steering: dispatch, kernel steering unavailable: {why}");
    Ok(None)
}

impl SteerControl {
    /// Whether the program re-places a closed listener's queue (`SELECT_OR_MIGRATE`), so
    /// closing a slot's listener resets nothing.
    pub fn migrates(&self) -> bool {
        self.steering.migrates()
    }

    /// The table's fd for workers to map, and the variable naming where they find it.
    pub fn table_fd(&self) -> BorrowedFd<'_> {
        self.steering.table_fd()
    }

    /// Opens the overflow queue: one more listener per address (`addrs`, in `--listen` order) in
    /// each reuseport group, at the socket array's overflow index, non-blocking (workers only
    /// ever try it), its line of the table zeroed and eligible. Call once, after slot 0's
    /// listeners are registered (they attach the program).
    pub fn open_overflow(&mut self, addrs: &[std::net::SocketAddr]) -> anyhow::Result<()> {
        use anyhow::Context;
        self.steering.set_eligible(page::OVERFLOW, false);
        self.steering.reset(page::OVERFLOW);
        for (i, &addr) in addrs.iter().enumerate() {
            let socket = crate::master::listener::bind_listener(addr, true)
                .with_context(|| format!("cannot open the overflow queue on {addr}"))?;
            socket
                .set_nonblocking(true)
                .context("cannot make the overflow queue non-blocking")?;
            self.steering
                .insert_overflow(i, socket.as_fd())
                .context("cannot give the overflow queue to the program")?;
            self.overflow.push(socket);
        }
        self.steering.set_eligible(page::OVERFLOW, true);
        Ok(())
    }

    /// The overflow queue's listeners, one per address in `--listen` order, for every worker to
    /// inherit (empty before [`SteerControl::open_overflow`]).
    pub fn overflow_fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.overflow.iter().map(|s| s.as_fd())
    }

    /// Registers slot `slot`'s listeners (one per `--listen` address, in order), new or taken
    /// over from an earlier use of the slot: zeroes its counters, puts each listener in its
    /// address's socket array, attaches the program to each group (once is enough, again is
    /// harmless) and widens the scan. The slot stays ineligible until a worker is ready.
    pub fn add_slot(&mut self, slot: usize, listeners: &[Socket]) -> anyhow::Result<()> {
        use anyhow::Context;
        self.steering.set_eligible(slot, false);
        self.steering.reset(slot);
        for (i, socket) in listeners.iter().enumerate() {
            self.steering
                .insert(slot, i, socket.as_fd())
                .with_context(|| {
                    format!("cannot give worker slot {slot}'s listener to the program")
                })?;
            if slot == 0 {
                self.steering
                    .attach(i, socket.as_fd())
                    .context("cannot attach the steering program to the listeners")?;
            }
        }
        if slot >= self.eligible.len() {
            self.eligible.resize(slot + 1, false);
            self.stall.resize(slot + 1, None);
            self.stalled.resize(slot + 1, false);
        }
        self.eligible[slot] = false;
        self.stall[slot] = None;
        self.stalled[slot] = false;
        self.slots = self.slots.max(slot + 1);
        self.steering
            .configure(self.slots, self.policy)
            .context("cannot update the steering program's slot count")
    }

    /// Switches the program's policy (`ctl policy`): the next connection is placed by it. A
    /// policy the program cannot carry is refused with the reason.
    pub fn set_policy(&mut self, kind: crate::policy::PolicyKind) -> Result<(), String> {
        let Some(policy) = SteerPolicy::for_policy(kind) else {
            return Err(format!("the steering program cannot place by {kind}"));
        };
        self.steering
            .configure(self.slots, policy)
            .map_err(|e| format!("cannot update the steering program's policy: {e}"))?;
        self.policy = policy;
        Ok(())
    }

    /// Makes the table's eligibility what the supervisor says: `serving(slot)` is true while a
    /// ready, not draining worker serves the slot. Called after every lifecycle change, before
    /// any signal is sent, so a draining or dead worker's slot gets no new connection first.
    pub fn sync(&mut self, serving: impl Fn(usize) -> bool) {
        for slot in 0..self.slots {
            let want = serving(slot) && !self.stalled[slot];
            if self.eligible[slot] != want {
                self.eligible[slot] = want;
                self.steering.set_eligible(slot, want);
                info!(
                    "steering: slot {slot} {}",
                    if want { "eligible" } else { "ineligible" }
                );
            }
        }
    }

    /// The supervisor's own stall detection found `slot`'s worker stalled: out of the table
    /// until the slot accepts again (its replacement takes the queue over).
    pub fn mark_stalled(&mut self, slot: usize) {
        if slot < self.slots {
            self.stalled[slot] = true;
            let accepted = self.steering.counts(slot).accepted;
            self.stall[slot].get_or_insert((Instant::now(), accepted));
        }
    }

    /// Writes each slot's worker RSS (KiB) for least-mem: `kib[slot]`, 0 (not known) for a slot
    /// beyond `kib`. Called on every `--rss-interval` sample.
    pub fn record_rss(&self, kib: &[u64]) {
        for slot in 0..self.slots {
            self.steering
                .set_rss(slot, kib.get(slot).copied().unwrap_or(0));
        }
    }

    /// `slot` has no worker process left: a watch of the overflow queue its workers did not
    /// withdraw (one was killed while watching) no longer counts.
    pub fn slot_vacant(&self, slot: usize) {
        if slot < self.slots {
            self.steering.clear_watchers(slot);
        }
    }

    /// Starts counting `--max-conns` for worker `id` of `slot` from now.
    pub fn watch_max_conns(&mut self, id: WorkerId, slot: usize, limit: u64) {
        let base = self.steering.counts(slot).assigned;
        self.max_conns.push((id, slot, base, limit));
    }

    /// Stops watching a worker that exited.
    pub fn forget(&mut self, id: WorkerId) {
        self.max_conns.retain(|m| m.0 != id);
    }

    /// Workers whose slot was given `--max-conns` connections since they started (each reported
    /// once). Checked on the [`SteerControl::tick`] period, so a worker may take a few more.
    pub fn reached_max_conns(&mut self) -> Vec<WorkerId> {
        let mut done = Vec::new();
        let steering = &self.steering;
        self.max_conns.retain(|&(id, slot, base, limit)| {
            let reached = steering.counts(slot).assigned.saturating_sub(base) >= limit;
            if reached {
                done.push(id);
            }
            !reached
        });
        done
    }

    /// When [`SteerControl::tick`] wants to run next.
    pub fn next_deadline(&self) -> Instant {
        self.next_reconcile
    }

    /// Every [`RECONCILE_INTERVAL`]: reconciles placements with what reached the workers, and
    /// finds stalled slots. `listeners(slot)` gives the slot's listening sockets (empty for a
    /// slot gone). Returns the slots that just stalled: connections wait in the queue while the
    /// worker (which reports its accepts) accepted none for `--stall-timeout`. Such a slot is
    /// ineligible at once, until it accepts again; the supervisor replaces its worker.
    pub fn tick<'a>(
        &mut self,
        now: Instant,
        listeners: impl Fn(usize) -> &'a [Socket],
    ) -> Vec<usize> {
        let mut stalled = Vec::new();
        if now < self.next_reconcile {
            return stalled;
        }
        self.next_reconcile = now + RECONCILE_INTERVAL;
        self.restore_eligibility(now);
        for slot in 0..self.slots {
            let socks = listeners(slot);
            if socks.is_empty() {
                continue;
            }
            let r = self.steering.reconcile(slot, || queue_length(socks));
            self.forgiven_total = self.forgiven_total.saturating_add(r.adjust);
            let queued = r.queued;
            let c = self.steering.counts(slot);
            match stall_step(self.stall[slot], now, queued, c, self.stall_timeout) {
                StallStep::Clear => {
                    self.stall[slot] = None;
                    if std::mem::take(&mut self.stalled[slot]) {
                        info!("steering: slot {slot} accepts again");
                    }
                }
                StallStep::Watch(since) => self.stall[slot] = Some(since),
                StallStep::Stalled => {
                    if !self.stalled[slot] {
                        self.stalled[slot] = true;
                        warn!(
                            "steering: worker slot {slot} accepted nothing for {:?} with {queued} \
                             connections waiting: no more connections for it",
                            self.stall_timeout
                        );
                        stalled.push(slot);
                    }
                }
            }
        }
        stalled.extend(self.overflow_tick(now));
        stalled
    }

    /// Every worker maps the whole table read-write, and `eligible` is the master's to write:
    /// a word that no longer says what the master last wrote (a worker that wrote another's
    /// line, or its own while draining) is put back, and that is logged (rate-limited).
    fn restore_eligibility(&mut self, now: Instant) {
        let overflow = (page::OVERFLOW, !self.overflow.is_empty());
        let slots = (0..self.slots).map(|slot| (slot, self.eligible[slot]));
        for (slot, want) in slots.chain(std::iter::once(overflow)) {
            if self.steering.restore_eligible(slot, want)
                && let Verdict::Log { suppressed } = self.tamper_log.check(now)
            {
                warn!(
                    "steering: line {slot} of the table was marked {} by something other than \
                     the master (a worker writing the shared table?); put back{}",
                    if want { "ineligible" } else { "eligible" },
                    if suppressed > 0 {
                        format!(" ({suppressed} such lines not logged)")
                    } else {
                        String::new()
                    }
                );
            }
        }
    }

    /// The overflow queue's reconciliation and stall watch: when it has held connections for `--stall-timeout` and
    /// no worker took one from it, every eligible slot that watches it and is stuck is treated
    /// as stalled (ineligible, its worker replaced): a replacement watches the queue too. Returns
    /// those slots.
    fn overflow_tick(&mut self, now: Instant) -> Vec<usize> {
        // Placements that never reached the queue (abandoned handshakes) are written off as for
        // a slot.
        let r = self
            .steering
            .reconcile(page::OVERFLOW, || queue_length(&self.overflow));
        self.forgiven_total = self.forgiven_total.saturating_add(r.adjust);
        let queued = r.queued;
        let c = self.steering.counts(page::OVERFLOW);
        let c = crate::steer::SlotCounts {
            reporting: true,
            ..c
        };
        match stall_step(self.overflow_stall, now, queued, c, self.stall_timeout) {
            StallStep::Clear => {
                self.overflow_stall = None;
                Vec::new()
            }
            StallStep::Watch(since) => {
                self.overflow_stall = Some(since);
                Vec::new()
            }
            StallStep::Stalled => {
                self.overflow_stall = None;
                let watchers: Vec<usize> = (0..self.slots)
                    .filter(|&slot| {
                        self.eligible[slot]
                            && !self.stalled[slot]
                            && self.steering.counts(slot).watches()
                    })
                    .collect();
                if watchers.is_empty() {
                    warn!(
                        "steering: {queued} connections wait in the overflow queue and no worker \
                         watches it"
                    );
                }
                for &slot in &watchers {
                    self.stalled[slot] = true;
                    warn!(
                        "steering: worker slot {slot} watches the overflow queue but took none of \
                         its {queued} connections for {:?}: no more connections for it",
                        self.stall_timeout
                    );
                }
                watchers
            }
        }
    }

    /// The table as the program sees it now, for `ctl status` and `/metrics`: each slot in use,
    /// the overflow queue's line once it is open, the build and the program's cost when known.
    pub fn status(&self) -> SteeringStatus {
        let now_ns = sys::monotonic_ns();
        let slots = (0..self.slots)
            .map(|slot| {
                let c = self.steering.counts(slot);
                SteerSlotStatus {
                    slot,
                    eligible: c.eligible,
                    load: c.load(),
                    assigned: c.assigned,
                    accepted: c.accepted,
                    closed: c.closed,
                    forgiven: c.forgiven,
                    untaken: c.untaken(),
                    stuck: c.stuck(now_ns),
                    watchers: c.watchers,
                    reporting: c.reporting,
                }
            })
            .collect();
        let overflow = (!self.overflow.is_empty()).then(|| {
            let c = self.steering.counts(page::OVERFLOW);
            OverflowStatus {
                assigned: c.assigned,
                accepted: c.accepted,
                forgiven: c.forgiven,
            }
        });
        let cost = self.program_cost();
        SteeringStatus {
            build: self
                .steering
                .scan()
                .map_or("unknown", |scan| scan.helper())
                .to_string(),
            slots,
            overflow,
            program_runs: cost.map(|c| c.0),
            program_ns_per_run: cost.map(|c| c.1),
        }
    }

    /// The programs' runs and average ns per run, when `kernel.bpf_stats_enabled` is on (the
    /// kernel counts nothing otherwise).
    fn program_cost(&self) -> Option<(u64, u64)> {
        let (ns, runs) = self.steering.run_stats();
        ns.checked_div(runs).map(|per_run| (runs, per_run))
    }

    /// One status line per slot in use (SIGUSR1), plus the programs' cost when
    /// `kernel.bpf_stats_enabled` is on.
    pub fn log_status(&self) {
        let now_ns = sys::monotonic_ns();
        for slot in 0..self.slots {
            let c = self.steering.counts(slot);
            info!(
                "status: steering slot {slot}: {} load {} assigned {} accepted {} closed {} \
                 forgiven {} rss_kib {} stuck {} watches {} watchers {}{}",
                if c.eligible { "eligible" } else { "ineligible" },
                c.load(),
                c.assigned,
                c.accepted,
                c.closed,
                c.forgiven,
                c.rss_kib,
                c.stuck(now_ns),
                c.watches(),
                c.watchers,
                if c.reporting {
                    ""
                } else {
                    " (worker does not report)"
                }
            );
        }
        if !self.overflow.is_empty() {
            let c = self.steering.counts(page::OVERFLOW);
            info!(
                "status: steering overflow queue: assigned {} accepted {} forgiven {}",
                c.assigned, c.accepted, c.forgiven
            );
        }
        if let Some((runs, per_run)) = self.program_cost() {
            info!(
                "status: steering program: {runs} runs, {per_run} ns per run \
                 (kernel.bpf_stats_enabled)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steer::SlotCounts;

    #[test]
    fn a_slot_stalls_only_when_its_queue_waits_and_nothing_is_accepted() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(1);
        let c = |accepted| SlotCounts {
            accepted,
            reporting: true,
            ..SlotCounts::default()
        };
        assert_eq!(stall_step(None, t0, 0, c(5), timeout), StallStep::Clear);
        assert_eq!(
            stall_step(None, t0, 2, c(5), timeout),
            StallStep::Watch((t0, 5))
        );
        let later = t0 + Duration::from_millis(500);
        assert_eq!(
            stall_step(Some((t0, 5)), later, 2, c(5), timeout),
            StallStep::Watch((t0, 5))
        );
        assert_eq!(
            stall_step(Some((t0, 5)), later, 2, c(6), timeout),
            StallStep::Clear
        );
        let end = t0 + timeout;
        assert_eq!(
            stall_step(Some((t0, 5)), end, 2, c(5), timeout),
            StallStep::Stalled
        );
        let silent = SlotCounts::default();
        assert_eq!(
            stall_step(Some((t0, 0)), end, 2, silent, timeout),
            StallStep::Clear
        );
    }
}
