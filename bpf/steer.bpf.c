// SPDX-License-Identifier: MIT OR Apache-2.0
//
// Kernel-steered least-conn: a BPF_PROG_TYPE_SK_REUSEPORT program attached to the reuseport
// group of one listening address (one listener per worker slot, the master holds them all).
// For each new connection (at SYN time, and for a closed listener's queue when attached as
// BPF_SK_REUSEPORT_SELECT_OR_MIGRATE) it picks the eligible slot with the least load, where
//
//     load = assigned - closed - forgiven            (signed; see docs/PROTOCOL.md)
//
// or, for round-robin, assigned - forgiven (equal shares, each slot in turn).
//
// `assigned` is counted here, atomically, after a successful bpf_sk_select_reuseport; workers
// add `accepted` and `closed` through the mmapped page; the master writes `eligible`, `nslots`
// and `forgiven` (its reconciliation of handshakes that never completed). Ties rotate by the
// connection's hash. With no eligible slot the program returns SK_PASS without selecting, so
// the kernel's hash decides: it never drops a connection.
//
// Scanning uses bpf_for_each_map_elem: the verifier checks the callback once, where a plain loop
// over the slots makes it explore every iteration's branches ("sequence of 8193 jumps is too
// complex" with CAP_BPF alone). Indexes are masked before use.
//
// The Rust side embeds the compiled instructions (scripts/gen-bpf.sh regenerates
// src/steer/prog.rs) and patches the three map references at load time.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

// Must match steer::MAX_SLOTS in the Rust code (a power of two).
#define STEER_MAX_SLOTS 1024

// One slot's line of the shared table: 64 bytes, the layout docs/PROTOCOL.md documents.
struct steer_slot {
    __u64 assigned;  // program: connections it placed on this slot's listener
    __u64 accepted;  // worker: connections it accepted from the listener
    __u64 closed;    // worker: connections it closed
    __s64 forgiven;  // master: placements that never reached the worker (abandoned handshakes)
    __u32 eligible;  // master: 1 = a ready worker serves this slot
    __u32 reporting; // worker: 1 = it counts accepted/closed here
    __u64 reserved[3];
};

// What the load of a slot is (steer_meta.policy).
#define STEER_LEAST_CONN 0   // assigned - closed - forgiven: connections still open
#define STEER_ROUND_ROBIN 1  // assigned - forgiven: placements, so equal shares in turn

struct steer_meta {
    __u32 nslots;    // master: slots in use, 0..nslots are scanned
    __u32 policy;    // master: STEER_LEAST_CONN or STEER_ROUND_ROBIN
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
    __s64 best_load;
};

struct bpf_map;

static __attribute__((noinline)) long visit(struct bpf_map *map, __u32 *key,
                                            struct steer_slot *slot, struct scan *scan)
{
    __u32 idx = *key;
    if (idx >= scan->nslots)
        return 1; // past the slots in use: stop
    if (!slot->eligible)
        return 0;
    __u64 done = scan->policy == STEER_ROUND_ROBIN ? 0 : slot->closed;
    __s64 load = (__s64)(slot->assigned - done) - slot->forgiven;
    __u32 rank = idx >= scan->rotate ? idx - scan->rotate : idx + scan->nslots - scan->rotate;
    if (scan->best >= STEER_MAX_SLOTS || load < scan->best_load ||
        (load == scan->best_load && rank < scan->best_rank)) {
        scan->best = idx;
        scan->best_load = load;
        scan->best_rank = rank;
    }
    return 0;
}

SEC("sk_reuseport")
int steer(struct sk_reuseport_md *md)
{
    __u32 zero = 0;
    struct steer_meta *meta = bpf_map_lookup_elem(&steer_meta, &zero);
    if (!meta)
        return SK_PASS;
    __u32 n = meta->nslots;
    if (n == 0 || n > STEER_MAX_SLOTS)
        return SK_PASS;
    struct scan scan = {
        .nslots = n,
        .policy = meta->policy,
        .rotate = md->hash % n,
        .best = STEER_MAX_SLOTS,
        .best_rank = 0,
        .best_load = 0,
    };
    bpf_for_each_map_elem(&steer_slots, visit, &scan, 0);
    if (scan.best >= STEER_MAX_SLOTS)
        return SK_PASS; // nothing eligible: the kernel's hash decides
    __u32 key = scan.best & (STEER_MAX_SLOTS - 1);
    if (bpf_sk_select_reuseport(md, &steer_socks, &key, 0) != 0)
        return SK_PASS; // no listener at that index (yet): the kernel's hash decides
    struct steer_slot *slot = bpf_map_lookup_elem(&steer_slots, &key);
    if (slot)
        __sync_fetch_and_add(&slot->assigned, 1);
    return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
