//! The message bus: a unix stream socket in a private (0700) directory over which the workers,
//! the agent and the master exchange newline-delimited JSON envelopes (docs/PROTOCOL.md
//! section 6). It runs on its own thread with its own mio poll — never the acceptor's, so a
//! flood of messages cannot delay a connection — and owns the listening socket, every peer
//! connection and the directory (removed when the handle is dropped).
//!
//! Who speaks is decided by the kernel, not by the message: each connection's `SO_PEERCRED`
//! pid must be a process the supervisor registered (a worker or the agent) or a descendant of
//! one, with our uid or root's; the bus stamps `from` itself. Every peer has a bounded queue: a
//! peer that does not read loses the messages that do not fit (counted, logged at most once a
//! second), so a slow reader never grows the master's memory nor blocks anyone else.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, error, info, warn};
use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use serde_json::{Map, Value};

use crate::master::lifecycle::WorkerId;
use crate::sys::{self, Pid};

/// The longest envelope line accepted, newline included; a peer sending a longer one is
/// disconnected (it is not speaking this protocol).
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Bytes queued for one peer connection before further messages to it are dropped.
pub const PEER_QUEUE_BYTES: usize = 256 * 1024;
/// Messages queued for one peer connection before further messages to it are dropped.
pub const PEER_QUEUE_MESSAGES: usize = 1024;
/// Connections the bus holds at most (each bounded by the two limits above, so the bus's
/// memory is bounded by their product).
pub const MAX_CONNECTIONS: usize = 256;
/// How long a connection from a pid not (yet) registered waits for the supervisor to register
/// it (a child may connect before its spawn is announced) before it is refused.
pub const AUTH_WAIT: Duration = Duration::from_secs(2);
/// Drops are logged at most this often per peer.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// How many ancestors of a connecting pid are checked against the registered ones.
const MAX_ANCESTRY: usize = 64;
/// The socket's file name in the private directory.
pub const SOCKET_FILE: &str = "bus.sock";

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);

/// A process that speaks on the bus, as `from` and `to` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// The master itself.
    Master,
    /// The agent.
    Agent,
    /// The worker in this slot (`RCLUSTER_WORKER_ID`).
    Worker(usize),
}

impl Peer {
    fn to_json(self) -> Value {
        match self {
            Peer::Master => Value::from("master"),
            Peer::Agent => Value::from("agent"),
            Peer::Worker(slot) => Value::from(slot),
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Master => f.write_str("master"),
            Peer::Agent => f.write_str("agent"),
            Peer::Worker(slot) => write!(f, "worker {slot}"),
        }
    }
}

/// Where an envelope goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The master (`heartbeat`, `ready`, `ping`; anything else is logged).
    Master,
    /// The agent.
    Agent,
    /// Every worker and the agent, except the sender.
    All,
    /// The current worker of a slot.
    Worker(usize),
}

impl Target {
    /// Parses `to`: `"master"`, `"agent"`, `"all"`, or a worker id as a number or a string of
    /// digits.
    pub fn parse(to: &Value) -> Option<Target> {
        match to {
            Value::String(s) => match s.as_str() {
                "master" => Some(Target::Master),
                "agent" => Some(Target::Agent),
                "all" => Some(Target::All),
                digits => digits.parse().ok().map(Target::Worker),
            },
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Target::Worker),
            _ => None,
        }
    }

    fn to_json(self) -> Value {
        match self {
            Target::Master => Value::from("master"),
            Target::Agent => Value::from("agent"),
            Target::All => Value::from("all"),
            Target::Worker(slot) => Value::from(slot),
        }
    }
}

/// Supervisor → bus.
#[derive(Debug)]
pub enum BusCommand {
    /// A worker or the agent started: connections from `pid` or its descendants speak as
    /// `peer`. A worker registered later for the same slot becomes the slot's current worker.
    Register {
        /// The child's pid.
        pid: Pid,
        /// Who it is.
        peer: Peer,
        /// The supervisor's id for it (workers), reported back with its heartbeats.
        id: Option<WorkerId>,
    },
    /// The process exited: its connections are closed and its pid forgotten.
    Forget(Pid),
    /// An envelope from the master.
    Send {
        /// Where.
        to: Target,
        /// `type`.
        kind: String,
        /// `data`.
        data: Value,
    },
    /// Log one status line per connection (queued, dropped).
    Status,
}

/// Bus → supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusEvent {
    /// A `heartbeat` to the master from a registered child (its pid as registered, and the
    /// worker id given at registration).
    Heartbeat {
        /// The registered pid.
        pid: Pid,
        /// The worker id, if a worker.
        id: Option<WorkerId>,
    },
    /// A `ready` to the master: the same as `READY=1` on NOTIFY_SOCKET, for languages
    /// without unix datagram sockets (node).
    Ready {
        /// The registered pid.
        pid: Pid,
        /// The worker id, if a worker.
        id: Option<WorkerId>,
    },
}

/// Handle the supervisor keeps; dropping it stops the thread and removes the directory.
pub struct BusHandle {
    commands: Sender<BusCommand>,
    waker: Arc<Waker>,
    thread: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
    path: PathBuf,
}

impl BusHandle {
    /// The socket's path, for `RCLUSTER_IPC`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends a command and wakes the thread.
    pub fn send(&self, cmd: BusCommand) {
        if self.commands.send(cmd).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

impl Drop for BusHandle {
    fn drop(&mut self) {
        // Closing the command channel ends the thread's loop.
        let (dead, _) = crossbeam_channel::bounded(0);
        self.commands = dead;
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            error!("bus thread panicked");
        }
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Creates a private directory (mode 0700, a fresh name: `mkdir(2)` fails rather than reuse
/// one another user made) under `$XDG_RUNTIME_DIR` or the temporary directory.
fn private_dir() -> io::Result<PathBuf> {
    let base = super::rundir::base();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut last = None;
    for attempt in 0..16u32 {
        let dir = base.join(format!(
            "{}{}.{:x}",
            super::rundir::PREFIX,
            sys::getpid(),
            nanos.wrapping_add(attempt.wrapping_mul(0x9E37_79B9))
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free directory name")))
}

/// Binds the bus in a new private directory and starts its thread. Events go to `events`,
/// followed by a wake of `supervisor_waker`. `children`: the uid and gid the workers and the
/// agent run as when the master drops privileges for them (`--user`/`--group`): the directory
/// becomes searchable and the socket writable by that group only (0710 and 0660, group
/// `gid`), and connections from that uid are accepted besides ours and root's.
pub fn spawn(
    events: Sender<BusEvent>,
    supervisor_waker: Arc<Waker>,
    children: Option<(Option<u32>, u32)>,
) -> io::Result<BusHandle> {
    use std::os::unix::fs::PermissionsExt;
    let dir = private_dir()?;
    let path = dir.join(SOCKET_FILE);
    let bound = UnixListener::bind(&path).and_then(|l| {
        if let Some((_, gid)) = children {
            std::os::unix::fs::chown(&dir, None, Some(gid))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o710))?;
            std::os::unix::fs::chown(&path, None, Some(gid))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
        }
        Ok(l)
    });
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
    };
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (commands, command_rx) = crossbeam_channel::unbounded();
    let mut bus = Bus {
        poll,
        listener,
        commands: command_rx,
        events,
        supervisor_waker,
        uid: sys::geteuid(),
        child_uid: children.and_then(|(uid, _)| uid),
        registered: HashMap::new(),
        current: HashMap::new(),
        conns: HashMap::new(),
        pending: Vec::new(),
        next_token: 2,
        undeliverable: 0,
        refused_logged_at: None,
    };
    bus.poll
        .registry()
        .register(&mut bus.listener, LISTENER, Interest::READABLE)?;
    let thread = std::thread::Builder::new()
        .name("bus".into())
        .spawn(move || bus.run())?;
    info!("message bus at {}", path.display());
    Ok(BusHandle {
        commands,
        waker,
        thread: Some(thread),
        dir,
        path,
    })
}

struct Registered {
    peer: Peer,
    id: Option<WorkerId>,
}

struct Conn {
    stream: UnixStream,
    /// The registered pid this connection speaks for.
    owner: Pid,
    peer: Peer,
    /// Bytes of an incomplete line.
    partial: Vec<u8>,
    queue: VecDeque<Arc<[u8]>>,
    queued_bytes: usize,
    /// Bytes of the queue's first message already written.
    written: usize,
    wants_write: bool,
    dropped: u64,
    dropped_unlogged: u64,
    drop_logged_at: Option<Instant>,
}

struct Pending {
    stream: UnixStream,
    pid: Pid,
    deadline: Instant,
}

struct Bus {
    poll: Poll,
    listener: UnixListener,
    commands: Receiver<BusCommand>,
    events: Sender<BusEvent>,
    supervisor_waker: Arc<Waker>,
    uid: u32,
    /// The uid the children run as, if the master drops privileges for them.
    child_uid: Option<u32>,
    registered: HashMap<Pid, Registered>,
    /// Slot → the pid of its current (latest registered) worker.
    current: HashMap<usize, Pid>,
    conns: HashMap<Token, Conn>,
    /// Connections from a pid not registered yet, waiting up to [`AUTH_WAIT`].
    pending: Vec<Pending>,
    next_token: usize,
    /// Envelopes addressed to nobody connected (the agent down, an unknown worker id).
    undeliverable: u64,
    refused_logged_at: Option<Instant>,
}

enum Auth {
    Owner(Pid),
    Unknown,
    Refused(String),
}

impl Bus {
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self
                .pending
                .iter()
                .map(|p| p.deadline)
                .min()
                .map(|t| t.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("bus poll failed: {e}; the message bus stops");
                return;
            }
            // Registrations first, so a child that connected right after its spawn is known.
            loop {
                match self.commands.try_recv() {
                    Ok(cmd) => self.on_command(cmd),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return,
                }
            }
            self.retry_pending();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    token => {
                        if event.is_readable() || event.is_read_closed() {
                            self.read(token);
                        }
                        if event.is_writable() {
                            self.flush(token);
                        }
                    }
                }
            }
        }
    }

    fn on_command(&mut self, cmd: BusCommand) {
        match cmd {
            BusCommand::Register { pid, peer, id } => {
                if let Peer::Worker(slot) = peer {
                    self.current.insert(slot, pid);
                }
                self.registered.insert(pid, Registered { peer, id });
            }
            BusCommand::Forget(pid) => {
                self.registered.remove(&pid);
                self.current.retain(|_, p| *p != pid);
                let gone: Vec<Token> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.owner == pid)
                    .map(|(t, _)| *t)
                    .collect();
                for token in gone {
                    self.close(token, None);
                }
            }
            BusCommand::Send { to, kind, data } => {
                let mut envelope = Map::new();
                envelope.insert("to".into(), to.to_json());
                envelope.insert("type".into(), Value::from(kind));
                envelope.insert("data".into(), data);
                self.route(Peer::Master, None, to, envelope);
            }
            BusCommand::Status => {
                for c in self.conns.values() {
                    info!(
                        "status: bus {} (pid {}): {} messages queued ({} bytes), {} dropped",
                        c.peer,
                        c.owner,
                        c.queue.len(),
                        c.queued_bytes,
                        c.dropped
                    );
                }
                info!(
                    "status: bus {} connections, {} messages to nobody",
                    self.conns.len(),
                    self.undeliverable
                );
            }
        }
    }

    /// Which registered child `pid` speaks for: itself or its nearest registered ancestor.
    fn authenticate(&self, pid: Pid, uid: u32) -> Auth {
        if uid != self.uid && uid != 0 && Some(uid) != self.child_uid {
            return Auth::Refused(format!(
                "uid {uid} is neither ours ({}), the workers' nor root",
                self.uid
            ));
        }
        let mut p = pid;
        for _ in 0..MAX_ANCESTRY {
            if self.registered.contains_key(&p) {
                return Auth::Owner(p);
            }
            match sys::parent_pid(p) {
                Ok(parent) if parent > 1 => p = parent,
                _ => break,
            }
        }
        Auth::Unknown
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: the connection stays queued; try on the next wake.
                    warn!("bus: accept failed: {e}");
                    return;
                }
            };
            let (pid, uid) = match sys::peer_cred(stream.as_fd()) {
                Ok(cred) => (cred.pid, cred.uid),
                Err(e) => {
                    warn!("bus: no peer credentials: {e}; connection closed");
                    continue;
                }
            };
            if self.conns.len() + self.pending.len() >= MAX_CONNECTIONS {
                self.log_refusal(pid, uid, "too many connections");
                continue;
            }
            match self.authenticate(pid, uid) {
                Auth::Owner(owner) => self.admit(stream, owner),
                Auth::Unknown => self.pending.push(Pending {
                    stream,
                    pid,
                    deadline: Instant::now() + AUTH_WAIT,
                }),
                Auth::Refused(why) => self.log_refusal(pid, uid, &why),
            }
        }
    }

    fn retry_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let now = Instant::now();
        for p in std::mem::take(&mut self.pending) {
            match self.authenticate(p.pid, self.uid) {
                Auth::Owner(owner) => self.admit(p.stream, owner),
                _ if now >= p.deadline => self.log_refusal(
                    p.pid,
                    self.uid,
                    "not a worker, the agent or a descendant of one",
                ),
                _ => self.pending.push(p),
            }
        }
    }

    /// Refusals are logged at most once a second (a local user could otherwise fill the log).
    fn log_refusal(&mut self, pid: Pid, uid: u32, why: &str) {
        let now = Instant::now();
        if self
            .refused_logged_at
            .is_none_or(|t| now.duration_since(t) >= DROP_LOG_INTERVAL)
        {
            self.refused_logged_at = Some(now);
            warn!("bus: refused a connection from pid {pid} uid {uid}: {why}");
        }
    }

    fn admit(&mut self, mut stream: UnixStream, owner: Pid) {
        let Some(reg) = self.registered.get(&owner) else {
            return;
        };
        let peer = reg.peer;
        let token = Token(self.next_token);
        self.next_token += 1;
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, token, Interest::READABLE)
        {
            warn!("bus: cannot watch a connection of {peer}: {e}");
            return;
        }
        debug!("bus: {peer} (pid {owner}) connected");
        self.conns.insert(
            token,
            Conn {
                stream,
                owner,
                peer,
                partial: Vec::new(),
                queue: VecDeque::new(),
                queued_bytes: 0,
                written: 0,
                wants_write: false,
                dropped: 0,
                dropped_unlogged: 0,
                drop_logged_at: None,
            },
        );
        // Anything it sent before it was admitted is in the socket: read it now (the poll is
        // edge-triggered and may have nothing new to report).
        self.read(token);
    }

    fn close(&mut self, token: Token, why: Option<&str>) {
        if let Some(mut c) = self.conns.remove(&token) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            if let Some(why) = why {
                warn!("bus: {} (pid {}) disconnected: {why}", c.peer, c.owner);
            }
            if c.dropped > 0 {
                warn!(
                    "bus: {} (pid {}) left; {} messages to it were dropped in all",
                    c.peer, c.owner, c.dropped
                );
            }
        }
    }

    fn read(&mut self, token: Token) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let Some(c) = self.conns.get_mut(&token) else {
                return;
            };
            let n = match c.stream.read(&mut buf) {
                Ok(0) => {
                    self.close(token, None);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.close(token, Some(&e.to_string()));
                    return;
                }
            };
            let (owner, peer) = (c.owner, c.peer);
            let mut lines = Vec::new();
            let mut rest = &buf[..n];
            while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
                let mut line = std::mem::take(&mut c.partial);
                line.extend_from_slice(&rest[..nl]);
                lines.push(line);
                rest = &rest[nl + 1..];
            }
            c.partial.extend_from_slice(rest);
            let too_long = c.partial.len() >= MAX_LINE_BYTES
                || lines.iter().any(|l| l.len() >= MAX_LINE_BYTES);
            if too_long {
                self.close(
                    token,
                    Some(&format!("a line longer than {MAX_LINE_BYTES} bytes")),
                );
                return;
            }
            for line in lines {
                self.on_line(token, owner, peer, &line);
            }
        }
    }

    fn on_line(&mut self, token: Token, owner: Pid, from: Peer, line: &[u8]) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let envelope = match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(map)) => map,
            _ => {
                debug!("bus: {from} (pid {owner}) sent a line that is not a JSON object");
                return;
            }
        };
        let Some(to) = envelope.get("to").and_then(Target::parse) else {
            debug!("bus: {from} (pid {owner}) sent an envelope without a valid \"to\"");
            return;
        };
        if !envelope.get("type").is_some_and(Value::is_string) {
            debug!("bus: {from} (pid {owner}) sent an envelope without a string \"type\"");
            return;
        }
        self.route(from, Some(token), to, envelope);
    }

    /// Stamps `from` and queues the envelope for every connection it goes to.
    fn route(
        &mut self,
        from: Peer,
        sender: Option<Token>,
        to: Target,
        mut envelope: Map<String, Value>,
    ) {
        if to == Target::Master {
            self.deliver_to_master(from, sender, &envelope);
            return;
        }
        envelope.insert("from".into(), from.to_json());
        let mut bytes = match serde_json::to_vec(&envelope) {
            Ok(b) => b,
            Err(_) => return,
        };
        bytes.push(b'\n');
        let line: Arc<[u8]> = bytes.into();
        let current = |slot: &usize| self.current.get(slot).copied();
        let recipients: Vec<Token> = self
            .conns
            .iter()
            .filter(|&(&t, c)| {
                Some(t) != sender
                    && match to {
                        Target::All => c.peer != Peer::Master,
                        Target::Agent => c.peer == Peer::Agent,
                        Target::Worker(slot) => {
                            c.peer == Peer::Worker(slot) && current(&slot) == Some(c.owner)
                        }
                        Target::Master => false,
                    }
            })
            .map(|(&t, _)| t)
            .collect();
        if recipients.is_empty() && to != Target::All {
            self.undeliverable += 1;
            debug!("bus: nobody connected for an envelope to {to:?} from {from}");
        }
        for token in recipients {
            self.enqueue(token, Arc::clone(&line));
        }
    }

    fn deliver_to_master(
        &mut self,
        from: Peer,
        sender: Option<Token>,
        envelope: &Map<String, Value>,
    ) {
        let kind = envelope.get("type").and_then(Value::as_str).unwrap_or("");
        let owner = sender.and_then(|t| self.conns.get(&t)).map(|c| c.owner);
        match kind {
            "heartbeat" | "ready" => {
                if let Some(pid) = owner {
                    let id = self.registered.get(&pid).and_then(|r| r.id);
                    let ev = if kind == "ready" {
                        BusEvent::Ready { pid, id }
                    } else {
                        BusEvent::Heartbeat { pid, id }
                    };
                    if self.events.send(ev).is_ok() {
                        let _ = self.supervisor_waker.wake();
                    }
                }
            }
            "ping" => {
                if let Some(token) = sender {
                    let mut reply = Map::new();
                    reply.insert("from".into(), Peer::Master.to_json());
                    reply.insert("to".into(), from.to_json());
                    reply.insert("type".into(), Value::from("pong"));
                    reply.insert(
                        "data".into(),
                        envelope.get("data").cloned().unwrap_or(Value::Null),
                    );
                    if let Ok(mut bytes) = serde_json::to_vec(&reply) {
                        bytes.push(b'\n');
                        self.enqueue(token, bytes.into());
                    }
                }
            }
            other => info!("bus: {from} says {other:?} to the master"),
        }
    }

    fn enqueue(&mut self, token: Token, line: Arc<[u8]>) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.queue.len() >= PEER_QUEUE_MESSAGES || c.queued_bytes + line.len() > PEER_QUEUE_BYTES {
            c.dropped += 1;
            c.dropped_unlogged += 1;
            let now = Instant::now();
            if c.drop_logged_at
                .is_none_or(|t| now.duration_since(t) >= DROP_LOG_INTERVAL)
            {
                warn!(
                    "bus: {} (pid {}) is not reading its messages: {} dropped ({} since the last report, {} queued)",
                    c.peer,
                    c.owner,
                    c.dropped,
                    c.dropped_unlogged,
                    c.queue.len()
                );
                c.drop_logged_at = Some(now);
                c.dropped_unlogged = 0;
            }
            return;
        }
        c.queued_bytes += line.len();
        c.queue.push_back(line);
        if !c.wants_write {
            self.flush(token);
        }
    }

    fn flush(&mut self, token: Token) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        while let Some(front) = c.queue.front() {
            match c.stream.write(&front[c.written..]) {
                Ok(n) => {
                    c.written += n;
                    if c.written == front.len() {
                        c.queued_bytes -= front.len();
                        c.written = 0;
                        c.queue.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.close(token, Some(&e.to_string()));
                    return;
                }
            }
        }
        let want = !c.queue.is_empty();
        if want != c.wants_write {
            c.wants_write = want;
            let interest = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            if let Err(e) = self
                .poll
                .registry()
                .reregister(&mut c.stream, token, interest)
            {
                self.close(token, Some(&e.to_string()));
            }
        }
        if let Some(c) = self.conns.get_mut(&token)
            && c.dropped_unlogged > 0
            && c.queue.is_empty()
        {
            info!(
                "bus: {} (pid {}) is reading again; {} messages to it were dropped in all",
                c.peer, c.owner, c.dropped
            );
            c.dropped_unlogged = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn targets_parse() {
        assert_eq!(Target::parse(&json!("master")), Some(Target::Master));
        assert_eq!(Target::parse(&json!("agent")), Some(Target::Agent));
        assert_eq!(Target::parse(&json!("all")), Some(Target::All));
        assert_eq!(Target::parse(&json!(3)), Some(Target::Worker(3)));
        assert_eq!(Target::parse(&json!("3")), Some(Target::Worker(3)));
        assert_eq!(Target::parse(&json!(-1)), None);
        assert_eq!(Target::parse(&json!("nobody")), None);
        assert_eq!(Target::parse(&json!(null)), None);
    }

    fn line(stream: &mut std::os::unix::net::UnixStream) -> Value {
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while stream.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            out.push(b[0]);
        }
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn relays_with_from_stamped_by_the_bus() {
        let poll = Poll::new().unwrap();
        let sup_waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
        let (tx, rx) = crossbeam_channel::unbounded();
        let bus = spawn(tx, sup_waker, None).unwrap();
        let me = sys::getpid();
        let mode = std::fs::metadata(bus.path().parent().unwrap()).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o700
        );

        // This process is not registered yet: a connection is held, then admitted once it is.
        let mut a = std::os::unix::net::UnixStream::connect(bus.path()).unwrap();
        bus.send(BusCommand::Register {
            pid: me,
            peer: Peer::Worker(2),
            id: Some(7),
        });
        a.write_all(b"{\"to\":\"master\",\"type\":\"ping\",\"data\":[1]}\n")
            .unwrap();
        assert_eq!(
            line(&mut a),
            json!({"from": "master", "to": 2, "type": "pong", "data": [1]})
        );
        a.write_all(b"{\"to\":\"master\",\"type\":\"heartbeat\",\"from\":\"agent\"}\n")
            .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            BusEvent::Heartbeat {
                pid: me,
                id: Some(7)
            }
        );
        // A second connection of the same process gets what the first sends to its slot,
        // with `from` stamped by the bus, not taken from the envelope.
        let mut b = std::os::unix::net::UnixStream::connect(bus.path()).unwrap();
        b.write_all(b"{\"to\":\"master\",\"type\":\"ping\"}\n")
            .unwrap();
        assert_eq!(line(&mut b)["type"], json!("pong"));
        a.write_all(b"{\"to\":2,\"type\":\"t\",\"from\":\"master\",\"data\":{\"x\":1}}\n")
            .unwrap();
        let got = line(&mut b);
        assert_eq!(got["from"], json!(2));
        assert_eq!(got["data"], json!({"x": 1}));
        drop(bus);
    }
}
