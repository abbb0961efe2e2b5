//! `--metrics ADDR`: Prometheus text exposition (format 0.0.4) on `GET /metrics`, from a
//! [`Status`] taken per scrape. One thread with a blocking std `TcpListener` serves scrapers one
//! at a time (each with a short I/O timeout); it asks the supervisor for the status like the
//! control socket does, so the acceptor's only part is copying its table when asked and all
//! formatting happens here. Hand-written: the format is a few lines of text, and the crates
//! that write it bring registries and global state this endpoint does not need.
//!
//! The metric names are listed in docs/CONTROL.md ("Metrics").

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use log::{info, warn};

use crate::master::control::Asker;
use crate::master::status::{Status, SteerSlotStatus, SteeringStatus};

/// Read and write timeout per scrape connection.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read.
const MAX_HEAD: usize = 8 * 1024;

/// The running metrics endpoint (its thread lives as long as the master).
pub struct Server {
    addr: SocketAddr,
}

impl Server {
    /// Binds `addr` and starts the thread.
    pub fn start(addr: SocketAddr, asker: Asker) -> io::Result<Server> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(s) => {
                            if let Err(e) = serve(s, &asker) {
                                log::debug!("metrics: {e}");
                            }
                        }
                        Err(e) => {
                            warn!("metrics: accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
        info!("metrics on http://{addr}/metrics");
        Ok(Server { addr })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn serve(mut s: TcpStream, asker: &Asker) -> io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return respond(
                &mut s,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return respond(
            &mut s,
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n",
        );
    }
    if path != "/metrics" {
        return respond(&mut s, "404 Not Found", "text/plain", "see /metrics\n");
    }
    match asker.status() {
        Ok(status) => {
            let body = render(&status);
            let body = if method == "HEAD" { "" } else { &body };
            respond(
                &mut s,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            )
        }
        Err(e) => respond(
            &mut s,
            "503 Service Unavailable",
            "text/plain",
            &format!("{e}\n"),
        ),
    }
}

fn respond(s: &mut TcpStream, status: &str, ctype: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    s.flush()
}

/// Escapes a label value (exposition format: backslash, double quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
        }
    }
    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, "", value);
    }
}

/// The exposition text for one status.
pub fn render(st: &Status) -> String {
    let mut o = Out(String::with_capacity(4096));
    o.family("rcluster_build_info", "gauge", "Build information.");
    o.sample(
        "rcluster_build_info",
        &format!("version=\"{}\"", label(&st.version)),
        1,
    );
    o.family(
        "rcluster_policy_info",
        "gauge",
        "The dispatch policy and mode in use.",
    );
    o.sample(
        "rcluster_policy_info",
        &format!(
            "name=\"{}\",policy=\"{}\",mode=\"{}\"",
            label(&st.name),
            label(&st.policy),
            label(&st.mode)
        ),
        1,
    );
    o.one(
        "rcluster_uptime_seconds",
        "gauge",
        "Seconds since the master started.",
        st.uptime_s,
    );
    o.one(
        "rcluster_generation",
        "gauge",
        "Reload generation.",
        st.generation,
    );
    o.one(
        "rcluster_worker_slots",
        "gauge",
        "Worker slots wanted.",
        st.slots,
    );
    o.one(
        "rcluster_worker_slots_given_up",
        "gauge",
        "Worker slots given up after crash loops.",
        st.given_up,
    );
    o.one(
        "rcluster_reloads_total",
        "counter",
        "Rolling reloads completed.",
        st.reloads,
    );
    o.one(
        "rcluster_reloads_aborted_total",
        "counter",
        "Rolling reloads aborted.",
        st.reloads_aborted,
    );
    o.one(
        "rcluster_restarts_total",
        "counter",
        "Worker restarts after crashes.",
        st.restarts,
    );
    o.one(
        "rcluster_log_lines_dropped_total",
        "counter",
        "Worker output lines dropped because the master's stderr did not keep up.",
        st.log_lines_dropped,
    );
    o.one(
        "rcluster_accept_paused",
        "gauge",
        "1 while accepting is paused (accept error, or no worker can take a connection).",
        u8::from(st.paused),
    );
    if let Some(a) = &st.acceptor {
        o.one(
            "rcluster_accepts_total",
            "counter",
            "Connections accepted by the acceptor.",
            a.accepts,
        );
        o.one(
            "rcluster_dispatches_total",
            "counter",
            "Connections queued to a worker, counting re-placements after a bounce or reclaim.",
            a.dispatches,
        );
        o.one(
            "rcluster_bounces_total",
            "counter",
            "Connections a full worker channel sent back to be placed elsewhere.",
            a.bounces,
        );
        o.one(
            "rcluster_reclaims_total",
            "counter",
            "Connections taken back from a drained or dead worker's channel.",
            a.reclaims,
        );
        o.one(
            "rcluster_accept_pauses_total",
            "counter",
            "Times accepting paused after an accept error (EMFILE, ENFILE, ENOBUFS, ENOMEM, other).",
            a.pauses,
        );
        o.one(
            "rcluster_accept_errors_total",
            "counter",
            "accept4 errors other than EAGAIN.",
            a.accept_errors,
        );
        o.one(
            "rcluster_policy_switches_total",
            "counter",
            "Run-time policy switches.",
            a.policy_switches,
        );
        o.one(
            "rcluster_pending_connections",
            "gauge",
            "Accepted connections waiting in the master for a worker.",
            a.pending,
        );
    }
    if let Some(v) = st.imbalance {
        o.one(
            "rcluster_imbalance_ratio",
            "gauge",
            "max/mean of active connections over ready workers (1 = even).",
            v,
        );
    }
    let queued: Vec<_> = st
        .listeners
        .iter()
        .filter_map(|l| Some((l, l.queued?, l.backlog?)))
        .collect();
    if !queued.is_empty() {
        o.family(
            "rcluster_listen_queue",
            "gauge",
            "Connections waiting in a listener's accept queue (TCP_INFO).",
        );
        for (l, q, _) in &queued {
            o.sample(
                "rcluster_listen_queue",
                &format!("listener=\"{}\"", label(&l.addr)),
                q,
            );
        }
        o.family(
            "rcluster_listen_backlog",
            "gauge",
            "A listener's accept queue limit.",
        );
        for (l, _, b) in &queued {
            o.sample(
                "rcluster_listen_backlog",
                &format!("listener=\"{}\"", label(&l.addr)),
                b,
            );
        }
    }
    let labels =
        |w: &crate::master::status::WorkerStatus| format!("slot=\"{}\",pid=\"{}\"", w.slot, w.pid);
    o.family(
        "rcluster_worker_info",
        "gauge",
        "One per worker process: its generation and state.",
    );
    for w in &st.workers {
        o.sample(
            "rcluster_worker_info",
            &format!(
                "{},generation=\"{}\",state=\"{}\"",
                labels(w),
                w.generation,
                label(&w.state)
            ),
            1,
        );
    }
    type Field = fn(&crate::master::status::WorkerStatus) -> Option<f64>;
    let per_worker: [(&str, &str, &str, Field); 8] = [
        (
            "rcluster_worker_active_connections",
            "gauge",
            "Connections handed to the worker and not closed yet.",
            |w| w.active.map(|v| v as f64),
        ),
        (
            "rcluster_worker_dispatched_total",
            "counter",
            "Connections handed to the worker (less any taken back when it drained or died).",
            |w| w.dispatched.map(|v| v as f64),
        ),
        (
            "rcluster_worker_closed_total",
            "counter",
            "Connections the worker reported closed.",
            |w| w.closed.map(|v| v as f64),
        ),
        (
            "rcluster_worker_stuck",
            "gauge",
            "1 while the acceptor passes over the worker as stuck (connections untaken in its channel, no progress).",
            |w| w.stuck.map(|s| f64::from(u8::from(s))),
        ),
        (
            "rcluster_worker_rss_bytes",
            "gauge",
            "Worker resident memory.",
            |w| w.rss_kib.map(|v| (v * 1024) as f64),
        ),
        (
            "rcluster_worker_cpu_seconds_total",
            "counter",
            "Worker CPU time, user and system.",
            |w| w.cpu_s,
        ),
        (
            "rcluster_worker_uptime_seconds",
            "gauge",
            "Seconds since the worker started.",
            |w| Some(w.uptime_s),
        ),
        (
            "rcluster_worker_restarts_total",
            "counter",
            "Restarts of the worker's slot after crashes.",
            |w| Some(w.restarts as f64),
        ),
    ];
    for (name, kind, help, field) in per_worker {
        let values: Vec<_> = st
            .workers
            .iter()
            .filter_map(|w| Some((w, field(w)?)))
            .collect();
        if values.is_empty() {
            continue;
        }
        o.family(name, kind, help);
        for (w, v) in values {
            o.sample(name, &labels(w), v);
        }
    }
    if let Some(steering) = &st.steering {
        render_steering(&mut o, steering);
    }
    o.0
}

/// Kernel steering: the build, each slot's line of the table (label `slot`), the overflow
/// queue's line and the program's cost when the kernel counts it.
fn render_steering(o: &mut Out, st: &SteeringStatus) {
    o.family(
        "rcluster_steer_info",
        "gauge",
        "Kernel steering: 1, with the program's build (how it scans the slots).",
    );
    o.sample(
        "rcluster_steer_info",
        &format!("build=\"{}\"", label(&st.build)),
        1,
    );
    type Field = fn(&SteerSlotStatus) -> i128;
    let per_slot: [(&str, &str, &str, Field); 9] = [
        (
            "rcluster_steer_slot_eligible",
            "gauge",
            "1 while the steering program may pick the slot (a ready worker serves it, not stalled).",
            |s| i128::from(s.eligible),
        ),
        (
            "rcluster_steer_slot_load",
            "gauge",
            "The steering program's load for the slot: assigned - closed - forgiven.",
            |s| i128::from(s.load),
        ),
        (
            "rcluster_steer_slot_assigned_total",
            "counter",
            "Connections placed on the slot (or taken from the overflow queue by its workers) since the slot was set up.",
            |s| i128::from(s.assigned),
        ),
        (
            "rcluster_steer_slot_accepted_total",
            "counter",
            "Connections the slot's workers reported accepted.",
            |s| i128::from(s.accepted),
        ),
        (
            "rcluster_steer_slot_closed_total",
            "counter",
            "Connections the slot's workers reported closed.",
            |s| i128::from(s.closed),
        ),
        (
            "rcluster_steer_slot_forgiven",
            "gauge",
            "Placements on the slot the master wrote off (abandoned handshakes), less those taken back.",
            |s| i128::from(s.forgiven),
        ),
        (
            "rcluster_steer_slot_untaken",
            "gauge",
            "Placements on the slot neither accepted nor written off.",
            |s| i128::from(s.untaken),
        ),
        (
            "rcluster_steer_slot_stuck",
            "gauge",
            "1 while the steering program's stuck rule holds for the slot.",
            |s| i128::from(s.stuck),
        ),
        (
            "rcluster_steer_slot_watchers",
            "gauge",
            "The slot's processes that watch the overflow queue.",
            |s| i128::from(s.watchers),
        ),
    ];
    if !st.slots.is_empty() {
        for (name, kind, help, field) in per_slot {
            o.family(name, kind, help);
            for s in &st.slots {
                o.sample(name, &format!("slot=\"{}\"", s.slot), field(s));
            }
        }
    }
    if let Some(q) = &st.overflow {
        o.one(
            "rcluster_steer_overflow_assigned_total",
            "counter",
            "Connections the steering program placed on the overflow queue.",
            q.assigned,
        );
        o.one(
            "rcluster_steer_overflow_accepted_total",
            "counter",
            "Connections workers took from the overflow queue.",
            q.accepted,
        );
    }
    if let Some(ns) = st.program_ns_per_run {
        o.one(
            "rcluster_steer_program_ns_per_run",
            "gauge",
            "The steering program's average cost per run (kernel.bpf_stats_enabled=1).",
            ns,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steering_is_exposed_per_slot() {
        let view = crate::master::status::tests::steered_view();
        let ready = view.workers[3].pid;
        let text = render(&Status::build(view, None));
        for line in [
            "rcluster_policy_info{name=\"web\",policy=\"least-conn\",mode=\"kernel-steered reuseport\"} 1",
            "rcluster_steer_info{build=\"bpf_loop\"} 1",
            "# TYPE rcluster_steer_slot_load gauge",
            "rcluster_steer_slot_load{slot=\"0\"} 3",
            "rcluster_steer_slot_load{slot=\"2\"} -1",
            "# TYPE rcluster_steer_slot_assigned_total counter",
            "rcluster_steer_slot_assigned_total{slot=\"1\"} 8",
            "rcluster_steer_slot_closed_total{slot=\"2\"} 3",
            "rcluster_steer_slot_forgiven{slot=\"0\"} 1",
            "rcluster_steer_slot_untaken{slot=\"0\"} -1",
            "rcluster_steer_slot_stuck{slot=\"1\"} 1",
            "rcluster_steer_slot_eligible{slot=\"2\"} 0",
            "rcluster_steer_slot_watchers{slot=\"0\"} 1",
            "rcluster_steer_overflow_assigned_total 7",
            "rcluster_steer_overflow_accepted_total 6",
            "rcluster_steer_program_ns_per_run 85",
            "rcluster_imbalance_ratio 1.5",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        // The ready worker's series come from its slot's line.
        let active = format!("rcluster_worker_active_connections{{slot=\"0\",pid=\"{ready}\"}} 3");
        assert!(text.lines().any(|l| l == active), "{text}");
        let dispatched =
            format!("rcluster_worker_dispatched_total{{slot=\"0\",pid=\"{ready}\"}} 10");
        assert!(text.lines().any(|l| l == dispatched), "{text}");
    }

    #[test]
    fn no_steering_series_without_steering() {
        let mut view = crate::master::status::tests::steered_view();
        view.steering = None;
        view.mode = "reuseport".into();
        let text = render(&Status::build(view, None));
        assert!(!text.contains("rcluster_steer_"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
