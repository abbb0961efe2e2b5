//! The master process's parts: the [`acceptor`] thread (dispatch mode's hot path), the
//! [`supervisor`] on the main thread (worker processes, signals, lifecycle), and the
//! [`listener`] sockets both start from; under kernel steering, [`steer`] is the supervisor's
//! side of the BPF program that places connections instead of the acceptor.

pub mod acceptor;
pub mod listener;
pub mod steer;
pub mod supervisor;
