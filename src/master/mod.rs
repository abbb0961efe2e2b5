//! The master process's parts: the [`acceptor`] thread (dispatch mode's hot path), the
//! [`supervisor`] on the main thread (the I/O driver of worker processes and signals), the pure
//! [`lifecycle`] state machine that takes every decision about workers, the [`listener`]
//! sockets, and the preload [`shim`]'s location.

pub mod acceptor;
pub mod lifecycle;
pub mod listener;
pub mod shim;
pub mod supervisor;
