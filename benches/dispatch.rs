//! The master's whole per-connection path — accept4 → pick → sendmmsg → close of its copy —
//! through the real [`Acceptor`], against a bare `accept4` of the same connections. Clients
//! connect outside the timed part (the kernel completes handshakes into the backlog) and every
//! connection is torn down outside it (by the client's RST), since in both cases ending the
//! connection is the server's work, not the master's. The difference per connection is what
//! rcluster-lb costs on top of accepting.

use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mio::{Poll, Token, Waker};
use rcluster_lb::master::acceptor::{Acceptor, AcceptorConfig, ChannelEnds, Command};
use rcluster_lb::policy::PolicyKind;
use rcluster_proto::{HEADER_LEN, MAX_FDS_PER_CONN, ToMaster};
use rcluster_sys::{self as sys, scm};

/// Connections per timed round.
const ROUND: usize = 64;
const WORKERS: usize = 4;

fn connect_round(addr: std::net::SocketAddr) -> Vec<TcpStream> {
    (0..ROUND)
        .map(|_| {
            let s = TcpStream::connect(addr).unwrap();
            // RST on close: no TIME_WAIT, so rounds never run out of ephemeral ports.
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            s
        })
        .collect()
}

fn bench_dispatch(c: &mut Criterion) {
    let mut group = c.benchmark_group("master_path");
    group.throughput(Throughput::Elements(ROUND as u64));
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(4));

    group.bench_function("bare_accept4", |b| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted: Vec<OwnedFd> = Vec::with_capacity(ROUND);
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let clients = connect_round(addr);
                let start = Instant::now();
                for _ in 0..ROUND {
                    accepted.push(sys::accept4(listener.as_fd(), false).unwrap());
                }
                total += start.elapsed();
                // Tear down outside the timed part, clients first (RST), as in the dispatch
                // case, where the worker, not the master, ends the connection.
                drop(clients);
                accepted.clear();
            }
            total
        })
    });

    for kind in [PolicyKind::RoundRobin, PolicyKind::LeastConn] {
        group.bench_function(format!("accept_pick_send_{}", kind.name()), |b| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let sup_poll = Poll::new().unwrap();
            let sup_waker = Arc::new(Waker::new(sup_poll.registry(), Token(0)).unwrap());
            let (events_tx, _events_rx) = crossbeam_channel::unbounded();
            let (mut acceptor, commands, _waker) = Acceptor::new(
                AcceptorConfig {
                    listeners: vec![listener],
                    policy: kind.build().unwrap(),
                    cpu: None,
                    stall_timeout: Duration::from_secs(3600),
                },
                events_tx,
                sup_waker,
            )
            .unwrap();
            let mut worker_ends: Vec<OwnedFd> = Vec::new();
            for id in 0..WORKERS as u64 {
                let (master, worker) = sys::socketpair_seqpacket().unwrap();
                let dup = worker.try_clone().unwrap();
                worker_ends.push(worker);
                commands
                    .send(Command::Add {
                        id,
                        slot: id as usize,
                        pid: 0,
                        channels: vec![ChannelEnds {
                            master,
                            worker: dup,
                        }],
                        max_conns: None,
                    })
                    .unwrap();
                // The fake worker announces itself as the Rust worker API does: READY, taking
                // up to MAX_FDS_PER_CONN connections per message.
                let ready = ToMaster::Ready {
                    max_fds: MAX_FDS_PER_CONN as u64,
                };
                scm::send(worker_ends[id as usize].as_fd(), &ready.encode(), 0).unwrap();
            }
            acceptor.turn(Some(Duration::ZERO)).unwrap();
            acceptor.turn(Some(Duration::ZERO)).unwrap();
            let mut buf = [0u8; HEADER_LEN];
            let mut fds: Vec<OwnedFd> = Vec::new();
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let clients = connect_round(addr);
                    let start = Instant::now();
                    // One wake-up accepts the whole round (the burst limit is larger).
                    acceptor.turn(Some(Duration::ZERO)).unwrap();
                    total += start.elapsed();
                    drop(clients);
                    // The "workers" take their connections and report them closed, one
                    // CLOSED(n) per worker per round as an event-loop worker coalesces them
                    // (the master reads those in the next, timed, turn), so the load table
                    // stays as it would in steady state.
                    let mut got = 0;
                    for end in &worker_ends {
                        let mut taken = 0;
                        while scm::recvmsg_fds(end.as_fd(), &mut buf, libc::MSG_DONTWAIT, &mut fds)
                            .is_ok()
                        {
                            taken += fds.len() as u64;
                            fds.clear();
                        }
                        if taken > 0 {
                            let closed = ToMaster::Closed { count: taken }.encode();
                            scm::send(end.as_fd(), &closed, 0).unwrap();
                        }
                        got += taken as usize;
                    }
                    assert_eq!(got, ROUND, "every accepted connection was dispatched");
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_dispatch);
criterion_main!(benches);
