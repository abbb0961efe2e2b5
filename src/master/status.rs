//! The cluster's status as one value: what `ctl status` prints (as a table or JSON) and what
//! `/metrics` exposes. Built by [`Status::build`] from the supervisor's view of its workers
//! ([`SupervisorView`], taken on the main thread) and the acceptor's copy of its table
//! ([`acceptor::Snapshot`], taken on the acceptor thread when asked), merged on the thread that
//! serves the request, so neither the supervisor nor the acceptor formats or waits.

use std::fmt::Write;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::master::acceptor::{self, Counters, WorkerId};
use crate::sys::Pid;

/// One worker as the supervisor sees it.
#[derive(Debug, Clone)]
pub struct SupervisorWorker {
    /// Its id (never reused).
    pub id: WorkerId,
    /// Its slot.
    pub slot: usize,
    /// Its pid.
    pub pid: Pid,
    /// The reload generation it was started in.
    pub generation: u64,
    /// `starting`, `ready` or `draining`.
    pub state: &'static str,
    /// How long it has run.
    pub uptime: Duration,
    /// Times its slot restarted a worker after a crash.
    pub restarts: u64,
}

/// What the supervisor knows, copied on its thread.
#[derive(Debug, Clone)]
pub struct SupervisorView {
    /// The master's name (control socket, pid file).
    pub name: String,
    /// The master's pid.
    pub pid: Pid,
    /// The dispatch policy in use.
    pub policy: String,
    /// dispatch, reuseport or shared; [`KERNEL_STEERED`] under kernel steering.
    pub mode: String,
    /// Bound addresses.
    pub listeners: Vec<String>,
    /// Current generation.
    pub generation: u64,
    /// How long the master has run.
    pub uptime: Duration,
    /// Workers, by slot.
    pub workers: Vec<SupervisorWorker>,
    /// Slots wanted (active).
    pub slots: usize,
    /// Slots given up after crash loops.
    pub given_up: usize,
    /// Reloads completed.
    pub reloads: u64,
    /// Reloads aborted.
    pub reloads_aborted: u64,
    /// Worker restarts after crashes, all slots.
    pub restarts: u64,
    /// A reload is running.
    pub reloading: bool,
    /// The master is stopping.
    pub stopping: bool,
    /// Reuseport/shared modes: each listening socket's accept queue, if readable.
    pub listen_queues: Vec<Option<(u32, u32)>>,
    /// Worker output lines dropped because the master's stderr did not keep up.
    pub log_lines_dropped: u64,
    /// Kernel steering: the program's table, read when the status was taken.
    pub steering: Option<SteeringStatus>,
}

/// The mode string of a kernel-steered master (its workers run in reuseport mode; the program
/// places each connection).
pub const KERNEL_STEERED: &str = "kernel-steered reuseport";

/// Kernel steering in [`Status`]: the shared table as the program sees it (docs/PROTOCOL.md §7).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SteeringStatus {
    /// The program's build: `bpf_loop` or `bpf_for_each_map_elem` (how it scans the slots), or
    /// `unknown` for a program passed in by `steer-load`.
    pub build: String,
    /// Each slot in use, by slot.
    pub slots: Vec<SteerSlotStatus>,
    /// The overflow queue's line, once the queue is open.
    pub overflow: Option<OverflowStatus>,
    /// Program runs counted by the kernel, when `kernel.bpf_stats_enabled` is on.
    pub program_runs: Option<u64>,
    /// The program's average cost, ns per run, when `kernel.bpf_stats_enabled` is on.
    pub program_ns_per_run: Option<u64>,
}

/// One slot's line of the steering table in [`SteeringStatus`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SteerSlotStatus {
    /// The slot.
    pub slot: usize,
    /// A ready worker serves it and it is not stalled: the program may pick it.
    pub eligible: bool,
    /// The program's load figure, `assigned - closed - forgiven` (negative if a worker
    /// miscounts).
    pub load: i64,
    /// Connections placed on it by the program, plus those its workers took from the overflow
    /// queue.
    pub assigned: u64,
    /// Connections its workers accepted (when they report).
    pub accepted: u64,
    /// Connections its workers closed (when they report).
    pub closed: u64,
    /// Placements the master wrote off (abandoned handshakes) or, negative, took back.
    pub forgiven: i64,
    /// Placements neither accepted nor written off: `assigned - accepted - forgiven`.
    pub untaken: i64,
    /// The program's stuck rule holds for it now (it comes after every slot that is not).
    pub stuck: bool,
    /// Its processes that watch the overflow queue.
    pub watchers: u32,
    /// Its worker counts accepts and closes on the table (else `load` counts placements only).
    pub reporting: bool,
}

/// The overflow queue's line of the steering table in [`SteeringStatus`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OverflowStatus {
    /// Connections the program placed on the queue.
    pub assigned: u64,
    /// Connections workers took from it.
    pub accepted: u64,
    /// Placements the master wrote off (never reached the queue).
    pub forgiven: i64,
}

/// One worker in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerStatus {
    /// Slot (stable across restarts).
    pub slot: usize,
    /// Worker id (never reused).
    pub id: u64,
    /// Pid.
    pub pid: i32,
    /// Reload generation.
    pub generation: u64,
    /// `starting`, `ready` or `draining`.
    pub state: String,
    /// Seconds since it started.
    pub uptime_s: f64,
    /// Connections handed to it and not closed yet. Dispatch mode: from the acceptor's table.
    /// Kernel steering, for the slot's ready worker: its slot's load (`assigned - closed -
    /// forgiven`, 0 if negative). `None` otherwise.
    pub active: Option<u64>,
    /// Connections handed to it. Dispatch mode: queued to it by the acceptor. Kernel steering,
    /// for the slot's ready worker: its slot's `assigned` (placed by the program, or taken from
    /// the overflow queue) since the slot was last set up. `None` otherwise.
    pub dispatched: Option<u64>,
    /// Connections it closed. Dispatch mode: as it reported. Kernel steering, for the slot's
    /// ready worker: its slot's `closed`. `None` otherwise.
    pub closed: Option<u64>,
    /// Passed over as stuck. Dispatch mode: the acceptor marked it (connections untaken in its
    /// channel for 1 ms with no sign of progress). Kernel steering, for the slot's ready
    /// worker: the program's stuck rule holds for its slot. `None` otherwise.
    #[serde(default)]
    pub stuck: Option<bool>,
    /// Resident memory, KiB, read when the status was taken.
    pub rss_kib: Option<u64>,
    /// Restarts of its slot after crashes.
    pub restarts: u64,
    /// CPU time used, seconds (user + system).
    pub cpu_s: Option<f64>,
}

/// One listening socket in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ListenerStatus {
    /// Bound address.
    pub addr: String,
    /// Connections waiting in its accept queue (`TCP_INFO`), when readable.
    pub queued: Option<u32>,
    /// Its backlog limit, when readable.
    pub backlog: Option<u32>,
}

/// The acceptor's running totals in [`Status`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AcceptorStatus {
    /// Connections accepted.
    pub accepts: u64,
    /// Connections queued to a worker (again after a bounce or reclaim).
    pub dispatches: u64,
    /// Connections a full channel sent back.
    pub bounces: u64,
    /// Accept pauses after errors.
    pub pauses: u64,
    /// Connections taken back from drained or dead workers.
    pub reclaims: u64,
    /// accept4 errors other than EAGAIN.
    pub accept_errors: u64,
    /// Run-time policy switches.
    pub policy_switches: u64,
    /// Accepted connections waiting in the master.
    pub pending: u64,
}

impl From<(Counters, usize)> for AcceptorStatus {
    fn from((c, pending): (Counters, usize)) -> Self {
        AcceptorStatus {
            accepts: c.accepts,
            dispatches: c.dispatches,
            bounces: c.bounces,
            pauses: c.pauses,
            reclaims: c.reclaims,
            accept_errors: c.accept_errors,
            policy_switches: c.policy_switches,
            pending: pending as u64,
        }
    }
}

/// The whole cluster at one moment: the `status` answer of the control protocol.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// The master's name.
    pub name: String,
    /// The master's pid.
    pub pid: i32,
    /// rcluster-lb version.
    pub version: String,
    /// Dispatch policy.
    pub policy: String,
    /// dispatch, reuseport or shared; `kernel-steered reuseport` under kernel steering.
    pub mode: String,
    /// Listening sockets.
    pub listeners: Vec<ListenerStatus>,
    /// Current generation.
    pub generation: u64,
    /// Seconds since the master started.
    pub uptime_s: f64,
    /// Accepting is paused (after an accept error, or no worker can take a connection).
    pub paused: bool,
    /// A reload is running.
    pub reloading: bool,
    /// The master is stopping.
    pub stopping: bool,
    /// Worker slots wanted.
    pub slots: usize,
    /// Slots given up after crash loops.
    pub given_up: usize,
    /// Reloads completed.
    pub reloads: u64,
    /// Reloads aborted.
    pub reloads_aborted: u64,
    /// Worker restarts after crashes.
    pub restarts: u64,
    /// Worker output lines dropped (the master's stderr did not keep up).
    pub log_lines_dropped: u64,
    /// Dispatch mode: the acceptor's totals.
    pub acceptor: Option<AcceptorStatus>,
    /// max/mean of active connections over ready workers (1.0 = even; dispatch mode and kernel
    /// steering).
    pub imbalance: Option<f64>,
    /// Workers, by slot.
    pub workers: Vec<WorkerStatus>,
    /// Kernel steering: the program's table. `None` otherwise (and from older masters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steering: Option<SteeringStatus>,
}

impl Status {
    /// Merges the two views, reading each worker's RSS and CPU time from /proc now.
    pub fn build(view: SupervisorView, acc: Option<acceptor::Snapshot>) -> Status {
        let mut workers: Vec<WorkerStatus> = view
            .workers
            .iter()
            .map(|w| {
                // (active, dispatched, closed, stuck): the acceptor's, or the slot's line of the
                // steering table for the slot's ready worker.
                let counts = acc
                    .as_ref()
                    .and_then(|a| a.workers.iter().find(|x| x.id == w.id))
                    .map(|a| {
                        (
                            a.dispatched.saturating_sub(a.closed),
                            a.dispatched,
                            a.closed,
                            a.stuck,
                        )
                    })
                    .or_else(|| {
                        steered_line(&view, w)
                            .map(|l| (l.load.max(0).unsigned_abs(), l.assigned, l.closed, l.stuck))
                    });
                WorkerStatus {
                    slot: w.slot,
                    id: w.id,
                    pid: w.pid,
                    generation: w.generation,
                    state: w.state.to_string(),
                    uptime_s: w.uptime.as_secs_f64(),
                    active: counts.map(|c| c.0),
                    dispatched: counts.map(|c| c.1),
                    closed: counts.map(|c| c.2),
                    stuck: counts.map(|c| c.3),
                    rss_kib: crate::sys::rss_bytes(w.pid).ok().map(|b| b / 1024),
                    restarts: w.restarts,
                    cpu_s: crate::sys::cpu_seconds(w.pid).ok(),
                }
            })
            .collect();
        workers.sort_by_key(|w| (w.slot, w.id));
        let queues = match &acc {
            Some(a) => a.listen_queues.clone(),
            None => view.listen_queues.clone(),
        };
        let listeners = view
            .listeners
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let q = queues.get(i).copied().flatten();
                ListenerStatus {
                    addr: addr.clone(),
                    queued: q.map(|q| q.0),
                    backlog: q.map(|q| q.1),
                }
            })
            .collect();
        // Over the ready workers with a count: none outside dispatch mode and kernel steering.
        let imbalance = imbalance(
            workers
                .iter()
                .filter(|w| w.state == "ready")
                .filter_map(|w| w.active),
        );
        let paused = acc.as_ref().is_some_and(|a| {
            a.paused
                || a.pending > 0
                || (!a.workers.is_empty() && a.workers.iter().all(|w| w.open == 0))
        });
        Status {
            name: view.name,
            pid: view.pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            policy: view.policy,
            mode: view.mode,
            listeners,
            generation: view.generation,
            uptime_s: view.uptime.as_secs_f64(),
            paused,
            reloading: view.reloading,
            stopping: view.stopping,
            slots: view.slots,
            given_up: view.given_up,
            reloads: view.reloads,
            reloads_aborted: view.reloads_aborted,
            restarts: view.restarts,
            log_lines_dropped: view.log_lines_dropped,
            acceptor: acc.map(|a| AcceptorStatus::from((a.counters, a.pending))),
            imbalance,
            workers,
            steering: view.steering,
        }
    }

    /// The `pm2 ls`-like table `ctl status` prints.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "rcluster-lb {} '{}' pid {} up {}  policy {} ({} mode)  generation {}{}{}",
            self.version,
            self.name,
            self.pid,
            short_duration(self.uptime_s),
            self.policy,
            self.mode,
            self.generation,
            if self.reloading { "  reloading" } else { "" },
            if self.stopping { "  stopping" } else { "" },
        );
        if let Some(st) = &self.steering {
            let _ = writeln!(out, "{}", steering_line(st));
        }
        for l in &self.listeners {
            let _ = writeln!(
                out,
                "listening on {}  accept queue {}",
                l.addr,
                match (l.queued, l.backlog) {
                    (Some(q), Some(b)) => format!("{q}/{b}"),
                    _ => "-".to_string(),
                }
            );
        }
        let headers = [
            "slot",
            "pid",
            "gen",
            "state",
            "uptime",
            "active",
            "dispatched",
            "closed",
            "rss",
            "restarts",
            "cpu",
        ];
        let mut rows: Vec<[String; 11]> = Vec::new();
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        for w in &self.workers {
            rows.push([
                w.slot.to_string(),
                w.pid.to_string(),
                w.generation.to_string(),
                w.state.clone(),
                short_duration(w.uptime_s),
                opt(w.active),
                opt(w.dispatched),
                opt(w.closed),
                w.rss_kib.map_or("-".into(), format_kib),
                w.restarts.to_string(),
                w.cpu_s.map_or("-".into(), |c| format!("{c:.2}s")),
            ]);
        }
        let sum = |f: fn(&WorkerStatus) -> Option<u64>| -> String {
            let vals: Vec<u64> = self.workers.iter().filter_map(f).collect();
            if vals.is_empty() {
                "-".into()
            } else {
                // Saturating: under kernel steering the counts come from a table workers write.
                vals.iter()
                    .fold(0u64, |a, v| a.saturating_add(*v))
                    .to_string()
            }
        };
        let total_rss: u64 = self.workers.iter().filter_map(|w| w.rss_kib).sum();
        // A fold from 0.0: an empty f64 sum is -0.0, which prints as "-0.00s".
        let total_cpu = self
            .workers
            .iter()
            .filter_map(|w| w.cpu_s)
            .fold(0.0, |a, b| a + b);
        rows.push([
            "total".into(),
            String::new(),
            String::new(),
            format!("{} workers", self.workers.len()),
            String::new(),
            sum(|w| w.active),
            sum(|w| w.dispatched),
            sum(|w| w.closed),
            format_kib(total_rss),
            self.restarts.to_string(),
            format!("{total_cpu:.2}s"),
        ]);
        let mut widths = headers.map(str::len);
        for r in &rows {
            for (w, cell) in widths.iter_mut().zip(r) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: &[&str]| -> String {
            let mut s = String::new();
            for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
                if i > 0 {
                    s.push_str("  ");
                }
                // Numbers right-aligned, words left-aligned.
                if i == 3 {
                    let _ = write!(s, "{c:<w$}");
                } else {
                    let _ = write!(s, "{c:>w$}");
                }
            }
            s.trim_end().to_string()
        };
        let _ = writeln!(out, "{}", line(&headers));
        for r in &rows {
            let cells: Vec<&str> = r.iter().map(String::as_str).collect();
            let _ = writeln!(out, "{}", line(&cells));
        }
        if let Some(a) = &self.acceptor {
            let _ = writeln!(
                out,
                "acceptor: accepts {}  dispatches {}  bounces {}  reclaims {}  accept errors {}  \
                 pauses {}  waiting {}{}",
                a.accepts,
                a.dispatches,
                a.bounces,
                a.reclaims,
                a.accept_errors,
                a.pauses,
                a.pending,
                if self.paused { "  PAUSED" } else { "" },
            );
        }
        let _ = writeln!(
            out,
            "imbalance (max/mean active): {}  reloads {} (aborted {})  restarts {}  slots {} (given up {})",
            self.imbalance.map_or("-".into(), |v| format!("{v:.2}")),
            self.reloads,
            self.reloads_aborted,
            self.restarts,
            self.slots,
            self.given_up,
        );
        if self.log_lines_dropped > 0 {
            let _ = writeln!(
                out,
                "worker output lines dropped: {}",
                self.log_lines_dropped
            );
        }
        out
    }
}

/// Kernel steering: worker `w`'s slot's line of the table when `w` is the slot's ready worker
/// (the newest, should two be ready), the one the line's `eligible` stands for. A starting or
/// draining worker of the slot has none: the line's counts are not its own.
fn steered_line<'a>(view: &'a SupervisorView, w: &SupervisorWorker) -> Option<&'a SteerSlotStatus> {
    let steering = view.steering.as_ref()?;
    let owner = view
        .workers
        .iter()
        .filter(|x| x.slot == w.slot && x.state == "ready")
        .max_by_key(|x| x.id)?;
    if owner.id != w.id {
        return None;
    }
    steering.slots.iter().find(|l| l.slot == w.slot)
}

/// The status table's steering line: the build, how many slots the program may pick and how
/// many look stuck, the overflow queue's totals and the program's cost when known.
fn steering_line(st: &SteeringStatus) -> String {
    let eligible = st.slots.iter().filter(|s| s.eligible).count();
    let stuck = st.slots.iter().filter(|s| s.stuck).count();
    let mut line = format!(
        "steering: kernel ({} scan)  slots eligible {eligible}/{}  stuck {stuck}",
        st.build,
        st.slots.len()
    );
    if let Some(o) = &st.overflow {
        let _ = write!(
            line,
            "  overflow queue: assigned {} accepted {}",
            o.assigned, o.accepted
        );
    }
    if let Some(ns) = st.program_ns_per_run {
        let _ = write!(line, "  program {ns} ns per run");
    }
    line
}

/// max/mean of the values; 1.0 when all are equal (or all zero), `None` without values.
pub fn imbalance(values: impl Iterator<Item = u64>) -> Option<f64> {
    let (mut n, mut sum, mut max) = (0u64, 0u64, 0u64);
    for v in values {
        n += 1;
        sum = sum.saturating_add(v); // a worker's table line can say anything
        max = max.max(v);
    }
    if n == 0 {
        return None;
    }
    if sum == 0 {
        return Some(1.0);
    }
    Some(max as f64 / (sum as f64 / n as f64))
}

fn short_duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{secs:.0}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

fn format_kib(kib: u64) -> String {
    if kib >= 1024 * 1024 {
        format!("{:.1}G", kib as f64 / (1024.0 * 1024.0))
    } else if kib >= 1024 {
        format!("{:.1}M", kib as f64 / 1024.0)
    } else {
        format!("{kib}K")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// No such process (beyond any `pid_max`): nothing is read from /proc.
    const NO_PID: Pid = i32::MAX;

    fn worker(id: WorkerId, slot: usize, state: &'static str) -> SupervisorWorker {
        SupervisorWorker {
            id,
            slot,
            pid: NO_PID - id as Pid,
            generation: 0,
            state,
            uptime: Duration::from_secs(3),
            restarts: 0,
        }
    }

    fn line(slot: usize, assigned: u64, closed: u64, forgiven: i64) -> SteerSlotStatus {
        SteerSlotStatus {
            slot,
            eligible: true,
            load: assigned as i64 - closed as i64 - forgiven,
            assigned,
            accepted: assigned,
            closed,
            forgiven,
            untaken: -forgiven,
            stuck: false,
            watchers: 1,
            reporting: true,
        }
    }

    /// A kernel-steered master as the supervisor would see it: slot 0's ready worker (id 4,
    /// load 3) beside a draining one (id 1); slot 1's ready worker (id 2, load 3, stuck) beside
    /// a starting replacement (id 5); slot 2's worker (id 3) counted more closes than
    /// placements (load -1).
    pub(crate) fn steered_view() -> SupervisorView {
        let mut stuck = line(1, 8, 5, 0);
        stuck.stuck = true;
        let mut behind = line(2, 2, 3, 0);
        behind.eligible = false;
        SupervisorView {
            name: "web".into(),
            pid: NO_PID,
            policy: "least-conn".into(),
            mode: KERNEL_STEERED.into(),
            listeners: vec!["127.0.0.1:8080".into()],
            generation: 1,
            uptime: Duration::from_secs(10),
            workers: vec![
                worker(1, 0, "draining"),
                worker(2, 1, "ready"),
                worker(3, 2, "ready"),
                worker(4, 0, "ready"),
                worker(5, 1, "starting"),
            ],
            slots: 3,
            given_up: 0,
            reloads: 1,
            reloads_aborted: 0,
            restarts: 0,
            reloading: false,
            stopping: false,
            listen_queues: vec![Some((0, 4096))],
            log_lines_dropped: 0,
            steering: Some(SteeringStatus {
                build: "bpf_loop".into(),
                slots: vec![line(0, 10, 6, 1), stuck, behind],
                overflow: Some(OverflowStatus {
                    assigned: 7,
                    accepted: 6,
                    forgiven: 1,
                }),
                program_runs: Some(18),
                program_ns_per_run: Some(85),
            }),
        }
    }

    #[test]
    fn a_steered_status_fills_the_ready_workers_from_the_table() {
        let st = Status::build(steered_view(), None);
        assert_eq!(st.mode, "kernel-steered reuseport");
        let counts = |id: u64| {
            let w = st.workers.iter().find(|w| w.id == id).unwrap();
            (w.active, w.dispatched, w.closed, w.stuck)
        };
        assert_eq!(counts(4), (Some(3), Some(10), Some(6), Some(false)));
        assert_eq!(counts(2), (Some(3), Some(8), Some(5), Some(true)));
        // A negative load is shown as 0.
        assert_eq!(counts(3), (Some(0), Some(2), Some(3), Some(false)));
        // The slot's line is its ready worker's, not a draining or starting one's.
        assert_eq!(counts(1), (None, None, None, None));
        assert_eq!(counts(5), (None, None, None, None));
        // max/mean of 3, 3, 0 over the ready workers.
        assert_eq!(st.imbalance, Some(1.5));
        assert_eq!(st.steering.as_ref().unwrap().slots.len(), 3);
    }

    #[test]
    fn the_steering_section_is_optional_in_json() {
        let st = Status::build(steered_view(), None);
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(json["steering"]["build"], "bpf_loop");
        assert_eq!(json["steering"]["slots"][1]["stuck"], true);
        assert_eq!(json["steering"]["overflow"]["assigned"], 7);
        assert_eq!(json["steering"]["program_ns_per_run"], 85);
        assert_eq!(serde_json::from_value::<Status>(json).unwrap(), st);
        // Not steering: no section written, and an answer without one (an older master's) reads.
        let plain = Status::build(
            SupervisorView {
                mode: "reuseport".into(),
                steering: None,
                ..steered_view()
            },
            None,
        );
        let mut json = serde_json::to_value(&plain).unwrap();
        assert!(json.get("steering").is_none(), "{json}");
        assert!(plain.workers.iter().all(|w| w.active.is_none()));
        assert_eq!(plain.imbalance, None);
        json.as_object_mut().unwrap().remove("steering");
        assert_eq!(serde_json::from_value::<Status>(json).unwrap(), plain);
    }

    #[test]
    fn the_table_says_the_kernel_steers() {
        let table = Status::build(steered_view(), None).table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].contains("(kernel-steered reuseport mode)"),
            "{table}"
        );
        assert_eq!(
            lines[1],
            "steering: kernel (bpf_loop scan)  slots eligible 2/3  stuck 1  \
             overflow queue: assigned 7 accepted 6  program 85 ns per run",
        );
        let total = lines.iter().find(|l| l.starts_with("total")).unwrap();
        // active 3 + 3 + 0, dispatched 10 + 8 + 2, closed 6 + 5 + 3.
        let cells: Vec<&str> = total.split_whitespace().collect();
        assert_eq!(
            cells,
            ["total", "5", "workers", "6", "20", "14", "0K", "0", "0.00s"],
            "{table}"
        );
        // Without the build or the cost: only what is known.
        let mut view = steered_view();
        if let Some(s) = view.steering.as_mut() {
            s.build = "unknown".into();
            s.overflow = None;
            s.program_ns_per_run = None;
        }
        let table = Status::build(view, None).table();
        assert_eq!(
            table.lines().nth(1),
            Some("steering: kernel (unknown scan)  slots eligible 2/3  stuck 1")
        );
    }

    #[test]
    fn imbalance_is_max_over_mean() {
        assert_eq!(imbalance([].into_iter()), None);
        assert_eq!(imbalance([0, 0].into_iter()), Some(1.0));
        assert_eq!(imbalance([2, 2, 2].into_iter()), Some(1.0));
        assert_eq!(imbalance([4, 0].into_iter()), Some(2.0));
        assert_eq!(imbalance([3, 1].into_iter()), Some(1.5));
        // Counts a lying worker wrote into the steering table saturate rather than overflow.
        let huge = imbalance([u64::MAX, u64::MAX, 1].into_iter()).unwrap();
        assert!(huge.is_finite() && huge >= 1.0, "{huge}");
    }

    #[test]
    fn durations_and_sizes_are_short() {
        assert_eq!(short_duration(5.2), "5s");
        assert_eq!(short_duration(125.0), "2m5s");
        assert_eq!(short_duration(7300.0), "2h1m");
        assert_eq!(format_kib(512), "512K");
        assert_eq!(format_kib(2048), "2.0M");
    }
}
