//! The master process's parts: the [`acceptor`] thread (dispatch mode's hot path), the
//! [`supervisor`] on the main thread (the I/O driver of worker processes and signals), the pure
//! [`lifecycle`] state machine that takes every decision about workers, the [`listener`]
//! sockets, the preload [`shim`]'s location, [`diagnose`], which explains a server that cannot
//! work in its mode, the message [`bus`] (its own thread), the [`agent`] process, the heartbeat
//! [`health`] checks and the active [`probe`]s.

pub mod acceptor;
pub mod agent;
pub mod bus;
pub mod diagnose;
pub mod health;
pub mod lifecycle;
pub mod listener;
pub mod probe;
pub mod shim;
pub mod supervisor;
