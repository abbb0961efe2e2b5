//! The built-in demo HTTP worker (`rcluster-lb` with no command runs it through a hidden
//! subcommand): a single-threaded HTTP/1.1 keep-alive server on mio, built on the
//! `rcluster_worker` API, whose every response names the worker that served it.
//!
//! Thread and fds: [`Server::run`] runs on the worker process's main thread (a test's thread in
//! tests) and owns the [`Worker`] (its listener fds) and every accepted connection; a
//! [`StopHandle`] is the only thing other threads touch. Signal handling (SIGTERM/SIGINT →
//! drain) goes through signal-hook-mio's self-pipe, registered in the same poll.
//!
//! Requests: `GET /anything?us=N&alloc=MB`. `us` busy-spins N µs of CPU before answering
//! (at most [`MAX_SPIN`]), `alloc` grows the process by MB MiB and keeps it (at most
//! [`MAX_ALLOC_MIB`] per request), for benchmarks with heavy-tailed service times and for the
//! least-mem policy. Any method is answered alike (HEAD without a body); request bodies up to
//! [`MAX_BODY_BYTES`] are read and discarded, larger ones get 413; a malformed request gets 400
//! and the connection is closed.
//!
//! Heartbeats: when started with a message bus (`RCLUSTER_IPC`), the worker connects to it
//! through the Rust worker API and sends a heartbeat every [`HEARTBEAT_EVERY`] from its event
//! loop, so a loop blocked in a long `?us=` spin stops them (`--heartbeat-timeout`).
//!
//! Draining: on SIGTERM/SIGINT (or [`StopHandle::stop`], or the master closing a dispatch
//! channel) the worker sends STOPPING, stops accepting (connections still queued in a dispatch
//! channel are left for the master to take back), answers requests in flight with
//! `Connection: close`, closes idle keep-alive connections and returns once none is left or
//! after [`DRAIN_DEADLINE`]. A second signal exits at once (the first signal after a drain the
//! master's closed channel began is a first: the master's stop does both).

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use mio::{Events, Interest, Poll, Token, Waker};

use rcluster_sys as sys;
use rcluster_worker::{MioConnection, Worker, is_master_gone};

/// The longest request head (request line and headers) accepted; longer gets 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The largest request body accepted (and discarded); larger gets 413.
pub const MAX_BODY_BYTES: u64 = 1024 * 1024;
/// Cap on `?us=`.
pub const MAX_SPIN: Duration = Duration::from_secs(10);
/// Cap on `?alloc=` per request, in MiB.
pub const MAX_ALLOC_MIB: u64 = 1024;
/// How long a drain waits for requests in flight before exiting anyway.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Unsent response bytes above which a connection's further pipelined requests wait (and its
/// socket is not read), so a client that never reads cannot grow our memory.
const MAX_UNSENT_BYTES: usize = 256 * 1024;
/// Bytes read from a socket per `read`.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// Retry period for accepting after running out of fds (`EMFILE`): accept4(2) would otherwise
/// fail at once on every wake-up and spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Retry period for close reports the master's full channel did not take.
const CLOSE_REPORT_RETRY: Duration = Duration::from_millis(10);
const MIB: usize = 1024 * 1024;
/// Heartbeat period on the message bus.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(250);

const WAKER: Token = Token(usize::MAX);
const SIGNALS: Token = Token(usize::MAX - 1);
/// Listener `i` is `Token(LISTENER_TOKEN_TOP - i)`; connections count up from 0.
const LISTENER_TOKEN_TOP: usize = usize::MAX - 2;

/// Runs the demo worker in this process: adopts the listeners from the environment, serves until
/// SIGTERM/SIGINT, drains and returns. The master's hidden subcommand calls this.
pub fn run() -> anyhow::Result<()> {
    let worker = Worker::from_env().context("failed to adopt the worker contract")?;
    init_logging(&worker);
    let mut server = Server::new(worker).context("failed to set up the event loop")?;
    if std::env::var_os(rcluster_proto::env::RCLUSTER_IPC).is_some() {
        match rcluster_worker::bus::Bus::connect() {
            Ok(bus) => server.heartbeat = Some((bus, Instant::now())),
            Err(e) => log::warn!("no heartbeats: cannot connect to the message bus: {e}"),
        }
    }
    server
        .watch_signals()
        .context("failed to install the SIGTERM/SIGINT handlers")?;
    server.run()
}

/// Logs to stderr, each line prefixed with the worker's slot and pid so the interleaved output
/// of several workers stays readable. `RCLUSTER_LOG` sets the level (default `info`), as for the
/// master; if the binary already installed a logger (the `rcluster-lb` binary does), it stays.
fn init_logging(worker: &Worker) {
    let (id, pid) = (worker.id(), sys::getpid());
    let _ = env_logger::Builder::from_env(env_logger::Env::new().filter_or("RCLUSTER_LOG", "info"))
        .format(move |buf, record| {
            writeln!(
                buf,
                "rcluster-demo[{id} pid {pid}] {}: {}",
                record.level(),
                record.args()
            )
        })
        .try_init();
}

/// Asks a running [`Server`] to drain and return; cheap to clone, usable from any thread. The
/// worker process itself stops on signals; the handle is how tests stop a server in-process.
#[derive(Clone, Debug)]
#[cfg_attr(not(test), allow(dead_code))]
pub struct StopHandle {
    requested: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

#[cfg_attr(not(test), allow(dead_code))]
impl StopHandle {
    /// Starts the drain (as SIGTERM would). Idempotent.
    pub fn stop(&self) {
        self.requested.store(true, Ordering::Release);
        // A failed wake only means the loop is already gone.
        let _ = self.waker.wake();
    }
}

/// The demo HTTP server: one mio poll over the worker's listeners and its connections.
pub struct Server {
    poll: Poll,
    worker: Worker,
    app: App,
    clients: Clients,
    stop: StopHandle,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    /// A stop signal came: the next one exits at once. Not set by a drain the master's closed
    /// channel or the stop handle began: the master's graceful stop closes the channels *and*
    /// sends the stop signal, and that signal is its first, not a second.
    signalled: bool,
    draining: Option<Instant>,
    accept_paused: bool,
    /// A channel was full: flush close reports again soon even if nothing happens.
    close_report_retry: bool,
    close_report_error_logged: bool,
    /// The message bus and when the next heartbeat is due (the bus's messages are not read:
    /// the master drops what does not fit, and nothing here needs them).
    heartbeat: Option<(rcluster_worker::bus::Bus, Instant)>,
}

impl Server {
    /// A server for `worker`; nothing is registered or sent until [`Server::run`].
    pub fn new(worker: Worker) -> io::Result<Server> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let app = App::new(&worker);
        Ok(Server {
            poll,
            worker,
            app,
            clients: Clients::default(),
            stop: StopHandle {
                requested: Arc::new(AtomicBool::new(false)),
                waker,
            },
            signals: None,
            signalled: false,
            draining: None,
            accept_paused: false,
            close_report_retry: false,
            close_report_error_logged: false,
            heartbeat: None,
        })
    }

    /// A handle that makes [`Server::run`] drain and return.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Drains on SIGTERM or SIGINT (process-wide: for the worker process, not for tests).
    pub fn watch_signals(&mut self) -> io::Result<()> {
        let mut signals = signal_hook_mio::v1_0::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])?;
        self.poll
            .registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        self.signals = Some(signals);
        Ok(())
    }

    /// Serves until stopped, then drains; sends READY once listening and STOPPING when the
    /// drain starts.
    pub fn run(mut self) -> anyhow::Result<()> {
        for (i, listener) in self.worker.listeners_mut().iter_mut().enumerate() {
            listener
                .set_nonblocking(true)
                .with_context(|| format!("failed to make listener {i} non-blocking"))?;
            self.poll
                .registry()
                .register(listener, listener_token(i), Interest::READABLE)
                .with_context(|| format!("failed to register listener {i}"))?;
        }
        // Closes of one loop iteration go to the master in one CLOSED per channel.
        self.worker.defer_close_reports(true);
        self.worker.ready().context("failed to report readiness")?;
        let addresses: Vec<&str> = self
            .worker
            .listeners()
            .iter()
            .filter_map(|l| l.address())
            .collect();
        log::info!(
            "serving HTTP in {} mode on {} (generation {})",
            self.worker.mode().as_str(),
            if addresses.is_empty() {
                "inherited listeners".to_owned()
            } else {
                addresses.join(", ")
            },
            self.worker.generation()
        );

        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            // Kernel steering: between these two, the loop waits; from the second to the next
            // first it serves (a long `?us=` spin makes the slot stuck after 1 ms).
            self.worker.loop_waiting();
            let polled = self.poll.poll(&mut events, timeout);
            self.worker.loop_woke();
            match polled {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("epoll_wait failed"),
            }
            for event in events.iter() {
                match event.token() {
                    WAKER => {
                        if self.stop.requested.load(Ordering::Acquire) {
                            self.begin_drain("stop requested");
                        }
                    }
                    SIGNALS => {
                        if self.on_signals() {
                            log::warn!(
                                "second signal: exiting with {} connections open",
                                self.clients.len()
                            );
                            return Ok(());
                        }
                    }
                    Token(t) if t > LISTENER_TOKEN_TOP - self.worker.listeners().len() => {
                        self.accept_all(LISTENER_TOKEN_TOP - t);
                    }
                    Token(idx) => self.on_client(idx),
                }
            }
            if self.accept_paused && self.draining.is_none() {
                self.accept_paused = false;
                for i in 0..self.worker.listeners().len() {
                    self.accept_all(i);
                }
            }
            self.report_closes();
            if let Some((bus, due)) = &mut self.heartbeat
                && Instant::now() >= *due
            {
                *due = Instant::now() + HEARTBEAT_EVERY;
                if let Err(e) = bus.heartbeat() {
                    log::warn!("heartbeat failed: {e}; no more heartbeats");
                    self.heartbeat = None;
                }
            }
            if let Some(deadline) = self.draining {
                if self.clients.len() == 0 {
                    log::info!("drained, exiting");
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    log::warn!(
                        "drain deadline passed with {} connections open, exiting",
                        self.clients.len()
                    );
                    return Ok(());
                }
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        let mut timeout = self
            .draining
            .map(|deadline| deadline.saturating_duration_since(Instant::now()));
        let mut at_most = |d: Duration| timeout = Some(timeout.map_or(d, |t| t.min(d)));
        if self.accept_paused {
            at_most(ACCEPT_RETRY);
        }
        if self.close_report_retry {
            at_most(CLOSE_REPORT_RETRY);
        }
        if let Some((_, due)) = &self.heartbeat {
            at_most(due.saturating_duration_since(Instant::now()));
        }
        timeout
    }

    /// Handles pending signals; returns true when the process should exit at once.
    fn on_signals(&mut self) -> bool {
        let Some(signals) = &mut self.signals else {
            return false;
        };
        let Some(sig) = signals.pending().last() else {
            return false;
        };
        if self.signalled {
            return true;
        }
        self.signalled = true;
        if self.draining.is_some() {
            log::info!(
                "{}: already draining {} connections",
                sys::signal_name(sig),
                self.clients.len()
            );
        }
        self.begin_drain(sys::signal_name(sig));
        false
    }

    fn accept_all(&mut self, index: usize) {
        if self.draining.is_some() {
            return;
        }
        loop {
            let accepted = self.worker.listeners()[index].try_accept();
            match accepted {
                Ok(Some(conn)) => {
                    if let Err(e) = self.add_client(conn) {
                        log::warn!("dropped a connection from listener {index}: {e}");
                    }
                }
                Ok(None) => return,
                Err(e) if is_master_gone(&e) => {
                    self.begin_drain("the master is gone");
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) if is_resource_shortage(&e) => {
                    if !self.accept_paused {
                        log::warn!(
                            "accept on listener {index} failed, pausing accepts for {ACCEPT_RETRY:?}: {e}"
                        );
                    }
                    self.accept_paused = true;
                    return;
                }
                Err(e) => {
                    log::error!("accept on listener {index} failed: {e}");
                    return;
                }
            }
        }
    }

    fn add_client(&mut self, conn: rcluster_worker::Connection) -> io::Result<()> {
        let conn = conn.into_mio()?;
        let idx = self.clients.insert(Client::new(conn));
        let client = self.clients.get_mut(idx).expect("just inserted");
        if let Err(e) = self.poll.registry().register(
            &mut client.conn,
            Token(idx),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.clients.remove(idx);
            return Err(e);
        }
        Ok(())
    }

    fn on_client(&mut self, idx: usize) {
        // Gone already if an earlier event of this batch closed it.
        let Some(client) = self.clients.get_mut(idx) else {
            return;
        };
        if drive(&mut self.app, client, self.draining.is_some()) == Next::Close {
            self.close_client(idx);
        }
    }

    fn close_client(&mut self, idx: usize) {
        if let Some(mut client) = self.clients.remove(idx) {
            let _ = self.poll.registry().deregister(&mut client.conn);
            // Dropping the connection closes it and counts it for the next CLOSED report.
        }
        if self.accept_paused && self.draining.is_none() {
            // An fd came free; accepting may work again.
            self.accept_paused = false;
            for i in 0..self.worker.listeners().len() {
                self.accept_all(i);
            }
        }
    }

    fn begin_drain(&mut self, why: &str) {
        if self.draining.is_some() {
            return;
        }
        self.draining = Some(Instant::now() + DRAIN_DEADLINE);
        log::info!("{why}: draining {} connections", self.clients.len());
        if let Err(e) = self.worker.stopping() {
            log::warn!("{:#}", anyhow::Error::new(e));
        }
        for listener in self.worker.listeners_mut() {
            let _ = self.poll.registry().deregister(listener);
        }
        // Read what already arrived before deciding a connection is idle: a request waiting
        // unread in the socket is answered (with `Connection: close`), not reset by our close.
        for idx in self.clients.indices() {
            let close = self
                .clients
                .get_mut(idx)
                .is_some_and(|c| drive(&mut self.app, c, true) == Next::Close);
            if close {
                self.close_client(idx);
            }
        }
    }

    fn report_closes(&mut self) {
        match self.worker.flush_closed() {
            Ok(pending) => self.close_report_retry = pending > 0,
            Err(e) => {
                // The master is gone (EPIPE): nobody is left to count; say so once, don't retry.
                if !self.close_report_error_logged {
                    log::warn!("cannot report closed connections to the master: {e}");
                    self.close_report_error_logged = true;
                }
                self.close_report_retry = false;
            }
        }
    }
}

fn listener_token(index: usize) -> Token {
    Token(LISTENER_TOKEN_TOP - index)
}

/// `EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`: accept4(2) fails until something is freed.
fn is_resource_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Connections by token, reusing freed slots.
#[derive(Default)]
struct Clients {
    slots: Vec<Option<Client>>,
    free: Vec<usize>,
    live: usize,
}

impl Clients {
    fn insert(&mut self, client: Client) -> usize {
        self.live += 1;
        match self.free.pop() {
            Some(idx) => {
                self.slots[idx] = Some(client);
                idx
            }
            None => {
                self.slots.push(Some(client));
                self.slots.len() - 1
            }
        }
    }

    fn get_mut(&mut self, idx: usize) -> Option<&mut Client> {
        self.slots.get_mut(idx).and_then(Option::as_mut)
    }

    fn remove(&mut self, idx: usize) -> Option<Client> {
        let client = self.slots.get_mut(idx)?.take()?;
        self.free.push(idx);
        self.live -= 1;
        Some(client)
    }

    fn len(&self) -> usize {
        self.live
    }

    fn indices(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].is_some())
            .collect()
    }
}

/// One HTTP connection's state.
struct Client {
    conn: MioConnection,
    /// Received bytes not yet parsed.
    inbuf: Vec<u8>,
    /// Response bytes; `outbuf[written..]` is not sent yet.
    outbuf: Vec<u8>,
    written: usize,
    /// Body bytes of the last request still to be discarded.
    skip_body: u64,
    /// The peer shut down its sending side.
    peer_eof: bool,
    /// No more requests: close once `outbuf` is sent.
    closing: bool,
    /// At least one request was answered. A connection that has not sent its first request
    /// yet is never idle: the master handed it over, so it is owed an answer.
    answered: bool,
}

impl Client {
    fn new(conn: MioConnection) -> Client {
        Client {
            conn,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            written: 0,
            skip_body: 0,
            peer_eof: false,
            closing: false,
            answered: false,
        }
    }

    fn unsent(&self) -> usize {
        self.outbuf.len() - self.written
    }

    /// Between requests: nothing received, nothing to send.
    fn is_idle(&self) -> bool {
        self.answered && self.inbuf.is_empty() && self.skip_body == 0 && self.unsent() == 0
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Next {
    Keep,
    Close,
}

/// Makes all the progress a connection allows now: answers complete requests, writes, reads,
/// until the socket would block (mio is edge-triggered, so stopping earlier would lose the
/// wake-up) or the connection is done.
fn drive(app: &mut App, client: &mut Client, draining: bool) -> Next {
    let mut chunk = [0u8; READ_CHUNK_BYTES];
    loop {
        app.answer_buffered(client, draining);
        // Write what is pending.
        while client.unsent() > 0 {
            match client.conn.write(&client.outbuf[client.written..]) {
                Ok(0) => return Next::Close,
                Ok(n) => client.written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Next::Close,
            }
        }
        if client.unsent() == 0 {
            client.outbuf.clear();
            client.written = 0;
            if client.closing {
                discard_input(&mut client.conn);
                return Next::Close;
            }
        }
        if client.closing || client.peer_eof || client.unsent() > MAX_UNSENT_BYTES {
            // Waiting for WRITABLE (or, after EOF with nothing to send, closed above).
            return Next::Keep;
        }
        match client.conn.read(&mut chunk) {
            Ok(0) => client.peer_eof = true,
            Ok(n) => client.inbuf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Draining closes a connection only once it is idle with nothing left unread.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return if draining && client.is_idle() {
                    Next::Close
                } else {
                    Next::Keep
                };
            }
            Err(_) => return Next::Close,
        }
    }
}

/// Reads and drops what the peer already sent (pipelined requests after a `close`): closing a
/// TCP socket with unread data sends RST instead of FIN (RFC 9293 3.6), which can destroy the
/// last response before the client reads it.
fn discard_input(conn: &mut MioConnection) {
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        match conn.read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

/// What the responses need: the worker's identity and the memory `?alloc=` keeps.
struct App {
    /// `X-Worker-*` header lines, precomputed.
    identity_headers: String,
    /// `worker <slot> pid <pid> generation <gen>\n`.
    identity_line: String,
    /// Memory kept for `?alloc=`, never freed.
    hoard: Vec<Vec<u8>>,
    hoard_mib: u64,
    /// Scratch for a response body.
    body: String,
}

impl App {
    fn new(worker: &Worker) -> App {
        let (id, pid, generation) = (worker.id(), sys::getpid(), worker.generation());
        App {
            identity_headers: format!(
                "X-Worker-Id: {id}\r\nX-Worker-Pid: {pid}\r\nX-Worker-Generation: {generation}\r\n"
            ),
            identity_line: format!("worker {id} pid {pid} generation {generation}\n"),
            hoard: Vec::new(),
            hoard_mib: 0,
            body: String::new(),
        }
    }

    /// Answers the complete requests at the front of `client.inbuf`, in order.
    fn answer_buffered(&mut self, client: &mut Client, draining: bool) {
        let mut pos = 0;
        while !client.closing && client.unsent() <= MAX_UNSENT_BYTES {
            if client.skip_body > 0 {
                let n = client.skip_body.min((client.inbuf.len() - pos) as u64);
                pos += n as usize;
                client.skip_body -= n;
                if client.skip_body > 0 {
                    break;
                }
            }
            match parse_request(&client.inbuf[pos..]) {
                Parse::Partial => {
                    if client.inbuf.len() - pos > MAX_HEAD_BYTES {
                        self.error(&mut client.outbuf, Status::HeadTooLarge);
                        client.closing = true;
                    }
                    break;
                }
                Parse::Invalid(status) => {
                    self.error(&mut client.outbuf, status);
                    client.closing = true;
                }
                Parse::Complete(req) => {
                    pos += req.head_len;
                    if req.content_length > MAX_BODY_BYTES {
                        self.error(&mut client.outbuf, Status::PayloadTooLarge);
                        client.closing = true;
                        break;
                    }
                    client.skip_body = req.content_length;
                    client.answered = true;
                    let keep_alive = req.keep_alive && !draining;
                    if !self.respond(&mut client.outbuf, &req, keep_alive) {
                        client.closing = true;
                    }
                }
            }
        }
        client.inbuf.drain(..pos);
        if client.peer_eof && !client.closing && client.unsent() <= MAX_UNSENT_BYTES {
            // Everything complete is answered; a partial request can never finish.
            client.closing = true;
        }
    }

    /// Appends the response to one well-formed request; returns whether the connection stays
    /// open (`keep_alive`, unless the query was malformed).
    fn respond(&mut self, out: &mut Vec<u8>, req: &Request<'_>, keep_alive: bool) -> bool {
        let query = match parse_query(req.target) {
            Ok(query) => query,
            Err(why) => {
                self.write_response(out, Status::BadRequest, why, false, true);
                return false;
            }
        };
        let mut extra = String::new();
        if let Some(us) = query.spin_us {
            let spun = spin(Duration::from_micros(us).min(MAX_SPIN));
            let _ = writeln!(extra, "spun_us {}", spun.as_micros());
        }
        if let Some(mib) = query.alloc_mib {
            let mib = mib.min(MAX_ALLOC_MIB);
            if self.grow(mib).is_err() {
                self.write_response(out, Status::InsufficientStorage, "", keep_alive, true);
                return keep_alive;
            }
            let _ = writeln!(extra, "alloc_mib {mib} hoard_mib {}", self.hoard_mib);
        }
        let with_body = req.method != "HEAD";
        self.write_response(out, Status::Ok, &extra, keep_alive, with_body);
        keep_alive
    }

    fn error(&mut self, out: &mut Vec<u8>, status: Status) {
        self.write_response(out, status, "", false, true);
    }

    /// Status line, identity headers, `Content-Length`, `Connection`; the body is the
    /// identity line, then for errors the reason, then `extra`.
    fn write_response(
        &mut self,
        out: &mut Vec<u8>,
        status: Status,
        extra: &str,
        keep_alive: bool,
        with_body: bool,
    ) {
        self.body.clear();
        self.body.push_str(&self.identity_line);
        if status != Status::Ok {
            let _ = writeln!(self.body, "{} {}", status.code(), status.reason());
        }
        self.body.push_str(extra);
        if !extra.is_empty() && !extra.ends_with('\n') {
            self.body.push('\n');
        }
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}Connection: {}\r\n\r\n",
            status.code(),
            status.reason(),
            self.body.len(),
            self.identity_headers,
            if keep_alive { "keep-alive" } else { "close" },
        );
        if with_body {
            out.extend_from_slice(self.body.as_bytes());
        }
    }

    /// Allocates `mib` MiB, writes every byte so every page is resident, and keeps it.
    fn grow(&mut self, mib: u64) -> Result<(), std::collections::TryReserveError> {
        let len = mib as usize * MIB;
        let mut block = Vec::new();
        block.try_reserve_exact(len)?;
        // Non-zero: pages stay resident and distinct (no zero-page sharing, no KSM merge).
        block.resize(len, 0x5a);
        self.hoard.push(std::hint::black_box(block));
        self.hoard_mib += mib;
        Ok(())
    }
}

/// Burns CPU for `d` (not a sleep: the point is a CPU-bound service time). Returns the time
/// actually spent.
fn spin(d: Duration) -> Duration {
    let start = Instant::now();
    while start.elapsed() < d {
        std::hint::spin_loop();
    }
    start.elapsed()
}

/// The statuses the demo answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    BadRequest,
    PayloadTooLarge,
    HeadTooLarge,
    NotImplemented,
    VersionNotSupported,
    InsufficientStorage,
}

impl Status {
    fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::PayloadTooLarge => 413,
            Status::HeadTooLarge => 431,
            Status::NotImplemented => 501,
            Status::VersionNotSupported => 505,
            Status::InsufficientStorage => 507,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::PayloadTooLarge => "Content Too Large",
            Status::HeadTooLarge => "Request Header Fields Too Large",
            Status::NotImplemented => "Not Implemented",
            Status::VersionNotSupported => "HTTP Version Not Supported",
            Status::InsufficientStorage => "Insufficient Storage",
        }
    }
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    method: &'a str,
    target: &'a str,
    keep_alive: bool,
    content_length: u64,
    /// Bytes of the head, including leading empty lines and the final empty line.
    head_len: usize,
}

#[derive(Debug, PartialEq, Eq)]
enum Parse<'a> {
    /// The head is not complete yet.
    Partial,
    Complete(Request<'a>),
    /// Answer with this status and close.
    Invalid(Status),
}

/// Parses one request head from the front of `buf` (RFC 9112 section 2-3, 6, 9.3): lines end
/// in CRLF or a bare LF, empty lines before the request line are skipped, `Transfer-Encoding`
/// is not supported (501), conflicting `Content-Length`s are rejected.
fn parse_request(buf: &[u8]) -> Parse<'_> {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let Some(end) = head_end(&buf[start..]).map(|e| start + e) else {
        return Parse::Partial;
    };
    if end > MAX_HEAD_BYTES {
        return Parse::Invalid(Status::HeadTooLarge);
    }
    let Ok(head) = std::str::from_utf8(&buf[start..end]) else {
        return Parse::Invalid(Status::BadRequest);
    };
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parse::Invalid(Status::BadRequest);
    };
    if !is_token(method) || target.is_empty() || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Parse::Invalid(Status::BadRequest);
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => return Parse::Invalid(Status::VersionNotSupported),
        _ => return Parse::Invalid(Status::BadRequest),
    };
    let mut content_length: Option<u64> = None;
    let (mut close, mut keep_alive_token, mut chunked) = (false, false, false);
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Parse::Invalid(Status::BadRequest);
        };
        if !is_token(name) {
            return Parse::Invalid(Status::BadRequest);
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Parse::Invalid(Status::BadRequest);
            }
            // Too many digits for u64 is certainly too large.
            let len = value.parse().unwrap_or(u64::MAX);
            if content_length.is_some_and(|prev| prev != len) {
                return Parse::Invalid(Status::BadRequest);
            }
            content_length = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for option in value.split(',').map(|o| o.trim_matches([' ', '\t'])) {
                close |= option.eq_ignore_ascii_case("close");
                keep_alive_token |= option.eq_ignore_ascii_case("keep-alive");
            }
        }
    }
    if chunked {
        return Parse::Invalid(Status::NotImplemented);
    }
    Parse::Complete(Request {
        method,
        target,
        keep_alive: !close && (!http10 || keep_alive_token),
        content_length: content_length.unwrap_or(0),
        head_len: end,
    })
}

/// Index just past the empty line ending a head, if it is all there.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(nl) = buf[from..].iter().position(|&b| b == b'\n') {
        let after = from + nl + 1;
        match buf.get(after..) {
            Some([b'\n', ..]) => return Some(after + 1),
            Some([b'\r', b'\n', ..]) => return Some(after + 2),
            _ => from = after,
        }
    }
    None
}

/// RFC 9110 `token`: the characters of methods and header names.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The query parameters the demo understands.
#[derive(Debug, Default, PartialEq, Eq)]
struct Query {
    /// `us=N`: microseconds of CPU to burn.
    spin_us: Option<u64>,
    /// `alloc=MB`: MiB to allocate and keep.
    alloc_mib: Option<u64>,
}

/// Reads `us` and `alloc` from a request target; other parameters are ignored, the last of
/// repeated ones wins.
fn parse_query(target: &str) -> Result<Query, &'static str> {
    let mut query = Query::default();
    let Some((_, params)) = target.split_once('?') else {
        return Ok(query);
    };
    let params = params.split_once('#').map_or(params, |(q, _)| q);
    for param in params.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        match key {
            "us" => {
                query.spin_us = Some(
                    value
                        .parse()
                        .map_err(|_| "us must be a whole number of microseconds")?,
                )
            }
            "alloc" => {
                query.alloc_mib = Some(
                    value
                        .parse()
                        .map_err(|_| "alloc must be a whole number of MiB")?,
                )
            }
            _ => {}
        }
    }
    Ok(query)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcluster_proto::{HEADER_LEN, ToMaster, ToWorker};
    use rcluster_sys::scm;
    use rcluster_worker::{Contract, Mode};
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    use std::thread::JoinHandle;

    /// Every wait in these tests ends by this deadline instead of hanging.
    const DEADLINE: Duration = Duration::from_secs(10);

    // ---- request parsing -------------------------------------------------------------------

    fn complete(buf: &[u8]) -> Request<'_> {
        match parse_request(buf) {
            Parse::Complete(req) => req,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn invalid(buf: &[u8]) -> Status {
        match parse_request(buf) {
            Parse::Invalid(status) => status,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn parses_a_request_head_and_stops_at_its_end() {
        let buf = b"GET /a?us=5 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET";
        let req = complete(buf);
        assert_eq!(req.method, "GET");
        assert_eq!(req.target, "/a?us=5");
        assert!(req.keep_alive);
        assert_eq!(req.content_length, 3);
        assert_eq!(&buf[req.head_len..], b"abcGET");
    }

    #[test]
    fn partial_heads_wait_for_more() {
        let full = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse_request(&full[..cut]), Parse::Partial, "cut at {cut}");
        }
        assert_eq!(complete(full).head_len, full.len());
    }

    #[test]
    fn tolerates_bare_lf_and_leading_empty_lines() {
        let req = complete(b"\r\n\nGET / HTTP/1.1\nHost: x\n\n");
        assert_eq!(req.head_len, 27);
        assert_eq!(complete(b"GET / HTTP/1.1\n\n").head_len, 16);
    }

    #[test]
    fn keep_alive_follows_version_and_connection_header() {
        let cases: &[(&[u8], bool)] = &[
            (b"GET / HTTP/1.1\r\n\r\n", true),
            (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false),
            (
                b"GET / HTTP/1.1\r\nconnection: Upgrade, CLOSE\r\n\r\n",
                false,
            ),
            (b"GET / HTTP/1.0\r\n\r\n", false),
            (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", true),
            (
                b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n",
                false,
            ),
        ];
        for (buf, keep_alive) in cases {
            assert_eq!(
                complete(buf).keep_alive,
                *keep_alive,
                "{}",
                String::from_utf8_lossy(buf)
            );
        }
    }

    #[test]
    fn rejects_malformed_heads() {
        assert_eq!(invalid(b"GET /\r\n\r\n"), Status::BadRequest);
        assert_eq!(invalid(b"GET  / HTTP/1.1\r\n\r\n"), Status::BadRequest);
        assert_eq!(invalid(b"GET / HTTP/1.1 x\r\n\r\n"), Status::BadRequest);
        assert_eq!(invalid(b"G(T / HTTP/1.1\r\n\r\n"), Status::BadRequest);
        assert_eq!(invalid(b"GET / FOO/1.1\r\n\r\n"), Status::BadRequest);
        assert_eq!(
            invalid(b"GET / HTTP/2.0\r\n\r\n"),
            Status::VersionNotSupported
        );
        assert_eq!(
            invalid(b"GET / HTTP/1.1\r\nNoColon\r\n\r\n"),
            Status::BadRequest
        );
        assert_eq!(
            invalid(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"),
            Status::BadRequest
        );
        assert_eq!(
            invalid(b"GET / HTTP/1.1\r\nX: \xff\r\n\r\n"),
            Status::BadRequest
        );
        assert_eq!(
            invalid(b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Status::BadRequest
        );
        assert_eq!(
            invalid(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Status::BadRequest
        );
        assert_eq!(
            complete(b"GET / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n")
                .content_length,
            2
        );
        assert_eq!(
            complete(b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n")
                .content_length,
            u64::MAX
        );
        assert_eq!(
            invalid(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Status::NotImplemented
        );
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_HEAD_BYTES + 10, b'a');
        assert_eq!(parse_request(&huge), Parse::Partial);
        huge.extend_from_slice(b"\r\n\r\n");
        assert_eq!(invalid(&huge), Status::HeadTooLarge);
    }

    #[test]
    fn query_parameters_combine() {
        assert_eq!(parse_query("/"), Ok(Query::default()));
        assert_eq!(
            parse_query("/x?us=250&alloc=3&other=y"),
            Ok(Query {
                spin_us: Some(250),
                alloc_mib: Some(3)
            })
        );
        assert_eq!(parse_query("/?us=1&us=2#frag").unwrap().spin_us, Some(2));
        assert_eq!(parse_query("/?&&alloc=0").unwrap().alloc_mib, Some(0));
        assert!(parse_query("/?us=abc").is_err());
        assert!(parse_query("/?alloc=-1").is_err());
        assert!(parse_query("/?us").is_err());
    }

    // ---- the server, in process ------------------------------------------------------------

    /// A server running on a thread; stopped and joined on drop.
    struct Running {
        stop: StopHandle,
        thread: Option<JoinHandle<anyhow::Result<()>>>,
    }

    impl Running {
        fn start(worker: Worker) -> Running {
            let server = Server::new(worker).unwrap();
            let stop = server.stop_handle();
            let thread = std::thread::spawn(move || server.run());
            Running {
                stop,
                thread: Some(thread),
            }
        }

        fn finish(mut self) -> anyhow::Result<()> {
            self.stop.stop();
            self.thread.take().unwrap().join().unwrap()
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(thread) = self.thread.take() {
                self.stop.stop();
                let _ = thread.join();
            }
        }
    }

    /// The master's end of a dispatch channel, and where its connections come from.
    struct Master {
        end: OwnedFd,
        tcp: TcpListener,
    }

    impl Master {
        fn dispatch(&self, seq: u64) -> HttpClient {
            let client = TcpStream::connect(self.tcp.local_addr().unwrap()).unwrap();
            let (server_side, _) = self.tcp.accept().unwrap();
            // As the master sends them (docs/PROTOCOL.md §2).
            server_side.set_nonblocking(true).unwrap();
            let msg = ToWorker::Conn { seq }.encode();
            scm::sendmsg_fd(self.end.as_fd(), &msg, server_side.as_fd()).unwrap();
            HttpClient::new(client)
        }

        /// The next message from the worker, waiting for it until [`DEADLINE`].
        fn next_message(&self) -> ToMaster {
            loop {
                let mut buf = [0u8; HEADER_LEN];
                match scm::recvmsg_fd(self.end.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
                    Ok(got) => return ToMaster::decode(&buf[..got.len]).unwrap(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        wait_readable(self.end.as_fd())
                    }
                    Err(e) => panic!("recv from worker: {e}"),
                }
            }
        }

        /// Reads messages until CLOSED reports add up to `total`; returns the others.
        fn await_closed(&self, total: u64) -> Vec<ToMaster> {
            let (mut closed, mut others) = (0, Vec::new());
            while closed < total {
                match self.next_message() {
                    ToMaster::Closed { count } => closed += count,
                    other => others.push(other),
                }
            }
            assert_eq!(closed, total);
            others
        }
    }

    fn wait_readable(fd: std::os::fd::BorrowedFd<'_>) {
        let mut poll = Poll::new().unwrap();
        let raw = fd.as_raw_fd();
        poll.registry()
            .register(&mut mio::unix::SourceFd(&raw), Token(0), Interest::READABLE)
            .unwrap();
        let mut events = Events::with_capacity(1);
        poll.poll(&mut events, Some(DEADLINE)).unwrap();
        assert!(
            !events.is_empty(),
            "nothing from the worker within {DEADLINE:?}"
        );
    }

    fn dispatch_server(id: u32, generation: u64) -> (Running, Master, OwnedFd) {
        let (end, worker_end) = sys::socketpair_seqpacket().unwrap();
        // What the real master keeps to take back unread connections.
        let reclaim = worker_end.try_clone().unwrap();
        let mut contract = Contract::new(Mode::Dispatch, 1);
        contract.id = id;
        contract.generation = generation;
        let worker = Worker::new(contract, vec![worker_end]).unwrap();
        let master = Master {
            end,
            tcp: TcpListener::bind("127.0.0.1:0").unwrap(),
        };
        let running = Running::start(worker);
        assert_eq!(
            master.next_message(),
            ToMaster::Ready {
                max_fds: rcluster_proto::MAX_FDS_PER_CONN as u64
            }
        );
        (running, master, reclaim)
    }

    fn shared_server() -> (Running, SocketAddr) {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let worker = Worker::new(Contract::new(Mode::Shared, 1), vec![OwnedFd::from(tcp)]).unwrap();
        (Running::start(worker), addr)
    }

    struct HttpClient {
        writer: TcpStream,
        reader: BufReader<TcpStream>,
    }

    #[derive(Debug)]
    struct Response {
        status: u16,
        headers: HashMap<String, String>,
        body: String,
    }

    impl Response {
        fn header(&self, name: &str) -> &str {
            self.headers
                .get(name)
                .unwrap_or_else(|| panic!("no {name} in {self:?}"))
        }
    }

    impl HttpClient {
        fn new(stream: TcpStream) -> HttpClient {
            stream.set_read_timeout(Some(DEADLINE)).unwrap();
            HttpClient {
                writer: stream.try_clone().unwrap(),
                reader: BufReader::new(stream),
            }
        }

        fn connect(addr: SocketAddr) -> HttpClient {
            HttpClient::new(TcpStream::connect(addr).unwrap())
        }

        fn send(&mut self, raw: &str) {
            self.writer.write_all(raw.as_bytes()).unwrap();
        }

        fn response(&mut self, head_only: bool) -> Response {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let status = line
                .strip_prefix("HTTP/1.1 ")
                .and_then(|rest| rest.get(..3))
                .and_then(|code| code.parse().ok())
                .unwrap_or_else(|| panic!("bad status line {line:?}"));
            let mut headers = HashMap::new();
            loop {
                line.clear();
                self.reader.read_line(&mut line).unwrap();
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                let (name, value) = line.split_once(": ").unwrap();
                headers.insert(name.to_ascii_lowercase(), value.to_owned());
            }
            let len: usize = headers["content-length"].parse().unwrap();
            let mut body = vec![0u8; if head_only { 0 } else { len }];
            self.reader.read_exact(&mut body).unwrap();
            Response {
                status,
                headers,
                body: String::from_utf8(body).unwrap(),
            }
        }

        fn get(&mut self, target: &str) -> Response {
            self.send(&format!("GET {target} HTTP/1.1\r\nHost: test\r\n\r\n"));
            self.response(false)
        }

        fn assert_closed(&mut self) {
            let mut buf = [0u8; 1];
            assert_eq!(self.reader.read(&mut buf).unwrap(), 0, "expected EOF");
        }
    }

    #[test]
    fn dispatched_connections_are_served_and_reported_closed() {
        let (running, master, _reclaim) = dispatch_server(2, 4);
        let mut client = master.dispatch(1);
        let pid = sys::getpid().to_string();

        let resp = client.get("/hello?x=1");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("x-worker-id"), "2");
        assert_eq!(resp.header("x-worker-pid"), pid);
        assert_eq!(resp.header("x-worker-generation"), "4");
        assert_eq!(resp.header("connection"), "keep-alive");
        assert_eq!(resp.header("content-length"), resp.body.len().to_string());
        assert!(
            resp.body
                .starts_with(&format!("worker 2 pid {pid} generation 4\n")),
            "{resp:?}"
        );

        // Pipelined: both requests in one segment, answered in order.
        client.send("GET /?us=300 HTTP/1.1\r\n\r\nHEAD / HTTP/1.1\r\n\r\n");
        let first = client.response(false);
        assert!(first.body.contains("spun_us "), "{first:?}");
        let spun: u64 = first.body.lines().nth(1).unwrap()[8..].parse().unwrap();
        assert!(spun >= 300);
        let head = client.response(true);
        assert_eq!(head.status, 200);
        assert_ne!(head.header("content-length"), "0");

        client.send("GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert_eq!(client.response(false).header("connection"), "close");
        client.assert_closed();
        assert!(master.await_closed(1).is_empty());

        running.finish().unwrap();
        assert_eq!(master.next_message(), ToMaster::Stopping);
    }

    #[test]
    fn drain_finishes_requests_in_flight_closes_idle_ones_and_leaves_the_queue() {
        let (running, master, reclaim) = dispatch_server(0, 0);
        let mut idle = master.dispatch(1);
        assert_eq!(idle.get("/").status, 200);
        // One complete request and the start of a second in one segment: once the first is
        // answered the server holds the partial one, so this connection is in flight.
        let mut busy = master.dispatch(2);
        busy.send("GET / HTTP/1.1\r\n\r\nGET /second HTTP/1.1\r\n");
        assert_eq!(busy.response(false).status, 200);

        running.stop.stop();
        assert_eq!(master.next_message(), ToMaster::Stopping);
        idle.assert_closed();
        // Dispatched after STOPPING: must stay queued for the master to take back.
        let _late = master.dispatch(3);
        busy.send("\r\n");
        let last = busy.response(false);
        assert_eq!(last.status, 200);
        assert_eq!(last.header("connection"), "close");
        busy.assert_closed();
        running.finish().unwrap();
        assert!(master.await_closed(2).is_empty());

        let mut buf = [0u8; HEADER_LEN];
        let got = scm::recvmsg_fd(reclaim.as_fd(), &mut buf, libc::MSG_DONTWAIT).unwrap();
        assert_eq!(ToWorker::decode(&buf).unwrap(), ToWorker::Conn { seq: 3 });
        assert!(got.fd.is_some());
    }

    #[test]
    fn shared_listener_serves_many_connections_at_once() {
        let (running, addr) = shared_server();
        let mut clients: Vec<_> = (0..64).map(|_| HttpClient::connect(addr)).collect();
        for (i, client) in clients.iter_mut().enumerate() {
            client.send(&format!("GET /{i} HTTP/1.1\r\n\r\n"));
        }
        for client in &mut clients {
            let resp = client.response(false);
            assert_eq!(resp.status, 200);
            assert_eq!(resp.header("x-worker-id"), "0");
        }
        for client in &mut clients {
            assert_eq!(client.get("/again").status, 200);
        }
        running.finish().unwrap();
        for client in &mut clients {
            client.assert_closed();
        }
    }

    #[test]
    fn http_1_0_closes_unless_asked_to_keep_alive() {
        let (_running, addr) = shared_server();
        let mut client = HttpClient::connect(addr);
        client.send("GET / HTTP/1.0\r\n\r\n");
        assert_eq!(client.response(false).header("connection"), "close");
        client.assert_closed();

        let mut client = HttpClient::connect(addr);
        for _ in 0..2 {
            client.send("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
            assert_eq!(client.response(false).header("connection"), "keep-alive");
        }
    }

    #[test]
    fn bodies_are_skipped_and_bad_requests_close() {
        let (_running, addr) = shared_server();
        let mut client = HttpClient::connect(addr);
        client.send(
            "POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /?alloc=1 HTTP/1.1\r\n\r\n",
        );
        assert_eq!(client.response(false).status, 200);
        let resp = client.response(false);
        assert!(resp.body.contains("alloc_mib 1 "), "{resp:?}");

        let cases = [
            ("garbage\r\n\r\n", 400),
            ("GET /?us=soon HTTP/1.1\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n", 413),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            ("GET / HTTP/3\r\n\r\n", 505),
        ];
        for (raw, status) in cases {
            let mut client = HttpClient::connect(addr);
            client.send(raw);
            let resp = client.response(false);
            assert_eq!(resp.status, status, "{raw:?}");
            assert_eq!(resp.header("connection"), "close");
            assert_eq!(resp.header("x-worker-id"), "0");
            client.assert_closed();
        }
    }
}
