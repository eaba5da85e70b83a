"""Published ports through the driver, with the real store and the recording fake dataplane:
Docker's call sequences (20.10/28: Join, Program once, Revoke at stop; 29: Program and Revoke whenever
the endpoint becomes or stops being the gateway, with Join's options, repeated; moby's
daemon/libnetwork/drivers/remote/driver.go), how host ports are chosen, conflicts, refusals, and that a
restart or a lost kernel state rebuilds exactly the published ports of the store."""
from __future__ import annotations

import sqlite3

import pytest
from fakes import FakeDataplane, make_plugin

from vpcnet.docker import ports
from vpcnet.docker.driver import GENERIC, INTERNAL_OPTION
from vpcnet.errors import Conflict, DataplaneError, InvalidRequest

NID = "c0ffee" * 10 + "abcd"
EID, EID2 = "beef" * 16, "fade" * 16
SANDBOX = "/var/run/docker/netns/0123456789ab"
TCP, UDP, SCTP = 6, 17, 132


@pytest.fixture
def plug(tmp_path):
    plug = make_plugin(tmp_path)
    pool = plug.ipam.request_pool()["PoolID"]
    plug.driver.create_network(NID, {GENERIC: {}}, [{"Pool": pool, "Gateway": ""}], [])
    return plug


def endpoint(plug, eid=EID) -> str:
    net = plug.store.network(NID)
    address = plug.ipam.request_address(net.host_cidr)["Address"]
    plug.driver.create_endpoint(NID, eid, {"Address": address}, {})
    return address.split("/")[0]


def binding(proto=TCP, port=80, host_port=0, host_port_end=0, host_ip="") -> dict:
    """One entry of com.docker.network.portmap as Docker's JSON has it (types.PortBinding)."""
    return {"Proto": proto, "IP": "", "Port": port, "HostIP": host_ip, "HostPort": host_port,
            "HostPortEnd": host_port_end}


def portmap(*bindings: dict, exposed: tuple = ()) -> dict:
    """Join's sandbox options as Docker sends them (and ProgramExternalConnectivity's)."""
    return {ports.PORTMAP: list(bindings), ports.EXPOSED: [{"Proto": b["Proto"], "Port": b["Port"]} for b in bindings]
            + list(exposed), "com.docker.network.endpoint.exposedports_extra": None}


def published(plug) -> list[str]:
    """What the store holds and what the (fake) kernel holds: always the same, as text."""
    stored = sorted(f"{p.host}->{f'[{p.address}]' if p.family == 'ipv6' else p.address}:{p.container_port}/{p.proto}"
                    for p in plug.store.ports())
    assert plug.dataplane.published() == stored
    return stored


# -- Docker's call sequences --------------------------------------------------------------------------
def test_docker_20_and_28_sequence_publishes_at_program_and_unpublishes_at_revoke(plug):
    address = endpoint(plug)
    options = portmap(binding(TCP, 80, 8080, 8080), binding(UDP, 53, 5353, 5353), binding(SCTP, 9, 9999))
    plug.driver.join(NID, EID, SANDBOX, options)
    assert published(plug) == []                      # Join publishes nothing: Program does
    assert plug.driver.program_external_connectivity(NID, EID, options) == {}
    assert published(plug) == [f"0.0.0.0:5353->{address}:53/udp", f"0.0.0.0:8080->{address}:80/tcp",
                               f"0.0.0.0:9999->{address}:9/sctp"]
    assert plug.driver.revoke_external_connectivity(NID, EID) == {}
    assert published(plug) == []
    plug.driver.leave(NID, EID)
    plug.driver.delete_endpoint(NID, EID)
    assert published(plug) == [] and plug.store.ports() == []


def test_docker_29_sequence_repeats_program_and_revoke_and_keeps_chosen_ports(plug):
    """29: Program when the endpoint becomes the IPv4 gateway, again when it also becomes the IPv6 one (the
    same options), Revoke when another network's endpoint takes the gateway, Program when it is back, and
    at stop `sbLeave`'s Program(eid, "", "") arrives as Revoke, before Leave and DeleteEndpoint. A -P port
    keeps the host port it got first for as long as the endpoint publishes it."""
    address = endpoint(plug)
    options = portmap(binding(TCP, 80, 8080, 8080), binding(TCP, 443))          # -p 8080:80 and -P (443)
    plug.driver.join(NID, EID, SANDBOX, options)
    plug.driver.program_external_connectivity(NID, EID, options)                # gateway (IPv4)
    first = published(plug)
    assert len(first) == 2 and f"0.0.0.0:8080->{address}:80/tcp" in first
    calls = len(plug.dataplane.called("ensure_ports"))
    plug.driver.program_external_connectivity(NID, EID, options | {"com.docker.network.driver.private.no_proxy_6to4":
                                                                    True})   # gateway for IPv6 too
    assert published(plug) == first
    assert len(plug.dataplane.called("ensure_ports")) == calls + 1, "a repeat only makes sure of the kernel"
    plug.driver.revoke_external_connectivity(NID, EID)                           # another endpoint is gateway
    assert published(plug) == []
    plug.driver.revoke_external_connectivity(NID, EID)                           # repeated: fine
    plug.driver.program_external_connectivity(NID, EID, options)                # gateway again
    assert len(published(plug)) == 2 and f"0.0.0.0:8080->{address}:80/tcp" in published(plug)
    plug.driver.revoke_external_connectivity(NID, EID)                           # sbLeave
    plug.driver.leave(NID, EID)
    plug.driver.delete_endpoint(NID, EID)
    assert published(plug) == [] and plug.store.ports() == []


def test_delete_endpoint_without_revoke_takes_its_ports(plug):
    """A daemon that died with the container running sends no Revoke: DeleteEndpoint still removes them."""
    endpoint(plug)
    plug.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 8080)))
    assert len(published(plug)) == 1
    plug.driver.delete_endpoint(NID, EID)
    assert published(plug) == [] and plug.store.ports() == []


def test_program_without_ports_changes_nothing_and_revoke_of_unknown_endpoints_is_fine(plug):
    endpoint(plug)
    state = plug.snapshot()
    assert plug.driver.program_external_connectivity(NID, EID, {ports.EXPOSED: [{"Proto": TCP, "Port": 80}]}) == {}
    assert plug.driver.revoke_external_connectivity("", EID2) == {}
    assert plug.snapshot() == state


# -- choosing host ports --------------------------------------------------------------------------------
def test_p_and_ranges_take_a_free_port_of_their_range(plug, tmp_path):
    endpoint(plug)
    plug.dataplane.host_sockets[("tcp", "", 8000)] = "docker-proxy"           # held by someone else
    options = portmap(binding(TCP, 80, 8000, 8002), binding(TCP, 81, 8000, 8002), binding(TCP, 82))
    plug.driver.program_external_connectivity(NID, EID, options)
    rows = {p.container_port: p.host_port for p in plug.store.ports()}
    assert {rows[80], rows[81]} == {8001, 8002}
    low, high = ports.ephemeral_range()
    assert low <= rows[82] <= high


def test_a_full_range_is_refused_naming_it_and_changes_nothing(plug):
    endpoint(plug)
    for port in (8000, 8001):
        plug.dataplane.host_sockets[("tcp", "", port)] = "in use by a host process"
    state = plug.snapshot()
    with pytest.raises(Conflict, match=r"no free host port in 8000-8001 .*in use by a host process"):
        plug.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 8000, 8001)))
    assert plug.snapshot() == state


@pytest.mark.parametrize("held_by, held_ip, ask_ip", [("", "", ""), ("", "10.0.0.5", ""), ("", "", "10.0.0.5"),
                                                      ("host", "", ""), ("host", "10.0.0.5", "10.0.0.5")])
def test_a_taken_host_port_is_refused_like_docker_and_changes_nothing(plug, held_by, held_ip, ask_ip):
    """Taken by another vpcnet endpoint (any network), or by a socket of the host (a process, docker-proxy,
    Docker's DNAT rules: vpcnet.datapath.dataplane.port_taken): refused, naming the port and the holder."""
    endpoint(plug)
    if held_by == "host":
        plug.dataplane.host_sockets[("tcp", held_ip, 8080)] = "Address already in use"
    else:
        endpoint(plug, EID2)
        plug.driver.program_external_connectivity(NID, EID2, portmap(binding(TCP, 80, 8080, host_ip=held_ip)))
    state = plug.snapshot()
    with pytest.raises(Conflict, match="cannot publish port 8080: .*(vpcnet publishes it for endpoint fadefadefade|"
                                       "Address already in use).*already allocated"):
        plug.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 81, 8080, host_ip=ask_ip)))
    assert plug.snapshot() == state


def test_other_protocols_and_other_addresses_do_not_clash(plug):
    endpoint(plug)
    endpoint(plug, EID2)
    plug.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 8080, host_ip="10.0.0.5")))
    plug.driver.program_external_connectivity(NID, EID2, portmap(binding(UDP, 80, 8080),
                                                                 binding(TCP, 80, 8080, host_ip="10.0.0.6")))
    assert len(published(plug)) == 3


def test_a_kernel_failure_puts_the_rows_back(plug):
    endpoint(plug)
    plug.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 8080)))
    before = published(plug)
    plug.dataplane.fail["ensure_ports"] = DataplaneError("iptables-restore failed")
    with pytest.raises(DataplaneError):
        plug.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 9090)))
    del plug.dataplane.fail["ensure_ports"]
    assert [f"{p.host_port}" for p in plug.store.ports()] == ["8080"]
    assert published(plug) == before


# -- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, text", [
    (binding(host_ip="127.0.0.1", host_port=8080), "route_localnet"),
    (binding(host_ip="::1", host_port=8080), r"-p \[::1\].*route_localnet"),
    (binding(host_ip="2001:db8::1", host_port=8080), r"the endpoint has no IPv6 address \(create the network with "
                                                     "--ipv6"),
    (binding(host_ip="not-an-ip", host_port=8080), "is not an IP address"),
    (binding(proto=1, host_port=8080), "is not tcp"),
    (binding(port=0, host_port=8080), "container port 0"),
    (binding(host_port=8080, host_port_end=8000), "ends before it starts"),
    (binding(host_port=70000), "is not a port number"),
])
def test_bad_bindings_are_refused_naming_them(plug, bad, text):
    endpoint(plug)
    state = plug.snapshot()
    with pytest.raises(InvalidRequest, match=text):
        plug.driver.program_external_connectivity(NID, EID, portmap(bad))
    assert plug.snapshot() == state


def test_ipv6_wildcard_is_left_out_beside_ipv4_on_an_ipv4_network(plug):
    """Docker 28 sends [::] beside 0.0.0.0 for `-p 8080:80`: an IPv4-only network publishes IPv4 only."""
    address = endpoint(plug)
    plug.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 8080, host_ip="0.0.0.0"),
                                                                binding(TCP, 80, 8080, host_ip="::")))
    assert published(plug) == [f"0.0.0.0:8080->{address}:80/tcp"]
    assert plug.store.ports()[0].family == "ipv4"


# -- IPv6 (dual-stack networks) ---------------------------------------------------------------------------
@pytest.fixture
def plug6(tmp_path):
    plug = make_plugin(tmp_path)
    pool4, pool6 = plug.ipam.request_pool()["PoolID"], plug.ipam.request_pool(v6=True)["PoolID"]
    plug.driver.create_network(NID, {GENERIC: {"vpcnet.mode": "ebpf"}, "com.docker.network.enable_ipv6": True},
                               [{"Pool": pool4, "Gateway": ""}], [{"Pool": pool6, "Gateway": ""}])
    return plug


def endpoint6(plug, eid=EID) -> tuple[str, str]:
    net = plug.store.network(NID)
    address = plug.ipam.request_address(net.host_cidr)["Address"]
    address6 = plug.ipam.request_address(net.host_cidr_v6)["Address"]
    plug.driver.create_endpoint(NID, eid, {"Address": address, "AddressIPv6": address6}, {})
    return address.split("/")[0], address6.split("/")[0]


@pytest.mark.parametrize("engine, bindings", [
    ("28", [binding(TCP, 80, 8080, host_ip="0.0.0.0"), binding(TCP, 80, 8080, host_ip="::")]),
    ("20.10", [binding(TCP, 80, 8080)]),
])
def test_a_dual_stack_endpoint_publishes_on_both_families(plug6, engine, bindings):
    """`-p 8080:80`: Docker 28 sends 0.0.0.0 and [::], 20.10 one binding without an address; both publish on
    the host's IPv4 and IPv6 addresses, to the container's address of each family, and Revoke takes both."""
    address, address6 = endpoint6(plug6)
    plug6.driver.program_external_connectivity(NID, EID, portmap(*bindings))
    assert published(plug6) == [f"0.0.0.0:8080->{address}:80/tcp", f"[::]:8080->[{address6}]:80/tcp"]
    assert sorted(p.family for p in plug6.store.ports()) == ["ipv4", "ipv6"]
    # the ebpf programs learn each family's published ports by the endpoint's address of that family
    spec = plug6.driver._spec(plug6.store.network(NID))
    assert spec.published(address) == spec.published(address6) == (("tcp", 80),)
    assert [p.family for p in spec.ports if p.address == address6] == ["ipv6"]
    plug6.driver.revoke_external_connectivity(NID, EID)
    assert published(plug6) == []


def test_explicit_ipv4_or_ipv6_host_addresses_publish_that_family_only(plug6):
    address, address6 = endpoint6(plug6)
    plug6.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 8080, host_ip="0.0.0.0"),
                                                                 binding(UDP, 53, 5353, host_ip="2001:db8::1"),
                                                                 binding(TCP, 443, 8443, host_ip="10.0.0.5")))
    assert published(plug6) == [f"0.0.0.0:8080->{address}:80/tcp", f"10.0.0.5:8443->{address}:443/tcp",
                                f"[2001:db8::1]:5353->[{address6}]:53/udp"]


def test_host_ports_are_checked_per_family(plug6):
    """A port a host process holds on IPv6 only (or Docker's ip6tables rules) refuses the IPv6 binding, naming
    it, and publishes nothing; the same port held on IPv4 only leaves IPv6 free, and the other way round."""
    endpoint6(plug6)
    plug6.dataplane.host_sockets[("tcp", "", 8080, "ipv6")] = "Address already in use"
    state = plug6.snapshot()
    with pytest.raises(Conflict, match=r"-p \[::\]:8080:80/tcp: cannot publish port 8080: ::?:8080/tcp: Address "
                                       "already in use"):
        plug6.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 8080, host_ip="0.0.0.0"),
                                                                     binding(TCP, 80, 8080, host_ip="::")))
    assert plug6.snapshot() == state
    plug6.dataplane.host_sockets = {("tcp", "", 8080): "held on IPv4"}
    with pytest.raises(Conflict, match="held on IPv4"):
        plug6.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 8080)))
    plug6.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 8080, host_ip="::")))
    assert [p.family for p in plug6.store.ports()] == ["ipv6"]
    assert ("port_taken", "tcp", "", 8080, "ipv6") in plug6.dataplane.called("port_taken")


def test_another_endpoints_ipv6_port_clashes_only_in_its_family(plug6):
    endpoint6(plug6)
    endpoint6(plug6, EID2)
    plug6.driver.program_external_connectivity(NID, EID2, portmap(binding(TCP, 80, 8080, host_ip="::")))
    with pytest.raises(Conflict, match="vpcnet publishes it for endpoint fadefadefade"):
        plug6.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 8080, host_ip="2001:db8::1")))
    plug6.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 8080, host_ip="0.0.0.0")))
    assert len(published(plug6)) == 2


def test_p_gives_both_families_the_same_host_port(plug6):
    """-P: Docker 28 sends 0.0.0.0 and [::] with no host port: one port for both, as Docker's own allocator."""
    endpoint6(plug6)
    plug6.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 0, host_ip="0.0.0.0"),
                                                                 binding(TCP, 80, 0, host_ip="::")))
    v4, v6 = sorted(plug6.store.ports(), key=lambda p: p.family)
    assert (v4.family, v6.family) == ("ipv4", "ipv6") and v4.host_port == v6.host_port


@pytest.mark.parametrize("bad, text", [
    (binding(host_ip="::1", host_port=8080), r"-p \[::1\].*loopback.*route_localnet"),
    (binding(host_ip="fe80::1", host_port=8080), "link-local host address"),
])
def test_ipv6_loopback_and_link_local_host_addresses_are_refused(plug6, bad, text):
    endpoint6(plug6)
    state = plug6.snapshot()
    with pytest.raises(InvalidRequest, match=text):
        plug6.driver.program_external_connectivity(NID, EID, portmap(bad))
    assert plug6.snapshot() == state


def test_a_released_ipv6_address_takes_its_published_ports_at_once(plug6):
    """Docker releases a running container's IPv6 address (it turned IPv6 off): its IPv6 ports' rows and rules
    go with it (no DNAT to an address IPAM may hand to another container), its IPv4 ones stay."""
    address, address6 = endpoint6(plug6)
    plug6.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 8080)))
    assert len(published(plug6)) == 2
    plug6.dataplane.links[plug6.store.endpoint(EID).host_veth]["peer_present"] = False     # in the container
    plug6.ipam.release_address(plug6.store.network(NID).host_cidr_v6, address6)
    assert published(plug6) == [f"0.0.0.0:8080->{address}:80/tcp"]
    # Docker 29 programs again (the endpoint stays the gateway): only IPv4 now, nothing refused
    plug6.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 8080, host_ip="0.0.0.0"),
                                                                 binding(TCP, 80, 8080, host_ip="::")))
    assert published(plug6) == [f"0.0.0.0:8080->{address}:80/tcp"]


def test_vpcnet_status_shows_ipv6_ports(plug6):
    from vpcnet.cli.status import collect, render

    _address, address6 = endpoint6(plug6)
    plug6.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 8080, host_ip="::")))
    status = collect(plug6.config)
    [ep] = status["networks"][0]["endpoints"]
    assert ep["ports"] == [{"proto": "tcp", "host_ip": "::", "host_port": 8080, "container_port": 80,
                            "family": "ipv6"}]
    assert f"published [::]:8080 -> [{address6}]:80/tcp" in render(status)


def test_an_internal_network_refuses_to_publish(tmp_path):
    plug = make_plugin(tmp_path)
    pool = plug.ipam.request_pool()["PoolID"]
    plug.driver.create_network(NID, {GENERIC: {}, INTERNAL_OPTION: True}, [{"Pool": pool, "Gateway": ""}], [])
    endpoint(plug)
    with pytest.raises(InvalidRequest, match="--internal"):
        plug.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 8080)))


# -- restarts ---------------------------------------------------------------------------------------------
def test_a_restart_or_a_lost_kernel_state_rebuilds_exactly_the_stored_ports(tmp_path):
    """kill -9 and a new plugin on the same state (the kernel kept its rules, or lost them): the datapath
    pass at start rebuilds the published ports exactly as stored; ebpf endpoints' programs included."""
    plug = make_plugin(tmp_path)
    pool = plug.ipam.request_pool()["PoolID"]
    plug.driver.create_network(NID, {GENERIC: {"vpcnet.mode": "ebpf"}}, [{"Pool": pool, "Gateway": ""}], [])
    address = endpoint(plug)
    plug.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 8080), binding(UDP, 53)))
    want = published(plug)
    assert plug.dataplane.programs[plug.store.endpoint(EID).host_veth] == (("tcp", 80), ("udp", 53))
    host_veth = plug.store.endpoint(EID).host_veth
    fresh = FakeDataplane()                         # a reboot: nothing in the kernel but the container's veth
    fresh.links = {host_veth: dict(plug.dataplane.links[host_veth])}
    again = make_plugin(tmp_path, dataplane=fresh)
    again.driver.restore()
    assert fresh.published() == want == sorted([f"0.0.0.0:8080->{address}:80/tcp", _udp(again, address)])
    assert fresh.programs[host_veth] == (("tcp", 80), ("udp", 53))


def _udp(plug, address: str) -> str:
    (udp,) = [p for p in plug.store.ports() if p.proto == "udp"]
    return f"0.0.0.0:{udp.host_port}->{address}:53/udp"


def test_a_version_4_state_gains_the_ports_table(tmp_path):
    from vpcnet.state.store import SCHEMA_VERSION, Store

    path = str(tmp_path / "state.db")
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.executescript("DROP TRIGGER ports_insert; DROP TRIGGER ports_delete; DROP TABLE ports; "
                       "UPDATE meta SET value='4' WHERE key='schema_version';")
    conn.commit()
    conn.close()
    store = Store(path)
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION) == "9"
    assert store.ports() == []
    version = store.ports_version()
    store.close()
    assert version == "0"


def test_vpcnet_status_lists_the_published_ports(plug):
    """`docker port` cannot show a network plugin's mappings (moby type-asserts EndpointOperInfo's portmap as
    Go []types.PortBinding, a remote driver's JSON never is one): `vpcnet status` shows them."""
    from vpcnet.cli.status import collect, render

    address = endpoint(plug)
    plug.driver.program_external_connectivity(NID, EID, portmap(binding(TCP, 80, 8080, host_ip="10.0.0.5")))
    status = collect(plug.config)
    [ep] = status["networks"][0]["endpoints"]
    assert ep["ports"] == [{"proto": "tcp", "host_ip": "10.0.0.5", "host_port": 8080, "container_port": 80,
                            "family": "ipv4"}]
    assert f"published 10.0.0.5:8080 -> {address}:80/tcp" in render(status)
