//! The Rust worker API: a worker process adopts the fds the master started it with (fd `3+i`
//! per listener, DESIGN.md section 3 / docs/PROTOCOL.md) and accepts connections from them,
//! whatever the mode.
//!
//! Fd ownership: [`Worker::from_env`] adopts fds `3..3+LISTEN_FDS` exactly once per process;
//! each becomes the `OwnedFd` inside one [`Listener`]. In dispatch mode the channel fd is shared
//! (`Arc`) between its `Listener` and every [`Connection`] received from it, because a
//! connection reports its own close on that channel when dropped; the channel is closed when the
//! last of them goes. Each `Connection` owns its TCP fd. In `reuseport`/`shared` mode the
//! listening socket is owned by the `Listener` (the master holds its own copy, so closing ours
//! never resets queued connections).
//!
//! Threads: nothing here spawns a thread. A `Worker`, its `Listener`s and its `Connection`s are
//! `Send + Sync`; close reports are atomic counters, so connections may be dropped on any thread.
//!
//! # Close reports (CLOSED coalescing)
//!
//! The master counts a connection as active from the moment it sends it until the worker
//! reports it closed, so every connection handed over must be reported exactly once. Each
//! dispatch channel has one counter of *unreported closes*:
//!
//! - dropping a [`Connection`] (or its [`CloseToken`]) closes the TCP fd first, then adds 1;
//! - a *flush* takes the whole counter with one atomic `swap(0)` and sends one `CLOSED(n)`;
//!   if the send fails (`EAGAIN`: the master is not reading; `EPIPE`: it is gone) the `n` is
//!   added back, so it goes out with the next flush. A close is therefore never lost (it is in
//!   the counter or in a message sent) and never double counted (only the flusher whose `swap`
//!   took it can send it, and it adds it back only when the kernel refused the message — a
//!   `SOCK_SEQPACKET` send is all or nothing).
//!
//! By default every drop flushes at once (one `send` per close). An event loop should call
//! [`Worker::defer_close_reports`]`(true)` and then [`Worker::flush_closed`] once per iteration
//! before it waits again: all closes of that iteration then travel in one message. `accept`
//! also flushes first, and dropping a `Listener` switches its channel back to immediate
//! reporting, so deferred counts are not stranded when nothing flushes any more.
//!
//! # Kernel steering
//!
//! Under `--steer kernel` the worker is in reuseport mode and `RCLUSTER_STEER_FD` names the
//! steering table ([`rcluster_proto::steer`]). [`Worker::from_env`] maps it; each accept from a
//! listener adds one to the slot's `accepted` and dropping the [`Connection`] adds one to
//! `closed` *before* the socket closes (so a client that sees the FIN and reconnects finds the
//! load already lower). Atomic adds on shared memory, no system call. Each accept also stamps
//! the slot's `progress_ns`, and an event loop that calls [`Worker::loop_waiting`] before each
//! wait and [`Worker::loop_woke`] after it stamps `busy_ns`, and each accept and close while
//! the loop is out of its wait stamps it again: the program then treats the slot as stuck, and
//! passes over it, once a placement has waited 1 ms untaken or the loop has spent 1 ms on one
//! thing (out of its wait with no accept or close), so a loop working through a burst of
//! connections is not taken for one inside a long request. Without the table (or if it cannot
//! be mapped) the kernel program keeps its own counts alone.
//!
//! Each reuseport listener also adopts its overflow queue (`RCLUSTER_STEER_OVERFLOW_FD + i`,
//! [`rcluster_proto::steer`]): registering the listener with mio registers the queue under the
//! same token and counts this process as a watcher, so the program may spill to it when no
//! worker is free (every slot stuck, or, under least-conn and p2c, the pick's loop serving for
//! over 50 µs or the pick's worker not yet having taken a connection placed on its listener);
//! a non-blocking accept that finds the listener empty, while the table says a
//! connection waits in the queue, takes one from it — one per [`Worker::loop_waiting`] when the
//! loop calls it, every time otherwise — and counts it as this slot's. Deregistering (or
//! dropping the listener) stops the watch.

pub mod bus;

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;

use rcluster_proto::env::RCLUSTER_STEER_FD;
use rcluster_proto::steer as page;
use rcluster_proto::{HEADER_LEN, MAX_FDS_PER_CONN, ProtocolError, ToMaster, ToWorker};
use rcluster_sys::bpf::MapMmap;
use rcluster_sys::{self as sys, scm};

pub use rcluster_proto::{
    Contract, ContractError, LISTEN_FDS_START, MAX_LISTENERS, Mode, NotifyAddr,
};

/// Set once [`Worker::from_env`] has adopted the inherited fds, so a second call cannot take
/// ownership of (and later double-close) the same fd numbers.
static INHERITED_FDS_ADOPTED: AtomicBool = AtomicBool::new(false);

/// Why a worker could not start or could not talk to its master.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// The environment is not a usable worker contract (a variable missing or invalid, or
    /// `LISTEN_PID` naming another process).
    #[error(transparent)]
    Contract(#[from] ContractError),
    /// [`Worker::from_env`] was called before in this process.
    #[error("the inherited listener fds were already adopted by an earlier Worker::from_env")]
    AlreadyAdopted,
    /// An inherited fd number is not open.
    #[error("inherited fd {fd} (listener {index}) is not open in this process")]
    Inherit {
        /// The listener's index.
        index: usize,
        /// Its fd number, `3 + index`.
        fd: i32,
        /// What `fcntl(2)` said.
        #[source]
        source: io::Error,
    },
    /// [`Worker::new`] got a different number of fds than the contract names.
    #[error("{got} listener fds given but the contract names {expected}")]
    FdCount {
        /// `Contract::listen_fds`.
        expected: usize,
        /// Fds given.
        got: usize,
    },
    /// A listener fd is not the kind of socket the mode needs.
    #[error("listener {index} is {found}, but {mode} mode needs {expected}")]
    WrongKind {
        /// The listener's index.
        index: usize,
        /// The mode (`dispatch`, `reuseport`, `shared`).
        mode: &'static str,
        /// What the mode needs.
        expected: &'static str,
        /// What the fd is.
        found: String,
    },
    /// Sending READY/STOPPING on a dispatch channel failed.
    #[error("failed to send {what} on listener {index}'s dispatch channel")]
    Channel {
        /// The message (`READY`, `STOPPING`).
        what: &'static str,
        /// The listener's index.
        index: usize,
        /// What `send(2)` said.
        #[source]
        source: io::Error,
    },
    /// Sending `READY=1`/`STOPPING=1` to `NOTIFY_SOCKET` failed.
    #[error("failed to send {what} to NOTIFY_SOCKET {addr}")]
    Notify {
        /// The datagram (`READY=1`, `STOPPING=1`).
        what: &'static str,
        /// The socket's address.
        addr: NotifyAddr,
        /// What `sendto(2)` said.
        #[source]
        source: io::Error,
    },
}

/// The master closed its end of a dispatch channel (end of stream): no connection will come on
/// it any more. Returned inside an `io::Error` of kind `UnexpectedEof`; test with
/// [`is_master_gone`].
#[derive(Debug, Error)]
#[error("the master closed listener {index}'s dispatch channel: no more connections will come")]
pub struct MasterGone {
    /// The listener whose channel ended.
    pub index: usize,
}

/// Whether an error from [`Listener::accept`] means the master is gone ([`MasterGone`]).
pub fn is_master_gone(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::UnexpectedEof
        && err.get_ref().is_some_and(|inner| inner.is::<MasterGone>())
}

/// Sends one datagram to `addr` from an unbound socket (sd_notify(3) semantics: fire and
/// forget).
fn notify(addr: &NotifyAddr, datagram: &[u8]) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    match addr {
        NotifyAddr::Path(path) => sock.send_to(datagram, path)?,
        NotifyAddr::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(datagram, &addr)?
        }
    };
    Ok(())
}

/// A worker process's side of the contract: who it is and where its connections come from.
#[derive(Debug)]
pub struct Worker {
    contract: Contract,
    listeners: Vec<Listener>,
    ready_sent: AtomicBool,
    stopping_sent: AtomicBool,
}

impl Worker {
    /// Reads the contract from the environment and adopts fds `3..3+LISTEN_FDS`, checking each
    /// is the kind of socket the mode needs. Call it once per process, before anything else
    /// opens fds: a second call fails with [`WorkerError::AlreadyAdopted`].
    pub fn from_env() -> Result<Worker, WorkerError> {
        let contract = Contract::from_env()?;
        contract.check_pid(sys::getpid())?;
        // A worker out of fds cannot install the connections a CONN message carries (the
        // kernel closes them, MSG_CTRUNC); give it all the room its hard limit allows. Failing
        // to raise it only keeps the soft limit.
        let _ = sys::raise_nofile_limit();
        if INHERITED_FDS_ADOPTED.swap(true, Ordering::SeqCst) {
            return Err(WorkerError::AlreadyAdopted);
        }
        let mut fds = Vec::with_capacity(contract.listen_fds);
        for index in 0..contract.listen_fds {
            let fd = LISTEN_FDS_START + index as i32;
            let owned = sys::adopt_inherited_fd(fd).map_err(|source| WorkerError::Inherit {
                index,
                fd,
                source,
            })?;
            fds.push(owned);
        }
        let steer = contract
            .steer_fd
            .and_then(|fd| SteerTable::adopt(fd, contract.id));
        let overflow_fd = contract.overflow_fd;
        let mut worker = Worker::new(contract, fds)?;
        if let Some(table) = steer {
            for l in &mut worker.listeners {
                l.steer = Some(Arc::clone(&table));
                if let (Some(first), ListenerKind::Socket(_)) = (overflow_fd, &l.kind) {
                    l.overflow = Overflow::adopt(first + l.index as i32);
                }
            }
        }
        Ok(worker)
    }

    /// A worker around fds the caller owns (fd `i` is listener `i`), checked like
    /// [`Worker::from_env`] checks inherited ones.
    pub fn new(contract: Contract, fds: Vec<OwnedFd>) -> Result<Worker, WorkerError> {
        if fds.len() != contract.listen_fds {
            return Err(WorkerError::FdCount {
                expected: contract.listen_fds,
                got: fds.len(),
            });
        }
        let listeners = fds
            .into_iter()
            .enumerate()
            .map(|(index, fd)| {
                Listener::new(
                    index,
                    contract.mode,
                    fd,
                    contract.addresses.get(index).cloned(),
                    contract.fd_names.get(index).cloned(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Worker {
            contract,
            listeners,
            ready_sent: AtomicBool::new(false),
            stopping_sent: AtomicBool::new(false),
        })
    }

    /// Kernel steering: the calling thread, the event loop that accepts, is about to wait for
    /// events. With [`Worker::loop_woke`] after each wait, this lets the program pass over a
    /// single-threaded worker 1 ms into a long request, before a connection queues behind it
    /// (module docs). Only for a worker whose one thread both accepts and serves; a no-op
    /// outside kernel steering. An atomic store.
    pub fn loop_waiting(&self) {
        if let Some(t) = self.steer_table() {
            t.store(page::BUSY_NS, 0);
        }
        for l in &self.listeners {
            if let Some(o) = &l.overflow {
                o.taken.store(TAKE_ONE, Ordering::Relaxed);
            }
        }
    }

    /// Kernel steering: the loop's wait returned; it is busy from now until the next
    /// [`Worker::loop_waiting`]. A clock read (vDSO) and an atomic store; a no-op outside
    /// kernel steering.
    pub fn loop_woke(&self) {
        if let Some(t) = self.steer_table() {
            t.store(page::BUSY_NS, sys::monotonic_ns());
        }
    }

    /// Kernel steering: the table every listener counts on (one per worker).
    fn steer_table(&self) -> Option<&SteerTable> {
        self.listeners.first().and_then(|l| l.steer.as_deref())
    }

    /// The stable slot, `0..N` (`RCLUSTER_WORKER_ID`).
    pub fn id(&self) -> u32 {
        self.contract.id
    }

    /// The master's reload count when this worker was started (`RCLUSTER_GENERATION`).
    pub fn generation(&self) -> u64 {
        self.contract.generation
    }

    /// How connections arrive.
    pub fn mode(&self) -> Mode {
        self.contract.mode
    }

    /// The whole contract this worker was started with.
    pub fn contract(&self) -> &Contract {
        &self.contract
    }

    /// The listeners, in fd order.
    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// The listeners, mutably (registering with mio needs `&mut`).
    pub fn listeners_mut(&mut self) -> &mut [Listener] {
        &mut self.listeners
    }

    /// Tells the master this worker accepts connections: `READY` on every dispatch channel and
    /// `READY=1` to `NOTIFY_SOCKET` if set. Only the first successful call sends anything.
    pub fn ready(&self) -> Result<(), WorkerError> {
        if self.ready_sent.load(Ordering::Acquire) {
            return Ok(());
        }
        // The master may then put up to MAX_FDS_PER_CONN connections in one message (much
        // cheaper per connection for both sides); `accept` hands them out one at a time.
        let ready = ToMaster::Ready {
            max_fds: MAX_FDS_PER_CONN as u64,
        };
        for listener in &self.listeners {
            if let ListenerKind::Channel(chan) = &listener.kind {
                chan.ready_value
                    .store(MAX_FDS_PER_CONN as u64, Ordering::Relaxed);
            }
        }
        self.announce(ready, "READY", b"READY=1", "READY=1")?;
        self.ready_sent.store(true, Ordering::Release);
        Ok(())
    }

    /// Tells the master this worker is draining and wants no more connections: `STOPPING` on
    /// every dispatch channel and `STOPPING=1` to `NOTIFY_SOCKET`. Connections the master
    /// already queued stay in the channel and should be left there: the master takes them back
    /// after this process exits. Only the first successful call sends anything.
    pub fn stopping(&self) -> Result<(), WorkerError> {
        if self.stopping_sent.load(Ordering::Acquire) {
            return Ok(());
        }
        self.announce(ToMaster::Stopping, "STOPPING", b"STOPPING=1", "STOPPING=1")?;
        self.stopping_sent.store(true, Ordering::Release);
        Ok(())
    }

    /// Sends `HEARTBEAT` on every dispatch channel without blocking; a full channel skips it.
    pub fn heartbeat(&self) -> Result<(), WorkerError> {
        for listener in &self.listeners {
            if let ListenerKind::Channel(chan) = &listener.kind {
                match chan.send(ToMaster::Heartbeat, libc::MSG_DONTWAIT) {
                    Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                        return Err(WorkerError::Channel {
                            what: "HEARTBEAT",
                            index: listener.index,
                            source: e,
                        });
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Switches every dispatch channel between reporting each close at once (`false`, the
    /// default) and only counting it until [`Worker::flush_closed`] (`true`).
    pub fn defer_close_reports(&self, defer: bool) {
        for listener in &self.listeners {
            listener.defer_close_reports(defer);
        }
    }

    /// Sends the closes counted since the last flush, one `CLOSED(n)` per channel that has any.
    /// Returns how many are still unreported because a channel was full (`EAGAIN`): flush again
    /// later. Other send errors (`EPIPE`: master gone) are returned after trying every channel;
    /// their counts are kept too.
    pub fn flush_closed(&self) -> io::Result<u64> {
        let mut pending = 0;
        let mut first_err = None;
        for listener in &self.listeners {
            match listener.flush_closed() {
                Ok(n) => pending += n,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(pending),
        }
    }

    fn announce(
        &self,
        msg: ToMaster,
        what: &'static str,
        datagram: &[u8],
        notify_what: &'static str,
    ) -> Result<(), WorkerError> {
        for listener in &self.listeners {
            if let ListenerKind::Channel(chan) = &listener.kind {
                match chan.send(msg, 0) {
                    Ok(_) => {}
                    // STOPPING to a master that closed the channel (it is stopping us, or gone)
                    // tells nobody anything: not an error.
                    Err(e) if msg == ToMaster::Stopping && is_peer_gone(&e) => {}
                    Err(source) => {
                        return Err(WorkerError::Channel {
                            what,
                            index: listener.index,
                            source,
                        });
                    }
                }
            }
        }
        if let Some(addr) = &self.contract.notify_socket {
            match notify(addr, datagram) {
                Ok(()) => {}
                Err(e) if msg == ToMaster::Stopping && is_peer_gone(&e) => {}
                Err(source) => {
                    return Err(WorkerError::Notify {
                        what: notify_what,
                        addr: addr.clone(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

/// EPIPE, ECONNRESET, ECONNREFUSED: nobody is at the other end any more.
fn is_peer_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNRESET | libc::ECONNREFUSED)
    )
}

/// One of the worker's listeners (fd `3+i`): a dispatch channel or a listening TCP socket.
/// Either way [`Listener::accept`] yields a [`Connection`].
#[derive(Debug)]
pub struct Listener {
    index: usize,
    address: Option<String>,
    name: Option<String>,
    nonblocking: bool,
    kind: ListenerKind,
    /// Kernel steering: the table accepts and closes are counted on.
    steer: Option<Arc<SteerTable>>,
    /// Kernel steering: the listener's overflow queue (module docs).
    overflow: Option<Overflow>,
}

/// [`Overflow::taken`]: the loop never said it waits, so no limit.
const TAKE_ANY: u8 = 0;
/// [`Overflow::taken`]: one connection may be taken before the loop next waits.
const TAKE_ONE: u8 = 1;
/// [`Overflow::taken`]: taken one since the loop last waited.
const TAKEN: u8 = 2;

/// A listener's kernel-steering overflow queue: a listening socket shared by every worker.
#[derive(Debug)]
struct Overflow {
    socket: TcpListener,
    /// `TAKE_ANY`, `TAKE_ONE` or `TAKEN`.
    taken: std::sync::atomic::AtomicU8,
    /// Registered with a mio registry: this process counts as a watcher.
    watching: AtomicBool,
    /// The epoll set it is registered in (-1: none), so dropping the listener removes it: the
    /// socket is shared with the master, so closing our fd alone would leave it registered.
    epfd: AtomicI32,
}

impl Overflow {
    /// Adopts the inherited fd `fd` if it is a listening TCP socket (the master made it
    /// non-blocking; it is only ever tried). `None` (with a warning) otherwise.
    fn adopt(fd: i32) -> Option<Overflow> {
        let owned = sys::adopt_inherited_fd(fd)
            .ok()
            .filter(|o| sys::getsockopt_int(o.as_fd(), libc::SO_ACCEPTCONN).ok() == Some(1));
        let Some(owned) = owned else {
            log::warn!(
                "{}: fd {fd} is not a listening socket; not watching the overflow queue",
                rcluster_proto::env::RCLUSTER_STEER_OVERFLOW_FD
            );
            return None;
        };
        Some(Overflow {
            socket: TcpListener::from(owned),
            taken: std::sync::atomic::AtomicU8::new(TAKE_ANY),
            watching: AtomicBool::new(false),
            epfd: AtomicI32::new(-1),
        })
    }

    /// One connection from the queue, if the loop has not taken one since it last waited.
    fn take(&self, nonblocking: bool) -> Option<TcpStream> {
        if self.taken.load(Ordering::Relaxed) == TAKEN {
            return None;
        }
        let fd = sys::accept4(self.socket.as_fd(), nonblocking).ok()?;
        let _ = self
            .taken
            .compare_exchange(TAKE_ONE, TAKEN, Ordering::Relaxed, Ordering::Relaxed);
        Some(TcpStream::from(fd))
    }

    /// Counts this process as a watcher on `table` (or stops), once.
    fn watch(&self, table: Option<&SteerTable>, on: bool) {
        if self.watching.swap(on, Ordering::SeqCst) == on {
            return;
        }
        if let Some(w) = table.and_then(|t| t.map.u32_at(page::offset(t.slot, page::REPORTING))) {
            if on {
                w.fetch_add(page::WATCHER, Ordering::SeqCst);
            } else {
                w.fetch_sub(page::WATCHER, Ordering::SeqCst);
            }
        }
    }
}

/// This worker's line of the kernel-steering table (module docs, [`rcluster_proto::steer`]).
#[derive(Debug)]
struct SteerTable {
    map: MapMmap,
    slot: usize,
}

impl SteerTable {
    /// Maps the table inherited at `fd` and marks `slot` as reporting; `None` (with a warning)
    /// when the fd is not a BPF map or cannot be mapped.
    fn adopt(fd: i32, slot: u32) -> Option<Arc<SteerTable>> {
        let slot = slot as usize;
        let mapped = sys::adopt_inherited_fd(fd)
            .and_then(|owned| {
                if !sys::bpf::is_bpf_map(owned.as_fd()) {
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a BPF map"));
                }
                if slot >= page::MAX_SLOTS {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "slot beyond the table",
                    ));
                }
                // The mapping outlives the fd (mmap(2)); the fd is closed here.
                MapMmap::new(owned.as_fd(), page::TABLE_SIZE)
            })
            .map_err(|e| {
                log::warn!(
                    "{}={fd}: not counting for kernel steering: {e}",
                    RCLUSTER_STEER_FD
                )
            })
            .ok()?;
        let table = SteerTable { map: mapped, slot };
        // Tells a preloaded shim in this process that the worker counts itself.
        if let Some(w) = table.map.u32_at(page::offset(slot, page::REPORTING)) {
            w.store(page::REPORTING_SELF, Ordering::SeqCst);
        }
        Some(Arc::new(table))
    }

    fn add(&self, field: usize) {
        if let Some(w) = self.map.u64_at(page::offset(self.slot, field)) {
            w.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn store(&self, field: usize, value: u64) {
        if let Some(w) = self.map.u64_at(page::offset(self.slot, field)) {
            w.store(value, Ordering::SeqCst);
        }
    }

    /// One accept: counted, and the queue's clock (`progress_ns`) restarted.
    fn accepted(&self) {
        self.add(page::ACCEPTED);
        let now = sys::monotonic_ns();
        self.store(page::PROGRESS_NS, now);
        self.progressed(now);
    }

    /// An accept or a close at `now`: a loop out of its wait (`busy_ns` not 0) has moved on to
    /// another connection, so its stamp restarts. A compare-exchange, so a close on another
    /// thread never overwrites the 0 the loop stored before it waits.
    fn progressed(&self, now: u64) {
        if let Some(w) = self.map.u64_at(page::offset(self.slot, page::BUSY_NS)) {
            let busy = w.load(Ordering::SeqCst);
            if busy != 0 {
                let _ = w.compare_exchange(busy, now, Ordering::SeqCst, Ordering::SeqCst);
            }
        }
    }

    /// Whether the overflow queue may hold a connection nobody has taken (placed there more
    /// often than taken or written off): three loads, so a loop that drains its own listener
    /// does not pay an `accept` on the queue each time it finds nothing.
    fn overflow_waiting(&self) -> bool {
        let at = |field| {
            self.map
                .u64_at(page::offset(page::OVERFLOW, field))
                .map_or(0, |w| w.load(Ordering::SeqCst))
        };
        page::untaken(
            at(page::ASSIGNED),
            at(page::ACCEPTED),
            at(page::FORGIVEN) as i64,
        ) > 0
    }

    /// One connection taken from the overflow queue: this slot's from now (placed and
    /// accepted here), and counted as taken on the queue's line.
    fn took_overflow(&self) {
        self.add(page::ASSIGNED);
        self.accepted();
        if let Some(w) = self
            .map
            .u64_at(page::offset(page::OVERFLOW, page::ACCEPTED))
        {
            w.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Counts one close on the steering table when dropped: placed before the socket in
/// [`Connection`] and [`MioConnection`], so the count lands before the close.
#[derive(Debug)]
struct SteerClose(Option<Arc<SteerTable>>);

impl Drop for SteerClose {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.add(page::CLOSED);
            t.progressed(sys::monotonic_ns());
        }
    }
}

#[derive(Debug)]
enum ListenerKind {
    /// Dispatch mode: the worker's end of the `SOCK_SEQPACKET` channel.
    Channel(Arc<Channel>),
    /// Reuseport/shared mode: a listening TCP socket.
    Socket(TcpListener),
}

impl Listener {
    fn new(
        index: usize,
        mode: Mode,
        fd: OwnedFd,
        address: Option<String>,
        name: Option<String>,
    ) -> Result<Listener, WorkerError> {
        let kind = match mode {
            Mode::Dispatch => {
                let ok = sys::socket_domain(fd.as_fd()).ok() == Some(libc::AF_UNIX)
                    && sys::socket_type(fd.as_fd()).ok() == Some(libc::SOCK_SEQPACKET);
                if !ok {
                    return Err(wrong_kind(
                        index,
                        mode,
                        "an AF_UNIX SOCK_SEQPACKET socket",
                        &fd,
                    ));
                }
                ListenerKind::Channel(Arc::new(Channel::new(index, fd)))
            }
            Mode::Reuseport | Mode::Shared => {
                let domain = sys::socket_domain(fd.as_fd()).ok();
                let ok = matches!(domain, Some(libc::AF_INET | libc::AF_INET6))
                    && sys::socket_type(fd.as_fd()).ok() == Some(libc::SOCK_STREAM)
                    && sys::getsockopt_int(fd.as_fd(), libc::SO_ACCEPTCONN).ok() == Some(1);
                if !ok {
                    return Err(wrong_kind(index, mode, "a listening TCP socket", &fd));
                }
                ListenerKind::Socket(TcpListener::from(fd))
            }
        };
        Ok(Listener {
            index,
            address,
            name,
            nonblocking: false,
            kind,
            steer: None,
            overflow: None,
        })
    }

    /// Position in fd order (`fd = 3 + index` for inherited listeners).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The listen address from `RCLUSTER_LISTEN`, if given.
    pub fn address(&self) -> Option<&str> {
        self.address.as_deref()
    }

    /// The fd's name from `LISTEN_FDNAMES`, if given.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Whether connections arrive over a dispatch channel (and report their close).
    pub fn is_dispatch(&self) -> bool {
        matches!(self.kind, ListenerKind::Channel(_))
    }

    /// Messages from the master that were rejected and skipped (bad header, missing or extra
    /// fds); always 0 for a listening socket.
    pub fn protocol_errors(&self) -> u64 {
        match &self.kind {
            ListenerKind::Channel(chan) => chan.protocol_errors.load(Ordering::Relaxed),
            ListenerKind::Socket(_) => 0,
        }
    }

    /// Chooses blocking or non-blocking accepts; connections accepted afterwards are in the same
    /// mode. For a dispatch channel this only changes how this process reads it
    /// (`MSG_DONTWAIT`). For a listening socket it sets `O_NONBLOCK`, which lives in the open
    /// file description: in `shared` mode every worker holds that same description, so all
    /// workers must agree (each one's blocking `accept` would otherwise see `EAGAIN`).
    pub fn set_nonblocking(&mut self, nonblocking: bool) -> io::Result<()> {
        if let ListenerKind::Socket(listener) = &self.kind {
            listener.set_nonblocking(nonblocking)?;
        }
        self.nonblocking = nonblocking;
        Ok(())
    }

    /// Accepts the next connection: blocks unless [`Listener::set_nonblocking`] was set, in
    /// which case `WouldBlock` means none is waiting. In dispatch mode a malformed message is
    /// logged, counted in [`Listener::protocol_errors`] and skipped; end of stream on the
    /// channel is an `UnexpectedEof` error carrying [`MasterGone`] (see [`is_master_gone`]).
    /// `EINTR` is retried, like std's `accept`.
    pub fn accept(&self) -> io::Result<Connection> {
        match &self.kind {
            ListenerKind::Channel(chan) => chan.receive(self.nonblocking),
            ListenerKind::Socket(listener) => {
                let stream = if self.nonblocking {
                    // accept4(2) with SOCK_NONBLOCK: the connection matches the listener's mode
                    // without another syscall.
                    match sys::accept4(listener.as_fd(), true) {
                        Ok(fd) => {
                            if let Some(t) = &self.steer {
                                t.accepted();
                            }
                            TcpStream::from(fd)
                        }
                        // Nothing on our own queue: one from the overflow queue, if the table
                        // says one may wait there.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            let Some(t) = self.steer.as_ref().filter(|t| t.overflow_waiting())
                            else {
                                return Err(e);
                            };
                            let Some(stream) = self.overflow.as_ref().and_then(|o| o.take(true))
                            else {
                                return Err(e);
                            };
                            t.took_overflow();
                            stream
                        }
                        Err(e) => return Err(e),
                    }
                } else {
                    let stream = listener.accept()?.0;
                    if let Some(t) = &self.steer {
                        t.accepted();
                    }
                    stream
                };
                Ok(Connection {
                    steer_close: SteerClose(self.steer.clone()),
                    stream,
                    seq: None,
                    listener: self.index,
                    nonblocking: self.nonblocking,
                    close: CloseToken {
                        channel: None,
                        steer: SteerClose(None),
                    },
                })
            }
        }
    }

    /// [`Listener::accept`] with `WouldBlock` as `Ok(None)`, for event loops after
    /// `set_nonblocking(true)`.
    pub fn try_accept(&self) -> io::Result<Option<Connection>> {
        match self.accept() {
            Ok(conn) => Ok(Some(conn)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// See [`Worker::defer_close_reports`]; this listener's channel only.
    pub fn defer_close_reports(&self, defer: bool) {
        if let ListenerKind::Channel(chan) = &self.kind {
            chan.deferred.store(defer, Ordering::Relaxed);
        }
    }

    /// See [`Worker::flush_closed`]; this listener's channel only.
    pub fn flush_closed(&self) -> io::Result<u64> {
        match &self.kind {
            ListenerKind::Channel(chan) => chan.flush_closed(),
            ListenerKind::Socket(_) => Ok(0),
        }
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        match &self.kind {
            ListenerKind::Channel(chan) => chan.fd.as_raw_fd(),
            ListenerKind::Socket(listener) => listener.as_raw_fd(),
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.kind {
            ListenerKind::Channel(chan) => chan.fd.as_fd(),
            ListenerKind::Socket(listener) => listener.as_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(o) = &self.overflow {
            let epfd = o.epfd.swap(-1, Ordering::SeqCst);
            if epfd >= 0 {
                let _ = sys::epoll_ctl_level(epfd, libc::EPOLL_CTL_DEL, o.socket.as_fd(), 0);
            }
            o.watch(self.steer.as_deref(), false);
        }
        if let ListenerKind::Channel(chan) = &self.kind {
            // Connections may outlive their listener; with nobody left to call flush_closed,
            // their drops must report by themselves.
            chan.deferred.store(false, Ordering::Relaxed);
            let _ = chan.flush_closed();
        }
    }
}

/// Readiness of a listener means "accept may succeed": a connection message in the channel,
/// or a connection in the socket's accept queue.
///
/// Under kernel steering the listener's overflow queue is registered beside it under the same
/// token, level-triggered (mio's own registrations are edge-triggered, and a loop takes one
/// connection from the queue per pass), and this process counts as watching it until
/// deregistered.
impl mio::event::Source for Listener {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        mio::unix::SourceFd(&self.raw_fd()).register(registry, token, interests)?;
        self.overflow_ctl(registry, libc::EPOLL_CTL_ADD, token);
        Ok(())
    }

    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        mio::unix::SourceFd(&self.raw_fd()).reregister(registry, token, interests)?;
        self.overflow_ctl(registry, libc::EPOLL_CTL_MOD, token);
        Ok(())
    }

    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        self.overflow_ctl(registry, libc::EPOLL_CTL_DEL, mio::Token(0));
        mio::unix::SourceFd(&self.raw_fd()).deregister(registry)
    }
}

impl Listener {
    /// Registers (ADD, MOD) or removes (DEL) the overflow queue in `registry`'s epoll set and
    /// counts the watch. A failure only leaves the queue unwatched (logged once per call).
    fn overflow_ctl(&self, registry: &mio::Registry, op: libc::c_int, token: mio::Token) {
        let Some(o) = &self.overflow else { return };
        let epfd = registry.as_raw_fd();
        let mut r = sys::epoll_ctl_level(epfd, op, o.socket.as_fd(), token.0 as u64);
        if op == libc::EPOLL_CTL_MOD
            && matches!(&r, Err(e) if e.raw_os_error() == Some(libc::ENOENT))
        {
            r = sys::epoll_ctl_level(epfd, libc::EPOLL_CTL_ADD, o.socket.as_fd(), token.0 as u64);
        }
        let on = op != libc::EPOLL_CTL_DEL;
        match r {
            Ok(()) => {
                o.epfd.store(if on { epfd } else { -1 }, Ordering::SeqCst);
                o.watch(self.steer.as_deref(), on);
            }
            Err(_) if !on => {
                o.epfd.store(-1, Ordering::SeqCst);
                o.watch(self.steer.as_deref(), false);
            }
            Err(e) => log::warn!(
                "listener {}: not watching the overflow queue: {e}",
                self.index
            ),
        }
    }
}

fn wrong_kind(index: usize, mode: Mode, expected: &'static str, fd: &OwnedFd) -> WorkerError {
    WorkerError::WrongKind {
        index,
        mode: mode.as_str(),
        expected,
        found: describe_socket(fd.as_fd()),
    }
}

/// "a listening AF_INET SOCK_STREAM socket", for error messages.
fn describe_socket(fd: BorrowedFd<'_>) -> String {
    let ty = match sys::socket_type(fd) {
        Ok(ty) => ty,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => return "not a socket".to_owned(),
        Err(e) => return format!("an fd that cannot be inspected ({e})"),
    };
    let domain = match sys::socket_domain(fd) {
        Ok(libc::AF_UNIX) => "AF_UNIX".to_owned(),
        Ok(libc::AF_INET) => "AF_INET".to_owned(),
        Ok(libc::AF_INET6) => "AF_INET6".to_owned(),
        Ok(other) => format!("domain {other}"),
        Err(_) => "unknown domain".to_owned(),
    };
    let ty = match ty {
        libc::SOCK_STREAM => "SOCK_STREAM".to_owned(),
        libc::SOCK_DGRAM => "SOCK_DGRAM".to_owned(),
        libc::SOCK_SEQPACKET => "SOCK_SEQPACKET".to_owned(),
        other => format!("type {other}"),
    };
    let listening = sys::getsockopt_int(fd, libc::SO_ACCEPTCONN).ok() == Some(1);
    let article = match (listening, domain.starts_with("AF_")) {
        (true, _) => "a listening",
        (false, true) => "an",
        (false, false) => "a",
    };
    format!("{article} {domain} {ty} socket")
}

/// The worker's end of one dispatch channel, shared by its listener and the connections that
/// came through it (they report their closes on it).
struct Channel {
    index: usize,
    fd: OwnedFd,
    /// Closes not yet reported to the master (see the module docs).
    unreported: AtomicU64,
    /// Drops only count (true) or also flush (false).
    deferred: AtomicBool,
    protocol_errors: AtomicU64,
    /// Connections that arrived with an earlier CONN message (one message may carry several)
    /// and are next in line for `accept`, with their sequence numbers.
    queued: Mutex<VecDeque<(OwnedFd, u64)>>,
    /// The value of the READY this channel sent (0: none yet), repeated to resume after FULL.
    ready_value: AtomicU64,
    /// FULL was sent and no READY since: the master sends nothing until we resume.
    full: AtomicBool,
    /// Connections the kernel closed on receipt (`MSG_CTRUNC`) not yet reported in a FULL.
    lost: AtomicU64,
    /// The number of the last fd received: fds are allocated lowest-first, so it says how
    /// close to the fd limit the process is.
    last_fd: AtomicI32,
    /// Held across a tight read (near the fd limit), so that threads take turns there.
    tight: Mutex<()>,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("index", &self.index)
            .field("fd", &self.fd)
            .field("unreported", &self.unreported.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Why a message from the master was skipped.
#[derive(Debug, Error)]
enum Rejected {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("message longer than {HEADER_LEN} bytes")]
    Truncated,
    #[error("CONN without an fd")]
    MissingFd,
    #[error("control data truncated: its fd was closed by the kernel (out of fds?)")]
    ControlTruncated,
}

impl Drop for Channel {
    fn drop(&mut self) {
        // Connections received but never handed out are closed with the channel; the master
        // counted them, so report them.
        let queued = self.lock_queued().len() as u64;
        if queued > 0 {
            self.lock_queued().clear();
            self.unreported.fetch_add(queued, Ordering::Relaxed);
            let _ = self.flush_closed();
        }
    }
}

impl Channel {
    fn new(index: usize, fd: OwnedFd) -> Channel {
        Channel {
            index,
            fd,
            unreported: AtomicU64::new(0),
            deferred: AtomicBool::new(false),
            protocol_errors: AtomicU64::new(0),
            queued: Mutex::new(VecDeque::new()),
            tight: Mutex::new(()),
            ready_value: AtomicU64::new(0),
            full: AtomicBool::new(false),
            lost: AtomicU64::new(0),
            last_fd: AtomicI32::new(0),
        }
    }

    fn send(&self, msg: ToMaster, flags: libc::c_int) -> io::Result<()> {
        loop {
            match scm::send(self.fd.as_fd(), &msg.encode(), flags) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other.map(drop),
            }
        }
    }

    /// Hands out the next connection: one queued from an earlier message, or else reads
    /// messages until one is a well-formed CONN with at least one fd (the others are queued).
    fn receive(self: &Arc<Self>, nonblocking: bool) -> io::Result<Connection> {
        // Deferred closes go out before we may block for long.
        let _ = self.flush_closed();
        if let Some((fd, seq)) = self.lock_queued().pop_front() {
            return self.connection(fd, seq, nonblocking);
        }
        let mut tight = self.make_room()?;
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        let mut fds = Vec::new();
        loop {
            let mut buf = [0u8; HEADER_LEN];
            fds.clear();
            let read = if tight {
                self.read_tight(&mut buf, flags, &mut fds)
            } else {
                scm::recvmsg_fds(self.fd.as_fd(), &mut buf, flags, &mut fds)
            };
            let got = match read {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // scm::recvmsg_fds's only InvalidData is MSG_CTRUNC: fds were attached, so it
                // was a connection, and the kernel closed it.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    self.reject(Rejected::ControlTruncated, 1);
                    self.lost.fetch_add(1, Ordering::Relaxed);
                    // Treat the process as at its limit from now on.
                    self.last_fd.store(i32::MAX, Ordering::Relaxed);
                    tight = self.make_room()?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if got.len == 0 && fds.is_empty() && !got.truncated {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    MasterGone { index: self.index },
                ));
            }
            let decoded = ToWorker::decode(&buf[..got.len]);
            // The master counts every fd it sends as an active connection; one we drop must be
            // reported closed or the master's count never comes back down.
            let conns =
                (fds.len() as u64).max(u64::from(matches!(decoded, Ok(ToWorker::Conn { .. }))));
            let rejected = match decoded {
                _ if got.truncated => Rejected::Truncated,
                Err(e) => Rejected::Protocol(e),
                Ok(ToWorker::Conn { seq }) if !fds.is_empty() => {
                    let last = fds.last().map_or(0, |fd| fd.as_raw_fd());
                    self.last_fd.store(last, Ordering::Relaxed);
                    let mut rest = fds.drain(..);
                    let first = rest.next().expect("not empty");
                    if rest.len() > 0 {
                        let mut queued = self.lock_queued();
                        queued.extend(rest.zip(1..).map(|(fd, i)| (fd, seq + i)));
                    }
                    return self.connection(first, seq, nonblocking);
                }
                Ok(ToWorker::Conn { .. }) => Rejected::MissingFd,
            };
            // Close whatever came with it before reporting the close.
            fds.clear();
            self.reject(rejected, conns);
        }
    }

    /// Near the fd limit, makes sure a whole CONN message's fds fit before reading one: a
    /// message whose fds do not fit loses them (the kernel closes them, `MSG_CTRUNC`). If they
    /// do not fit, tells the master FULL (once), so it sends nothing more and takes back what
    /// is queued, and fails with `EMFILE`, which a server handles like a full `accept`; once
    /// they fit again, READY resumes dispatch. Far from the limit (judged by the last fd
    /// number received) this costs one `getrlimit`.
    fn make_room(&self) -> io::Result<bool> {
        let limit = sys::nofile_soft_limit().unwrap_or(u64::MAX);
        let last = u64::try_from(self.last_fd.load(Ordering::Relaxed)).unwrap_or(0);
        let margin = 2 * MAX_FDS_PER_CONN as u64;
        let near = last.saturating_add(margin) >= limit;
        if !near || sys::fd_room(self.fd.as_fd(), MAX_FDS_PER_CONN) {
            if self.full.load(Ordering::Relaxed) {
                let max_fds = self.ready_value.load(Ordering::Relaxed).max(1);
                if self
                    .send(ToMaster::Ready { max_fds }, libc::MSG_DONTWAIT)
                    .is_ok()
                {
                    self.full.store(false, Ordering::Relaxed);
                }
            }
            return Ok(near);
        }
        Err(self.full_now())
    }

    /// Out of room: FULL to the master (once until READY); the `EMFILE` for the caller.
    fn full_now(&self) -> io::Error {
        if !self.full.load(Ordering::Relaxed) {
            let lost = self.lost.swap(0, Ordering::Relaxed);
            match self.send(ToMaster::Full { lost }, libc::MSG_DONTWAIT) {
                Ok(()) => self.full.store(true, Ordering::Relaxed),
                Err(_) => {
                    self.lost.fetch_add(lost, Ordering::Relaxed);
                }
            }
        }
        io::Error::from_raw_os_error(libc::EMFILE)
    }

    /// One message, read so that near the fd limit nothing is lost when another thread takes
    /// the free fds between [`Channel::make_room`] and the read: first with `MSG_PEEK`, which
    /// installs copies of the fds and leaves the message queued (the copies not fitting:
    /// nothing is consumed, FULL and `EMFILE`), then for real with `MSG_DONTWAIT`. If the
    /// message consumed is the one peeked (same bytes: they carry the master's `seq`), the
    /// copies serve, and a consuming read that could not install the fds (`MSG_CTRUNC`) loses
    /// nothing; if another reader (the master reclaiming: threads of this process take turns
    /// here, and the process holds the channel lock, [`sys::lock_channel`], which the master
    /// takes to read the queue back) took it first, the copies are dropped and the message read
    /// is returned (`Interrupted` when none was left: the caller reads again). Neither read
    /// blocks: a blocking caller waits for a message first, before its turn.
    fn read_tight(
        &self,
        buf: &mut [u8; HEADER_LEN],
        flags: libc::c_int,
        fds: &mut Vec<OwnedFd>,
    ) -> io::Result<scm::ReceivedMsg> {
        let chan = self.fd.as_fd();
        let blocking = flags & libc::MSG_DONTWAIT == 0;
        if blocking {
            // Wait for a message first, outside the turn and the lock: whoever holds them never
            // blocks (the master would otherwise find the lock held for as long as we wait).
            sys::wait_readable(chan)?;
        }
        // Threads take turns: two that both peeked the same message would leave the one whose
        // consuming read gets the next message with no fd for it.
        let _turn = self.tight.lock().unwrap_or_else(|e| e.into_inner());
        // And with the master, which takes back what is queued (after FULL, to drain) by
        // reading the same queue: between our two reads it could take the peeked message, and
        // our second read would then get the next one with no fd for it. Without the lock
        // (`ENOLCK`), read as before.
        let _exclusive = sys::lock_channel(chan, true);
        // Another thread took what woke us: the caller reads again (and waits again).
        let taken_first = |e: io::Error| {
            if blocking && e.kind() == io::ErrorKind::WouldBlock {
                io::Error::from(io::ErrorKind::Interrupted)
            } else {
                e
            }
        };
        let nowait = flags | libc::MSG_DONTWAIT;
        let mut peeked_buf = [0u8; HEADER_LEN];
        let mut peeked = Vec::new();
        let peek =
            match scm::recvmsg_fds(chan, &mut peeked_buf, nowait | libc::MSG_PEEK, &mut peeked) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => return Err(self.full_now()),
                Err(e) => return Err(taken_first(e)),
            };
        if peeked.is_empty() {
            // Not a connection (or end of file): nothing to keep; read it as usual.
            return scm::recvmsg_fds(chan, buf, nowait, fds).map_err(taken_first);
        }
        let same = |buf: &[u8; HEADER_LEN]| buf[..] == peeked_buf[..];
        match scm::recvmsg_fds(chan, buf, nowait, fds) {
            Ok(got) if got.len == peek.len && same(buf) => {
                fds.clear();
                fds.append(&mut peeked);
                Ok(got)
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData && same(buf) => {
                fds.append(&mut peeked);
                Ok(peek)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Err(io::Error::from(io::ErrorKind::Interrupted))
            }
            other => other,
        }
    }

    fn lock_queued(&self) -> std::sync::MutexGuard<'_, VecDeque<(OwnedFd, u64)>> {
        // The queue holds plain fds: a panic elsewhere cannot leave it inconsistent.
        self.queued.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn connection(
        self: &Arc<Self>,
        fd: OwnedFd,
        seq: u64,
        nonblocking: bool,
    ) -> io::Result<Connection> {
        // The close token exists before anything can fail, so even an error here reports it.
        let conn = Connection {
            steer_close: SteerClose(None),
            stream: TcpStream::from(fd),
            seq: Some(seq),
            listener: self.index,
            nonblocking,
            close: CloseToken {
                channel: Some(Arc::clone(self)),
                steer: SteerClose(None),
            },
        };
        // O_NONBLOCK is a file status flag and travels with the fd: the master accepts with
        // SOCK_NONBLOCK (docs/PROTOCOL.md §2), so only blocking mode costs a system call.
        if !nonblocking {
            conn.stream.set_nonblocking(false)?;
        }
        Ok(conn)
    }

    fn reject(&self, why: Rejected, conns: u64) {
        self.protocol_errors.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "listener {}: skipped a message from the master: {why}",
            self.index
        );
        if conns > 0 {
            self.unreported.fetch_add(conns, Ordering::Relaxed);
            if !self.deferred.load(Ordering::Relaxed) {
                let _ = self.flush_closed();
            }
        }
    }

    fn closed_one(&self) {
        self.unreported.fetch_add(1, Ordering::Relaxed);
        if !self.deferred.load(Ordering::Relaxed) {
            // Errors keep the count for the next flush; a destructor cannot report them.
            let _ = self.flush_closed();
        }
        // After FULL, a close may be what makes room: resume (READY) without waiting for the
        // server to call accept, which it may only do once the channel is readable.
        if self.full.load(Ordering::Relaxed) {
            let _ = self.make_room();
        }
    }

    /// Sends all unreported closes in one CLOSED; on failure puts them back (module docs).
    fn flush_closed(&self) -> io::Result<u64> {
        // The counter is only a number, never a guard for other memory: Relaxed suffices, the
        // atomicity of swap/fetch_add is what makes each close owned by exactly one place.
        // A plain load first: the common case (nothing to report) then writes no cache line.
        if self.unreported.load(Ordering::Relaxed) == 0 {
            return Ok(0);
        }
        let count = self.unreported.swap(0, Ordering::Relaxed);
        if count == 0 {
            return Ok(0);
        }
        match self.send(ToMaster::Closed { count }, libc::MSG_DONTWAIT) {
            Ok(()) => Ok(self.unreported.load(Ordering::Relaxed)),
            Err(e) => {
                let pending = self.unreported.fetch_add(count, Ordering::Relaxed) + count;
                if e.kind() == io::ErrorKind::WouldBlock {
                    Ok(pending)
                } else {
                    Err(e)
                }
            }
        }
    }
}

/// Reports one connection closed to the master when dropped (dispatch mode; inert otherwise).
/// It travels with the connection: keep it as long as the TCP socket is open.
#[derive(Debug)]
pub struct CloseToken {
    channel: Option<Arc<Channel>>,
    /// Kernel steering: counts the close on the table ([`Connection::into_parts`]).
    steer: SteerClose,
}

impl CloseToken {
    /// Whether dropping this token reports a close (the connection came over a channel).
    pub fn reports_to_master(&self) -> bool {
        self.channel.is_some()
    }
}

impl Drop for CloseToken {
    fn drop(&mut self) {
        if let Some(chan) = &self.channel {
            chan.closed_one();
        }
    }
}

/// An accepted TCP connection. Derefs to [`std::net::TcpStream`] (`peer_addr`, `shutdown`,
/// timeouts…). Dropping it closes the socket and then, in dispatch mode, reports the close to
/// the master (module docs).
#[derive(Debug)]
pub struct Connection {
    // Field order matters: a steering close is counted before the socket closes, and the socket
    // is closed before the close token reports it.
    steer_close: SteerClose,
    stream: TcpStream,
    seq: Option<u64>,
    listener: usize,
    nonblocking: bool,
    close: CloseToken,
}

impl Connection {
    /// The master's sequence number for this connection (dispatch mode only).
    pub fn seq(&self) -> Option<u64> {
        self.seq
    }

    /// Index of the listener it came from.
    pub fn listener(&self) -> usize {
        self.listener
    }

    /// Splits into the socket and the token that reports its close; drop the token after the
    /// socket is closed.
    pub fn into_parts(self) -> (TcpStream, CloseToken) {
        let mut close = self.close;
        close.steer = self.steer_close;
        (self.stream, close)
    }

    /// The connection as a non-blocking mio stream for an event loop.
    pub fn into_mio(self) -> io::Result<MioConnection> {
        if !self.nonblocking {
            self.stream.set_nonblocking(true)?;
        }
        Ok(MioConnection {
            _steer_close: self.steer_close,
            stream: mio::net::TcpStream::from_std(self.stream),
            seq: self.seq,
            listener: self.listener,
            close: self.close,
        })
    }
}

impl Deref for Connection {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.stream
    }
}

impl DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// A [`Connection`] as a non-blocking [`mio::net::TcpStream`] (deref), registrable with mio.
/// Dropping it reports the close like dropping the `Connection` would.
#[derive(Debug)]
pub struct MioConnection {
    // Field order matters: as in Connection. Held for its drop.
    _steer_close: SteerClose,
    stream: mio::net::TcpStream,
    seq: Option<u64>,
    listener: usize,
    close: CloseToken,
}

impl MioConnection {
    /// The master's sequence number for this connection (dispatch mode only).
    pub fn seq(&self) -> Option<u64> {
        self.seq
    }

    /// Index of the listener it came from.
    pub fn listener(&self) -> usize {
        self.listener
    }

    /// Whether dropping it reports a close to the master.
    pub fn reports_to_master(&self) -> bool {
        self.close.reports_to_master()
    }
}

impl Deref for MioConnection {
    type Target = mio::net::TcpStream;
    fn deref(&self) -> &mio::net::TcpStream {
        &self.stream
    }
}

impl DerefMut for MioConnection {
    fn deref_mut(&mut self) -> &mut mio::net::TcpStream {
        &mut self.stream
    }
}

impl Read for MioConnection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for MioConnection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

impl mio::event::Source for MioConnection {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        self.stream.register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        self.stream.reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        self.stream.deregister(registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Shutdown;
    use std::time::Duration;

    /// Every wait in these tests ends by this deadline instead of hanging.
    const DEADLINE: Duration = Duration::from_secs(10);

    /// The master's end of a dispatch channel plus a loopback TCP listener to make real
    /// connections with.
    struct FakeMaster {
        end: OwnedFd,
        tcp: TcpListener,
    }

    impl FakeMaster {
        /// Connects a client, accepts it, and sends the accepted socket as CONN `seq`.
        fn dispatch(&self, seq: u64) -> TcpStream {
            let client = TcpStream::connect(self.tcp.local_addr().unwrap()).unwrap();
            let (server_side, _) = self.tcp.accept().unwrap();
            // As the master sends them (docs/PROTOCOL.md §2).
            server_side.set_nonblocking(true).unwrap();
            let msg = ToWorker::Conn { seq }.encode();
            scm::sendmsg_fd(self.end.as_fd(), &msg, server_side.as_fd()).unwrap();
            // A deadline, so a bug fails the test instead of hanging it.
            client.set_read_timeout(Some(DEADLINE)).unwrap();
            client
        }

        /// Everything the worker has sent so far (the sends under test are synchronous).
        fn received(&self) -> Vec<ToMaster> {
            let mut out = Vec::new();
            loop {
                let mut buf = [0u8; HEADER_LEN];
                match scm::recvmsg_fd(self.end.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
                    // The worker's end is closed: everything it sent has been read.
                    Ok(got) if got.len == 0 && got.fd.is_none() => return out,
                    Ok(got) => {
                        assert!(got.fd.is_none(), "the worker sends no fds");
                        out.push(ToMaster::decode(&buf[..got.len]).unwrap());
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return out,
                    Err(e) => panic!("recv from worker: {e}"),
                }
            }
        }

        fn closed_total(&self) -> u64 {
            self.received()
                .into_iter()
                .map(|msg| match msg {
                    ToMaster::Closed { count } => count,
                    other => panic!("expected only CLOSED, got {other:?}"),
                })
                .sum()
        }
    }

    fn dispatch_worker() -> (Worker, FakeMaster) {
        let (end, worker_end) = sys::socketpair_seqpacket().unwrap();
        let mut contract = Contract::new(Mode::Dispatch, 1);
        contract.id = 3;
        contract.generation = 2;
        let worker = Worker::new(contract, vec![worker_end]).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        (worker, FakeMaster { end, tcp })
    }

    fn is_nonblocking(fd: BorrowedFd<'_>) -> bool {
        sys::is_nonblocking(fd).unwrap()
    }

    /// Waits for `source` to become readable, with a deadline instead of a sleep.
    fn wait_readable(source: &mut impl mio::event::Source) {
        let mut poll = mio::Poll::new().unwrap();
        poll.registry()
            .register(source, mio::Token(0), mio::Interest::READABLE)
            .unwrap();
        let mut events = mio::Events::with_capacity(4);
        poll.poll(&mut events, Some(DEADLINE)).unwrap();
        assert!(!events.is_empty(), "not readable within the deadline");
        poll.registry().deregister(source).unwrap();
    }

    /// Set in the child process that runs [`fd_limit_child`].
    const FD_LIMIT_CHILD: &str = "RCLUSTER_WORKER_FD_LIMIT_CHILD";

    /// Near the fd limit the tight read loses nothing: with no free fd a CONN stays queued
    /// (`EMFILE`, FULL to the master), and with one free fd, taken by the peek so that the
    /// consuming read has none, the connection still arrives. Run in a child process under
    /// `prlimit --nofile=64` (skipped with a note without it): it fills its fd table, which
    /// would break tests running beside it.
    #[test]
    fn near_the_fd_limit_a_connection_is_queued_or_received_never_lost() {
        sys::testing::run_ignored_test_under_fd_limit("tests::fd_limit_child", FD_LIMIT_CHILD, 64);
    }

    #[test]
    #[ignore = "run in a child process by near_the_fd_limit_a_connection_is_queued_or_received_never_lost"]
    fn fd_limit_child() {
        if std::env::var_os(FD_LIMIT_CHILD).is_none() {
            return;
        }
        let (worker, master) = dispatch_worker();
        let ListenerKind::Channel(chan) = &worker.listeners()[0].kind else {
            panic!("a dispatch worker's listener is a channel");
        };
        let mut client = master.dispatch(41);
        // No free fd: nothing is consumed.
        let mut fillers = sys::testing::fill_fd_table();
        let mut buf = [0u8; HEADER_LEN];
        let mut fds = Vec::new();
        let err = chan.read_tight(&mut buf, 0, &mut fds).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EMFILE));
        assert_eq!(master.received(), [ToMaster::Full { lost: 0 }]);
        // One free fd: the peek takes it and the consuming read is truncated.
        drop(fillers.pop());
        let got = chan.read_tight(&mut buf, 0, &mut fds).unwrap();
        assert_eq!(
            ToWorker::decode(&buf[..got.len]).unwrap(),
            ToWorker::Conn { seq: 41 }
        );
        assert_eq!(fds.len(), 1);
        drop(fillers);
        let mut server = TcpStream::from(fds.pop().unwrap());
        client.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        server.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x", "the received fd is the connection sent");
    }

    /// Set in the child process that runs [`two_readers_child`].
    const TWO_READERS_CHILD: &str = "RCLUSTER_WORKER_TWO_READERS_CHILD";

    /// Two threads reading one channel near the fd limit lose nothing: with two CONNs queued
    /// and two free fds, both could peek the first (taking both fds) and the one whose consuming
    /// read then got the second would find no fd for it. Many rounds, in a child process under
    /// `prlimit --nofile=64`: every connection arrives, now or once there is room again.
    #[test]
    fn two_threads_reading_near_the_fd_limit_lose_no_connection() {
        sys::testing::run_ignored_test_under_fd_limit(
            "tests::two_readers_child",
            TWO_READERS_CHILD,
            64,
        );
    }

    #[test]
    #[ignore = "run in a child process by two_threads_reading_near_the_fd_limit_lose_no_connection"]
    fn two_readers_child() {
        if std::env::var_os(TWO_READERS_CHILD).is_none() {
            return;
        }
        let (worker, master) = dispatch_worker();
        let ListenerKind::Channel(chan) = &worker.listeners()[0].kind else {
            panic!("a dispatch worker's listener is a channel");
        };
        for round in 0..1500 {
            let clients = [master.dispatch(2 * round), master.dispatch(2 * round + 1)];
            let got = sys::testing::at_fd_limit_on_threads(2, 2, || {
                let mut buf = [0u8; HEADER_LEN];
                let mut fds = Vec::new();
                let _ = chan.read_tight(&mut buf, libc::MSG_DONTWAIT, &mut fds);
                fds.len()
            });
            // What is still queued, read with room to spare.
            let mut later = 0;
            loop {
                let mut buf = [0u8; HEADER_LEN];
                let mut fds = Vec::new();
                if scm::recvmsg_fds(chan.fd.as_fd(), &mut buf, libc::MSG_DONTWAIT, &mut fds)
                    .is_err()
                {
                    break;
                }
                later += fds.len();
            }
            assert_eq!(got + later, 2, "round {round}: a connection was lost");
            drop(clients);
        }
    }

    /// Set in the child process that runs [`reclaim_race_child`].
    const RECLAIM_RACE_CHILD: &str = "RCLUSTER_WORKER_RECLAIM_RACE_CHILD";

    /// The master taking back what is queued, while the worker reads near its fd limit, costs
    /// no connection: with one free fd the peek takes it, and if another process consumed the
    /// peeked message before the second read, that read would get the next one with no fd for
    /// it. Many rounds against a reclaiming process that honours the channel lock, as the
    /// master does; every connection ends up with one of the two.
    #[test]
    fn the_master_reclaiming_during_a_tight_read_loses_no_connection() {
        sys::testing::run_ignored_test_under_fd_limit(
            "tests::reclaim_race_child",
            RECLAIM_RACE_CHILD,
            64,
        );
    }

    #[test]
    #[ignore = "run in a child process by the_master_reclaiming_during_a_tight_read_loses_no_connection"]
    fn reclaim_race_child() {
        if std::env::var_os(RECLAIM_RACE_CHILD).is_none() {
            return;
        }
        let (worker, master) = dispatch_worker();
        let ListenerKind::Channel(chan) = &worker.listeners()[0].kind else {
            panic!("a dispatch worker's listener is a channel");
        };
        sys::set_nonblocking(chan.fd.as_fd(), true).unwrap();
        let rounds = 10_000;
        let (got, reclaimed) = sys::testing::tight_reads_against_a_reclaimer(
            chan.fd.as_fd(),
            master.end,
            rounds,
            |seq| ToWorker::Conn { seq }.encode().to_vec(),
            || {
                let mut buf = [0u8; HEADER_LEN];
                let mut fds = Vec::new();
                let _ = chan.read_tight(&mut buf, libc::MSG_DONTWAIT, &mut fds);
                fds.len()
            },
        );
        assert_eq!(got + reclaimed, 2 * rounds, "connections were lost");
    }

    /// A blocking read near the fd limit waits for a message before it takes the channel lock:
    /// a master taking back what is queued meanwhile never finds the lock held by an idle
    /// worker (it would put the reclaim off, then take it without the lock).
    #[test]
    fn a_blocking_tight_read_waits_without_holding_the_channel_lock() {
        let (worker, master) = dispatch_worker();
        let ListenerKind::Channel(chan) = &worker.listeners()[0].kind else {
            panic!("a dispatch worker's listener is a channel");
        };
        let mut client = None;
        let (free, read) = sys::testing::channel_lock_free_while_blocked(
            chan.fd.as_fd(),
            || {
                let mut buf = [0u8; HEADER_LEN];
                let mut fds = Vec::new();
                chan.read_tight(&mut buf, 0, &mut fds).map(|_| fds.len())
            },
            || client = Some(master.dispatch(1)),
        );
        assert_eq!(read.unwrap(), 1);
        assert!(free, "the channel lock was held while the worker waited");
    }

    #[test]
    fn one_message_with_several_connections_is_accepted_one_by_one() {
        let (worker, master) = dispatch_worker();
        let mut clients = Vec::new();
        let mut batch = scm::SendBatch::<HEADER_LEN>::with_capacity(3);
        for seq in 10..13 {
            let client = TcpStream::connect(master.tcp.local_addr().unwrap()).unwrap();
            let (server_side, _) = master.tcp.accept().unwrap();
            batch
                .push(ToWorker::Conn { seq }.encode(), OwnedFd::from(server_side))
                .map_err(|_| ())
                .unwrap();
            clients.push(client);
        }
        assert_eq!(batch.send(master.end.as_fd(), 3).unwrap(), 3);
        let listener = &worker.listeners()[0];
        let conns: Vec<Connection> = (0..3).map(|_| listener.accept().unwrap()).collect();
        for (i, (conn, client)) in conns.iter().zip(&clients).enumerate() {
            assert_eq!(conn.seq(), Some(10 + i as u64), "in order");
            assert_eq!(conn.peer_addr().unwrap(), client.local_addr().unwrap());
        }
        drop(conns);
        assert_eq!(master.closed_total(), 3, "every one reported closed once");
    }

    #[test]
    fn connections_still_queued_when_the_listener_goes_are_reported_closed() {
        let (worker, master) = dispatch_worker();
        let mut batch = scm::SendBatch::<HEADER_LEN>::with_capacity(4);
        let mut clients = Vec::new();
        for seq in 0..4 {
            clients.push(TcpStream::connect(master.tcp.local_addr().unwrap()).unwrap());
            let (server_side, _) = master.tcp.accept().unwrap();
            batch
                .push(ToWorker::Conn { seq }.encode(), OwnedFd::from(server_side))
                .map_err(|_| ())
                .unwrap();
        }
        assert_eq!(batch.send(master.end.as_fd(), 4).unwrap(), 4);
        let first = worker.listeners()[0].accept().unwrap();
        drop(first);
        drop(worker);
        assert_eq!(master.closed_total(), 4);
    }

    #[test]
    fn accepts_a_dispatched_connection_and_reports_its_close() {
        let (worker, master) = dispatch_worker();
        let mut client = master.dispatch(7);
        let mut conn = worker.listeners()[0].accept().unwrap();
        assert_eq!(conn.seq(), Some(7));
        assert!(
            !is_nonblocking(conn.as_fd()),
            "blocking listener, blocking connection"
        );
        assert_eq!(conn.listener(), 0);
        assert_eq!(conn.peer_addr().unwrap(), client.local_addr().unwrap());
        conn.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        assert!(master.received().is_empty(), "nothing reported while open");
        drop(conn);
        assert_eq!(master.received(), vec![ToMaster::Closed { count: 1 }]);
        assert_eq!(client.read(&mut buf).unwrap(), 0, "the socket was closed");
    }

    #[test]
    fn every_close_is_reported_exactly_once() {
        let (worker, master) = dispatch_worker();
        let mut clients = Vec::new();
        let mut conns = Vec::new();
        for seq in 0..24 {
            clients.push(master.dispatch(seq));
            conns.push(worker.listeners()[0].accept().unwrap());
        }
        // Drop them in a scrambled order and every way a connection can end.
        let mut tokens = Vec::new();
        for (i, conn) in conns.into_iter().enumerate().rev() {
            match i % 3 {
                0 => drop(conn),
                1 => drop(conn.into_mio().unwrap()),
                _ => {
                    let (stream, token) = conn.into_parts();
                    assert!(token.reports_to_master());
                    drop(stream);
                    tokens.push(token);
                }
            }
        }
        assert_eq!(master.closed_total(), 16);
        drop(tokens);
        assert_eq!(master.closed_total(), 8);
    }

    #[test]
    fn deferred_closes_travel_in_one_message() {
        let (worker, master) = dispatch_worker();
        worker.defer_close_reports(true);
        let _clients: Vec<_> = (0..5).map(|seq| master.dispatch(seq)).collect();
        let conns: Vec<_> = (0..5)
            .map(|_| worker.listeners()[0].accept().unwrap())
            .collect();
        drop(conns);
        assert!(master.received().is_empty());
        assert_eq!(worker.flush_closed().unwrap(), 0);
        assert_eq!(master.received(), vec![ToMaster::Closed { count: 5 }]);
        assert_eq!(worker.flush_closed().unwrap(), 0);
        assert!(master.received().is_empty(), "nothing sent twice");
    }

    #[test]
    fn a_full_channel_keeps_the_count_for_the_next_flush() {
        let (worker, master) = dispatch_worker();
        let listener = &worker.listeners()[0];
        let _clients: Vec<_> = (0..3).map(|seq| master.dispatch(seq)).collect();
        let conns: Vec<_> = (0..3).map(|_| listener.accept().unwrap()).collect();
        sys::setsockopt_int(listener.as_fd(), libc::SO_SNDBUF, 4096).unwrap();
        let beat = ToMaster::Heartbeat.encode();
        let mut beats = 0;
        while scm::send(listener.as_fd(), &beat, libc::MSG_DONTWAIT).is_ok() {
            beats += 1;
        }
        drop(conns);
        assert_eq!(
            worker.flush_closed().unwrap(),
            3,
            "kept while the channel is full"
        );
        let got = master.received();
        assert_eq!(got.len(), beats);
        assert!(got.iter().all(|m| *m == ToMaster::Heartbeat));
        assert_eq!(worker.flush_closed().unwrap(), 0);
        assert_eq!(master.received(), vec![ToMaster::Closed { count: 3 }]);
    }

    #[test]
    fn malformed_messages_are_skipped_and_their_fds_reported_closed() {
        let (worker, master) = dispatch_worker();
        let tcp_fd = || {
            let client = TcpStream::connect(master.tcp.local_addr().unwrap()).unwrap();
            let (server_side, _) = master.tcp.accept().unwrap();
            (client, server_side)
        };
        let mut bad = ToWorker::Conn { seq: 1 }.encode();
        bad[0] = b'X';
        let (_c1, s1) = tcp_fd();
        scm::sendmsg_fd(master.end.as_fd(), &bad, s1.as_fd()).unwrap();
        // CONN without its fd.
        scm::send(master.end.as_fd(), &ToWorker::Conn { seq: 2 }.encode(), 0).unwrap();
        // Too short, no fd.
        scm::send(master.end.as_fd(), &[b'R', b'C', 1, 1], 0).unwrap();
        // Too long, with an fd.
        let mut long = [0u8; 2 * HEADER_LEN];
        long[..HEADER_LEN].copy_from_slice(&ToWorker::Conn { seq: 3 }.encode());
        let (_c2, s2) = tcp_fd();
        scm::sendmsg_fd(master.end.as_fd(), &long, s2.as_fd()).unwrap();
        // A kind only workers send.
        scm::send(
            master.end.as_fd(),
            &ToMaster::Ready { max_fds: 1 }.encode(),
            0,
        )
        .unwrap();
        let _client = master.dispatch(9);

        let listener = &worker.listeners()[0];
        let conn = listener.accept().unwrap();
        assert_eq!(conn.seq(), Some(9));
        assert_eq!(listener.protocol_errors(), 5);
        // The three that were (or carried) a connection are reported closed.
        assert_eq!(master.closed_total(), 3);
    }

    #[test]
    fn end_of_stream_means_the_master_is_gone() {
        let (mut worker, master) = dispatch_worker();
        let listener = &mut worker.listeners_mut()[0];
        listener.set_nonblocking(true).unwrap();
        assert!(listener.try_accept().unwrap().is_none());
        drop(master);
        let err = listener.try_accept().unwrap_err();
        assert!(is_master_gone(&err), "{err}");
        listener.set_nonblocking(false).unwrap();
        assert!(is_master_gone(&listener.accept().unwrap_err()));
        assert!(!is_master_gone(&io::Error::from(
            io::ErrorKind::UnexpectedEof
        )));
    }

    #[test]
    fn dispatch_listener_registers_with_mio() {
        let (mut worker, master) = dispatch_worker();
        let listener = &mut worker.listeners_mut()[0];
        listener.set_nonblocking(true).unwrap();
        let _client = master.dispatch(1);
        wait_readable(listener);
        let conn = listener.try_accept().unwrap().expect("a connection");
        assert!(
            is_nonblocking(conn.as_fd()),
            "non-blocking listener, connection"
        );
        assert!(listener.try_accept().unwrap().is_none());
    }

    #[test]
    fn ready_and_stopping_are_sent_once_on_channel_and_notify_socket() {
        let (end, worker_end) = sys::socketpair_seqpacket().unwrap();
        let name = format!("rcluster-test-notify-{}", sys::getpid());
        let notify = {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
            UnixDatagram::bind_addr(&addr).unwrap()
        };
        notify.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut contract = Contract::new(Mode::Dispatch, 1);
        contract.notify_socket = NotifyAddr::parse(&format!("@{name}"));
        let worker = Worker::new(contract, vec![worker_end]).unwrap();
        let master = FakeMaster {
            end,
            tcp: TcpListener::bind("127.0.0.1:0").unwrap(),
        };

        worker.ready().unwrap();
        worker.ready().unwrap();
        assert_eq!(
            master.received(),
            vec![ToMaster::Ready {
                max_fds: MAX_FDS_PER_CONN as u64
            }]
        );
        let mut buf = [0u8; 32];
        let n = notify.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        worker.heartbeat().unwrap();
        worker.stopping().unwrap();
        worker.stopping().unwrap();
        assert_eq!(
            master.received(),
            vec![ToMaster::Heartbeat, ToMaster::Stopping]
        );
        let n = notify.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn notify_socket_may_be_a_path() {
        let dir = std::env::temp_dir().join(format!("rcluster-worker-test-{}", sys::getpid()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let notify = UnixDatagram::bind(&path).unwrap();
        notify.set_read_timeout(Some(DEADLINE)).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut contract = Contract::new(Mode::Shared, 1);
        contract.notify_socket = NotifyAddr::parse(path.to_str().unwrap());
        let worker = Worker::new(contract, vec![OwnedFd::from(tcp)]).unwrap();
        worker.ready().unwrap();
        let mut buf = [0u8; 32];
        let n = notify.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shared_mode_accepts_from_a_listening_socket() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut worker =
            Worker::new(Contract::new(Mode::Shared, 1), vec![OwnedFd::from(tcp)]).unwrap();
        let listener = &mut worker.listeners_mut()[0];
        assert!(!listener.is_dispatch());

        let mut client = TcpStream::connect(addr).unwrap();
        client.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut conn = listener.accept().unwrap();
        assert_eq!(conn.seq(), None);
        conn.write_all(b"x").unwrap();
        let mut buf = [0u8; 1];
        client.read_exact(&mut buf).unwrap();

        listener.set_nonblocking(true).unwrap();
        assert!(listener.try_accept().unwrap().is_none());
        let _client2 = TcpStream::connect(addr).unwrap();
        wait_readable(listener);
        let conn2 = listener.try_accept().unwrap().expect("a connection");
        assert!(is_nonblocking(conn2.as_fd()));
        assert!(!is_nonblocking(conn.as_fd()));
        conn.shutdown(Shutdown::Both).unwrap();
    }

    #[test]
    fn fds_of_the_wrong_kind_are_refused() {
        let (a, _b) = sys::socketpair_seqpacket().unwrap();
        let err = Worker::new(Contract::new(Mode::Shared, 1), vec![a]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "listener 0 is an AF_UNIX SOCK_SEQPACKET socket, but shared mode needs a listening \
             TCP socket"
        );
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let err =
            Worker::new(Contract::new(Mode::Dispatch, 1), vec![OwnedFd::from(tcp)]).unwrap_err();
        assert!(
            err.to_string()
                .contains("is a listening AF_INET SOCK_STREAM socket, but dispatch mode"),
            "{err}"
        );
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let connected = TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        let err = Worker::new(
            Contract::new(Mode::Reuseport, 1),
            vec![OwnedFd::from(connected)],
        )
        .unwrap_err();
        assert!(matches!(err, WorkerError::WrongKind { .. }), "{err}");
        let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let err = Worker::new(Contract::new(Mode::Dispatch, 1), vec![file]).unwrap_err();
        assert!(err.to_string().contains("is not a socket"), "{err}");
        let err = Worker::new(Contract::new(Mode::Dispatch, 2), Vec::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0 listener fds given but the contract names 2"
        );
    }
}
