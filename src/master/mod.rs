//! The master process's parts: the [`acceptor`] thread (dispatch mode's hot path), the
//! [`supervisor`] on the main thread (worker processes, signals, lifecycle), and the
//! [`listener`] sockets both start from.

pub mod acceptor;
pub mod listener;
pub mod supervisor;
