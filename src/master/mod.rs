//! The master process's parts: the [`acceptor`] thread (dispatch mode's hot path), the
//! [`supervisor`] on the main thread (the I/O driver of worker processes and signals), the pure
//! [`lifecycle`] state machine that takes every decision about workers, the [`listener`]
//! sockets (bound, or inherited by socket [`activation`]), the preload [`shim`] unmodified
//! servers get, [`diagnose`], which explains a server that cannot work in its mode, and the
//! sd_notify messages to the master's own service manager ([`service_notify`]). The pieces the
//! acceptor and the supervisor call into: [`notify`] (the workers' authenticated
//! `NOTIFY_SOCKET`s), [`stall`] (workers that stop taking connections), [`accounting`]
//! (per-worker counts a worker cannot lie to), [`tree`] (a worker's process group),
//! [`ratelimit`] (bounded logging of what others can trigger) and [`rundir`] (where the private
//! directories go, and removing those killed masters left). Beside the workers: the message
//! [`bus`] (its own thread), the [`agent`] process, the heartbeat [`health`] checks and the
//! active [`probe`]s. Under kernel steering, [`steer`] is the supervisor's side of the BPF
//! program that places connections instead of the acceptor.
//!
//! Seeing and steering it: the [`control`] socket and the [`metrics`] endpoint, each on threads
//! of its own, read the cluster's [`status`] through the supervisor; [`logs`] writes the
//! master's lines and its workers' captured output to stderr.

pub mod acceptor;
pub mod accounting;
pub mod activation;
pub mod agent;
pub mod bus;
pub mod control;
pub mod diagnose;
pub mod health;
pub mod lifecycle;
pub mod listener;
pub mod logs;
pub mod metrics;
pub mod notify;
pub mod probe;
pub mod ratelimit;
pub mod rundir;
pub mod service_notify;
pub mod shim;
pub mod stall;
pub mod status;
pub mod steer;
pub mod supervisor;
pub mod tree;
