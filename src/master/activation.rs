//! Listeners passed to the master by socket activation (sd_listen_fds(3)): with `LISTEN_PID`
//! equal to the master's pid, fds `3..3+LISTEN_FDS` are listening sockets a service manager
//! (or `systemd-socket-activate`) bound, so a privileged port needs no root and a master
//! restart drops no connection: what queued while no master ran is served by the next.
//!
//! Each `--listen` address takes the inherited socket bound to exactly that address; the rest
//! are bound as usual. Without `--listen`, the inherited sockets are the listeners, in fd order.
//! An inherited socket no `--listen` names is closed with a warning. Called once on the main
//! thread before anything else opens an fd; the sockets then belong to the supervisor.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

use log::warn;
use socket2::Socket;

use crate::master::listener;
use crate::sys;

/// Where each listener comes from.
pub enum ListenerSource {
    /// A socket the service manager passed, already bound and listening.
    Inherited(Socket),
    /// An address to bind.
    Bind(SocketAddr),
}

/// The sockets passed to this process, with their addresses and names (`LISTEN_FDNAMES`).
#[derive(Default)]
pub struct Activated {
    sockets: Vec<(SocketAddr, String, Socket)>,
}

impl Activated {
    /// Adopts the fds passed by socket activation, if `LISTEN_PID` names this process. Anything
    /// passed that is not a listening TCP socket is an error naming its fd.
    pub fn from_env() -> io::Result<Activated> {
        let for_us =
            std::env::var("LISTEN_PID").is_ok_and(|p| p.trim() == sys::getpid().to_string());
        let count: usize = match std::env::var("LISTEN_FDS") {
            Ok(n) if for_us => n.trim().parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("LISTEN_FDS={n}: not a number"),
                )
            })?,
            _ => return Ok(Activated::default()),
        };
        if count > rcluster_proto::MAX_LISTENERS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "LISTEN_FDS={count}: at most {} listeners",
                    rcluster_proto::MAX_LISTENERS
                ),
            ));
        }
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .map(|v| v.split(':').map(String::from).collect())
            .unwrap_or_default();
        let mut sockets = Vec::with_capacity(count);
        for i in 0..count {
            let raw = 3 + i as libc::c_int;
            let fd = sys::adopt_inherited_fd(raw)
                .map_err(|e| io::Error::new(e.kind(), format!("LISTEN_FDS: fd {raw}: {e}")))?;
            let socket = Socket::from(fd);
            let listening = sys::socket_type(socket.as_fd()).is_ok_and(|t| t == libc::SOCK_STREAM)
                && sys::getsockopt_int(socket.as_fd(), libc::SO_ACCEPTCONN).is_ok_and(|v| v == 1);
            let addr = listener::local_addr(&socket).ok().filter(|_| listening);
            let Some(addr) = addr else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("LISTEN_FDS: fd {raw} is not a listening TCP socket"),
                ));
            };
            // Blocking, like the sockets the master binds itself (the acceptor sets its own
            // mode; in shared mode the workers share this file description).
            socket.set_nonblocking(false)?;
            let name = names.get(i).cloned().unwrap_or_default();
            sockets.push((addr, name, socket));
        }
        Ok(Activated { sockets })
    }

    /// Whether nothing was passed.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Assigns the inherited sockets to the listeners: `listen` are the `--listen` addresses,
    /// `explicit` whether they were given (otherwise they are the default, used only when
    /// nothing was passed).
    pub fn assign(mut self, listen: &[SocketAddr], explicit: bool) -> Vec<ListenerSource> {
        if !explicit && !self.sockets.is_empty() {
            return self
                .sockets
                .into_iter()
                .map(|(addr, name, s)| {
                    log::info!("socket activation: fd for {addr} ({name})");
                    ListenerSource::Inherited(s)
                })
                .collect();
        }
        let sources = listen
            .iter()
            .map(
                |&want| match self.sockets.iter().position(|(a, ..)| *a == want) {
                    Some(i) => {
                        let (addr, name, s) = self.sockets.remove(i);
                        log::info!("socket activation: fd for {addr} ({name})");
                        ListenerSource::Inherited(s)
                    }
                    None => ListenerSource::Bind(want),
                },
            )
            .collect();
        for (addr, name, _) in &self.sockets {
            warn!(
                "socket activation: no --listen for the passed socket {addr} ({name}); closing it"
            );
        }
        sources
    }
}
