//! The master process's parts: the [`acceptor`] thread (dispatch mode's hot path), the
//! [`supervisor`] on the main thread (the I/O driver of worker processes and signals), the pure
//! [`lifecycle`] state machine that takes every decision about workers, the [`listener`]
//! sockets (bound, or inherited by socket [`activation`]), the preload [`shim`] unmodified
//! servers get, the sd_notify messages to the master's own service manager ([`notify`]), and
//! [`diagnose`], which explains a server that cannot work in its mode.

pub mod acceptor;
pub mod activation;
pub mod diagnose;
pub mod lifecycle;
pub mod listener;
pub mod notify;
pub mod shim;
pub mod supervisor;
