"""The claim rules of vpcnet.routes.claims as pure functions: no cloud, no store. Which block a host
claims, which routes it may touch, clusters sharing a VPC, quota, and how a route's state is judged."""
from __future__ import annotations

import ipaddress

from vpcnet.cloud import Route, route_description, route_name
from vpcnet.config import Config
from vpcnet.routes import claims
from vpcnet.routes.claims import FATAL, PENDING, TRANSIENT

CLUSTER = "10.200.0.0/16"
NET = ipaddress.IPv4Network(CLUSTER)
NAME = "10.200.0.0-16"
ME, OTHER = "i-me", "i-other"


def ours(dest: str, hop: str = ME, cluster: str = NAME, status: str = "Available", table: str = "vtb-a") -> Route:
    """A route as vpcnet makes it (marked, with its cluster)."""
    return Route(dest, hop, status=status, name=route_name(dest), description=route_description(dest, hop, cluster),
                 table=table)


def hand_made(dest: str, hop: str = ME) -> Route:
    return Route(dest, hop, name="by-hand", description="ops made this")


def nets(*cidrs: str) -> list[ipaddress.IPv4Network]:
    return [ipaddress.IPv4Network(c) for c in cidrs]


def test_the_search_starts_at_a_stable_block_spread_over_the_cluster():
    starts = [claims.start_index(f"i-host-{k}", NET, 24) for k in range(50)]
    assert starts == [claims.start_index(f"i-host-{k}", NET, 24) for k in range(50)]   # stable
    assert len(set(starts)) >= 40 and all(0 <= s < 256 for s in starts)                # spread
    taken = nets(*(f"10.200.{k}.0/24" for k in range(250, 256)))
    assert str(claims.first_free(NET, 24, taken, 250)) == "10.200.0.0/24"              # wraps around


def test_a_block_is_free_only_when_nothing_equal_inside_or_around_it_is_taken():
    # a /25 inside block 0, a /23 around blocks 2-3: all three blocks are taken
    assert str(claims.first_free(NET, 24, nets("10.200.0.128/25", "10.200.2.0/23"))) == "10.200.1.0/24"
    assert str(claims.first_free(NET, 24, nets("10.200.0.0/24", "10.200.1.0/24"))) == "10.200.2.0/24"
    assert claims.first_free(ipaddress.IPv4Network("10.200.0.0/23"), 24, nets("10.200.0.0/23")) is None


def test_wide_routes_do_not_take_blocks_but_entries_reserved_and_refused_ones_do():
    listings = {"vtb-a": [Route("0.0.0.0/0", "", kind="System"), hand_made(CLUSTER, OTHER),   # around all
                          ours("10.200.0.0/24", OTHER), Route("fd00::/64", OTHER)],
                "vtb-b": [ours("10.200.1.0/24", OTHER, table="vtb-b")]}   # taken in any table
    assert claims.taken(NET, listings) == nets("10.200.0.0/24", "10.200.1.0/24")
    reserved = nets("10.200.2.0/24")
    assert str(claims.next_block(NET, 24, listings, reserved, 0)) == "10.200.3.0/24"
    # a block refused as a duplicate is skipped even though the listing does not show it yet
    assert str(claims.next_block(NET, 24, listings, reserved, 3, refused=nets("10.200.3.0/24")[0])) \
        == "10.200.4.0/24"


def test_reserved_cidrs_keep_both_families_with_host_bits_and_ignore_the_rest():
    found, ignored = claims.reserved_networks(["10.200.5.7/24", "fd00::1/64", "nonsense"])
    assert found == [ipaddress.IPv4Network("10.200.5.0/24"), ipaddress.IPv6Network("fd00::/64")]
    assert ignored == ["nonsense"]


# -- IPv6 -------------------------------------------------------------------------------------------
V6 = "fd12:3456:789a::/48"
NET6 = ipaddress.IPv6Network(V6)
NAME6 = "fd12.3456.789a..-48"


def test_a_v6_cluster_identity_fits_the_marker():
    assert claims.cluster_name(V6) == NAME6
    dest = "fd12:3456:789a:0:1::/80"
    assert ours(dest, cluster=NAME6).cluster == NAME6


def test_v6_blocks_are_searched_by_skipping_taken_ranges_not_block_by_block():
    """A /48 holds 2**32 /80 blocks: a wide taken range inside it is jumped over in one step."""
    taken = [ipaddress.IPv6Network("fd12:3456:789a::/64"),            # 2**16 blocks
             ipaddress.IPv6Network("fd12:3456:789a:1::/80")]
    assert str(claims.first_free(NET6, 80, taken)) == "fd12:3456:789a:1:1::/80"
    taken.append(ipaddress.IPv6Network("fd12:3456:789a::/49"))         # half the cluster
    assert str(claims.first_free(NET6, 80, taken)) == "fd12:3456:789a:8000::/80"
    start = claims.start_index("i-host-1", NET6, 80)
    assert 0 <= start < 2 ** 32 and start == claims.start_index("i-host-1", NET6, 80)
    # from a start inside the taken half, the search runs on to the end, then wraps to the front
    assert str(claims.first_free(NET6, 80, [ipaddress.IPv6Network("fd12:3456:789a:8000::/49")], 2 ** 31)) \
        == "fd12:3456:789a::/80"
    assert claims.first_free(NET6, 80, [NET6]) is None
    # the families never mix: IPv4 destinations take nothing of an IPv6 cluster and the other way round
    listings = {"vtb-a": [ours("10.200.0.0/24", OTHER), Route("::/0", "", kind="System"),
                          ours("fd12:3456:789a::/80", OTHER, NAME6)]}
    assert claims.taken(NET6, listings) == [ipaddress.IPv6Network("fd12:3456:789a::/80")]
    assert claims.taken(NET, listings) == nets("10.200.0.0/24")


def test_v6_ownership_overlap_and_quota_per_family():
    mine6 = ours("fd12:3456:789a:0:2::/80", ME, NAME6)
    assert claims.owned_in(mine6, ME, V6, NAME6) and not claims.owned_in(mine6, ME, CLUSTER, NAME)
    assert not claims.owned_in(ours("10.200.3.0/24"), ME, V6, NAME6)
    assert claims.ownership(mine6, ME, [CLUSTER, V6]) == "mine"
    assert claims.find_mine(V6, NAME6, {"vtb-a": [ours("10.200.3.0/24"), mine6]}, ME, 80) == mine6.destination
    other_cluster = ours("fd12:3456:789a:0:9::/80", OTHER, "beta")
    assert "cluster beta" in claims.overlap(V6, NAME6, {"vtb-a": [other_cluster]})
    assert claims.overlap(CLUSTER, NAME, {"vtb-a": [other_cluster]}) == ""
    routes = [ours("10.200.3.0/24"), mine6, other_cluster, Route("::/0", "", kind="System")]
    assert claims.custom_entries(routes) == 3
    assert (claims.custom_entries(routes, 4), claims.custom_entries(routes, 6)) == (1, 2)


def test_only_vpcnet_routes_of_this_instance_and_cluster_are_owned():
    assert claims.owned_in(ours("10.200.3.0/24"), ME, CLUSTER, NAME)
    legacy = Route("10.200.3.0/24", ME, name=route_name("10.200.3.0/24"))   # marked before clusters had names
    assert claims.owned_in(legacy, ME, CLUSTER, NAME)
    assert not claims.owned_in(hand_made("10.200.3.0/24"), ME, CLUSTER, NAME)         # not marked
    assert not claims.owned_in(ours("10.200.3.0/24", OTHER), ME, CLUSTER, NAME)       # another host
    assert not claims.owned_in(ours("10.200.3.0/24", cluster="beta"), ME, CLUSTER, NAME)   # another cluster
    assert not claims.owned_in(ours("10.99.0.0/24"), ME, CLUSTER, NAME)               # outside the CIDR
    system = Route("10.200.3.0/24", ME, kind="System", name=route_name("10.200.3.0/24"))
    assert not claims.owned_in(system, ME, CLUSTER, NAME)
    # a configured cluster name replaces the CIDR-derived one
    assert claims.owned(ours("10.200.3.0/24", cluster="alpha"), ME, [CLUSTER], "alpha")
    assert not claims.owned(ours("10.200.3.0/24"), ME, [CLUSTER], "alpha")


def test_ownership_labels_and_what_gc_may_collect():
    cases = {
        "mine": ours("10.200.3.0/24"),
        "ours-other-host": ours("10.200.4.0/24", OTHER),
        "ours-other-cluster": ours("10.201.0.0/24", OTHER, cluster="10.201.0.0-16"),
        "foreign": hand_made("10.200.5.0/24", OTHER),
    }
    for label, route in cases.items():
        assert claims.ownership(route, ME, [CLUSTER]) == label, label
    # a vpcnet route to this instance of another cluster is not this host's to touch
    assert claims.ownership(ours("10.200.6.0/24", cluster="beta"), ME, [CLUSTER]) == "ours-other-cluster"
    beta_host = ours("10.200.6.0/24", OTHER, cluster="beta")      # another cluster's host inside the CIDR
    assert claims.ownership(beta_host, ME, [CLUSTER]) == "ours-other-cluster"
    assert not claims.collectable(beta_host, ME, [CLUSTER])
    collectable = [label for label, route in cases.items() if claims.collectable(route, ME, [CLUSTER])]
    assert collectable == ["ours-other-host"]
    assert not claims.collectable(Route("10.200.7.0/24", "", name=route_name("x")), ME, [CLUSTER])   # no hop


def test_another_clusters_route_inside_the_cidr_is_an_overlap_naming_it():
    listings = {"vtb-a": [ours("10.200.3.0/24", OTHER), ours("10.201.0.0/24", OTHER, cluster="beta")]}
    assert claims.overlap(CLUSTER, NAME, listings) == ""          # own cluster's and outside routes
    listings["vtb-b"] = [ours("10.200.9.0/24", OTHER, cluster="beta", table="vtb-b")]
    message = claims.overlap(CLUSTER, NAME, listings)
    assert "cluster beta" in message and "vtb-b" in message and "VPCNET_CLUSTER_NAME=beta" in message
    assert claims.overlap(CLUSTER, "beta", {"vtb-b": listings["vtb-b"]}) == ""   # a host of cluster beta


def test_this_hosts_block_is_the_first_tables_then_the_lowest():
    listings = {"vtb-a": [hand_made("10.200.1.0/24"), ours("10.200.9.0/24"), ours("10.200.8.0/24"),
                          ours("10.200.0.0/25")],          # wrong size: not a host block
                "vtb-b": [ours("10.200.2.0/24", table="vtb-b")]}
    assert claims.find_mine(CLUSTER, NAME, listings, ME, 24) == "10.200.8.0/24"
    listings["vtb-a"] = [hand_made("10.200.1.0/24")]
    assert claims.find_mine(CLUSTER, NAME, listings, ME, 24) == "10.200.2.0/24"
    assert claims.find_mine(CLUSTER, NAME, {"vtb-a": []}, ME, 24) is None


def test_a_duplicate_is_adopted_only_when_it_is_ours():
    def decide(*routes: Route) -> tuple[str | None, str]:
        return claims.after_duplicate("10.200.3.0/24", "vtb-a", {"vtb-a": list(routes)}, ME, CLUSTER, NAME, 24)

    assert decide(ours("10.200.3.0/24"))[0] == "10.200.3.0/24"
    assert decide(ours("10.200.3.0/24", OTHER), ours("10.200.7.0/24")) == (
        "10.200.7.0/24", "found this host's block 10.200.7.0/24 meanwhile: adopted")
    block, why = decide(hand_made("10.200.3.0/24"))
    assert block is None and "hand-made" in why
    block, why = decide(ours("10.200.3.0/24", OTHER))
    assert block is None and f"taken by {OTHER}" in why


def test_stale_blocks_are_only_this_hosts_other_available_ones():
    routes = [ours("10.200.3.0/24"), ours("10.200.4.0/24"), ours("10.200.5.0/24", status="Pending"),
              ours("10.200.6.0/24", OTHER), hand_made("10.200.7.0/24"), ours("10.200.8.0/24", cluster="beta")]
    assert [r.destination for r in claims.stale(routes, "10.200.3.0/24", ME, CLUSTER, NAME)] == ["10.200.4.0/24"]


def test_an_unmarked_landed_create_is_found_for_marking():
    plain = Route("10.200.3.0/24", ME)                  # AWS CreateRoute landed, CreateTags failed
    assert claims.landed_unmarked([plain], "10.200.3.0/24", ME) is plain
    assert claims.landed_unmarked([ours("10.200.3.0/24")], "10.200.3.0/24", ME) is None   # marked after all
    assert claims.landed_unmarked([Route("10.200.3.0/24", OTHER)], "10.200.3.0/24", ME) is None
    assert claims.landed_unmarked([], "10.200.3.0/24", ME) is None                       # never landed


def test_a_routes_state_is_judged_by_what_waiting_can_fix():
    wanted = "10.200.3.0/24"
    assert claims.entry_problem(wanted, ME, "vtb-a", ours(wanted)) is None
    assert claims.entry_problem(wanted, ME, "vtb-a", None)[1] == TRANSIENT
    assert claims.entry_problem(wanted, ME, "vtb-a", ours(wanted, OTHER))[1] == FATAL
    assert claims.entry_problem(wanted, ME, "vtb-a", ours(wanted, status="Pending"))[1] == PENDING
    assert claims.entry_problem(wanted, ME, "vtb-a", ours(wanted, status="Deleting"))[1] == PENDING
    assert claims.entry_problem(wanted, ME, "vtb-a", ours(wanted, status="Broken"))[1] == TRANSIENT
    assert claims.worst_kind([PENDING, TRANSIENT, PENDING]) == TRANSIENT
    assert claims.worst_kind([PENDING, FATAL, TRANSIENT]) == FATAL
    assert claims.worst_kind([]) == ""


def test_quota_counts_every_custom_entry_and_unknown_is_never_full():
    routes = [ours("10.200.3.0/24", OTHER), hand_made("10.99.0.0/24"), Route("10.0.0.0/8", "", kind="System")]
    assert claims.custom_entries(routes) == 2
    assert claims.quota_full(2, 2) and not claims.quota_full(1, 2) and not claims.quota_full(500, 0)
    message = claims.quota_message("vtb-a", 2, 0)
    assert "vtb-a is full: 2/? custom entries" in message and "raise the route table quota" in message
    assert claims.quota_message("vtb-a", 2, 2, "ask Quota Center").endswith("ask Quota Center")


def test_cluster_identity_and_static_block():
    assert claims.cluster_name(CLUSTER) == NAME and claims.cluster_name(CLUSTER, "alpha") == "alpha"
    config = Config(cluster_cidr=CLUSTER, host_cidr="10.200.77.0/24")
    assert claims.static_host_cidr(config, CLUSTER) == "10.200.77.0/24"
    assert claims.static_host_cidr(config, "10.201.0.0/16") == ""     # only for the configured cluster


def test_a_batch_copies_only_other_hosts_claims_as_their_owners_wrote_them():
    """`claimed_missing`: what a host's batch write may carry for other hosts in a boot storm."""
    first = [ours("10.200.1.0/24", OTHER),                         # another host's claim: copied
             ours("10.200.2.0/24", ME),                            # this host's own: not a copy
             ours("10.200.3.0/24", "i-third", status="Pending"),   # not Available yet: not copied
             ours("10.200.4.0/24", "i-fourth", cluster="other-cluster"),   # another cluster's
             hand_made("10.200.5.0/24", OTHER),                    # hand-made: never copied
             ours("10.200.6.0/25", "i-fifth"),                     # not a host block (prefix 25)
             ours("10.201.7.0/24", "i-sixth"),                     # outside the cluster CIDR
             ours("10.200.8.0/24", "i-seventh")]                   # already in vtb-b: copied to vtb-c only
    listings = {"vtb-a": first, "vtb-b": [ours("10.200.8.0/24", "i-seventh", table="vtb-b")], "vtb-c": []}
    copies = claims.claimed_missing(listings, ME, CLUSTER, NAME, 24)
    assert sorted((r.table, r.destination, r.next_hop) for r in copies) == [
        ("vtb-b", "10.200.1.0/24", OTHER), ("vtb-c", "10.200.1.0/24", OTHER),
        ("vtb-c", "10.200.8.0/24", "i-seventh")]
    claim = first[0]
    assert all((r.name, r.description) == (claim.name, claim.description) for r in copies
               if r.destination == claim.destination)
    assert claims.claimed_missing({"vtb-a": first}, ME, CLUSTER, NAME, 24) == []    # one table: nothing
