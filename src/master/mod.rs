//! The master process's parts: the [`acceptor`] thread (dispatch mode's hot path), the
//! [`supervisor`] on the main thread (the I/O driver of worker processes and signals), the pure
//! [`lifecycle`] state machine that takes every decision about workers, the [`listener`]
//! sockets, and the preload [`shim`]'s location; the [`control`] socket and the [`metrics`]
//! endpoint, each on threads of its own, read the cluster's [`status`] through the supervisor.

pub mod acceptor;
pub mod control;
pub mod lifecycle;
pub mod listener;
pub mod logs;
pub mod metrics;
pub mod shim;
pub mod status;
pub mod supervisor;
