"""The emulator's ECS side over real HTTP (127.0.0.1 only), signed: primary ENIs, their IPv4 /28 and IPv6 /80
prefixes, instance types, vSwitch reserved ranges, ClientTokens, every error code, persistence."""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys

import pytest
import requests

from vpcnet_lab.emulator import Emulator, serve_in_thread
from vpcnet_lab.emulator.enis import eni_id_of

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # share the signed client (any import mode)
from conftest import wait_for  # noqa: E402
from test_emulator import REPO, Client, _free_port, assert_error  # noqa: E402

ECS = "2014-05-26"
RANGE = "192.168.0.64/26"          # a reserved range of type Prefix: four /28s
V6 = "fd00:77:1::/64"


class EcsClient(Client):
    def ecs(self, action: str, **params) -> tuple[int, dict]:
        return self.call(action, Version=ECS, **params)

    def ecs_ok(self, action: str, **params) -> dict:
        status, body = self.ecs(action, **params)
        assert status == 200, body
        return body

    def interface(self, eni: str) -> dict:
        [item] = self.ecs_ok("DescribeNetworkInterfaces", **{"NetworkInterfaceId.1": eni})[
            "NetworkInterfaceSets"]["NetworkInterfaceSet"]
        return item

    def prefixes(self, eni: str) -> tuple[list[str], list[str]]:
        item = self.interface(eni)
        return ([p["Ipv4Prefix"] for p in item["Ipv4PrefixSets"]["Ipv4PrefixSet"]],
                [p["Ipv6Prefix"] for p in item["Ipv6PrefixSets"]["Ipv6PrefixSet"]])

    def assign4(self, eni: str, count: int = 1, **params) -> tuple[int, dict]:
        return self.ecs("AssignPrivateIpAddresses", NetworkInterfaceId=eni, Ipv4PrefixCount=count, **params)

    def assign6(self, eni: str, count: int = 1, **params) -> tuple[int, dict]:
        return self.ecs("AssignIpv6Addresses", NetworkInterfaceId=eni, Ipv6PrefixCount=count, **params)


@pytest.fixture
def make_emu():
    made = []

    def make(**kwargs):
        emu = Emulator(**kwargs)
        url, stop = serve_in_thread(emu)
        made.append((emu, stop))
        emu.register_instance("i-host1", "192.168.0.2", "fd00:77:1::2")
        emu.register_instance("i-host2", "192.168.0.3", "", "ecs.t5-lc1m1.small")
        emu.test_url = url
        return emu, EcsClient(url)

    yield make
    for emu, stop in made:
        stop()
        emu.close()


@pytest.fixture
def emu_client(make_emu):
    emu, client = make_emu()
    vsw = client.interface(eni_id_of("i-host1"))["VSwitchId"]
    emu.add_cidr_reservation(vsw, RANGE)
    emu.set_vswitch_ipv6(vsw, V6)
    return emu, client


ENI1 = eni_id_of("i-host1")
ENI2 = eni_id_of("i-host2")


def test_every_instance_has_a_primary_eni(make_emu):
    emu, client = make_emu()
    body = client.ecs_ok("DescribeNetworkInterfaces", InstanceId="i-host1")
    [item] = body["NetworkInterfaceSets"]["NetworkInterfaceSet"]
    assert item["NetworkInterfaceId"] == ENI1 and ENI1.startswith("eni-")
    assert (item["Type"], item["InstanceId"], item["Status"]) == ("Primary", "i-host1", "InUse")
    assert item["MacAddress"].startswith("00:16:3e:") and len(item["MacAddress"]) == 17
    assert item["VSwitchId"] == "vsw-emu0001"          # the vSwitch whose CIDR holds 192.168.0.2
    assert item["PrivateIpSets"]["PrivateIpSet"] == [{"PrivateIpAddress": "192.168.0.2", "Primary": True}]
    assert item["Ipv6Sets"]["Ipv6Set"] == [{"Ipv6Address": "fd00:77:1::2"}]
    assert item["Ipv4PrefixSets"]["Ipv4PrefixSet"] == [] and item["Ipv6PrefixSets"]["Ipv6PrefixSet"] == []
    both = client.ecs_ok("DescribeNetworkInterfaces")["NetworkInterfaceSets"]["NetworkInterfaceSet"]
    assert sorted(i["InstanceId"] for i in both) == ["i-host1", "i-host2"]
    assert emu.network_interface_id("i-host2") == ENI2 != ENI1


def test_the_eni_actions_need_the_ecs_version(emu_client):
    _emu, client = emu_client
    body = assert_error(client.call("DescribeNetworkInterfaces"), 404, "InvalidAction.NotFound")
    assert ECS in body["Message"]


def test_describe_network_interfaces_pages_with_next_token(make_emu):
    emu, client = make_emu()
    for i in range(11):
        emu.register_instance(f"i-more{i:02d}", f"192.168.0.{20 + i}")
    seen, token = [], ""
    for _ in range(5):
        params = {"MaxResults": 10, **({"NextToken": token} if token else {})}
        body = client.ecs_ok("DescribeNetworkInterfaces", **params)
        seen += [i["NetworkInterfaceId"] for i in body["NetworkInterfaceSets"]["NetworkInterfaceSet"]]
        token = body["NextToken"]
        if not token:
            break
    assert len(seen) == len(set(seen)) == 13
    assert_error(client.ecs("DescribeNetworkInterfaces", MaxResults=5), 400, "InvalidParameter.MaxResults")
    assert_error(client.ecs("DescribeNetworkInterfaces", NextToken="zz"), 400, "InvalidNextToken.Malformed")


def test_instance_types_and_their_limits(make_emu):
    _emu, client = make_emu()
    kinds = client.ecs_ok("DescribeInstanceTypes", **{"InstanceTypes.1": "ecs.g7.large"})
    [g7] = kinds["InstanceTypes"]["InstanceType"]
    assert (g7["InstanceTypeId"], g7["EniQuantity"], g7["EniPrivateIpAddressQuantity"],
            g7["EniIpv6AddressQuantity"]) == ("ecs.g7.large", 3, 6, 6)
    assert len(client.ecs_ok("DescribeInstanceTypes")["InstanceTypes"]["InstanceType"]) >= 3
    instances = client.ok("DescribeInstances", InstanceIds='["i-host1", "i-host2"]')["Instances"]["Instance"]
    assert {i["InstanceId"]: i["InstanceType"] for i in instances} == {
        "i-host1": "ecs.g7.large", "i-host2": "ecs.t5-lc1m1.small"}


def test_assign_describe_unassign_ipv4_prefixes(emu_client):
    emu, client = emu_client
    status, body = client.assign4(ENI1, 2)
    assert status == 200, body
    got = body["AssignedPrivateIpAddressesSet"]["Ipv4PrefixSet"]["Ipv4Prefixes"]
    assert body["AssignedPrivateIpAddressesSet"]["NetworkInterfaceId"] == ENI1
    assert got == ["192.168.0.64/28", "192.168.0.80/28"]
    assert all(ipaddress.ip_network(p).subnet_of(ipaddress.ip_network(RANGE)) for p in got)
    assert client.prefixes(ENI1) == (got, [])
    # an exact prefix, by Ipv4Prefix.N
    status, body = client.ecs("AssignPrivateIpAddresses", NetworkInterfaceId=ENI1,
                              **{"Ipv4Prefix.1": "192.168.0.112/28"})
    assert status == 200, body
    assert client.prefixes(ENI1)[0] == got + ["192.168.0.112/28"]
    assert_error(client.ecs("AssignPrivateIpAddresses", NetworkInterfaceId=ENI1,
                            **{"Ipv4Prefix.1": "192.168.0.112/28"}), 400, "InvalidIp.IpAssigned")
    assert_error(client.ecs("AssignPrivateIpAddresses", NetworkInterfaceId=ENI1,
                            **{"Ipv4Prefix.1": "192.168.0.16/28"}), 400, "InvalidVSwitchId.IpNotEnough")
    # unassign two in one call
    assert client.ecs("UnassignPrivateIpAddresses", NetworkInterfaceId=ENI1,
                      **{"Ipv4Prefix.1": got[0], "Ipv4Prefix.2": "192.168.0.112/28"})[0] == 200
    assert client.prefixes(ENI1)[0] == [got[1]]
    # a freed /28 is handed out again
    assert client.assign4(ENI1, 1)[1]["AssignedPrivateIpAddressesSet"]["Ipv4PrefixSet"]["Ipv4Prefixes"] == [got[0]]


def test_prefixes_come_only_from_a_reserved_range(make_emu):
    emu, client = make_emu()
    assert_error(client.assign4(ENI1, 1), 400, "InvalidVSwitchId.IpNotEnough")
    emu.add_cidr_reservation("vsw-emu0001", "192.168.0.240/28")       # room for exactly one
    assert client.assign4(ENI1, 1)[0] == 200
    assert_error(client.assign4(ENI1, 1), 400, "InvalidVSwitchId.IpNotEnough")
    emu.add_cidr_reservation("vsw-emu0001", "192.168.0.128/27", kind="Normal")    # not of type Prefix
    assert_error(client.assign4(ENI1, 1), 400, "InvalidVSwitchId.IpNotEnough")
    with pytest.raises(ValueError, match="overlaps"):
        emu.add_cidr_reservation("vsw-emu0001", "192.168.0.224/27")


def test_a_reserved_range_and_a_named_prefix_must_lie_inside_the_vswitch(make_emu):
    """A VPC refuses a reserved range outside its vSwitch's CIDR of that family, and a prefix asked for by name
    outside the interface's vSwitch; neither refusal changes anything. The codes are the closest documented
    ones (enis.RESERVATION_OUTSIDE_VSWITCH, enis.PREFIX_OUTSIDE_VSWITCH: none is documented for these)."""
    emu, client = make_emu()                              # vsw-emu0001 is 192.168.0.0/24, no IPv6 CIDR yet
    from vpcnet_lab.emulator.errors import ApiError

    # by the Python interface, the admin API and the VPC API's CreateVSwitchCidrReservation alike
    for outside in ("10.9.0.0/26", "192.168.0.0/23", "192.168.1.0/28"):
        with pytest.raises(ApiError) as refused:
            emu.add_cidr_reservation("vsw-emu0001", outside)
        assert refused.value.code == "Mismatch.VSwitchAndPrivateIpAddress", outside
        r = requests.post(emu.test_url + "_emulator/cidr-reservations",
                          json={"vswitch_id": "vsw-emu0001", "cidr": outside}, timeout=5)
        assert r.status_code == 400 and "Mismatch.VSwitchAndPrivateIpAddress" in r.json()["error"], r.text
        assert_error(client.call("CreateVSwitchCidrReservation", VSwitchId="vsw-emu0001",
                                 VSwitchCidrReservationCidr=outside), 400, "Mismatch.VSwitchAndPrivateIpAddress")
    assert_error(client.call("CreateVSwitchCidrReservation", VSwitchId="vsw-nosuch",
                             VSwitchCidrReservationCidr="192.168.0.64/26"), 404, "InvalidVSwitchId.NotFound")
    # IPv6: inside the vSwitch's IPv6 CIDR, which it must have
    assert_error(client.call("CreateVSwitchCidrReservation", VSwitchId="vsw-emu0001", IpVersion="IPv6",
                             VSwitchCidrReservationCidr="fd00:77:1::/80"), 400, "Mismatch.VSwitchAndPrivateIpAddress")
    emu.set_vswitch_ipv6("vsw-emu0001", V6)
    assert_error(client.call("CreateVSwitchCidrReservation", VSwitchId="vsw-emu0001", IpVersion="IPv6",
                             VSwitchCidrReservationCidr="fd00:77:2::/80"), 400, "Mismatch.VSwitchAndPrivateIpAddress")
    assert client.ok("ListVSwitchCidrReservations", VSwitchId="vsw-emu0001")["VSwitchCidrReservations"] == []

    # inside: accepted, by the VPC API too, and prefixes come from it
    body = client.ok("CreateVSwitchCidrReservation", VSwitchId="vsw-emu0001",
                     VSwitchCidrReservationCidr="192.168.0.64/26", VSwitchCidrReservationType="prefix")
    assert body["VSwitchCidrReservationId"].startswith("vcr-")
    [listed] = client.ok("ListVSwitchCidrReservations", VSwitchId="vsw-emu0001")["VSwitchCidrReservations"]
    assert (listed["VSwitchCidrReservationCidr"], listed["Type"]) == ("192.168.0.64/26", "Prefix")
    assert emu.add_cidr_reservation("vsw-emu0001", "fd00:77:1:0:8::/80").startswith("vcr-")

    # a prefix by name: outside the vSwitch's CIDR of its family -> the mismatch; inside but not in a reserved
    # range of type Prefix -> not enough addresses, as before
    assert_error(client.ecs("AssignPrivateIpAddresses", NetworkInterfaceId=ENI1, **{"Ipv4Prefix.1": "10.9.0.16/28"}),
                 400, "InvalidPrivateIpAddress.Mismatch")
    assert_error(client.ecs("AssignPrivateIpAddresses", NetworkInterfaceId=ENI1,
                            **{"Ipv4Prefix.1": "192.168.0.16/28"}), 400, "InvalidVSwitchId.IpNotEnough")
    assert_error(client.ecs("AssignIpv6Addresses", NetworkInterfaceId=ENI1, **{"Ipv6Prefix.1": "fd00:77:2::/80"}),
                 400, "InvalidPrivateIpAddress.Mismatch")
    assert client.prefixes(ENI1) == ([], [])
    assert client.ecs("AssignPrivateIpAddresses", NetworkInterfaceId=ENI1, **{"Ipv4Prefix.1": "192.168.0.80/28"}
                      )[0] == 200
    assert client.ecs("AssignIpv6Addresses", NetworkInterfaceId=ENI1, **{"Ipv6Prefix.1": "fd00:77:1:0:5::/80"}
                      )[0] == 200
    assert client.prefixes(ENI1) == (["192.168.0.80/28"], ["fd00:77:1:0:5::/80"])


def test_list_vswitch_cidr_reservations(emu_client):
    emu, client = emu_client
    assert client.assign4(ENI1, 1)[0] == 200
    body = client.ok("ListVSwitchCidrReservations", VSwitchId="vsw-emu0001", IpVersion="IPv4")
    [r] = body["VSwitchCidrReservations"]
    assert r["VSwitchCidrReservationId"].startswith("vcr-")
    assert (r["VSwitchCidrReservationCidr"], r["Type"], r["IpVersion"], r["VSwitchId"]) == (
        RANGE, "Prefix", "IPv4", "vsw-emu0001")
    assert (r["AssignedCidrCount"], r["AvailableCidrCount"]) == (1, 3)
    assert client.ok("ListVSwitchCidrReservations", VSwitchId="vsw-emu0001", IpVersion="IPv6")[
        "VSwitchCidrReservations"] == []
    assert client.ok("ListVSwitchCidrReservations", VSwitchId="vsw-other")["VSwitchCidrReservations"] == []
    assert_error(client.call("ListVSwitchCidrReservations"), 400, "MissingParameter")


def test_the_interface_fills_up(make_emu):
    """ecs.g7.large: 6 address slots, one for the primary address, so 5 prefixes."""
    emu, client = make_emu()
    emu.add_cidr_reservation("vsw-emu0001", "192.168.0.128/25")
    assert client.assign4(ENI1, 4)[0] == 200
    body = assert_error(client.assign4(ENI1, 2), 400, "InvalidOperation.Ipv4CountExceeded")
    assert "1 more" in body["Message"]
    assert client.assign4(ENI1, 1)[0] == 200
    assert_error(client.assign4(ENI1, 1), 400, "QuotaExceeded.PrivateIpAddress")
    assert len(client.prefixes(ENI1)[0]) == 5
    # an instance type with one address slot has no room for any prefix
    assert_error(client.assign4(ENI2, 1), 400, "QuotaExceeded.PrivateIpAddress")
    assert_error(client.assign4(ENI1, 11), 400, "InvalidParameter.Ipv4PrefixCount")
    assert_error(client.assign4(ENI1, 0), 400, "MissingParameter")


def test_ipv6_prefixes(emu_client):
    emu, client = emu_client
    status, body = client.assign6(ENI1, 2)
    assert status == 200, body
    got = body["Ipv6PrefixSets"]["Ipv6Prefix"]          # top-level, not nested like IPv4
    assert got == ["fd00:77:1:0:1::/80", "fd00:77:1:0:2::/80"]     # not the /80 of the instance's own address
    assert client.prefixes(ENI1) == ([], got)
    # 6 IPv6 slots: the instance's own IPv6 address and 2 prefixes hold 3
    assert_error(client.assign6(ENI1, 4), 400, "InvalidOperation.Ipv6CountExceeded")
    assert client.ecs("UnassignIpv6Addresses", NetworkInterfaceId=ENI1, **{"Ipv6Prefix.1": got[0]})[0] == 200
    assert client.prefixes(ENI1) == ([], [got[1]])
    assert_error(client.ecs("UnassignIpv6Addresses", NetworkInterfaceId=ENI1, **{"Ipv6Prefix.1": got[0]}),
                 400, "InvalidIp.IpUnassigned")
    # a vSwitch without an IPv6 CIDR has no /80 to give
    emu.add_vswitch("vsw-plain", "10.1.0.0/24")
    emu.register_instance("i-host3", "10.1.0.3")
    assert client.interface(eni_id_of("i-host3"))["VSwitchId"] == "vsw-plain"
    assert_error(client.assign6(eni_id_of("i-host3"), 1), 400, "InvalidVSwitchId.IpNotEnough")


def test_unassign_errors_change_nothing(emu_client):
    emu, client = emu_client
    [held] = client.assign4(ENI1, 1)[1]["AssignedPrivateIpAddressesSet"]["Ipv4PrefixSet"]["Ipv4Prefixes"]
    # one prefix not held refuses the whole call
    assert_error(client.ecs("UnassignPrivateIpAddresses", NetworkInterfaceId=ENI1,
                            **{"Ipv4Prefix.1": held, "Ipv4Prefix.2": "192.168.0.96/28"}),
                 400, "InvalidIp.IpUnassigned")
    assert client.prefixes(ENI1)[0] == [held]
    assert_error(client.ecs("UnassignPrivateIpAddresses", NetworkInterfaceId="eni-nope",
                            **{"Ipv4Prefix.1": held}), 404, "InvalidEniId.NotFound")
    assert_error(client.assign4("eni-nope", 1), 404, "InvalidEniId.NotFound")
    assert_error(client.ecs("UnassignPrivateIpAddresses", NetworkInterfaceId=ENI1), 400, "MissingParameter")
    assert_error(client.ecs("UnassignPrivateIpAddresses", NetworkInterfaceId=ENI1, **{"Ipv4Prefix.1": "x"}),
                 400, "InvalidParameter")


def test_client_token_idempotency(emu_client):
    emu, client = emu_client
    first = client.assign4(ENI1, 2, ClientToken="tok-a")[1]
    again = client.assign4(ENI1, 2, ClientToken="tok-a")[1]
    assert again["AssignedPrivateIpAddressesSet"] == first["AssignedPrivateIpAddressesSet"]
    assert len(client.prefixes(ENI1)[0]) == 2                       # assigned once
    assert_error(client.assign4(ENI1, 1, ClientToken="tok-a"), 400, "IdempotentFailed")
    assert_error(client.assign6(ENI1, 2, ClientToken="tok-a"), 400, "IdempotentFailed")
    six = client.assign6(ENI1, 1, ClientToken="tok-6")[1]
    assert client.assign6(ENI1, 1, ClientToken="tok-6")[1]["Ipv6PrefixSets"] == six["Ipv6PrefixSets"]
    assert len(client.prefixes(ENI1)[1]) == 1


def test_operation_conflict_while_the_interface_is_busy(emu_client):
    emu, client = emu_client
    r = requests.post(emu.test_url + f"_emulator/network-interfaces/{ENI1}/hold", json={"seconds": 30}, timeout=5)
    assert r.status_code == 200
    assert_error(client.assign4(ENI1, 1), 400, "Operation.Conflict")
    assert_error(client.ecs("UnassignPrivateIpAddresses", NetworkInterfaceId=ENI1,
                            **{"Ipv4Prefix.1": "192.168.0.64/28"}), 400, "Operation.Conflict")
    assert_error(client.assign4(ENI2, 1), 400, "QuotaExceeded.PrivateIpAddress")   # another one is not held
    emu.hold_interface(ENI1, 0)
    assert client.assign4(ENI1, 1)[0] == 200


def test_throttling_changes_nothing(emu_client):
    emu, client = emu_client
    emu.set_faults(rate=1.0, codes=["Throttling"])
    assert_error(client.assign4(ENI1, 1, ClientToken="tok-t"), 400, "Throttling")
    emu.set_faults(rate=0.0)
    assert client.prefixes(ENI1)[0] == []
    assert client.assign4(ENI1, 1, ClientToken="tok-t")[0] == 200       # the token was not spent


def test_admin_endpoints(make_emu):
    emu, client = make_emu()
    url = emu.test_url
    r = requests.post(url + "_emulator/instances", json={"instance_id": "i-big", "ip": "192.168.0.9",
                                                         "instance_type": "ecs.g7.xlarge"}, timeout=5)
    assert r.status_code == 200 and r.json()["network_interface_id"] == eni_id_of("i-big")
    unknown = {"instance_id": "i-x", "ip": "192.168.0.8", "instance_type": "ecs.nope"}
    assert requests.post(url + "_emulator/instances", json=unknown, timeout=5).status_code == 400
    r = requests.post(url + "_emulator/cidr-reservations", json={"vswitch_id": "vsw-emu0001",
                                                                 "cidr": "192.168.0.128/25"}, timeout=5)
    assert r.status_code == 200 and r.json()["VSwitchCidrReservationId"].startswith("vcr-")
    too_small = {"vswitch_id": "vsw-emu0001", "cidr": "10.9.0.0/29"}        # holds no /28
    assert requests.post(url + "_emulator/cidr-reservations", json=too_small, timeout=5).status_code == 400
    assert requests.post(url + "_emulator/vswitch-ipv6", json={"vswitch_id": "vsw-emu0001", "cidr": V6},
                         timeout=5).status_code == 200
    assert client.assign4(eni_id_of("i-big"), 8)[0] == 200           # 15 slots: more than a g7.large's 5
    state = requests.get(url + "_emulator/state", timeout=5).json()
    assert len(state["network_interfaces"][eni_id_of("i-big")]["ipv4_prefixes"]) == 8


def test_prefixes_survive_a_restart_and_go_with_their_instance(make_emu, tmp_path):
    state = str(tmp_path / "emu.json")
    emu, client = make_emu(state_file=state)
    emu.add_cidr_reservation("vsw-emu0001", RANGE)
    emu.set_vswitch_ipv6("vsw-emu0001", V6)
    got4 = client.assign4(ENI1, 1, ClientToken="tok-p")[1]
    got6 = client.assign6(ENI1, 1)[1]["Ipv6PrefixSets"]["Ipv6Prefix"]
    emu.close()
    emu2, client2 = make_emu(state_file=state)
    assert client2.prefixes(ENI1) == (got4["AssignedPrivateIpAddressesSet"]["Ipv4PrefixSet"]["Ipv4Prefixes"], got6)
    assert client2.assign4(ENI1, 1, ClientToken="tok-p")[1]["AssignedPrivateIpAddressesSet"] == \
        got4["AssignedPrivateIpAddressesSet"]                        # the token outlives the restart
    assert client2.ok("ListVSwitchCidrReservations", VSwitchId="vsw-emu0001")["TotalCount"] == 1
    assert emu2.desired_kernel_routes()["192.168.0.64/28"] == "192.168.0.2"
    assert emu2.desired_kernel_routes()[got6[0]] == "fd00:77:1::2"
    # released with its instance: the interface and its prefixes are gone, the /28 is free again
    emu2.deregister_instance("i-host1")
    assert_error(client2.assign4(ENI1, 1), 404, "InvalidEniId.NotFound")
    assert "192.168.0.64/28" not in emu2.desired_kernel_routes()
    assert client2.ok("ListVSwitchCidrReservations", VSwitchId="vsw-emu0001")[
        "VSwitchCidrReservations"][0]["AssignedCidrCount"] == 0


def _up(url: str) -> bool:
    try:
        return requests.get(url + "_emulator/state", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def test_cli_takes_prefix_ranges_and_vswitch_ipv6(tmp_path):
    """`vpcnet emulator --prefix-range VSW=CIDR --vswitch-ipv6 VSW=CIDR`, also again on its own state file."""
    state = tmp_path / "cli-state.json"
    for _round in (1, 2):
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "vpcnet.cli", "emulator", "--listen", f"127.0.0.1:{port}",
             "--instance", "i-cli=192.168.0.5", "--prefix-range", "vsw-emu0001=192.168.0.128/26",
             "--vswitch-ipv6", f"vsw-emu0001={V6}", "--state", str(state)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            url = f"http://127.0.0.1:{port}/"
            assert wait_for(lambda u=url: _up(u), 15.0, 0.1), "emulator did not come up"
            client = EcsClient(url)
            eni = eni_id_of("i-cli")
            status, body = client.assign4(eni, 1)
            assert status == 200, body
            assert client.assign6(eni, 1)[0] == 200
            assert client.ok("ListVSwitchCidrReservations", VSwitchId="vsw-emu0001")["TotalCount"] == 1
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=5)
        assert proc.returncode == 0, err
    saved = json.loads(state.read_text())       # the server is gone: its state file tells what it held
    [eni_state] = saved["enis"].values()
    assert eni_state["ipv4_prefixes"] == ["192.168.0.128/28", "192.168.0.144/28"]
    assert len(eni_state["ipv6_prefixes"]) == 2
    proc = subprocess.run([sys.executable, "-m", "vpcnet.cli", "emulator", "--prefix-range", "nonsense"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--prefix-range wants VSW=CIDR" in proc.stderr, proc.stderr
