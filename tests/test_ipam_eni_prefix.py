"""eni-prefix addressing in the IPAM and the driver (docs/eni-prefix.md): the range as the pool, addresses from
this host's prefixes (a real PrefixPool over the embedded LocalPrefixes, a real Store), the refusals."""
from __future__ import annotations

import ipaddress
import logging
import os
import threading

import pytest
from conftest import wait_for
from fakes import make_plugin

from vpcnet.cli import serve
from vpcnet.cli.serve import PrefixKeeper, mixed_addressing
from vpcnet.docker.driver import GENERIC, MODE_OPTION
from vpcnet.docker.ipam import GATEWAY_KEY, REQUEST_TYPE_KEY
from vpcnet.errors import Conflict, InvalidRequest
from vpcnet.routes.prefixes import PrefixPool

RANGE = "10.0.0.0/20"
RANGE6 = "fd00:9::/64"       # the vSwitch's (subnet's) IPv6 CIDR: /80 prefixes come from it
NID = "e1" * 32
EID = "ab" * 32
ENI = {"VPCNET_ADDRESSING": "eni-prefix", "VPCNET_CLUSTER_CIDR": RANGE, "VPCNET_CLUSTER_CIDR_V6": RANGE6,
       "VPCNET_PREFIX_COOLDOWN": "0"}


@pytest.fixture
def plug(tmp_path):
    return make_plugin(tmp_path, **ENI)


def held(plug) -> list[ipaddress.IPv4Network]:
    return [ipaddress.IPv4Network(p.prefix) for p in plug.store.held_prefixes("ipv4")]


def ip_of(answer: dict) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Interface(answer["Address"]).ip


def test_the_pool_is_the_range_and_its_first_address_the_gateway(plug):
    answer = plug.ipam.request_pool()
    assert answer == {"PoolID": RANGE, "Pool": RANGE, "Data": {GATEWAY_KEY: "10.0.0.1/20"}}
    assert plug.ipam.request_pool(pool=RANGE) == answer         # --subnet naming the range, and replays
    assert plug.store.claims() == [] and plug.routes.provider.list_routes() == []   # no route, no claim
    gateway = plug.ipam.request_address(RANGE, options={REQUEST_TYPE_KEY: GATEWAY_KEY})
    assert gateway["Address"] == "10.0.0.1/20"


def test_another_subnet_is_refused_clearly(plug):
    with pytest.raises(InvalidRequest, match=r"--subnet 10\.9\.0\.0/16: in eni-prefix addressing .* 10\.0\.0\.0/20"):
        plug.ipam.request_pool(pool="10.9.0.0/16")
    with pytest.raises(InvalidRequest, match=r"--subnet fd00:1::/64: in eni-prefix addressing .*_V6 fd00:9::/64"):
        plug.ipam.request_pool(pool="fd00:1::/64", v6=True)
    with pytest.raises(InvalidRequest, match=r"--subnet ::/48 asks for a /48 pool: .* the range fd00:9::/64"):
        plug.ipam.request_pool(pool="::/48", v6=True)          # Docker 29's size-only form, larger than the range
    with pytest.raises(InvalidRequest, match="is an IPv4 network, asked for an IPv6 pool"):
        plug.ipam.request_pool(pool=RANGE, v6=True)
    assert plug.store.pools() == []


def test_addresses_come_from_this_host_s_prefixes_with_the_range_s_prefix_length(plug):
    pool = plug.ipam.request_pool()["PoolID"]
    answers = [plug.ipam.request_address(pool) for _ in range(20)]     # more than one /28 holds
    assert all(a["Address"].endswith("/20") for a in answers)
    addresses = [ip_of(a) for a in answers]
    assert len(set(addresses)) == 20
    prefixes = held(plug)
    assert len(prefixes) >= 2 and all(p.prefixlen == 28 for p in prefixes)
    assert all(any(a in p for p in prefixes) for a in addresses)
    range_ = ipaddress.IPv4Network(RANGE)
    assert not {range_.network_address, range_.network_address + 1, range_.broadcast_address} & set(addresses)
    assert sorted(plug.store.addresses(pool)) == sorted(str(a) for a in addresses)


def test_concurrent_requests_never_get_the_same_address(tmp_path):
    plugs = [make_plugin(tmp_path, **ENI) for _ in range(3)]       # three workers on one state
    pool = plugs[0].ipam.request_pool()["PoolID"]
    got: list[str] = []
    errors: list[Exception] = []

    def take(plug) -> None:
        for _ in range(10):
            try:
                got.append(plug.ipam.request_address(pool)["Address"])
            except Exception as exc:    # noqa: BLE001 (reported below)
                errors.append(exc)
    threads = [threading.Thread(target=take, args=(p,)) for p in plugs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(got) == 30 and len(set(got)) == 30


def test_a_requested_address_inside_a_held_prefix_is_honoured_outside_refused(plug):
    pool = plug.ipam.request_pool()["PoolID"]
    first = ip_of(plug.ipam.request_address(pool))
    prefix = next(p for p in held(plug) if first in p)
    wanted = prefix.broadcast_address                      # a /28's last address is an ordinary one here
    assert plug.ipam.request_address(pool, str(wanted))["Address"] == f"{wanted}/20"
    with pytest.raises(Conflict, match="already in use"):
        plug.ipam.request_address(pool, str(wanted))
    outside = ipaddress.IPv4Network(RANGE).broadcast_address - 1
    with pytest.raises(InvalidRequest, match=rf"address {outside} is in none of this host's prefixes \({prefix}"):
        plug.ipam.request_address(pool, str(outside))
    with pytest.raises(InvalidRequest, match="gateway"):
        plug.ipam.request_address(pool, "10.0.0.1")
    assert sorted(plug.store.addresses(pool)) == sorted([str(first), str(wanted)])


def test_release_frees_the_address(plug):
    pool = plug.ipam.request_pool()["PoolID"]
    address = plug.ipam.request_address(pool)["Address"]
    plug.ipam.release_address(pool, address)
    assert plug.store.addresses(pool) == []
    assert str(ip_of({"Address": address})) not in plug.store.addresses_in_use("ipv4")


def test_a_replay_of_an_address_in_use_is_honoured_once_in_the_window(plug):
    pool = plug.ipam.request_pool()["PoolID"]
    address = str(ip_of(plug.ipam.request_address(pool)))
    plug.ipam.open_replay_window()                          # Docker restarted
    assert plug.ipam.request_pool(pool=RANGE)["PoolID"] == pool
    assert plug.ipam.request_address(pool, address)["Address"] == f"{address}/20"
    with pytest.raises(Conflict, match="already in use"):
        plug.ipam.request_address(pool, address)


def create(plug, nid=NID, generic=None):
    pool = plug.ipam.request_pool()["PoolID"]
    plug.driver.create_network(nid, {GENERIC: generic or {}}, [{"Pool": pool, "Gateway": ""}], [])
    return plug.store.network(nid)


def test_a_network_remembers_eni_prefix_and_its_datapath_shares_the_range(plug):
    net = create(plug)
    assert net.addressing == "eni-prefix" and net.host_cidr == RANGE and net.gateway == "10.0.0.1"
    spec = plug.driver._spec(net)
    assert spec.shared_range and spec.prefixlen == 32       # the anchor holds the gateway alone, not the range
    address = plug.ipam.request_address(RANGE)["Address"]
    plug.driver.create_endpoint(NID, EID, {"Address": address, "MacAddress": ""}, {})
    assert plug.store.endpoints(NID)[0].address == str(ip_of({"Address": address}))
    join = plug.driver.join(NID, EID, "/var/run/docker/netns/x", {})
    # the range is the container's on-link prefix already: no static route for it (the kernel would refuse)
    assert join["Gateway"] == "10.0.0.1" and join["StaticRoutes"] == []


def test_bridge_mode_is_refused_leaving_nothing(plug):
    with pytest.raises(InvalidRequest, match="bridge mode is refused in eni-prefix addressing"):
        plug.driver.gw_alloc_check({GENERIC: {MODE_OPTION: "bridge"}})
    with pytest.raises(InvalidRequest, match="bridge mode is refused in eni-prefix addressing"):
        create(plug, generic={MODE_OPTION: "bridge"})
    assert plug.store.networks() == [] and plug.dataplane.state() == make_plugin_state()


def make_plugin_state():
    from fakes import FakeDataplane
    return FakeDataplane().state()


def test_a_mode_switch_is_refused_while_networks_of_the_other_addressing_exist(tmp_path, capsys):
    before = make_plugin(tmp_path)                          # route-table addressing
    pool = before.ipam.request_pool()["PoolID"]
    before.driver.create_network(NID, {GENERIC: {}}, [{"Pool": pool, "Gateway": ""}], [])
    after = make_plugin(tmp_path, **ENI)
    refusal = mixed_addressing(after.config)
    assert f"VPCNET_ADDRESSING is eni-prefix but this host's state has 1 network(s) of route-table addressing " \
           f"({NID[:12]})" in refusal and f"docker network rm {NID[:12]}" in refusal
    with pytest.raises(Conflict, match="a host never mixes the two"):
        after.ipam.request_pool()
    assert [p["pool_id"] for p in after.store.pools()] == [pool]
    assert mixed_addressing(before.config) == ""
    assert serve.run(after.config) == 1                    # refused before the socket is bound
    assert refusal in capsys.readouterr().err and not os.path.exists(after.config.socket)


def test_the_background_pass_keeps_the_warm_prefix_and_logs_it(plug, caplog):
    keeper = PrefixKeeper(plug.config, PrefixPool(plug.config, plug.store), threading.Event(), lambda: None)
    with caplog.at_level(logging.INFO, logger="vpcnet.cli.serve"):
        result = keeper.run_once()
    assert result.ok and len(result.assigned) == 1 and held(plug) == [ipaddress.IPv4Network(result.assigned[0])]
    assert any("prefix pass: assigned" in r.getMessage() for r in caplog.records)
    assert keeper.run_once().assigned == []                 # level-triggered: the target is met


# -- IPv6: the /80 prefix as the network's IPv6 half ---------------------------------------------------------

def held6(plug) -> list[ipaddress.IPv6Network]:
    return [ipaddress.IPv6Network(p.prefix) for p in plug.store.held_prefixes("ipv6")]


def test_the_ipv6_pool_is_the_ipv6_range_and_addresses_come_from_the_host_s_80_as_128s(plug):
    answer = plug.ipam.request_pool(v6=True)
    assert answer == {"PoolID": RANGE6, "Pool": RANGE6, "Data": {GATEWAY_KEY: "fd00:9::1/64"}}
    assert plug.ipam.request_pool(pool=RANGE6, v6=True) == answer      # --subnet naming the range, and replays
    assert plug.ipam.request_pool(pool="::/80", v6=True) == answer      # Docker 29's size-only form
    assert plug.store.claims() == [] and plug.routes.provider.list_routes() == []
    assert plug.ipam.request_address(RANGE6, options={REQUEST_TYPE_KEY: GATEWAY_KEY})["Address"] == "fd00:9::1/64"
    answers = [plug.ipam.request_address(RANGE6)["Address"] for _ in range(5)]
    assert all(a.endswith("/128") for a in answers) and len(set(answers)) == 5
    [prefix] = held6(plug)
    assert prefix.prefixlen == 80 and prefix.subnet_of(ipaddress.IPv6Network(RANGE6))
    addresses = {ipaddress.IPv6Interface(a).ip for a in answers}
    assert all(a in prefix for a in addresses)
    assert not {ipaddress.IPv6Address("fd00:9::"), ipaddress.IPv6Address("fd00:9::1")} & addresses
    assert sorted(plug.store.addresses(RANGE6)) == sorted(str(a) for a in addresses)
    assert held(plug) == []                   # an IPv6 address takes no IPv4 prefix


def test_a_requested_ipv6_address_inside_the_held_80_is_honoured_outside_refused(plug):
    plug.ipam.request_pool(v6=True)
    first = ipaddress.IPv6Interface(plug.ipam.request_address(RANGE6)["Address"]).ip
    [prefix] = held6(plug)
    wanted = prefix.network_address + 0xBEEF
    assert plug.ipam.request_address(RANGE6, f"{wanted}/128")["Address"] == f"{wanted}/128"
    with pytest.raises(Conflict, match="already in use"):
        plug.ipam.request_address(RANGE6, str(wanted))
    outside = prefix.broadcast_address + 1                         # in the range, in no prefix of this host's
    with pytest.raises(InvalidRequest, match=rf"address {outside} is in none of this host's prefixes \({prefix}\)"):
        plug.ipam.request_address(RANGE6, str(outside))
    with pytest.raises(InvalidRequest, match="gateway"):
        plug.ipam.request_address(RANGE6, "fd00:9::1")
    with pytest.raises(InvalidRequest, match="outside pool"):
        plug.ipam.request_address(RANGE6, "fd00:8::5")
    assert sorted(plug.store.addresses(RANGE6)) == sorted([str(first), str(wanted)])
    plug.ipam.release_address(RANGE6, f"{wanted}/128")
    assert plug.store.addresses(RANGE6) == [str(first)]


def test_an_ipv6_replay_is_honoured_once_in_the_window(plug):
    plug.ipam.request_pool(v6=True)
    address = str(ipaddress.IPv6Interface(plug.ipam.request_address(RANGE6)["Address"]).ip)
    plug.ipam.open_replay_window()                          # Docker restarted
    assert plug.ipam.request_pool(pool=RANGE6, v6=True)["PoolID"] == RANGE6
    assert plug.ipam.request_address(RANGE6, address)["Address"] == f"{address}/128"
    with pytest.raises(Conflict, match="already in use"):
        plug.ipam.request_address(RANGE6, address)


def test_a_second_dual_stack_network_on_the_ipv6_range_is_refused(plug):
    create_dual_stack(plug)
    with pytest.raises(Conflict, match=r"the range fd00:9::/64 is already used by network"):
        plug.ipam.request_pool(v6=True)


def create_dual_stack(plug, nid=NID):
    pool = plug.ipam.request_pool()["PoolID"]
    pool6 = plug.ipam.request_pool(v6=True)["PoolID"]
    plug.driver.create_network(nid, {GENERIC: {}}, [{"Pool": pool, "Gateway": ""}],
                               [{"Pool": pool6, "Gateway": ""}])
    return plug.store.network(nid)


def test_a_dual_stack_endpoint_joins_with_its_link_local_gateway(plug):
    net = create_dual_stack(plug)
    assert (net.host_cidr_v6, net.cluster_cidr_v6, net.addressing) == (RANGE6, RANGE6, "eni-prefix")
    assert plug.driver._spec(net).shared_range
    address = plug.ipam.request_address(RANGE)["Address"]
    address6 = plug.ipam.request_address(RANGE6)["Address"]
    plug.driver.create_endpoint(NID, EID, {"Address": address, "AddressIPv6": address6, "MacAddress": ""}, {})
    [ep] = plug.store.endpoints(NID)
    assert ep.address_v6 == str(ipaddress.IPv6Interface(address6).ip)
    join = plug.driver.join(NID, EID, "/var/run/docker/netns/x", {})
    gateway6 = join["GatewayIPv6"]
    assert ipaddress.IPv6Address(gateway6).is_link_local
    assert join["StaticRoutes"] == [{"Destination": f"{gateway6}/128", "RouteType": 1},
                                    {"Destination": RANGE6, "RouteType": 0, "NextHop": gateway6}]
    assert PrefixPool(plug.config, plug.store).families() == [4, 6]


def test_an_ipv6_only_network_takes_the_ipv6_range_alone(plug):
    pool6 = plug.ipam.request_pool(v6=True)["PoolID"]
    plug.driver.create_network(NID, {GENERIC: {MODE_OPTION: "routed"}, "com.docker.network.enable_ipv4": False,
                                     "com.docker.network.enable_ipv6": True},
                               [], [{"Pool": pool6, "Gateway": ""}])
    net = plug.store.network(NID)
    assert (net.host_cidr, net.host_cidr_v6, net.addressing) == ("", RANGE6, "eni-prefix")
    address6 = plug.ipam.request_address(RANGE6)["Address"]
    plug.driver.create_endpoint(NID, EID, {"Address": "", "AddressIPv6": address6, "MacAddress": ""}, {})
    join = plug.driver.join(NID, EID, "/var/run/docker/netns/x", {})
    assert "Gateway" not in join and ipaddress.IPv6Address(join["GatewayIPv6"]).is_link_local
    assert held(plug) == [] and len(held6(plug)) == 1            # no IPv4 prefix for an IPv6-only network


def test_the_background_pass_refills_at_once_when_containers_took_the_warm_prefix(tmp_path):
    plug = make_plugin(tmp_path, **ENI, VPCNET_RECONCILE_INTERVAL="300")
    pool = PrefixPool(plug.config, plug.store)
    stop = threading.Event()
    keeper = PrefixKeeper(plug.config, pool, stop, lambda: None)
    thread = keeper.start()
    try:
        assert wait_for(lambda: keeper.passes >= 1, 10) and len(held(plug)) == 1
        assert not pool.short_of_warm_target()
        pool_id = plug.ipam.request_pool()["PoolID"]
        plug.ipam.request_address(pool_id)                   # the warm prefix is in use now
        # long before the 300 s interval: a second pass restores a wholly free prefix
        assert wait_for(lambda: keeper.passes >= 2 and len(held(plug)) == 2, 5)
        assert not pool.short_of_warm_target()
        passes = keeper.passes
        assert not wait_for(lambda: keeper.passes > passes, 2.5)   # at the target: no pass until the interval
    finally:
        stop.set()
        thread.join(10)
