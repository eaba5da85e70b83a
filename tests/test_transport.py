"""The plugin protocol over HTTP: Flask's test client against `create_app(driver, ipam)`, with a real
Store/Ipam/RouteKeeper (local provider, in tmp_path) and the recording fake dataplane; and, for what only
a real server shows (ids reaching the kernel, bodies on a socket), `vpcnet serve` itself in a test
namespace."""
from __future__ import annotations

import io
import ipaddress
import json
import os
import re
import socket
import threading

import pytest
from conftest import run
from fakes import MEDIA_TYPE, dump_db, make_plugin

from vpcnet.datapath.spec import mac_for, veth_names
from vpcnet.docker.transport import MAX_BODY, endpoint_table
from vpcnet.errors import DataplaneError

NID = "a1" * 32
NID2 = "b2" * 32
EID = "e3" * 32
EID2 = "f4" * 32
SANDBOX = "/var/run/docker/netns/0123456789ab"

# Every route: (required fields, {typed field: a value of the wrong type}). The test below checks that
# this table covers `endpoint_table` exactly, so a new route cannot go untested.
ROUTES: dict[str, tuple[tuple[str, ...], dict]] = {
    "/Plugin.Activate": ((), {}),
    "/NetworkDriver.GetCapabilities": ((), {}),
    "/NetworkDriver.GwAllocCheck": ((), {"Options": "x"}),
    "/NetworkDriver.CreateNetwork": (("NetworkID",), {"NetworkID": 7, "Options": "x", "IPv4Data": {},
                                                      "IPv6Data": "x"}),
    "/NetworkDriver.DeleteNetwork": (("NetworkID",), {"NetworkID": ["x"]}),
    "/NetworkDriver.CreateEndpoint": (("NetworkID", "EndpointID"), {"NetworkID": 1, "EndpointID": {},
                                                                    "Interface": "x", "Options": []}),
    "/NetworkDriver.EndpointOperInfo": (("NetworkID", "EndpointID"), {"NetworkID": 1, "EndpointID": 2}),
    "/NetworkDriver.DeleteEndpoint": (("EndpointID",), {"NetworkID": 1, "EndpointID": 2}),
    "/NetworkDriver.Join": (("NetworkID", "EndpointID", "SandboxKey"),
                            {"NetworkID": 1, "EndpointID": 2, "SandboxKey": 3, "Options": "x"}),
    "/NetworkDriver.Leave": (("EndpointID",), {"NetworkID": 1, "EndpointID": 2}),
    "/NetworkDriver.ProgramExternalConnectivity": (("NetworkID", "EndpointID"),
                                                   {"NetworkID": 1, "EndpointID": 2, "Options": "x"}),
    "/NetworkDriver.RevokeExternalConnectivity": (("EndpointID",), {"NetworkID": 1, "EndpointID": 2}),
    "/NetworkDriver.DiscoverNew": ((), {}),
    "/NetworkDriver.DiscoverDelete": ((), {}),
    "/NetworkDriver.AllocateNetwork": ((), {}),
    "/NetworkDriver.FreeNetwork": ((), {}),
    "/IpamDriver.GetCapabilities": ((), {}),
    "/IpamDriver.GetDefaultAddressSpaces": ((), {}),
    "/IpamDriver.RequestPool": ((), {"Pool": 1, "SubPool": 2, "Options": "x", "V6": "yes", "AddressSpace": 3}),
    "/IpamDriver.ReleasePool": (("PoolID",), {"PoolID": 1}),
    "/IpamDriver.RequestAddress": (("PoolID",), {"PoolID": 1, "Address": 2, "Options": "x"}),
    "/IpamDriver.ReleaseAddress": (("PoolID", "Address"), {"PoolID": 1, "Address": 2}),
}
NO_ARGS = [path for path, (required, typed) in ROUTES.items() if not required]


@pytest.fixture
def plug(tmp_path):
    return make_plugin(tmp_path)


@pytest.fixture
def client(plug):
    return plug.app().test_client()


def post(client, path: str, body=None, raw: bytes | None = None, content_type: str | None = None):
    """POST like Docker: JSON body, Accept the plugin media type, and no Content-Type unless asked."""
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Accept": MEDIA_TYPE}
    if content_type:
        headers["Content-Type"] = content_type
    resp = client.post(path, data=data, headers=headers)
    assert resp.mimetype == MEDIA_TYPE, (path, resp.mimetype)
    return resp.status_code, json.loads(resp.data)


def ok(client, path: str, body=None) -> dict:
    status, answer = post(client, path, body)
    assert status == 200, (path, answer)
    assert "Err" not in answer
    return answer


def refused(client, path: str, body=None, status: int | None = None) -> str:
    code, answer = post(client, path, body)
    assert code != 200, (path, answer)
    if status is not None:
        assert code == status, (path, code, answer)
    assert set(answer) == {"Err"} and isinstance(answer["Err"], str) and answer["Err"], answer
    return answer["Err"]


def setup_network(client, nid=NID, pool_body=None, options=None) -> dict:
    pool = ok(client, "/IpamDriver.RequestPool", pool_body or {"AddressSpace": "vpcnet-local", "Pool": "",
                                                               "SubPool": "", "Options": {}, "V6": False})
    gateway = pool["Data"]["com.docker.network.gateway"]
    ok(client, "/NetworkDriver.CreateNetwork", {
        "NetworkID": nid, "Options": options or {"com.docker.network.enable_ipv6": False,
                                                 "com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "vpcnet-local", "Pool": pool["Pool"], "Gateway": gateway,
                      "AuxAddresses": None}],
        "IPv6Data": []})
    return pool


def setup_endpoint(client, pool, nid=NID, eid=EID, mac="") -> str:
    address = ok(client, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "",
                                                        "Options": {}})["Address"]
    ok(client, "/NetworkDriver.CreateEndpoint", {"NetworkID": nid, "EndpointID": eid, "Options": {},
                                                 "Interface": {"Address": address, "AddressIPv6": "",
                                                               "MacAddress": mac}})
    return address


def valid_body(path: str, pool_id: str = "10.200.0.0/24") -> dict:
    """A body with every required field present and well typed."""
    values = {"NetworkID": NID, "EndpointID": EID, "SandboxKey": SANDBOX, "PoolID": pool_id,
              "Address": "10.200.0.77"}
    return {name: values[name] for name in ROUTES[path][0]}


# -- the table --------------------------------------------------------------------------------------
def test_route_table_is_covered(plug):
    assert set(endpoint_table(plug.driver, plug.ipam)) == set(ROUTES)


# -- bodies -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", NO_ARGS)
@pytest.mark.parametrize("raw", [b"null", b"", b"  \n", b"{}"], ids=["null", "empty", "blank", "object"])
def test_no_arg_calls_accept_null_and_empty_bodies(client, path, raw):
    status, answer = post(client, path, raw=raw)
    assert status == 200, answer
    assert "Err" not in answer


@pytest.mark.parametrize("path", sorted(ROUTES))
@pytest.mark.parametrize("raw", [b"{", b"{'NetworkID': 'x'}", b"\xff\xfe\x00", b"nul"],
                         ids=["truncated", "single-quotes", "binary", "bad-literal"])
def test_malformed_json(client, path, raw):
    status, answer = post(client, path, raw=raw)
    assert status == 400
    assert answer["Err"].startswith("malformed JSON")


@pytest.mark.parametrize("path", sorted(ROUTES))
@pytest.mark.parametrize("body", [[], [{"NetworkID": NID}], 5, "text", True])
def test_non_object_json(client, path, body):
    assert "must be a JSON object" in refused(client, path, body, status=400)


@pytest.mark.parametrize("path,field", [(p, f) for p, (req, _) in ROUTES.items() for f in req])
def test_missing_required_field(client, path, field):
    body = valid_body(path)
    del body[field]
    assert refused(client, path, body, status=400) == f"missing field {field}"
    body[field] = None                               # null counts as missing
    assert refused(client, path, body, status=400) == f"missing field {field}"


@pytest.mark.parametrize("path", [p for p, (req, _) in ROUTES.items() if req])
def test_null_body_on_call_with_arguments(client, path):
    assert refused(client, path, None, status=400).startswith("missing field ")


@pytest.mark.parametrize("path,field", [(p, f) for p, (_, typed) in ROUTES.items() for f in typed])
def test_wrong_field_type(client, path, field):
    body = valid_body(path)
    body[field] = ROUTES[path][1][field]
    message = refused(client, path, body, status=400)
    assert message.startswith(f"field {field} must be "), message


@pytest.mark.parametrize("content_type", [None, "application/json", "text/plain", MEDIA_TYPE,
                                          "application/x-www-form-urlencoded"])
def test_body_parsed_whatever_the_content_type(client, content_type):
    status, answer = post(client, "/IpamDriver.RequestPool", raw=json.dumps({"Pool": "10.77.0.0/16"}).encode(),
                          content_type=content_type)
    assert status == 200 and answer["Pool"].startswith("10.77."), answer


def test_unknown_path_404(client):
    status, answer = post(client, "/NetworkDriver.Teleport", {})
    assert status == 404 and "not implemented" in answer["Err"]
    status, answer = post(client, "/", {})
    assert status == 404 and answer["Err"]
    resp = client.get("/Plugin.Activate")
    assert resp.status_code == 405 and resp.mimetype == MEDIA_TYPE and json.loads(resp.data)["Err"]


# -- capabilities and activation --------------------------------------------------------------------
def test_activate_implements_both(client):
    assert ok(client, "/Plugin.Activate") == {"Implements": ["NetworkDriver", "IpamDriver"]}


def test_capabilities(client):
    caps = ok(client, "/NetworkDriver.GetCapabilities")
    assert caps == {"Scope": "local", "ConnectivityScope": "global", "GwAllocChecker": True}
    assert ok(client, "/IpamDriver.GetCapabilities") == {"RequiresMACAddress": False,
                                                         "RequiresRequestReplay": True}
    spaces = ok(client, "/IpamDriver.GetDefaultAddressSpaces")
    assert spaces["LocalDefaultAddressSpace"] and spaces["GlobalDefaultAddressSpace"]
    assert ok(client, "/NetworkDriver.AllocateNetwork", {"NetworkID": NID}) == {"Options": {}}
    assert ok(client, "/NetworkDriver.FreeNetwork", {"NetworkID": NID}) == {}
    assert ok(client, "/NetworkDriver.DiscoverNew", {"DiscoveryType": 1, "DiscoveryData": {}}) == {}
    assert ok(client, "/NetworkDriver.DiscoverDelete", {"DiscoveryType": 1, "DiscoveryData": {}}) == {}


# -- the whole life of a network, as Docker calls it ------------------------------------------------
def test_full_docker_sequence(plug, client):
    fake = plug.dataplane
    assert ok(client, "/Plugin.Activate")["Implements"] == ["NetworkDriver", "IpamDriver"]
    space = ok(client, "/IpamDriver.GetDefaultAddressSpaces")["LocalDefaultAddressSpace"]
    pool = ok(client, "/IpamDriver.RequestPool", {"AddressSpace": space, "Pool": "", "SubPool": "",
                                                  "Options": {}, "V6": False})
    assert set(pool) == {"PoolID", "Pool", "Data"}
    host = pool["Pool"]
    prefix = host.split("/")[1]
    base = host.split("/")[0].rsplit(".", 1)[0]
    gateway_cidr = f"{base}.1/{prefix}"
    assert pool["Data"] == {"com.docker.network.gateway": gateway_cidr}

    assert ok(client, "/NetworkDriver.CreateNetwork", {
        "NetworkID": NID, "Options": {"com.docker.network.enable_ipv6": False,
                                      "com.docker.network.generic": {"com.docker.network.driver.mtu": "1400"}},
        "IPv4Data": [{"AddressSpace": space, "Pool": host, "Gateway": gateway_cidr, "AuxAddresses": None}],
        "IPv6Data": []}) == {}
    [spec] = fake.networks.values()
    assert (spec.host_cidr, spec.gateway, spec.mtu) == (host, f"{base}.1", 1400)

    addr = ok(client, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": {}})
    assert addr == {"Address": f"{base}.2/{prefix}", "Data": {}}

    created = ok(client, "/NetworkDriver.CreateEndpoint", {
        "NetworkID": NID, "EndpointID": EID, "Options": {},
        "Interface": {"Address": addr["Address"], "AddressIPv6": "", "MacAddress": ""}})
    assert created == {"Interface": {"MacAddress": mac_for(f"{base}.2")}}     # never echoes Address
    host_veth, peer_veth = veth_names(EID)
    assert fake.links[host_veth]["bridge"] == spec.bridge and fake.links[host_veth]["mtu"] == 1400

    joined = ok(client, "/NetworkDriver.Join", {"NetworkID": NID, "EndpointID": EID, "SandboxKey": SANDBOX,
                                                "Options": {}})
    assert joined == {"InterfaceName": {"SrcName": peer_veth, "DstPrefix": "eth"}, "Gateway": f"{base}.1",
                      "StaticRoutes": [{"Destination": "10.200.0.0/16", "RouteType": 0, "NextHop": f"{base}.1"}],
                      "DisableGatewayService": True}
    assert "/" not in joined["Gateway"]
    assert ok(client, "/NetworkDriver.ProgramExternalConnectivity",
              {"NetworkID": NID, "EndpointID": EID, "Options": {}}) == {}
    info = ok(client, "/NetworkDriver.EndpointOperInfo", {"NetworkID": NID, "EndpointID": EID})
    assert info["Value"]["address"] == f"{base}.2"

    assert ok(client, "/NetworkDriver.RevokeExternalConnectivity", {"NetworkID": NID, "EndpointID": EID}) == {}
    assert ok(client, "/NetworkDriver.Leave", {"NetworkID": NID, "EndpointID": EID}) == {}
    assert ok(client, "/NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID}) == {}
    assert host_veth not in fake.links
    assert ok(client, "/IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": addr["Address"]}) == {}
    assert ok(client, "/NetworkDriver.DeleteNetwork", {"NetworkID": NID}) == {}
    assert fake.networks == {} and fake.chains == set()
    assert ok(client, "/IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]}) == {}

    db = plug.snapshot()["db"]
    assert db["pools"] == [] and db["addresses"] == [] and db["networks"] == [] and db["endpoints"] == []


def test_create_endpoint_keeps_given_mac(client):
    pool = setup_network(client)
    address = ok(client, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})["Address"]
    answer = ok(client, "/NetworkDriver.CreateEndpoint", {
        "NetworkID": NID, "EndpointID": EID,
        "Interface": {"Address": address, "AddressIPv6": "", "MacAddress": "02:00:00:00:00:07"}})
    assert answer == {"Interface": {}}


def test_gateway_request_over_http(client):
    pool = ok(client, "/IpamDriver.RequestPool", None)
    answer = ok(client, "/IpamDriver.RequestAddress", {
        "PoolID": pool["PoolID"], "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}})
    assert answer == {"Address": pool["Data"]["com.docker.network.gateway"], "Data": {}}


def test_activate_opens_replay_window(client):
    pool = setup_network(client)
    address = setup_endpoint(client, pool)
    body = {"PoolID": pool["PoolID"], "Address": address.split("/")[0], "Options": {}}
    assert "already in use" in refused(client, "/IpamDriver.RequestAddress", body, status=409)
    ok(client, "/Plugin.Activate")                                # the daemon restarted
    assert ok(client, "/IpamDriver.RequestPool", {"Pool": pool["Pool"]}) == pool
    assert ok(client, "/IpamDriver.RequestAddress", body) == {"Address": address, "Data": {}}
    assert "already in use" in refused(client, "/IpamDriver.RequestAddress", body, status=409)


def test_a_new_endpoint_closes_the_replay_window_and_a_bare_activate_replays_nothing(client):
    """Docker's replays come before any new endpoint: a CreateEndpoint (here for a `--ip` container, whose
    RequestAddress named a free address) ends them. A Plugin.Activate that no pool replay follows (a
    `docker plugin enable`, a restart of vpcnet) lets no address in use through."""
    pool = setup_network(client)
    address = setup_endpoint(client, pool)
    body = {"PoolID": pool["PoolID"], "Address": address.split("/")[0], "Options": {}}
    ok(client, "/Plugin.Activate")
    ok(client, "/IpamDriver.RequestPool", {"Pool": pool["Pool"]})
    other = str(ipaddress.IPv4Interface(address).ip + 40)
    ok(client, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": other, "Options": {}})
    ok(client, "/NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID2, "Options": {},
                                                 "Interface": {"Address": f"{other}/24", "AddressIPv6": "",
                                                               "MacAddress": ""}})
    assert "already in use" in refused(client, "/IpamDriver.RequestAddress", body, status=409)
    ok(client, "/Plugin.Activate")
    assert "already in use" in refused(client, "/IpamDriver.RequestAddress", body, status=409)


def test_exhausted_pool_error(tmp_path):
    client = make_plugin(tmp_path, VPCNET_HOST_PREFIX="29").app().test_client()
    pool = ok(client, "/IpamDriver.RequestPool", None)
    for _ in range(5):
        ok(client, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})
    message = refused(client, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]}, status=507)
    assert "exhausted" in message and "all 5" in message


# -- stale clean-up at daemon start -----------------------------------------------------------------
def test_stale_cleanup_calls_succeed(client):
    assert ok(client, "/NetworkDriver.Leave", {"NetworkID": NID, "EndpointID": EID}) == {}
    assert ok(client, "/NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID}) == {}
    assert ok(client, "/NetworkDriver.RevokeExternalConnectivity", {"NetworkID": NID, "EndpointID": EID}) == {}
    assert ok(client, "/IpamDriver.ReleaseAddress", {"PoolID": "10.200.9.0/24", "Address": "10.200.9.5/24"}) == {}
    assert ok(client, "/NetworkDriver.DeleteNetwork", {"NetworkID": NID}) == {}
    assert ok(client, "/IpamDriver.ReleasePool", {"PoolID": "10.200.9.0/24"}) == {}
    # the same for things that existed and are already gone
    pool = setup_network(client)
    address = setup_endpoint(client, pool)
    for _ in range(2):
        ok(client, "/NetworkDriver.Leave", {"NetworkID": NID, "EndpointID": EID})
        ok(client, "/NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID})
        ok(client, "/IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": address})
    for _ in range(2):
        ok(client, "/NetworkDriver.DeleteNetwork", {"NetworkID": NID})
        ok(client, "/IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]})


def test_unknown_network_and_endpoint_named(client):
    message = refused(client, "/NetworkDriver.CreateEndpoint", {
        "NetworkID": NID, "EndpointID": EID, "Interface": {"Address": "10.200.0.2/24"}}, status=404)
    assert "unknown network" in message and NID[:12] in message
    message = refused(client, "/NetworkDriver.Join", {"NetworkID": NID, "EndpointID": EID,
                                                      "SandboxKey": SANDBOX}, status=404)
    assert "unknown network" in message
    setup_network(client)
    message = refused(client, "/NetworkDriver.Join", {"NetworkID": NID, "EndpointID": EID,
                                                      "SandboxKey": SANDBOX}, status=404)
    assert "unknown endpoint" in message and EID[:12] in message
    assert "unknown pool" in refused(client, "/IpamDriver.RequestAddress", {"PoolID": "10.1.2.0/24"})


# -- a failed call changes no state -----------------------------------------------------------------
def _network_body(pool: str, nid: str = NID, generic: dict | None = None, **options) -> dict:
    opts = {"com.docker.network.generic": generic or {}}
    opts.update(options)
    return {"NetworkID": nid, "Options": opts, "IPv4Data": [{"Pool": pool, "Gateway": ""}], "IPv6Data": []}


def refused_without_change(plug, client, path: str, body, status: int | None = None) -> str:
    before = plug.snapshot()
    message = refused(client, path, body, status)
    assert plug.snapshot() == before, f"{path} refused ({message}) but changed state"
    return message


def test_refused_network_creates_change_nothing(plug, client):
    pool = ok(client, "/IpamDriver.RequestPool", None)["Pool"]
    other_pool = ok(client, "/IpamDriver.RequestPool", {"Pool": "10.77.0.0/16"})["Pool"]
    cases = [
        (_network_body(pool, generic={"com.docker.network.bridge.name": "br0"}), "unknown option -o"),
        (_network_body("192.168.5.0/24"), "not a vpcnet pool"),
        (_network_body(""), "not a vpcnet pool"),
        (_network_body(pool, generic={"com.docker.network.driver.mtu": "9x"}), "not a number"),
        (_network_body(pool, generic={"com.docker.network.driver.mtu": "100"}), "out of range"),
        ({**_network_body(pool), "IPv6Data": [{"Pool": "fd00::/64"}]}, "is not a vpcnet IPv6 pool"),
        ({**_network_body(pool), "IPv4Data": []}, "exactly one IPv4 pool"),
        ({**_network_body(pool, **{"com.docker.network.enable_ipv4": False}), "IPv4Data": []}, "--ipv4=false"),
        ({**_network_body(pool), "IPv4Data": [{"Pool": pool}, {"Pool": other_pool}]}, "exactly one IPv4 pool"),
        (_network_body(pool, generic="mtu=9000"), "must be an object"),
    ]
    for body, text in cases:
        assert text in refused_without_change(plug, client, "/NetworkDriver.CreateNetwork", body, status=400)
    ok(client, "/NetworkDriver.CreateNetwork", _network_body(pool))
    # a second network on the same host CIDR, and the same network id with another pool
    message = refused_without_change(plug, client, "/NetworkDriver.CreateNetwork", _network_body(pool, NID2),
                                     status=409)
    assert "already used by network" in message and "--subnet" in message
    message = refused_without_change(plug, client, "/NetworkDriver.CreateNetwork",
                                     _network_body(other_pool, NID), status=409)
    assert "already exists" in message
    # Docker then releases the refused network's pool request: the pool stays, it is in use
    ok(client, "/IpamDriver.ReleasePool", {"PoolID": pool})
    assert pool in {r["pool_id"] for r in plug.store.pools()}


def test_gw_alloc_check_answers_allocate_and_refuses_before_any_pool(plug, client):
    """Docker 28+ posts GwAllocCheck with the network's options before RequestPool (GwAllocChecker)."""
    options = {"com.docker.network.enable_ipv4": True, "com.docker.network.enable_ipv6": False,
               "com.docker.network.generic": {"vpcnet.mode": "routed"}}
    assert ok(client, "/NetworkDriver.GwAllocCheck", {"Options": options}) == {"SkipIPv4": False,
                                                                               "SkipIPv6": False}
    assert ok(client, "/NetworkDriver.GwAllocCheck", None) == {"SkipIPv4": False, "SkipIPv6": False}
    cases = [({"com.docker.network.enable_ipv4": False}, "--ipv4=false"),
             ({"com.docker.network.enable_ipv4": False, "com.docker.network.enable_ipv6": True,
               "com.docker.network.generic": {"vpcnet.mode": "bridge"}}, "needs -o vpcnet.mode=routed or ebpf"),
             ({"com.docker.network.generic": {"com.docker.network.bridge.name": "br0"}}, "unknown option -o"),
             ({"com.docker.network.generic": {"vpcnet.mode": "ipvlan"}}, "unknown mode")]
    for options, text in cases:
        message = refused_without_change(plug, client, "/NetworkDriver.GwAllocCheck", {"Options": options})
        assert text in message, (options, message)
    assert plug.store.pools() == [] and plug.store.claims() == []


def test_refused_endpoint_and_address_calls_change_nothing(plug, client):
    pool = setup_network(client)
    address = setup_endpoint(client, pool)
    pid = pool["PoolID"]
    cases = [
        ("/NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID2,
                                           "Interface": {"Address": "10.99.0.5/24"}}, "outside"),
        ("/NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID2,
                                           "Interface": {"Address": address}}, "already used by endpoint"),
        ("/NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID2, "Interface": {}},
         "without an IPv4 address"),
        ("/NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID2,
                                           "Interface": {"Address": address.replace(".2/", ".9/")},
                                           "Options": {"com.docker.network.endpoint.ifname": "app0"}},
         "com.docker.network.endpoint.ifname=app0: Docker does not let a network plugin name"),
        ("/NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID2,
                                           "Interface": {"Address": "bogus"}}, "not an IPv4"),
        ("/NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID2,
                                           "Interface": {"Address": address, "AddressIPv6": "fd00::2/64"}},
         "IPv6"),
        ("/NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID,
                                           "Interface": {"Address": "10.200.0.99/24"}}, "already exists"),
        ("/NetworkDriver.CreateEndpoint", {"NetworkID": NID2, "EndpointID": EID2,
                                           "Interface": {"Address": address}}, "unknown network"),
        ("/IpamDriver.RequestAddress", {"PoolID": pid, "Address": address}, "already in use"),
        ("/IpamDriver.RequestAddress", {"PoolID": pid, "Address": "10.99.0.5"}, "outside pool"),
        ("/IpamDriver.RequestAddress", {"PoolID": "10.1.0.0/24"}, "unknown pool"),
        ("/IpamDriver.RequestAddress", {"PoolID": pid, "Address": "10.200.0.200",
                                        "Options": {"RequestAddressType": "com.docker.network.gateway"}},
         "not the gateway"),
        ("/IpamDriver.RequestPool", {"Pool": "10.200.0.0/17"}, "overlaps"),
        ("/IpamDriver.RequestPool", {"Pool": "10.200.99.0/24"}, "neither a cluster CIDR"),
        ("/IpamDriver.RequestPool", {"V6": True, "Pool": "10.200.0.0/16"}, "asked for an IPv6 pool"),
        ("/IpamDriver.RequestPool", {"V6": True, "Pool": "::/64"}, "one /80 block"),
        ("/IpamDriver.RequestPool", {"Options": {"x": "y"}}, "--ipam-opt"),
        ("/IpamDriver.ReleaseAddress", {"PoolID": pid, "Address": "nope"}, "not a valid"),
        ("/NetworkDriver.ProgramExternalConnectivity", {
            "NetworkID": NID, "EndpointID": EID,
            "Options": {"com.docker.network.portmap": [{"Proto": 6, "Port": 80, "HostPort": 8080,
                                                         "HostIP": "127.0.0.1"}]}},
         "route_localnet"),
        ("/NetworkDriver.ProgramExternalConnectivity", {
            "NetworkID": NID, "EndpointID": EID,
            "Options": {"com.docker.network.portmap": [{"Proto": 1, "Port": 80, "HostPort": 8080}]}},
         "is not tcp (6), udp (17) or sctp (132)"),
    ]
    for path, body, text in cases:
        message = refused_without_change(plug, client, path, body)
        assert text in message, (path, message)


def test_v6_pool_and_addresses_over_http(client):
    """Docker's IPv6 calls as it sends them: RequestPool with V6 (`--ipv6`), RequestAddress on that PoolID."""
    pool = ok(client, "/IpamDriver.RequestPool", {"AddressSpace": "vpcnet-local", "Pool": "", "SubPool": "",
                                                   "Options": {}, "V6": True})
    block = ipaddress.IPv6Network(pool["Pool"])
    assert pool["PoolID"] == pool["Pool"] and block.prefixlen == 80
    assert pool["Data"] == {"com.docker.network.gateway": f"{block.network_address + 1}/80"}
    first = ok(client, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"], "Address": "", "Options": {}})
    assert first == {"Address": f"{block.network_address + 2}/128", "Data": {}}
    assert ok(client, "/IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": first["Address"]}) == {}
    assert ok(client, "/IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]}) == {}


def test_ipv4data_entry_of_wrong_type_is_refused_without_change(plug, client):
    ok(client, "/IpamDriver.RequestPool", None)
    before = plug.snapshot()
    status, answer = post(client, "/NetworkDriver.CreateNetwork",
                          {"NetworkID": NID, "Options": {}, "IPv4Data": ["10.200.0.0/24"], "IPv6Data": []})
    assert status != 200 and answer["Err"]
    assert plug.snapshot() == before


# -- dataplane failures are undone ------------------------------------------------------------------
def test_dataplane_failure_during_create_network(plug, client):
    pool = ok(client, "/IpamDriver.RequestPool", None)["Pool"]
    plug.dataplane.fail["ensure_network"] = DataplaneError("cannot create bridge: boom")
    before = plug.snapshot()
    message = refused(client, "/NetworkDriver.CreateNetwork", _network_body(pool), status=500)
    assert "boom" in message
    assert plug.snapshot() == before
    assert plug.store.network(NID) is None
    assert [c[1].bridge for c in plug.dataplane.called("delete_network")] == [f"vpc-{NID[:11]}"]  # the undo
    del plug.dataplane.fail["ensure_network"]
    ok(client, "/NetworkDriver.CreateNetwork", _network_body(pool))                  # and a retry works
    assert plug.store.network(NID) is not None


def test_store_failure_during_create_network_never_reaches_the_kernel(plug, client, monkeypatch):
    pool = ok(client, "/IpamDriver.RequestPool", None)["Pool"]
    before = plug.snapshot()

    def broken(db, net):
        raise DataplaneError("disk full (simulated)")

    monkeypatch.setattr(plug.store, "add_network", broken)
    refused(client, "/NetworkDriver.CreateNetwork", _network_body(pool), status=500)
    assert plug.snapshot() == before
    assert not plug.dataplane.called("ensure_network")     # the store first: the kernel was never touched


def test_dataplane_failure_during_create_endpoint(plug, client):
    pool = setup_network(client)
    address = ok(client, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})["Address"]
    plug.dataplane.fail["ensure_endpoint"] = DataplaneError("cannot create veth: boom")
    before = plug.snapshot()
    body = {"NetworkID": NID, "EndpointID": EID, "Interface": {"Address": address, "MacAddress": ""}}
    assert "boom" in refused(client, "/NetworkDriver.CreateEndpoint", body, status=500)
    assert plug.snapshot() == before
    assert plug.store.endpoint(EID) is None
    assert plug.dataplane.called("delete_endpoint") == [("delete_endpoint", veth_names(EID)[0])]
    del plug.dataplane.fail["ensure_endpoint"]
    ok(client, "/NetworkDriver.CreateEndpoint", body)
    assert plug.store.endpoint(EID).address == address.split("/")[0]


def test_unexpected_exception_still_answers_err(plug, client, monkeypatch):
    def bug(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(plug.driver, "capabilities", bug)
    message = refused(client, "/NetworkDriver.GetCapabilities", None, status=500)
    assert "internal error" in message and "KeyError" in message


# -- malformed shapes the driver must refuse clearly (once reported as bugs) ---------------------------------
@pytest.mark.parametrize("ipv4", [["10.200.0.0/24"], [{"Pool": ["10.200.0.0/24"]}]], ids=["entry", "pool"])
def test_ipv4data_of_wrong_shape_is_a_clear_400(client, ipv4):
    ok(client, "/IpamDriver.RequestPool", None)
    refused(client, "/NetworkDriver.CreateNetwork", {"NetworkID": NID, "IPv4Data": ipv4}, status=400)


def test_interface_mac_of_wrong_type_refused(client):
    pool = setup_network(client)
    address = ok(client, "/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})["Address"]
    refused(client, "/NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID,
                                                      "Interface": {"Address": address, "MacAddress": 5}},
            status=400)


# -- ids: only the forms Docker makes ----------------------------------------------------------------
# A NetworkID carrying an iptables rule after a newline: it would reach link and chain names, rows, logs.
EVIL_NID = "a1b2\n-A FORWARD -j ACCEPT\n" + "0" * 40
SWARM_NID = "x7y1k2m3n4p5q6r7s8t9u0v1w"        # swarmkit's identity.NewID: 25 lowercase base-36 characters
BAD_IDS = {"uppercase": "A1" * 32, "short": "a1" * 31 + "a", "long": "a1" * 32 + "b", "not hex": "g1" * 32,
           "trailing newline": "a1" * 32 + "\n", "inner space": "a1" * 16 + " " + "a1" * 15 + "a",
           "swarm form, uppercase": SWARM_NID.upper(), "unicode digits": "\u0661" * 64, "500 kB": "a" * 500_000}
# Every call that takes an id: its body with real values (so only the bad field can be the reason).
ID_CALLS = {
    "/NetworkDriver.CreateNetwork": ("NetworkID",),
    "/NetworkDriver.DeleteNetwork": ("NetworkID",),
    "/NetworkDriver.CreateEndpoint": ("NetworkID", "EndpointID"),
    "/NetworkDriver.EndpointOperInfo": ("NetworkID", "EndpointID"),
    "/NetworkDriver.DeleteEndpoint": ("NetworkID", "EndpointID"),
    "/NetworkDriver.Join": ("NetworkID", "EndpointID", "SandboxKey"),
    "/NetworkDriver.Leave": ("NetworkID", "EndpointID"),
    "/NetworkDriver.ProgramExternalConnectivity": ("NetworkID", "EndpointID"),
    "/NetworkDriver.RevokeExternalConnectivity": ("NetworkID", "EndpointID"),
    "/IpamDriver.ReleasePool": ("PoolID",),
    "/IpamDriver.RequestAddress": ("PoolID",),
    "/IpamDriver.ReleaseAddress": ("PoolID", "Address"),
}
BAD_SANDBOX_KEYS = ["relative/netns/0123456789ab", "/var/run/docker/netns/0123\n-A FORWARD -j ACCEPT",
                    "/var/run/docker/netns/", "/var/run/docker/netns/a b", "/" + "x" * 500_000]
BAD_POOL_IDS = ["garbage", "10.200.0.1/24", "10.200.0.0/24\n-A FORWARD -j ACCEPT", "p" * 500_000]


def id_call_body(path: str, pool: dict, address: str, other_pool: str) -> dict:
    """A body for `path` that vpcnet takes, about the network (NID) and endpoint (EID) set up by the caller."""
    body = {"NetworkID": NID, "EndpointID": EID, "SandboxKey": SANDBOX, "Options": {},
            "PoolID": pool["PoolID"], "Address": address.split("/")[0]}
    if path == "/NetworkDriver.CreateNetwork":
        body = _network_body(other_pool, NID2)
    elif path == "/NetworkDriver.CreateEndpoint":
        body.update(EndpointID=EID2, Interface={"Address": address.replace(".2/", ".9/")})
    elif path == "/IpamDriver.RequestAddress":
        body["Address"] = ""
    return body


def one_line_naming(message: str, field: str) -> None:
    assert message.startswith(f"{field} "), message
    assert "\n" not in message and len(message) < 400, message[:500]


def test_a_network_id_carrying_an_iptables_rule_is_refused_naming_it_and_changes_nothing(plug, client, caplog):
    pool = ok(client, "/IpamDriver.RequestPool", None)
    caplog.set_level("DEBUG")
    message = refused_without_change(plug, client, "/NetworkDriver.CreateNetwork",
                                     _network_body(pool["Pool"], EVIL_NID), status=400)
    one_line_naming(message, "NetworkID")
    assert "is not an id Docker makes" in message and "64 lowercase hex" in message
    assert plug.store.networks() == [] and plug.dataplane.networks == {} and plug.dataplane.chains == set()
    assert not plug.dataplane.called("ensure_network")
    [line] = [r.getMessage() for r in caplog.records if "CreateNetwork" in r.getMessage()]
    assert line.startswith("/NetworkDriver.CreateNetwork -> 400 NetworkID 'a1b2\\n-A FORWARD"), line
    for record in caplog.records:      # no record carries the raw id: not its message, not its fields
        assert "\n" not in record.getMessage() and not hasattr(record, "network"), record.__dict__


@pytest.mark.parametrize("path,field", [(p, f) for p, fields in ID_CALLS.items() for f in fields])
def test_values_not_of_the_form_docker_sends_are_refused_by_every_call_that_takes_them(plug, client, path, field):
    pool = setup_network(client)
    address = setup_endpoint(client, pool)
    other_pool = ok(client, "/IpamDriver.RequestPool", {"Pool": "10.77.0.0/16"})["Pool"]
    bad = {"NetworkID": BAD_IDS, "EndpointID": BAD_IDS,
           "SandboxKey": dict(enumerate(BAD_SANDBOX_KEYS)), "PoolID": dict(enumerate(BAD_POOL_IDS)),
           "Address": {"newline": "10.200.0.2\n-A FORWARD", "500 kB": "1" * 500_000}}[field]
    for why, value in bad.items():
        body = id_call_body(path, pool, address, other_pool)
        body[field] = value
        message = refused_without_change(plug, client, path, body, status=400)
        expected = "address" if field == "Address" else field
        assert message.startswith(f"{expected} "), (why, message[:300])
        assert "\n" not in message and len(message) < 400, (why, message[:500])
    ok(client, path, id_call_body(path, pool, address, other_pool))     # and the call with Docker's values works


def test_a_swarm_networks_id_and_dockers_sandbox_paths_are_accepted(plug, client):
    """Swarm-scoped networks get swarmkit's ids (CreateManagedNetwork); sandbox paths live under the
    daemon's exec root, which is not always /var/run/docker."""
    pool = setup_network(client, nid=SWARM_NID)
    setup_endpoint(client, pool, nid=SWARM_NID)
    for key in (SANDBOX, "/var/run/docker/netns/default", "/var/run/docker/netns/ingress_sbox",
                "/run/user/1000/docker/netns/0123456789ab", "/run/vpclab/host1/exec/netns/lb_x7y1k2m3n4"):
        ok(client, "/NetworkDriver.Join", {"NetworkID": SWARM_NID, "EndpointID": EID, "SandboxKey": key})
    for path in ("/NetworkDriver.EndpointOperInfo", "/NetworkDriver.ProgramExternalConnectivity",
                 "/NetworkDriver.RevokeExternalConnectivity", "/NetworkDriver.Leave", "/NetworkDriver.DeleteEndpoint"):
        ok(client, path, {"NetworkID": SWARM_NID, "EndpointID": EID})
    ok(client, "/NetworkDriver.DeleteNetwork", {"NetworkID": SWARM_NID})
    assert plug.store.networks() == [] and plug.dataplane.networks == {}


# -- ids, against the real plugin: `vpcnet serve` (gunicorn) on its unix socket, in a test namespace ------------
POOL_REQUEST = {"AddressSpace": "vpcnet-local", "Pool": "", "SubPool": "", "Options": {}, "V6": False}


def kernel_names(ns: str) -> str:
    return (run(["ip", "-n", ns, "-o", "link"]).stdout + run(["ip", "netns", "exec", ns, "iptables-save"]).stdout
            + run(["ip", "-n", ns, "-o", "route", "show", "table", "all"]).stdout)


@pytest.mark.root
def test_the_plugin_process_refuses_ids_not_of_dockers_forms_and_makes_nothing(plugin_factory, netns_factory):
    ns = netns_factory("vpsock")
    plugin = plugin_factory(netns=ns)
    status, pool = plugin.call("/IpamDriver.RequestPool", POOL_REQUEST)
    assert status == 200, pool
    status, answer = plugin.call("/NetworkDriver.CreateNetwork", _network_body(pool["Pool"], EVIL_NID))
    assert status == 400, answer
    one_line_naming(answer["Err"], "NetworkID")
    bad = {"NetworkID": NID.upper(), "EndpointID": EID + "\n", "SandboxKey": "/var/run/docker/netns/0123\n-A INPUT",
           "PoolID": "10.200.0.0/24\n", "Address": "10.200.0.2\n-A INPUT"}
    for path, fields in ID_CALLS.items():
        for field in fields:
            body = id_call_body(path, pool, "10.200.0.2/24", "10.77.0.0/16")
            body[field] = bad[field]
            status, answer = plugin.call(path, body)
            assert status == 400, (path, field, answer)
            assert answer["Err"].startswith("address " if field == "Address" else f"{field} "), (path, answer)
    db = dump_db(os.path.join(plugin.state_dir, "vpcnet.db"))
    assert db["networks"] == [] and db["endpoints"] == [] and db["addresses"] == [], db
    kernel = kernel_names(ns)
    # no network's link or chain (the host-wide chains name the links only by pattern: `vpc-+`)
    assert "a1b2" not in kernel and "FORWARD -j ACCEPT" not in kernel and not re.search(r"vpc-\w", kernel), kernel
    log = plugin.log()
    assert "CreateNetwork -> 400 NetworkID 'a1b2\\n-A FORWARD -j ACCEPT\\n" in log, log
    assert not [line for line in log.splitlines() if line.startswith(("-A ", "0" * 40))], log


# -- the body limit ---------------------------------------------------------------------------------
class Unreadable(io.RawIOBase):
    """A request body that fails the test if anyone reads it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        raise AssertionError("the body was read")


class Streamed(io.RawIOBase):
    """A streamed body (no Content-Length) of `size` bytes that counts what was read of it."""

    def __init__(self, size: int):
        self.left, self.taken = size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = b" " * n
        self.left -= n
        self.taken += n
        return n


def post_stream(client, path: str, stream, length: int | None):
    """POST `stream` as the body: announced with a Content-Length, or chunked (as gunicorn passes it on)."""
    environ = {"wsgi.input": stream}
    if length is not None:
        environ["CONTENT_LENGTH"] = str(length)
    else:
        environ.update({"HTTP_TRANSFER_ENCODING": "chunked", "wsgi.input_terminated": True})
    resp = client.post(path, headers={"Accept": MEDIA_TYPE}, environ_overrides=environ)
    assert resp.mimetype == MEDIA_TYPE
    return resp.status_code, json.loads(resp.data)


def join_body_of_size(size: int) -> bytes:
    """A Join whose Options carry a port map, padded with JSON whitespace to exactly `size` bytes."""
    ports = [{"Proto": 6, "IP": "", "Port": p, "HostIP": "", "HostPort": p, "HostPortEnd": p} for p in range(1, 9000)]
    body = json.dumps({"NetworkID": NID, "EndpointID": EID, "SandboxKey": SANDBOX,
                       "Options": {"com.docker.network.portmap": ports}}).encode()
    assert len(body) <= size, len(body)
    return body + b" " * (size - len(body))


def test_a_body_announced_over_the_limit_is_refused_unread(client):
    status, answer = post_stream(client, "/NetworkDriver.CreateNetwork", Unreadable(), 5 * 1024 * 1024)
    assert status == 413 and set(answer) == {"Err"}, answer
    assert "5242880 bytes is over vpcnet's limit of 1048576 bytes" in answer["Err"]


def test_a_streamed_body_over_the_limit_is_refused_after_reading_at_most_the_limit(client):
    body = Streamed(5 * 1024 * 1024)
    status, answer = post_stream(client, "/NetworkDriver.CreateNetwork", body, None)
    assert status == 413 and "over vpcnet's limit" in answer["Err"], answer
    assert body.taken <= MAX_BODY + 1 + 64 * 1024, body.taken          # at most the limit (and one buffer)


def test_a_body_of_exactly_the_limit_is_processed_and_one_byte_more_is_refused(client):
    assert MAX_BODY == 1 << 20
    pool = setup_network(client)
    setup_endpoint(client, pool)
    status, answer = post(client, "/NetworkDriver.Join", raw=join_body_of_size(MAX_BODY))
    assert status == 200 and answer["InterfaceName"]["SrcName"] == veth_names(EID)[1], answer
    status, answer = post(client, "/NetworkDriver.Join", raw=join_body_of_size(MAX_BODY + 1))
    assert status == 413 and set(answer) == {"Err"} and "1048577 bytes" in answer["Err"], answer


# -- the body limit, against the real plugin ----------------------------------------------------------
def send_head(plugin, path: str, headers: dict[str, str], timeout: float = 10.0) -> socket.socket:
    """A connection to the plugin with a request's head sent, its body still to come."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(plugin.socket)
    lines = [f"POST {path} HTTP/1.1", "Host: plugin", "Connection: close",
             *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the answer (raises socket.timeout when none comes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    [length] = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of the answer"
        body += chunk
    return int(head.split()[1]), json.loads(body)


def raw_call(plugin, path: str, body: bytes) -> tuple[int, dict]:
    with send_head(plugin, path, {"Content-Length": str(len(body))}) as sock:
        try:
            sock.sendall(body)
        except BrokenPipeError:      # answered (refused) before the body was read: the answer waits
            pass
        return read_answer(sock)


def memory_kb(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as fh:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in fh) if k in ("VmRSS", "VmHWM")}


def worker_pid(plugin) -> int:
    """The one gunicorn worker (VPCNET_WORKERS=1) under the plugin's master."""
    with open(f"/proc/{plugin.proc.pid}/task/{plugin.proc.pid}/children") as fh:
        [pid] = fh.read().split()
    return int(pid)


@pytest.mark.root
def test_the_plugin_process_refuses_a_large_body_before_it_is_sent_and_never_holds_it(plugin_factory, netns_factory):
    plugin = plugin_factory(netns=netns_factory("vpsock"))
    big = 5 * 1024 * 1024
    # Announced: the 413 comes while the body has not been sent (else reading the answer times out).
    with send_head(plugin, "/NetworkDriver.CreateNetwork", {"Content-Length": str(big)}) as sock:
        sock.sendall(b'{"NetworkID": "')
        status, answer = read_answer(sock)
    assert status == 413 and answer == {"Err": f"request body of {big} bytes is over vpcnet's limit of "
                                               f"{MAX_BODY} bytes (1 MiB)"}, answer
    # Chunked: refused once the limit is passed, while the body has not ended.
    with send_head(plugin, "/NetworkDriver.CreateNetwork", {"Transfer-Encoding": "chunked"}) as sock:
        chunk = b" " * 65536
        for _ in range(MAX_BODY // len(chunk) + 1):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, answer = read_answer(sock)
    assert status == 413 and "over vpcnet's limit" in answer["Err"], answer
    # Sent whole, as fast as the socket takes it: the worker's peak memory does not grow by the body.
    pid = worker_pid(plugin)
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")                                        # reset the peak (VmHWM) to the current RSS
    before = memory_kb(pid)
    body = b'{"NetworkID": "' + b"a" * big + b'"}'
    with send_head(plugin, "/NetworkDriver.CreateNetwork", {"Content-Length": str(len(body))}) as sock:
        def send():
            try:
                sock.sendall(body)
            except OSError:
                pass                                         # the plugin answered and closed: expected
        sender = threading.Thread(target=send)
        sender.start()
        status, answer = read_answer(sock)
        sender.join(timeout=10)
    after = memory_kb(pid)
    assert status == 413, answer
    assert after["VmHWM"] - before["VmRSS"] < 2048, (before, after)      # kB; the body is 5120 kB
    assert plugin.call("/Plugin.Activate", None)[0] == 200               # and it serves on


@pytest.mark.root
def test_the_plugin_process_serves_a_join_of_exactly_the_limit(plugin_factory, netns_factory):
    plugin = plugin_factory(netns=netns_factory("vpsock"))
    status, pool = plugin.call("/IpamDriver.RequestPool", POOL_REQUEST)
    assert status == 200, pool
    assert plugin.call("/NetworkDriver.CreateNetwork", {**_network_body(pool["Pool"], NID),
                                                        "IPv4Data": [{"Pool": pool["Pool"]}]})[0] == 200
    address = plugin.call("/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})[1]["Address"]
    status, answer = plugin.call("/NetworkDriver.CreateEndpoint", {"NetworkID": NID, "EndpointID": EID,
                                                                   "Interface": {"Address": address}})
    assert status == 200, answer
    status, answer = raw_call(plugin, "/NetworkDriver.Join", join_body_of_size(MAX_BODY))
    assert status == 200 and answer["InterfaceName"]["SrcName"] == veth_names(EID)[1], answer
    status, answer = raw_call(plugin, "/NetworkDriver.Join", join_body_of_size(MAX_BODY + 1))
    assert status == 413 and "1048577 bytes" in answer["Err"], answer
    assert plugin.call("/NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": EID})[0] == 200
    assert plugin.call("/NetworkDriver.DeleteNetwork", {"NetworkID": NID})[0] == 200
