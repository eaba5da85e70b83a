// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The IPv4 container program of vpcnet.datapath.ebpf.programs.container_program, in restricted C: the same
 * logic, the same maps (the IPv4 endpoint map, the peer map) and the same helper calls, for
 * bench/ebpf_c_vs_asm.py's comparison (a measuring artefact, not shipped; docs/datapath.md, "Why a Python
 * assembler, not C"). What the program does and why is the package docstring of vpcnet.datapath.ebpf.
 *
 *     clang -O2 -g -target bpf -c container4.c -o container4.o
 *
 * What the assembler builds into the program's instructions per network (the CIDRs, the anchor, the
 * uplinks, whether peers are counted) is read-only data here (`const volatile`, section .rodata): the
 * loader fills it before the load and freezes it, so the verifier sees constants and drops the branches
 * they rule out, as libbpf's skeletons and Cilium's load-time configuration do. No libbpf header: the few
 * definitions it would bring are below. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name
#define INLINE static inline __attribute__((always_inline))
#define htons(x) __builtin_bswap16(x) /* little-endian machines only, as the assembler's programs */

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, __u64 flags) =
	(void *)BPF_FUNC_map_update_elem;
static long (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)BPF_FUNC_redirect;
static long (*bpf_fib_lookup)(void *ctx, struct bpf_fib_lookup *params, int plen, __u32 flags) =
	(void *)BPF_FUNC_fib_lookup;
static long (*bpf_redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

#define AF_INET 2
#define MAX_PUBLISHED 64 /* programs.MAX_PUBLISHED */
#define MAX_UPLINKS 8
#define TRANSMIT 0       /* maps.TRANSMIT */

/* The endpoint map's value (vpcnet.datapath.ebpf.endpoints.value): the endpoint's own address, how many
 * ports it publishes, and each as [proto, 0, port high, port low]. */
struct endpoint4 {
	__u32 address;
	__u32 published;
	__u32 ports[MAX_PUBLISHED];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32); /* the host veth's ifindex */
	__type(value, struct endpoint4);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} vpcnet_ep4 SEC(".maps");

/* The peer map (vpcnet.datapath.ebpf.maps): addresses as ::ffff:a.b.c.d, the peer all zero for outside. */
struct peer_key {
	__u32 endpoint[4];
	__u32 direction;
	__u32 pad;
	__u32 peer[4];
};
struct peer_value {
	__u64 bytes;
	__u64 packets;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__type(key, struct peer_key);
	__type(value, struct peer_value);
	__uint(max_entries, 65536);
} vpcnet_peers SEC(".maps");

/* Per network, filled in by the loader (network byte order for addresses and masks). */
const volatile __u32 host_net, host_mask, cluster_net, cluster_mask;
const volatile __u32 anchor_ifindex;
const volatile __u32 any_uplink;          /* 1: another host's traffic may leave by any device */
const volatile __u32 n_uplinks;           /* else only by one of these (none: never) */
const volatile __u32 uplinks[MAX_UPLINKS];
const volatile __u32 count_peers;

INLINE void count(struct __sk_buff *skb, __u32 endpoint, __u32 peer, __u32 direction)
{
	struct peer_key key = {};
	struct peer_value *value;

	key.endpoint[2] = htons(0xffff) << 16; /* ::ffff: */
	key.endpoint[3] = endpoint;
	key.direction = direction;
	if ((peer & cluster_mask) == cluster_net) { /* outside: the peer stays all zero */
		key.peer[2] = htons(0xffff) << 16;
		key.peer[3] = peer;
	}
	value = bpf_map_lookup_elem(&vpcnet_peers, &key);
	if (value) { /* per-CPU: a plain add */
		value->bytes += skb->len;
		value->packets += 1;
	} else {
		struct peer_value first = {.bytes = skb->len, .packets = 1};

		bpf_map_update_elem(&vpcnet_peers, &key, &first, BPF_NOEXIST);
	}
}

/* A reply from a published port (or a packet whose ports cannot be read cheaply) takes the normal path:
 * the host's conntrack must undo the DNAT. Past MAX_PUBLISHED ports, all TCP, UDP and SCTP does. */
INLINE int published_reply(const struct endpoint4 *ep, const struct iphdr *ip, const void *end)
{
	__u32 n = ep->published;
	__u8 proto = ip->protocol;

	if (n == 0)
		return 0;
	if (n > MAX_PUBLISHED)
		return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
	if (ip->frag_off & htons(0x3fff)) /* a fragment: the ports may not be in it */
		return 1;
	if (*(const __u8 *)ip != 0x45)    /* options: the stack decides */
		return 1;
	const __u16 *sport = (const void *)(ip + 1);
	if ((const void *)(sport + 1) > end)
		return 1;
	__u32 slot = (__u32)*sport << 16 | proto;
	for (__u32 i = 0; i < MAX_PUBLISHED && i < n; i++)
		if (ep->ports[i] == slot)
			return 1;
	return 0;
}

/* bpf_fib_lookup() on the packet's header from the device it arrived on; tot_len 0: the helper checks
 * the skb itself against the egress MTU, GSO included. */
INLINE long fib_lookup(struct __sk_buff *skb, struct bpf_fib_lookup *fib, const struct iphdr *ip)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET;
	fib->l4_protocol = ip->protocol;
	fib->ifindex = skb->ifindex;
	fib->tos = ip->tos;
	fib->ipv4_src = ip->saddr;
	fib->ipv4_dst = ip->daddr;
	return bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
}

/* The packet again after a helper call (it may have moved): NULL when the IPv4 header is not all there. */
INLINE struct iphdr *header(struct __sk_buff *skb, struct ethhdr **eth)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);

	if ((void *)(ip + 1) > end)
		return 0;
	*eth = data;
	return ip;
}

/* As the kernel's ip_decrease_ttl(). */
INLINE void decrement_ttl(struct iphdr *ip)
{
	__u32 check = ip->check;

	ip->ttl--;
	check += htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xffff));
}

SEC("tc")
int container4(struct __sk_buff *skb)
{
	struct bpf_fib_lookup fib;
	struct ethhdr *eth;
	struct iphdr *ip = header(skb, &eth);
	long rc;

	if (!ip || eth->h_proto != htons(ETH_P_IP))
		return TC_ACT_UNSPEC;
	__u32 saddr = ip->saddr, daddr = ip->daddr, key = skb->ifindex;
	const struct endpoint4 *ep = bpf_map_lookup_elem(&vpcnet_ep4, &key);

	if (!ep) /* not an endpoint this process knows */
		return TC_ACT_UNSPEC;
	if (count_peers && saddr == ep->address)
		count(skb, saddr, daddr, TRANSMIT);
	ip = header(skb, &eth);
	if (!ip || saddr != ep->address) /* only the endpoint's own address */
		return TC_ACT_UNSPEC;
	if ((daddr & cluster_mask) != cluster_net || published_reply(ep, ip, (void *)(long)skb->data_end))
		return TC_ACT_UNSPEC;
	if (ip->ttl <= 1) /* about to expire: the stack sends time-exceeded */
		return TC_ACT_UNSPEC;

	if ((daddr & host_mask) != host_net) { /* another host: out of an uplink, L2 from the neighbour table */
		if (!any_uplink && n_uplinks == 0)
			return TC_ACT_UNSPEC;
		if (fib_lookup(skb, &fib, ip) != BPF_FIB_LKUP_RET_SUCCESS)
			return TC_ACT_UNSPEC;
		if (!any_uplink) {
			int uplink = 0;

			for (__u32 i = 0; i < MAX_UPLINKS && i < n_uplinks; i++)
				if (fib.ifindex == uplinks[i])
					uplink = 1;
			if (!uplink)
				return TC_ACT_UNSPEC;
		}
		ip = header(skb, &eth);
		if (!ip)
			return TC_ACT_UNSPEC;
		decrement_ttl(ip);
		struct bpf_redir_neigh nh = {.nh_family = AF_INET, .ipv4_nh = fib.ipv4_dst};

		return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}

	/* this host's other containers: out of their host veth, MACs from the lookup; never back where it
	 * came from, nor to the anchor (an address no endpoint holds) */
	rc = fib_lookup(skb, &fib, ip);
	if (fib.ifindex == anchor_ifindex || fib.ifindex == skb->ifindex || rc != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_UNSPEC;
	ip = header(skb, &eth);
	if (!ip)
		return TC_ACT_UNSPEC;
	decrement_ttl(ip);
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	return bpf_redirect(fib.ifindex, 0);
}

char _license[] SEC("license") = "Dual BSD/GPL";
