//! The control socket: a unix stream socket per master (`--control PATH`, or a path derived from
//! `--name`) that speaks line-delimited JSON (docs/CONTROL.md). `rcluster-lb ctl` is its client.
//!
//! Threads and fds: [`Server::start`] binds the socket and runs an accept thread (blocking
//! `accept`), which checks each peer's credentials (`SO_PEERCRED`: the master's own uid or root;
//! anyone else is refused and logged, at most one line per [`REFUSAL_LOG_INTERVAL`]) and serves
//! each accepted client on a thread of its own (at most [`MAX_CLIENTS`] at once). A client thread
//! parses a request and hands it to the supervisor as an [`Ask`] (crossbeam channel plus the
//! supervisor's `mio::Waker`); the supervisor answers on the ask's own channel without waiting
//! for anything, and the client thread writes the answer. Neither the acceptor nor the
//! supervisor ever blocks on a client. The server owns the listening socket and unlinks its path
//! when dropped.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{error, info, warn};
use mio::Waker;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::master::acceptor;
use crate::master::status::{Status, SupervisorView};
use crate::sys;

/// Clients served at once; more are answered with an error and closed.
pub const MAX_CLIENTS: usize = 16;
/// Longest request line, bytes.
pub const MAX_REQUEST: usize = 64 * 1024;
/// At most one log line per this interval about refused peers.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How long a client thread waits for the acceptor's copy of its table.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(5);

/// One request of the control protocol, as a JSON object with a `cmd` field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// The cluster's [`Status`].
    Status,
    /// The acceptor's per-worker tables, as they are.
    Dump,
    /// A rolling reload; answered when it completed (with the new pids) or aborted.
    Reload,
    /// Run this many workers.
    Scale {
        /// Worker count wanted (at least 1).
        workers: usize,
    },
    /// Graceful stop (as SIGTERM); the connection stays open until the master has exited.
    Stop,
    /// Replace the worker in this slot (start a new one, drain the old one once it is ready).
    Recycle {
        /// The slot.
        slot: usize,
    },
    /// Switch the dispatch policy.
    Policy {
        /// A dispatch policy's name or alias (round-robin, least-conn, least-mem, p2c).
        name: String,
    },
}

/// What the supervisor is asked to do for a client; it answers on `reply`.
pub struct Ask {
    /// The request.
    pub request: Request,
    /// Pid of the client process (for logs).
    pub peer_pid: sys::Pid,
    /// Where the answer goes.
    pub reply: Sender<Answer>,
}

/// The supervisor's answer to an [`Ask`].
pub enum Answer {
    /// For `status` and `dump`: the supervisor's view, and the acceptor's table to come (dispatch
    /// mode), merged on the client's thread.
    View(Box<SupervisorView>, Option<Receiver<acceptor::Snapshot>>),
    /// Done: the JSON fields of a successful answer.
    Done(Value),
    /// Failed, with the reason.
    Failed(String),
}

/// The running control socket.
pub struct Server {
    path: PathBuf,
}

impl Server {
    /// Binds `path` (replacing a stale socket a dead master left behind, refusing one a live
    /// master serves) with mode 0600 and starts the accept thread.
    pub fn start(path: &Path, asker: Asker) -> io::Result<Server> {
        let listener = bind(path)?;
        let owner = sys::geteuid();
        let shared = Arc::new(Shared {
            asker,
            clients: AtomicUsize::new(0),
            refusals: Mutex::new(Refusals::default()),
        });
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(listener, owner, shared))?;
        info!("control socket {}", path.display());
        Ok(Server {
            path: path.to_path_buf(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Opens the control socket: at `explicit` if given (any failure is an error), else at
/// `NAME.sock` in [`default_dir`] (a failure there is logged and the master runs without one,
/// except a live master already serving that name, which is an error).
pub fn open(explicit: Option<&Path>, name: &str, asker: Asker) -> Result<Option<Server>, String> {
    if let Some(path) = explicit {
        return Server::start(path, asker)
            .map(Some)
            .map_err(|e| format!("control socket {}: {e}", path.display()));
    }
    if let Err(e) = prepare_default_dir() {
        error!("no control socket: {e}");
        return Ok(None);
    }
    let path = path_for_name(name);
    match Server::start(&path, asker) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(e.to_string()),
        Err(e) => {
            error!("no control socket at {}: {e}", path.display());
            Ok(None)
        }
    }
}

/// Root's runtime directory, shared with the preload shim (which workers running as another
/// user must be able to read, so it is 0755); root's control sockets get a private
/// subdirectory of it.
const ROOT_RUN_DIR: &str = "/run/rcluster-lb";

/// The directory default control sockets live in: `$XDG_RUNTIME_DIR/rcluster-lb`, else
/// `/run/rcluster-lb/control` for root, else `/tmp/rcluster-lb-UID`.
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)
        && dir.is_absolute()
    {
        return dir.join("rcluster-lb");
    }
    let uid = sys::geteuid();
    if uid == 0 {
        Path::new(ROOT_RUN_DIR).join("control")
    } else {
        PathBuf::from(format!("/tmp/rcluster-lb-{uid}"))
    }
}

/// The socket path for a master name in [`default_dir`].
pub fn path_for_name(name: &str) -> PathBuf {
    default_dir().join(format!("{name}.sock"))
}

/// Checks a `--name`: 1 to 64 characters of `A-Z a-z 0-9 . _ -`, not starting with a dot.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--name '{name}': use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
        ))
    }
}

/// Creates [`default_dir`] with mode 0700 if missing (for root, inside `/run/rcluster-lb`,
/// created 0755 if missing), and refuses it if it belongs to another user or others may write
/// to it (a name in a directory someone else controls could be replaced by their socket).
pub fn prepare_default_dir() -> io::Result<PathBuf> {
    let dir = default_dir();
    if dir.starts_with(ROOT_RUN_DIR) {
        match std::fs::DirBuilder::new().mode(0o755).create(ROOT_RUN_DIR) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot create {ROOT_RUN_DIR}: {e}"),
                ));
            }
        }
    }
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot create {}: {e}", dir.display()),
            ));
        }
    }
    let meta = std::fs::symlink_metadata(&dir)?;
    if !meta.is_dir() || meta.uid() != sys::geteuid() || meta.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a directory owned by uid {} and writable only by it",
                dir.display(),
                sys::geteuid()
            ),
        ));
    }
    Ok(dir)
}

/// Binds the control socket at `path`, first removing a stale socket: one nobody accepts on
/// (`connect` is refused) is what a SIGKILLed master leaves behind.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another master serves the control socket {} (pick another --name or --control)",
                        path.display()
                    ),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)?;
                info!(
                    "removed stale control socket {} (its master is gone)",
                    path.display()
                );
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot check {}: {e}", path.display()),
                ));
            }
        },
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // std creates the socket with SOCK_CLOEXEC.
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Puts requests to the supervisor from another thread (the control socket's clients, the
/// metrics endpoint) and waits for the answers there.
#[derive(Clone)]
pub struct Asker {
    asks: Sender<Ask>,
    waker: Arc<Waker>,
}

impl Asker {
    /// An asker that sends to `asks` and wakes the supervisor with `waker`.
    pub fn new(asks: Sender<Ask>, waker: Arc<Waker>) -> Asker {
        Asker { asks, waker }
    }

    /// The cluster's status, merged on the calling thread.
    pub fn status(&self) -> Result<Status, String> {
        match self.send(Request::Status, sys::getpid())? {
            Answer::View(view, acc) => {
                let snapshot = acc.and_then(|rx| rx.recv_timeout(SNAPSHOT_WAIT).ok());
                Ok(Status::build(*view, snapshot))
            }
            Answer::Failed(e) => Err(e),
            Answer::Done(_) => Err("unexpected answer".into()),
        }
    }

    fn send(&self, request: Request, peer_pid: sys::Pid) -> Result<Answer, String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.asks
            .send(Ask {
                request,
                peer_pid,
                reply: tx,
            })
            .map_err(|_| "the master is stopping".to_string())?;
        let _ = self.waker.wake();
        rx.recv()
            .map_err(|_| "the master stopped before answering".to_string())
    }

    /// Hands one request to the supervisor and turns its answer into the response object.
    pub fn request(&self, request: Request, peer_pid: sys::Pid) -> Value {
        let dump = request == Request::Dump;
        match self.send(request, peer_pid) {
            Ok(Answer::View(view, acc)) => {
                let snapshot = acc.and_then(|rx| rx.recv_timeout(SNAPSHOT_WAIT).ok());
                if dump {
                    json!({"ok": true, "dump": snapshot.map(dump_json)})
                } else {
                    json!({"ok": true, "status": Status::build(*view, snapshot)})
                }
            }
            Ok(Answer::Done(mut fields)) => {
                if let Value::Object(map) = &mut fields {
                    map.insert("ok".into(), Value::Bool(true));
                    fields
                } else {
                    json!({"ok": true, "result": fields})
                }
            }
            Ok(Answer::Failed(error)) => json!({"ok": false, "error": error}),
            Err(error) => json!({"ok": false, "error": error}),
        }
    }
}

struct Shared {
    asker: Asker,
    clients: AtomicUsize,
    refusals: Mutex<Refusals>,
}

#[derive(Default)]
struct Refusals {
    last_logged: Option<Instant>,
    unlogged: u64,
}

fn accept_loop(listener: UnixListener, owner: libc::uid_t, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("control socket: accept failed: {e}");
                // EMFILE and the like: do not spin.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let cred = match sys::peer_cred(stream.as_fd()) {
            Ok(c) => c,
            Err(e) => {
                warn!("control socket: cannot read the peer's credentials: {e}");
                continue;
            }
        };
        if cred.uid != owner && cred.uid != 0 {
            refuse(&shared, cred);
            continue;
        }
        if shared.clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            shared.clients.fetch_sub(1, Ordering::AcqRel);
            let mut s = stream;
            let answer = json!({"ok": false, "error": "too many control clients"});
            let _ = s.write_all(format!("{answer}\n").as_bytes());
            continue;
        }
        let shared2 = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                serve_client(stream, cred.pid, &shared2);
                shared2.clients.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            shared.clients.fetch_sub(1, Ordering::AcqRel);
            warn!("control socket: cannot start a client thread: {e}");
        }
    }
}

fn refuse(shared: &Shared, cred: sys::PeerCred) {
    let mut r = shared.refusals.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    if r.last_logged
        .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_INTERVAL)
    {
        let more = std::mem::take(&mut r.unlogged);
        warn!(
            "control socket: refused pid {} uid {} (only uid {} and root may control this master){}",
            cred.pid,
            cred.uid,
            sys::geteuid(),
            if more > 0 {
                format!("; {more} more refused since the last such line")
            } else {
                String::new()
            }
        );
        r.last_logged = Some(now);
    } else {
        r.unlogged += 1;
    }
}

fn serve_client(stream: UnixStream, peer_pid: sys::Pid, shared: &Shared) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut out = write_half;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        match (&mut reader)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => return,
            Ok(_) => {}
            Err(_) => return,
        }
        if line.len() > MAX_REQUEST {
            let answer =
                json!({"ok": false, "error": format!("request longer than {MAX_REQUEST} bytes")});
            let _ = out.write_all(format!("{answer}\n").as_bytes());
            return;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let request: Request = match serde_json::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                let answer = json!({"ok": false, "error": format!("bad request: {e}")});
                let _ = out.write_all(format!("{answer}\n").as_bytes());
                continue;
            }
        };
        if request == Request::Stop {
            // Answered before asking: once the supervisor has the request the master may exit
            // within milliseconds, before this thread is scheduled again to write an answer.
            let answer = json!({"ok": true, "stopping": true, "pid": sys::getpid()});
            if out.write_all(format!("{answer}\n").as_bytes()).is_err() {
                return;
            }
            let _ = shared.asker.request(request, peer_pid);
            // Hold the connection until the master exits: the client's read then ends with EOF,
            // which is how `ctl stop` knows the stop is complete.
            let mut sink = [0u8; 64];
            while matches!(reader.get_mut().read(&mut sink), Ok(n) if n > 0) {}
            return;
        }
        let answer = shared.asker.request(request, peer_pid);
        // One write per answer, so a reader never sees half a line from a partial write.
        if out.write_all(format!("{answer}\n").as_bytes()).is_err() {
            return;
        }
    }
}

/// The acceptor's tables as JSON (`ctl dump`).
pub fn dump_json(s: acceptor::Snapshot) -> Value {
    let c = s.counters;
    json!({
        "pending": s.pending,
        "paused": s.paused,
        "listen_queues": s.listen_queues,
        "counters": {
            "accepts": c.accepts,
            "dispatches": c.dispatches,
            "bounces": c.bounces,
            "pauses": c.pauses,
            "reclaims": c.reclaims,
            "accept_errors": c.accept_errors,
            "policy_switches": c.policy_switches,
        },
        "workers": s.workers.iter().map(|w| json!({
            "id": w.id,
            "slot": w.slot,
            "pid": w.pid,
            "state": w.state,
            "dispatched": w.dispatched,
            "closed": w.closed,
            "active": w.active,
            "rss_kib": w.rss_kib,
            "open": format!("{:#x}", w.open),
            "max_fds": w.max_fds,
            "channels": w.channels.iter().map(|c| json!({
                "queued_bytes": c.queued_bytes,
                "batched": c.batched,
                "writable": c.writable,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_json_lines() {
        let parse = |s: &str| serde_json::from_str::<Request>(s);
        assert_eq!(parse(r#"{"cmd":"status"}"#).unwrap(), Request::Status);
        assert_eq!(
            parse(r#"{"cmd":"scale","workers":3}"#).unwrap(),
            Request::Scale { workers: 3 }
        );
        assert_eq!(
            parse(r#"{"cmd":"policy","name":"rr"}"#).unwrap(),
            Request::Policy { name: "rr".into() }
        );
        assert!(parse(r#"{"cmd":"scale"}"#).is_err());
        assert!(parse(r#"{"cmd":"nope"}"#).is_err());
        // Fields a later version adds are ignored.
        assert_eq!(parse(r#"{"cmd":"status","x":1}"#).unwrap(), Request::Status);
        assert_eq!(
            serde_json::to_string(&Request::Recycle { slot: 2 }).unwrap(),
            r#"{"cmd":"recycle","slot":2}"#
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("8080").is_ok());
        assert!(check_name("web-1.prod_a").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("../x").is_err());
        assert!(check_name(".hidden").is_err());
        assert!(check_name("a/b").is_err());
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = std::env::temp_dir().join(format!("rcluster-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.sock");
        let live = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = bind(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        // A listener closed without unlinking its path is what a SIGKILLed master leaves.
        drop(live);
        assert!(path.exists());
        let again = bind(&path).unwrap();
        drop(again);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(bind(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
