//! The master process's parts: the [`acceptor`] thread (dispatch mode's hot path), the
//! [`supervisor`] on the main thread (worker processes, signals, lifecycle), and the
//! [`listener`] sockets both start from. The pieces those two call into: [`notify`]
//! (authenticated `NOTIFY_SOCKET`s), [`stall`] (workers that stop taking connections),
//! [`accounting`] (per-worker counts a worker cannot lie to), [`tree`] (a worker's process
//! group) and [`ratelimit`] (bounded logging of what others can trigger).

pub mod acceptor;
pub mod accounting;
pub mod listener;
pub mod notify;
pub mod ratelimit;
pub mod stall;
pub mod supervisor;
pub mod tree;
