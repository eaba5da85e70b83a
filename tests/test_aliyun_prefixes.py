"""The aliyun prefix provider (vpcnet.cloud.aliyun.ecs) against the real emulator over HTTP, and, for answers
the emulator never gives, against a small fake API: describe, assign (with its ClientToken), unassign,
capacity, reserved ranges; every error code mapped to its exception."""
from __future__ import annotations

import pytest
from aliyun_fakes import ApiHandler, ApiState, MetadataHandler, MetadataState, closed_port, serve, serving_emulator
from conftest import wait_for

from vpcnet.cloud.aliyun import rpc
from vpcnet.cloud.aliyun.ecs import AliyunPrefixes
from vpcnet.cloud.prefixes import (
    InterfaceFull,
    InterfacePrefixes,
    NoFreePrefix,
    PrefixesUnsupported,
    make_prefix_provider,
)
from vpcnet.config import Config
from vpcnet.errors import Busy, Fatal, Retryable
from vpcnet_lab.emulator.enis import eni_id_of

KEY_ID, SECRET = "emu-key-id", "emu-key-secret"
ME, SMALL = "i-emu-h1", "i-emu-h2"
ENI, SMALL_ENI = eni_id_of(ME), eni_id_of(SMALL)
REGION, VPC, VSW = "cn-emu-1", "vpc-emu0001", "vsw-emu0001"
RANGE, V6 = "192.168.0.64/26", "fd00:77:1::/64"


@pytest.fixture
def emu():
    with serving_emulator({}, region=REGION, vpc_id=VPC, credentials={KEY_ID: SECRET}, seed=7) as e:
        e.register_instance(ME, "192.168.0.2")
        e.register_instance(SMALL, "192.168.0.3", "", "ecs.t5-lc1m1.small")
        e.add_cidr_reservation(VSW, RANGE)
        e.set_vswitch_ipv6(VSW, V6)
        yield e


def config(endpoint: str, **kw) -> Config:
    values = dict(provider="aliyun", aliyun_endpoint=endpoint, aliyun_region_id=REGION, aliyun_vpc_id=VPC,
                  aliyun_instance_id=ME, aliyun_network_interface_id=ENI,
                  aliyun_access_key_id=KEY_ID, aliyun_access_key_secret=SECRET,
                  # a closed port: any unexpected metadata lookup fails at once, and never leaves the host
                  aliyun_metadata_url=f"http://127.0.0.1:{closed_port()}")
    values.update(kw)
    return Config(**values)


@pytest.fixture
def make():
    made = []

    def _make(endpoint: str, **kw) -> AliyunPrefixes:
        p = AliyunPrefixes(config(endpoint, **kw))
        made.append(p)
        return p

    yield _make
    for p in made:
        p.close()


# -- success paths -------------------------------------------------------------------------------------
def test_it_is_the_aliyun_prefix_provider(emu):
    p = make_prefix_provider(config(emu.test_url))
    try:
        assert isinstance(p, AliyunPrefixes) and p.idempotent_assign and p.name == "aliyun"
    finally:
        p.close()


def test_describe_assign_unassign_ipv4(emu, make):
    p = make(emu.test_url)
    assert p.interface_id() == ENI
    assert p.describe() == InterfacePrefixes(ENI, (), (), ipv4_addresses=1, ipv6_addresses=0)
    got = p.assign(4, 2, "tok-1")
    assert got == ["192.168.0.64/28", "192.168.0.80/28"]
    assert p.describe().ipv4 == tuple(got)
    p.unassign(4, [got[0]])
    assert p.describe().ipv4 == (got[1],)
    p.unassign(4, [got[1]])
    assert p.describe().ipv4 == ()
    counts = emu.request_counts
    assert counts["AssignPrivateIpAddresses"] == 1 and counts["UnassignPrivateIpAddresses"] == 2


def test_describe_assign_unassign_ipv6(emu, make):
    p = make(emu.test_url)
    got = p.assign(6, 2, "tok-6")
    assert got == ["fd00:77:1::/80", "fd00:77:1:0:1::/80"]
    assert p.describe().ipv6 == tuple(got) and p.describe().ipv4 == ()
    p.unassign(6, got)
    assert p.describe().ipv6 == ()


def test_a_retry_with_the_same_token_assigns_once(emu, make):
    p = make(emu.test_url)
    first = p.assign(4, 2, "tok-same")
    assert p.assign(4, 2, "tok-same") == first
    assert p.describe().ipv4 == tuple(first)
    with pytest.raises(Fatal, match="ClientToken was reused") as info:
        p.assign(4, 1, "tok-same")
    assert info.value.code == "IdempotentFailed"


def test_a_lost_answer_then_a_retry_with_the_same_token(emu, make, monkeypatch):
    """The assign lands but its answer does not arrive in time: Retryable; the retry with the same token
    gets the prefixes of the first call, and nothing is assigned twice."""
    p = make(emu.test_url)
    monkeypatch.setattr(rpc, "API_TIMEOUT", (3.0, 0.3))
    emu.set_faults(latency=1.0)
    with pytest.raises(Retryable, match="did not answer"):
        p.assign(4, 1, "tok-lost")
    emu.set_faults(latency=0.0)
    monkeypatch.setattr(rpc, "API_TIMEOUT", (3.0, 10.0))
    assert wait_for(lambda: emu.enis.enis[ENI]["ipv4_prefixes"], 5)    # it landed on the emulator's side
    assert p.assign(4, 1, "tok-lost") == ["192.168.0.64/28"]
    assert p.describe().ipv4 == ("192.168.0.64/28",)


def test_unassign_of_prefixes_already_gone_is_done(emu, make):
    p = make(emu.test_url)
    held = p.assign(4, 3, "tok-g")
    p.unassign(4, [held[0]])
    # one of them is gone already: the API refuses the whole call; the others still go
    p.unassign(4, held)
    assert p.describe().ipv4 == ()
    p.unassign(4, held)                           # all gone: done
    p.unassign(6, ["fd00:77:1::/80"])
    counts = emu.request_counts
    assert counts["UnassignPrivateIpAddresses"] == 4       # 1 + (refused, then the rest) + refused


def test_unassign_on_an_interface_that_is_gone_is_done(emu, make):
    p = make(emu.test_url, aliyun_network_interface_id="eni-gone")
    p.unassign(4, ["192.168.0.64/28"])
    with pytest.raises(Fatal, match="VPCNET_ALIYUN_NETWORK_INTERFACE_ID") as info:
        p.assign(4, 1, "tok-x")
    assert info.value.code == "InvalidEniId.NotFound"
    with pytest.raises(Fatal, match="does not list eni-gone"):
        p.describe()


def test_capacity_from_the_instance_type(emu, make):
    p = make(emu.test_url)
    cap = p.capacity()
    assert (cap.instance_type, cap.ipv4_prefixes, cap.ipv6_prefixes, cap.supported) == ("ecs.g7.large", 5, 6, True)
    small = make(emu.test_url, aliyun_instance_id=SMALL, aliyun_network_interface_id=SMALL_ENI).capacity()
    assert (small.instance_type, small.ipv4_prefixes, small.supported) == ("ecs.t5-lc1m1.small", 0, False)
    assert "1 private address slot" in small.reason
    # an instance with an IPv6 address: one IPv6 slot is taken
    emu.register_instance(ME, "192.168.0.2", "fd00:77:1::2")
    assert p.capacity().ipv6_prefixes == 5


def test_reserved_ranges(emu, make):
    p = make(emu.test_url)
    assert p.reserved_ranges(4) == [RANGE]
    assert p.reserved_ranges(6) == []
    emu.add_cidr_reservation(VSW, "192.168.0.128/26", kind="Normal")
    assert p.reserved_ranges(4) == [RANGE]


def test_the_interface_from_metadata(emu, make):
    state = MetadataState()
    state.values.update({"mac": "00:16:3e:aa:bb:cc",
                         "network/interfaces/macs/00:16:3e:aa:bb:cc/network-interface-id": ENI})
    url, stop = serve(MetadataHandler, state)
    try:
        p = make(emu.test_url, aliyun_network_interface_id="", aliyun_metadata_url=url)
        assert p.interface_id() == ENI
        assert p.interface_id() == ENI                  # read once
        paths = [path for _m, path, _h in state.requests if "meta-data" in path]
        assert paths == ["/latest/meta-data/mac",
                         "/latest/meta-data/network/interfaces/macs/00:16:3e:aa:bb:cc/network-interface-id"]
        del state.values["network/interfaces/macs/00:16:3e:aa:bb:cc/network-interface-id"]
        q = make(emu.test_url, aliyun_network_interface_id="", aliyun_metadata_url=url)
        with pytest.raises(Fatal, match="VPCNET_ALIYUN_NETWORK_INTERFACE_ID"):
            q.interface_id()
    finally:
        stop()


def test_an_explicit_ecs_endpoint_wins(emu, make):
    p = make(f"http://127.0.0.1:{closed_port()}/", aliyun_ecs_endpoint=emu.test_url)
    assert p.ecs_endpoint() == emu.test_url
    assert p.describe().interface_id == ENI
    derived = make("https://vpc-vpc.cn-hangzhou.aliyuncs.com/")
    assert derived.ecs_endpoint() == "https://ecs-vpc.cn-hangzhou.aliyuncs.com/"
    assert make("", aliyun_region_id="cn-hangzhou").ecs_endpoint() == "https://ecs.cn-hangzhou.aliyuncs.com/"


# -- errors --------------------------------------------------------------------------------------------
def test_no_free_prefix_says_how_to_reserve_a_range(emu, make):
    p = make(emu.test_url)
    p.assign(4, 4, "tok-all")                     # the /26 holds four /28s
    with pytest.raises(NoFreePrefix, match="CreateVSwitchCidrReservation.*Prefix.*vsw-emu0001") as info:
        p.assign(4, 1, "tok-more")
    assert info.value.code == "InvalidVSwitchId.IpNotEnough"
    emu.set_vswitch_ipv6(VSW, "fd00:77:2::/80")   # room for exactly one /80
    p.assign(6, 1, "tok-61")
    with pytest.raises(NoFreePrefix, match="IPv6"):
        p.assign(6, 1, "tok-62")


def test_a_full_interface(emu, make):
    emu.add_cidr_reservation(VSW, "192.168.0.128/25")
    p = make(emu.test_url)
    p.assign(4, 4, "tok-a")
    with pytest.raises(InterfaceFull, match="instance type") as info:
        p.assign(4, 2, "tok-b")
    assert info.value.code == "InvalidOperation.Ipv4CountExceeded"
    p.assign(4, 1, "tok-c")
    with pytest.raises(InterfaceFull) as info:
        p.assign(4, 1, "tok-d")
    assert info.value.code == "QuotaExceeded.PrivateIpAddress"
    with pytest.raises(InterfaceFull) as info:
        p.assign(6, 7, "tok-e")
    assert info.value.code == "InvalidOperation.Ipv6CountExceeded"


def test_an_instance_type_without_room_for_prefixes(emu, make):
    p = make(emu.test_url, aliyun_instance_id=SMALL, aliyun_network_interface_id=SMALL_ENI)
    with pytest.raises(PrefixesUnsupported, match="ecs.t5-lc1m1.small.*VPCNET_ADDRESSING=route-table"):
        p.assign(4, 1, "tok-s")


def test_a_busy_interface_and_throttling(emu, make):
    p = make(emu.test_url)
    emu.hold_interface(ENI, 30)
    with pytest.raises(Busy, match="another operation") as info:
        p.assign(4, 1, "tok-busy")
    assert info.value.code == "Operation.Conflict"
    with pytest.raises(Busy):
        p.unassign(4, ["192.168.0.64/28"])
    emu.hold_interface(ENI, 0)
    emu.set_faults(rate=1.0, codes=["Throttling"])
    with pytest.raises(Busy):
        p.assign(4, 1, "tok-busy")
    emu.set_faults(rate=1.0, codes=["ServiceUnavailable"])
    with pytest.raises(Retryable):
        p.assign(4, 1, "tok-busy")
    emu.set_faults(rate=0.0)
    assert p.assign(4, 1, "tok-busy") == ["192.168.0.64/28"]      # the same token: nothing was spent


def test_arguments_are_checked_before_any_call(emu, make):
    p = make(emu.test_url)
    for version, count, token in ((4, 0, "t"), (4, 11, "t"), (5, 1, "t"), (4, 1, "")):
        with pytest.raises(ValueError):
            p.assign(version, count, token)
    assert "AssignPrivateIpAddresses" not in emu.request_counts


@pytest.fixture
def fake():
    state = ApiState(secrets={KEY_ID: SECRET})
    url, stop = serve(ApiHandler, state)
    yield url, state
    stop()


def test_answers_the_emulator_never_gives(fake, make):
    url, state = fake
    p = make(url)
    # a success answer without the prefixes asked for: retried with the same token, never trusted
    state.answers["AssignPrivateIpAddresses"] = (200, {"AssignedPrivateIpAddressesSet": {}})
    with pytest.raises(Retryable, match="same ClientToken"):
        p.assign(4, 1, "tok-f")
    # a refused permission names the ECS and VPC actions eni-prefix needs, never the secret
    state.answers["AssignIpv6Addresses"] = (403, {"Code": "Forbidden.RAM", "Message": "denied"})
    with pytest.raises(Fatal, match="ecs:AssignIpv6Addresses") as info:
        p.assign(6, 1, "tok-f6")
    assert SECRET not in str(info.value)
    # an endpoint that does not serve ECS: the ECS endpoint setting is what to check
    state.answers["UnassignPrivateIpAddresses"] = (404, {"Code": "InvalidAction.NotFound", "Message": "no"})
    with pytest.raises(Fatal, match="VPCNET_ALIYUN_ECS_ENDPOINT"):
        p.unassign(4, ["10.0.0.0/28"])
    # the reserved ranges cannot be listed: None, for the doctor to say so
    state.answers["DescribeNetworkInterfaces"] = (200, {"NetworkInterfaceSets": {"NetworkInterfaceSet": [
        {"NetworkInterfaceId": ENI, "VSwitchId": "vsw-x"}]}})
    state.answers["ListVSwitchCidrReservations"] = (403, {"Code": "Forbidden.RAM", "Message": "denied"})
    assert p.reserved_ranges() is None
    state.answers["ListVSwitchCidrReservations"] = (200, {"VSwitchCidrReservations": [
        {"VSwitchCidrReservationCidr": "10.0.0.0/26", "Type": "prefix"},
        {"VSwitchCidrReservationCidr": "10.0.1.0/26", "Type": "Normal"}], "NextToken": ""})
    assert p.reserved_ranges() == ["10.0.0.0/26"]
    sent = [c for c in state.calls if c["Action"] == "ListVSwitchCidrReservations"][-1]
    assert (sent["VSwitchId"], sent["IpVersion"], sent["Version"]) == ("vsw-x", "IPv4", "2016-04-28")
    ecs = [c for c in state.calls if c["Action"] == "AssignPrivateIpAddresses"][-1]
    assert (ecs["Version"], ecs["ClientToken"], ecs["Ipv4PrefixCount"]) == ("2014-05-26", "tok-f", "1")
    # an instance type DescribeInstanceTypes does not know
    state.answers["DescribeInstances"] = (200, {"Instances": {"Instance": [
        {"InstanceId": ME, "InstanceType": "ecs.new.large"}]}})
    state.answers["DescribeInstanceTypes"] = (200, {"InstanceTypes": {"InstanceType": []}})
    cap = p.capacity()
    assert not cap.supported and "ecs.new.large" in cap.reason



def test_a_boots_pass_makes_four_calls_its_capacity_read_reusing_the_pass_describe(emu, tmp_path):
    """A boot's first pass on Alibaba: DescribeNetworkInterfaces, DescribeInstances, DescribeInstanceTypes,
    AssignPrivateIpAddresses; the capacity reads the interface's secondary addresses from the pass's own
    describe instead of describing it again. The next pass describes afresh (nothing kept across passes)."""
    from vpcnet.routes.prefixes import PrefixPool
    from vpcnet.state.store import Store

    cfg = config(emu.test_url, addressing="eni-prefix", cluster_cidr=RANGE, state_dir=str(tmp_path),
                 socket=str(tmp_path / "none.sock"))
    store = Store(cfg.db_path)
    provider = AliyunPrefixes(cfg)
    try:
        pool = PrefixPool(cfg, store, provider)
        emu.reset_request_counts()
        first = pool.sync()
        assert first.problems == [], first.problems
        assert emu.request_counts == {"DescribeNetworkInterfaces": 1, "DescribeInstances": 1,
                                      "DescribeInstanceTypes": 1, "AssignPrivateIpAddresses": 1}
        [held] = provider.describe().ipv4
        assert [h.prefix for h in store.held_prefixes()] == [held]
        # the next pass describes the interface afresh, once (the capacity stays the pool's, read once per
        # process); the warm prefix is there, so it makes no other call
        emu.reset_request_counts()
        assert pool.sync().problems == []
        assert emu.request_counts == {"DescribeNetworkInterfaces": 1}
    finally:
        provider.close()
        store.close()


def test_capacity_counts_the_secondary_addresses_of_the_interface_it_is_given(emu, make):
    p = make(emu.test_url)
    emu.reset_request_counts()
    seen = p.describe()
    busier = InterfacePrefixes(seen.interface_id, seen.ipv4, seen.ipv6, ipv4_addresses=3, ipv6_addresses=1)
    cap = p.capacity(busier)             # ecs.g7.large: 6 slots, the primary and 2 secondary addresses take 3
    assert (cap.ipv4_prefixes, cap.ipv6_prefixes) == (3, 5)
    assert emu.request_counts["DescribeNetworkInterfaces"] == 1          # only the describe above
    assert p.capacity().ipv4_prefixes == 5                               # given none: it describes itself
    assert emu.request_counts["DescribeNetworkInterfaces"] == 2
