//! The master process's parts: the [`acceptor`] thread (dispatch mode's hot path), the
//! [`supervisor`] on the main thread (worker processes, signals, lifecycle), and the
//! [`listener`] sockets both start from; [`diagnose`] explains a server that cannot work in
//! its mode.

pub mod acceptor;
pub mod diagnose;
pub mod listener;
pub mod supervisor;
