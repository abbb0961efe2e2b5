//! The master's own notifications to its service manager (sd_notify(3)): `READY=1` once every
//! worker is ready, `RELOADING=1` with `MONOTONIC_USEC=` when a rolling reload starts and
//! `READY=1` when it completes or is aborted, `STOPPING=1` on shutdown, `STATUS=` with the
//! workers and the policy, and `WATCHDOG=1` every half `WATCHDOG_USEC` when systemd asks for it.
//!
//! Read from `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket) at start; without it
//! every call does nothing. The supervisor (main thread) owns the one unbound datagram socket;
//! a send that fails is logged once at debug level and otherwise ignored, as sd_notify's are:
//! the service runs the same with or without a manager listening.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::time::{Duration, Instant};

use crate::master::lifecycle::{Lifecycle, Phase, SlotState, WorkerState};
use crate::sys;

/// Where the notifications go, the watchdog period, and what was last announced (the
/// supervisor calls [`ServiceNotifier::observe`] after every lifecycle step; notifications go
/// out on the edges).
pub struct ServiceNotifier {
    target: Option<(UnixDatagram, UnixAddr)>,
    watchdog: Option<Duration>,
    next_ping: Option<Instant>,
    seen: Seen,
}

/// What the service manager has been told.
#[derive(Default)]
struct Seen {
    ready: bool,
    reloading: bool,
    stopping: bool,
    status: String,
}

impl ServiceNotifier {
    /// From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (which, when set, must be this
    /// process: a watchdog meant for someone else is not ours to feed).
    pub fn from_env() -> ServiceNotifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|v| {
            let addr = notify_addr(v.as_encoded_bytes())?;
            let sock = UnixDatagram::unbound().ok()?;
            sock.set_nonblocking(true).ok()?;
            Some((sock, addr))
        });
        let pid_ok = std::env::var("WATCHDOG_PID")
            .map(|p| p.trim() == sys::getpid().to_string())
            .unwrap_or(true);
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&us| us > 0 && pid_ok && target.is_some())
            .map(Duration::from_micros);
        ServiceNotifier {
            target,
            watchdog,
            next_ping: watchdog.map(|_| Instant::now()),
            seen: Seen::default(),
        }
    }

    /// Compares the lifecycle with what was last announced and sends what changed: `READY=1`
    /// the first time every wanted worker is ready, `RELOADING=1` when a reload starts and
    /// `READY=1` when it ends (completed or aborted), `STOPPING=1` when the stop begins, and
    /// `STATUS=` whenever the line changes.
    pub fn observe(&mut self, lifecycle: &Lifecycle, policy: &str) {
        if self.target.is_none() {
            return;
        }
        let ready = lifecycle
            .workers()
            .iter()
            .filter(|w| w.state == WorkerState::Ready)
            .count();
        let wanted = lifecycle
            .slots()
            .iter()
            .filter(|s| s.state != SlotState::Removed)
            .count();
        let stopping = matches!(lifecycle.phase(), Phase::Stopping { .. });
        let status = format!(
            "{ready}/{wanted} workers ready, policy {policy}, generation {}",
            lifecycle.generation()
        );
        if stopping {
            if !self.seen.stopping {
                self.stopping(&status);
            }
        } else if lifecycle.reloading() && !self.seen.reloading {
            self.reloading(&status);
            self.seen.reloading = true;
        } else if self.seen.reloading && !lifecycle.reloading() {
            self.seen.reloading = false;
            self.ready(&status);
        } else if !self.seen.ready && ready == wanted && wanted > 0 {
            self.seen.ready = true;
            self.ready(&status);
        } else if status != self.seen.status {
            self.status(&status);
        }
        self.seen.status = status;
    }

    /// Sends one notification (newline-separated assignments).
    pub fn send(&self, msg: &str) {
        if let Some((sock, addr)) = &self.target
            && let Err(e) = sock.send_to_addr(msg.as_bytes(), addr)
        {
            log::debug!("NOTIFY_SOCKET: cannot send {msg:?}: {e}");
        }
    }

    /// `READY=1` with a status line.
    fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// `RELOADING=1` with the reload's start on the monotonic clock, as `Type=notify-reload`
    /// expects.
    fn reloading(&self, status: &str) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS={status}",
            sys::monotonic_usec()
        ));
    }

    /// `STOPPING=1` (once).
    pub fn stopping(&mut self, status: &str) {
        if !std::mem::replace(&mut self.seen.stopping, true) {
            self.send(&format!("STOPPING=1\nSTATUS={status}"));
        }
    }

    /// `STATUS=` only.
    fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    /// When the watchdog must next be fed (for the supervisor's poll timeout).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.next_ping
    }

    /// Feeds the watchdog if it is due: from the supervisor's loop, so a wedged supervisor stops
    /// feeding it and systemd restarts the service.
    pub fn on_timer(&mut self, now: Instant) {
        if let (Some(period), Some(at)) = (self.watchdog, self.next_ping)
            && now >= at
        {
            self.send("WATCHDOG=1");
            self.next_ping = Some(now + period / 2);
        }
    }
}

/// `NOTIFY_SOCKET`'s value as an address: `@name` is abstract, anything else a path.
fn notify_addr(value: &[u8]) -> Option<UnixAddr> {
    match value {
        [] => None,
        [b'@', name @ ..] => UnixAddr::from_abstract_name(name).ok(),
        path => UnixAddr::from_pathname(std::ffi::OsStr::from_bytes(path)).ok(),
    }
}
