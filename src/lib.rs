//! rcluster-lb: one master, N pre-forked worker processes in any language, the master choosing
//! which worker gets each connection.
//!
//! ```text
//! client ──SYN──▶ kernel backlog ──▶ [master: acceptor thread (mio/epoll, optionally pinned)]
//!                                        │ accept4 until EAGAIN → policy.pick(load table)
//!                                        │ sendmmsg SCM_RIGHTS: 1 fd per message, up to 16 if the worker takes them
//!                                        ▼
//!                       SOCK_SEQPACKET channel per (worker, listener) ── fd 3+i in the worker
//!                                        ▼
//!                              [worker process, pinned to a CPU] accept() on fd 3+i
//!                                        │ on close: CLOSED(n) back on the same channel
//! [master: supervisor, on the main thread] spawns (fork/exec, PDEATHSIG), reaps (pidfd),
//! samples RSS, handles signals, restarts with backoff, reloads, drains; it talks to the
//! acceptor over a crossbeam channel plus a mio::Waker, and the acceptor reports back the same
//! way. The load table the policy reads is owned by the acceptor thread alone.
//! ```
//!
//! In `reuseport` and `shared` modes fd 3+i is a real listening socket the master created and
//! keeps open (so a worker's death never resets its queued connections); the acceptor is idle.
//!
//! Map of the source:
//! - [`cli`]: command line → validated [`cli::Config`].
//! - [`listener`]: binding listening sockets (backlog = somaxconn, SO_REUSEPORT sets).
//! - [`acceptor`]: the acceptor thread: accept, pick, send, reclaim.
//! - [`supervisor`]: worker lifecycle on the main thread.
//! - [`policy`]: the dispatch policies.
//! - [`protocol`]: the channel's wire format (docs/PROTOCOL.md).
//! - [`worker`]: the Rust worker API; [`demo`]: the built-in demo HTTP worker.
//! - [`topology`]: the host's CPUs and the `--pin auto` plan.
//! - [`loadgen`]: the load generator the end-to-end benchmarks drive.
//! - [`sys`]: every libc call.

pub mod acceptor;
pub mod cli;
pub mod demo;
pub mod listener;
pub mod loadgen;
pub mod policy;
pub mod protocol;
pub mod steer;
pub mod supervisor;
pub mod sys;
pub mod topology;
pub mod worker;
