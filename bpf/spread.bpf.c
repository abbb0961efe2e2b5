// SPDX-License-Identifier: MIT OR Apache-2.0
//
// Plain `reuseport` mode's program: the kernel's own spread, over the worker slots that are
// still in service. Attached to the reuseport group of one listening address, as
// BPF_SK_REUSEPORT_SELECT_OR_MIGRATE where the kernel has it (5.14+).
//
// The master keeps the listeners of the slots in service at indexes 0..n of spread_socks and n
// in spread_meta. For each new connection the program selects index
//
//     (hash * n) >> 32
//
// the kernel's own reciprocal_scale of the connection's hash over the group, taken over those
// n instead of every socket in the group. A socket of a slot that was removed (scale-down)
// stays in the group while the worker draining on it keeps it open, which can be as long as
// its longest request: without this, about one new connection in N is hashed to it there and
// waits, with nobody accepting, until that worker exits. With the program it gets none.
//
// For a closing listener's queue (migrating_sk set) the same selection places each
// connection on a socket still in service, instead of the kernel resetting it.
//
// n of 0, or an index whose socket is gone (the kernel takes a closed socket out of the
// array; the master rewrites the array as slots come and go), selects nothing: the program
// returns SK_PASS and the kernel's hash over the whole group decides, as without a program.
// It never drops a connection.
//
// No helper but bpf_map_lookup_elem and bpf_sk_select_reuseport, no loop, no subprogram: it
// verifies with CAP_BPF alone on any kernel with REUSEPORT_SOCKARRAY (4.19+). The Rust side
// embeds its instructions (scripts/gen-bpf.sh regenerates src/steer/prog.rs) and patches the two
// map references at load time.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

// Must match steer::MAX_SLOTS in the Rust code.
#define SPREAD_MAX_SLOTS 1024

struct {
    __uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
    __uint(max_entries, SPREAD_MAX_SLOTS);
    __type(key, __u32);
    __type(value, __u64);
} spread_socks SEC(".maps");

// Entry 0: how many of spread_socks' first indexes hold a socket in service.
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, __u32);
} spread_meta SEC(".maps");

SEC("sk_reuseport")
int rcluster_spread(struct sk_reuseport_md *md)
{
    __u32 zero = 0;
    __u32 *n = bpf_map_lookup_elem(&spread_meta, &zero);
    if (!n)
        return SK_PASS;
    __u32 count = *n;
    if (count == 0 || count > SPREAD_MAX_SLOTS)
        return SK_PASS;
    __u32 index = (__u32)(((__u64)md->hash * count) >> 32);
    // Nothing selected (no socket at the index): the kernel's hash decides.
    bpf_sk_select_reuseport(md, &spread_socks, &index, 0);
    return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
