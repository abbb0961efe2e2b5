//! The rcluster-lb worker contract, defined once for the master, the Rust worker API and the
//! preload shim (docs/PROTOCOL.md is its description for workers in other languages):
//!
//! - [`wire`]: the dispatch channel's 16-byte messages, one type per direction
//!   ([`ToWorker`] master → worker, [`ToMaster`] worker → master);
//! - [`mod@env`]: the environment a worker is started with ([`ChildEnv`] builds it in the master,
//!   [`Contract`] parses it in a worker);
//! - [`steer`]: the layout of the kernel-steering table workers count on;
//! - the limits both sides rely on ([`MAX_LISTENERS`], [`MAX_FDS_PER_CONN`],
//!   [`LISTEN_FDS_START`]) and the [`Mode`] that says what fd `3+i` is.
//!
//! This crate has no dependencies and no `unsafe`: it is pure data and parsing.

pub mod env;
pub mod steer;
pub mod wire;

pub use env::{ChildEnv, Contract, ContractError, Mode, NotifyAddr, Role};
pub use wire::{HEADER_LEN, MAX_FDS_PER_CONN, ProtocolError, ToMaster, ToWorker};

/// The first inherited fd (`SD_LISTEN_FDS_START`, sd_listen_fds(3)): listener `i` is fd `3 + i`.
pub const LISTEN_FDS_START: i32 = 3;

/// The most listeners (`--listen` addresses) a master serves and a worker adopts: the master's
/// per-worker open mask is a `u64`, and the shim stores a listener's index in 8 bits.
pub const MAX_LISTENERS: usize = 64;
