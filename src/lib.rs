//! rcluster-lb: one master, N pre-forked worker processes in any language, the master choosing
//! which worker gets each connection. This crate is the master; the worker contract, the system
//! calls and the Rust worker API are crates of their own (see the README's source map).
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
//! Kernel steering (`--steer`, the dispatch policies where the program loads):
//!
//! ```text
//! client ──SYN──▶ [SK_REUSEPORT program: the policy's pick among eligible slots] ──▶ slot i's own listener
//!                        ▲ reads assigned/closed/eligible/rss_kib, adds 1 to assigned         │ fd 3+i
//!                        │                                                                    ▼
//!        BPF_F_MMAPABLE table ◀── mmap: +accepted, +closed ── [worker i] accept() / close()
//!                        ▲
//! [master: supervisor] eligibility on every lifecycle change, reconciliation every 100 ms,
//!                      worker RSS every --rss-interval (least-mem)
//! ```
//!
//! Map of this crate:
//! - [`cli`]: command line → validated [`cli::Config`].
//! - [`master`]: the master's parts — [`master::acceptor`] (accept, pick, send, reclaim),
//!   [`master::supervisor`] (worker processes on the main thread), [`master::listener`]
//!   (binding listening sockets).
//!   [`master::control`] (the control socket), [`master::metrics`] (Prometheus endpoint),
//!   [`master::status`] (the status both serve).
//! - [`ctl`]: the `rcluster-lb ctl` client; [`output`]: the subcommands' stdout, where a reader
//!   that closes the pipe early ends the command quietly.
//! - [`policy`]: the dispatch policies.
//! - [`steer`]: the kernel-steering program (instructions generated from `bpf/steer.bpf.c`), its
//!   maps and loading; [`master::steer`] runs it for the supervisor.
//! - [`topology`]: the host's CPUs and the `--pin auto` plan; [`cgroup`]: the CPU quota
//!   `--workers 0` honours.
//!
//! Its public surface is what the binary, the benchmarks and the tests drive: [`cli::Args`] →
//! [`cli::Config`] → [`master::supervisor::run`]; the acceptor and the policies for the
//! criterion benchmarks.

pub mod cgroup;
pub mod cli;
pub mod ctl;
pub mod master;
pub mod output;
pub mod policy;
pub mod steer;
pub mod topology;

/// Every libc call goes through the sys crate; `crate::sys` names it inside the master.
use rcluster_sys as sys;
