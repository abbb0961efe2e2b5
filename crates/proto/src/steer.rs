//! The kernel-steering table's memory layout (docs/PROTOCOL.md §7), shared by the master (which
//! creates the table and reads it), the Rust worker API and the preload shim (which count on it).
//! The worker finds the table at the fd named by [`crate::env::RCLUSTER_STEER_FD`]. Pure
//! constants.
//!
//! The table is a `BPF_F_MMAPABLE` array of [`MAX_SLOTS`] lines of [`SLOT_SIZE`] bytes, one per
//! worker slot, little-endian (the host's order), every field updated with atomics:
//!
//! | offset | field | written by |
//! | --- | --- | --- |
//! | 0 | `assigned: u64` | the program, after it placed a connection on the slot's listener |
//! | 8 | `accepted: u64` | the worker, per connection accepted from the listener |
//! | 16 | `closed: u64` | the worker, per connection closed (before the close) |
//! | 24 | `forgiven: i64` | the master: placements that never reached the worker |
//! | 32 | `eligible: u32` | the master: 1 while a ready worker serves the slot |
//! | 36 | `reporting: u32` | the worker: [`REPORTING_SELF`] or the shim's [`REPORTING_SHIM`] once it counts (low byte, [`REPORTING_WHO`]), plus one [`WATCHER`] per process accepting from the overflow queue ([`WATCHERS`]) |
//! | 40 | `rss_kib: u64` | the master: the slot's ready worker's resident memory in KiB (0 = not sampled yet) |
//! | 48 | `progress_ns: u64` | the worker, per accept, and the program, per placement on a queue with nothing untaken: `CLOCK_MONOTONIC` ns |
//! | 56 | `busy_ns: u64` | the worker: `CLOCK_MONOTONIC` ns when the loop that accepts left its wait; 0 while it waits (or when it does not say) |
//!
//! The program's load for a slot is `assigned - closed - forgiven`; `least-mem` also reads
//! `rss_kib`. Except under round-robin, a *stuck* slot sorts after every other before the load
//! is compared (under least-mem, after the RSS tolerance): one whose `busy_ns` is non-zero and
//! older than [`STUCK_NS`] (a single-threaded server inside one long request), or, for a worker
//! that reports, one with a placement untaken (`assigned - accepted - forgiven > 0`) for longer
//! than [`STUCK_NS`] since `progress_ns`. Among stuck slots, the one stuck for less time comes
//! first, whatever the loads.
//!
//! # The overflow queue
//!
//! The table's last line, [`OVERFLOW`], is not a worker slot: it counts for one more listener
//! per address in the reuseport group, which the master holds and every worker may accept from
//! (the fd at [`crate::env::RCLUSTER_STEER_OVERFLOW_FD`]` + i` for listener `i`). When every
//! eligible slot is stuck and at least one of them has a [`WATCHER`], the program
//! places the connection there instead of on the slot stuck for less time: it waits for the
//! first worker to come free rather than behind one request whose end nobody can predict. On
//! that line the program adds `assigned` per placement and a worker adds `accepted` per
//! connection it takes (and `assigned` and `accepted` on its own line, so its load counts the
//! connection); the master sets `eligible` while the queue's listeners exist.

/// Slots in the table (a power of two; the program masks indexes with `MAX_SLOTS - 1`).
pub const MAX_SLOTS: usize = 1024;
/// Worker slots (`0..WORKER_SLOTS`): the last line is the overflow queue's.
pub const WORKER_SLOTS: usize = MAX_SLOTS - 1;
/// The overflow queue's line (module docs) and its index in each socket array.
pub const OVERFLOW: usize = MAX_SLOTS - 1;
/// Bytes per slot (one cache line).
pub const SLOT_SIZE: usize = 64;
/// Bytes of the whole table, what a worker maps.
pub const TABLE_SIZE: usize = MAX_SLOTS * SLOT_SIZE;
/// Offset of `assigned` in a slot.
pub const ASSIGNED: usize = 0;
/// Offset of `accepted` in a slot.
pub const ACCEPTED: usize = 8;
/// Offset of `closed` in a slot.
pub const CLOSED: usize = 16;
/// Offset of `forgiven` in a slot.
pub const FORGIVEN: usize = 24;
/// Offset of `eligible` in a slot.
pub const ELIGIBLE: usize = 32;
/// Offset of `reporting` in a slot.
pub const REPORTING: usize = 36;
/// Offset of `rss_kib` in a slot.
pub const RSS_KIB: usize = 40;
/// Offset of `progress_ns` in a slot.
pub const PROGRESS_NS: usize = 48;
/// Offset of `busy_ns` in a slot.
pub const BUSY_NS: usize = 56;
/// How long a placement may wait untaken, or a worker's loop stay out of its wait, before the
/// program treats the slot as stuck (`STUCK_NS` in the program; the dispatcher's
/// `policy::STUCK_AFTER`).
pub const STUCK_NS: u64 = 1_000_000;
/// `reporting` value stored by the preload shim: it counts for a server that does not.
pub const REPORTING_SHIM: u32 = 1;
/// `reporting` value stored by a worker that counts itself (the Rust worker API): the shim,
/// preloaded into the same process, then stands aside so nothing is counted twice.
pub const REPORTING_SELF: u32 = 2;
/// The part of `reporting` that says who counts ([`REPORTING_SHIM`], [`REPORTING_SELF`]).
pub const REPORTING_WHO: u32 = 0xff;
/// One process watching the overflow queue, in `reporting` (added and subtracted atomically:
/// an old and a new worker of one slot may both watch during a reload). The program spills only
/// while an eligible slot has one ([`WATCHERS`]).
pub const WATCHER: u32 = 0x100;
/// The part of `reporting` that counts the slot's processes watching the overflow queue.
pub const WATCHERS: u32 = 0xff00;

/// The BPF program's C source (`bpf/steer.bpf.c`) mirrors this layout; this checks the part the
/// Rust side can.
const _: () = assert!(
    MAX_SLOTS.is_power_of_two()
        && SLOT_SIZE == 64
        && REPORTING + 4 <= RSS_KIB
        && RSS_KIB.is_multiple_of(8)
        && RSS_KIB + 8 <= PROGRESS_NS
        && PROGRESS_NS + 8 == BUSY_NS
        && BUSY_NS + 8 == SLOT_SIZE
);

/// Byte offset of `field` in `slot`'s line.
pub const fn offset(slot: usize, field: usize) -> usize {
    slot * SLOT_SIZE + field
}

/// A line's placements not yet accepted nor written off: `assigned − accepted − forgiven`
/// (`slot_untaken` in bpf/steer.bpf.c), wrapping as the counters do. On the overflow queue's
/// line, above 0 means a connection may wait there.
pub const fn untaken(assigned: u64, accepted: u64, forgiven: i64) -> i64 {
    (assigned.wrapping_sub(accepted) as i64).wrapping_sub(forgiven)
}
