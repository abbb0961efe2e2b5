//! The master process's parts: the [`acceptor`] thread (dispatch mode's hot path), the
//! [`supervisor`] on the main thread (the I/O driver of worker processes and signals), the pure
//! [`lifecycle`] state machine that takes every decision about workers, the [`listener`]
//! sockets, the preload [`shim`]'s location, and [`diagnose`], which explains a server that
//! cannot work in its mode. The pieces the acceptor and the supervisor call into: [`notify`]
//! (authenticated `NOTIFY_SOCKET`s), [`stall`] (workers that stop taking connections),
//! [`accounting`] (per-worker counts a worker cannot lie to), [`tree`] (a worker's process group)
//! and [`ratelimit`] (bounded logging of what others can trigger). Under kernel steering,
//! [`steer`] is the supervisor's side of the BPF program that places connections instead of the
//! acceptor.

pub mod acceptor;
pub mod accounting;
pub mod diagnose;
pub mod lifecycle;
pub mod listener;
pub mod notify;
pub mod ratelimit;
pub mod shim;
pub mod stall;
pub mod steer;
pub mod supervisor;
pub mod tree;
