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
    /// dispatch, reuseport or shared.
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
    /// Connections handed to it and not closed yet (dispatch mode).
    pub active: Option<u64>,
    /// Connections handed to it (dispatch mode).
    pub dispatched: Option<u64>,
    /// Connections it closed (dispatch mode).
    pub closed: Option<u64>,
    /// The acceptor marked it stuck: connections untaken in its channel for 1 ms with no sign
    /// of progress, so load-aware policies pass over it (dispatch mode).
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
    /// dispatch, reuseport or shared.
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
    /// max/mean of active connections over ready workers (1.0 = even; dispatch mode).
    pub imbalance: Option<f64>,
    /// Workers, by slot.
    pub workers: Vec<WorkerStatus>,
}

impl Status {
    /// Merges the two views, reading each worker's RSS and CPU time from /proc now.
    pub fn build(view: SupervisorView, acc: Option<acceptor::Snapshot>) -> Status {
        let mut workers: Vec<WorkerStatus> = view
            .workers
            .iter()
            .map(|w| {
                let a = acc
                    .as_ref()
                    .and_then(|a| a.workers.iter().find(|x| x.id == w.id));
                WorkerStatus {
                    slot: w.slot,
                    id: w.id,
                    pid: w.pid,
                    generation: w.generation,
                    state: w.state.to_string(),
                    uptime_s: w.uptime.as_secs_f64(),
                    active: a.map(|a| a.dispatched.saturating_sub(a.closed)),
                    dispatched: a.map(|a| a.dispatched),
                    closed: a.map(|a| a.closed),
                    stuck: a.map(|a| a.stuck),
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
        let imbalance = acc.as_ref().and_then(|_| {
            imbalance(
                workers
                    .iter()
                    .filter(|w| w.state == "ready")
                    .filter_map(|w| w.active),
            )
        });
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
                vals.iter().sum::<u64>().to_string()
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

/// max/mean of the values; 1.0 when all are equal (or all zero), `None` without values.
pub fn imbalance(values: impl Iterator<Item = u64>) -> Option<f64> {
    let (mut n, mut sum, mut max) = (0u64, 0u64, 0u64);
    for v in values {
        n += 1;
        sum += v;
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
mod tests {
    use super::*;

    #[test]
    fn imbalance_is_max_over_mean() {
        assert_eq!(imbalance([].into_iter()), None);
        assert_eq!(imbalance([0, 0].into_iter()), Some(1.0));
        assert_eq!(imbalance([2, 2, 2].into_iter()), Some(1.0));
        assert_eq!(imbalance([4, 0].into_iter()), Some(2.0));
        assert_eq!(imbalance([3, 1].into_iter()), Some(1.5));
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
