// SPDX-License-Identifier: MIT OR Apache-2.0
//
// Kernel-steered placement: a BPF_PROG_TYPE_SK_REUSEPORT program attached to the reuseport
// group of one listening address (one listener per worker slot, the master holds them all).
// For each new connection (at SYN time, and for a closed listener's queue when attached as
// BPF_SK_REUSEPORT_SELECT_OR_MIGRATE) it picks an eligible slot by the policy the master wrote
// in steer_meta, from each slot's load
//
//     load = assigned - closed - forgiven            (signed; see docs/PROTOCOL.md)
//
//   - least-conn: the least load;
//   - round-robin: the least assigned - forgiven (equal shares, each slot in turn);
//   - p2c: two distinct eligible slots drawn at random (each eligible slot draws a key with
//     bpf_get_prandom_u32, the two smallest keys win), the one with the less load (a tie goes
//     to the first drawn); with one eligible slot, that one;
//   - least-mem: the smallest rss_kib (the master's sample of the slot's worker, 0 = not sampled
//     yet), where slots within max(1/8 of the smallest, 16 MiB) of the smallest tie and ties go
//     by the least load (src/policy/least_mem.rs in dispatch mode).
//
// Except under round-robin, a stuck slot (stuck_for: a placement untaken for STUCK_NS since its
// queue last moved, or a worker loop out of its wait for STUCK_NS) comes after every slot
// that is not, before the load (under least-mem, after the RSS tolerance): the dispatcher's
// stuck bit, from time the kernel keeps.
// Among stuck slots the one stuck for less time comes first, whatever the loads: in a
// heavy-tailed mix, the longer a request has run the longer it is likely still to run, and a
// worker merely descheduled for a moment must not lose to one inside a long request.
//
// Under least-conn and least-mem, among slots equally stuck and equally loaded, one whose loop
// waits for events comes before one whose loop serves something, and of two serving the one
// that began later (busy_for).
//
// When the pick is stuck (so every eligible slot is: under least-mem, every one within the RSS
// tolerance; under p2c, both drawn), or (least-conn, p2c) its loop has been serving for over
// SPILL_BUSY_NS, or its worker has not yet taken a connection already placed on its listener,
// or connections placed on the overflow queue wait there untaken, while the loads are nearly
// level (no eligible slot, under p2c neither drawn, holds more than one above the pick), and
// an eligible slot's worker watches the overflow queue (WATCHERS in
// its `reporting`), the connection goes to the overflow queue instead: one more listener of the
// group, at index STEER_OVERFLOW of the socket array, that every watching worker accepts from
// when its own listener has nothing. (Nearly level loads bound what spills of a pick that is
// merely busy can do to the balance: the most loaded worker taking one ends two above the
// pick, and no busy pick spills again until the gap is back to one, so long-lived connections
// stay split within two by these spills. Stricter rules cost node's heavy-tailed p99 at 75–90 %
// load, BENCHMARKS.md: level loads keep connections on a pick that holds fewer because it is
// inside a long request, for the first 1 ms of that request, and one spill at a time puts the
// rest behind busy picks. A stuck pick spills whatever the loads.) A connection that arrives
// while others wait in the queue joins them even when the pick's loop waits: placed on the
// pick's own listener it would pass them, because a worker takes its own listener's connections
// before the queue's, and the wait of the oldest is the tail (BENCHMARKS.md, issue #14). So
// while the loads are level, connections are taken oldest first whoever takes them, as from
// the kernel's one shared queue. It then waits for the first
// worker to come free (one whose loop waits takes it at once), not behind work whose end nobody
// can predict: the kernel's shared queue where that is what a connection needs, placement by
// load where a worker is free. Its placements are counted on the table's line STEER_OVERFLOW
// (eligible while the master holds the queue's listeners).
//
// `assigned` is counted here, atomically, after a successful bpf_sk_select_reuseport; workers
// add `accepted` and `closed` through the mmapped page and stamp `progress_ns` (each accept) and
// `busy_ns` (their loop's waits); the master writes `eligible`, `nslots`,
// `forgiven` (its reconciliation of handshakes that never completed) and `rss_kib`. Remaining
// ties rotate by the connection's hash. With no eligible slot the program selects a slot's
// listener by the connection's hash, or slot 0's (never the overflow queue), and where neither
// holds a listener returns SK_PASS without selecting, so the kernel's hash decides: it never
// drops a connection.
//
// Scanning calls a callback per slot: the verifier checks a callback as a loop body, where a
// plain loop over the slots makes it explore every iteration's branches ("sequence of 8193 jumps
// is too complex" with CAP_BPF alone). This file builds two ways. By default the scan is
// bpf_loop (5.17+), whose calls the verifier turns into a plain loop with a direct call of the
// callback (5.19+): about 120 ns less per connection under node churn than the indirect calls
// of bpf_for_each_map_elem (BENCHMARKS.md). Built with -DSTEER_FOR_EACH, the scan is
// bpf_for_each_map_elem (5.13+), for the kernels before bpf_loop: the loader tries the first
// and falls back to the second. least-mem scans twice: the smallest RSS, then the pick with the
// tolerance known. Indexes are masked before use.
//
// The Rust side embeds both builds' instructions (scripts/gen-bpf.sh regenerates
// src/steer/prog.rs) and patches the map references at load time (steer_scratch, the
// per-CPU scan state, is the program's own: a master given the program by `steer-load` never
// sees it).

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

// Must match steer::MAX_SLOTS in the Rust code (a power of two).
#define STEER_MAX_SLOTS 1024
// The overflow queue's line of the table and index in the socket array (steer::OVERFLOW); worker
// slots are 0..STEER_OVERFLOW.
#define STEER_OVERFLOW (STEER_MAX_SLOTS - 1)
// The part of `reporting` counting the slot's processes that accept from the overflow queue
// (steer::WATCHERS).
#define WATCHERS 0xff00

// One slot's line of the shared table: 64 bytes, the layout docs/PROTOCOL.md documents.
struct steer_slot {
    __u64 assigned;  // program: connections it placed on this slot's listener
    __u64 accepted;  // worker: connections it accepted from the listener
    __u64 closed;    // worker: connections it closed
    __s64 forgiven;  // master: placements that never reached the worker (abandoned handshakes)
    __u32 eligible;  // master: 1 = a ready worker serves this slot
    __u32 reporting; // worker: who counts accepted/closed here (low byte), + watchers (WATCHERS)
    __u64 rss_kib;   // master: the slot's ready worker's resident memory, KiB (0 = not known)
    __u64 progress_ns; // program and worker: when the slot's queue last moved (CLOCK_MONOTONIC)
    __u64 busy_ns;   // worker: when its accepting loop left its wait; 0 while it waits
};

// A slot is stuck when a placement has waited untaken for longer than this since the queue last
// moved (STUCK_AFTER in src/policy/mod.rs, the dispatcher's rule), or when the worker's
// accepting loop has been out of its wait for longer than this (one long request on a
// single-threaded server): it then sorts after every slot that is not, whatever the loads.
// (100 µs for the loop was tried: on two CPUs shared with the clients a worker descheduled in
// the middle of a short request crosses it often, and the placement stopped following the
// loads without lowering the tail; BENCHMARKS.md.)
#define STUCK_NS 1000000ULL

// The pick's loop has been out of its wait this long (it is serving something): the connection
// goes to the overflow queue, when watched, and the first watching worker to wait takes it (at
// once if one waits already) rather than it queueing behind work whose length nobody knows.
// Short enough that a worker merely handling an event is still "free"; far shorter than
// STUCK_NS, which orders the slots rather than deciding whether to spill.
#define SPILL_BUSY_NS 50000ULL

// How a slot is picked (steer_meta.policy; SteerPolicy in src/steer/mod.rs).
#define STEER_LEAST_CONN 0   // the least assigned - closed - forgiven: connections still open
#define STEER_ROUND_ROBIN 1  // the least assigned - forgiven: placements, so equal shares in turn
#define STEER_P2C 2          // of two eligible slots drawn at random, the less loaded
#define STEER_LEAST_MEM 3    // the smallest rss_kib (with a tolerance), then the least load

// least-mem's tolerance: slots within max(smallest / 8, 16 MiB) of the smallest RSS tie
// (rss_tolerance_kib in src/policy/least_mem.rs).
#define RSS_TOLERANCE_MIN_KIB (16 * 1024)

struct steer_meta {
    __u32 nslots;    // master: slots in use, 0..nslots are scanned
    __u32 policy;    // master: one of STEER_*
};

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(map_flags, BPF_F_MMAPABLE);
    __uint(max_entries, STEER_MAX_SLOTS);
    __type(key, __u32);
    __type(value, struct steer_slot);
} steer_slots SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct steer_meta);
} steer_meta SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
    __uint(max_entries, STEER_MAX_SLOTS);
    __type(key, __u32);
    __type(value, __u64);
} steer_socks SEC(".maps");

struct scan {
    __u32 nslots;
    __u32 policy;
    __u32 rotate;    // hash % nslots: the slot that wins a tie first
    __u32 best;      // STEER_MAX_SLOTS = none yet
    __u32 best_rank; // (slot - rotate) mod nslots of the best so far
    __u32 best_far;  // least-mem: the best so far is beyond the RSS tolerance
    __s64 best_load;
    __u64 rss_min;   // survey: the smallest RSS among the eligible slots (~0: none yet)
    __u64 rss_near;  // least-mem: RSS above this is beyond the tolerance
    __u32 draw[2];   // p2c: the random keys of best and second
    __u32 second;    // p2c: the second drawn slot (STEER_MAX_SLOTS = none)
    __u32 pad;
    __s64 second_load;
    __u64 now;       // bpf_ktime_get_ns() at the start of the pick
    __u64 best_stuck;   // stuck_for of best, of second
    __u64 second_stuck;
    __u32 watch;     // an eligible slot's worker watches the overflow queue
    __u32 pad2;
    __u64 best_busy; // busy_for of best, of second
    __u64 second_busy;
    __s64 max_load;  // the largest load among the eligible slots (p2c: the two drawn)
};

// The scan's state for the run on this CPU (struct scan_ref below). Its value size is
// SCRATCH_MAP's in src/steer/mod.rs.
_Static_assert(sizeof(struct scan) == 128, "struct scan is steer_scratch's value: 128 bytes");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct scan);
} steer_scratch SEC(".maps");

struct bpf_map;

static __always_inline __s64 slot_load(const struct steer_slot *slot, __u32 policy)
{
    __u64 done = policy == STEER_ROUND_ROBIN ? 0 : slot->closed;
    return (__s64)(slot->assigned - done) - slot->forgiven;
}

// Placements on the slot's listener not yet accepted by its worker (nor written off).
static __always_inline __s64 slot_untaken(const struct steer_slot *slot)
{
    return (__s64)(slot->assigned - slot->accepted) - slot->forgiven;
}

// How long the slot has been stuck at `now`, in ns (0: not stuck). Stuck: the worker's loop has
// been out of its wait for over STUCK_NS (a worker that reports its waits: the shim or the
// worker API), or a placement has waited untaken that long since the queue last moved (a worker
// that reports its accepts); the longer of the two when both hold.
static __always_inline __u64 stuck_for(const struct steer_slot *slot, __u64 now)
{
    __u64 age = 0;
    __u64 busy = slot->busy_ns;
    if (busy != 0 && (__s64)(now - busy) > (__s64)STUCK_NS)
        age = now - busy;
    if (slot->reporting != 0 && slot_untaken(slot) > 0) {
        __u64 waited = now - slot->progress_ns;
        if ((__s64)waited > (__s64)STUCK_NS && waited > age)
            age = waited;
    }
    return age;
}

// How long the slot's loop has been out of its wait at `now`, in ns (0: it waits, or its
// worker does not say).
static __always_inline __u64 busy_for(const struct steer_slot *slot, __u64 now)
{
    __u64 busy = slot->busy_ns;
    if (busy == 0 || (__s64)(now - busy) <= 0)
        return 0;
    return now - busy;
}

// least-conn, least-mem: the smallest (beyond the RSS tolerance, stuck_for, load, busy_for,
// rank): a worker over least-mem's tolerance gets nothing while another can take it, stuck or
// not; round-robin: the smallest (load, rank), stuck or not, so shares stay equal.
static __always_inline long visit_slot(__u32 idx, struct steer_slot *slot, struct scan *scan)
{
    if (idx >= scan->nslots)
        return 1; // past the slots in use: stop
    if (!slot->eligible)
        return 0;
    if (slot->reporting & WATCHERS)
        scan->watch = 1;
    __s64 load = slot_load(slot, scan->policy);
    __u64 stuck = scan->policy != STEER_ROUND_ROBIN ? stuck_for(slot, scan->now) : 0;
    __u32 far = scan->policy == STEER_LEAST_MEM && slot->rss_kib > scan->rss_near;
    __u64 busy = scan->policy != STEER_ROUND_ROBIN ? busy_for(slot, scan->now) : 0;
    __u32 rank = idx >= scan->rotate ? idx - scan->rotate : idx + scan->nslots - scan->rotate;
    if (load > scan->max_load)
        scan->max_load = load;
    if (scan->best < STEER_MAX_SLOTS) {
        if (far != scan->best_far) {
            if (far)
                return 0;
        } else if (stuck != scan->best_stuck) {
            if (stuck > scan->best_stuck)
                return 0;
        } else if (load != scan->best_load) {
            if (load > scan->best_load)
                return 0;
        } else if (busy != scan->best_busy) {
            if (busy > scan->best_busy)
                return 0;
        } else if (rank >= scan->best_rank) {
            return 0;
        }
    }
    scan->best = idx;
    scan->best_stuck = stuck;
    scan->best_far = far;
    scan->best_load = load;
    scan->best_busy = busy;
    scan->best_rank = rank;
    return 0;
}

// least-mem, first pass: the smallest RSS among the eligible slots. (No counter here nor in
// pick2: a counter compared with a constant is tracked exactly, and the verifier would then
// walk every iteration of the callback instead of proving one.)
static __always_inline long survey_slot(__u32 idx, struct steer_slot *slot, struct scan *scan)
{
    if (idx >= scan->nslots)
        return 1;
    if (!slot->eligible)
        return 0;
    __u64 rss = slot->rss_kib;
    if (rss < scan->rss_min)
        scan->rss_min = rss;
    return 0;
}

// p2c: every eligible slot draws a random key; the two smallest keys are a uniformly random
// pair of distinct eligible slots, `best` (the first drawn) and `second`.
static __always_inline long pick2_slot(__u32 idx, struct steer_slot *slot, struct scan *scan)
{
    if (idx >= scan->nslots)
        return 1;
    if (!slot->eligible)
        return 0;
    if (slot->reporting & WATCHERS)
        scan->watch = 1;
    __u32 r = bpf_get_prandom_u32();
    __s64 load = slot_load(slot, STEER_LEAST_CONN);
    __u64 stuck = stuck_for(slot, scan->now);
    __u64 busy = busy_for(slot, scan->now);
    if (scan->best >= STEER_MAX_SLOTS || r < scan->draw[0]) {
        scan->second = scan->best;
        scan->second_load = scan->best_load;
        scan->second_stuck = scan->best_stuck;
        scan->second_busy = scan->best_busy;
        scan->draw[1] = scan->draw[0];
        scan->best = idx;
        scan->best_load = load;
        scan->best_stuck = stuck;
        scan->best_busy = busy;
        scan->draw[0] = r;
    } else if (scan->second >= STEER_MAX_SLOTS || r < scan->draw[1]) {
        scan->second = idx;
        scan->second_load = load;
        scan->second_stuck = stuck;
        scan->second_busy = busy;
        scan->draw[1] = r;
    }
    return 0;
}

// The callbacks: one slot's line for each of the above, and how a scan calls them.
// The scan's state lives in a per-CPU map value, not on the stack, and the callbacks reach it
// through a pointer the caller keeps on its stack (bpf_loop and bpf_for_each_map_elem take a
// stack pointer as context). What the program reads from a map value is an unknown number to
// the verifier, so the state at each call of a callback is the same as at the one before and
// the callback is verified once. On the stack, the fields' ranges (stuck ages, loads, the
// pick) differ from call to call, and a verifier that checks a callback as a loop over every
// range it can reach (a later build of 6.18.44 did) ran past its million instructions. The
// program runs with softirqs off on its CPU (a SYN in softirq context, a migration under
// local_bh_disable or from a timer), so nothing else on the CPU uses the value while a run
// does.
struct scan_ref {
    struct scan *scan;
};

#ifdef STEER_FOR_EACH
#define SCAN_CALLBACK(name)                                                                     \
    static __attribute__((noinline)) long name(struct bpf_map *map, __u32 *key,                \
                                               struct steer_slot *slot, struct scan_ref *ref)  \
    {                                                                                           \
        return name##_slot(*key, slot, ref->scan);                                              \
    }
#define SCAN(name, n, ref) bpf_for_each_map_elem(&steer_slots, name, ref, 0)
#else
#define SCAN_CALLBACK(name)                                                                     \
    static __attribute__((noinline)) long name(__u64 i, void *ctx)                             \
    {                                                                                           \
        __u32 key = i;                                                                          \
        struct steer_slot *slot = bpf_map_lookup_elem(&steer_slots, &key);                     \
        if (!slot)                                                                              \
            return 1;                                                                           \
        return name##_slot(key, slot, ((struct scan_ref *)ctx)->scan);                          \
    }
#define SCAN(name, n, ref) bpf_loop(n, name, ref, 0)
#endif
SCAN_CALLBACK(visit)
SCAN_CALLBACK(survey)
SCAN_CALLBACK(pick2)

SEC("sk_reuseport")
int steer(struct sk_reuseport_md *md)
{
    __u32 zero = 0;
    struct steer_meta *meta = bpf_map_lookup_elem(&steer_meta, &zero);
    if (!meta)
        return SK_PASS;
    __u32 n = meta->nslots;
    if (n == 0 || n > STEER_OVERFLOW)
        return SK_PASS;
    struct scan *scan = bpf_map_lookup_elem(&steer_scratch, &zero);
    if (!scan)
        return SK_PASS;
    *scan = (struct scan){
        .nslots = n,
        .policy = meta->policy,
        .rotate = md->hash % n,
        .best = STEER_MAX_SLOTS,
        .second = STEER_MAX_SLOTS,
        .rss_min = ~0ULL,
        .max_load = -(1LL << 62),
        .now = bpf_ktime_get_ns(),
    };
    struct scan_ref ref = {scan};
    if (scan->policy == STEER_P2C) {
        SCAN(pick2, n, &ref);
        scan->max_load = scan->best_load;
        if (scan->second < STEER_MAX_SLOTS && scan->second_load > scan->max_load)
            scan->max_load = scan->second_load;
        // The one stuck for less time (not at all first), else the less loaded of the two; the
        // first drawn on a tie; with one eligible slot, that one.
        if (scan->second < STEER_MAX_SLOTS &&
            (scan->second_stuck < scan->best_stuck ||
             (scan->second_stuck == scan->best_stuck && scan->second_load < scan->best_load))) {
            scan->best = scan->second;
            scan->best_stuck = scan->second_stuck;
            scan->best_busy = scan->second_busy;
            scan->best_load = scan->second_load;
        }
    } else {
        if (scan->policy == STEER_LEAST_MEM) {
            SCAN(survey, n, &ref);
            __u64 tolerance = scan->rss_min / 8;
            if (tolerance < RSS_TOLERANCE_MIN_KIB)
                tolerance = RSS_TOLERANCE_MIN_KIB;
            scan->rss_near = scan->rss_min + tolerance;
            if (scan->rss_near < scan->rss_min)
                scan->rss_near = ~0ULL; // saturate (also: nothing eligible)
        }
        SCAN(visit, n, &ref);
    }
    if (scan->best >= STEER_MAX_SLOTS) {
        // Nothing eligible: a slot's listener by the connection's hash (slot 0's where that
        // index has none: a removed slot), so the overflow queue, which no worker may be
        // watching, is left out; the kernel's hash decides only when neither has a listener.
        __u32 any = scan->rotate & (STEER_MAX_SLOTS - 1);
        if (bpf_sk_select_reuseport(md, &steer_socks, &any, 0) != 0) {
            any = 0;
            bpf_sk_select_reuseport(md, &steer_socks, &any, 0);
        }
        return SK_PASS;
    }
    __u32 key = scan->best & (STEER_MAX_SLOTS - 1);
    struct steer_slot *slot = bpf_map_lookup_elem(&steer_slots, &key);
    // The pick is not free when its loop has served for over SPILL_BUSY_NS, or when its worker
    // (one that counts its accepts) has not yet taken a connection already placed on its
    // listener: its loop was woken for that one and has not run since (the CPU it runs on is
    // busy with something else) or serves it, and a second placement would wait behind the
    // first while a worker that comes free sooner has nothing (BENCHMARKS.md, issue #14). A
    // waiting loop's busy_ns cannot tell: it is stamped only when the loop runs again.
    // Such a spill waits for nearly level loads (header): it goes to whoever comes free first,
    // so it may widen the gap by one, and none follows until the gap is back to one.
    // Likewise while connections wait in the overflow queue: a new one goes behind them, not
    // past them to a pick that takes its own listener's connections first (header).
    // least-mem spills only when stuck: any watcher takes from the queue, one beyond the RSS
    // tolerance too, which a busy pick or a waiting queue alone does not justify.
    __u32 behind = slot && slot->reporting != 0 && slot_untaken(slot) > 0;
    __u32 spill = STEER_OVERFLOW;
    struct steer_slot *queue = bpf_map_lookup_elem(&steer_slots, &spill);
    __u32 queued = queue && slot_untaken(queue) > 0;
    __u32 spill_level = scan->policy != STEER_LEAST_MEM && scan->max_load <= scan->best_load + 1 &&
                        (scan->best_busy > SPILL_BUSY_NS || behind || queued);
    if ((scan->best_stuck != 0 || spill_level) && scan->watch &&
        scan->policy != STEER_ROUND_ROBIN) {
        if (queue && queue->eligible &&
            bpf_sk_select_reuseport(md, &steer_socks, &spill, 0) == 0) {
            __sync_fetch_and_add(&queue->assigned, 1);
            return SK_PASS;
        }
    }
    if (bpf_sk_select_reuseport(md, &steer_socks, &key, 0) != 0)
        return SK_PASS; // no listener at that index (yet): the kernel's hash decides
    if (slot) {
        // A placement on a queue with nothing waiting starts the queue's clock (stuck_for).
        if (slot_untaken(slot) <= 0)
            slot->progress_ns = scan->now;
        __sync_fetch_and_add(&slot->assigned, 1);
    }
    return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
