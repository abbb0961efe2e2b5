//! The load generator the end-to-end benchmarks drive: HTTP/1.1 requests against a loopback
//! target in open-loop, closed-loop or keep-alive mode, reporting latency, errors by kind and
//! each worker's share.
//!
//! Ownership and threads: [`LoadSpec::run`] runs on the calling thread plus `threads - 1` scoped
//! threads; each thread owns one mio [`Poll`] and every client socket it opens, and closes them
//! all before it returns. Nothing outlives a run.
//!
//! Measurement rules:
//! - Open loop: request `i` is *intended* to start at `start + i / rate`; its latency runs from
//!   that instant, not from when the generator got round to connecting, so a stalled server or a
//!   late generator shows up in the percentiles instead of being hidden (no coordinated
//!   omission). [`Report::max_start_lag`] says how late the generator itself ran. An arrival
//!   that falls due while the loop handles events is sent as soon as the event in hand is
//!   done, and a wait for the next one ends on a timer fd at the instant, not on epoll's
//!   timeout, which has millisecond resolution and would send arrivals less than 1 ms apart
//!   in bunches.
//! - Closed loop and keep-alive: latency runs from the request's start (keep-alive: from its
//!   scheduled send time).
//! - Every run is bounded by [`LoadSpec::duration`] (issuing stops then; what is in flight gets
//!   at most [`LoadSpec::request_timeout`] more) and optionally by [`LoadSpec::max_requests`].
//! - Latencies are recorded in microseconds in an hdrhistogram with 3 significant digits.
//!
//! The request sequence comes from a [`Mix`] and a seed through a counter-based hash
//! (SplitMix64), so request `i` of a run (or of a closed-loop client) gets the same query in
//! every run with the same seed, whatever the thread count or timing.
//!
//! [`wrk`] runs the `wrk` tool against the same kind of target, as a cross-check of the
//! closed-loop churn numbers.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

pub mod wrk;

/// Largest latency the histogram tells apart, in µs (larger values are clamped): 10 minutes.
pub const LATENCY_MAX_US: u64 = 600_000_000;

/// Longest run a [`LoadSpec`] may ask for.
pub const MAX_RUN_DURATION: Duration = Duration::from_secs(3600);

/// How long after the end of issuing a run force-closes whatever is still open, beyond one
/// request timeout (covers a timer that could not fire because of a stuck poll).
const HARD_STOP_GRACE: Duration = Duration::from_secs(1);
/// The poll token of a shard's wake timer (connection slots count up from 0).
const TIMER: Token = Token(usize::MAX);
/// Waits shorter than this end on the wake timer; longer ones (request timeouts) on epoll's
/// own timeout, whose up-to-1-ms lateness does not matter there and costs no system call.
const PRECISE_WAKE_WITHIN: Duration = Duration::from_millis(50);

/// Bytes read per `read(2)` call.
const READ_CHUNK_BYTES: usize = 8192;

/// A response head larger than this is rejected as invalid.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Why a run could not start or failed as a whole (individual request failures are counted in
/// the [`Report`], not returned).
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// The target is not a loopback address; the generator never sends load elsewhere.
    #[error("refusing target {0}: the load generator only drives loopback addresses")]
    NotLoopback(SocketAddr),
    /// The mix spec could not be parsed.
    #[error("invalid mix spec {spec:?}: {reason}")]
    InvalidMix {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A field of the [`LoadSpec`] is out of range.
    #[error("invalid load spec: {0}")]
    InvalidSpec(&'static str),
    /// The event loop itself failed (creating or polling the epoll instance).
    #[error("load generator event loop failed")]
    Io(#[from] io::Error),
}

// ---------------------------------------------------------------------------------------------
// Request mix and the seeded sequence.

/// One line of a [`Mix`]: a query string and its weight in percent.
#[derive(Debug, Clone, PartialEq)]
pub struct MixEntry {
    /// Weight in percent; the weights of a mix add up to 100.
    pub percent: f64,
    /// The query string without the `?` (may be empty: no query).
    pub query: String,
}

/// A weighted mix of query strings, parsed from a spec such as `"98% us=200, 2% us=20000"`.
///
/// Syntax: comma-separated entries `P% QUERY`; the percentages must add up to 100. A spec with
/// a single entry may leave out the percentage (`"us=200"`), and the empty spec is one entry
/// with no query.
#[derive(Debug, Clone, PartialEq)]
pub struct Mix {
    entries: Vec<MixEntry>,
    /// Running sums of the weights, for picking by a uniform draw.
    cumulative: Vec<f64>,
}

impl Mix {
    /// The mix of one query (always the same request).
    pub fn single(query: &str) -> Result<Mix, LoadgenError> {
        query.parse()
    }

    /// The entries in spec order.
    pub fn entries(&self) -> &[MixEntry] {
        &self.entries
    }

    /// Which entry request `index` of `stream` uses for `seed`. Streams are independent
    /// sequences (the open loop uses stream 0, closed-loop and keep-alive client `c` uses
    /// stream `c + 1`).
    pub fn pick(&self, seed: u64, stream: u64, index: u64) -> usize {
        let draw = unit_interval(seeded_draw(seed, stream, index));
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let x = draw * total;
        self.cumulative
            .iter()
            .position(|&c| x < c)
            .unwrap_or(self.entries.len() - 1)
    }

    /// The query strings of stream 0 for `seed`, in request order.
    pub fn sequence(&self, seed: u64) -> RequestSeq<'_> {
        RequestSeq {
            mix: self,
            seed,
            stream: 0,
            next: 0,
        }
    }

    /// The weighted mean of `value(query)` over the entries (e.g. the mean `us=` of a mix);
    /// entries for which `value` is `None` count as 0.
    pub fn weighted_mean(&self, value: impl Fn(&str) -> Option<f64>) -> f64 {
        let total: f64 = self.entries.iter().map(|e| e.percent).sum();
        self.entries
            .iter()
            .map(|e| e.percent * value(&e.query).unwrap_or(0.0))
            .sum::<f64>()
            / total
    }
}

impl Default for Mix {
    /// One entry, no query.
    fn default() -> Self {
        Mix {
            entries: vec![MixEntry {
                percent: 100.0,
                query: String::new(),
            }],
            cumulative: vec![100.0],
        }
    }
}

impl FromStr for Mix {
    type Err = LoadgenError;

    fn from_str(spec: &str) -> Result<Mix, LoadgenError> {
        let invalid = |reason: String| LoadgenError::InvalidMix {
            spec: spec.to_owned(),
            reason,
        };
        if spec.trim().is_empty() {
            return Ok(Mix::default());
        }
        let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
        let mut entries = Vec::with_capacity(parts.len());
        for part in &parts {
            let (percent, query) = match part.split_once('%') {
                Some((p, q)) => {
                    let p: f64 = p
                        .trim()
                        .parse()
                        .map_err(|_| invalid(format!("bad percentage in {part:?}")))?;
                    (p, q.trim())
                }
                None if parts.len() == 1 => (100.0, *part),
                None => return Err(invalid(format!("entry {part:?} has no percentage"))),
            };
            if !(percent.is_finite() && percent > 0.0) {
                return Err(invalid(format!("weight of {part:?} must be positive")));
            }
            let query = query.strip_prefix('?').unwrap_or(query);
            if let Some(c) = query.chars().find(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(format!("query {query:?} contains {c:?}")));
            }
            entries.push(MixEntry {
                percent,
                query: query.to_owned(),
            });
        }
        let total: f64 = entries.iter().map(|e| e.percent).sum();
        if (total - 100.0).abs() > 0.01 {
            return Err(invalid(format!("percentages add up to {total}, not 100")));
        }
        let cumulative = entries
            .iter()
            .scan(0.0, |sum, e| {
                *sum += e.percent;
                Some(*sum)
            })
            .collect();
        Ok(Mix {
            entries,
            cumulative,
        })
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}% {}", e.percent, e.query)?;
        }
        Ok(())
    }
}

/// The query strings of one stream of a [`Mix`] for one seed (an endless iterator).
#[derive(Debug, Clone)]
pub struct RequestSeq<'a> {
    mix: &'a Mix,
    seed: u64,
    stream: u64,
    next: u64,
}

impl<'a> Iterator for RequestSeq<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let entry = self.mix.pick(self.seed, self.stream, self.next);
        self.next += 1;
        Some(&self.mix.entries[entry].query)
    }
}

/// SplitMix64's output function (Steele, Lea, Flood 2014): a bijective mixer of a 64-bit
/// counter, good enough for picking requests and free of state.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `index`-th pseudo-random word of `stream` under `seed`.
fn seeded_draw(seed: u64, stream: u64, index: u64) -> u64 {
    let key = splitmix64(seed ^ splitmix64(stream));
    splitmix64(key.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
}

/// A word mapped to [0, 1) with 53 bits of precision.
fn unit_interval(word: u64) -> f64 {
    (word >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

// ---------------------------------------------------------------------------------------------
// What to run.

/// The shape of the load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// Open loop: a new connection per request at a constant arrival rate, whatever the
    /// responses do; latency from each request's intended start.
    Open {
        /// Requests per second.
        rate_per_s: f64,
    },
    /// Closed loop: `clients` concurrent clients, each opening a new connection per request
    /// and starting the next one as soon as a response (or error) is in: the connection-rate
    /// ceiling.
    Closed {
        /// Concurrent clients.
        clients: usize,
    },
    /// Keep-alive: `clients` long-lived connections, each sending its requests on the one
    /// connection, the next one `interval` after the previous one was scheduled (or right
    /// after the response, whichever is later; zero = back to back). Client `c` of `n` first
    /// connects at `c × interval / n`, so that the requests are spread over the interval rather
    /// than sent in bursts. A connection the server closes is reopened.
    KeepAlive {
        /// Concurrent connections.
        clients: usize,
        /// Time between the scheduled sends of one connection.
        interval: Duration,
    },
}

impl Load {
    /// Whether each request uses a fresh connection (`Connection: close`).
    fn closes(self) -> bool {
        !matches!(self, Load::KeepAlive { .. })
    }
}

/// A complete description of one run. Build with [`LoadSpec::new`] and adjust the public
/// fields.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Where to send load; must be a loopback address.
    pub target: SocketAddr,
    /// Open, closed or keep-alive.
    pub load: Load,
    /// The request path without the leading `/` (e.g. `""` or `"api/x"`).
    pub path: String,
    /// Query strings and their weights.
    pub mix: Mix,
    /// Seed of the request sequence.
    pub seed: u64,
    /// How long requests are issued.
    pub duration: Duration,
    /// At most this many requests are issued (`u64::MAX`: bounded by `duration` alone).
    pub max_requests: u64,
    /// A request that has no complete response this long after it started counts as a
    /// timeout.
    pub request_timeout: Duration,
    /// Open loop: at most this many requests outstanding at once; an arrival beyond it waits
    /// (and its wait counts in its latency).
    pub max_in_flight: usize,
    /// Event-loop threads; the load is split evenly between them.
    pub threads: usize,
}

impl LoadSpec {
    /// A spec with defaults: empty path, no query, seed 1, 10 s, no count bound, 5 s request
    /// timeout, 4096 in flight, one thread.
    pub fn new(target: SocketAddr, load: Load) -> LoadSpec {
        LoadSpec {
            target,
            load,
            path: String::new(),
            mix: Mix::default(),
            seed: 1,
            duration: Duration::from_secs(10),
            max_requests: u64::MAX,
            request_timeout: Duration::from_secs(5),
            max_in_flight: 4096,
            threads: 1,
        }
    }

    /// Checks the spec; every run does this first.
    pub fn validate(&self) -> Result<(), LoadgenError> {
        if !self.target.ip().is_loopback() {
            return Err(LoadgenError::NotLoopback(self.target));
        }
        match self.load {
            Load::Open { rate_per_s } if !(rate_per_s.is_finite() && rate_per_s > 0.0) => {
                return Err(LoadgenError::InvalidSpec("rate must be positive"));
            }
            Load::Closed { clients } | Load::KeepAlive { clients, .. } if clients == 0 => {
                return Err(LoadgenError::InvalidSpec("at least one client is needed"));
            }
            _ => {}
        }
        if self.duration.is_zero() || self.duration > MAX_RUN_DURATION {
            return Err(LoadgenError::InvalidSpec("duration must be in (0, 1 h]"));
        }
        if self.request_timeout.is_zero() || self.request_timeout > MAX_RUN_DURATION {
            return Err(LoadgenError::InvalidSpec(
                "request timeout must be in (0, 1 h]",
            ));
        }
        if self.max_in_flight == 0 || self.threads == 0 {
            return Err(LoadgenError::InvalidSpec(
                "max_in_flight and threads must be at least 1",
            ));
        }
        if self
            .path
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '?')
        {
            return Err(LoadgenError::InvalidSpec(
                "path must not contain whitespace, control characters or '?'",
            ));
        }
        Ok(())
    }

    /// Runs the load and returns what was measured. Blocks for about `duration` (plus up to
    /// one request timeout for what is still in flight).
    pub fn run(&self) -> Result<Report, LoadgenError> {
        self.validate()?;
        let requests = self.request_bytes();
        let start = Instant::now();
        let shards = self.threads;
        let mut reports = Vec::with_capacity(shards);
        std::thread::scope(|scope| -> Result<(), LoadgenError> {
            let handles: Vec<_> = (1..shards)
                .map(|s| {
                    let requests = &requests;
                    scope.spawn(move || Shard::new(self, requests, s, start)?.run())
                })
                .collect();
            reports.push(Shard::new(self, &requests, 0, start)?.run()?);
            for h in handles {
                let r = h
                    .join()
                    .map_err(|_| io::Error::other("a load generator thread panicked"))??;
                reports.push(r);
            }
            Ok(())
        })?;
        let mut total = Report::empty(self.load);
        for r in &reports {
            total.merge(r);
        }
        Ok(total)
    }

    /// The request bytes for each mix entry.
    fn request_bytes(&self) -> Vec<Vec<u8>> {
        let connection = if self.load.closes() {
            "close"
        } else {
            "keep-alive"
        };
        let path = self.path.trim_start_matches('/');
        self.mix
            .entries
            .iter()
            .map(|e| {
                let sep = if e.query.is_empty() { "" } else { "?" };
                format!(
                    "GET /{path}{sep}{} HTTP/1.1\r\nHost: {}\r\nUser-Agent: rcluster-lb-loadgen\r\nConnection: {connection}\r\n\r\n",
                    e.query, self.target
                )
                .into_bytes()
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// What was measured.

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// The connection was refused (`ECONNREFUSED`).
    Refused,
    /// The connection was reset (`ECONNRESET`, `EPIPE`, `ECONNABORTED`).
    Reset,
    /// No complete response within the request timeout.
    Timeout,
    /// The server closed the connection before a complete response.
    Eof,
    /// Anything else (`EADDRNOTAVAIL`, `EMFILE`, an unparsable response, …).
    Other,
}

impl ErrorKind {
    /// Every kind, in report order.
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::Refused,
        ErrorKind::Reset,
        ErrorKind::Timeout,
        ErrorKind::Eof,
        ErrorKind::Other,
    ];

    /// Classifies a socket error.
    pub fn of(err: &io::Error) -> ErrorKind {
        match err.kind() {
            io::ErrorKind::ConnectionRefused => ErrorKind::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => ErrorKind::Reset,
            io::ErrorKind::TimedOut => ErrorKind::Timeout,
            io::ErrorKind::UnexpectedEof => ErrorKind::Eof,
            _ => ErrorKind::Other,
        }
    }

    /// A short lowercase name (`refused`).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Refused => "refused",
            ErrorKind::Reset => "reset",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Eof => "eof",
            ErrorKind::Other => "other",
        }
    }
}

/// Failed requests, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    /// `ECONNREFUSED`.
    pub refused: u64,
    /// `ECONNRESET` / `EPIPE`.
    pub reset: u64,
    /// No complete response in time.
    pub timeout: u64,
    /// Closed before a complete response.
    pub eof: u64,
    /// Anything else.
    pub other: u64,
}

impl ErrorCounts {
    /// The count of one kind.
    pub fn get(&self, kind: ErrorKind) -> u64 {
        match kind {
            ErrorKind::Refused => self.refused,
            ErrorKind::Reset => self.reset,
            ErrorKind::Timeout => self.timeout,
            ErrorKind::Eof => self.eof,
            ErrorKind::Other => self.other,
        }
    }

    /// Counts one failure.
    pub fn add(&mut self, kind: ErrorKind) {
        match kind {
            ErrorKind::Refused => self.refused += 1,
            ErrorKind::Reset => self.reset += 1,
            ErrorKind::Timeout => self.timeout += 1,
            ErrorKind::Eof => self.eof += 1,
            ErrorKind::Other => self.other += 1,
        }
    }

    /// All failures.
    pub fn total(&self) -> u64 {
        self.refused + self.reset + self.timeout + self.eof + self.other
    }

    fn merge(&mut self, other: &ErrorCounts) {
        self.refused += other.refused;
        self.reset += other.reset;
        self.timeout += other.timeout;
        self.eof += other.eof;
        self.other += other.other;
    }
}

impl fmt::Display for ErrorCounts {
    /// `refused=0 reset=1 timeout=0 eof=0 other=0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, kind) in ErrorKind::ALL.into_iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{}={}", kind.name(), self.get(kind))?;
        }
        Ok(())
    }
}

/// What one run measured. Every issued request ends up either `completed` or in `errors`:
/// `sent == completed + errors.total()`.
#[derive(Debug, Clone)]
pub struct Report {
    /// The load that was run.
    pub load: Load,
    /// Requests issued.
    pub sent: u64,
    /// Requests with a complete HTTP response (any status).
    pub completed: u64,
    /// Completed requests whose status was not 200.
    pub non_200: u64,
    /// Failed requests by kind.
    pub errors: ErrorCounts,
    /// Connections established.
    pub connections: u64,
    /// From the start of the run to the last response or failure.
    pub duration: Duration,
    /// Latency of completed requests, µs.
    pub latency_us: Histogram<u64>,
    /// Open loop: the most any request started after its intended instant (how far the
    /// generator fell behind its schedule; that delay is inside the latencies).
    pub max_start_lag: Duration,
    /// Responses per `X-Worker-Id`.
    pub responses_per_worker: BTreeMap<u32, u64>,
    /// Responses per `X-Worker-Pid`.
    pub responses_per_pid: BTreeMap<u32, u64>,
    /// Connections per worker id, by the `X-Worker-Id` of each connection's first response.
    pub connections_per_worker: BTreeMap<u32, u64>,
}

impl Report {
    fn empty(load: Load) -> Report {
        Report {
            load,
            sent: 0,
            completed: 0,
            non_200: 0,
            errors: ErrorCounts::default(),
            connections: 0,
            duration: Duration::ZERO,
            latency_us: Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)
                .expect("static histogram bounds are valid"),
            max_start_lag: Duration::ZERO,
            responses_per_worker: BTreeMap::new(),
            responses_per_pid: BTreeMap::new(),
            connections_per_worker: BTreeMap::new(),
        }
    }

    /// Adds `other`'s counts and latencies to this report (the run of several shards, or the
    /// runs of several rounds pooled).
    pub fn merge(&mut self, other: &Report) {
        self.sent += other.sent;
        self.completed += other.completed;
        self.non_200 += other.non_200;
        self.errors.merge(&other.errors);
        self.connections += other.connections;
        self.duration = self.duration.max(other.duration);
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms share bounds");
        self.max_start_lag = self.max_start_lag.max(other.max_start_lag);
        for (dst, src) in [
            (&mut self.responses_per_worker, &other.responses_per_worker),
            (&mut self.responses_per_pid, &other.responses_per_pid),
            (
                &mut self.connections_per_worker,
                &other.connections_per_worker,
            ),
        ] {
            for (k, v) in src {
                *dst.entry(*k).or_default() += v;
            }
        }
    }

    /// Completed requests per second over [`Report::duration`].
    pub fn throughput(&self) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs > 0.0 {
            self.completed as f64 / secs
        } else {
            0.0
        }
    }

    /// The latency at quantile `q` (0..=1), µs; 0 when nothing completed.
    pub fn quantile_us(&self, q: f64) -> u64 {
        self.latency_us.value_at_quantile(q)
    }

    /// Median latency, µs.
    pub fn p50_us(&self) -> u64 {
        self.quantile_us(0.50)
    }

    /// 90th percentile latency, µs.
    pub fn p90_us(&self) -> u64 {
        self.quantile_us(0.90)
    }

    /// 99th percentile latency, µs.
    pub fn p99_us(&self) -> u64 {
        self.quantile_us(0.99)
    }

    /// 99.9th percentile latency, µs.
    pub fn p999_us(&self) -> u64 {
        self.quantile_us(0.999)
    }

    /// Largest latency, µs.
    pub fn max_us(&self) -> u64 {
        self.latency_us.max()
    }

    /// Responses per worker as a vector: ids `0..workers` (0 where a worker got none), then
    /// any other id seen, in id order. `workers = 0`: only the ids seen.
    pub fn worker_shares(&self, workers: usize) -> Vec<u64> {
        dense_counts(&self.responses_per_worker, workers)
    }

    /// Connections per worker as a vector, like [`Report::worker_shares`].
    pub fn worker_connections(&self, workers: usize) -> Vec<u64> {
        dense_counts(&self.connections_per_worker, workers)
    }

    /// The busiest worker's responses over the mean (1.0 = perfectly even).
    pub fn share_max_over_mean(&self, workers: usize) -> f64 {
        max_over_mean(&self.worker_shares(workers))
    }

    /// Coefficient of variation of responses per worker (0 = perfectly even).
    pub fn share_cv(&self, workers: usize) -> f64 {
        coefficient_of_variation(&self.worker_shares(workers))
    }

    /// Most minus fewest connections per worker.
    pub fn connection_spread(&self, workers: usize) -> u64 {
        let c = self.worker_connections(workers);
        c.iter().max().unwrap_or(&0) - c.iter().min().unwrap_or(&0)
    }
}

impl fmt::Display for Report {
    /// One line: counts, throughput, percentiles, errors.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent={} completed={} non200={} {} in {:.2}s = {:.0}/s; p50={}us p90={}us p99={}us p99.9={}us max={}us; per worker {:?}",
            self.sent,
            self.completed,
            self.non_200,
            self.errors,
            self.duration.as_secs_f64(),
            self.throughput(),
            self.p50_us(),
            self.p90_us(),
            self.p99_us(),
            self.p999_us(),
            self.max_us(),
            self.responses_per_worker,
        )
    }
}

fn dense_counts(map: &BTreeMap<u32, u64>, workers: usize) -> Vec<u64> {
    let mut v: Vec<u64> = (0..workers)
        .map(|w| {
            u32::try_from(w)
                .ok()
                .and_then(|w| map.get(&w))
                .copied()
                .unwrap_or(0)
        })
        .collect();
    v.extend(
        map.iter()
            .filter(|&(&k, _)| k as usize >= workers)
            .map(|(_, &c)| c),
    );
    v
}

/// The largest count over the mean count (1.0 for an even split; 0 for no counts).
pub fn max_over_mean(counts: &[u64]) -> f64 {
    let sum: u64 = counts.iter().sum();
    if counts.is_empty() || sum == 0 {
        return 0.0;
    }
    let mean = sum as f64 / counts.len() as f64;
    *counts.iter().max().unwrap_or(&0) as f64 / mean
}

/// Population standard deviation over mean (0.0 for an even split or no counts).
pub fn coefficient_of_variation(counts: &[u64]) -> f64 {
    let sum: u64 = counts.iter().sum();
    if counts.is_empty() || sum == 0 {
        return 0.0;
    }
    let n = counts.len() as f64;
    let mean = sum as f64 / n;
    let var = counts
        .iter()
        .map(|&c| (c as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    var.sqrt() / mean
}

// ---------------------------------------------------------------------------------------------
// Response parsing.

/// What the generator needs from a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ResponseInfo {
    status: u16,
    worker: Option<u32>,
    pid: Option<u32>,
    /// The server will close the connection after this response.
    close: bool,
    /// Bytes of the buffer this response occupies (head and body).
    len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyLen {
    Fixed(usize),
    Chunked,
    UntilEof,
}

#[derive(Debug, PartialEq, Eq)]
enum Parse {
    Incomplete,
    Complete(ResponseInfo),
    Invalid,
}

/// Parses the response at the front of `buf`. `eof`: the peer has closed, so a body without
/// length is complete.
fn parse_response(buf: &[u8], eof: bool) -> Parse {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD_BYTES {
            Parse::Invalid
        } else {
            Parse::Incomplete
        };
    };
    let Ok(head) = std::str::from_utf8(&buf[..head_end]) else {
        return Parse::Invalid;
    };
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut words = status_line.split(' ');
    let version = words.next().unwrap_or("");
    let Some(status) = words.next().and_then(|s| s.parse::<u16>().ok()) else {
        return Parse::Invalid;
    };
    if !version.starts_with("HTTP/1.") {
        return Parse::Invalid;
    }
    let mut info = ResponseInfo {
        status,
        worker: None,
        pid: None,
        close: version == "HTTP/1.0",
        len: 0,
    };
    let mut body = BodyLen::UntilEof;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Parse::Invalid;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            match value.parse() {
                Ok(n) if body != BodyLen::Chunked => body = BodyLen::Fixed(n),
                Ok(_) => {}
                Err(_) => return Parse::Invalid,
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if value.to_ascii_lowercase().contains("chunked") {
                body = BodyLen::Chunked;
            }
        } else if name.eq_ignore_ascii_case("connection") {
            let value = value.to_ascii_lowercase();
            if value.contains("close") {
                info.close = true;
            } else if value.contains("keep-alive") {
                info.close = false;
            }
        } else if name.eq_ignore_ascii_case("x-worker-id") {
            info.worker = value.parse().ok();
        } else if name.eq_ignore_ascii_case("x-worker-pid") {
            info.pid = value.parse().ok();
        }
    }
    if (100..200).contains(&status) || status == 204 || status == 304 {
        body = BodyLen::Fixed(0);
    }
    let body_start = head_end + 4;
    let end = match body {
        BodyLen::Fixed(n) => {
            let end = body_start.saturating_add(n);
            if buf.len() < end {
                return Parse::Incomplete;
            }
            end
        }
        BodyLen::Chunked => match chunked_end(&buf[body_start..]) {
            Ok(Some(n)) => body_start + n,
            Ok(None) => return Parse::Incomplete,
            Err(()) => return Parse::Invalid,
        },
        BodyLen::UntilEof => {
            if !eof {
                return Parse::Incomplete;
            }
            info.close = true;
            buf.len()
        }
    };
    info.len = end;
    Parse::Complete(info)
}

/// Where a chunked body (RFC 9112 §7.1) ends: `Ok(Some(len))`, `Ok(None)` if more bytes are
/// needed, `Err` if malformed.
fn chunked_end(body: &[u8]) -> Result<Option<usize>, ()> {
    let mut pos = 0;
    loop {
        let Some(line_len) = body[pos..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&body[pos..pos + line_len]).map_err(|_| ())?;
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| ())?;
        pos += line_len + 2;
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let Some(l) = body[pos..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                pos += l + 2;
                if l == 0 {
                    return Ok(Some(pos));
                }
            }
        }
        pos = pos
            .checked_add(size)
            .and_then(|p| p.checked_add(2))
            .ok_or(())?;
        if body.len() < pos {
            return Ok(None);
        }
        if &body[pos - 2..pos] != b"\r\n" {
            return Err(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The event loop.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Non-blocking connect in progress.
    Connecting,
    /// Writing the request.
    Sending,
    /// Waiting for (the rest of) the response.
    Receiving,
    /// Response complete; waiting for the server's FIN before closing, so that the server,
    /// not the generator, holds TIME_WAIT.
    Draining,
    /// Keep-alive connection between requests.
    Idle,
}

/// One client socket.
struct Conn {
    stream: TcpStream,
    phase: Phase,
    /// Closed-loop / keep-alive client this connection belongs to (shard-local index).
    client: Option<usize>,
    /// Requests on this connection ask for keep-alive (else `Connection: close`).
    keep_alive: bool,
    /// Mix entry of the current request.
    request: usize,
    written: usize,
    buf: Vec<u8>,
    /// Latency origin of the current request.
    origin: Instant,
    /// Identifies the one timer that is valid for this connection.
    serial: u64,
    responses: u64,
    /// A request on this connection has been issued and not yet answered or failed.
    outstanding: bool,
    eof: bool,
}

/// What advancing a connection produced.
enum Step {
    /// Nothing more until the next readiness event.
    Wait,
    /// The connect completed.
    Connected,
    /// The outstanding request got a complete response.
    Response(ResponseInfo),
    /// The outstanding request failed, or an idle/draining connection broke.
    Failed(ErrorKind),
    /// The connection has nothing more to do.
    Closed,
}

impl Conn {
    /// Moves the connection on as far as it can go without blocking. `readable`: the poll said
    /// there may be something to read (without it, no read is attempted; that read would only
    /// return EAGAIN).
    fn advance(&mut self, request: &[u8], readable: bool) -> Step {
        loop {
            match self.phase {
                Phase::Connecting | Phase::Sending => {
                    // The first write doubles as the connect check: on a socket still in
                    // SYN_SENT, write(2) fails with EAGAIN, and after a failed connect it
                    // returns the pending SO_ERROR (tcp_sendmsg → sk_stream_wait_connect). On
                    // loopback the handshake has usually completed inside connect(2), so this
                    // saves a poll round trip and the getsockopt/getpeername pair per request.
                    while self.written < request.len() {
                        match self.stream.write(&request[self.written..]) {
                            Ok(0) => return Step::Failed(ErrorKind::Other),
                            Ok(n) => {
                                self.written += n;
                                if self.phase == Phase::Connecting {
                                    self.phase = Phase::Sending;
                                    return Step::Connected;
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                return Step::Wait;
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Step::Failed(ErrorKind::of(&e)),
                        }
                    }
                    // The response arrives as a readable edge: the socket has been registered
                    // since before the request went out.
                    self.phase = Phase::Receiving;
                    return Step::Wait;
                }
                Phase::Receiving => {
                    match parse_response(&self.buf, self.eof) {
                        Parse::Complete(info) => {
                            self.phase = if info.close || !self.keep_alive {
                                Phase::Draining
                            } else {
                                Phase::Idle
                            };
                            return Step::Response(info);
                        }
                        Parse::Invalid => return Step::Failed(ErrorKind::Other),
                        Parse::Incomplete if self.eof => return Step::Failed(ErrorKind::Eof),
                        Parse::Incomplete if !readable => return Step::Wait,
                        Parse::Incomplete => {}
                    }
                    match self.read_some() {
                        Ok(true) => {}
                        Ok(false) => return Step::Wait,
                        Err(e) => return Step::Failed(ErrorKind::of(&e)),
                    }
                }
                Phase::Draining | Phase::Idle => {
                    if self.eof {
                        return Step::Closed;
                    }
                    if !readable {
                        return Step::Wait;
                    }
                    self.buf.clear();
                    match self.read_some() {
                        Ok(true) => {}
                        Ok(false) => return Step::Wait,
                        Err(_) => return Step::Closed,
                    }
                }
            }
        }
    }

    /// Reads once into `buf`. `Ok(true)`: got bytes or EOF (sets `eof`); `Ok(false)`: would
    /// block.
    fn read_some(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; READ_CHUNK_BYTES];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(true);
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    /// The request (or the drain) on the connection has run out of time.
    Expire,
    /// Keep-alive: send the connection's next request.
    Send,
}

/// A timer fd in a shard's poll that ends a wait at a given instant, to the microsecond:
/// `epoll_wait`'s timeout counts whole milliseconds (mio rounds it up), so an open loop of
/// 2,000 req/s waiting on it alone would send its arrivals in pairs, one pair per millisecond.
struct WakeTimer {
    fd: rustix::fd::OwnedFd,
    /// The instant the timer is set for, while it is.
    armed: Option<Instant>,
}

impl WakeTimer {
    fn new(poll: &Poll) -> io::Result<WakeTimer> {
        use rustix::fd::AsRawFd;
        use rustix::time::{TimerfdClockId, TimerfdFlags, timerfd_create};
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        poll.registry().register(
            &mut mio::unix::SourceFd(&fd.as_raw_fd()),
            TIMER,
            Interest::READABLE,
        )?;
        Ok(WakeTimer { fd, armed: None })
    }

    /// Sets the timer for `at`, `after` from now (one system call, none if it is set for `at`
    /// already).
    fn arm(&mut self, at: Instant, after: Duration) -> io::Result<()> {
        use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec, timerfd_settime};
        if self.armed == Some(at) {
            return Ok(());
        }
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let value = Timespec {
            tv_sec: i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(after.subsec_nanos()),
        };
        timerfd_settime(
            &self.fd,
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: zero,
                it_value: value,
            },
        )?;
        self.armed = Some(at);
        Ok(())
    }

    /// The timer went off: drains its count (edge-triggered, so the next expiry is a new
    /// event either way) and forgets the instant.
    fn fired(&mut self) {
        let mut count = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut count);
        self.armed = None;
    }
}

/// One event-loop thread's share of a run.
struct Shard<'a> {
    spec: &'a LoadSpec,
    requests: &'a [Vec<u8>],
    shards: u64,
    poll: Poll,
    /// Ends a wait at its instant (epoll's timeout is rounded up to whole milliseconds).
    wake_timer: WakeTimer,
    conns: Vec<Option<Conn>>,
    /// Slots a new connection may take.
    free: Vec<usize>,
    /// Slots freed while a batch of events is handled; free again once the batch is done, so
    /// that an event later in the batch for the old connection never reaches a new one.
    freed: Vec<usize>,
    live: usize,
    timers: BinaryHeap<Reverse<(Instant, usize, u64, TimerKind)>>,
    next_serial: u64,
    start: Instant,
    end: Instant,
    issuing: bool,
    in_flight: usize,
    /// Requests this shard may still issue.
    budget: u64,
    /// Open loop: the next global request index this shard issues.
    next_index: u64,
    /// Closed / keep-alive: global client id of each local client.
    client_ids: Vec<u64>,
    /// Closed / keep-alive: requests issued by each local client.
    client_requests: Vec<u64>,
    /// Closed / keep-alive: clients that need a new connection.
    ready_clients: Vec<usize>,
    /// Keep-alive: clients yet to make their first connection, with when, latest first.
    staggered: Vec<(Instant, usize)>,
    last_event: Instant,
    report: Report,
}

impl<'a> Shard<'a> {
    fn new(
        spec: &'a LoadSpec,
        requests: &'a [Vec<u8>],
        shard: usize,
        start: Instant,
    ) -> io::Result<Shard<'a>> {
        let shards = spec.threads as u64;
        let shard = shard as u64;
        // An even split of the count bound; the first shards take the remainder.
        let budget = if spec.max_requests == u64::MAX {
            u64::MAX
        } else {
            spec.max_requests / shards + u64::from(shard < spec.max_requests % shards)
        };
        let clients = match spec.load {
            Load::Open { .. } => 0,
            Load::Closed { clients } | Load::KeepAlive { clients, .. } => clients as u64,
        };
        let client_ids: Vec<u64> = (0..clients).filter(|c| c % shards == shard).collect();
        let mut staggered: Vec<(Instant, usize)> = match spec.load {
            Load::KeepAlive { interval, .. } => client_ids
                .iter()
                .enumerate()
                .map(|(local, &id)| (start + interval.mul_f64(id as f64 / clients as f64), local))
                .collect(),
            _ => Vec::new(),
        };
        staggered.reverse();
        let ready_clients = match spec.load {
            Load::KeepAlive { .. } => Vec::new(),
            _ => (0..client_ids.len()).rev().collect(),
        };
        let poll = Poll::new()?;
        let wake_timer = WakeTimer::new(&poll)?;
        Ok(Shard {
            spec,
            requests,
            shards,
            poll,
            wake_timer,
            conns: Vec::new(),
            free: Vec::new(),
            freed: Vec::new(),
            live: 0,
            timers: BinaryHeap::new(),
            next_serial: 0,
            start,
            end: start + spec.duration,
            issuing: true,
            in_flight: 0,
            budget,
            next_index: shard,
            client_requests: vec![0; client_ids.len()],
            ready_clients,
            staggered,
            client_ids,
            last_event: start,
            report: Report::empty(spec.load),
        })
    }

    fn run(mut self) -> Result<Report, LoadgenError> {
        let mut events = Events::with_capacity(1024);
        let hard_stop = self.end + self.spec.request_timeout + HARD_STOP_GRACE;
        loop {
            let now = Instant::now();
            if self.issuing && (now >= self.end || self.budget == 0) {
                self.stop_issuing();
            }
            self.issue(now);
            self.fire_timers(now);
            if !self.issuing && self.live == 0 {
                break;
            }
            if now >= hard_stop {
                self.abort_all();
                break;
            }
            let wake = self.next_wake(hard_stop);
            let timeout = wake.saturating_duration_since(Instant::now());
            if !timeout.is_zero() && timeout < PRECISE_WAKE_WITHIN {
                self.wake_timer.arm(wake, timeout)?;
            }
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            for event in events.iter() {
                if event.token() == TIMER {
                    self.wake_timer.fired();
                    continue;
                }
                let readable = event.is_readable() || event.is_read_closed() || event.is_error();
                self.drive(event.token().0, readable);
                // A client whose response just came in connects again now, as an independent
                // client would, and an arrival that fell due while the batch is handled is sent
                // now, not after the rest of the batch: connects bunched at the end of each
                // batch would reach the server as bursts no real client population sends.
                self.issue(Instant::now());
            }
            self.free.append(&mut self.freed);
        }
        self.report.duration = self.last_event.saturating_duration_since(self.start);
        Ok(self.report)
    }

    fn next_wake(&self, hard_stop: Instant) -> Instant {
        let mut wake = hard_stop;
        if let Some(Reverse((at, ..))) = self.timers.peek() {
            wake = wake.min(*at);
        }
        if self.issuing {
            wake = wake.min(self.end);
            match self.spec.load {
                Load::Open { rate_per_s } if self.in_flight < self.spec.max_in_flight => {
                    wake = wake.min(self.intended(self.next_index, rate_per_s));
                }
                Load::Open { .. } => {}
                Load::Closed { .. } | Load::KeepAlive { .. } => {
                    if !self.ready_clients.is_empty() {
                        wake = wake.min(Instant::now());
                    }
                    if let Some(&(at, _)) = self.staggered.last() {
                        wake = wake.min(at);
                    }
                }
            }
        }
        wake
    }

    fn intended(&self, index: u64, rate_per_s: f64) -> Instant {
        self.start + Duration::from_secs_f64(index as f64 / rate_per_s)
    }

    fn stop_issuing(&mut self) {
        self.issuing = false;
        // Keep-alive connections between requests have nothing more to do.
        for slot in 0..self.conns.len() {
            if self.conns[slot]
                .as_ref()
                .is_some_and(|c| c.phase == Phase::Idle)
            {
                self.release(slot);
            }
        }
    }

    /// Sends what is due at `now`: open-loop arrivals, clients ready for a new connection.
    fn issue(&mut self, now: Instant) {
        if !self.issuing {
            return;
        }
        match self.spec.load {
            Load::Open { rate_per_s } => self.issue_open(now, rate_per_s),
            Load::Closed { .. } | Load::KeepAlive { .. } => self.issue_clients(now),
        }
    }

    fn issue_open(&mut self, now: Instant, rate_per_s: f64) {
        while self.issuing && self.in_flight < self.spec.max_in_flight {
            let index = self.next_index;
            let intended = self.intended(index, rate_per_s);
            if index >= self.spec.max_requests || intended >= self.end || self.budget == 0 {
                self.stop_issuing();
                return;
            }
            if intended > now {
                return;
            }
            self.report.max_start_lag = self.report.max_start_lag.max(now - intended);
            let entry = self.spec.mix.pick(self.spec.seed, 0, index);
            self.next_index += self.shards;
            self.connect(intended, None, entry);
        }
    }

    /// Gives each client that is ready a new connection. Only the clients ready on entry: one
    /// whose connect fails at once is ready again, and is retried after the next event or on the
    /// next loop turn, whichever comes first.
    fn issue_clients(&mut self, now: Instant) {
        while let Some(&(at, client)) = self.staggered.last() {
            if at > now {
                break;
            }
            self.staggered.pop();
            self.ready_clients.push(client);
        }
        if now >= self.end {
            // The loop's next turn stops issuing; these clients are done.
            return;
        }
        let ready = std::mem::take(&mut self.ready_clients);
        for client in ready {
            if !self.issuing || self.budget == 0 {
                return;
            }
            let entry = self.next_entry(client);
            self.connect(now, Some(client), entry);
        }
    }

    /// The mix entry of `client`'s next request (counts it as issued by the client).
    fn next_entry(&mut self, client: usize) -> usize {
        let j = self.client_requests[client];
        self.client_requests[client] += 1;
        self.spec
            .mix
            .pick(self.spec.seed, self.client_ids[client] + 1, j)
    }

    /// Issues a request on a new connection.
    fn connect(&mut self, origin: Instant, client: Option<usize>, entry: usize) {
        self.report.sent += 1;
        self.budget = self.budget.saturating_sub(1);
        let stream = match TcpStream::connect(self.spec.target) {
            Ok(s) => s,
            Err(e) => {
                self.record_failure(client, ErrorKind::of(&e));
                return;
            }
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let mut conn = Conn {
            stream,
            phase: Phase::Connecting,
            client,
            keep_alive: !self.spec.load.closes(),
            request: entry,
            written: 0,
            buf: Vec::new(),
            origin,
            serial: 0,
            responses: 0,
            outstanding: true,
            eof: false,
        };
        if let Err(e) = self.poll.registry().register(
            &mut conn.stream,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.free.push(slot);
            self.record_failure(client, ErrorKind::of(&e));
            return;
        }
        self.in_flight += 1;
        self.live += 1;
        self.arm(
            slot,
            &mut conn,
            Instant::now() + self.spec.request_timeout,
            TimerKind::Expire,
        );
        self.conns[slot] = Some(conn);
        self.drive(slot, false);
    }

    fn arm(&mut self, slot: usize, conn: &mut Conn, at: Instant, kind: TimerKind) {
        self.next_serial += 1;
        conn.serial = self.next_serial;
        self.timers.push(Reverse((at, slot, conn.serial, kind)));
    }

    /// Advances the connection in `slot` as far as it goes without blocking (`readable`: see
    /// [`Conn::advance`]).
    fn drive(&mut self, slot: usize, readable: bool) {
        loop {
            let Some(mut conn) = self.conns.get_mut(slot).and_then(Option::take) else {
                return;
            };
            let step = conn.advance(&self.requests[conn.request], readable);
            match step {
                Step::Wait => {
                    self.conns[slot] = Some(conn);
                    return;
                }
                Step::Connected => {
                    self.report.connections += 1;
                    self.conns[slot] = Some(conn);
                }
                Step::Response(info) => {
                    self.on_response(slot, conn, info);
                }
                Step::Failed(kind) => {
                    self.conns[slot] = Some(conn);
                    self.fail(slot, kind);
                    return;
                }
                Step::Closed => {
                    self.conns[slot] = Some(conn);
                    self.release(slot);
                    return;
                }
            }
        }
    }

    fn on_response(&mut self, slot: usize, mut conn: Conn, info: ResponseInfo) {
        let now = Instant::now();
        self.last_event = now;
        let latency = now.saturating_duration_since(conn.origin);
        self.report
            .latency_us
            .saturating_record(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
        self.report.completed += 1;
        if info.status != 200 {
            self.report.non_200 += 1;
        }
        if let Some(w) = info.worker {
            *self.report.responses_per_worker.entry(w).or_default() += 1;
            if conn.responses == 0 {
                *self.report.connections_per_worker.entry(w).or_default() += 1;
            }
        }
        if let Some(p) = info.pid {
            *self.report.responses_per_pid.entry(p).or_default() += 1;
        }
        conn.responses += 1;
        conn.outstanding = false;
        self.in_flight -= 1;
        conn.buf.drain(..info.len);
        let client = conn.client;
        match conn.phase {
            Phase::Idle if self.issuing && self.budget > 0 => {
                let Load::KeepAlive { interval, .. } = self.spec.load else {
                    unreachable!("only keep-alive requests leave a connection idle")
                };
                let at = (conn.origin + interval).max(now);
                self.arm(slot, &mut conn, at, TimerKind::Send);
                self.conns[slot] = Some(conn);
            }
            Phase::Idle => {
                self.conns[slot] = Some(conn);
                self.release(slot);
            }
            _ if !info.close => {
                // A server that ignored `Connection: close`: nothing to wait for (release hands
                // the client a new connection).
                self.conns[slot] = Some(conn);
                self.release(slot);
            }
            _ => {
                // Wait for the server's FIN (bounded by the request timeout); the client, if
                // any, moves on at once with a new connection.
                conn.client = None;
                self.arm(
                    slot,
                    &mut conn,
                    now + self.spec.request_timeout,
                    TimerKind::Expire,
                );
                self.conns[slot] = Some(conn);
                if let Some(c) = client {
                    self.ready_clients.push(c);
                }
            }
        }
    }

    /// The request on the connection in `slot` failed (or the idle connection broke).
    fn fail(&mut self, slot: usize, kind: ErrorKind) {
        let Some(conn) = self.conns[slot].as_mut() else {
            return;
        };
        let (outstanding, client) = (conn.outstanding, conn.client);
        conn.outstanding = false;
        conn.client = None;
        self.release(slot);
        if outstanding {
            self.in_flight -= 1;
            self.record_failure(client, kind);
        } else if let Some(c) = client {
            self.ready_clients.push(c);
        }
    }

    fn record_failure(&mut self, client: Option<usize>, kind: ErrorKind) {
        self.last_event = Instant::now();
        self.report.errors.add(kind);
        if let Some(c) = client {
            self.ready_clients.push(c);
        }
    }

    /// Closes the connection in `slot`; a keep-alive client whose connection this was gets a
    /// new one.
    fn release(&mut self, slot: usize) {
        let Some(conn) = self.conns[slot].take() else {
            return;
        };
        // Dropping the stream closes the fd, which takes it out of the epoll set (epoll(7): the
        // fd has no duplicates), so no EPOLL_CTL_DEL syscall per connection. An event for this
        // slot still in the current batch finds the slot empty: the slot is not reused before
        // the batch is done.
        self.freed.push(slot);
        self.live -= 1;
        debug_assert!(
            !conn.outstanding,
            "a request is accounted for before its close"
        );
        if let Some(c) = conn.client {
            self.ready_clients.push(c);
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((at, slot, serial, kind))) = self.timers.peek() {
            if at > now {
                return;
            }
            self.timers.pop();
            let Some(conn) = self.conns[slot].as_ref() else {
                continue;
            };
            if conn.serial != serial {
                continue;
            }
            match kind {
                TimerKind::Expire => {
                    if conn.outstanding {
                        self.fail(slot, ErrorKind::Timeout);
                    } else {
                        self.release(slot);
                    }
                }
                TimerKind::Send => self.send_next(slot, at),
            }
        }
    }

    /// Keep-alive: issues the next request on the idle connection in `slot`.
    fn send_next(&mut self, slot: usize, scheduled: Instant) {
        if !self.issuing || self.budget == 0 {
            self.release(slot);
            return;
        }
        let Some(mut conn) = self.conns[slot].take() else {
            return;
        };
        let client = conn
            .client
            .expect("keep-alive connections belong to a client");
        conn.request = self.next_entry(client);
        conn.written = 0;
        conn.origin = scheduled;
        conn.phase = Phase::Sending;
        conn.outstanding = true;
        self.report.sent += 1;
        self.budget -= 1;
        self.in_flight += 1;
        self.arm(
            slot,
            &mut conn,
            Instant::now() + self.spec.request_timeout,
            TimerKind::Expire,
        );
        self.conns[slot] = Some(conn);
        self.drive(slot, false);
    }

    /// The hard stop: whatever is still open counts as timed out.
    fn abort_all(&mut self) {
        for slot in 0..self.conns.len() {
            if self.conns[slot].as_ref().is_some_and(|c| c.outstanding) {
                self.fail(slot, ErrorKind::Timeout);
            } else {
                self.release(slot);
            }
        }
        self.ready_clients.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream as StdStream};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread::JoinHandle;

    /// Bound on every blocking server-side socket operation, so a broken test ends.
    const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(10);

    /// A tiny HTTP server on 127.0.0.1:0 for the tests. `handler(n, stream)` serves the
    /// `n`-th accepted connection, on the accept thread (`threaded = false`, so connections
    /// are served strictly one at a time) or on a thread of its own. Stopped and joined on
    /// drop.
    struct TestServer {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl TestServer {
        fn start<F>(threaded: bool, handler: F) -> TestServer
        where
            F: Fn(usize, StdStream) + Send + Sync + 'static,
        {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let handler = Arc::new(handler);
            let thread = {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut served = Vec::new();
                    for (n, stream) in listener.incoming().enumerate() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(stream) = stream else { continue };
                        stream.set_read_timeout(Some(SERVER_IO_TIMEOUT)).unwrap();
                        stream.set_write_timeout(Some(SERVER_IO_TIMEOUT)).unwrap();
                        if threaded {
                            let handler = Arc::clone(&handler);
                            served.push(std::thread::spawn(move || handler(n, stream)));
                        } else {
                            handler(n, stream);
                        }
                    }
                    for t in served {
                        let _ = t.join();
                    }
                })
            };
            TestServer {
                addr,
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            // Wakes the blocking accept so the thread sees the flag.
            let _ = StdStream::connect(self.addr);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// Reads one request head; `false` on EOF or error.
    fn read_request(stream: &mut StdStream, buf: &mut Vec<u8>) -> bool {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                buf.drain(..end + 4);
                return true;
            }
            let mut chunk = [0u8; 1024];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn respond(stream: &mut StdStream, status: u16, worker: usize, close: bool) {
        let conn = if close { "close" } else { "keep-alive" };
        let msg = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: 2\r\nX-Worker-Id: {worker}\r\nX-Worker-Pid: {}\r\nConnection: {conn}\r\n\r\nok",
            1000 + worker
        );
        let _ = stream.write_all(msg.as_bytes());
    }

    /// Answers one request per connection; worker id = connection number mod 2.
    fn ok_server(threaded: bool) -> TestServer {
        TestServer::start(threaded, |n, mut s| {
            let mut buf = Vec::new();
            if read_request(&mut s, &mut buf) {
                respond(&mut s, 200, n % 2, true);
            }
        })
    }

    fn spec(server: &TestServer, load: Load, max_requests: u64) -> LoadSpec {
        LoadSpec {
            duration: Duration::from_secs(20),
            max_requests,
            ..LoadSpec::new(server.addr, load)
        }
    }

    fn assert_accounted(r: &Report) {
        assert_eq!(r.sent, r.completed + r.errors.total(), "{r}");
    }

    #[test]
    fn refuses_non_loopback_targets() {
        for target in ["10.0.0.1:80", "0.0.0.0:80", "[::]:80"] {
            let spec = LoadSpec::new(target.parse().unwrap(), Load::Closed { clients: 1 });
            assert!(
                matches!(spec.run(), Err(LoadgenError::NotLoopback(_))),
                "{target}"
            );
        }
    }

    #[test]
    fn rejects_bad_specs() {
        let target: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let bad = [
            LoadSpec::new(target, Load::Open { rate_per_s: 0.0 }),
            LoadSpec::new(target, Load::Closed { clients: 0 }),
            LoadSpec {
                duration: Duration::ZERO,
                ..LoadSpec::new(target, Load::Closed { clients: 1 })
            },
            LoadSpec {
                path: "a b".into(),
                ..LoadSpec::new(target, Load::Closed { clients: 1 })
            },
        ];
        for s in bad {
            assert!(
                matches!(s.validate(), Err(LoadgenError::InvalidSpec(_))),
                "{s:?}"
            );
        }
    }

    #[test]
    fn parses_mix_specs() {
        let mix: Mix = "98% us=200, 2% us=20000".parse().unwrap();
        assert_eq!(mix.entries().len(), 2);
        assert_eq!(mix.entries()[1].query, "us=20000");
        assert!((mix.weighted_mean(|q| q.strip_prefix("us=")?.parse().ok()) - 596.0).abs() < 1e-9);
        assert_eq!(Mix::single("us=5").unwrap().entries()[0].percent, 100.0);
        assert_eq!(Mix::single("").unwrap(), Mix::default());
        for bad in ["50% a, 40% b", "a, b", "x% a", "100% a b", "-5% a, 105% b"] {
            assert!(bad.parse::<Mix>().is_err(), "{bad}");
        }
    }

    #[test]
    fn seeded_sequence_is_deterministic() {
        let mix: Mix = "98% us=200, 2% us=20000".parse().unwrap();
        let a: Vec<&str> = mix.sequence(42).take(20_000).collect();
        let b: Vec<&str> = mix.sequence(42).take(20_000).collect();
        let c: Vec<&str> = mix.sequence(43).take(20_000).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let heavy = a.iter().filter(|q| **q == "us=20000").count();
        assert!((200..600).contains(&heavy), "{heavy} of 20000 heavy");
        // Random access agrees with the iterator.
        assert_eq!(mix.entries()[mix.pick(42, 0, 777)].query, a[777]);
    }

    #[test]
    fn open_loop_counts_responses_per_worker() {
        let server = ok_server(true);
        let r = spec(&server, Load::Open { rate_per_s: 1000.0 }, 40)
            .run()
            .unwrap();
        assert_accounted(&r);
        assert_eq!(r.completed, 40, "{r}");
        assert_eq!(r.connections, 40);
        assert_eq!(r.worker_shares(2), vec![20, 20]);
        assert_eq!(r.responses_per_pid.get(&1001), Some(&20));
        assert_eq!(r.share_max_over_mean(2), 1.0);
        assert_eq!(r.share_cv(2), 0.0);
        assert_eq!(r.latency_us.len(), 40);
    }

    #[test]
    fn open_loop_latency_counts_from_intended_start() {
        // One connection at a time; the 6th (index 5, intended at 25 ms) stalls 50 ms. At
        // 200/s request k is intended at 5k ms and cannot start before request k-1 is done
        // (max_in_flight 1), so request k ≥ 6 cannot complete before 75 ms: latency from its
        // intended start ≥ 75 - 5k ms. Requests 5..=11 must therefore record ≥ 20 ms, even
        // though each of 6..=11 is served instantly once sent.
        const STALL: Duration = Duration::from_millis(50);
        let server = TestServer::start(false, |n, mut s| {
            let mut buf = Vec::new();
            if read_request(&mut s, &mut buf) {
                if n == 5 {
                    std::thread::sleep(STALL);
                }
                respond(&mut s, 200, 0, true);
            }
        });
        let r = LoadSpec {
            max_in_flight: 1,
            ..spec(&server, Load::Open { rate_per_s: 200.0 }, 20)
        }
        .run()
        .unwrap();
        assert_accounted(&r);
        assert_eq!(r.completed, 20, "{r}");
        let slow = r.latency_us.count_between(20_000, LATENCY_MAX_US);
        assert!(slow >= 7, "only {slow} requests recorded ≥ 20 ms: {r}");
        assert!(
            r.max_start_lag >= Duration::from_millis(40),
            "{:?}",
            r.max_start_lag
        );
    }

    #[test]
    fn closed_loop_stops_at_count() {
        let server = ok_server(true);
        let r = spec(&server, Load::Closed { clients: 4 }, 100)
            .run()
            .unwrap();
        assert_accounted(&r);
        assert_eq!((r.sent, r.completed), (100, 100), "{r}");
        assert_eq!(r.worker_shares(2), vec![50, 50]);
    }

    #[test]
    fn keep_alive_reuses_connections() {
        // Worker id = connection number mod 2; each connection answers until EOF.
        let server = TestServer::start(true, |n, mut s| {
            let mut buf = Vec::new();
            while read_request(&mut s, &mut buf) {
                respond(&mut s, 200, n % 2, false);
            }
        });
        let load = Load::KeepAlive {
            clients: 6,
            interval: Duration::ZERO,
        };
        let r = spec(&server, load, 60).run().unwrap();
        assert_accounted(&r);
        assert_eq!(r.completed, 60, "{r}");
        assert_eq!(r.connections, 6);
        assert_eq!(r.worker_connections(2), vec![3, 3]);
        assert_eq!(r.connection_spread(2), 0);

        // Paced and staggered: still one connection per client.
        let load = Load::KeepAlive {
            clients: 4,
            interval: Duration::from_millis(10),
        };
        let r = spec(&server, load, 12).run().unwrap();
        assert_accounted(&r);
        assert_eq!((r.completed, r.connections), (12, 4), "{r}");
    }

    #[test]
    fn classifies_refused() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let s = LoadSpec {
            duration: Duration::from_secs(20),
            max_requests: 5,
            ..LoadSpec::new(port, Load::Open { rate_per_s: 1000.0 })
        };
        let r = s.run().unwrap();
        assert_accounted(&r);
        assert_eq!(r.errors.refused, 5, "{r}");
    }

    #[test]
    fn classifies_eof_reset_timeout_and_status() {
        let eof = TestServer::start(true, |_, mut s| {
            let mut buf = Vec::new();
            read_request(&mut s, &mut buf);
        });
        let reset = TestServer::start(true, |_, mut s| {
            let mut buf = Vec::new();
            read_request(&mut s, &mut buf);
            // SO_LINGER with a zero timeout: close(2) sends RST instead of FIN (socket(7)).
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        });
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = std::sync::Mutex::new(release_rx);
        let silent = TestServer::start(false, move |_, s| {
            // Holds the connection, unanswered, until the test is over (or the bound).
            let _ = release_rx.lock().unwrap().recv_timeout(SERVER_IO_TIMEOUT);
            drop(s);
        });
        let unavailable = TestServer::start(true, |_, mut s| {
            let mut buf = Vec::new();
            if read_request(&mut s, &mut buf) {
                respond(&mut s, 503, 0, true);
            }
        });
        let load = Load::Open { rate_per_s: 1000.0 };

        let r = spec(&eof, load, 5).run().unwrap();
        assert_accounted(&r);
        assert_eq!(r.errors.eof, 5, "{r}");

        let r = spec(&reset, load, 5).run().unwrap();
        assert_accounted(&r);
        assert_eq!(r.errors.reset, 5, "{r}");

        let r = LoadSpec {
            request_timeout: Duration::from_millis(100),
            ..spec(&silent, load, 1)
        }
        .run()
        .unwrap();
        assert_accounted(&r);
        assert_eq!(r.errors.timeout, 1, "{r}");
        drop(release_tx);

        let r = spec(&unavailable, load, 5).run().unwrap();
        assert_accounted(&r);
        assert_eq!((r.completed, r.non_200, r.errors.total()), (5, 5, 0), "{r}");
    }

    #[test]
    fn parses_responses() {
        let fixed = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Worker-Id: 4\r\nx-worker-pid: 77\r\n\r\nabcNEXT";
        let Parse::Complete(info) = parse_response(fixed, false) else {
            panic!()
        };
        assert_eq!(
            (info.status, info.worker, info.pid, info.close, info.len),
            (200, Some(4), Some(77), false, fixed.len() - 4)
        );
        assert_eq!(
            parse_response(&fixed[..fixed.len() - 6], false),
            Parse::Incomplete
        );

        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        assert!(matches!(
            parse_response(chunked, false),
            Parse::Complete(ResponseInfo { len, .. }) if len == chunked.len()
        ));
        assert_eq!(
            parse_response(&chunked[..chunked.len() - 2], false),
            Parse::Incomplete
        );

        let until_eof = b"HTTP/1.0 503 Busy\r\n\r\nbody";
        assert_eq!(parse_response(until_eof, false), Parse::Incomplete);
        assert!(matches!(
            parse_response(until_eof, true),
            Parse::Complete(ResponseInfo {
                status: 503,
                close: true,
                ..
            })
        ));
        assert_eq!(parse_response(b"SSH-2.0\r\n\r\n", false), Parse::Invalid);
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                false
            ),
            Parse::Invalid
        );
    }

    #[test]
    fn share_helpers() {
        assert_eq!(max_over_mean(&[10, 10]), 1.0);
        assert_eq!(max_over_mean(&[15, 5]), 1.5);
        assert_eq!(max_over_mean(&[]), 0.0);
        assert_eq!(coefficient_of_variation(&[15, 5]), 0.5);
        let mut map = BTreeMap::new();
        map.insert(1, 7);
        map.insert(5, 1);
        assert_eq!(dense_counts(&map, 3), vec![0, 7, 0, 1]);
        assert_eq!(dense_counts(&map, 0), vec![7, 1]);
    }
}
