//! The master process's parts: the [`acceptor`] thread (dispatch mode's hot path), the
//! [`supervisor`] on the main thread (worker processes, signals, lifecycle), and the
//! [`listener`] sockets both start from (bound, or inherited by socket [`activation`]), the
//! preload [`shim`] unmodified servers get, and the sd_notify messages to the master's own
//! service manager ([`notify`]).

pub mod acceptor;
pub mod activation;
pub mod listener;
pub mod notify;
pub mod shim;
pub mod supervisor;
