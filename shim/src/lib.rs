//! rcluster-shim: an `LD_PRELOAD` library that makes an unmodified, dynamically linked
//! libc-based server (node, python, nginx, …) behave as an rcluster-lb worker.
//!
//! ```text
//!  master ──(fd 3+i: dispatch channel or real listener, env RCLUSTER_*)──▶ worker process
//!                                                                          │ constructor: read env,
//!                                                                          │ drop our LD_PRELOAD
//!                                                                          │ entry, adopt fds
//!  server: socket() → bind(port of listener i) ──▶ shim: dup3(listener i, server's fd)
//!          listen()                            ──▶ shim: no-op; dispatch: READY
//!          accept4(fd)                         ──▶ dispatch: recvmsg one CONN + its fd
//!                                                  reuseport/shared: the kernel's accept
//!          close(conn) / syscall(SYS_close)    ──▶ shim: real close, then CLOSED(1)
//!          close(listener)                     ──▶ shim: real close, then STOPPING
//! ```
//!
//! Modules: `interpose` (the exported symbols and the constructor), `state` (the process-wide
//! state and what each call does), `dispatch` (accept on a channel), `listener` (one
//! listener's claim and notifications), `conns` (the lock-free fd table behind CLOSED), `env`
//! (reading the contract, whose one definition — wire format, variables, limits — is the
//! `rcluster-proto` crate; and the `LD_PRELOAD` scrub), `sockaddr`, `notify` (sd_notify
//! READY=1), `drain` (a runtime's one-shot SIGTERM exit held until the worker's connections are closed, dispatch mode), `steer` (accept/close counts on the kernel-steering table), `overflow` (the kernel-steering overflow queue, watched through the server's epoll sets), `sockopts` (TCP options set on a dispatch channel: recorded, answered, applied to
//! each connection), `procs` (open connections per process, shared across `fork`, so a
//! server's own forked workers are accounted even when one dies), `follow` (what
//! `exec`/`posix_spawn` pass on: the whole contract to the
//! worker's own next image, none of it to children), `real` (the shadowed libc functions).
//! docs/PROTOCOL.md describes the contract and the shim's behaviour for master authors,
//! including what the worker and its children see in their environment.
#![cfg_attr(test, allow(dead_code))]

mod conns;
mod dispatch;
mod drain;
mod env;
mod follow;
#[cfg(not(test))]
mod interpose;
mod listener;
mod notify;
mod overflow;
mod procs;
mod real;
mod sockaddr;
mod sockopts;
mod state;
mod steer;
