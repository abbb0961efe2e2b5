//! `pick` per policy at 2, 8 and 64 workers. The table is built outside the timed loop; each
//! pick's winner gets one more active connection (as the acceptor does) so least-conn and p2c
//! see a changing table rather than a constant answer.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rcluster_lb::policy::{PolicyKind, WorkerStat};
use std::hint::black_box;

fn table(n: usize) -> Vec<WorkerStat> {
    (0..n)
        .map(|i| WorkerStat {
            active: ((i * 7919) % 13) as u32,
            rss_kib: 40_000 + ((i * 104_729) % 5_000) as u32,
            open: 1,
            queued: (i % 3 == 0) as u32,
            progress: (i * 31) as u32,
            stuck: i % 5 == 4,
        })
        .collect()
}

fn bench_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for kind in PolicyKind::ALL {
        let Some(mut policy) = kind.build() else {
            continue;
        };
        for n in [2usize, 8, 64] {
            let mut stats = table(n);
            group.bench_with_input(BenchmarkId::new(kind.name(), n), &n, |b, _| {
                b.iter(|| {
                    let i = policy.pick(black_box(&stats), 0).expect("all open");
                    // Keep the numbers bounded: what is dispatched also closes.
                    stats[i].active = (stats[i].active + 1) % 16;
                    black_box(i)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_pick);
criterion_main!(benches);
