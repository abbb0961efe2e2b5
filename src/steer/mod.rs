//! Kernel steering (`--steer kernel`): a `BPF_PROG_TYPE_SK_REUSEPORT` program, attached to the
//! reuseport group of each listening address, places every new connection on the listener of
//! the eligible worker slot the policy picks ([`SteerPolicy`]: the least load, round-robin's
//! equal turns, the less loaded of two random slots, or the smallest RSS), read from a table in
//! a `BPF_F_MMAPABLE` array (layout: [`rcluster_proto::steer`]). The master leaves the
//! per-connection path; workers count what they accept and close on the same memory, without a
//! system call.
//!
//! [`Steering`] is owned by the supervisor's [`crate::master::steer`] (main thread). It holds the maps, one program and one
//! `REUSEPORT_SOCKARRAY` per listening address, and the master's own mapping of the table; it
//! writes eligibility, the slot count, the reconciliation of handshakes that never completed
//! and, for least-mem, each slot's worker RSS.
//! The instructions come from `bpf/steer.bpf.c` through `scripts/gen-bpf.sh` ([`prog`]), so
//! neither users nor `cargo build` need clang: two builds ([`Scan`]), the cheaper `bpf_loop` one
//! first and, where the kernel refuses it (before 5.17), the `bpf_for_each_map_elem` one.
//!
//! Creating the maps and loading the programs ([`Objects::load`]) needs CAP_BPF; using them
//! does not. So the master either loads them itself ([`Steering::load`]) or adopts the ones a
//! privileged `rcluster-lb steer-load` loaded and passed in `RCLUSTER_STEER_FDS` before it
//! dropped its capabilities and exec'd the master ([`handoff`]); both end in [`Steering::new`].
//!
//! Plain `reuseport` mode has a program of its own, [`spread`]: the kernel's hash over the
//! slots in service.

pub mod handoff;
pub mod prog;
pub mod spread;

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;

use thiserror::Error;

use crate::sys::bpf::{self, MapMmap, MapSpec, ProgLoadError, ProgSpec};
use rcluster_proto::steer as page;

/// Why kernel steering is not available here (the master falls back to dispatch).
#[derive(Debug, Error)]
pub enum SteerError {
    /// `bpf(2)` refused: no CAP_BPF (or CAP_SYS_ADMIN), or a seccomp profile.
    #[error(
        "bpf(2) not permitted ({0}): loading the program needs CAP_BPF (or CAP_SYS_ADMIN) and \
         no seccomp profile that forbids bpf(2)"
    )]
    NotPermitted(io::Error),
    /// `bpf(2)` does not exist (ENOSYS: a kernel without it, or seccomp answering ENOSYS).
    #[error("bpf(2) unavailable ({0}): kernel without BPF, or a seccomp profile")]
    NoBpf(io::Error),
    /// A map could not be created (kernel older than 5.5 for mmapable arrays, or memlock).
    #[error("cannot create the {what} map: {error}")]
    Map {
        /// Which map.
        what: &'static str,
        /// The errno.
        error: io::Error,
    },
    /// The verifier or the kernel refused the program, both builds (needs 5.13 for
    /// bpf_for_each_map_elem).
    #[error("the steering program did not load: {0}")]
    Prog(ProgLoadError),
    /// Attaching, inserting a listener, or mapping the table failed.
    #[error("{what}: {error}")]
    Setup {
        /// What was being done.
        what: &'static str,
        /// The errno.
        error: io::Error,
    },
}

impl SteerError {
    /// Whether the verifier rejected the program itself (a bug in `bpf/steer.bpf.c`), as
    /// opposed to this host lacking a permission or a kernel feature (a helper the kernel does
    /// not know, before 5.13): tests fail on the first and skip on the second.
    pub fn is_program_rejected(&self) -> bool {
        match self {
            SteerError::Prog(e) => !e.log.is_empty() && !e.log.contains("unknown func"),
            _ => false,
        }
    }
}

pub(crate) fn classify(what: &'static str, error: io::Error) -> SteerError {
    match error.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => SteerError::NotPermitted(error),
        Some(libc::ENOSYS) => SteerError::NoBpf(error),
        _ => SteerError::Map { what, error },
    }
}

/// One slot's counters as read from the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotCounts {
    /// Connections the program placed on the slot.
    pub assigned: u64,
    /// Connections the slot's workers accepted (when they report).
    pub accepted: u64,
    /// Connections the slot's workers closed (when they report).
    pub closed: u64,
    /// Placements the master wrote off (abandoned handshakes) or, negative, connections the
    /// kernel's hash placed while nothing was eligible.
    pub forgiven: i64,
    /// A ready worker serves the slot.
    pub eligible: bool,
    /// The slot's worker counts on the table.
    pub reporting: bool,
    /// How many of the slot's processes say they watch the overflow queue (`reporting` bits
    /// 8–15): accept from it when their own listener has nothing.
    pub watchers: u32,
    /// The slot's ready worker's RSS in KiB, as the master last wrote it (0: not sampled yet).
    pub rss_kib: u64,
    /// When the slot's queue last moved (`CLOCK_MONOTONIC` ns): the worker's last accept, or
    /// the program's placement on a queue with nothing untaken.
    pub progress_ns: u64,
    /// When the worker's accepting loop left its wait (`CLOCK_MONOTONIC` ns); 0 while it waits.
    pub busy_ns: u64,
}

impl SlotCounts {
    /// Some process of the slot watches the overflow queue.
    pub fn watches(&self) -> bool {
        self.watchers > 0
    }

    /// The program's load figure: `assigned - closed - forgiven`.
    pub fn load(&self) -> i64 {
        (self.assigned.wrapping_sub(self.closed) as i64).wrapping_sub(self.forgiven)
    }

    /// Placements not yet accepted by the worker nor written off: `assigned - accepted -
    /// forgiven`.
    pub fn untaken(&self) -> i64 {
        page::untaken(self.assigned, self.accepted, self.forgiven)
    }

    /// The program's stuck rule (`stuck_for` in bpf/steer.bpf.c) at `now_ns`
    /// (`CLOCK_MONOTONIC`): how long, in ns, the worker's loop has been out of its wait or a
    /// placement has waited untaken since the queue last moved (for a worker that reports its
    /// accepts), the longer of the two, once over [`page::STUCK_NS`]; 0 when not stuck.
    pub fn stuck_for(&self, now_ns: u64) -> u64 {
        let age = |t: u64, after: u64| {
            let d = now_ns.wrapping_sub(t);
            if d as i64 > after as i64 { d } else { 0 }
        };
        let busy = if self.busy_ns != 0 {
            age(self.busy_ns, page::STUCK_NS)
        } else {
            0
        };
        let queue = if self.reporting && self.untaken() > 0 {
            age(self.progress_ns, page::STUCK_NS)
        } else {
            0
        };
        busy.max(queue)
    }

    /// Whether the program treats the slot as stuck at `now_ns` ([`SlotCounts::stuck_for`]).
    pub fn stuck(&self, now_ns: u64) -> bool {
        self.stuck_for(now_ns) > 0
    }
}

/// How the program picks a slot (`steer_meta.policy` in bpf/steer.bpf.c). Remaining ties go
/// round by the connection's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteerPolicy {
    /// The least `assigned - closed - forgiven`: connections still open.
    LeastConn = 0,
    /// The least `assigned - forgiven`: placements, so each slot gets an equal share in turn.
    RoundRobin = 1,
    /// Two distinct eligible slots drawn at random (`bpf_get_prandom_u32`), the one with the
    /// less least-conn load (the first drawn on a tie); with one eligible slot, that one.
    P2c = 2,
    /// The smallest `rss_kib`, slots within [`crate::policy::rss_tolerance_kib`] of
    /// the smallest tying, then the least least-conn load. A slot not sampled yet reads 0, so
    /// it counts as the smallest, as a new worker does in dispatch mode.
    LeastMem = 3,
}

impl SteerPolicy {
    /// The program's form of a `--policy`, if it carries it (the dispatch policies; not the
    /// kernel's own `reuseport` and `shared`).
    pub fn for_policy(policy: crate::policy::PolicyKind) -> Option<SteerPolicy> {
        use crate::policy::PolicyKind;
        match policy {
            PolicyKind::LeastConn => Some(SteerPolicy::LeastConn),
            PolicyKind::RoundRobin => Some(SteerPolicy::RoundRobin),
            PolicyKind::P2c => Some(SteerPolicy::P2c),
            PolicyKind::LeastMem => Some(SteerPolicy::LeastMem),
            _ => None,
        }
    }
}

/// Per-listener program and socket array.
struct Group {
    socks: OwnedFd,
    prog: OwnedFd,
}

/// One build of the steering program in [`prog`]: its instructions, where the loader puts each
/// map's fd, and its functions.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    /// The `sk_reuseport` program, then its callback subprograms.
    pub insns: &'static [u64],
    /// `(instruction index, map name)`: 64-bit immediate loads that take the map's fd.
    pub map_relocs: &'static [(usize, &'static str)],
    /// `(first instruction, name, global)`: the functions, for the BTF func_info the verifier
    /// needs before it accepts a callback.
    pub funcs: &'static [(u32, &'static str, bool)],
}

/// How the program scans the slots: the two builds of `bpf/steer.bpf.c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// `bpf_loop` (5.17+), which the verifier turns into a loop with a direct call (5.19+):
    /// about 120 ns less per connection than [`Scan::ForEach`] (BENCHMARKS.md).
    Loop,
    /// `bpf_for_each_map_elem` (5.13+), an indirect call per slot: for kernels before 5.17.
    ForEach,
}

impl Scan {
    /// The build's instructions.
    pub fn program(self) -> Program {
        match self {
            Scan::Loop => prog::LOOP,
            Scan::ForEach => prog::FOR_EACH,
        }
    }

    /// The helper the build scans with, for logs.
    pub fn helper(self) -> &'static str {
        match self {
            Scan::Loop => "bpf_loop",
            Scan::ForEach => "bpf_for_each_map_elem",
        }
    }

    /// What a log line adds about the build: nothing for the first; for the fallback, that
    /// the kernel refused the first and what that costs.
    pub fn note(self) -> &'static str {
        match self {
            Scan::Loop => "",
            Scan::ForEach => {
                "; the kernel refused the bpf_loop build (bpf_loop needs 5.17), so the program \
                 scans the slots with bpf_for_each_map_elem, an indirect call per slot (about \
                 120 ns more per connection)"
            }
        }
    }
}

impl Program {
    /// The BTF (function names) and func_info this build's callbacks need.
    fn btf(self) -> Result<(OwnedFd, Vec<[u32; 2]>), SteerError> {
        let (blob, func_info) = btf_for(self.funcs);
        let btf = bpf::btf_load(&blob).map_err(|e| SteerError::Setup {
            what: "BTF for the program did not load",
            error: e,
        })?;
        Ok((btf, func_info))
    }

    /// Loads the build with `maps` (name, fd) patched in: `Err` when a map reference cannot be
    /// patched, `Ok(Err)` when the kernel refuses the program.
    fn load(
        self,
        maps: &[(&str, BorrowedFd<'_>)],
        (btf, func_info): &(OwnedFd, Vec<[u32; 2]>),
        attach_type: u32,
    ) -> Result<Result<OwnedFd, ProgLoadError>, SteerError> {
        let mut insns = self.insns.to_vec();
        for &(index, name) in self.map_relocs {
            let Some(&(_, map)) = maps.iter().find(|(n, _)| *n == name) else {
                unreachable!("scripts/gen-bpf.sh emits only the program's maps")
            };
            bpf::patch_map_fd(&mut insns, index, map).map_err(|e| SteerError::Setup {
                what: "bad map reference in the embedded program",
                error: e,
            })?;
        }
        Ok(bpf::prog_load(&ProgSpec {
            prog_type: bpf::PROG_TYPE_SK_REUSEPORT,
            attach_type,
            insns: &insns,
            license: prog::LICENSE,
            name: "rcluster_steer",
            btf: Some(btf.as_fd()),
            func_info,
        }))
    }
}

/// Plain `reuseport` mode's fallback program, where [`spread::Spread`] cannot load: it selects
/// nothing, so the kernel's hash places each
/// new connection as it would without a program, but attached as `SELECT_OR_MIGRATE` (5.14+)
/// it has the kernel move a closing listener's queue (its handshakes and the connections
/// nobody accepted) to another socket of the group, chosen by the same hash, instead of
/// resetting it. Two instructions, no maps, no helpers; loading it needs CAP_BPF, as steering
/// does.
pub fn load_migrate_only() -> Result<OwnedFd, ProgLoadError> {
    // r0 = SK_PASS (1); exit.
    const INSNS: [u64; 2] = [0xb7 | (1 << 32), 0x95];
    bpf::prog_load(&ProgSpec {
        prog_type: bpf::PROG_TYPE_SK_REUSEPORT,
        attach_type: bpf::SK_REUSEPORT_SELECT_OR_MIGRATE,
        insns: &INSNS,
        license: prog::LICENSE,
        name: "rcluster_migr",
        btf: None,
        func_info: &[],
    })
}

/// `steer_slots`: the table, one value of [`page::SLOT_SIZE`] bytes per worker slot.
const SLOTS_MAP: MapSpec<'static> = MapSpec {
    map_type: bpf::MAP_TYPE_ARRAY,
    key_size: 4,
    value_size: page::SLOT_SIZE as u32,
    max_entries: page::MAX_SLOTS as u32,
    flags: bpf::F_MMAPABLE,
    name: "steer_slots",
};

/// `steer_meta`: the slot count and the policy.
const META_MAP: MapSpec<'static> = MapSpec {
    map_type: bpf::MAP_TYPE_ARRAY,
    key_size: 4,
    value_size: 8,
    max_entries: 1,
    flags: 0,
    name: "steer_meta",
};

/// `steer_scratch`: the scan's state for the run on each CPU (`struct scan` in
/// bpf/steer.bpf.c, 128 bytes), kept in a map rather than on the program's stack so the
/// verifier checks each scan callback once (the C source says why). Only the programs use it:
/// the master creates it for loading and keeps no fd of it.
const SCRATCH_MAP: MapSpec<'static> = MapSpec {
    map_type: bpf::MAP_TYPE_PERCPU_ARRAY,
    key_size: 4,
    value_size: 128,
    max_entries: 1,
    flags: 0,
    name: "steer_scratch",
};

/// `steer_socks`: one per listening address, slot → that slot's listener.
const SOCKS_MAP: MapSpec<'static> = MapSpec {
    map_type: bpf::MAP_TYPE_REUSEPORT_SOCKARRAY,
    key_size: 4,
    value_size: 8,
    max_entries: page::MAX_SLOTS as u32,
    flags: 0,
    name: "steer_socks",
};

/// The kernel objects of steering: the table and meta maps, and per listening address a socket
/// array and the program that selects from it. Loaded here ([`Objects::load`], CAP_BPF) or
/// adopted from a privileged loader ([`handoff::adopt`]).
pub struct Objects {
    slots: OwnedFd,
    meta: OwnedFd,
    groups: Vec<Group>,
    /// The programs also place the queue of a closed listener (`SELECT_OR_MIGRATE`, 5.14+).
    migrate: bool,
    /// The build loaded (`None`: passed in by `steer-load`, which logged it).
    scan: Option<Scan>,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Objects")
            .field("listeners", &self.groups.len())
            .field("migrate", &self.migrate)
            .finish()
    }
}

/// The loaded steering: maps, programs (one per listening address), the master's mapping.
pub struct Steering {
    slots: OwnedFd,
    meta: OwnedFd,
    groups: Vec<Group>,
    table: MapMmap,
    /// The program also places the queue of a closed listener (`SELECT_OR_MIGRATE`, 5.14+).
    migrate: bool,
    /// The build loaded (`None`: passed in by `steer-load`).
    scan: Option<Scan>,
    /// Reconciliation: what each slot's previous sample read.
    last_sample: Vec<Sample>,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("listeners", &self.groups.len())
            .field("migrate", &self.migrate)
            .finish()
    }
}

impl Objects {
    /// Creates the maps and loads one program per listening address: the `bpf_loop` build
    /// ([`Scan::Loop`]), or where the kernel refuses it (before 5.17) the
    /// `bpf_for_each_map_elem` one. Fails without CAP_BPF, under a seccomp profile that forbids
    /// `bpf(2)`, or on a kernel older than 5.13.
    pub fn load(listeners: usize) -> Result<Objects, SteerError> {
        Objects::load_builds(
            listeners,
            &[(Scan::Loop, prog::LOOP), (Scan::ForEach, prog::FOR_EACH)],
        )
    }

    /// [`Objects::load`] with the builds to try, in order (tests load each one alone).
    fn load_builds(listeners: usize, builds: &[(Scan, Program)]) -> Result<Objects, SteerError> {
        let slots = bpf::map_create(&SLOTS_MAP).map_err(|e| classify("slot table", e))?;
        let meta = bpf::map_create(&META_MAP).map_err(|e| classify("meta", e))?;
        let scratch = bpf::map_create(&SCRATCH_MAP).map_err(|e| classify("scan state", e))?;
        let mut builds = builds.iter().copied();
        let (mut scan, mut program) = builds.next().unwrap_or((Scan::Loop, prog::LOOP));
        let mut btf = program.btf()?;
        let mut groups = Vec::with_capacity(listeners);
        let mut migrate = true;
        for _ in 0..listeners {
            let socks = bpf::map_create(&SOCKS_MAP).map_err(|e| classify("socket array", e))?;
            let maps = [
                ("steer_slots", slots.as_fd()),
                ("steer_meta", meta.as_fd()),
                ("steer_scratch", scratch.as_fd()),
                ("steer_socks", socks.as_fd()),
            ];
            let prog = loop {
                let attach = if migrate {
                    bpf::SK_REUSEPORT_SELECT_OR_MIGRATE
                } else {
                    bpf::SK_REUSEPORT_SELECT
                };
                let e = match program.load(&maps, &btf, attach)? {
                    Ok(p) => break p,
                    Err(e) => e,
                };
                match prog_error(e) {
                    // Before 5.17 bpf_loop is unknown (and the verifier's limits may differ):
                    // the next build.
                    SteerError::Prog(_) if builds.len() > 0 => {
                        (scan, program) = builds.next().unwrap_or((scan, program));
                        btf = program.btf()?;
                    }
                    // Before 5.14 the attach type is unknown: place new connections only.
                    SteerError::Prog(e)
                        if migrate && e.error.raw_os_error() == Some(libc::EINVAL) =>
                    {
                        migrate = false
                    }
                    e => return Err(e),
                }
            };
            groups.push(Group { socks, prog });
        }
        Ok(Objects {
            slots,
            meta,
            groups,
            migrate,
            scan: Some(scan),
        })
    }

    /// How many listening addresses (programs) these objects serve.
    pub fn listeners(&self) -> usize {
        self.groups.len()
    }
}

impl Steering {
    /// Creates the maps and loads one program per listening address ([`Objects::load`]): the
    /// probe. Fails (and the caller falls back) without CAP_BPF, under a seccomp profile that
    /// forbids `bpf(2)`, or on a kernel older than 5.13.
    pub fn load(listeners: usize) -> Result<Steering, SteerError> {
        Steering::new(Objects::load(listeners)?)
    }

    /// Steering on `objects`, loaded here or passed in: maps the table (no privilege needed).
    pub fn new(objects: Objects) -> Result<Steering, SteerError> {
        let Objects {
            slots,
            meta,
            groups,
            migrate,
            scan,
        } = objects;
        let table =
            MapMmap::new(slots.as_fd(), page::TABLE_SIZE).map_err(|e| SteerError::Setup {
                what: "cannot map the slot table",
                error: e,
            })?;
        Ok(Steering {
            slots,
            meta,
            groups,
            table,
            migrate,
            scan,
            last_sample: vec![Sample::default(); page::MAX_SLOTS],
        })
    }

    /// Whether a closed listener's queue is re-placed by the program (5.14+).
    pub fn migrates(&self) -> bool {
        self.migrate
    }

    /// The build this master loaded (`None`: passed in by `steer-load`).
    pub fn scan(&self) -> Option<Scan> {
        self.scan
    }

    /// The table's map fd, inherited by workers so they can map it (`RCLUSTER_STEER_FD`).
    pub fn table_fd(&self) -> BorrowedFd<'_> {
        self.slots.as_fd()
    }

    /// Attaches listener `listener`'s program to the reuseport group `socket` belongs to.
    pub fn attach(&self, listener: usize, socket: BorrowedFd<'_>) -> io::Result<()> {
        bpf::attach_reuseport_ebpf(socket, self.groups[listener].prog.as_fd())
    }

    /// Puts `socket` (listening, `SO_REUSEPORT`) at index `slot` of listener `listener`'s socket
    /// array, so the program can select it.
    pub fn insert(&self, slot: usize, listener: usize, socket: BorrowedFd<'_>) -> io::Result<()> {
        check_slot(slot)?;
        let key = (slot as u32).to_ne_bytes();
        let fd = u64::from(std::os::fd::AsRawFd::as_raw_fd(&socket) as u32).to_ne_bytes();
        bpf::map_update_elem(self.groups[listener].socks.as_fd(), &key, &fd, bpf::ANY)
    }

    /// Puts `socket` (listening, `SO_REUSEPORT`, non-blocking) at listener `listener`'s overflow
    /// index ([`page::OVERFLOW`]): the queue a connection waits in when every eligible slot is
    /// stuck and a worker watches it (bpf/steer.bpf.c).
    pub fn insert_overflow(&self, listener: usize, socket: BorrowedFd<'_>) -> io::Result<()> {
        let key = (page::OVERFLOW as u32).to_ne_bytes();
        let fd = u64::from(std::os::fd::AsRawFd::as_raw_fd(&socket) as u32).to_ne_bytes();
        bpf::map_update_elem(self.groups[listener].socks.as_fd(), &key, &fd, bpf::ANY)
    }

    /// Takes slot `slot` out of every socket array (the kernel also drops a socket from the
    /// array when it is closed).
    pub fn remove(&self, slot: usize) {
        let key = (slot as u32).to_ne_bytes();
        for g in &self.groups {
            let _ = bpf::map_delete_elem(g.socks.as_fd(), &key);
        }
    }

    /// How many slots the program scans (slots `0..n`) and how it picks one.
    pub fn configure(&self, n: usize, policy: SteerPolicy) -> io::Result<()> {
        let n = n.min(page::WORKER_SLOTS) as u32;
        let mut meta = [0u8; 8];
        meta[..4].copy_from_slice(&n.to_ne_bytes());
        meta[4..].copy_from_slice(&(policy as u32).to_ne_bytes());
        bpf::map_update_elem(self.meta.as_fd(), &0u32.to_ne_bytes(), &meta, bpf::ANY)
    }

    /// Marks `slot` eligible or not. Returns whether it changed. Making it eligible also clears
    /// `busy_ns`, which a worker that died inside a long request would otherwise leave set for
    /// its successor until that one's loop first waits.
    pub fn set_eligible(&self, slot: usize, eligible: bool) -> bool {
        if eligible && let Some(w) = self.table.u64_at(page::offset(slot, page::BUSY_NS)) {
            w.store(0, Ordering::SeqCst);
        }
        match self.table.u32_at(page::offset(slot, page::ELIGIBLE)) {
            Some(word) => word.swap(u32::from(eligible), Ordering::SeqCst) != u32::from(eligible),
            None => false,
        }
    }

    /// Puts `slot`'s `eligible` word back to `eligible` if a worker changed it (every worker
    /// maps the whole table read-write). Returns whether it had to. Unlike
    /// [`Steering::set_eligible`] it leaves `busy_ns` alone: nothing changed hands.
    pub fn restore_eligible(&self, slot: usize, eligible: bool) -> bool {
        let Some(word) = self.table.u32_at(page::offset(slot, page::ELIGIBLE)) else {
            return false;
        };
        if (word.load(Ordering::SeqCst) != 0) == eligible {
            return false;
        }
        word.store(u32::from(eligible), Ordering::SeqCst);
        true
    }

    /// Forgets `slot`'s overflow-queue watchers (the `WATCHERS` part of `reporting`): its last
    /// worker exited, and one killed while watching cannot withdraw its count.
    pub fn clear_watchers(&self, slot: usize) {
        if let Some(w) = self.table.u32_at(page::offset(slot, page::REPORTING)) {
            w.fetch_and(!page::WATCHERS, Ordering::SeqCst);
        }
    }

    /// Writes the RSS (KiB) of `slot`'s worker, which least-mem compares; 0 means not known.
    pub fn set_rss(&self, slot: usize, kib: u64) {
        if let Some(w) = self.table.u64_at(page::offset(slot, page::RSS_KIB)) {
            w.store(kib, Ordering::SeqCst);
        }
    }

    /// Zeroes a slot's counters before a new listener takes it (scale-up into a slot used
    /// before). Only while the slot is ineligible and has no listener, so nothing counts on it.
    pub fn reset(&mut self, slot: usize) {
        for field in [
            page::ASSIGNED,
            page::ACCEPTED,
            page::CLOSED,
            page::FORGIVEN,
            page::RSS_KIB,
            page::PROGRESS_NS,
            page::BUSY_NS,
        ] {
            if let Some(w) = self.table.u64_at(page::offset(slot, field)) {
                w.store(0, Ordering::SeqCst);
            }
        }
        if let Some(w) = self.table.u32_at(page::offset(slot, page::REPORTING)) {
            w.store(0, Ordering::SeqCst);
        }
        if let Some(e) = self.last_sample.get_mut(slot) {
            *e = Sample::default();
        }
    }

    /// Reads one slot's counters.
    pub fn counts(&self, slot: usize) -> SlotCounts {
        let u64_at = |f| {
            self.table
                .u64_at(page::offset(slot, f))
                .map_or(0, |w| w.load(Ordering::SeqCst))
        };
        let u32_at = |f| {
            self.table
                .u32_at(page::offset(slot, f))
                .map_or(0, |w| w.load(Ordering::SeqCst))
        };
        SlotCounts {
            assigned: u64_at(page::ASSIGNED),
            accepted: u64_at(page::ACCEPTED),
            closed: u64_at(page::CLOSED),
            forgiven: u64_at(page::FORGIVEN) as i64,
            eligible: u32_at(page::ELIGIBLE) != 0,
            reporting: u32_at(page::REPORTING) & page::REPORTING_WHO != 0,
            watchers: (u32_at(page::REPORTING) & page::WATCHERS) / page::WATCHER,
            rss_kib: u64_at(page::RSS_KIB),
            progress_ns: u64_at(page::PROGRESS_NS),
            busy_ns: u64_at(page::BUSY_NS),
        }
    }

    /// Reconciles one slot's placements with what reached its worker; `queued` reads the
    /// slot's listeners' accept-queue length (`tcpi_unacked`) and is called between two reads
    /// of the slot's counters. Placements neither accepted nor queued are handshakes still in
    /// progress or abandoned: those at least one sample old are written off (`forgiven`), and a
    /// negative excess (connections the kernel's hash placed while nothing was eligible, or a
    /// written-off handshake that completed after all) seen at two samples in a row is taken
    /// back (`write_off`). Only for a slot whose worker reports accepts, and for the overflow
    /// queue's line ([`page::OVERFLOW`]: the workers that take from it count what they take).
    pub fn reconcile(&mut self, slot: usize, queued: impl FnOnce() -> u64) -> Reconciled {
        let before = self.counts(slot);
        let queued = queued();
        if !(before.reporting || slot == page::OVERFLOW) || slot >= self.last_sample.len() {
            return Reconciled { queued, adjust: 0 };
        }
        let after = self.counts(slot);
        let (adjust, sample) = write_off(self.last_sample[slot], &before, queued, &after);
        self.last_sample[slot] = sample;
        if adjust != 0
            && let Some(w) = self.table.u64_at(page::offset(slot, page::FORGIVEN))
        {
            w.fetch_add(adjust as u64, Ordering::SeqCst);
        }
        Reconciled { queued, adjust }
    }

    /// Total run time (ns) and run count of the programs, from `kernel.bpf_stats_enabled`.
    pub fn run_stats(&self) -> (u64, u64) {
        run_stats_of(self.groups.iter().map(|g| g.prog.as_fd()))
    }
}

/// Total run time (ns) and run count of `progs`, from `kernel.bpf_stats_enabled` (saturating).
pub(crate) fn run_stats_of<'a>(progs: impl Iterator<Item = BorrowedFd<'a>>) -> (u64, u64) {
    progs
        .filter_map(|p| bpf::prog_run_stats(p).ok())
        .fold((0u64, 0u64), |(t, n), (dt, dn)| {
            (t.saturating_add(dt), n.saturating_add(dn))
        })
}

fn prog_error(e: ProgLoadError) -> SteerError {
    match e.error.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) if e.log.is_empty() => {
            SteerError::NotPermitted(e.error)
        }
        Some(libc::ENOSYS) => SteerError::NoBpf(e.error),
        _ => SteerError::Prog(e),
    }
}

fn check_slot(slot: usize) -> io::Result<()> {
    if slot >= page::WORKER_SLOTS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "worker slot {slot} is beyond the steering table ({} slots)",
                page::WORKER_SLOTS
            ),
        ));
    }
    Ok(())
}

/// What one reconciliation of a slot ([`Steering::reconcile`]) read and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconciled {
    /// The slot's listeners' accept-queue length.
    pub queued: u64,
    /// What was added to the slot's `forgiven` (negative: taken back).
    pub adjust: i64,
}

/// What one reconciliation sample of a slot saw, for the next: the excess of placements over
/// arrivals and write-offs, at least and at most (after the sample's own adjustment).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Sample {
    least: i64,
    most: i64,
}

/// One reconciliation step: the change to `forgiven` and the sample to keep, from the
/// previous sample, the counters read `before` the accept queue's length `queued`, and those
/// read `after` it.
///
/// The excess (placements neither accepted, nor queued, nor written off) cannot be read at one
/// instant: the counters only grow, and connections move while they are read. So it is
/// bounded: at least `before`'s placements less `after`'s accepts (a connection accepted
/// between the reads counts as both queued and accepted), at most `after`'s placements less
/// `before`'s accepts. An excess is written off when its lower bound was positive at two
/// samples in a row (the smaller of the two), and taken back when its upper bound was negative
/// at two samples in a row (the one nearer zero), so a connection moving while the counters are
/// read never shifts `forgiven`: only handshakes unfinished for a whole reconcile period do,
/// and arrivals nobody placed.
fn write_off(prev: Sample, before: &SlotCounts, queued: u64, after: &SlotCounts) -> (i64, Sample) {
    let excess = |placed: u64, accepted: u64| {
        (placed as i64)
            .wrapping_sub(accepted.wrapping_add(queued) as i64)
            .wrapping_sub(after.forgiven)
    };
    let (least, most) = (
        excess(before.assigned, after.accepted),
        excess(after.assigned, before.accepted),
    );
    let adjust = if least > 0 && prev.least > 0 {
        least.min(prev.least)
    } else if most < 0 && prev.most < 0 {
        most.max(prev.most)
    } else {
        0
    };
    let sample = Sample {
        least: least.wrapping_sub(adjust),
        most: most.wrapping_sub(adjust),
    };
    (adjust, sample)
}

/// A minimal BTF blob naming the program's functions, and the `bpf_func_info` records: the
/// verifier accepts a callback (`bpf_loop`, `bpf_for_each_map_elem`) only with func_info, which
/// needs BTF.
/// Types: 1 `int`; 2 `int (void)` (a static function's argument types are not checked against
/// BTF; the verifier checks the code); 3.. one FUNC per function.
pub fn btf_for(funcs: &[(u32, &str, bool)]) -> (Vec<u8>, Vec<[u32; 2]>) {
    const KIND_INT: u32 = 1;
    const KIND_FUNC: u32 = 12;
    const KIND_FUNC_PROTO: u32 = 13;
    let mut strings = vec![0u8];
    let mut add_str = |s: &str| {
        let off = strings.len() as u32;
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
        off
    };
    let mut types: Vec<u32> = Vec::new();
    // 1: int, 4 bytes, signed, 32 bits.
    types.extend([add_str("int"), KIND_INT << 24, 4, (1 << 24) | 32]);
    // 2: int (void).
    types.extend([0, KIND_FUNC_PROTO << 24, 1]);
    let mut func_info = Vec::new();
    for (i, &(insn, name, global)) in funcs.iter().enumerate() {
        let linkage = u32::from(global);
        types.extend([add_str(name), (KIND_FUNC << 24) | linkage, 2]);
        func_info.push([insn, 3 + i as u32]);
    }
    let type_len = (types.len() * 4) as u32;
    let mut blob = Vec::new();
    blob.extend_from_slice(&0xeb9fu16.to_ne_bytes());
    blob.push(1); // version
    blob.push(0); // flags
    for v in [24u32, 0, type_len, type_len, strings.len() as u32] {
        blob.extend_from_slice(&v.to_ne_bytes());
    }
    for t in types {
        blob.extend_from_slice(&t.to_ne_bytes());
    }
    blob.extend_from_slice(&strings);
    (blob, func_info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(assigned: u64, accepted: u64, forgiven: i64) -> SlotCounts {
        SlotCounts {
            assigned,
            accepted,
            forgiven,
            ..SlotCounts::default()
        }
    }

    /// One sample's reads: (placed, accepted) before the queue's length, the queue's length,
    /// (placed, accepted) after it.
    type Reads = ((u64, u64), u64, (u64, u64));

    /// Runs [`write_off`] over samples and returns the adjustments, carrying `forgiven`
    /// forward as the master's writes do.
    fn adjustments(samples: &[Reads]) -> Vec<i64> {
        let (mut prev, mut forgiven) = (Sample::default(), 0);
        let mut out = Vec::new();
        for &((a1, c1), queued, (a2, c2)) in samples {
            let (adjust, next) = write_off(
                prev,
                &counts(a1, c1, forgiven),
                queued,
                &counts(a2, c2, forgiven),
            );
            forgiven += adjust;
            prev = next;
            out.push(adjust);
        }
        out
    }

    #[test]
    fn a_connection_moving_while_the_counters_are_read_never_shifts_forgiven() {
        // Four samples, the counters growing by 10 from one to the next (`i` = 1..=4).
        let every_sample =
            |reads: fn(u64) -> Reads| adjustments(&(1..=4).map(reads).collect::<Vec<_>>());
        // At every sample: a connection queued when the queue was read and accepted before the
        // counters were read again (counted twice) ...
        assert_eq!(
            every_sample(|i| ((i * 10, i * 10 - 1), 1, (i * 10, i * 10))),
            [0; 4]
        );
        // ... one accepted between the first read of the counters and the queue's (counted in
        // neither) ...
        assert_eq!(
            every_sample(|i| ((i * 10, i * 10 - 1), 0, (i * 10, i * 10))),
            [0; 4]
        );
        // ... one placed and queued between the first read of the counters and the queue's ...
        assert_eq!(
            every_sample(|i| ((i * 10 - 1, i * 10 - 1), 1, (i * 10, i * 10 - 1))),
            [0; 4]
        );
        // ... and one placed after the queue was read.
        assert_eq!(
            every_sample(|i| ((i * 10 - 1, i * 10 - 1), 0, (i * 10, i * 10 - 1))),
            [0; 4]
        );
    }

    #[test]
    fn an_abandoned_handshake_is_written_off_at_the_second_sample_under_load() {
        // Placement 10 never arrives; the slot keeps serving others.
        let samples = [
            ((10, 9), 0, (10, 9)),
            ((20, 19), 0, (20, 19)),
            ((30, 29), 0, (30, 29)),
        ];
        assert_eq!(adjustments(&samples), [0, 1, 0]);
    }

    #[test]
    fn a_lasting_negative_excess_is_taken_back_after_two_samples() {
        // Two connections arrived that the program never placed.
        let samples = [
            ((10, 12), 0, (10, 12)),
            ((10, 12), 0, (10, 12)),
            ((10, 12), 0, (10, 12)),
        ];
        assert_eq!(adjustments(&samples), [0, -2, 0]);
    }

    #[test]
    fn a_written_off_handshake_that_completes_late_is_taken_back() {
        let samples = [
            ((10, 9), 0, (10, 9)),
            ((10, 9), 0, (10, 9)),
            ((10, 10), 0, (10, 10)),
            ((10, 10), 0, (10, 10)),
            ((10, 10), 0, (10, 10)),
        ];
        assert_eq!(adjustments(&samples), [0, 1, 0, -1, 0]);
    }

    #[test]
    fn btf_names_each_function() {
        let (blob, info) = btf_for(&[(0, "steer", true), (52, "visit", false)]);
        assert_eq!(&blob[..2], &0xeb9fu16.to_ne_bytes());
        assert_eq!(info, vec![[0, 3], [52, 4]]);
        let text = String::from_utf8_lossy(&blob);
        assert!(text.contains("steer") && text.contains("visit"));
    }

    #[test]
    fn load_is_assigned_minus_closed_minus_forgiven() {
        let c = SlotCounts {
            assigned: 10,
            closed: 4,
            forgiven: 2,
            ..SlotCounts::default()
        };
        assert_eq!(c.load(), 4);
    }

    #[test]
    fn program_layout_matches_the_page() {
        // The C struct is 64 bytes with the fields at the offsets page.rs documents: the
        // generated code of each build loads `eligible` (a word), `forgiven` and `rss_kib`
        // (double words) at the page's offsets (see bpf/steer.bpf.c).
        assert_eq!(page::SLOT_SIZE, 64);
        assert!(page::MAX_SLOTS.is_power_of_two());
        for scan in [Scan::Loop, Scan::ForEach] {
            let program = scan.program();
            assert_eq!(program.funcs[0].1, "steer");
            const LDX_W: u64 = 0x61;
            const LDX_DW: u64 = 0x79;
            let loads = |opcode: u64, offset: usize| {
                program
                    .insns
                    .iter()
                    .any(|&i| i & 0xff == opcode && (i >> 16) & 0xffff == offset as u64)
            };
            assert!(loads(LDX_W, page::ELIGIBLE), "{scan:?}");
            assert!(loads(LDX_DW, page::FORGIVEN), "{scan:?}");
            assert!(loads(LDX_DW, page::RSS_KIB), "{scan:?}");
            assert!(loads(LDX_DW, page::PROGRESS_NS), "{scan:?}");
            assert!(loads(LDX_DW, page::BUSY_NS), "{scan:?}");
        }
    }

    #[test]
    fn the_builds_differ_only_in_how_they_scan() {
        // The same maps (steer-load's hand-off checks a program's maps by name) and the same
        // callbacks; only the fallback calls bpf_for_each_map_elem (helper 164), only the
        // first bpf_loop (181).
        let maps = |p: Program| {
            let mut names: Vec<&str> = p.map_relocs.iter().map(|&(_, n)| n).collect();
            names.sort_unstable();
            names.dedup();
            names
        };
        let funcs = |p: Program| p.funcs.iter().map(|&(_, n, g)| (n, g)).collect::<Vec<_>>();
        let calls = |p: Program, helper: u64| {
            p.insns
                .iter()
                .any(|&i| i & 0xff == 0x85 && (i >> 8) & 0xff == 0 && i >> 32 == helper)
        };
        let (each, lp) = (prog::FOR_EACH, prog::LOOP);
        assert_eq!(
            maps(lp),
            ["steer_meta", "steer_scratch", "steer_slots", "steer_socks"]
        );
        assert_eq!(maps(each), maps(lp));
        assert_eq!(funcs(each), funcs(lp));
        assert!(calls(lp, 181) && !calls(lp, 164));
        assert!(calls(each, 164) && !calls(each, 181));
    }

    #[test]
    fn stuck_follows_the_programs_rule() {
        let ms = 1_000_000;
        let now = 1_000 * ms;
        let quiet = SlotCounts {
            assigned: 5,
            accepted: 5,
            reporting: true,
            progress_ns: now - 100 * ms,
            ..SlotCounts::default()
        };
        // Nothing untaken, loop waiting: not stuck however long ago the queue moved.
        assert!(!quiet.stuck(now));
        // One placement untaken for 2 ms since the queue last moved: stuck; for 0.5 ms: not.
        let waiting = SlotCounts {
            assigned: 6,
            ..quiet
        };
        assert!(waiting.stuck(now));
        assert!(!waiting.stuck(now - 100 * ms + ms / 2));
        // Written off (forgiven), or the worker does not report its accepts: not stuck.
        assert!(
            !SlotCounts {
                forgiven: 1,
                ..waiting
            }
            .stuck(now)
        );
        assert!(
            !SlotCounts {
                reporting: false,
                ..waiting
            }
            .stuck(now)
        );
        // The loop left its wait 2 ms ago: stuck, with nothing untaken; 0.5 ms ago: not; a
        // stamp from a clock read just after ours (a race) is not.
        assert!(
            SlotCounts {
                busy_ns: now - 2 * ms,
                ..quiet
            }
            .stuck(now)
        );
        assert!(
            !SlotCounts {
                busy_ns: now - ms / 2,
                ..quiet
            }
            .stuck(now)
        );
        assert!(
            !SlotCounts {
                busy_ns: now + 10,
                ..quiet
            }
            .stuck(now)
        );
        // Both: the longer counts.
        let both = SlotCounts {
            busy_ns: now - 3 * ms,
            ..waiting
        };
        assert_eq!(both.stuck_for(now), 100 * ms);
        assert_eq!(
            SlotCounts {
                busy_ns: now - 3 * ms,
                ..quiet
            }
            .stuck_for(now),
            3 * ms
        );
    }

    #[test]
    fn the_program_knows_every_policy() {
        use crate::policy::PolicyKind;
        let steered: Vec<_> = PolicyKind::ALL
            .into_iter()
            .filter_map(SteerPolicy::for_policy)
            .map(|p| p as u32)
            .collect();
        // STEER_LEAST_CONN .. STEER_LEAST_MEM in bpf/steer.bpf.c.
        assert_eq!(steered.len(), 4);
        assert!(steered.iter().all(|&p| p <= 3));
    }
}

/// Tests against the real kernel: they need CAP_BPF and skip with a note without it.
#[cfg(test)]
mod kernel_tests {
    use super::*;
    use crate::master::listener;
    use socket2::Socket;
    use std::net::{SocketAddr, TcpStream};

    /// `builds` loaded as the loader tries them, for one listening address: `None`, with a
    /// note, where steering is unavailable here; a panic where the verifier rejects the program.
    fn load_or_skip(builds: &[(Scan, Program)]) -> Option<Steering> {
        match Objects::load_builds(1, builds).and_then(Steering::new) {
            Ok(s) => Some(s),
            Err(e) if e.is_program_rejected() => panic!("{e}"),
            Err(e) => {
                eprintln!("skipped: kernel steering unavailable here: {e}");
                None
            }
        }
    }

    /// Runs `test` on each build of the program ([`Scan`]) loaded alone, so the tests hold for
    /// both: the fallback too must verify and steer. A build that cannot load here (the
    /// `bpf_loop` one on a kernel before 5.17, both without CAP_BPF) is skipped with a note.
    fn each_build(test: impl Fn(&Steering)) {
        for scan in [Scan::Loop, Scan::ForEach] {
            eprintln!("build: {}", scan.helper());
            if let Some(steer) = load_or_skip(&[(scan, scan.program())]) {
                test(&steer);
            }
        }
    }

    /// `n` listeners of one reuseport group, each at its slot, program attached.
    fn group(steer: &Steering, n: usize) -> (Vec<Socket>, SocketAddr) {
        let first = listener::bind_listener("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = listener::local_addr(&first).unwrap();
        let mut socks = vec![first];
        for _ in 1..n {
            socks.push(listener::bind_listener(addr, true).unwrap());
        }
        for (slot, s) in socks.iter().enumerate() {
            steer.insert(slot, 0, s.as_fd()).unwrap();
        }
        steer.attach(0, socks[0].as_fd()).unwrap();
        steer.configure(n, SteerPolicy::LeastConn).unwrap();
        (socks, addr)
    }

    /// [`group`] with every slot eligible.
    fn eligible_group(steer: &Steering, n: usize) -> (Vec<Socket>, SocketAddr) {
        let g = group(steer, n);
        for slot in 0..n {
            steer.set_eligible(slot, true);
        }
        g
    }

    /// [`eligible_group`] plus the overflow queue, eligible, as the last listener.
    fn group_with_overflow(steer: &Steering, n: usize) -> (Vec<Socket>, SocketAddr) {
        let (mut socks, addr) = eligible_group(steer, n);
        let queue = listener::bind_listener(addr, true).unwrap();
        steer.insert_overflow(0, queue.as_fd()).unwrap();
        steer.set_eligible(page::OVERFLOW, true);
        socks.push(queue);
        (socks, addr)
    }

    /// Connects `n` times and returns how many connections each listener's queue got.
    fn spread(socks: &[Socket], addr: SocketAddr, n: usize) -> Vec<usize> {
        let clients: Vec<TcpStream> = (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let mut got = vec![0; socks.len()];
        for (i, s) in socks.iter().enumerate() {
            s.set_nonblocking(true).unwrap();
            while s.accept().is_ok() {
                got[i] += 1;
            }
        }
        drop(clients);
        got
    }

    #[test]
    fn a_build_the_kernel_refuses_falls_back_to_the_next() {
        // A first build the verifier refuses (it exits without setting r0), as the bpf_loop
        // build is on a kernel before 5.17: the loader takes the next one, which steers.
        const REFUSED: Program = Program {
            insns: &[0x0000_0000_0000_0095],
            map_relocs: &[],
            funcs: &[(0, "steer", true)],
        };
        let builds = [(Scan::Loop, REFUSED), (Scan::ForEach, prog::FOR_EACH)];
        let Some(steer) = load_or_skip(&builds) else {
            return;
        };
        assert_eq!(steer.scan(), Some(Scan::ForEach));
        let (socks, addr) = group(&steer, 2);
        steer.set_eligible(1, true);
        assert_eq!(spread(&socks, addr, 10), vec![0, 10]);
        // With no build left to try, the refusal is the error.
        match Objects::load_builds(1, &builds[..1]) {
            Err(e) => assert!(matches!(e, SteerError::Prog(_)), "{e}"),
            Ok(_) => panic!("a program the verifier refuses loaded"),
        }
    }

    #[test]
    fn each_build_verifies_far_below_the_verifiers_limit() {
        // The verifier gives up after a million instructions, and how many it needs for the
        // same bytes differs between kernels (a later 6.18.44 build walked the scan callbacks
        // to the limit while the scan's state sat on the stack). A tenth of it leaves room for
        // stricter kernels; a change that makes the callbacks expensive to verify fails here.
        each_build(|steer| {
            // The most any of the programs took; 0 where the kernel does not say.
            let n = (steer.groups.iter())
                .filter_map(|g| bpf::prog_verified_insns(g.prog.as_fd()).ok())
                .max()
                .unwrap_or(0);
            if n == 0 {
                eprintln!("skipped: this kernel does not report verified instructions (5.16+)");
                return;
            }
            eprintln!("the verifier processed {n} instructions");
            assert!(n < 100_000, "the verifier processed {n} instructions");
        });
    }

    #[test]
    fn selection_follows_the_table() {
        each_build(|steer| {
            let (socks, addr) = group(steer, 4);
            steer.set_eligible(2, true);
            assert_eq!(spread(&socks, addr, 40), vec![0, 0, 40, 0]);
            assert_eq!(steer.counts(2).assigned, 40);
            // Nothing eligible: the kernel's hash places them, the program counts nothing.
            steer.set_eligible(2, false);
            assert_eq!(spread(&socks, addr, 20).iter().sum::<usize>(), 20);
            assert_eq!(steer.counts(2).assigned, 40);
        });
    }

    fn word(steer: &Steering, slot: usize, field: usize) -> &std::sync::atomic::AtomicU64 {
        steer.table.u64_at(page::offset(slot, field)).unwrap()
    }

    /// `slot`'s `reporting` word (who counts, and the overflow-queue watchers).
    fn reporting(steer: &Steering, slot: usize) -> &std::sync::atomic::AtomicU32 {
        steer
            .table
            .u32_at(page::offset(slot, page::REPORTING))
            .unwrap()
    }

    #[test]
    fn a_stuck_slot_is_passed_over_whatever_its_load() {
        each_build(|steer| {
            let (socks, addr) = eligible_group(steer, 2);
            let ms = 1_000_000;
            // Slot 1 holds 5 more, but slot 0's loop left its wait 2 ms ago (one long request).
            word(steer, 1, page::ASSIGNED).fetch_add(5, Ordering::SeqCst);
            word(steer, 0, page::BUSY_NS)
                .store(crate::sys::monotonic_ns() - 2 * ms, Ordering::SeqCst);
            assert_eq!(spread(&socks, addr, 10), vec![0, 10]);
            // Its loop waits again: the load decides (0 against 15).
            word(steer, 0, page::BUSY_NS).store(0, Ordering::SeqCst);
            assert_eq!(spread(&socks, addr, 10), vec![10, 0]);
            // A reporting worker with one placement untaken for 2 ms since its queue last moved.
            reporting(steer, 0).store(page::REPORTING_SELF, Ordering::SeqCst);
            word(steer, 0, page::ACCEPTED).store(9, Ordering::SeqCst);
            word(steer, 0, page::PROGRESS_NS)
                .store(crate::sys::monotonic_ns() - 2 * ms, Ordering::SeqCst);
            assert!(steer.counts(0).stuck(crate::sys::monotonic_ns()));
            assert_eq!(spread(&socks, addr, 10), vec![0, 10]);
            // Both stuck: the one stuck for less time, although it holds more (25 against 10).
            // (Both clocks are set from one reading before each step, so a slow host moves
            // them alike and only the order is tested.)
            let stuck_since = |slot0_ago: u64, slot1_ago: u64| {
                let now = crate::sys::monotonic_ns();
                word(steer, 0, page::PROGRESS_NS).store(now - slot0_ago, Ordering::SeqCst);
                word(steer, 1, page::BUSY_NS).store(now - slot1_ago, Ordering::SeqCst);
            };
            stuck_since(2 * ms, 3 * ms / 2);
            assert_eq!(spread(&socks, addr, 4), vec![0, 4]);
            // Slot 1 stuck for longer: slot 0 again.
            stuck_since(2 * ms, 5 * ms);
            assert_eq!(spread(&socks, addr, 4), vec![4, 0]);
            // Round-robin keeps equal shares, stuck or not: slot 0 has had 14 placements, slot 1 29.
            steer.configure(2, SteerPolicy::RoundRobin).unwrap();
            word(steer, 1, page::BUSY_NS).store(0, Ordering::SeqCst);
            assert_eq!(spread(&socks, addr, 15), vec![15, 0]);
        });
    }

    #[test]
    fn when_every_slot_is_stuck_a_watched_overflow_queue_takes_the_connection() {
        each_build(|steer| {
            let (socks, addr) = group_with_overflow(steer, 2);
            let ms = 1_000_000;
            let now = crate::sys::monotonic_ns;
            // Both stuck, nobody watches the queue: the one stuck for less time, as before.
            word(steer, 0, page::BUSY_NS).store(now() - 5 * ms, Ordering::SeqCst);
            word(steer, 1, page::BUSY_NS).store(now() - 2 * ms, Ordering::SeqCst);
            assert_eq!(spread(&socks, addr, 6), vec![0, 6, 0]);
            // One eligible slot's worker watches it: every connection waits there for the first
            // worker to come free, counted on the queue's line and on no slot's.
            reporting(steer, 1).fetch_add(page::WATCHER, Ordering::SeqCst);
            assert!(steer.counts(1).watches());
            assert_eq!(spread(&socks, addr, 10), vec![0, 0, 10]);
            assert_eq!(steer.counts(page::OVERFLOW).assigned, 10);
            assert_eq!(steer.counts(0).assigned + steer.counts(1).assigned, 6);
            // A slot that is not stuck takes them, watched queue or not.
            word(steer, 0, page::BUSY_NS).store(0, Ordering::SeqCst);
            assert_eq!(spread(&socks, addr, 4), vec![4, 0, 0]);
            // The watcher's slot is not eligible (draining): its watch does not count.
            word(steer, 0, page::BUSY_NS).store(now() - 5 * ms, Ordering::SeqCst);
            steer.set_eligible(1, false);
            assert_eq!(spread(&socks, addr, 4), vec![4, 0, 0]);
            steer.set_eligible(1, true);
            word(steer, 1, page::BUSY_NS).store(now() - 2 * ms, Ordering::SeqCst);
            // The queue is closed to the program (ineligible): the slot stuck for less time.
            steer.set_eligible(page::OVERFLOW, false);
            assert_eq!(spread(&socks, addr, 4), vec![0, 4, 0]);
            steer.set_eligible(page::OVERFLOW, true);
            assert_eq!(spread(&socks, addr, 4), vec![0, 0, 4]);
            // Round-robin keeps its turns, stuck or not: never the queue.
            steer.configure(2, SteerPolicy::RoundRobin).unwrap();
            assert_eq!(spread(&socks, addr, 4).last(), Some(&0));
            // p2c: both drawn stuck, the queue.
            steer.configure(2, SteerPolicy::P2c).unwrap();
            assert_eq!(spread(&socks, addr, 4), vec![0, 0, 4]);
            // Nothing eligible: a slot's listener by the hash, never the queue (no worker may be
            // watching it).
            steer.configure(2, SteerPolicy::LeastConn).unwrap();
            steer.set_eligible(0, false);
            steer.set_eligible(1, false);
            let got = spread(&socks, addr, 20);
            assert_eq!((got[0] + got[1], got[2]), (20, 0), "{got:?}");
        });
    }

    #[test]
    fn a_pick_whose_loop_serves_spills_to_a_watched_queue_and_a_waiting_loop_wins_ties() {
        each_build(|steer| {
            let (socks, addr) = group_with_overflow(steer, 2);
            // Slot 0's loop has served for 100 µs (over the 50 µs after which the program spills,
            // far from the 1 ms that makes it stuck; stamped afresh before each step), slot 1's
            // waits.
            let serving = || {
                word(steer, 0, page::BUSY_NS)
                    .store(crate::sys::monotonic_ns() - 100_000, Ordering::SeqCst)
            };
            serving();
            // Equal loads: the waiting loop first, whatever the hash says; then the load decides.
            assert_eq!(spread(&socks, addr, 1), vec![0, 1, 0]);
            serving();
            assert_eq!(spread(&socks, addr, 1), vec![1, 0, 0]);
            // Nobody watches the queue: the busy pick keeps its connections, by the load.
            serving();
            assert_eq!(spread(&socks, addr, 2), vec![1, 1, 0]);
            // Slot 1's worker watches (and, as every watcher does, counts its accepts: it has
            // taken both of its connections): a tie goes to its waiting loop, and where the load
            // picks the serving slot 0 (2 against 3), the connection waits in the queue for the
            // first worker free.
            reporting(steer, 1).fetch_add(page::WATCHER, Ordering::SeqCst);
            let taken = |slot| {
                let assigned = steer.counts(slot).assigned;
                word(steer, slot, page::ACCEPTED).store(assigned, Ordering::SeqCst);
            };
            taken(1);
            serving();
            assert_eq!(spread(&socks, addr, 1), vec![0, 1, 0]);
            serving();
            assert_eq!(spread(&socks, addr, 2), vec![0, 0, 2]);
            assert_eq!(steer.counts(page::OVERFLOW).assigned, 2);
            // Slot 1 took both (2 against 5): the busy slot 0 keeps what it is owed until it is
            // one behind again, so spills keep the loads within two.
            word(steer, page::OVERFLOW, page::ACCEPTED).store(2, Ordering::SeqCst);
            word(steer, 1, page::ASSIGNED).fetch_add(2, Ordering::SeqCst);
            taken(1);
            serving();
            assert_eq!(spread(&socks, addr, 1), vec![1, 0, 0]);
            serving();
            assert_eq!(spread(&socks, addr, 1), vec![1, 0, 0]);
            serving();
            assert_eq!(spread(&socks, addr, 1), vec![0, 0, 1]);
            // Slot 1 takes the queued one (4 against 6), and slot 0's loop waits again: it takes
            // its share directly, nothing waiting in the queue for it to pass.
            let queued = steer.counts(page::OVERFLOW).assigned;
            word(steer, page::OVERFLOW, page::ACCEPTED).store(queued, Ordering::SeqCst);
            word(steer, 1, page::ASSIGNED).fetch_add(1, Ordering::SeqCst);
            taken(1);
            word(steer, 0, page::BUSY_NS).store(0, Ordering::SeqCst);
            assert_eq!(spread(&socks, addr, 1), vec![1, 0, 0]);
            // p2c: the less loaded of the two (slot 0: 5 against 6), spilled while its loop
            // serves; not once slot 1 holds more than one above it.
            steer.configure(2, SteerPolicy::P2c).unwrap();
            serving();
            assert_eq!(spread(&socks, addr, 2), vec![0, 0, 2]);
            word(steer, 1, page::ASSIGNED).fetch_add(5, Ordering::SeqCst);
            taken(1);
            serving();
            assert_eq!(spread(&socks, addr, 1), vec![1, 0, 0]);
            word(steer, 0, page::BUSY_NS).store(0, Ordering::SeqCst);
            assert_eq!(spread(&socks, addr, 2), vec![2, 0, 0]);
            // least-mem spills only when stuck (any watcher takes from the queue, one beyond its RSS
            // tolerance too): the serving slot 0 keeps it.
            steer.configure(2, SteerPolicy::LeastMem).unwrap();
            serving();
            assert_eq!(spread(&socks, addr, 1), vec![1, 0, 0]);
            // Round-robin never spills.
            steer.configure(2, SteerPolicy::RoundRobin).unwrap();
            serving();
            assert_eq!(spread(&socks, addr, 4).last(), Some(&0));
        });
    }

    #[test]
    fn a_pick_with_a_placement_untaken_spills_to_a_watched_queue() {
        each_build(|steer| {
            let (socks, addr) = group_with_overflow(steer, 2);
            // Slot 1 holds one connection it took; its worker watches the queue, and its loop
            // serves something short (10 µs: far from the 50 µs that would make it spill, but
            // a tie goes to slot 0's waiting loop). Slot 0 holds none.
            let set = |slot, field, value| word(steer, slot, field).store(value, Ordering::SeqCst);
            set(1, page::ASSIGNED, 1);
            set(1, page::ACCEPTED, 1);
            reporting(steer, 1).store(page::REPORTING_SHIM | page::WATCHER, Ordering::SeqCst);
            // Slot 0's worker counts its accepts. The queues' clocks are fresh before each step,
            // so a placement not taken never makes a slot stuck here (that takes 1 ms).
            reporting(steer, 0).store(page::REPORTING_SHIM, Ordering::SeqCst);
            let fresh = || {
                let now = crate::sys::monotonic_ns();
                set(0, page::PROGRESS_NS, now);
                set(1, page::PROGRESS_NS, now);
                set(1, page::BUSY_NS, now - 10_000);
            };
            fresh();
            // The least loaded, slot 0, gets the first connection directly.
            assert_eq!(spread(&socks, addr, 1), vec![1, 0, 0]);
            // Its worker has not taken it: the next ones wait in the queue for the first worker
            // free, although slot 0 still wins the tie (1 and 1) and its loop waits.
            fresh();
            assert_eq!(spread(&socks, addr, 2), vec![0, 0, 2]);
            assert_eq!(steer.counts(page::OVERFLOW).assigned, 2);
            // Taken, and slot 1's worker took the two queued (they are its own now: 1 against
            // 3): slot 0 is free again and gets the next one directly.
            set(0, page::ACCEPTED, 1);
            set(page::OVERFLOW, page::ACCEPTED, 2);
            set(1, page::ASSIGNED, 3);
            set(1, page::ACCEPTED, 3);
            fresh();
            assert_eq!(spread(&socks, addr, 1), vec![1, 0, 0]);
            // Slot 1 holds two more (2 against 5): slot 0, though behind, keeps what it is owed.
            set(1, page::ASSIGNED, 5);
            set(1, page::ACCEPTED, 5);
            fresh();
            assert_eq!(spread(&socks, addr, 1), vec![1, 0, 0]);
            // A worker that does not count its accepts cannot be told behind: by the load (3
            // against 4, close enough to spill had it counted).
            reporting(steer, 0).store(0, Ordering::SeqCst);
            set(1, page::ASSIGNED, 4);
            set(1, page::ACCEPTED, 4);
            fresh();
            assert_eq!(spread(&socks, addr, 1), vec![1, 0, 0]);
            // p2c: both slots drawn, the less loaded (slot 0: 4 against 5) has three untaken.
            reporting(steer, 0).store(page::REPORTING_SHIM, Ordering::SeqCst);
            set(1, page::ASSIGNED, 5);
            set(1, page::ACCEPTED, 5);
            steer.configure(2, SteerPolicy::P2c).unwrap();
            fresh();
            assert_eq!(spread(&socks, addr, 1), vec![0, 0, 1]);
            steer.configure(2, SteerPolicy::LeastConn).unwrap();
            // Nobody watches the queue: by the load (4 against 5), untaken or not.
            reporting(steer, 1).store(page::REPORTING_SHIM, Ordering::SeqCst);
            fresh();
            assert_eq!(spread(&socks, addr, 1), vec![1, 0, 0]);
            // round-robin never spills; least-mem only when stuck.
            reporting(steer, 1).store(page::REPORTING_SHIM | page::WATCHER, Ordering::SeqCst);
            for policy in [SteerPolicy::RoundRobin, SteerPolicy::LeastMem] {
                steer.configure(2, policy).unwrap();
                fresh();
                assert_eq!(spread(&socks, addr, 1)[2], 0, "{policy:?}");
            }
        });
    }

    #[test]
    fn a_connection_joins_a_nonempty_overflow_queue_rather_than_pass_it() {
        each_build(|steer| {
            let (socks, addr) = group_with_overflow(steer, 2);
            let set = |slot, field, value| word(steer, slot, field).store(value, Ordering::SeqCst);
            // Both workers watch the queue and count their accepts, and their loops wait;
            // slot 1 holds one connection: nothing queued, so slot 0 gets the next directly.
            for slot in 0..2 {
                reporting(steer, slot)
                    .store(page::REPORTING_SHIM | page::WATCHER, Ordering::SeqCst);
            }
            set(1, page::ASSIGNED, 1);
            set(1, page::ACCEPTED, 1);
            let taken = |slot| {
                set(slot, page::ACCEPTED, steer.counts(slot).assigned);
                set(slot, page::PROGRESS_NS, crate::sys::monotonic_ns());
            };
            assert_eq!(spread(&socks, addr, 1), vec![1, 0, 0]);
            taken(0);
            // Two connections wait in the queue (placed while both loops served, not taken
            // yet): new ones go behind them, although both loops wait (1 and 1), so
            // the worker that comes free takes the oldest first, as from one shared queue.
            set(page::OVERFLOW, page::ASSIGNED, 2);
            assert_eq!(spread(&socks, addr, 3), vec![0, 0, 3]);
            // One left (of five): still behind it.
            set(page::OVERFLOW, page::ACCEPTED, 4);
            assert_eq!(spread(&socks, addr, 1), vec![0, 0, 1]);
            // Slot 0 holds two more than slot 1 (3 against 1, long-lived connections): the
            // loads are not level, and slot 1 gets it directly, queue or not.
            set(0, page::ASSIGNED, 3);
            taken(0);
            assert_eq!(spread(&socks, addr, 1), vec![0, 1, 0]);
            taken(1);
            // Level again (3 against 2), the queue taken or written off by the master's
            // reconciliation (6 placed, 5 taken, 1 forgiven): by the load.
            set(1, page::ASSIGNED, 2);
            taken(1);
            set(page::OVERFLOW, page::ACCEPTED, 5);
            set(page::OVERFLOW, page::FORGIVEN, 1);
            assert_eq!(spread(&socks, addr, 1), vec![0, 1, 0]);
            taken(1);
            // Queued again, but nobody watches: the queue is never used (3 and 3, then 4 and 3).
            set(page::OVERFLOW, page::FORGIVEN, 0);
            for slot in 0..2 {
                reporting(steer, slot).store(page::REPORTING_SHIM, Ordering::SeqCst);
            }
            assert_eq!(spread(&socks, addr, 2), vec![1, 1, 0]);
            taken(0);
            taken(1);
            // round-robin never spills; least-mem keeps its RSS bound (any watcher takes from
            // the queue) and spills only when stuck.
            reporting(steer, 1).store(page::REPORTING_SHIM | page::WATCHER, Ordering::SeqCst);
            for policy in [SteerPolicy::RoundRobin, SteerPolicy::LeastMem] {
                steer.configure(2, policy).unwrap();
                assert_eq!(spread(&socks, addr, 1)[2], 0, "{policy:?}");
                taken(0);
                taken(1);
            }
        });
    }

    #[test]
    fn least_mem_follows_the_rss_then_the_load() {
        use crate::policy::rss_tolerance_kib;
        each_build(|steer| {
            let (socks, addr) = eligible_group(steer, 4);
            steer.configure(4, SteerPolicy::LeastMem).unwrap();
            let small = 50_000u64;
            let near = small + u64::from(rss_tolerance_kib(small as u32));
            for (slot, kib) in [(0, 200_000), (1, small), (2, 300_000), (3, near + 1)] {
                steer.set_rss(slot, kib);
            }
            assert_eq!(spread(&socks, addr, 40), vec![0, 40, 0, 0]);
            // Within the tolerance of the smallest: a tie, and the least loaded takes them.
            steer.set_rss(3, near);
            assert_eq!(spread(&socks, addr, 40), vec![0, 0, 0, 40]);
            assert_eq!(spread(&socks, addr, 10), vec![0, 5, 0, 5]);
            // A slot whose RSS is not known yet (0) is the smallest, as a new worker in dispatch.
            steer.set_rss(2, 0);
            assert_eq!(spread(&socks, addr, 10), vec![0, 0, 10, 0]);
            // The load alone decides among equal RSS: slot 0 has none, slot 2 ten.
            for slot in 0..4 {
                steer.set_rss(slot, small);
            }
            assert_eq!(spread(&socks, addr, 10), vec![10, 0, 0, 0]);
            assert_eq!(spread(&socks, addr, 20), vec![10, 0, 10, 0]);
        });
    }

    #[test]
    fn p2c_takes_the_less_loaded_of_two() {
        each_build(|steer| {
            let (socks, addr) = group(steer, 4);
            steer.configure(4, SteerPolicy::P2c).unwrap();
            // One eligible slot: that one.
            steer.set_eligible(1, true);
            assert_eq!(spread(&socks, addr, 10), vec![0, 10, 0, 0]);
            // Two: both are drawn each time, so the less loaded wins and the split stays exact.
            steer.set_eligible(3, true);
            assert_eq!(spread(&socks, addr, 10), vec![0, 0, 0, 10]);
            assert_eq!(spread(&socks, addr, 20), vec![0, 10, 0, 10]);
            // Four, one far busier: it is never the less loaded of a pair.
            steer.set_eligible(0, true);
            steer.set_eligible(2, true);
            word(steer, 1, page::ASSIGNED).fetch_add(1_000, Ordering::SeqCst);
            let got = spread(&socks, addr, 60);
            assert_eq!(got[1], 0, "{got:?}");
            assert_eq!(got.iter().sum::<usize>(), 60);
            // The two that had none catch up (each wins every pair it is in while it is behind).
            assert!(got[0] >= 15 && got[2] >= 15, "{got:?}");
            // Nothing eligible: the kernel's hash places them, the program counts nothing.
            let before: u64 = (0..4).map(|s| steer.counts(s).assigned).sum();
            for slot in 0..4 {
                steer.set_eligible(slot, false);
            }
            assert_eq!(spread(&socks, addr, 10).iter().sum::<usize>(), 10);
            assert_eq!(
                (0..4).map(|s| steer.counts(s).assigned).sum::<u64>(),
                before
            );
        });
    }

    #[test]
    fn equal_load_splits_exactly() {
        each_build(|steer| {
            let (socks, addr) = eligible_group(steer, 4);
            assert_eq!(spread(&socks, addr, 100), vec![25, 25, 25, 25]);
            // A slot whose load drops (its worker closed 10) gets the next 10.
            word(steer, 1, page::CLOSED).fetch_add(10, Ordering::SeqCst);
            assert_eq!(spread(&socks, addr, 10), vec![0, 10, 0, 0]);
            // Round-robin ignores closes: equal placements, in turn.
            steer.configure(4, SteerPolicy::RoundRobin).unwrap();
            assert_eq!(spread(&socks, addr, 30), vec![10, 0, 10, 10]);
            assert_eq!(spread(&socks, addr, 8), vec![2, 2, 2, 2]);
        });
    }
}
