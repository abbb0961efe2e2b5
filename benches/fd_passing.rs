//! Passing connection fds over a SOCK_SEQPACKET channel: one `sendmsg` per fd, one `sendmmsg`
//! per batch of 64 with one fd per message, and the same batch with 16 fds per message (what
//! the master sends a worker whose READY allows it). Each iteration sends 64 fds and the
//! receiving end takes all 64 back.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rcluster_proto::{HEADER_LEN, MAX_FDS_PER_CONN, ToWorker};
use rcluster_sys::scm::{self, SendBatch};
use rcluster_sys::socketpair_seqpacket;
use std::os::fd::{AsFd, OwnedFd};

const BATCH: usize = 64;

fn receive_all(end: std::os::fd::BorrowedFd<'_>, count: usize) {
    let mut buf = [0u8; HEADER_LEN];
    for _ in 0..count {
        let got = scm::recvmsg_fd(end, &mut buf, 0).expect("recvmsg");
        drop(got.fd.expect("an fd"));
    }
}

fn bench_fd_passing(c: &mut Criterion) {
    let (master, worker) = socketpair_seqpacket().unwrap();
    // Any fd will do as the passenger; a socket is what the acceptor passes.
    let passenger: OwnedFd = socketpair_seqpacket().unwrap().0;
    let payload = ToWorker::Conn { seq: 1 }.encode();
    let mut group = c.benchmark_group("fd_passing");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("sendmsg_one_per_syscall_x64", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                scm::sendmsg_fd(master.as_fd(), &payload, passenger.as_fd()).unwrap();
            }
            receive_all(worker.as_fd(), BATCH);
        })
    });
    let mut batch = SendBatch::<HEADER_LEN>::with_capacity(BATCH);
    group.bench_function("sendmmsg_batch_of_64", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                // The batch owns (and closes after sending) its fds, as the acceptor's does;
                // dup'ing the passenger stands in for accept4 creating one.
                batch
                    .push(payload, passenger.try_clone().unwrap())
                    .map_err(|_| ())
                    .unwrap();
            }
            assert_eq!(batch.send(master.as_fd(), 1).unwrap(), BATCH);
            receive_all(worker.as_fd(), BATCH);
        })
    });
    group.bench_function("sendmmsg_batch_of_64_16_fds_per_msg", |b| {
        let mut fds = Vec::with_capacity(MAX_FDS_PER_CONN);
        b.iter(|| {
            for _ in 0..BATCH {
                batch
                    .push(payload, passenger.try_clone().unwrap())
                    .map_err(|_| ())
                    .unwrap();
            }
            assert_eq!(batch.send(master.as_fd(), MAX_FDS_PER_CONN).unwrap(), BATCH);
            let mut buf = [0u8; HEADER_LEN];
            let mut got = 0;
            while got < BATCH {
                scm::recvmsg_fds(worker.as_fd(), &mut buf, 0, &mut fds).unwrap();
                got += fds.len();
                fds.clear();
            }
        })
    });
    group.bench_function("dup_and_close_x64_baseline", |b| {
        // What the batched case spends on creating and closing its own fds, for subtraction.
        b.iter(|| {
            for _ in 0..BATCH {
                drop(passenger.try_clone().unwrap());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench_fd_passing);
criterion_main!(benches);
