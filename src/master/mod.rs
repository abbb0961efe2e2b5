//! The master process's parts: the [`acceptor`] thread (dispatch mode's hot path), the
//! [`supervisor`] on the main thread (worker processes, signals, lifecycle), and the
//! [`listener`] sockets both start from; the [`control`] socket and the [`metrics`] endpoint,
//! each on threads of its own, read the cluster's [`status`] through the supervisor.

pub mod acceptor;
pub mod control;
pub mod listener;
pub mod metrics;
pub mod status;
pub mod supervisor;
