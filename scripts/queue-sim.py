#!/usr/bin/env python3
"""Tail latency of placement orders for the benchmark's heavy-tailed mix, in a model.

Two single-threaded workers that cannot be preempted (a request, once started, runs to its end),
Poisson arrivals, service times from the end-to-end benchmark's mix (98 % 0.2 ms, 2 % 20 ms),
no costs of any kind. The orders compared:

  fcfs      one queue; a worker that comes free takes the oldest connection (the kernel's
            shared accept queue with a server that accepts one connection per pass of its loop,
            as node does; kernel-steered least-conn's overflow queue)
  greedy    one queue; a worker that comes free takes every connection waiting and serves them
            in order (a server that accepts until EAGAIN on a shared listener)
  jsq       each connection committed on arrival to the worker holding fewer (least-conn by
            counts, nothing known of what runs)
  ros       one queue; a worker that comes free takes a random waiting connection
  lcfs      one queue; a worker that comes free takes the newest

Prints p99 and p99.9 of the response time (ms), median over SEEDS runs of ARRIVALS arrivals,
at each load (fraction of the two workers' capacity). Pure standard library; deterministic.

    scripts/queue-sim.py                 # loads 0.5 0.75 0.9, 6 seeds, 100000 arrivals
    LOADS="0.75" SEEDS=3 scripts/queue-sim.py
"""
import heapq
import os
import random
import statistics

SHORT_MS, LONG_MS, LONG_SHARE = 0.2, 20.0, 0.02
MEAN_MS = (1 - LONG_SHARE) * SHORT_MS + LONG_SHARE * LONG_MS
WORKERS = 2


def arrivals(load, n, seed):
    rng = random.Random(seed)
    rate = load * WORKERS / MEAN_MS
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append((t, LONG_MS if rng.random() < LONG_SHARE else SHORT_MS))
    return out, rng


def one_queue(arr, rng, order, greedy=False):
    """A shared queue; `order(queue, rng)` is the index a worker that comes free takes."""
    queue, events, latencies = [], [], []
    backlog = [[] for _ in range(WORKERS)]  # greedy: connections a worker took, in order
    busy = [False] * WORKERS

    def start(w, now):
        if greedy and not backlog[w] and queue:
            backlog[w].extend(queue)
            queue.clear()
        if greedy and backlog[w]:
            t, s = backlog[w].pop(0)
        elif not greedy and queue:
            t, s = queue.pop(order(queue, rng))
        else:
            busy[w] = False
            return
        busy[w] = True
        latencies.append(now + s - t)
        heapq.heappush(events, (now + s, w))

    i = 0
    while i < len(arr) or events:
        if events and (i >= len(arr) or events[0][0] <= arr[i][0]):
            now, w = heapq.heappop(events)
            start(w, now)
        else:
            queue.append(arr[i])
            now = arr[i][0]
            i += 1
            idle = [w for w in range(WORKERS) if not busy[w]]
            if idle:
                start(rng.choice(idle), now)
    return latencies


def jsq(arr, rng):
    """Committed on arrival to the worker with fewer connections not yet answered."""
    ends = [[] for _ in range(WORKERS)]  # per worker, the finish times of its connections
    latencies = []
    for t, s in arr:
        for e in ends:
            while e and e[0] <= t:
                e.pop(0)
        fewest = min(len(e) for e in ends)
        w = rng.choice([w for w in range(WORKERS) if len(ends[w]) == fewest])
        begin = max(t, ends[w][-1]) if ends[w] else t
        ends[w].append(begin + s)
        latencies.append(begin + s - t)
    return latencies


ORDERS = {
    "fcfs": lambda arr, rng: one_queue(arr, rng, lambda q, r: 0),
    "greedy": lambda arr, rng: one_queue(arr, rng, None, greedy=True),
    "jsq": jsq,
    "ros": lambda arr, rng: one_queue(arr, rng, lambda q, r: r.randrange(len(q))),
    "lcfs": lambda arr, rng: one_queue(arr, rng, lambda q, r: len(q) - 1),
}


def quantile(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def main():
    loads = [float(x) for x in os.environ.get("LOADS", "0.5 0.75 0.9").split()]
    seeds = int(os.environ.get("SEEDS", "6"))
    n = int(os.environ.get("ARRIVALS", "100000"))
    if not loads or not all(0 < x < 1 for x in loads) or seeds < 1 or n < 1000:
        raise SystemExit("queue-sim: LOADS in (0, 1), SEEDS >= 1, ARRIVALS >= 1000")
    print(f"{WORKERS} workers, {100 * (1 - LONG_SHARE):g} % {SHORT_MS} ms / "
          f"{100 * LONG_SHARE:g} % {LONG_MS} ms, Poisson arrivals; p99 / p99.9 ms, "
          f"median of {seeds} runs of {n} arrivals")
    print()
    print("| load | " + " | ".join(ORDERS) + " |")
    print("|---|" + "---:|" * len(ORDERS))
    for load in loads:
        cells = []
        for run in ORDERS.values():
            p99, p999 = [], []
            for seed in range(seeds):
                arr, rng = arrivals(load, n, seed)
                lat = sorted(run(arr, rng))
                p99.append(quantile(lat, 0.99))
                p999.append(quantile(lat, 0.999))
            cells.append(f"{statistics.median(p99):.1f} / {statistics.median(p999):.1f}")
        print(f"| {load:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
