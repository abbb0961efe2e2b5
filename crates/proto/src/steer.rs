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
//! | 36 | `reporting: u32` | the worker: [`REPORTING_SELF`] or the shim's [`REPORTING_SHIM`] once it counts |
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

/// Slots in the table (a power of two; the program masks indexes with `MAX_SLOTS - 1`).
pub const MAX_SLOTS: usize = 1024;
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
