//! The environment a worker is started with (DESIGN.md section 3, docs/PROTOCOL.md): the
//! variables' names, [`ChildEnv`] (what the master sets for a child) and [`Contract`] (what a
//! worker reads back). Both sides use this one definition, so a name or a format cannot drift.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// How many listeners the worker has, at fds `3..3+LISTEN_FDS` (sd_listen_fds(3)).
pub const LISTEN_FDS: &str = "LISTEN_FDS";
/// The pid the fds are for; the master's spawner writes it in the child, after the fork.
pub const LISTEN_PID: &str = "LISTEN_PID";
/// A name per fd, `:`-separated (`listener0:listener1`).
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// The first listener's port, for servers that read `$PORT`.
pub const PORT: &str = "PORT";
/// The stable slot, `0..N`.
pub const RCLUSTER_WORKER_ID: &str = "RCLUSTER_WORKER_ID";
/// How many reloads the master has done when it started this worker.
pub const RCLUSTER_GENERATION: &str = "RCLUSTER_GENERATION";
/// `dispatch`, `reuseport` or `shared`: what fd `3+i` is ([`Mode`]).
pub const RCLUSTER_MODE: &str = "RCLUSTER_MODE";
/// The listen addresses in fd order, `,`-separated, IPv6 in brackets.
pub const RCLUSTER_LISTEN: &str = "RCLUSTER_LISTEN";
/// Where the worker may send sd_notify(3) datagrams (`READY=1`, `STOPPING=1`, `STATUS=`).
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// Kernel steering only: the inherited fd of the steering table (a BPF map to `mmap`, layout in
/// [`crate::steer`]); the worker's line is `RCLUSTER_WORKER_ID`.
pub const RCLUSTER_STEER_FD: &str = "RCLUSTER_STEER_FD";
/// Kernel steering only: the inherited fd of listener 0's overflow queue (a listening socket of
/// the same reuseport group that every worker may accept from, [`crate::steer`]); listener
/// `i`'s is at this number `+ i`.
pub const RCLUSTER_STEER_OVERFLOW_FD: &str = "RCLUSTER_STEER_OVERFLOW_FD";
/// Given to the master, never to a worker: the kernel-steering maps and programs a privileged
/// `rcluster-lb steer-load` loaded, as `ATTACH:SLOTS,META,SOCKS0,PROG0[,SOCKS1,PROG1…]` (fd
/// numbers; `ATTACH` is `select-or-migrate` or `select`). The master adopts them instead of
/// loading the program itself, so it needs no CAP_BPF.
pub const RCLUSTER_STEER_FDS: &str = "RCLUSTER_STEER_FDS";
/// Given to the master, never to a worker: plain `reuseport` mode's spread programs and maps a
/// privileged `rcluster-lb steer-load` loaded, as `ATTACH:META0,SOCKS0,PROG0[,META1,…]` (fd
/// numbers per listening address: its count, its socket array, its program). The master adopts
/// them where it runs in `reuseport` mode without CAP_BPF.
pub const RCLUSTER_SPREAD_FDS: &str = "RCLUSTER_SPREAD_FDS";
/// `worker` or `agent` ([`Role`]): what this child is for.
pub const RCLUSTER_ROLE: &str = "RCLUSTER_ROLE";
/// Path of the master's message bus, an `AF_UNIX` stream socket in a private (0700) directory
/// (docs/PROTOCOL.md section 6): newline-delimited JSON envelopes.
pub const RCLUSTER_IPC: &str = "RCLUSTER_IPC";
/// How long a worker may hold back a drain or stop signal it would die of at once while it
/// serves what it holds, in milliseconds: half of the master's `--grace` (the preload shim's
/// hold; a server may read it to bound its own drain). After it, the signal takes effect; the
/// master's SIGKILL follows at `--grace`.
pub const RCLUSTER_DRAIN_HOLD_MS: &str = "RCLUSTER_DRAIN_HOLD_MS";
/// Prefix of every rcluster-lb specific variable.
pub const RCLUSTER_PREFIX: &str = "RCLUSTER_";

/// Whether the master sets variable `name` per worker (or it belongs to the master's own service
/// manager: `LISTEN_*`, `NOTIFY_SOCKET`, `WATCHDOG_*`), so the master's inherited value must not reach a worker: an inherited `PORT` left
/// beside the worker's own would win in `getenv(3)`, which returns the first match.
pub fn is_master_owned(name: &[u8]) -> bool {
    name == PORT.as_bytes()
        || name.starts_with(b"LISTEN_")
        || name == NOTIFY_SOCKET.as_bytes()
        || name.starts_with(b"WATCHDOG_")
        || name.starts_with(RCLUSTER_PREFIX.as_bytes())
}

/// How connections reach a worker: what fd `3+i` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The master accepts and passes each connection over a channel (fd 3+i is a
    /// `SOCK_SEQPACKET` channel; connections arrive as CONN messages).
    Dispatch,
    /// Each worker slot gets its own `SO_REUSEPORT` listening socket; the kernel hashes
    /// connections.
    Reuseport,
    /// Every worker inherits the same listening socket; the kernel's one accept queue.
    Shared,
}

impl Mode {
    /// Every mode.
    pub const ALL: [Mode; 3] = [Mode::Dispatch, Mode::Reuseport, Mode::Shared];

    /// The value of `RCLUSTER_MODE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Dispatch => "dispatch",
            Mode::Reuseport => "reuseport",
            Mode::Shared => "shared",
        }
    }

    /// Parses `RCLUSTER_MODE`'s value (exactly, case-sensitive).
    pub fn parse(value: &[u8]) -> Option<Mode> {
        Mode::ALL
            .into_iter()
            .find(|mode| mode.as_str().as_bytes() == value)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a child of the master is for: a worker serves connections; the agent (at most one,
/// `--agent`) serves none and runs beside the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A worker: fds `3+i`, `LISTEN_*`, `PORT`, `RCLUSTER_WORKER_ID`.
    Worker,
    /// The agent: no listening fds, no `LISTEN_*`, `PORT` nor `RCLUSTER_WORKER_ID`.
    Agent,
}

impl Role {
    /// The value of `RCLUSTER_ROLE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Agent => "agent",
        }
    }
}

/// Where `NOTIFY_SOCKET` points (sd_notify(3)): a filesystem path or, for a value starting with
/// `@`, an abstract socket name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddr {
    /// An `AF_UNIX` datagram socket bound to this path.
    Path(PathBuf),
    /// An abstract `AF_UNIX` name (the bytes after the `@`).
    Abstract(Vec<u8>),
}

impl NotifyAddr {
    /// Parses a `NOTIFY_SOCKET` value: an absolute path, or `@name`.
    pub fn parse(value: &str) -> Option<NotifyAddr> {
        if let Some(name) = value.strip_prefix('@') {
            return (!name.is_empty()).then(|| NotifyAddr::Abstract(name.as_bytes().to_vec()));
        }
        value
            .starts_with('/')
            .then(|| NotifyAddr::Path(PathBuf::from(value)))
    }
}

impl fmt::Display for NotifyAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotifyAddr::Path(path) => write!(f, "{}", path.display()),
            NotifyAddr::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
        }
    }
}

/// The environment the master gives one worker (everything but `LISTEN_PID`, which only the
/// child knows and the spawner writes after the fork).
#[derive(Debug, Clone, Copy)]
pub struct ChildEnv<'a> {
    /// The stable slot.
    pub slot: usize,
    /// The master's reload count.
    pub generation: u64,
    /// What fd `3+i` is.
    pub mode: Mode,
    /// The bound listen addresses, in fd order (at least one).
    pub listen: &'a [SocketAddr],
    /// The worker's `NOTIFY_SOCKET` value, if it has one.
    pub notify_socket: Option<&'a str>,
    /// Kernel steering: the fd number the steering table is placed at.
    pub steer_fd: Option<i32>,
    /// Kernel steering: the fd number listener 0's overflow queue is placed at (listener `i`'s
    /// at this `+ i`).
    pub overflow_fd: Option<i32>,
    /// Worker or agent. An agent gets no `LISTEN_*`, `PORT`, `RCLUSTER_WORKER_ID` nor
    /// `RCLUSTER_MODE` (it has no fds to describe); it gets `RCLUSTER_LISTEN` to know where the
    /// workers serve.
    pub role: Role,
    /// `RCLUSTER_IPC`: the message bus's path, if the master runs one.
    pub ipc: Option<&'a str>,
    /// `RCLUSTER_DRAIN_HOLD_MS`: how long a worker may hold back a signal it would die of
    /// (workers only).
    pub drain_hold: Option<std::time::Duration>,
}

impl ChildEnv<'_> {
    /// The variables as `NAME=value` entries, in a fixed order.
    pub fn entries(&self) -> Vec<String> {
        let names: Vec<String> = (0..self.listen.len())
            .map(|i| format!("listener{i}"))
            .collect();
        let addrs: Vec<String> = self.listen.iter().map(SocketAddr::to_string).collect();
        let mut out = Vec::new();
        if self.role == Role::Worker {
            out.extend([
                format!("{LISTEN_FDS}={}", self.listen.len()),
                format!("{LISTEN_FDNAMES}={}", names.join(":")),
                format!("{PORT}={}", self.listen.first().map_or(0, SocketAddr::port)),
                format!("{RCLUSTER_WORKER_ID}={}", self.slot),
            ]);
        }
        out.push(format!("{RCLUSTER_ROLE}={}", self.role.as_str()));
        out.push(format!("{RCLUSTER_GENERATION}={}", self.generation));
        if self.role == Role::Worker {
            out.push(format!("{RCLUSTER_MODE}={}", self.mode));
        }
        out.push(format!("{RCLUSTER_LISTEN}={}", addrs.join(",")));
        if let Some(notify) = self.notify_socket {
            out.push(format!("{NOTIFY_SOCKET}={notify}"));
        }
        if let Some(fd) = self.steer_fd {
            out.push(format!("{RCLUSTER_STEER_FD}={fd}"));
        }
        if let Some(fd) = self.overflow_fd {
            out.push(format!("{RCLUSTER_STEER_OVERFLOW_FD}={fd}"));
        }
        if let Some(ipc) = self.ipc {
            out.push(format!("{RCLUSTER_IPC}={ipc}"));
        }
        if let Some(hold) = self.drain_hold.filter(|_| self.role == Role::Worker) {
            out.push(format!("{RCLUSTER_DRAIN_HOLD_MS}={}", hold.as_millis()));
        }
        out
    }
}

/// Why the environment is not a usable worker contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContractError {
    /// A variable of the worker contract is not set.
    MissingVar {
        /// The variable's name.
        var: &'static str,
    },
    /// A variable of the worker contract has a value that does not parse.
    InvalidVar {
        /// The variable's name.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A list variable does not have one entry per inherited fd.
    ListLength {
        /// The variable's name.
        var: &'static str,
        /// Entries in it.
        entries: usize,
        /// `LISTEN_FDS`.
        fds: usize,
    },
    /// `LISTEN_PID` names another process: the fds were meant for a parent, not for us.
    ForeignFds {
        /// The value of `LISTEN_PID`.
        listen_pid: i32,
        /// This process.
        pid: i32,
    },
}

impl fmt::Display for ContractError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContractError::MissingVar { var } => write!(
                f,
                "environment variable {var} is not set (is this process started by rcluster-lb?)"
            ),
            ContractError::InvalidVar { var, value, reason } => {
                write!(
                    f,
                    "environment variable {var}={value:?} is invalid: {reason}"
                )
            }
            ContractError::ListLength { var, entries, fds } => write!(
                f,
                "environment variable {var} has {entries} entries but {LISTEN_FDS}={fds}"
            ),
            ContractError::ForeignFds { listen_pid, pid } => write!(
                f,
                "{LISTEN_PID}={listen_pid} but this process is {pid}: the inherited fds are not ours"
            ),
        }
    }
}

impl std::error::Error for ContractError {}

/// The worker contract as read from the environment (everything but the fds themselves).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Contract {
    /// `RCLUSTER_WORKER_ID`: the stable slot, `0..N`.
    pub id: u32,
    /// `RCLUSTER_GENERATION`: how many reloads the master has done.
    pub generation: u64,
    /// `RCLUSTER_MODE`.
    pub mode: Mode,
    /// `LISTEN_FDS`: how many listeners, at fds `3..3+listen_fds`.
    pub listen_fds: usize,
    /// `LISTEN_PID`, if set: the process the fds are for.
    pub listen_pid: Option<i32>,
    /// `RCLUSTER_LISTEN`: the listen addresses in fd order (empty if unset).
    pub addresses: Vec<String>,
    /// `LISTEN_FDNAMES`: a name per fd (empty if unset).
    pub fd_names: Vec<String>,
    /// `PORT`: the first listener's port.
    pub port: Option<u16>,
    /// `NOTIFY_SOCKET`, if set.
    pub notify_socket: Option<NotifyAddr>,
    /// `RCLUSTER_STEER_FD`: the fd of the kernel-steering table, when the kernel steers.
    pub steer_fd: Option<i32>,
    /// `RCLUSTER_STEER_OVERFLOW_FD`: the fd of listener 0's overflow queue under kernel
    /// steering (listener `i`'s at this `+ i`).
    pub overflow_fd: Option<i32>,
    /// `RCLUSTER_IPC`, if set: the master's message bus.
    pub ipc: Option<PathBuf>,
    /// `RCLUSTER_DRAIN_HOLD_MS`, if set: how long this worker may hold back a drain or stop
    /// signal it would die of at once.
    pub drain_hold: Option<std::time::Duration>,
}

impl Contract {
    /// A contract for `listen_fds` listeners in `mode`, slot 0, generation 0, nothing else
    /// set; for building a worker around fds made in-process (tests, embedding).
    pub fn new(mode: Mode, listen_fds: usize) -> Contract {
        Contract {
            id: 0,
            generation: 0,
            mode,
            listen_fds,
            listen_pid: None,
            addresses: Vec::new(),
            fd_names: Vec::new(),
            port: None,
            notify_socket: None,
            steer_fd: None,
            overflow_fd: None,
            ipc: None,
            drain_hold: None,
        }
    }

    /// Reads the contract from this process's environment.
    pub fn from_env() -> Result<Contract, ContractError> {
        Contract::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads the contract through `var`, which returns a variable's value (`None` if unset).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Contract, ContractError> {
        fn required(
            var: &impl Fn(&str) -> Option<String>,
            name: &'static str,
        ) -> Result<String, ContractError> {
            var(name).ok_or(ContractError::MissingVar { var: name })
        }
        fn invalid(var: &'static str, value: &str, reason: &'static str) -> ContractError {
            ContractError::InvalidVar {
                var,
                value: value.to_owned(),
                reason,
            }
        }
        fn list(
            var: &impl Fn(&str) -> Option<String>,
            name: &'static str,
            sep: char,
            fds: usize,
        ) -> Result<Vec<String>, ContractError> {
            let Some(value) = var(name) else {
                return Ok(Vec::new());
            };
            let entries: Vec<String> = value.split(sep).map(str::to_owned).collect();
            if entries.len() != fds {
                return Err(ContractError::ListLength {
                    var: name,
                    entries: entries.len(),
                    fds,
                });
            }
            Ok(entries)
        }

        let value = required(&var, LISTEN_FDS)?;
        let listen_fds: usize = value
            .trim()
            .parse()
            .map_err(|_| invalid(LISTEN_FDS, &value, "not a number"))?;
        if listen_fds == 0 {
            return Err(invalid(LISTEN_FDS, &value, "a worker needs a listener"));
        }
        if listen_fds > crate::MAX_LISTENERS {
            return Err(invalid(LISTEN_FDS, &value, "more than 64 listeners"));
        }
        let listen_pid = match var(LISTEN_PID) {
            None => None,
            Some(value) => Some(
                value
                    .trim()
                    .parse::<i32>()
                    .ok()
                    .filter(|&pid| pid > 0)
                    .ok_or_else(|| invalid(LISTEN_PID, &value, "not a process id"))?,
            ),
        };
        let value = required(&var, RCLUSTER_MODE)?;
        let mode = Mode::parse(value.as_bytes()).ok_or_else(|| {
            invalid(
                RCLUSTER_MODE,
                &value,
                "expected dispatch, reuseport or shared",
            )
        })?;
        let value = required(&var, RCLUSTER_WORKER_ID)?;
        let id = value
            .parse()
            .map_err(|_| invalid(RCLUSTER_WORKER_ID, &value, "not a slot number"))?;
        let value = required(&var, RCLUSTER_GENERATION)?;
        let generation = value
            .parse()
            .map_err(|_| invalid(RCLUSTER_GENERATION, &value, "not a number"))?;
        let port = match var(PORT) {
            None => None,
            Some(value) => Some(
                value
                    .parse()
                    .map_err(|_| invalid(PORT, &value, "not a port number"))?,
            ),
        };
        let notify_socket = match var(NOTIFY_SOCKET) {
            None => None,
            Some(value) if value.is_empty() => None,
            Some(value) => Some(NotifyAddr::parse(&value).ok_or_else(|| {
                invalid(
                    NOTIFY_SOCKET,
                    &value,
                    "expected an absolute path or @abstract-name",
                )
            })?),
        };
        let fd_var = |name: &'static str| -> Result<Option<i32>, ContractError> {
            match var(name) {
                None => Ok(None),
                Some(value) => Ok(Some(
                    value
                        .trim()
                        .parse::<i32>()
                        .ok()
                        .filter(|&fd| fd >= crate::LISTEN_FDS_START)
                        .ok_or_else(|| invalid(name, &value, "not an fd number"))?,
                )),
            }
        };
        let drain_hold = match var(RCLUSTER_DRAIN_HOLD_MS) {
            None => None,
            Some(value) => Some(std::time::Duration::from_millis(
                value
                    .trim()
                    .parse()
                    .map_err(|_| invalid(RCLUSTER_DRAIN_HOLD_MS, &value, "not a number"))?,
            )),
        };
        let steer_fd = fd_var(RCLUSTER_STEER_FD)?;
        let overflow_fd = fd_var(RCLUSTER_STEER_OVERFLOW_FD)?;
        Ok(Contract {
            steer_fd,
            overflow_fd,
            id,
            generation,
            mode,
            listen_fds,
            listen_pid,
            addresses: list(&var, RCLUSTER_LISTEN, ',', listen_fds)?,
            fd_names: list(&var, LISTEN_FDNAMES, ':', listen_fds)?,
            port,
            notify_socket,
            ipc: var(RCLUSTER_IPC)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            drain_hold,
        })
    }

    /// Fails unless `LISTEN_PID` is unset or names `pid` (sd_listen_fds(3): fds inherited
    /// through a process that did not consume them are not ours).
    pub fn check_pid(&self, pid: i32) -> Result<(), ContractError> {
        match self.listen_pid {
            Some(listen_pid) if listen_pid != pid => {
                Err(ContractError::ForeignFds { listen_pid, pid })
            }
            _ => Ok(()),
        }
    }

    /// The listen addresses parsed (`RCLUSTER_LISTEN` always holds `ip:port` entries when the
    /// master set it). An error names the first entry that does not parse.
    pub fn listen_addrs(&self) -> Result<Vec<SocketAddr>, ContractError> {
        self.addresses
            .iter()
            .map(|a| {
                a.trim().parse().map_err(|_| ContractError::InvalidVar {
                    var: RCLUSTER_LISTEN,
                    value: a.clone(),
                    reason: "an entry is not ip:port",
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(entries: &[String]) -> HashMap<String, String> {
        entries
            .iter()
            .map(|e| {
                let (k, v) = e.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    #[test]
    fn what_the_master_writes_a_worker_reads() {
        let listen: Vec<SocketAddr> = vec![
            "127.0.0.1:8080".parse().unwrap(),
            "[::1]:9000".parse().unwrap(),
        ];
        let env = ChildEnv {
            slot: 3,
            generation: 7,
            mode: Mode::Reuseport,
            listen: &listen,
            notify_socket: Some("/run/x/notify"),
            steer_fd: Some(5),
            overflow_fd: Some(6),
            role: Role::Worker,
            ipc: Some("/run/x/bus.sock"),
            drain_hold: Some(std::time::Duration::from_millis(5_000)),
        }
        .entries();
        let mut map = vars(&env);
        map.insert(LISTEN_PID.into(), "42".into());
        let c = Contract::from_vars(|k| map.get(k).cloned()).unwrap();
        assert_eq!((c.id, c.generation, c.mode), (3, 7, Mode::Reuseport));
        assert_eq!(c.listen_fds, 2);
        assert_eq!(c.listen_pid, Some(42));
        assert_eq!(c.port, Some(8080));
        assert_eq!(c.fd_names, ["listener0", "listener1"]);
        assert_eq!(c.listen_addrs().unwrap(), listen);
        assert_eq!(c.steer_fd, Some(5));
        assert_eq!(c.overflow_fd, Some(6));
        assert_eq!(
            c.notify_socket,
            Some(NotifyAddr::Path(PathBuf::from("/run/x/notify")))
        );
        assert_eq!(c.ipc, Some(PathBuf::from("/run/x/bus.sock")));
        assert_eq!(c.drain_hold, Some(std::time::Duration::from_secs(5)));
        assert!(c.check_pid(42).is_ok());
        assert_eq!(
            c.check_pid(43),
            Err(ContractError::ForeignFds {
                listen_pid: 42,
                pid: 43
            })
        );
        for e in &env {
            let name = e.split_once('=').unwrap().0;
            assert!(is_master_owned(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn an_agent_gets_no_listener_variables() {
        let listen: Vec<SocketAddr> = vec!["127.0.0.1:8080".parse().unwrap()];
        let env = vars(
            &ChildEnv {
                slot: 0,
                generation: 2,
                mode: Mode::Dispatch,
                listen: &listen,
                notify_socket: Some("@n"),
                role: Role::Agent,
                ipc: Some("/run/x/bus.sock"),
                steer_fd: None,
                overflow_fd: None,
                drain_hold: Some(std::time::Duration::from_secs(5)),
            }
            .entries(),
        );
        for name in [
            LISTEN_FDS,
            LISTEN_FDNAMES,
            PORT,
            RCLUSTER_WORKER_ID,
            RCLUSTER_MODE,
            RCLUSTER_DRAIN_HOLD_MS,
        ] {
            assert!(!env.contains_key(name), "{name}");
        }
        assert_eq!(env[RCLUSTER_ROLE], "agent");
        assert_eq!(env[RCLUSTER_IPC], "/run/x/bus.sock");
        assert_eq!(env[RCLUSTER_LISTEN], "127.0.0.1:8080");
        assert!(env.keys().all(|k| is_master_owned(k.as_bytes())));
    }

    #[test]
    fn rejects_what_does_not_parse() {
        let base = vars(
            &ChildEnv {
                slot: 0,
                generation: 0,
                mode: Mode::Dispatch,
                listen: &["127.0.0.1:1".parse().unwrap()],
                notify_socket: None,
                steer_fd: None,
                overflow_fd: None,
                role: Role::Worker,
                ipc: None,
                drain_hold: None,
            }
            .entries(),
        );
        let with = |k: &str, v: Option<&str>| {
            let mut m = base.clone();
            match v {
                Some(v) => m.insert(k.into(), v.into()),
                None => m.remove(k),
            };
            Contract::from_vars(|name| m.get(name).cloned())
        };
        assert!(with(LISTEN_FDS, Some("0")).is_err());
        assert!(with(LISTEN_FDS, Some("65")).is_err());
        assert!(with(LISTEN_FDS, Some("x")).is_err());
        assert!(with(LISTEN_FDS, Some("2")).is_err(), "lists have 1 entry");
        assert_eq!(
            with(RCLUSTER_MODE, None),
            Err(ContractError::MissingVar { var: RCLUSTER_MODE })
        );
        assert!(with(RCLUSTER_MODE, Some("Dispatch")).is_err());
        assert!(with(LISTEN_PID, Some("-1")).is_err());
        assert!(with(NOTIFY_SOCKET, Some("relative")).is_err());
        assert!(with(RCLUSTER_DRAIN_HOLD_MS, Some("5s")).is_err());
        assert!(with(RCLUSTER_DRAIN_HOLD_MS, Some("-1")).is_err());
        assert!(
            with(NOTIFY_SOCKET, Some(""))
                .unwrap()
                .notify_socket
                .is_none()
        );
        assert!(
            with(RCLUSTER_LISTEN, Some("localhost:80"))
                .unwrap()
                .listen_addrs()
                .is_err()
        );
    }

    #[test]
    fn modes_and_notify_addresses_parse() {
        for m in Mode::ALL {
            assert_eq!(Mode::parse(m.as_str().as_bytes()), Some(m));
        }
        assert_eq!(Mode::parse(b"kernel"), None);
        assert_eq!(
            NotifyAddr::parse("@a/b"),
            Some(NotifyAddr::Abstract(b"a/b".to_vec()))
        );
        assert_eq!(NotifyAddr::parse("@"), None);
        assert_eq!(NotifyAddr::parse("x"), None);
        assert!(is_master_owned(b"LISTEN_FDS"));
        assert!(is_master_owned(b"RCLUSTER_MODE"));
        // The steering fds passed to the master reach no worker.
        assert!(is_master_owned(RCLUSTER_STEER_FDS.as_bytes()));
        assert!(is_master_owned(RCLUSTER_SPREAD_FDS.as_bytes()));
        assert!(!is_master_owned(b"PATH"));
    }

    // The contract as a worker sees it, variable by variable.

    fn pairs(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    const FULL: &[(&str, &str)] = &[
        ("LISTEN_FDS", "2"),
        ("LISTEN_PID", "4242"),
        ("LISTEN_FDNAMES", "http:admin"),
        ("PORT", "8080"),
        ("RCLUSTER_WORKER_ID", "1"),
        ("RCLUSTER_GENERATION", "5"),
        ("RCLUSTER_MODE", "reuseport"),
        ("RCLUSTER_LISTEN", "127.0.0.1:8080,[::1]:9090"),
        ("NOTIFY_SOCKET", "@rcluster/7"),
    ];

    /// Variables to replace (`Some`) or unset (`None`) in [`FULL`].
    type Overrides = &'static [(&'static str, Option<&'static str>)];

    fn with(
        overrides: &[(&'static str, Option<&'static str>)],
    ) -> Vec<(&'static str, &'static str)> {
        let mut out: Vec<_> = FULL.to_vec();
        for (name, value) in overrides {
            out.retain(|(k, _)| k != name);
            if let Some(value) = value {
                out.push((name, value));
            }
        }
        out
    }

    #[test]
    fn contract_reads_every_variable() {
        let c = Contract::from_vars(pairs(FULL)).unwrap();
        assert_eq!(c.listen_fds, 2);
        assert_eq!(c.listen_pid, Some(4242));
        assert_eq!(c.fd_names, ["http", "admin"]);
        assert_eq!(c.port, Some(8080));
        assert_eq!((c.id, c.generation, c.mode), (1, 5, Mode::Reuseport));
        assert_eq!(c.addresses, ["127.0.0.1:8080", "[::1]:9090"]);
        assert_eq!(
            c.notify_socket,
            Some(NotifyAddr::Abstract(b"rcluster/7".to_vec()))
        );
        assert!(c.check_pid(4242).is_ok());
        assert_eq!(
            c.check_pid(1).unwrap_err().to_string(),
            "LISTEN_PID=4242 but this process is 1: the inherited fds are not ours"
        );

        let minimal = with(&[
            ("LISTEN_PID", None),
            ("LISTEN_FDNAMES", None),
            ("PORT", None),
            ("RCLUSTER_LISTEN", None),
            ("NOTIFY_SOCKET", None),
        ]);
        let c = Contract::from_vars(pairs(&minimal)).unwrap();
        assert_eq!(c.listen_pid, None);
        assert!(c.addresses.is_empty() && c.fd_names.is_empty());
        assert!(c.check_pid(1).is_ok());
    }

    #[test]
    fn contract_errors_name_the_variable() {
        let cases: &[(Overrides, &str)] = &[
            (
                &[("LISTEN_FDS", None)],
                "environment variable LISTEN_FDS is not set",
            ),
            (
                &[("LISTEN_FDS", Some("0"))],
                "LISTEN_FDS=\"0\" is invalid: a worker needs a listener",
            ),
            (&[("LISTEN_FDS", Some("x"))], "LISTEN_FDS=\"x\" is invalid"),
            (&[("LISTEN_FDS", Some("65"))], "more than 64 listeners"),
            (
                &[("LISTEN_PID", Some("-3"))],
                "LISTEN_PID=\"-3\" is invalid",
            ),
            (
                &[("RCLUSTER_MODE", Some("fast"))],
                "RCLUSTER_MODE=\"fast\" is invalid: expected dispatch, reuseport or shared",
            ),
            (&[("RCLUSTER_MODE", None)], "RCLUSTER_MODE is not set"),
            (
                &[("RCLUSTER_WORKER_ID", None)],
                "RCLUSTER_WORKER_ID is not set",
            ),
            (
                &[("RCLUSTER_GENERATION", Some("-1"))],
                "RCLUSTER_GENERATION=\"-1\"",
            ),
            (&[("PORT", Some("70000"))], "PORT=\"70000\" is invalid"),
            (
                &[("NOTIFY_SOCKET", Some("relative"))],
                "NOTIFY_SOCKET=\"relative\" is invalid",
            ),
            (
                &[("NOTIFY_SOCKET", Some("@"))],
                "NOTIFY_SOCKET=\"@\" is invalid",
            ),
            (
                &[("RCLUSTER_LISTEN", Some("127.0.0.1:1"))],
                "RCLUSTER_LISTEN has 1 entries but LISTEN_FDS=2",
            ),
            (
                &[("LISTEN_FDNAMES", Some("a:b:c"))],
                "LISTEN_FDNAMES has 3 entries but LISTEN_FDS=2",
            ),
        ];
        for (overrides, expected) in cases {
            let err = Contract::from_vars(pairs(&with(overrides))).unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{overrides:?}: {err} does not contain {expected:?}"
            );
        }
    }
}
