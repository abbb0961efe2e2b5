//! The acceptor thread (dispatch mode): accepts connections on the master's listening sockets
//! with mio/epoll, asks the policy for a worker, and passes each connection's fd down that
//! worker's channel; reads READY/CLOSED back; reclaims connections still queued in a channel
//! when its worker is drained or dies, and hands them to another worker.
//!
//! It owns the listening sockets, the master's end of every channel, the master's duplicate of
//! every worker's end (for reclaim), and the load table the policy reads. The supervisor talks
//! to it only through [`Command`]s (crossbeam channel + `mio::Waker`) and hears back through
//! [`Event`]s; no lock is taken on the accept → pick → send path.
//!
//! Guarantee: a connection the master accepted is never dropped by the master. It goes to a
//! worker's channel, or waits in `pending` (and accepting stops) until some channel can take it.
//!
//! Fresh load signals: for the policies that read the load table, a pick that is a tie is
//! checked before it is committed. When the policy's choice and the runner-up (its choice with
//! the first one closed) have the same active count, the acceptor re-reads for both how many
//! connections are still untaken in the channel: `ioctl(SIOCOUTQ)` on its own end counts the
//! bytes the worker has not received yet, which stay charged to the sender at a fixed size per
//! message (calibrated at start, see [`outq_unit`]). Only workers whose `queued` figure can be
//! stale pay the system call (something was sent to them since it was last read as 0), so at
//! most two calls per connection, and none when the pick is not a tie. If either figure
//! changed, the policy picks again on the fresh table. Channel seen empty after a dispatch, or
//! a CLOSED report, stamps the worker's `progress` (see [`crate::policy`] for how the policies
//! use both).
//!
//! Stuck workers: once per wake-up, before accepting, the channel of each worker that may have
//! something untaken is read again (at most every 250 µs per worker). A worker whose channel
//! held something untaken at every read for [`STUCK_AFTER`] (1 ms), with nothing taken and
//! no close reported meanwhile, is marked `stuck`, and the load-reading policies pass it over
//! while any other worker pulls (least-conn: while that one holds at most
//! [`crate::policy::STUCK_GAP`] more connections): a single-threaded server inside a long
//! request gets no connection to wait behind it. The mark goes as soon as it takes or closes
//! something.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, error, info, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::master::accounting::{self, Conduct};
use crate::master::ratelimit::{LogLimiter, Verdict};
use crate::master::stall::{self, QueueWatch};
use crate::policy::{Policy, STUCK_AFTER, WorkerStat};
use crate::sys::scm::{self, SendBatch};
use crate::sys::{self, Pid};
use rcluster_proto::{HEADER_LEN, MAX_FDS_PER_CONN, MAX_LISTENERS, ToMaster, ToWorker};

pub use crate::master::lifecycle::WorkerId;

/// Messages passed to a channel in one `sendmmsg`.
pub const SEND_BATCH: usize = 64;
/// Connections accepted from one listener before the others get a turn.
const ACCEPT_BURST: usize = 256;
/// How long accepting pauses after EMFILE/ENFILE/ENOBUFS/ENOMEM, so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often the channels are checked while the acceptor waits for them to empty at shutdown.
const SHUTDOWN_POLL: Duration = Duration::from_millis(10);
/// After [`Event::Drained`]: how long a turn waits at most while the workers stop (channel
/// reads and commands wake it at once).
const ENDING_POLL: Duration = Duration::from_millis(200);
/// For policies that do not read active counts: how often the channels are read (READY, CLOSED,
/// STOPPING) instead of waking up for every message.
const CHANNEL_SWEEP: Duration = Duration::from_millis(20);

const WAKER: Token = Token(usize::MAX);
/// Tokens below this are listeners; channel tokens encode (worker id, listener).
const CHANNEL_BASE: usize = 1 << 16;

fn channel_token(id: WorkerId, listener: usize) -> Token {
    Token(CHANNEL_BASE + (id as usize) * MAX_LISTENERS + listener)
}

fn split_channel_token(token: Token) -> (WorkerId, usize) {
    let v = token.0 - CHANNEL_BASE;
    ((v / MAX_LISTENERS) as WorkerId, v % MAX_LISTENERS)
}

/// One end-pair of a dispatch channel as the master keeps it.
pub struct ChannelEnds {
    /// The master's end (made non-blocking here).
    pub master: OwnedFd,
    /// The master's duplicate of the worker's end, read only to reclaim unread connections.
    pub worker: OwnedFd,
}

/// Supervisor → acceptor.
pub enum Command {
    /// A worker was spawned; its channels (one per listener, in listener order).
    Add {
        /// The worker.
        id: WorkerId,
        /// Its slot (for logs).
        slot: usize,
        /// Its pid (for logs).
        pid: Pid,
        /// Its channels.
        channels: Vec<ChannelEnds>,
        /// Report [`Event::MaxConns`] once it has been handed this many connections.
        max_conns: Option<u64>,
    },
    /// Dispatch to the worker (it is ready, or ready again after STOPPING).
    Ready(WorkerId),
    /// Stop dispatching to the worker and take back what is queued in its channels.
    Drain(WorkerId),
    /// The worker exited: take back what is queued, forget it.
    Remove(WorkerId),
    /// Report [`Event::Idle`] once the worker holds no connection (every one dispatched to it
    /// closed or taken back): at once if it holds none now.
    WhenIdle(WorkerId),
    /// Latest RSS samples, KiB.
    Rss(Vec<(WorkerId, u32)>),
    /// Log one status line per worker.
    Status,
    /// A health probe's server end (`--health-check`): send it to this worker, on its first
    /// listener's channel, at once, outside the policy and the user traffic counts. Dropped
    /// (the prober then sees end of file) if the worker is not open or its channel is full.
    Probe {
        /// The worker.
        id: WorkerId,
        /// The probe connection's server end.
        fd: OwnedFd,
    },
    /// Send a copy of the per-worker table and counters (for `ctl status`, `/metrics`, `ctl
    /// dump`). Answered on the acceptor's next wake-up; the copy is the only allocation, and it
    /// happens only when asked.
    Snapshot(Sender<Snapshot>),
    /// Read the worker's channels now and answer [`Event::ChannelsRead`]: a worker that said
    /// STOPPING and exited has its [`Event::Stopping`] reported before the supervisor acts on
    /// the exit.
    ReadChannels(WorkerId),
    /// Use this policy from the next connection on. The load table is the acceptor's, so the
    /// new policy sees the same counts; nothing queued or in flight is touched.
    SetPolicy(Box<dyn Policy>),
    /// Stop accepting (the listeners are closed, so new connections are refused), wait up to
    /// `drain_for` until the workers have taken every connection already dispatched, and report
    /// [`Event::Drained`]. The thread then goes on reading the workers' channels (their CLOSED
    /// counts, for [`Command::WhenIdle`] at stop) until [`Command::End`].
    Shutdown {
        /// Longest wait for the channels to empty.
        drain_for: Duration,
    },
    /// End the thread (after [`Command::Shutdown`]; at once if none came).
    End,
}

/// Acceptor → supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// READY arrived on the worker's channel (the worker stays closed until the supervisor
    /// sends [`Command::Ready`]).
    Ready(WorkerId),
    /// The worker said STOPPING (it stays open until the supervisor sends [`Command::Drain`],
    /// which also takes back what was queued meanwhile).
    Stopping(WorkerId),
    /// The worker took nothing from a non-empty channel for the stall timeout (its channel
    /// stayed full, or its queue never went down); it gets no more connections and what was
    /// queued for it has been reclaimed.
    Stalled(WorkerId),
    /// The worker was handed its `max_conns` connections.
    MaxConns(WorkerId),
    /// The worker broke the channel protocol [`accounting::VIOLATION_LIMIT`] times (CLOSED
    /// beyond what it was dispatched, malformed messages): replace it.
    Misbehaving(WorkerId),
    /// Reclaimed connections from a drained or dead worker (count), for logs and tests.
    Reclaimed(WorkerId, usize),
    /// Answer to [`Command::ReadChannels`]: every message the worker sent before it was asked
    /// has been reported.
    ChannelsRead(WorkerId),
    /// After [`Command::Shutdown`]: every dispatched connection was taken by a worker (or the
    /// wait ran out); the workers can be told to stop.
    Drained,
    /// After [`Command::WhenIdle`]: the worker holds no connection.
    Idle(WorkerId),
}

/// Running totals of the acceptor thread, kept as plain integers the thread alone writes (no
/// atomics on the accept path); copied out by [`Command::Snapshot`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections accepted.
    pub accepts: u64,
    /// Connections queued to a worker's channel, counting again one that was placed anew after
    /// a bounce or a reclaim.
    pub dispatches: u64,
    /// Connections a full channel sent back to be placed elsewhere.
    pub bounces: u64,
    /// Times accepting paused after EMFILE, ENFILE, ENOBUFS, ENOMEM or another accept error.
    pub pauses: u64,
    /// Connections taken back from a drained or dead worker's channel.
    pub reclaims: u64,
    /// accept4 errors other than EAGAIN (including ECONNABORTED).
    pub accept_errors: u64,
    /// Policy switches ([`Command::SetPolicy`]).
    pub policy_switches: u64,
}

/// One channel in a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSnapshot {
    /// Bytes the worker has not read yet (`SIOCOUTQ`), if readable.
    pub queued_bytes: Option<usize>,
    /// Connections batched in the master and not sent yet.
    pub batched: usize,
    /// The last send did not block.
    pub writable: bool,
}

/// One worker as the acceptor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSnapshot {
    /// The worker.
    pub id: WorkerId,
    /// Its slot.
    pub slot: usize,
    /// Its pid.
    pub pid: Pid,
    /// `starting`, `ready` or `draining`, as the acceptor knows it.
    pub state: &'static str,
    /// Connections handed to it and not taken back.
    pub dispatched: u64,
    /// Connections it reported closed.
    pub closed: u64,
    /// The load table's active count (what the policy reads).
    pub active: u32,
    /// The load table's RSS, KiB (sampled only for least-mem and --max-rss).
    pub rss_kib: u32,
    /// The load table's stuck mark (connections untaken in its channel, no progress).
    pub stuck: bool,
    /// Listener bits it is open for.
    pub open: u64,
    /// Connection fds per message it takes.
    pub max_fds: usize,
    /// Its channels, in listener order.
    pub channels: Vec<ChannelSnapshot>,
}

/// A copy of the acceptor's state at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Running totals.
    pub counters: Counters,
    /// Per worker, in the table's order.
    pub workers: Vec<WorkerSnapshot>,
    /// Accepted connections waiting in the master for a channel.
    pub pending: usize,
    /// Accepting is paused after an error.
    pub paused: bool,
    /// Each listener's accept queue `(queued, limit)` from `TCP_INFO`, when readable.
    pub listen_queues: Vec<Option<(u32, u32)>>,
}

/// Handle the supervisor keeps.
pub struct AcceptorHandle {
    commands: Sender<Command>,
    waker: Arc<Waker>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AcceptorHandle {
    /// Sends a command and wakes the thread.
    pub fn send(&self, cmd: Command) {
        if self.commands.send(cmd).is_ok() {
            let _ = self.waker.wake();
        }
    }

    /// A sender for other threads (the health prober): commands and the waker to go with them.
    pub fn commander(&self) -> (Sender<Command>, Arc<Waker>) {
        (self.commands.clone(), Arc::clone(&self.waker))
    }

    /// Tells the thread to stop (at once, if it is not stopping already) and waits for it.
    pub fn shutdown(mut self) {
        self.send(Command::Shutdown {
            drain_for: Duration::ZERO,
        });
        self.send(Command::End);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            error!("acceptor thread panicked");
        }
    }
}

/// Settings for the thread.
pub struct AcceptorConfig {
    /// The listening sockets, in listener order.
    pub listeners: Vec<std::net::TcpListener>,
    /// The policy.
    pub policy: Box<dyn Policy>,
    /// CPU to pin the thread to.
    pub cpu: Option<usize>,
    /// See [`Event::Stalled`].
    pub stall_timeout: Duration,
}

/// Starts the acceptor thread. Events go to `events`, followed by a wake of `supervisor_waker`.
pub fn spawn(
    config: AcceptorConfig,
    events: Sender<Event>,
    supervisor_waker: Arc<Waker>,
) -> io::Result<AcceptorHandle> {
    let (mut acceptor, commands, waker) = Acceptor::new(config, events, supervisor_waker)?;
    let thread = std::thread::Builder::new()
        .name("acceptor".into())
        .spawn(move || {
            if let Err(e) = acceptor.run() {
                error!("acceptor failed: {e:#}");
            }
        })?;
    Ok(AcceptorHandle {
        commands,
        waker,
        thread: Some(thread),
    })
}

/// What the supervisor told the acceptor about a worker (the lifecycle decides; the acceptor
/// only applies it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Added ([`Command::Add`]), not yet opened: dispatched to only while no worker is ready.
    Starting,
    /// Opened ([`Command::Ready`]).
    Ready,
    /// Closed ([`Command::Drain`]): nothing is dispatched to it.
    Draining,
}

struct Channel {
    ends: ChannelEnds,
    batch: SendBatch<HEADER_LEN>,
    writable: bool,
    full_since: Option<Instant>,
    /// The worker sent READY on this channel (it takes connections for this listener).
    ready: bool,
    /// Progress of what is queued unread (see [`stall`]).
    watch: QueueWatch,
}

struct Entry {
    /// Sequence number of the last connection placed in this worker's batch, and of the last
    /// one sent down its channel (its progress stamp once the channel is seen empty).
    last_placed: u64,
    last_sent: u64,
    /// Samples of its pull (see [`Acceptor::refresh`]).
    pull: Pull,
    id: WorkerId,
    slot: usize,
    pid: Pid,
    state: State,
    channels: Vec<Channel>,
    dispatched: u64,
    closed: u64,
    max_conns: Option<u64>,
    stall_reported: bool,
    /// [`Command::WhenIdle`] asked; [`Event::Idle`] not yet sent.
    idle_wanted: bool,
    /// Connection fds per CONN message this worker takes (its READY's value, at least 1).
    max_fds: usize,
    /// Health probes sent whose close the worker has not reported yet: its CLOSED counts pay
    /// these first, so probes never show in `dispatched`/`closed`.
    probes_open: u64,
    /// Its protocol violations.
    conduct: Conduct,
    /// Ready by other means than its channels (NOTIFY_SOCKET, delay, timeout): every channel
    /// is open. Otherwise only the channels it sent READY on are.
    ready_all: bool,
    /// It said FULL (out of fds) and not READY since: closed for dispatch.
    full: bool,
    /// Rate limit of the FULL/resume lines.
    full_log: LogLimiter,
    /// Since when a reclaim has found the worker holding its channel lock (in the middle of a
    /// two-step read): retried every [`RECLAIM_RETRY`] while still wanted, and done without
    /// the lock after [`RECLAIM_LOCK_WAIT`].
    reclaim_held_since: Option<Instant>,
    /// Rate limit of the line for a worker that kept its channel lock too long.
    lock_log: LogLimiter,
}

/// How often a reclaim put off by the worker's channel lock is tried again. A worker holds the
/// lock for two reads of its channel.
const RECLAIM_RETRY: Duration = Duration::from_millis(1);

/// How long a reclaim honours the worker's channel lock. Longer is a worker that broke the
/// protocol (or one stopped by a debugger): what is queued is taken back without the lock,
/// which can only cost that worker the message its read was about to take.
const RECLAIM_LOCK_WAIT: Duration = Duration::from_millis(100);

/// What the acceptor last saw of a worker pulling connections from its channel.
struct Pull {
    /// When it last showed progress: took a connection, reported a close, became ready, or
    /// was first seen with something untaken.
    progress_at: Instant,
    /// Untaken connections and connections taken in all, at the last read of its channel.
    seen_untaken: usize,
    seen_taken: u64,
    /// [`Acceptor::mark_stuck`] reads its channel again no earlier than this.
    next_look: Instant,
}

impl Pull {
    fn new(now: Instant) -> Self {
        Pull {
            progress_at: now,
            seen_untaken: 0,
            seen_taken: 0,
            next_look: now,
        }
    }
}

/// How often [`Acceptor::mark_stuck`] may read one worker's channel: a quarter of
/// [`STUCK_AFTER`], so a worker that stops pulling is marked within 1.25 times it.
const PULL_LOOK: Duration = Duration::from_micros(250);
const _: () = assert!(PULL_LOOK.as_nanos() * 4 == STUCK_AFTER.as_nanos());

struct Pending {
    listener: usize,
    seq: u64,
    fd: OwnedFd,
}

/// The acceptor's state. [`spawn`] runs it on its own thread; benchmarks drive it one
/// [`Acceptor::turn`] at a time on theirs.
pub struct Acceptor {
    poll: Poll,
    events_buf: Events,
    listeners: Vec<mio::net::TcpListener>,
    /// The listener may have connections waiting (edge-triggered: set on readable, cleared on
    /// EAGAIN).
    backlogged: Vec<bool>,
    policy: Box<dyn Policy>,
    entries: Vec<Entry>,
    stats: Vec<WorkerStat>,
    pending: VecDeque<Pending>,
    accept_paused_until: Option<Instant>,
    seq: u64,
    commands: Receiver<Command>,
    events: Sender<Event>,
    supervisor_waker: Arc<Waker>,
    stall_timeout: Duration,
    /// When the channels' queues are sampled next (see [`stall`]).
    next_stall_sample: Instant,
    cpu: Option<usize>,
    /// Set by [`Command::Shutdown`]: until when to wait for the channels to empty.
    shutting_down: Option<Instant>,
    /// Set by [`Command::End`], or when the supervisor's end of the commands is gone.
    ending: bool,
    /// The policy does not read active counts: channels are registered for writability only
    /// and read every [`CHANNEL_SWEEP`] (`next_sweep`).
    sweep_channels: bool,
    next_sweep: Instant,
    /// The policy reads the load: picks are checked against fresh channel figures.
    fresh_signals: bool,
    /// Bytes `SIOCOUTQ` reports per queued message; 0 when unknown (then only "empty or not").
    outq_unit: usize,
    counters: Counters,
}

impl Acceptor {
    /// Builds the acceptor; returns it with the command sender and the waker that goes with it.
    pub fn new(
        config: AcceptorConfig,
        events: Sender<Event>,
        supervisor_waker: Arc<Waker>,
    ) -> io::Result<(Self, Sender<Command>, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, commands) = crossbeam_channel::unbounded();
        let mut listeners = Vec::new();
        for (i, l) in config.listeners.into_iter().enumerate() {
            l.set_nonblocking(true)?;
            let mut l = mio::net::TcpListener::from_std(l);
            poll.registry()
                .register(&mut l, Token(i), Interest::READABLE)?;
            listeners.push(l);
        }
        let sweep_channels = !config.policy.reads_active();
        let acceptor = Acceptor {
            fresh_signals: !sweep_channels,
            outq_unit: outq_unit(),
            sweep_channels,
            next_sweep: Instant::now(),
            poll,
            events_buf: Events::with_capacity(1024),
            backlogged: vec![true; listeners.len()],
            listeners,
            policy: config.policy,
            entries: Vec::new(),
            stats: Vec::new(),
            pending: VecDeque::new(),
            accept_paused_until: None,
            seq: 0,
            commands,
            events,
            supervisor_waker,
            stall_timeout: config.stall_timeout,
            next_stall_sample: Instant::now(),
            cpu: config.cpu,
            shutting_down: None,
            ending: false,
            counters: Counters::default(),
        };
        Ok((acceptor, tx, waker))
    }

    fn emit(&self, event: Event) {
        if self.events.send(event).is_ok() {
            let _ = self.supervisor_waker.wake();
        }
    }

    fn run(&mut self) -> io::Result<()> {
        if let Some(cpu) = self.cpu {
            match sys::sched_setaffinity_self(&sys::CpuSet::from_cpus(&[cpu])) {
                Ok(()) => info!("acceptor pinned to CPU {cpu}"),
                Err(e) => warn!("cannot pin the acceptor to CPU {cpu}: {e}"),
            }
        }
        while self.shutting_down.is_none() {
            let timeout = self.next_timeout();
            self.turn(timeout)?;
        }
        // Accepting has stopped. Connections already in a channel are the workers' to serve:
        // keep the channels (and reclaim from any worker that dies meanwhile) until the workers
        // have read them all, so that stopping the workers loses none.
        while !self.channels_empty()
            && self
                .shutting_down
                .is_some_and(|until| Instant::now() < until)
        {
            self.turn(Some(SHUTDOWN_POLL))?;
        }
        if !self.channels_empty() {
            warn!("stopping with connections still queued for workers that did not take them");
        }
        self.emit(Event::Drained);
        info!("acceptor stopped");
        // The workers are stopped now. One whose stop signal waits until it holds no
        // connection (Command::WhenIdle, which comes after Drained) is told of by the CLOSED
        // counts on its channels: they are read until the supervisor ends the thread.
        while !self.ending {
            self.turn(Some(ENDING_POLL))?;
        }
        Ok(())
    }

    /// Nothing waits in the master or in any channel.
    fn channels_empty(&self) -> bool {
        self.pending.is_empty()
            && self.entries.iter().all(|e| {
                e.channels.iter().all(|c| {
                    c.batch.is_empty()
                        && sys::siocoutq(c.ends.master.as_fd()).is_ok_and(|queued| queued == 0)
                })
            })
    }

    /// One wake-up: wait for events (at most `timeout`), apply commands, read the channels,
    /// accept and dispatch until the listeners say EAGAIN, send every batch.
    pub fn turn(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if let Err(e) = self.poll.poll(&mut self.events_buf, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e);
        }
        // Take the buffer out so handlers can borrow `self` mutably (an empty Events does not
        // allocate).
        let events = std::mem::replace(&mut self.events_buf, Events::with_capacity(0));
        for event in events.iter() {
            match event.token() {
                WAKER => {}
                Token(l) if l < CHANNEL_BASE => self.backlogged[l] = true,
                token => {
                    let (id, listener) = split_channel_token(token);
                    if event.is_readable() || event.is_read_closed() {
                        self.read_channel(id, listener);
                    }
                    if event.is_writable() {
                        self.channel_writable(id, listener);
                    }
                }
            }
        }
        self.events_buf = events;
        if self.sweep_channels && Instant::now() >= self.next_sweep {
            self.next_sweep = Instant::now() + CHANNEL_SWEEP;
            let channels: Vec<(WorkerId, usize)> = self
                .entries
                .iter()
                .flat_map(|e| (0..e.channels.len()).map(move |l| (e.id, l)))
                .collect();
            for (id, listener) in channels {
                self.read_channel(id, listener);
            }
        }
        self.handle_commands();
        self.retry_reclaims();
        if self
            .accept_paused_until
            .is_some_and(|t| Instant::now() >= t)
        {
            self.accept_paused_until = None;
        }
        self.flush_all();
        self.mark_stuck();
        self.accept_all();
        self.flush_all();
        self.check_stalls();
        Ok(())
    }

    fn next_timeout(&self) -> Option<Duration> {
        // Work left from this wake-up (a burst limit was hit): poll without blocking, since an
        // edge-triggered listener will not report readiness again.
        let more_to_accept = self.accept_paused_until.is_none()
            && self.pending.is_empty()
            && self
                .backlogged
                .iter()
                .enumerate()
                .any(|(l, &b)| b && self.stats.iter().any(|s| s.is_open(l)));
        if more_to_accept {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let mut next: Option<Instant> = self.accept_paused_until;
        if self.sweep_channels && !self.entries.is_empty() {
            next = Some(next.map_or(self.next_sweep, |n| n.min(self.next_sweep)));
        }
        if self.entries.iter().any(|e| e.state == State::Ready) {
            let at = self.next_stall_sample;
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        if self.entries.iter().any(|e| e.reclaim_held_since.is_some()) {
            let at = now + RECLAIM_RETRY;
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        for e in &self.entries {
            if e.stall_reported {
                continue;
            }
            for c in &e.channels {
                if let Some(since) = c.full_since {
                    let at = since + self.stall_timeout;
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
        }
        next.map(|t| t.saturating_duration_since(now))
    }

    fn index_of(&self, id: WorkerId) -> Option<usize> {
        self.entries.iter().position(|e| e.id == id)
    }

    fn handle_commands(&mut self) {
        loop {
            let cmd = match self.commands.try_recv() {
                Ok(cmd) => cmd,
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    self.ending = true;
                    self.shutting_down.get_or_insert_with(Instant::now);
                    break;
                }
            };
            match cmd {
                Command::End => {
                    self.ending = true;
                    self.shutting_down.get_or_insert_with(Instant::now);
                }
                Command::Add {
                    id,
                    slot,
                    pid,
                    channels,
                    max_conns,
                } => self.add(id, slot, pid, channels, max_conns),
                Command::Ready(id) => {
                    // A worker that speaks the channel protocol is ready per channel; one that
                    // became ready otherwise takes connections on every listener.
                    if let Some(i) = self.index_of(id)
                        && !self.entries[i].channels.iter().any(|c| c.ready)
                    {
                        self.entries[i].ready_all = true;
                    }
                    self.set_state(id, State::Ready);
                }
                Command::Drain(id) => {
                    self.set_state(id, State::Draining);
                    self.reclaim(id);
                }
                Command::WhenIdle(id) => {
                    if let Some(i) = self.index_of(id) {
                        self.entries[i].idle_wanted = true;
                        self.check_idle(i);
                    }
                }
                Command::Remove(id) => {
                    // The worker is gone, and its channel lock with it (a process it left
                    // behind cannot keep what is queued: the entry goes now).
                    self.reclaim_from(id, false);
                    self.remove(id);
                }
                Command::Rss(samples) => {
                    for (id, kib) in samples {
                        if let Some(i) = self.index_of(id) {
                            self.stats[i].rss_kib = kib;
                        }
                    }
                }
                Command::Status => self.log_status(),
                Command::Probe { id, fd } => self.probe(id, fd),
                Command::Snapshot(reply) => {
                    let _ = reply.send(self.snapshot());
                }
                Command::SetPolicy(policy) => self.set_policy(policy),
                Command::ReadChannels(id) => {
                    if let Some(i) = self.index_of(id) {
                        for listener in 0..self.entries[i].channels.len() {
                            self.read_channel(id, listener);
                        }
                    }
                    self.emit(Event::ChannelsRead(id));
                }
                Command::Shutdown { drain_for } => {
                    let until = Instant::now() + drain_for;
                    self.shutting_down = Some(self.shutting_down.map_or(until, |t| t.min(until)));
                    // New connections are refused from now on rather than queued to nobody.
                    for l in &mut self.listeners {
                        let _ = self.poll.registry().deregister(l);
                    }
                    self.listeners.clear();
                    self.backlogged.clear();
                    // What was accepted still goes out if any worker can take it.
                    self.flush_all();
                    if !self.pending.is_empty() {
                        warn!(
                            "{} accepted connections had no worker to go to at shutdown",
                            self.pending.len()
                        );
                    }
                }
            }
        }
    }

    fn add(
        &mut self,
        id: WorkerId,
        slot: usize,
        pid: Pid,
        channels: Vec<ChannelEnds>,
        max_conns: Option<u64>,
    ) {
        let mut chans = Vec::with_capacity(channels.len());
        for (listener, ends) in channels.into_iter().enumerate() {
            if let Err(e) = sys::set_nonblocking(ends.master.as_fd(), true) {
                error!("worker {slot}: cannot make its channel non-blocking: {e}");
            }
            let raw = ends.master.as_raw_fd();
            let interest = if self.sweep_channels {
                Interest::WRITABLE
            } else {
                Interest::READABLE | Interest::WRITABLE
            };
            if let Err(e) = self.poll.registry().register(
                &mut SourceFd(&raw),
                channel_token(id, listener),
                interest,
            ) {
                error!("worker {slot}: cannot register its channel: {e}");
            }
            chans.push(Channel {
                ends,
                batch: SendBatch::with_capacity(SEND_BATCH),
                writable: true,
                full_since: None,
                ready: false,
                watch: QueueWatch::new(Instant::now()),
            });
        }
        self.entries.push(Entry {
            id,
            slot,
            pid,
            state: State::Starting,
            channels: chans,
            dispatched: 0,
            closed: 0,
            max_conns,
            stall_reported: false,
            idle_wanted: false,
            max_fds: 1,
            probes_open: 0,
            conduct: Conduct::default(),
            ready_all: false,
            full: false,
            full_log: LogLimiter::default(),
            reclaim_held_since: None,
            lock_log: LogLimiter::default(),
            last_placed: 0,
            last_sent: 0,
            pull: Pull::new(Instant::now()),
        });
        self.stats.push(WorkerStat::default());
        self.refresh_open();
    }

    /// Sends a probe connection straight to the worker (never through the policy or the
    /// pending queue, so it cannot go to another worker).
    fn probe(&mut self, id: WorkerId, fd: OwnedFd) {
        let Some(i) = self.index_of(id) else {
            return;
        };
        let entry = &mut self.entries[i];
        if entry.state != State::Ready || entry.channels.is_empty() {
            return;
        }
        let payload = ToWorker::Conn { seq: u64::MAX }.encode();
        match scm::sendmsg_fd(entry.channels[0].ends.master.as_fd(), &payload, fd.as_fd()) {
            Ok(()) => entry.probes_open += 1,
            Err(e) => debug!("worker {}: probe not sent: {e}", entry.slot),
        }
    }

    fn remove(&mut self, id: WorkerId) {
        let Some(i) = self.index_of(id) else {
            return;
        };
        let entry = self.entries.swap_remove(i);
        self.stats.swap_remove(i);
        for chan in &entry.channels {
            let raw = chan.ends.master.as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
            debug_assert!(chan.batch.is_empty(), "reclaim empties the batches first");
        }
        debug!(
            "worker {} (pid {}) removed: dispatched {} closed {}",
            entry.slot, entry.pid, entry.dispatched, entry.closed
        );
        self.refresh_open();
    }

    fn set_state(&mut self, id: WorkerId, state: State) {
        if let Some(i) = self.index_of(id) {
            // The lifecycle decides every transition, including Ready again after a worker's
            // STOPPING; the acceptor applies it.
            if state == State::Ready && self.entries[i].state != State::Ready {
                // Saying READY is proof of progress: a worker added by a scale-up or a reload
                // wins the next tie instead of waiting behind the others' fresher stamps
                // (which, at low concurrency, could leave it without a single connection).
                // The next connection's number, not the last one's: a worker that reported a
                // close since the last accept holds the last one's, and a tie with it would be
                // left to the rotation.
                self.stats[i].progress = self.stamp(self.seq.wrapping_add(1));
                self.stats[i].stuck = false;
                self.entries[i].pull.progress_at = Instant::now();
            }
            self.entries[i].state = state;
            self.refresh_open();
        }
    }

    /// Recomputes every worker's open bits. Dispatch goes to Ready workers; to Starting ones
    /// only while none is Ready (so connections queue in a starting worker's channel rather
    /// than the kernel backlog at startup).
    fn refresh_open(&mut self) {
        let any_ready = self.entries.iter().any(|e| e.state == State::Ready);
        for (e, s) in self.entries.iter().zip(self.stats.iter_mut()) {
            let eligible = !e.full
                && match e.state {
                    State::Ready => true,
                    State::Starting => !any_ready,
                    State::Draining => false,
                };
            let mut open = 0u64;
            if eligible {
                for (l, c) in e.channels.iter().enumerate() {
                    // A ready worker gets connections for the listeners it said READY on (or
                    // all, if it became ready by other means); a starting one for any.
                    let listening = e.state == State::Starting || e.ready_all || c.ready;
                    if c.writable && listening {
                        open |= 1 << l;
                    }
                }
            }
            s.open = open;
        }
    }

    fn read_channel(&mut self, id: WorkerId, listener: usize) {
        let Some(i) = self.index_of(id) else {
            return;
        };
        let mut buf = [0u8; HEADER_LEN + 1];
        let (mut ready, mut stopping, mut misbehaving) = (false, false, false);
        // Whether STOPPING came after the last READY in this read: a server that closes its
        // listener and listens again sends STOPPING then READY, and a master that reads both at
        // once must report them in that order (or it would leave a listening worker closed).
        let mut stopped_last = false;
        let mut closed_any = false;
        let stamp = self.stamp(self.seq);
        // FULL (with the connections it lost) or READY, whichever came last.
        let (mut full, mut resumed): (Option<u64>, bool) = (None, false);
        let entry = &mut self.entries[i];
        loop {
            let chan = &entry.channels[listener];
            match scm::recvmsg_fd(chan.ends.master.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
                // The master holds a duplicate of the worker's end, so EOF cannot happen while
                // the entry exists; treat it like "nothing more".
                Ok(got) if got.len == 0 && got.fd.is_none() => break,
                Ok(got) => {
                    let violation = if got.fd.is_some() {
                        Some("sent an fd to the master (closed it)".to_string())
                    } else {
                        None
                    };
                    let violation = violation.or(match ToMaster::decode(&buf[..got.len]) {
                        Ok(ToMaster::Closed { count }) => {
                            // Closes of health probes are paid first: probes are not traffic.
                            let probes = count.min(entry.probes_open);
                            entry.probes_open -= probes;
                            let count = count - probes;
                            match accounting::add_closed(entry.dispatched, entry.closed, count) {
                                Ok(closed) => {
                                    entry.closed = closed;
                                    closed_any = true;
                                    None
                                }
                                Err(clamped) => {
                                    let claimed = count;
                                    let (d, c) = (entry.dispatched, entry.closed);
                                    entry.closed = clamped;
                                    Some(format!(
                                        "CLOSED({claimed}) with {c} of {d} dispatched \
                                         connections already closed; counted as {}",
                                        clamped - c
                                    ))
                                }
                            }
                        }
                        Ok(ToMaster::Ready { max_fds }) => {
                            ready = true;
                            stopped_last = false;
                            full = None;
                            resumed = true;
                            entry.channels[listener].ready = true;
                            entry.max_fds = (max_fds as usize).clamp(1, MAX_FDS_PER_CONN);
                            None
                        }
                        Ok(ToMaster::Stopping) => {
                            stopping = true;
                            stopped_last = true;
                            None
                        }
                        Ok(ToMaster::Heartbeat) => None,
                        Ok(ToMaster::Full { lost }) => {
                            full = Some(lost);
                            resumed = false;
                            None
                        }
                        Err(e) => Some(format!("bad message on its channel: {e}")),
                    });
                    if let Some(what) = violation {
                        let r = entry.conduct.violation(Instant::now());
                        if let Some(suppressed) = r.log {
                            warn!(
                                "worker {} (pid {}): protocol violation: {what}{}",
                                entry.slot,
                                entry.pid,
                                if suppressed > 0 {
                                    format!(" ({suppressed} similar lines suppressed)")
                                } else {
                                    String::new()
                                }
                            );
                        }
                        misbehaving |= r.replace;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("worker {}: channel read failed: {e}", entry.slot);
                    break;
                }
            }
        }
        let active = entry.dispatched.saturating_sub(entry.closed);
        self.stats[i].active = active.min(u64::from(u32::MAX)) as u32;
        if closed_any {
            self.stats[i].progress = stamp;
            self.stats[i].stuck = false;
            self.entries[i].pull.progress_at = Instant::now();
            self.check_idle(i);
        }
        // Reported to the lifecycle, the single source of truth for the worker's state, which
        // answers with Ready (open) or Drain (close and reclaim). One shortcut: a worker still
        // held as Starting is opened at once, because from Starting the lifecycle always
        // answers READY with Ready; so by the time the master logs "ready", dispatch is on.
        let e = &mut self.entries[i];
        if let Some(lost) = full {
            // Out of fds: nothing more goes to it until its READY, and what waits in its
            // channel is served elsewhere.
            e.full = true;
            if let Verdict::Log { suppressed } = e.full_log.check(Instant::now()) {
                warn!(
                    "worker {} (pid {}) is out of file descriptors ({lost} connections lost \
                     on receipt): no dispatch to it until it takes again{}",
                    e.slot,
                    e.pid,
                    if suppressed > 0 {
                        format!(" ({suppressed} similar lines suppressed)")
                    } else {
                        String::new()
                    }
                );
            }
            self.refresh_open();
            self.reclaim(id);
        } else if resumed && e.full {
            e.full = false;
            if let Verdict::Log { .. } = e.full_log.check(Instant::now()) {
                info!("worker {} (pid {}) takes connections again", e.slot, e.pid);
            }
        }
        if stopping && !stopped_last {
            self.emit(Event::Stopping(id));
        }
        if ready {
            if self.entries[i].state == State::Starting {
                self.set_state(id, State::Ready);
            } else {
                // READY on one more channel, or again after FULL: open what it opened.
                self.refresh_open();
            }
            self.emit(Event::Ready(id));
        }
        if stopping && stopped_last {
            self.emit(Event::Stopping(id));
        }
        if misbehaving {
            warn!(
                "worker with id {id}: {} protocol violations; replacing it",
                accounting::VIOLATION_LIMIT
            );
            self.emit(Event::Misbehaving(id));
        }
    }

    fn channel_writable(&mut self, id: WorkerId, listener: usize) {
        let Some(i) = self.index_of(id) else {
            return;
        };
        let chan = &mut self.entries[i].channels[listener];
        if !chan.writable {
            chan.writable = true;
            chan.full_since = None;
            self.entries[i].stall_reported = false;
            self.refresh_open();
        }
    }

    /// [`Event::Idle`] for the worker at `i`, if [`Command::WhenIdle`] asked for it and every
    /// connection dispatched to it is closed or taken back.
    fn check_idle(&mut self, i: usize) {
        let e = &mut self.entries[i];
        if e.idle_wanted && e.dispatched <= e.closed {
            e.idle_wanted = false;
            let id = e.id;
            self.emit(Event::Idle(id));
        }
    }

    /// Takes back every connection still queued in the worker's channels (unread by the worker)
    /// and puts it first in line for another worker. Reading the worker's end while the worker
    /// lives is safe: each message is dequeued by exactly one reader, and the channel lock
    /// keeps the reclaim from taking a message between the two reads a worker near its fd
    /// limit makes (docs/PROTOCOL.md §2, FULL); a channel whose lock the worker holds is
    /// reclaimed on a later turn ([`Acceptor::retry_reclaims`]).
    fn reclaim(&mut self, id: WorkerId) {
        self.reclaim_from(id, true);
    }

    /// [`Acceptor::reclaim`], honouring the worker's channel lock (for up to
    /// [`RECLAIM_LOCK_WAIT`]) when `honour_lock`.
    fn reclaim_from(&mut self, id: WorkerId, honour_lock: bool) {
        let Some(i) = self.index_of(id) else {
            return;
        };
        let mut taken = Vec::new();
        let now = Instant::now();
        let entry = &mut self.entries[i];
        let (slot, pid) = (entry.slot, entry.pid);
        let waited_out = entry
            .reclaim_held_since
            .is_some_and(|since| now >= since + RECLAIM_LOCK_WAIT);
        let mut held = false;
        for (listener, chan) in entry.channels.iter_mut().enumerate() {
            // Anything still batched was never sent: take it back first, in order.
            while let Some((payload, fd)) = chan.batch.pop_unsent() {
                let seq = match ToWorker::decode(&payload) {
                    Ok(ToWorker::Conn { seq }) => seq,
                    _ => 0,
                };
                taken.push(Pending { listener, seq, fd });
            }
            let _lock = match sys::lock_channel(chan.ends.worker.as_fd(), false) {
                Ok(Some(lock)) => Some(lock),
                Ok(None) if honour_lock && !waited_out => {
                    held = true;
                    continue;
                }
                Ok(None) => {
                    if honour_lock && let Verdict::Log { suppressed } = entry.lock_log.check(now) {
                        warn!(
                            "worker {slot} (pid {pid}) held its channel lock for over \
                             {RECLAIM_LOCK_WAIT:?}: taking back what is queued without it{}",
                            if suppressed > 0 {
                                format!(" ({suppressed} similar lines suppressed)")
                            } else {
                                String::new()
                            }
                        );
                    }
                    None
                }
                Err(e) => {
                    debug!("worker {slot}: channel lock: {e}; reclaiming without it");
                    None
                }
            };
            let mut buf = [0u8; HEADER_LEN + 1];
            let mut fds = Vec::new();
            loop {
                fds.clear();
                match scm::recvmsg_fds(
                    chan.ends.worker.as_fd(),
                    &mut buf,
                    libc::MSG_DONTWAIT,
                    &mut fds,
                ) {
                    Ok(got) if got.len == 0 && fds.is_empty() => break,
                    Ok(got) => {
                        let first = match ToWorker::decode(&buf[..got.len]) {
                            Ok(ToWorker::Conn { seq }) => seq,
                            _ => 0,
                        };
                        for (i, fd) in fds.drain(..).enumerate() {
                            taken.push(Pending {
                                listener,
                                seq: first + i as u64,
                                fd,
                            });
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        warn!("reclaiming from worker {slot}: {e}");
                        break;
                    }
                }
            }
        }
        entry.reclaim_held_since = if held {
            entry.reclaim_held_since.or(Some(now))
        } else {
            None
        };
        if taken.is_empty() {
            return;
        }
        self.counters.reclaims += taken.len() as u64;
        let entry = &mut self.entries[i];
        entry.dispatched = entry.dispatched.saturating_sub(taken.len() as u64);
        self.stats[i].active = entry.dispatched.saturating_sub(entry.closed) as u32;
        self.stats[i].queued = 0;
        self.stats[i].stuck = false;
        entry.pull = Pull::new(Instant::now());
        info!(
            "reclaimed {} queued connections from worker {} (pid {})",
            taken.len(),
            entry.slot,
            entry.pid
        );
        self.emit(Event::Reclaimed(id, taken.len()));
        self.check_idle(i);
        for p in taken.into_iter().rev() {
            self.pending.push_front(p);
        }
    }

    /// Reclaims put off by a worker's channel lock, tried again while still wanted: the worker
    /// is still closed for dispatch (out of fds, or draining). One that became ready again
    /// takes what is queued itself.
    fn retry_reclaims(&mut self) {
        // Empty (no allocation) unless a reclaim was put off.
        let held: Vec<WorkerId> = self
            .entries
            .iter()
            .filter(|e| e.reclaim_held_since.is_some())
            .map(|e| e.id)
            .collect();
        for id in held {
            let Some(i) = self.index_of(id) else {
                continue;
            };
            let e = &mut self.entries[i];
            if e.full || e.state == State::Draining {
                self.reclaim(id);
            } else {
                e.reclaim_held_since = None;
            }
        }
    }

    /// Places waiting connections, oldest first, while some worker is open for them; returns
    /// how many were placed. A batch that filled up is sent by `place`; anything it could not
    /// send is back in `pending` and picked again by this loop.
    fn dispatch_pending(&mut self) -> usize {
        let mut placed = 0;
        // One pass over what waits: a connection for a listener no worker can take now stays,
        // the others go out.
        for _ in 0..self.pending.len() {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            match self.place(p) {
                Ok(()) => placed += 1,
                Err(p) => self.pending.push_back(p),
            }
        }
        placed
    }

    /// Picks a worker for `p` and queues it in that worker's batch. Gives `p` back if no worker
    /// is open for its listener.
    fn place(&mut self, p: Pending) -> Result<(), Pending> {
        let Some(i) = self.choose(p.listener) else {
            return Err(p);
        };
        let listener = p.listener;
        self.counters.dispatches += 1;
        let entry = &mut self.entries[i];
        if self.stats[i].queued == 0 {
            // Its channel was known empty: this connection starts the untaken clock, so a
            // worker that does not take it is found stuck at the first read STUCK_AFTER from
            // now, whenever that comes.
            entry.pull.progress_at = Instant::now();
            entry.pull.seen_untaken = 1;
            entry.pull.seen_taken = entry.dispatched;
        }
        entry.dispatched += 1;
        entry.last_placed = p.seq;
        self.stats[i].active = self.stats[i].active.saturating_add(1);
        self.stats[i].queued = self.stats[i].queued.saturating_add(1);
        let chan = &mut entry.channels[listener];
        let payload = ToWorker::Conn { seq: p.seq }.encode();
        if let Err((_, fd)) = chan.batch.push(payload, p.fd) {
            // Cannot happen: a full batch is flushed right after the push that filled it.
            unreachable!("batch full with fd {}", fd.as_raw_fd());
        }
        let full = chan.batch.is_full();
        let limit_reached = entry.max_conns == Some(entry.dispatched);
        let id = entry.id;
        if full {
            self.flush(i, listener);
        }
        if limit_reached {
            self.emit(Event::MaxConns(id));
        }
        Ok(())
    }

    /// Sends worker `i`'s batch for `listener`. Whatever the channel does not take goes back to
    /// the front of `pending` and the channel is closed for dispatch until it is writable.
    fn flush(&mut self, i: usize, listener: usize) {
        let entry = &mut self.entries[i];
        let chan = &mut entry.channels[listener];
        if chan.batch.is_empty() {
            return;
        }
        let result = chan.batch.send(chan.ends.master.as_fd(), entry.max_fds);
        if chan.batch.is_empty() {
            entry.last_sent = entry.last_placed;
            return;
        }
        match result {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => warn!("worker {}: sending connections failed: {e}", entry.slot),
        }
        chan.writable = false;
        chan.full_since.get_or_insert_with(Instant::now);
        let mut unsent = Vec::new();
        while let Some((payload, fd)) = chan.batch.pop_unsent() {
            let seq = match ToWorker::decode(&payload) {
                Ok(ToWorker::Conn { seq }) => seq,
                _ => 0,
            };
            unsent.push(Pending { listener, seq, fd });
        }
        entry.dispatched -= unsent.len() as u64;
        self.counters.bounces += unsent.len() as u64;
        self.stats[i].active = self.stats[i].active.saturating_sub(unsent.len() as u32);
        self.stats[i].queued = self.stats[i].queued.saturating_sub(unsent.len() as u32);
        for p in unsent.into_iter().rev() {
            self.pending.push_front(p);
        }
        self.refresh_open();
    }

    /// Sends every batch. Connections a full channel bounces are placed elsewhere and sent in
    /// the next round; each bounce closes a channel, so this ends, with every batch empty.
    fn flush_all(&mut self) {
        loop {
            for i in 0..self.entries.len() {
                for l in 0..self.entries[i].channels.len() {
                    self.flush(i, l);
                }
            }
            if self.pending.is_empty() || self.dispatch_pending() == 0 {
                return;
            }
        }
    }

    fn accept_all(&mut self) {
        if self.accept_paused_until.is_some() || !self.pending.is_empty() {
            return;
        }
        for l in 0..self.listeners.len() {
            let mut burst = 0;
            while self.backlogged[l] && burst < ACCEPT_BURST {
                // Accept only while some worker is open for this listener, so an accepted
                // connection always has somewhere to go (the kernel backlog holds the rest).
                if !self.stats.iter().any(|s| s.is_open(l)) {
                    return;
                }
                // Non-blocking, as the protocol promises workers (docs/PROTOCOL.md §2): an
                // event-loop server then needs no system call to set it.
                match sys::accept4(self.listeners[l].as_fd(), true) {
                    Ok(fd) => {
                        burst += 1;
                        self.counters.accepts += 1;
                        self.seq += 1;
                        if self.seq as u32 == 0 {
                            // Progress stamps are the counter's low 32 bits: restart them all.
                            for s in &mut self.stats {
                                s.progress = 0;
                            }
                        }
                        let p = Pending {
                            listener: l,
                            seq: self.seq,
                            fd,
                        };
                        if let Err(p) = self.place(p) {
                            self.pending.push_back(p);
                            return;
                        }
                        if !self.pending.is_empty() {
                            // A flush bounced connections back: they go first.
                            return;
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                        self.backlogged[l] = false;
                    }
                    Err(e) => {
                        self.counters.accept_errors += 1;
                        match e.raw_os_error() {
                            // The connection died in the queue, or a signal: next one.
                            Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO | libc::EPERM) => {
                            }
                            // Out of fds or memory: stop for a while instead of spinning on a
                            // level that stays readable (accept4(2), "EMFILE").
                            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                                warn!(
                                    "accept on listener {l}: {e}; pausing accepts for {ACCEPT_BACKOFF:?}"
                                );
                                self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                                self.counters.pauses += 1;
                                return;
                            }
                            _ => {
                                error!("accept on listener {l}: {e}");
                                self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                                self.counters.pauses += 1;
                                return;
                            }
                        }
                    }
                }
            }
        }
    }

    fn check_stalls(&mut self) {
        let now = Instant::now();
        let sample = now >= self.next_stall_sample;
        if sample {
            self.next_stall_sample = now + stall::sample_period(self.stall_timeout);
        }
        let mut stalled = Vec::new();
        for e in &mut self.entries {
            if e.stall_reported || e.state != State::Ready || e.full {
                // Only time spent ready counts: start afresh when it becomes ready again.
                if sample {
                    for c in &mut e.channels {
                        c.watch.reset(now);
                    }
                }
                continue;
            }
            let full = e
                .channels
                .iter()
                .any(|c| c.full_since.is_some_and(|t| now >= t + self.stall_timeout));
            // Queued bytes the worker has not read: a queue that does not go down for the
            // stall timeout belongs to a worker that stopped taking connections.
            let mut idle = false;
            if sample {
                for c in &mut e.channels {
                    let queued = sys::siocoutq(c.ends.master.as_fd()).unwrap_or(0) as u64;
                    idle |= c.watch.sample(queued, now, self.stall_timeout);
                }
            }
            if full || idle {
                e.stall_reported = true;
                warn!(
                    "worker {} (pid {}): took no connection from its channel for {:?}; it \
                     stopped accepting",
                    e.slot, e.pid, self.stall_timeout
                );
                stalled.push(e.id);
            }
        }
        for id in stalled {
            // Nothing more goes to it, and what waits for it is served by the others now,
            // while its replacement starts.
            self.set_state(id, State::Draining);
            self.reclaim(id);
            self.emit(Event::Stalled(id));
        }
    }

    /// A copy of the table and counters (the answer to [`Command::Snapshot`]).
    pub fn snapshot(&self) -> Snapshot {
        let workers = self
            .entries
            .iter()
            .zip(&self.stats)
            .map(|(e, s)| WorkerSnapshot {
                id: e.id,
                slot: e.slot,
                pid: e.pid,
                state: match e.state {
                    State::Starting => "starting",
                    State::Ready => "ready",
                    State::Draining => "draining",
                },
                dispatched: e.dispatched,
                closed: e.closed,
                active: s.active,
                rss_kib: s.rss_kib,
                stuck: s.stuck,
                open: s.open,
                max_fds: e.max_fds,
                channels: e
                    .channels
                    .iter()
                    .map(|c| ChannelSnapshot {
                        queued_bytes: sys::siocoutq(c.ends.master.as_fd()).ok(),
                        batched: c.batch.len(),
                        writable: c.writable,
                    })
                    .collect(),
            })
            .collect();
        Snapshot {
            counters: self.counters,
            workers,
            pending: self.pending.len(),
            paused: self.accept_paused_until.is_some(),
            listen_queues: self
                .listeners
                .iter()
                .map(|l| sys::listen_queue(l.as_fd()).ok())
                .collect(),
        }
    }

    /// Swaps the policy between two connections. Channels are registered for reading only when
    /// the policy reads active counts, so a switch across that line re-registers them.
    fn set_policy(&mut self, policy: Box<dyn Policy>) {
        let sweep = !policy.reads_active();
        self.fresh_signals = policy.reads_active();
        self.policy = policy;
        self.counters.policy_switches += 1;
        if sweep == self.sweep_channels {
            return;
        }
        self.sweep_channels = sweep;
        self.next_sweep = Instant::now();
        let interest = if sweep {
            Interest::WRITABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        for e in &self.entries {
            for (listener, c) in e.channels.iter().enumerate() {
                let raw = c.ends.master.as_raw_fd();
                if let Err(err) = self.poll.registry().reregister(
                    &mut SourceFd(&raw),
                    channel_token(e.id, listener),
                    interest,
                ) {
                    error!("worker {}: cannot re-register its channel: {err}", e.slot);
                }
            }
        }
        // Messages that arrived while the channels were not watched for reading are read now
        // (edge-triggered: no new event would report them).
        let channels: Vec<(WorkerId, usize)> = self
            .entries
            .iter()
            .flat_map(|e| (0..e.channels.len()).map(move |l| (e.id, l)))
            .collect();
        for (id, listener) in channels {
            self.read_channel(id, listener);
        }
    }

    fn log_status(&self) {
        for (e, s) in self.entries.iter().zip(&self.stats) {
            info!(
                "status: worker {} pid {} state {:?} active {} dispatched {} closed {} rss_kib {} stuck {}",
                e.slot, e.pid, e.state, s.active, e.dispatched, e.closed, s.rss_kib, s.stuck
            );
        }
        info!(
            "status: {} workers, {} connections waiting in the master",
            self.entries.len(),
            self.pending.len()
        );
    }
}

/// Fresh load signals at pick time (see the module docs).
impl Acceptor {
    /// The policy's choice for a connection from `listener`, checked against fresh figures
    /// when it was a tie with the runner-up; `None` if no worker is open for it.
    fn choose(&mut self, listener: usize) -> Option<usize> {
        let i = self.policy.pick(&self.stats, listener)?;
        if !self.fresh_signals || self.stats.len() < 2 {
            return Some(i);
        }
        // The runner-up: what the policy picks with `i` closed for a moment.
        let open = self.stats[i].open;
        self.stats[i].open = open & !(1u64 << listener);
        let runner_up = self.policy.pick(&self.stats, listener);
        self.stats[i].open = open;
        // The fresh fields only order workers with equal active counts (crate::policy's load
        // key), so they can change the answer only when the two tie on it.
        let Some(j) = runner_up.filter(|&j| self.stats[j].active == self.stats[i].active) else {
            return Some(i);
        };
        let changed = self.refresh(i) | self.refresh(j);
        if changed {
            self.policy.pick(&self.stats, listener)
        } else {
            Some(i)
        }
    }

    /// Re-reads how many of worker `i`'s connections are still untaken; `true` if its
    /// `queued`, `progress` or `stuck` changed. No system call when nothing was sent since the
    /// figure was last known (it is 0, or everything counted is still in the master's batch).
    ///
    /// Each read is also a sample of the worker's pull: it is stuck when the channel has held
    /// something untaken at every read for [`STUCK_AFTER`] and nothing was taken between them.
    /// The clock starts when a connection is placed on a channel known to be empty, or else at
    /// the first read that finds something untaken, so an idle worker that was just sent a
    /// connection is not stuck.
    fn refresh(&mut self, i: usize) -> bool {
        let (Some(entry), Some(stat)) = (self.entries.get(i), self.stats.get(i)) else {
            return false;
        };
        let batched: usize = entry.channels.iter().map(|c| c.batch.len()).sum();
        let queued = stat.queued as usize;
        if queued <= batched {
            self.entries[i].pull.seen_untaken = 0;
            return false;
        }
        let mut messages = 0usize;
        for c in &entry.channels {
            match sys::siocoutq(c.ends.master.as_fd()) {
                Ok(0) => {}
                // Unknown size per message: only "not empty", so the estimate stands.
                Ok(_) if self.outq_unit == 0 => return false,
                Ok(bytes) => messages += bytes.div_ceil(self.outq_unit),
                Err(_) => return false,
            }
        }
        let sent = queued - batched;
        let untaken = sent.min(messages.saturating_mul(entry.max_fds));
        let fresh = (batched + untaken).min(u32::MAX as usize) as u32;
        let progress = if untaken == 0 {
            self.stamp(entry.last_sent)
        } else {
            stat.progress
        };
        // Connections the worker has taken, ever: sent (placed minus still batched) minus
        // untaken. Probes are sent outside `dispatched`, hence saturating.
        let taken = entry
            .dispatched
            .saturating_sub(batched as u64)
            .saturating_sub(untaken as u64);
        let now = Instant::now();
        let pull = &mut self.entries[i].pull;
        if untaken == 0 || pull.seen_untaken == 0 || taken != pull.seen_taken {
            pull.progress_at = now;
        }
        pull.seen_untaken = untaken;
        pull.seen_taken = taken;
        let stuck = untaken > 0 && now.saturating_duration_since(pull.progress_at) >= STUCK_AFTER;
        let stat = &mut self.stats[i];
        let changed = fresh != stat.queued || progress != stat.progress || stuck != stat.stuck;
        stat.queued = fresh;
        stat.progress = progress;
        stat.stuck = stuck;
        changed
    }

    /// Once per wake-up, before accepting: re-reads the channel of every worker that may have
    /// something untaken, at most every [`PULL_LOOK`] per worker, so `stuck` is set on a worker
    /// that stopped pulling (and cleared on one that resumed) before the next picks. A
    /// `SIOCOUTQ` per such worker and look; none for workers known to have taken everything.
    fn mark_stuck(&mut self) {
        if !self.fresh_signals || self.stats.len() < 2 {
            return;
        }
        let now = Instant::now();
        for i in 0..self.entries.len() {
            let (entry, stat) = (&self.entries[i], &self.stats[i]);
            let batched: usize = entry.channels.iter().map(|c| c.batch.len()).sum();
            if (stat.queued as usize) <= batched || now < entry.pull.next_look {
                continue;
            }
            self.entries[i].pull.next_look = now + PULL_LOOK;
            self.refresh(i);
        }
    }

    /// The progress stamp of connection number `seq`: its low 32 bits, or 0 if it is from
    /// before the counter last wrapped them.
    fn stamp(&self, seq: u64) -> u32 {
        if seq >> 32 == self.seq >> 32 {
            seq as u32
        } else {
            0
        }
    }
}

/// Bytes `SIOCOUTQ` reports on a `SOCK_SEQPACKET` channel for one queued CONN message (its
/// kernel truesize: the same whatever the number of fds attached), measured once on a private
/// socketpair; 0 if it cannot be measured.
pub fn outq_unit() -> usize {
    let measure = || -> io::Result<usize> {
        let (a, b) = sys::socketpair_seqpacket()?;
        let payload = ToWorker::Conn { seq: 1 }.encode();
        scm::sendmsg_fd(a.as_fd(), &payload, b.as_fd())?;
        let one = sys::siocoutq(a.as_fd())?;
        scm::sendmsg_fd(a.as_fd(), &payload, b.as_fd())?;
        let two = sys::siocoutq(a.as_fd())?;
        // Two messages must cost twice one, or the figure is not a per-message size.
        Ok(if one > 0 && two == 2 * one { one } else { 0 })
    };
    match measure() {
        Ok(unit) => {
            debug!("channel queue: {unit} bytes per message");
            unit
        }
        Err(e) => {
            warn!("cannot measure the channel queue's size per message: {e}");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    //! The acceptor against real kernel objects (a loopback listener, socketpair channels) and a
    //! fake supervisor: it dispatches only where it was told, reclaims on Drain, reopens on
    //! Ready, and reports what workers say without acting on it.
    use super::*;
    use crate::policy::PolicyKind;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// Bound on every wait: a turn never blocks longer than its timeout.
    const DEADLINE: Duration = Duration::from_secs(10);

    struct Rig {
        acceptor: Acceptor,
        commands: Sender<Command>,
        events: Receiver<Event>,
        addr: std::net::SocketAddr,
        /// Each fake worker's end of its channel.
        workers: Vec<OwnedFd>,
        /// Connections received by each fake worker so far (kept open).
        received: Vec<Vec<OwnedFd>>,
        clients: Vec<TcpStream>,
        _supervisor_poll: Poll,
    }

    impl Rig {
        fn new(workers: usize, policy: PolicyKind) -> Rig {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let supervisor_poll = Poll::new().unwrap();
            let waker = Arc::new(Waker::new(supervisor_poll.registry(), Token(0)).unwrap());
            let (events_tx, events) = crossbeam_channel::unbounded();
            let (acceptor, commands, _) = Acceptor::new(
                AcceptorConfig {
                    listeners: vec![listener],
                    policy: policy.build().unwrap(),
                    cpu: None,
                    stall_timeout: Duration::from_secs(3600),
                },
                events_tx,
                waker,
            )
            .unwrap();
            let mut ends = Vec::new();
            for id in 0..workers as u64 {
                let (master, worker) = sys::socketpair_seqpacket().unwrap();
                let dup = worker.try_clone().unwrap();
                ends.push(worker);
                commands
                    .send(Command::Add {
                        id,
                        slot: id as usize,
                        pid: 0,
                        channels: vec![ChannelEnds {
                            master,
                            worker: dup,
                        }],
                        max_conns: None,
                    })
                    .unwrap();
            }
            let mut rig = Rig {
                acceptor,
                commands,
                events,
                addr,
                received: ends.iter().map(|_| Vec::new()).collect(),
                workers: ends,
                clients: Vec::new(),
                _supervisor_poll: supervisor_poll,
            };
            rig.turn();
            rig
        }

        fn turn(&mut self) {
            self.acceptor.turn(Some(Duration::from_millis(20))).unwrap();
        }

        fn command(&mut self, cmd: Command) {
            self.commands.send(cmd).unwrap();
            self.turn();
        }

        /// The fake worker `w` sends a message on its channel; turns until the acceptor has read
        /// it (policies that do not read active counts read channels every CHANNEL_SWEEP).
        fn say(&mut self, w: usize, msg: ToMaster) {
            scm::send(self.workers[w].as_fd(), &msg.encode(), 0).unwrap();
            let until = Instant::now() + 2 * CHANNEL_SWEEP;
            while Instant::now() < until {
                self.turn();
            }
        }

        /// Reads every CONN queued for each fake worker; returns how many each got now.
        fn take(&mut self) -> Vec<usize> {
            (0..self.workers.len()).map(|w| self.take_from(w)).collect()
        }

        /// Reads every CONN queued for fake worker `w`; returns how many it got now.
        fn take_from(&mut self, w: usize) -> usize {
            let mut got = 0;
            let mut buf = [0u8; HEADER_LEN];
            let mut fds = Vec::new();
            while let Ok(m) = scm::recvmsg_fds(
                self.workers[w].as_fd(),
                &mut buf,
                libc::MSG_DONTWAIT,
                &mut fds,
            ) {
                assert!(matches!(
                    ToWorker::decode(&buf[..m.len]),
                    Ok(ToWorker::Conn { .. })
                ));
                got += fds.len();
                self.received[w].append(&mut fds);
            }
            got
        }

        /// Connects `n` clients and turns until the master has dispatched them all; returns
        /// how many each worker received.
        fn connect(&mut self, n: usize) -> Vec<usize> {
            for _ in 0..n {
                self.clients.push(TcpStream::connect(self.addr).unwrap());
            }
            let deadline = Instant::now() + DEADLINE;
            let mut total = vec![0; self.workers.len()];
            while total.iter().sum::<usize>() < n {
                assert!(
                    Instant::now() < deadline,
                    "dispatched only {total:?} of {n}"
                );
                self.turn();
                for (t, g) in total.iter_mut().zip(self.take()) {
                    *t += g;
                }
            }
            total
        }

        /// Connects `n` more clients and turns until the master has accepted and queued them
        /// all, without the fake workers reading anything.
        fn connect_unread(&mut self, n: usize) {
            let until = self.acceptor.seq + n as u64;
            for _ in 0..n {
                self.clients.push(TcpStream::connect(self.addr).unwrap());
            }
            let deadline = Instant::now() + DEADLINE;
            while self.acceptor.seq < until {
                assert!(
                    Instant::now() < deadline,
                    "accepted {} of {until}",
                    self.acceptor.seq
                );
                self.turn();
            }
        }

        fn events(&self) -> Vec<Event> {
            self.events.try_iter().collect()
        }
    }

    #[test]
    fn dispatches_only_to_workers_it_was_told_are_ready() {
        let mut rig = Rig::new(2, PolicyKind::RoundRobin);
        rig.command(Command::Ready(1));
        assert_eq!(rig.connect(6), [0, 6], "worker 0 was never opened");
    }

    #[test]
    fn dispatched_connections_arrive_non_blocking() {
        let mut rig = Rig::new(2, PolicyKind::RoundRobin);
        assert_eq!(rig.connect(4), [2, 2]);
        for fd in rig.received.iter().flatten() {
            assert!(
                sys::is_nonblocking(fd.as_fd()).unwrap(),
                "docs/PROTOCOL.md §2"
            );
        }
    }

    #[test]
    fn starting_workers_take_connections_while_none_is_ready() {
        let mut rig = Rig::new(2, PolicyKind::RoundRobin);
        assert_eq!(rig.connect(4), [2, 2]);
    }

    #[test]
    fn drain_takes_back_what_is_queued_and_sends_it_elsewhere() {
        let mut rig = Rig::new(2, PolicyKind::RoundRobin);
        rig.command(Command::Ready(0));
        rig.command(Command::Ready(1));
        rig.connect_unread(4);
        rig.command(Command::Drain(0));
        assert_eq!(
            rig.take(),
            [0, 4],
            "worker 0's two queued connections moved to worker 1"
        );
        assert!(rig.events().contains(&Event::Reclaimed(0, 2)));
        assert_eq!(
            rig.connect(2),
            [0, 2],
            "nothing more goes to a drained worker"
        );
    }

    /// Two ready round-robin workers with two connections queued unread for each, and worker 0's
    /// channel lock held by another process until the holder drops.
    fn two_queued_for_each_with_worker_0_locked() -> (Rig, sys::testing::LockHolder) {
        let mut rig = Rig::new(2, PolicyKind::RoundRobin);
        rig.command(Command::Ready(0));
        rig.command(Command::Ready(1));
        rig.connect_unread(4);
        let holder = sys::testing::hold_channel_lock(rig.workers[0].as_fd()).unwrap();
        (rig, holder)
    }

    /// A worker in the middle of its two-step read near the fd limit holds its channel lock:
    /// a reclaim then waits (the worker's second read could otherwise get a message with no
    /// fd for it), takes everything back once the lock is free, and sends it elsewhere.
    #[test]
    fn a_reclaim_waits_while_the_worker_holds_its_channel_lock() {
        let (mut rig, holder) = two_queued_for_each_with_worker_0_locked();
        rig.say(0, ToMaster::Full { lost: 0 });
        assert!(
            !rig.events()
                .iter()
                .any(|e| matches!(e, Event::Reclaimed(..))),
            "reclaimed while the worker held its channel lock"
        );
        assert_eq!(rig.take_from(1), 2, "worker 1's own two");
        drop(holder);
        rig.turn();
        assert!(rig.events().contains(&Event::Reclaimed(0, 2)));
        assert_eq!(rig.take(), [0, 2], "worker 0's two went to worker 1");
    }

    /// A worker that keeps its channel lock does not keep what is queued for it: after
    /// RECLAIM_LOCK_WAIT it is taken back without the lock.
    #[test]
    fn a_worker_that_keeps_its_channel_lock_is_reclaimed_from_anyway() {
        let (mut rig, _holder) = two_queued_for_each_with_worker_0_locked();
        rig.command(Command::Drain(0));
        let deadline = Instant::now() + RECLAIM_LOCK_WAIT + DEADLINE;
        while !rig.events().contains(&Event::Reclaimed(0, 2)) {
            assert!(Instant::now() < deadline, "never reclaimed");
            rig.turn();
        }
        assert_eq!(rig.take(), [0, 4]);
    }

    /// A worker that is gone is reclaimed from at once, even if a process it left behind holds
    /// its channel lock: its entry goes with the command, and what stayed queued would be lost.
    #[test]
    fn a_removed_worker_is_reclaimed_from_whoever_holds_its_lock() {
        let (mut rig, _holder) = two_queued_for_each_with_worker_0_locked();
        rig.command(Command::Remove(0));
        assert!(rig.events().contains(&Event::Reclaimed(0, 2)));
        assert_eq!(rig.take_from(1), 4);
    }

    #[test]
    fn ready_after_drain_opens_the_worker_again() {
        let mut rig = Rig::new(2, PolicyKind::RoundRobin);
        rig.command(Command::Ready(0));
        rig.command(Command::Ready(1));
        rig.command(Command::Drain(0));
        rig.command(Command::Ready(0));
        assert_eq!(rig.connect(4), [2, 2]);
    }

    /// A server that closes its listener and listens again sends STOPPING then READY; read in
    /// one go they are reported in that order (the other way round, the lifecycle would see
    /// the worker stop last and leave it closed while it listens). READY then STOPPING stays
    /// in that order too.
    #[test]
    fn stopping_and_ready_read_together_are_reported_in_the_order_sent() {
        let mut rig = Rig::new(2, PolicyKind::RoundRobin);
        rig.command(Command::Ready(0));
        rig.command(Command::Ready(1));
        let worker0 = rig.workers[0].as_fd().try_clone_to_owned().unwrap();
        let fd = worker0.as_fd();
        scm::send(fd, &ToMaster::Stopping.encode(), 0).unwrap();
        scm::send(fd, &ToMaster::Ready { max_fds: 1 }.encode(), 0).unwrap();
        rig.say(1, ToMaster::Heartbeat);
        assert_eq!(rig.events(), [Event::Stopping(0), Event::Ready(0)]);
        scm::send(fd, &ToMaster::Ready { max_fds: 1 }.encode(), 0).unwrap();
        scm::send(fd, &ToMaster::Stopping.encode(), 0).unwrap();
        rig.say(1, ToMaster::Heartbeat);
        assert_eq!(rig.events(), [Event::Ready(0), Event::Stopping(0)]);
    }

    #[test]
    fn stopping_and_ready_from_a_worker_are_reported_not_decided() {
        let mut rig = Rig::new(2, PolicyKind::RoundRobin);
        rig.command(Command::Ready(0));
        rig.command(Command::Ready(1));
        rig.say(0, ToMaster::Stopping);
        assert_eq!(rig.events(), [Event::Stopping(0)]);
        assert_eq!(
            rig.connect(2),
            [1, 1],
            "still open until the supervisor says Drain"
        );
        rig.command(Command::Drain(0));
        rig.say(0, ToMaster::Ready { max_fds: 1 });
        assert_eq!(rig.events(), [Event::Ready(0)]);
        assert_eq!(
            rig.connect(2),
            [0, 2],
            "a drained worker stays closed until told"
        );
    }

    #[test]
    fn ready_on_the_channel_of_a_starting_worker_opens_it() {
        let mut rig = Rig::new(2, PolicyKind::RoundRobin);
        rig.say(1, ToMaster::Ready { max_fds: 1 });
        assert_eq!(rig.events(), [Event::Ready(1)]);
        assert_eq!(rig.connect(3), [0, 3]);
    }

    #[test]
    fn when_idle_is_reported_once_the_worker_holds_no_connection() {
        let mut rig = Rig::new(2, PolicyKind::LeastConn);
        rig.command(Command::Ready(0));
        // Worker 1 holds nothing: at once.
        rig.command(Command::WhenIdle(1));
        assert_eq!(rig.events(), [Event::Idle(1)]);
        // Worker 0 takes two connections and leaves a third in its channel, which the drain
        // takes back; then it closes the two, one at a time.
        assert_eq!(rig.connect(2), [2, 0]);
        rig.connect_unread(1);
        rig.command(Command::Drain(0));
        rig.command(Command::WhenIdle(0));
        assert_eq!(rig.events(), [Event::Reclaimed(0, 1)]);
        rig.say(0, ToMaster::Closed { count: 1 });
        assert_eq!(rig.events(), []);
        rig.say(0, ToMaster::Closed { count: 1 });
        assert_eq!(rig.events(), [Event::Idle(0)]);
        // Once.
        rig.turn();
        assert_eq!(rig.events(), []);
    }

    #[test]
    fn closed_counts_bring_least_conn_back_to_the_idle_worker() {
        let mut rig = Rig::new(2, PolicyKind::LeastConn);
        rig.command(Command::Ready(0));
        rig.command(Command::Ready(1));
        assert_eq!(rig.connect(2), [1, 1]);
        // Worker 0 finishes its connection; worker 1 keeps its own.
        rig.received[0].clear();
        rig.say(0, ToMaster::Closed { count: 1 });
        assert_eq!(rig.connect(1), [1, 0]);
    }

    #[test]
    fn a_worker_that_stops_pulling_is_passed_over_whatever_the_counts() {
        let mut rig = Rig::new(2, PolicyKind::LeastConn);
        rig.command(Command::Ready(0));
        rig.command(Command::Ready(1));
        assert_eq!(rig.connect(4), [2, 2]);
        // Worker 1 finishes both of its connections, then stops pulling (a single-threaded
        // server inside a long request): the next connection, which least-conn gives it (0
        // active against 2), stays untaken.
        rig.say(1, ToMaster::Closed { count: 2 });
        rig.connect_unread(1);
        assert_eq!(rig.acceptor.seq, 5);
        assert!(!rig.acceptor.stats[1].stuck);
        // Reads of its channel at least STUCK_AFTER apart find it still untaken.
        for _ in 0..3 {
            std::thread::sleep(STUCK_AFTER * 2);
            rig.turn();
        }
        assert!(rig.acceptor.stats[1].stuck, "{:?}", rig.acceptor.stats);
        // Now worker 0, which keeps pulling, gets every new connection although it holds more.
        for _ in 0..3 {
            rig.clients.push(TcpStream::connect(rig.addr).unwrap());
        }
        let deadline = Instant::now() + DEADLINE;
        let mut to_0 = 0;
        while rig.acceptor.seq < 8 {
            assert!(Instant::now() < deadline, "accepted {}", rig.acceptor.seq);
            rig.turn();
            to_0 += rig.take_from(0);
        }
        assert_eq!((to_0 + rig.take_from(0), rig.take_from(1)), (3, 1));
        // Worker 1 took its connection (above): it is back once its channel is read empty.
        std::thread::sleep(PULL_LOOK * 2);
        rig.turn();
        assert!(!rig.acceptor.stats[1].stuck);
        assert_eq!(rig.connect(1), [0, 1]);
    }

    /// A worker that becomes ready (a scale-up, a reload) gets the next connection under
    /// least-conn even when the others have just reported closes: their progress stamps are as
    /// fresh as a stamp can be, so READY's must be fresher, or the tie rotates past the new
    /// worker and, at low concurrency, it may never get a connection at all.
    #[test]
    fn a_worker_that_becomes_ready_wins_the_next_tie() {
        let mut rig = Rig::new(3, PolicyKind::LeastConn);
        rig.command(Command::Ready(0));
        rig.command(Command::Ready(1));
        assert_eq!(rig.connect(1), [1, 0, 0]);
        assert_eq!(rig.connect(1), [0, 1, 0]);
        rig.say(0, ToMaster::Closed { count: 1 });
        assert_eq!(rig.connect(1), [1, 0, 0]);
        // Both close after the last accept: their stamps are the newest connection's.
        rig.say(1, ToMaster::Closed { count: 1 });
        rig.say(0, ToMaster::Closed { count: 1 });
        rig.command(Command::Ready(2));
        let stats = &rig.acceptor.stats;
        assert!(
            stats[2].progress > stats[0].progress.max(stats[1].progress),
            "READY must beat every stamp, whatever the rotation: {stats:?}"
        );
        assert_eq!(rig.connect(1), [0, 0, 1]);
    }

    #[test]
    fn a_worker_that_takes_what_it_is_sent_is_never_stuck() {
        let mut rig = Rig::new(2, PolicyKind::LeastConn);
        rig.command(Command::Ready(0));
        rig.command(Command::Ready(1));
        // Long idle periods between connections that the workers take at once: the figures the
        // acceptor holds say "maybe untaken" until it reads the channels, and those reads must
        // find progress, not a worker that has been idle since its last report.
        for _ in 0..4 {
            std::thread::sleep(STUCK_AFTER * 3);
            rig.connect(1);
            std::thread::sleep(STUCK_AFTER * 3);
            rig.turn();
            assert!(
                rig.acceptor.stats.iter().all(|s| !s.stuck),
                "{:?}",
                rig.acceptor.stats
            );
        }
    }

    /// A worker that stops reading fills its channel; the acceptor keeps what does not fit and
    /// stops accepting, then, woken by the channel's write space once the worker reads, sends
    /// the rest: nothing lost, whether the policy reads the channels on events or on a timer.
    #[test]
    fn a_full_channel_takes_connections_again_once_read() {
        for policy in [PolicyKind::LeastConn, PolicyKind::RoundRobin] {
            let mut rig = Rig::new(1, policy);
            rig.command(Command::Ready(0));
            // More than a channel holds (about 278 messages with default buffers).
            let n = 320;
            for _ in 0..n {
                rig.clients.push(TcpStream::connect(rig.addr).unwrap());
                rig.turn();
            }
            assert!(
                !rig.acceptor.entries[0].channels[0].writable,
                "{policy}: the channel never filled"
            );
            let deadline = Instant::now() + DEADLINE;
            let mut got = 0;
            while got < n {
                assert!(Instant::now() < deadline, "{policy}: {got} of {n} arrived");
                got += rig.take_from(0);
                rig.turn();
            }
            assert!(rig.acceptor.entries[0].channels[0].writable, "{policy}");
        }
    }

    #[test]
    fn a_probe_goes_to_its_worker_and_never_counts_as_traffic() {
        let mut rig = Rig::new(2, PolicyKind::LeastConn);
        rig.command(Command::Ready(0));
        rig.command(Command::Ready(1));
        // Probe worker 0 twice: it gets both, whatever the policy would say.
        for _ in 0..2 {
            let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
            rig.command(Command::Probe {
                id: 0,
                fd: OwnedFd::from(a),
            });
        }
        assert_eq!(rig.take(), [2, 0]);
        assert_eq!(rig.acceptor.entries[0].dispatched, 0, "not user traffic");
        // Its CLOSED for the probes pays the probes, not the user counts.
        rig.say(0, ToMaster::Closed { count: 2 });
        assert_eq!(rig.acceptor.entries[0].closed, 0);
        assert_eq!(rig.acceptor.entries[0].probes_open, 0);
        // A worker that is not open gets no probe.
        rig.command(Command::Drain(1));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        rig.command(Command::Probe {
            id: 1,
            fd: OwnedFd::from(a),
        });
        assert_eq!(rig.take(), [0, 0]);
        // Least-conn still sees two idle workers' worth of user counts: both at zero.
        assert_eq!(rig.connect(1), [1, 0]);
    }
}
