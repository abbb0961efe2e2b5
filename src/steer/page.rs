//! The steering table's memory layout and the worker contract's variables for it, shared by the
//! master ([`super::Steering`]), the Rust worker API and (copied) the preload shim; documented
//! in docs/PROTOCOL.md. Pure constants, no I/O.
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
//! | 36 | `reporting: u32` | the worker: 1 once it counts accepted/closed |
//!
//! The program's load for a slot is `assigned - closed - forgiven`.

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

/// Environment variable naming the inherited fd of the table (a BPF map fd to `mmap`), set only
/// when the kernel steers. The worker's slot is `RCLUSTER_WORKER_ID`.
pub const ENV_STEER_FD: &str = "RCLUSTER_STEER_FD";

/// Byte offset of `field` in `slot`'s line.
pub const fn offset(slot: usize, field: usize) -> usize {
    slot * SLOT_SIZE + field
}
