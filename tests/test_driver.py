"""NetworkDriver logic not covered through the transport: MTU, --internal, idempotent replays, Join
repairing a missing veth pair, restore() at start-up. The dataplane is the recording fake."""
from __future__ import annotations

import ipaddress
import json

import pytest
from fakes import FakeDataplane, make_plugin

from vpcnet.datapath.features import Features
from vpcnet.datapath.ipv6 import link_gateway
from vpcnet.datapath.spec import bridge_name, mac_for, veth_names
from vpcnet.docker.driver import GENERIC, INTERNAL_OPTION, MODE_OPTION, MTU_OPTION, spec_of
from vpcnet.errors import Conflict, DataplaneError, InvalidRequest, NotFound

NID = "c0ffee" * 10 + "abcd"
NID2 = "d00d" * 16
EID = "beef" * 16
EID2 = "fade" * 16


@pytest.fixture
def plug(tmp_path):
    return make_plugin(tmp_path)


def pool_of(plug, subnet: str = "") -> str:
    return plug.ipam.request_pool(pool=subnet)["PoolID"]


def create(plug, nid=NID, pool=None, generic=None, **options):
    pool = pool or pool_of(plug)
    opts = {GENERIC: generic or {}}
    opts.update(options)
    plug.driver.create_network(nid, opts, [{"Pool": pool, "Gateway": ""}], [])
    return plug.store.network(nid)


def endpoint(plug, nid=NID, eid=EID, mac=""):
    net = plug.store.network(nid)
    address = plug.ipam.request_address(net.host_cidr)["Address"]
    answer = plug.driver.create_endpoint(nid, eid, {"Address": address, "MacAddress": mac}, {})
    return address, answer


# -- MTU ----------------------------------------------------------------------------------------------
def test_mtu_from_uplink_by_default(tmp_path):
    plug = make_plugin(tmp_path, dataplane=FakeDataplane(uplink=8950))
    assert create(plug).mtu == 8950
    assert plug.dataplane.called("uplink_mtu")


def test_mtu_from_config_beats_uplink(tmp_path):
    plug = make_plugin(tmp_path, dataplane=FakeDataplane(uplink=8950), VPCNET_MTU="1400")
    assert create(plug).mtu == 1400
    assert not plug.dataplane.called("uplink_mtu")


@pytest.mark.parametrize("raw,mtu", [("9000", 9000), (" 1280 ", 1280), (576, 576), ("65535", 65535)])
def test_mtu_option(plug, raw, mtu):
    net = create(plug, generic={MTU_OPTION: raw})
    assert net.mtu == mtu
    assert plug.dataplane.networks[net.bridge].mtu == mtu
    assert not plug.dataplane.called("uplink_mtu")


def test_mtu_option_empty_means_default(plug):
    assert create(plug, generic={MTU_OPTION: ""}).mtu == 1500


@pytest.mark.parametrize("raw,text", [("575", "out of range"), ("65536", "out of range"), ("0", "out of range"),
                                      ("-1", "out of range"), ("jumbo", "not a number"), ("9000.5", "not a number")])
def test_mtu_option_refused(plug, raw, text):
    pool = pool_of(plug)
    with pytest.raises(InvalidRequest, match=text) as info:
        create(plug, pool=pool, generic={MTU_OPTION: raw})
    assert MTU_OPTION in str(info.value)
    assert plug.store.networks() == [] and plug.dataplane.networks == {}


def test_endpoint_gets_network_mtu(plug):
    create(plug, generic={MTU_OPTION: "9000"})
    endpoint(plug)
    assert plug.dataplane.links[veth_names(EID)[0]]["mtu"] == 9000


# -- internal -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,internal", [(True, True), ("true", True), ("1", True), (False, False),
                                            ("false", False), (None, False)])
def test_internal_flag(plug, value, internal):
    options = {} if value is None else {INTERNAL_OPTION: value}
    net = create(plug, **options)
    assert net.internal is internal
    assert plug.dataplane.networks[net.bridge].internal is internal


def test_no_nat_from_config(tmp_path):
    plug = make_plugin(tmp_path, VPCNET_NO_NAT_CIDRS="192.168.0.0/16")
    net = create(plug)
    assert net.no_nat == ("192.168.0.0/16",)
    assert plug.dataplane.networks[net.bridge].no_nat == ("192.168.0.0/16",)


def test_network_record(plug):
    pool = pool_of(plug)
    net = create(plug, pool=pool)
    assert net.host_cidr == pool and net.cluster_cidr == "10.200.0.0/16"
    assert net.gateway == pool.split("/")[0][:-1] + "1"
    assert net.bridge == bridge_name(NID) and len(net.bridge) <= 15
    assert spec_of(net).tag == NID[:12]


# -- idempotent replays -------------------------------------------------------------------------------
def test_create_network_replay_is_idempotent(plug):
    pool = pool_of(plug)
    first = create(plug, pool=pool)
    plug.dataplane.networks.clear()                     # the bridge went away meanwhile
    assert plug.driver.create_network(NID, {GENERIC: {}}, [{"Pool": pool}], []) == {}
    assert plug.store.networks() == [first]             # same record, not a second one
    assert bridge_name(NID) in plug.dataplane.networks  # and the bridge is back


def test_create_network_same_id_other_pool_conflicts(plug):
    create(plug)
    other = pool_of(plug, "10.77.0.0/16")
    with pytest.raises(Conflict, match="already exists"):
        create(plug, pool=other)


def test_two_networks_on_two_cluster_cidrs(plug):
    a = create(plug, NID, pool_of(plug))
    b = create(plug, NID2, pool_of(plug, "10.77.0.0/16"))
    assert a.host_cidr != b.host_cidr and a.bridge != b.bridge
    assert set(plug.dataplane.networks) == {a.bridge, b.bridge}


def test_create_endpoint_replay_is_idempotent(plug):
    create(plug)
    address, first = endpoint(plug)
    host_veth, peer_veth = veth_names(EID)
    assert first == {"Interface": {"MacAddress": mac_for(address.split("/")[0])}}
    calls = len(plug.dataplane.called("ensure_endpoint"))
    again = plug.driver.create_endpoint(NID, EID, {"Address": address, "MacAddress": ""}, {})
    assert again == first
    assert len(plug.dataplane.called("ensure_endpoint")) == calls + 1    # re-ensured, not duplicated
    assert len(plug.store.endpoints()) == 1
    # with the MAC Docker already set, nothing is filled in
    assert plug.driver.create_endpoint(NID, EID, {"Address": address, "MacAddress": first["Interface"]
                                                  ["MacAddress"]}, {}) == {"Interface": {}}


def test_create_endpoint_same_id_other_address_conflicts(plug):
    create(plug)
    endpoint(plug)
    other = plug.ipam.request_address(plug.store.network(NID).host_cidr)["Address"]
    with pytest.raises(Conflict, match="already exists"):
        plug.driver.create_endpoint(NID, EID, {"Address": other}, {})


def test_endpoint_mac(plug):
    create(plug)
    address, answer = endpoint(plug)
    ep = plug.store.endpoint(EID)
    assert ep.mac == mac_for(ep.address) == answer["Interface"]["MacAddress"]
    assert ep.mac.startswith("02:42:")
    _, answer2 = endpoint(plug, eid=EID2, mac="02:00:00:aa:bb:cc")
    assert answer2 == {"Interface": {}}
    assert plug.store.endpoint(EID2).mac == "02:00:00:aa:bb:cc"
    assert plug.dataplane.links[veth_names(EID2)[0]]["mac"] == "02:00:00:aa:bb:cc"


def test_create_endpoint_on_missing_bridge_fails_cleanly(plug):
    create(plug)
    plug.dataplane.networks.clear()                     # the real one raises "bridge ... is missing"
    address = plug.ipam.request_address(plug.store.network(NID).host_cidr)["Address"]
    with pytest.raises(DataplaneError, match="missing"):
        plug.driver.create_endpoint(NID, EID, {"Address": address}, {})
    assert plug.store.endpoints() == [] and plug.dataplane.links == {}


# -- Join ---------------------------------------------------------------------------------------------
def test_join_answer(plug):
    net = create(plug)
    endpoint(plug)
    answer = plug.driver.join(NID, EID, "/var/run/docker/netns/x", {})
    assert answer == {"InterfaceName": {"SrcName": veth_names(EID)[1], "DstPrefix": "eth"},
                      "Gateway": net.gateway, "DisableGatewayService": True,
                      "StaticRoutes": [{"Destination": net.cluster_cidr, "RouteType": 0, "NextHop": net.gateway}]}
    assert not plug.dataplane.called("delete_endpoint")          # pair present: left alone


def test_join_routes_each_networks_own_cluster_cidr_through_its_gateway(plug):
    """A container on two vpcnet networks (two cluster CIDRs) reaches each cluster through its own
    interface, whichever network gives the default route."""
    net = create(plug)
    net2 = create(plug, nid=NID2, pool=pool_of(plug, "10.77.0.0/16"))
    endpoint(plug)
    endpoint(plug, nid=NID2, eid=EID2)
    routes = [plug.driver.join(n.network_id, e, "/var/run/docker/netns/x", {})["StaticRoutes"]
              for n, e in ((net, EID), (net2, EID2))]
    assert routes == [[{"Destination": "10.200.0.0/16", "RouteType": 0, "NextHop": net.gateway}],
                      [{"Destination": "10.77.0.0/16", "RouteType": 0, "NextHop": net2.gateway}]]


def test_endpoint_labels_of_current_docker(plug):
    """sysctls are Docker's to apply (accepted); ifname cannot be honoured by a plugin (refused, nothing
    made)."""
    create(plug)
    address = plug.ipam.request_address(plug.store.network(NID).host_cidr)["Address"]
    sysctls = {"com.docker.network.endpoint.sysctls": "net.ipv4.conf.IFNAME.log_martians=1"}
    assert "MacAddress" in plug.driver.create_endpoint(NID, EID, {"Address": address}, sysctls)["Interface"]
    address2 = plug.ipam.request_address(plug.store.network(NID).host_cidr)["Address"]
    with pytest.raises(InvalidRequest, match="ifname=app0: Docker does not let a network plugin name"):
        plug.driver.create_endpoint(NID, EID2, {"Address": address2}, {"com.docker.network.endpoint.ifname": "app0"})
    assert [ep.endpoint_id for ep in plug.store.endpoints()] == [EID]
    assert veth_names(EID2)[0] not in plug.dataplane.links


@pytest.mark.parametrize("options,text", [
    ({"com.docker.network.enable_ipv4": False}, r"IPv4 is disabled for this network \(--ipv4=false\) and IPv6"),
    ({"com.docker.network.enable_ipv4": "false"}, "--ipv4=false"),
    ({"com.docker.network.enable_ipv4": False, "com.docker.network.enable_ipv6": True,
      GENERIC: {MODE_OPTION: "bridge"}},
     "an IPv6-only network \\(--ipv6 --ipv4=false\\) needs -o vpcnet.mode=routed or ebpf")])
def test_ip_family_options_refused_by_create_and_gw_alloc_check(plug, options, text):
    with pytest.raises(InvalidRequest, match=text):
        plug.driver.gw_alloc_check(options)
    with pytest.raises(InvalidRequest, match=text):
        plug.driver.create_network(NID, {GENERIC: {}, **options}, [], [])
    assert plug.store.networks() == [] and plug.dataplane.networks == {}
    assert plug.driver.gw_alloc_check({"com.docker.network.enable_ipv4": True}) == {"SkipIPv4": False,
                                                                                    "SkipIPv6": False}


def test_join_recreates_missing_veth_pair(plug):
    net = create(plug, generic={MTU_OPTION: "9000", MODE_OPTION: "bridge"})
    endpoint(plug)
    host_veth, peer_veth = veth_names(EID)
    plug.dataplane.lose_peer(host_veth)
    plug.dataplane.calls.clear()
    plug.driver.join(NID, EID, "/var/run/docker/netns/x", {})
    ep = plug.store.endpoint(EID)
    assert plug.dataplane.calls == [
        ("link_exists", peer_veth),
        ("link_exists", peer_veth),             # again under the network's lock
        ("delete_endpoint", host_veth),
        ("ensure_endpoint", net.bridge, host_veth, peer_veth, ep.mac, 9000),
    ]
    assert plug.dataplane.link_exists(peer_veth)


def test_join_after_reboot_recreates_pair(plug):
    create(plug)
    endpoint(plug)
    plug.dataplane.links.clear()                           # the whole pair is gone
    plug.driver.join(NID, EID, "/var/run/docker/netns/x", {})
    assert veth_names(EID)[0] in plug.dataplane.links


def test_join_unknown(plug):
    with pytest.raises(NotFound, match="unknown network"):
        plug.driver.join(NID, EID, "/x", {})
    create(plug)
    with pytest.raises(NotFound, match="unknown endpoint"):
        plug.driver.join(NID, EID, "/x", {})
    endpoint(plug)
    with pytest.raises(InvalidRequest, match="SandboxKey"):
        plug.driver.join(NID, EID, "", {})


# -- deletion -----------------------------------------------------------------------------------------
def test_delete_network_takes_leftover_endpoints(plug):
    create(plug)
    endpoint(plug)
    endpoint(plug, eid=EID2)
    plug.driver.delete_network(NID)
    assert plug.store.networks() == [] and plug.store.endpoints() == []
    assert plug.dataplane.links == {} and plug.dataplane.networks == {} and plug.dataplane.chains == set()


def test_delete_endpoint_twice(plug):
    create(plug)
    endpoint(plug)
    assert plug.driver.delete_endpoint(NID, EID) == {}
    assert plug.driver.delete_endpoint(NID, EID) == {}
    assert plug.driver.delete_endpoint("", EID) == {}
    assert plug.store.endpoints() == [] and plug.dataplane.links == {}


def test_program_external_connectivity(plug):
    create(plug)
    endpoint(plug)
    assert plug.driver.program_external_connectivity(NID, EID, {}) == {}
    assert plug.driver.program_external_connectivity(NID, EID, {"com.docker.network.portmap": []}) == {}
    assert plug.driver.revoke_external_connectivity(NID, EID) == {}


def test_nothing_depends_on_program_external_connectivity(plug):
    """Docker 29 sends it (and Revoke) only to the endpoint that is the container's gateway: everything an
    endpoint needs is made by CreateEndpoint and Join, so these calls change no kernel or store state."""
    create(plug)
    endpoint(plug)
    plug.driver.join(NID, EID, "/var/run/docker/netns/x", {})
    calls, state = list(plug.dataplane.calls), plug.snapshot()
    assert plug.driver.program_external_connectivity(NID, EID, {"com.docker.network.portmap": []}) == {}
    assert plug.driver.revoke_external_connectivity(NID, EID) == {}
    assert plug.dataplane.calls == calls and plug.snapshot() == state


# -- restore ------------------------------------------------------------------------------------------
def test_restore_ensures_known_networks_and_drops_stale_chains(tmp_path):
    plug = make_plugin(tmp_path)
    a = create(plug, NID, pool_of(plug))
    b = create(plug, NID2, pool_of(plug, "10.77.0.0/16"), **{INTERNAL_OPTION: True})
    endpoint(plug)

    # A host reboot: a fresh (empty) kernel, plus leftover chains of a network vpcnet no longer knows.
    fresh = FakeDataplane()
    fresh.chains |= {("filter", "VPCNET-F-0123456789ab"), ("nat", "VPCNET-N-0123456789ab"),
                     ("filter", "VPCNET-FORWARD")}
    restarted = make_plugin(tmp_path, dataplane=fresh)
    restarted.driver.restore()

    assert fresh.host_ready and fresh.calls[0] == ("ensure_host",)
    assert fresh.networks == {a.bridge: spec_of(a), b.bridge: spec_of(b)}
    assert fresh.networks[b.bridge].internal
    assert sorted(c[1:] for c in fresh.called("drop_stale_chain")) == [
        ("filter", "VPCNET-F-0123456789ab"), ("nat", "VPCNET-N-0123456789ab")]
    assert ("filter", "VPCNET-FORWARD") in fresh.chains
    assert {("filter", spec_of(a).filter_chain), ("nat", spec_of(b).nat_chain)} <= fresh.chains
    assert fresh.called("stale_chains") == [("stale_chains", frozenset({NID[:12], NID2[:12]}))]
    # then Join brings the endpoint's veth pair back
    restarted.driver.join(NID, EID, "/var/run/docker/netns/x", {})
    assert veth_names(EID)[0] in fresh.links


def test_restore_keeps_going_when_one_network_fails(tmp_path):
    plug = make_plugin(tmp_path)
    create(plug, NID, pool_of(plug))
    create(plug, NID2, pool_of(plug, "10.77.0.0/16"))

    class Flaky(FakeDataplane):
        def ensure_network(self, spec):
            if spec.tag == NID[:12]:
                self.calls.append(("ensure_network", spec))
                raise DataplaneError("bridge refused")
            super().ensure_network(spec)

    fresh = Flaky()
    make_plugin(tmp_path, dataplane=fresh).driver.restore()
    assert list(fresh.networks) == [bridge_name(NID2)]
    assert len(fresh.called("stale_chains")) == 1


def test_restore_with_nothing_known(plug):
    plug.dataplane.chains.add(("nat", "VPCNET-N-feedfeedfeed"))
    plug.driver.restore()
    assert plug.dataplane.chains == set()
    assert plug.dataplane.called("ensure_network") == []


def test_fake_dataplane_matches_the_real_interface():
    """The fake must offer every public method of the real Dataplane (and nothing it lacks)."""
    import inspect

    from fakes import DATAPLANE_METHODS

    from vpcnet.datapath.dataplane import Dataplane
    from vpcnet.datapath.protocol import Datapath

    protocol = {name for name, _ in inspect.getmembers(Datapath, inspect.isfunction) if not name.startswith("_")}
    assert protocol == set(DATAPLANE_METHODS), "the Protocol names every method the driver may call"
    for name in protocol:                     # the real one and the fake, each as the Protocol says
        spelled = list(inspect.signature(getattr(Datapath, name)).parameters)
        assert list(inspect.signature(getattr(Dataplane, name)).parameters) == spelled, name
        assert list(inspect.signature(getattr(FakeDataplane, name)).parameters) == spelled, name
    real = {name for name, _ in inspect.getmembers(Dataplane, inspect.isfunction) if not name.startswith("_")}
    own = {"view", "uplink_names"}            # the datapath's own (the pass, doctor), never the driver's
    assert real - own <= set(DATAPLANE_METHODS), f"FakeDataplane is missing {real - own - set(DATAPLANE_METHODS)}"
    for name in DATAPLANE_METHODS:
        if name in real:
            fake_params = list(inspect.signature(getattr(FakeDataplane, name)).parameters)
            real_params = list(inspect.signature(getattr(Dataplane, name)).parameters)
            assert fake_params == real_params, name


def test_endpoint_id_prefix_collision_leaves_the_other_endpoint_alone(plug):
    create(plug)
    endpoint(plug, eid="0123456789a" + "1" * 53)
    host_veth = veth_names("0123456789a" + "1" * 53)[0]
    try:
        endpoint(plug, eid="0123456789a" + "2" * 53)
    except Exception:            # refusing is fine; breaking the first endpoint is not
        pass
    assert host_veth in plug.dataplane.links, "the first endpoint's veth was deleted by the undo"



# -- routed mode --------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,mode", [("bridge", "bridge"), ("routed", "routed"), (" Routed ", "routed"),
                                      ("ebpf", "ebpf"), ("eBPF", "ebpf")])
def test_mode_option_is_stored_and_handed_to_the_dataplane(plug, raw, mode):
    net = create(plug, generic={} if raw is None else {MODE_OPTION: raw})
    assert net.mode == mode and spec_of(net).mode == mode
    assert plug.dataplane.networks[net.bridge].mode == mode
    assert plug.store.network(NID).mode == mode


@pytest.mark.parametrize("raw", [None, ""])
def test_a_network_without_a_mode_gets_the_best_mode_the_host_supports(tmp_path, raw):
    for features, want in ((Features("ebpf"), "ebpf"),
                           (Features("routed", {"ebpf": "no CAP_BPF"}), "routed"),
                           (Features("bridge", {"ebpf": "no veth", "routed": "no veth"}), "bridge")):
        plug = make_plugin(tmp_path / want, dataplane=FakeDataplane(features=features))
        net = create(plug, generic={} if raw is None else {MODE_OPTION: raw})
        assert net.mode == want and plug.dataplane.networks[net.bridge].mode == want
        default = plug.driver.default_mode()
        assert default.mode == want and default.setting == "auto"
        assert bool(default.fallback) == (want != "ebpf")
        if want == "routed":
            assert "ebpf: no CAP_BPF" in default.fallback and "VPCNET_DEFAULT_MODE=routed" in default.fallback


@pytest.mark.parametrize("pinned", ["bridge", "routed", "ebpf"])
def test_a_pinned_default_mode_is_used_and_an_explicit_option_still_wins(tmp_path, pinned):
    plug = make_plugin(tmp_path, VPCNET_DEFAULT_MODE=pinned)
    assert create(plug).mode == pinned
    assert plug.driver.default_mode().fallback == ""
    other = "routed" if pinned != "routed" else "bridge"
    assert create(plug, nid=NID2, pool=pool_of(plug, "10.201.0.0/16"), generic={MODE_OPTION: other}).mode == other


def test_a_pinned_default_the_host_cannot_do_is_refused_before_anything_is_made(tmp_path):
    fake = FakeDataplane(features=Features("routed", {"ebpf": "the kernel refuses the fast-path program: needs "
                                                               "CAP_BPF"}))
    plug = make_plugin(tmp_path, dataplane=fake, VPCNET_DEFAULT_MODE="ebpf")
    pool = pool_of(plug)
    for call in (lambda: plug.driver.gw_alloc_check({GENERIC: {}}), lambda: create(plug, pool=pool)):
        with pytest.raises(InvalidRequest) as info:
            call()
        message = str(info.value)
        assert "VPCNET_DEFAULT_MODE=ebpf" in message and "needs CAP_BPF" in message
        assert "VPCNET_DEFAULT_MODE=auto" in message and "-o vpcnet.mode=routed" in message
    with pytest.raises(InvalidRequest, match="-o vpcnet.mode=ebpf: this host cannot do ebpf mode .*needs CAP_BPF"):
        create(plug, pool=pool, generic={MODE_OPTION: "ebpf"})
    assert plug.store.networks() == [] and fake.networks == {}
    assert create(plug, pool=pool, generic={MODE_OPTION: "routed"}).mode == "routed"


def test_a_default_that_changes_after_start_is_recorded_for_status(tmp_path):
    """A probe that fell back at start (a transient BPF failure) and later finds ebpf: the next network
    gets ebpf, and what `vpcnet status` and `doctor` read from the store says so."""
    fake = FakeDataplane(features=Features("routed", {"ebpf": "cannot load eBPF program: transient"}))
    plug = make_plugin(tmp_path, dataplane=fake)
    plug.driver.restore()
    assert json.loads(plug.store.get_meta("datapath_default"))["mode"] == "routed"
    fake.host_features = Features("ebpf")
    assert create(plug).mode == "ebpf"
    recorded = json.loads(plug.store.get_meta("datapath_default"))
    assert recorded["mode"] == "ebpf" and not recorded.get("fallback")


def test_a_network_stored_as_bridge_keeps_its_mode_when_the_default_is_ebpf(tmp_path):
    """An old version's network (bridge, the old default) survives an upgrade and restart as bridge."""
    plug = make_plugin(tmp_path, VPCNET_DEFAULT_MODE="bridge")
    net = create(plug)
    endpoint(plug)
    assert net.mode == "bridge"
    fresh = FakeDataplane()
    upgraded = make_plugin(tmp_path, dataplane=fresh)              # auto: ebpf on this host
    upgraded.driver.restore()
    assert upgraded.driver.default_mode().mode == "ebpf"
    assert upgraded.store.network(NID).mode == "bridge"
    assert fresh.networks[net.bridge].mode == "bridge"
    assert json.loads(upgraded.store.get_meta("datapath_default"))["mode"] == "ebpf"


@pytest.mark.parametrize("raw", ["ipvlan", "bridged", "1", "route"])
def test_unknown_mode_is_refused_and_changes_nothing(plug, raw):
    pool = pool_of(plug)
    with pytest.raises(InvalidRequest, match="unknown mode") as info:
        create(plug, pool=pool, generic={MODE_OPTION: raw})
    assert MODE_OPTION in str(info.value) and "bridge, routed" in str(info.value)
    assert plug.store.networks() == [] and plug.dataplane.networks == {}


def test_unknown_option_message_names_the_mode_option(plug):
    with pytest.raises(InvalidRequest, match="vpcnet.mode"):
        create(plug, generic={"vpcnet.moed": "routed"})


@pytest.mark.parametrize("mode", ["routed", "ebpf"])
def test_routed_endpoint_join_and_restore_pass_the_address(tmp_path, mode):
    plug = make_plugin(tmp_path)
    net = create(plug, generic={MODE_OPTION: mode})
    address, _ = endpoint(plug)
    ip = address.split("/")[0]
    host_veth, peer_veth = veth_names(EID)
    assert plug.dataplane.called("ensure_endpoint")[-1] == (
        "ensure_endpoint", net.bridge, host_veth, peer_veth, mac_for(ip), net.mtu, ip)
    assert plug.dataplane.links[host_veth]["route"] == f"{ip}/32"
    answer = plug.driver.join(NID, EID, "/var/run/docker/netns/x", {})
    assert answer["InterfaceName"]["SrcName"] == peer_veth and answer["Gateway"] == net.gateway
    plug.dataplane.lose_peer(host_veth)
    plug.driver.join(NID, EID, "/var/run/docker/netns/x", {})
    assert plug.dataplane.called("ensure_endpoint")[-1][-1] == ip
    # a plugin restart: the host veth is still there (the container lives on), its route must come back
    fresh = FakeDataplane()
    fresh.networks[net.bridge] = spec_of(net)
    fresh.links[host_veth] = {"peer": peer_veth, "mac": mac_for(ip), "peer_present": True}
    make_plugin(tmp_path, dataplane=fresh).driver.restore()
    assert fresh.networks[net.bridge].mode == mode
    assert fresh.links[host_veth]["route"] == f"{ip}/32"
    assert fresh.called("drop_stale_uplink_programs") == [("drop_stale_uplink_programs", frozenset({NID[:12]}))]
    # ... but an endpoint whose veth is gone (a reboot) is left for Join to recreate
    gone = FakeDataplane()
    make_plugin(tmp_path, dataplane=gone).driver.restore()
    assert gone.links == {} and not gone.called("ensure_endpoint")


def test_bridge_endpoints_are_not_touched_by_restore(tmp_path):
    plug = make_plugin(tmp_path)
    create(plug, generic={MODE_OPTION: "bridge"})
    endpoint(plug)
    fresh = FakeDataplane()
    fresh.links[veth_names(EID)[0]] = {"peer": veth_names(EID)[1], "mac": "x", "peer_present": True,
                                       "bridge": bridge_name(NID)}
    make_plugin(tmp_path, dataplane=fresh).driver.restore()
    assert not fresh.called("ensure_endpoint")           # on its bridge already: left alone


def test_restore_puts_a_bridge_endpoint_back_on_its_bridge(tmp_path):
    """The bridge was deleted and rebuilt: its ports fell off it."""
    plug = make_plugin(tmp_path)
    create(plug, generic={MODE_OPTION: "bridge"})
    endpoint(plug)
    fresh = FakeDataplane()
    fresh.links[veth_names(EID)[0]] = {"peer": veth_names(EID)[1], "mac": "x", "peer_present": True}
    make_plugin(tmp_path, dataplane=fresh).driver.restore()
    assert fresh.links[veth_names(EID)[0]]["bridge"] == bridge_name(NID)


def test_a_version_1_state_file_is_migrated_and_keeps_its_networks(tmp_path):
    import sqlite3

    from vpcnet.state.store import SCHEMA_VERSION, Store

    path = str(tmp_path / "state" / "vpcnet.db")
    (tmp_path / "state").mkdir()
    conn = sqlite3.connect(path)       # what vpcnet with schema 1 wrote
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE networks (network_id TEXT PRIMARY KEY, host_cidr TEXT NOT NULL UNIQUE,
            cluster_cidr TEXT NOT NULL, gateway TEXT NOT NULL, bridge TEXT NOT NULL UNIQUE,
            mtu INTEGER NOT NULL, internal INTEGER NOT NULL, no_nat TEXT NOT NULL, created REAL NOT NULL);
        INSERT INTO networks VALUES ('n1', '10.200.1.0/24', '10.200.0.0/16', '10.200.1.1', 'vpc-n1', 1500, 0,
            '[]', 1.0);
    """)
    conn.commit()
    conn.close()
    store = Store(path)
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
    (net,) = store.networks()
    assert net.network_id == "n1" and net.mode == "bridge" and net.host_cidr == "10.200.1.0/24"
    assert spec_of(net).mode == "bridge"
    store.close()
    again = Store(path)                # opening a migrated file again is a no-op
    assert again.networks() == [net]
    again.close()


# -- the review's bugs: deletion order, races ---------------------------------------------------------
def test_delete_network_forgets_the_row_even_when_the_kernel_refuses(tmp_path):
    """Docker ignores DeleteNetwork's error: a kept row would be rebuilt at every start and its host CIDR
    would block the next network. The kernel's leftovers go at the next start instead."""
    plug = make_plugin(tmp_path)
    net = create(plug)
    endpoint(plug)
    plug.dataplane.fail["delete_network"] = DataplaneError("bridge busy")
    plug.driver.delete_network(NID)
    assert plug.store.network(NID) is None and plug.store.endpoints() == []
    assert [name for name, _ in plug.store.leftovers()] == [f"network:{NID}"]
    assert veth_names(EID)[0] not in plug.dataplane.links       # what could go, went
    # the next default network gets the same block
    create(plug, NID2, pool_of(plug))
    assert plug.store.network(NID2).host_cidr == net.host_cidr
    # a restart (kernel willing again) removes the leftover and never rebuilds the deleted network
    del plug.dataplane.fail["delete_network"]
    plug.dataplane.calls.clear()
    plug.driver.restore()
    assert NID[:12] not in [c[1].tag for c in plug.dataplane.called("ensure_network")]
    assert [c[1].tag for c in plug.dataplane.called("delete_network")] == [NID[:12]]
    assert plug.store.leftovers() == [] and net.bridge not in plug.dataplane.networks


def test_delete_endpoint_forgets_the_row_even_when_the_kernel_refuses(plug):
    create(plug)
    endpoint(plug)
    plug.dataplane.fail["delete_endpoint"] = DataplaneError("busy")
    assert plug.driver.delete_endpoint(NID, EID) == {}
    assert plug.store.endpoint(EID) is None
    del plug.dataplane.fail["delete_endpoint"]
    assert plug.driver.remove_leftovers() == 0
    assert plug.dataplane.links == {} and plug.store.leftovers() == []


def test_losing_a_race_for_an_address_is_a_conflict_and_keeps_the_winners_route(tmp_path, monkeypatch):
    """Two endpoints given one address at once (both passed the clash check): the loser is refused with a
    409 before it touches the kernel, so its undo cannot take the winner's /32 route along."""
    plug = make_plugin(tmp_path)
    create(plug, generic={MODE_OPTION: "routed"})
    address, _ = endpoint(plug)
    monkeypatch.setattr(plug.store, "endpoint_where", lambda **match: None)    # the race's window
    with pytest.raises(Conflict, match="taken by another endpoint"):
        plug.driver.create_endpoint(NID, EID2, {"Address": address}, {})
    ip = address.split("/")[0]
    assert plug.dataplane.routes == {ip: veth_names(EID)[0]}
    assert list(plug.dataplane.links) == [veth_names(EID)[0]]


def test_losing_a_race_for_a_host_cidr_is_a_conflict(plug, monkeypatch):
    pool = pool_of(plug)
    create(plug, NID, pool)
    monkeypatch.setattr(plug.store, "network_by_host_cidr", lambda cidr: None)
    with pytest.raises(Conflict, match="taken by another network"):
        plug.driver.create_network(NID2, {GENERIC: {}}, [{"Pool": pool}], [])
    assert list(plug.dataplane.networks) == [bridge_name(NID)]


def test_racing_identical_calls_all_succeed_one_at_a_time_and_undo_nothing(tmp_path):
    import threading
    import time

    class Slow(FakeDataplane):
        """Records whether two calls ever configured the same object at once."""
        def __init__(self):
            super().__init__()
            self.busy: set[str] = set()
            self.overlaps = 0

        def _call(self, name, *args):
            super()._call(name, *args)
            if not name.startswith(("ensure_", "delete_")):
                return
            key = name.split("_")[-1]
            if key in self.busy:
                self.overlaps += 1
            self.busy.add(key)
            time.sleep(0.01)
            self.busy.discard(key)

    plug = make_plugin(tmp_path, dataplane=Slow())
    pool = pool_of(plug)
    address = plug.ipam.request_address(pool)["Address"]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def both():
        try:
            start.wait(timeout=10)
            plug.driver.create_network(NID, {GENERIC: {}}, [{"Pool": pool}], [])
            plug.driver.create_endpoint(NID, EID, {"Address": address}, {})
        except BaseException as exc:            # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            plug.store.close()

    threads = [threading.Thread(target=both) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert len(plug.store.networks()) == 1 and len(plug.store.endpoints()) == 1
    assert plug.dataplane.overlaps == 0                                 # never two at once
    assert not plug.dataplane.called("delete_endpoint") and not plug.dataplane.called("delete_network")


def test_a_join_repairing_the_veth_never_brings_it_back_for_a_network_deleted_meanwhile(plug, monkeypatch):
    """Join found the container end gone and deletes and re-makes the pair; a DeleteNetwork lands in that
    window. The repair holds the network's lock, so the delete waits for it and removes the pair after;
    nothing of the endpoint is left in the kernel."""
    import threading

    create(plug)
    endpoint(plug)
    host_veth = veth_names(EID)[0]
    plug.dataplane.links[host_veth]["peer_present"] = False         # the sandbox took the container end
    deleted = threading.Thread(target=plug.driver.delete_network, args=(NID,))
    remove = plug.dataplane.delete_endpoint

    def delete_network_meanwhile(name):
        remove(name)
        if not deleted.is_alive() and deleted.ident is None:
            deleted.start()
            deleted.join(timeout=1)              # done at once unless the repair holds the lock

    monkeypatch.setattr(plug.dataplane, "delete_endpoint", delete_network_meanwhile)
    try:
        plug.driver.join(NID, EID, "/var/run/docker/netns/x", {})
    except NotFound:
        pass                                     # the network was gone by the time Join looked again
    deleted.join(timeout=10)
    assert not deleted.is_alive()
    assert plug.store.network(NID) is None and plug.store.leftovers() == []
    assert host_veth not in plug.dataplane.links, plug.dataplane.links


def test_racing_joins_that_repair_one_veth_leave_one_pair(plug, monkeypatch):
    """Two Joins both find the container end gone: the second, waiting for the lock, sees the pair the
    first made and keeps it (it does not delete it from under the first)."""
    import threading

    create(plug)
    endpoint(plug)
    plug.dataplane.links[veth_names(EID)[0]]["peer_present"] = False
    other = threading.Thread(target=plug.driver.join, args=(NID, EID, "/var/run/docker/netns/y", {}))
    remove = plug.dataplane.delete_endpoint

    def second_join_meanwhile(name):
        remove(name)
        if other.ident is None:
            other.start()
            other.join(timeout=1)

    monkeypatch.setattr(plug.dataplane, "delete_endpoint", second_join_meanwhile)
    plug.driver.join(NID, EID, "/var/run/docker/netns/x", {})
    other.join(timeout=10)
    assert len(plug.dataplane.called("ensure_endpoint")) == 2      # CreateEndpoint's, then one repair
    assert list(plug.dataplane.links) == [veth_names(EID)[0]]


def test_a_pool_released_while_its_network_is_created_is_kept(plug, monkeypatch):
    """CreateNetwork lands between ReleasePool's check for a network and its delete: the pool stays."""
    pool = pool_of(plug)
    tx, armed = plug.store.tx, [True]

    def create_first():
        if armed:
            armed.clear()
            plug.driver.create_network(NID, {GENERIC: {}}, [{"Pool": pool}], [])
        return tx()

    monkeypatch.setattr(plug.store, "tx", create_first)
    plug.ipam.release_pool(pool)
    assert plug.store.network(NID) is not None
    assert [row["pool_id"] for row in plug.store.pools()] == [pool]


def test_a_network_created_on_a_pool_released_meanwhile_is_a_conflict(plug, monkeypatch):
    """ReleasePool lands between CreateNetwork's look at the pools and its transaction: a 409 naming the
    pool, and no network (row or kernel) on a pool that is gone."""
    pool = pool_of(plug)
    pools = plug.store.pools

    def released_after_reading():
        rows = pools()
        plug.ipam.release_pool(pool)
        return rows

    monkeypatch.setattr(plug.store, "pools", released_after_reading)
    with pytest.raises(Conflict, match=f"pool {pool} was released meanwhile"):
        plug.driver.create_network(NID, {GENERIC: {}}, [{"Pool": pool}], [])
    assert plug.store.network(NID) is None and not plug.dataplane.called("ensure_network")


def test_the_datapath_pass_never_rebuilds_a_network_deleted_while_it_waited(tmp_path):
    """The pass read the store, then waited for the network's lock while DeleteNetwork ran: it must not
    put the deleted network back."""
    plug = make_plugin(tmp_path)
    create(plug)
    nets = [(spec_of(n), []) for n in plug.store.networks()]
    plug.dataplane.networks.clear()                 # looks broken to the pass
    plug.store.delete_network(NID)                  # ... and is deleted before the pass holds its lock
    lock_for = plug.driver.reconciler._lock_for({NID[:12]: NID})
    from vpcnet.datapath.spec import NetworkGone
    with pytest.raises(NetworkGone):
        with lock_for(nets[0][0]):
            pass


# -- what Docker sends, in the forms it sends it ------------------------------------------------------------
EVIL = "a1b2\n-A FORWARD -j ACCEPT\n" + "0" * 40
INJECTED = "x\n2024-01-01 00:00:00 INFO vpcnet: forged line " + "y" * 100_000


@pytest.mark.parametrize("nid", [EVIL, NID.upper(), NID[:-1], NID + "0", "c0ffee-" + NID[7:], NID + "\n",
                                 "X7Y1K2M3N4P5Q6R7S8T9U0V1W", "x7y1k2m3n4p5q6r7s8t9u0v1", "x7y1k2m3n4p5q6r7s8t9u0v1w_"])
def test_create_network_refuses_an_id_docker_never_makes_before_touching_anything(plug, nid):
    pool = pool_of(plug)
    with pytest.raises(InvalidRequest, match="^NetworkID .* is not an id Docker makes") as info:
        create(plug, nid=nid, pool=pool)
    assert "\n" not in str(info.value)
    assert plug.store.networks() == [] and plug.dataplane.calls == []


@pytest.mark.parametrize("nid", ["x7y1k2m3n4p5q6r7s8t9u0v1w", "0" * 25, "f" * 64])
def test_swarm_and_local_network_ids_are_accepted(plug, nid):
    net = create(plug, nid=nid)
    assert net.bridge == bridge_name(nid) == f"vpc-{nid[:11]}"
    endpoint(plug, nid=nid)
    assert plug.driver.join(nid, EID, "/var/run/docker/netns/default", {})["Gateway"] == net.gateway


def test_every_endpoint_call_refuses_a_malformed_endpoint_id_and_changes_nothing(plug):
    create(plug)
    endpoint(plug)
    before = plug.snapshot()
    d = plug.driver
    calls = {"create_endpoint": lambda eid: d.create_endpoint(NID, eid, {"Address": "10.200.0.9/24"}, {}),
             "endpoint_info": lambda eid: d.endpoint_info(NID, eid),
             "join": lambda eid: d.join(NID, eid, "/var/run/docker/netns/0123456789ab", {}),
             "leave": lambda eid: d.leave(NID, eid),
             "program_external_connectivity": lambda eid: d.program_external_connectivity(NID, eid, {}),
             "revoke_external_connectivity": lambda eid: d.revoke_external_connectivity(NID, eid),
             "delete_endpoint": lambda eid: d.delete_endpoint(NID, eid)}
    for name, call in calls.items():
        for eid in (EID.upper(), EID + "\n", EVIL, "x7y1k2m3n4p5q6r7s8t9u0v1w"):     # a swarm *network* id form too
            with pytest.raises(InvalidRequest, match="^EndpointID .* is not an id Docker makes") as info:
                call(eid)
            assert "\n" not in str(info.value), name
    assert plug.snapshot() == before


@pytest.mark.parametrize("key", ["0123456789ab", "/var/run/docker/netns/0123\n-A FORWARD -j ACCEPT",
                                 "/var/run/docker/netns/", "/var/run/docker/netns/../\x00", "/" + "x" * 5000])
def test_join_refuses_a_sandbox_key_that_is_no_sandbox_path(plug, key):
    create(plug)
    endpoint(plug)
    with pytest.raises(InvalidRequest, match="^SandboxKey .* is not a sandbox path Docker makes") as info:
        plug.driver.join(NID, EID, key, {})
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


@pytest.mark.parametrize("case", ["mtu", "mode", "unknown option", "ifname", "mac", "address"])
def test_a_refusal_quotes_what_it_was_sent_on_one_short_line(plug, case):
    """A message names the value it refuses, escaped and cut: no newline into a log, no 100 kB echo."""
    pool = pool_of(plug)
    if case in ("mtu", "mode", "unknown option"):
        generic = {"mtu": {MTU_OPTION: INJECTED}, "mode": {MODE_OPTION: INJECTED}, "unknown option": {INJECTED: "1"}}
        with pytest.raises(InvalidRequest) as info:
            create(plug, pool=pool, generic=generic[case])
    else:
        create(plug, pool=pool)
        interface = {"Address": "10.200.0.9/24", "MacAddress": INJECTED if case == "mac" else ""}
        if case == "address":
            interface["Address"] = INJECTED
        options = {"com.docker.network.endpoint.ifname": INJECTED} if case == "ifname" else {}
        with pytest.raises(InvalidRequest) as info:
            plug.driver.create_endpoint(NID, EID, interface, options)
    message = str(info.value)
    assert "'x\\n2024-01-01 00:00:00 INFO vpcnet: forged line" in message, message[:300]
    assert "\n" not in message and len(message) < 400 and f"({len(INJECTED)} characters)" in message, message[:500]


# -- IPv6 ---------------------------------------------------------------------------------------------
def dual_stack(plug, mode="routed"):
    pool4, pool6 = pool_of(plug), plug.ipam.request_pool(v6=True)["PoolID"]
    plug.driver.create_network(NID, {GENERIC: {MODE_OPTION: mode}, "com.docker.network.enable_ipv6": True},
                               [{"Pool": pool4, "Gateway": ""}], [{"Pool": pool6, "Gateway": ""}])
    return plug.store.network(NID), pool6


@pytest.mark.parametrize("generic,uplink", [({MTU_OPTION: "1279"}, 1500), ({}, 1200)])
def test_an_ipv6_network_below_ipv6s_minimum_mtu_is_refused_at_creation(tmp_path, generic, uplink):
    """IPv6 needs links of 1280 bytes or more: a dual-stack network with a smaller MTU (asked for, or the
    uplink's) is refused when it is made, naming the MTU, instead of refusing each of its containers."""
    plug = make_plugin(tmp_path, dataplane=FakeDataplane(uplink=uplink))
    pool4, pool6 = pool_of(plug), plug.ipam.request_pool(v6=True)["PoolID"]
    with pytest.raises(InvalidRequest, match="needs an MTU of at least 1280") as info:
        plug.driver.create_network(NID, {GENERIC: generic, "com.docker.network.enable_ipv6": True},
                                   [{"Pool": pool4, "Gateway": ""}], [{"Pool": pool6, "Gateway": ""}])
    assert str(uplink if not generic else 1279) in str(info.value) and MTU_OPTION in str(info.value)
    assert plug.store.networks() == [] and plug.dataplane.networks == {}
    assert create(plug, generic={MTU_OPTION: "1279"}).mtu == 1279, "IPv4 alone takes it"


@pytest.mark.parametrize("mode", ["routed", "ebpf", "bridge"])
def test_dual_stack_network_endpoint_and_join(plug, mode):
    """--ipv6: the network keeps its IPv6 block; an endpoint gets its IPv6 address on the host (routed path,
    ebpf networks too; bridge mode: the bridge) and Join gives the container its host link's own link-local
    address as its IPv6 gateway, on its interface, and the IPv6 cluster CIDR through it; in bridge mode also
    the block on the link, so the network's
    containers resolve each other on the bridge."""
    assert plug.driver.gw_alloc_check({"com.docker.network.enable_ipv6": True, GENERIC: {MODE_OPTION: mode}}) \
        == {"SkipIPv4": False, "SkipIPv6": False}
    net, pool6 = dual_stack(plug, mode)
    assert (net.host_cidr_v6, net.cluster_cidr_v6) == (pool6, plug.config.default_cluster_cidr_v6)
    assert net.gateway_v6 == str(ipaddress.IPv6Network(pool6).network_address + 1)
    address = plug.ipam.request_address(net.host_cidr)["Address"]
    address6 = plug.ipam.request_address(pool6)["Address"]
    plug.driver.create_endpoint(NID, EID, {"Address": address, "AddressIPv6": address6}, {})
    bare6 = address6.split("/")[0]
    assert plug.store.endpoint(EID).address_v6 == bare6
    assert plug.store.ipv6_endpoints() == [(veth_names(EID)[0], bare6)]
    assert plug.dataplane.called("ensure_endpoint_ipv6") == [("ensure_endpoint_ipv6", net.bridge, veth_names(EID)[0],
                                                              bare6)]
    answer = plug.driver.join(NID, EID, "/var/run/docker/netns/x", {})
    gateway6 = link_gateway(net.bridge if mode == "bridge" else veth_names(EID)[0])
    assert answer["GatewayIPv6"] == gateway6 and gateway6.startswith("fe80::1:") and answer["Gateway"] == net.gateway
    assert answer["StaticRoutes"][1:3] == [{"Destination": f"{gateway6}/128", "RouteType": 1},
                                           {"Destination": net.cluster_cidr_v6, "RouteType": 0, "NextHop": gateway6}]
    assert answer["StaticRoutes"][3:] == ([{"Destination": pool6, "RouteType": 1}] if mode == "bridge" else [])
    assert plug.dataplane.networks[net.bridge].host_cidr_v6 == pool6, "the datapath gets the network's IPv6 block"
    # the guard's desired state (vpcnet.cli.serve): a bridge-mode endpoint's rule names its bridge
    assert plug.store.ipv6_bridge_ports() == ({veth_names(EID)[0]: net.bridge} if mode == "bridge" else {})
    # the IPv6 pool is the network's: not released under it, and a second network cannot take the block
    assert plug.ipam.release_pool(pool6) == {} and pool6 in [p["pool_id"] for p in plug.store.pools()]
    # Docker releases the IPv6 address of a running container (IPv6 turned off by sysctl): the endpoint
    # keeps its IPv4 only, and nothing lets the IPv6 address through any more
    plug.dataplane.links[veth_names(EID)[0]]["peer_present"] = False       # joined: in the container
    plug.ipam.peer_on_host = plug.dataplane.link_exists
    plug.ipam.release_address(pool6, address6)
    assert plug.store.endpoint(EID).address == address.split("/")[0] and plug.store.endpoint(EID).address_v6 == ""
    assert plug.store.ipv6_endpoints() == []
    assert plug.dataplane.called("drop_endpoint_ipv6") == [("drop_endpoint_ipv6", veth_names(EID)[0], bare6)]
    assert bare6 not in plug.dataplane.routes and bare6 not in plug.store.addresses(pool6)


def test_ipv6_inputs_refused_clearly_and_nothing_left(plug):
    pool6 = plug.ipam.request_pool(v6=True)["PoolID"]
    with pytest.raises(InvalidRequest, match="is not a vpcnet IPv6 pool"):
        plug.driver.create_network(NID, {GENERIC: {MODE_OPTION: "routed"}}, [{"Pool": pool_of(plug)}],
                                   [{"Pool": "fd99::/64"}])
    with pytest.raises(InvalidRequest, match="one IPv6 pool"):
        plug.driver.create_network(NID, {GENERIC: {MODE_OPTION: "routed"}}, [{"Pool": pool_of(plug)}],
                                   [{"Pool": pool6}, {"Pool": pool6}])
    assert plug.store.networks() == [] and plug.dataplane.networks == {}
    net, pool6 = dual_stack(plug)
    address = plug.ipam.request_address(net.host_cidr)["Address"]
    for bad, why in (("fd99::5/128", "outside the network's IPv6 block"), ("nope", "not an IPv6 CIDR address"),
                     ("10.1.2.3/24", "not an IPv6 CIDR address")):
        with pytest.raises(InvalidRequest, match=why):
            plug.driver.create_endpoint(NID, EID, {"Address": address, "AddressIPv6": bad}, {})
    assert plug.store.endpoints() == [] and plug.dataplane.links == {}
    # an IPv4-only network refuses an IPv6 address
    create(plug, nid=NID2, pool=pool_of(plug, "10.201.0.0/16"), generic={MODE_OPTION: "routed"})
    address2 = plug.ipam.request_address(plug.store.network(NID2).host_cidr)["Address"]
    with pytest.raises(InvalidRequest, match="has no IPv6"):
        plug.driver.create_endpoint(NID2, EID2, {"Address": address2, "AddressIPv6": "fd00::5/128"}, {})
    assert plug.store.endpoints() == []


# -- IPv6-only networks (--ipv6 --ipv4=false, Docker 28+) ----------------------------------------------------
V6_ONLY = {"com.docker.network.enable_ipv4": False, "com.docker.network.enable_ipv6": True}


def ipv6_only(plug, nid=NID, mode="routed", subnet="", **options):
    pool6 = plug.ipam.request_pool(pool=subnet, v6=True)["PoolID"]
    plug.driver.create_network(nid, {GENERIC: {MODE_OPTION: mode}, **V6_ONLY, **options}, [],
                               [{"Pool": pool6, "Gateway": ""}])
    return plug.store.network(nid), pool6


@pytest.mark.parametrize("mode", ["routed", "ebpf"])
def test_ipv6_only_network_endpoint_join_and_removal(plug, mode):
    """--ipv4=false: no IPv4 pool comes (empty IPv4Data); the network row has only its IPv6 block, an endpoint
    only its IPv6 address (no /32 route, no IPv4 program), Join answers no IPv4 gateway, the host veth's own
    link-local address as the IPv6 one and only the IPv6 cluster CIDR through it; -p is refused; removal
    leaves nothing."""
    assert plug.driver.gw_alloc_check({**V6_ONLY, GENERIC: {MODE_OPTION: mode}}) == {"SkipIPv4": False,
                                                                                      "SkipIPv6": False}
    net, pool6 = ipv6_only(plug, mode=mode)
    assert (net.host_cidr, net.gateway, net.cluster_cidr) == ("", "", "")
    assert (net.host_cidr_v6, net.cluster_cidr_v6) == (pool6, plug.config.default_cluster_cidr_v6)
    assert spec_of(net).ipv4 is False and net.bridge in plug.dataplane.networks
    addresses = []
    for eid in (EID, EID2):
        address6 = plug.ipam.request_address(pool6)["Address"]
        answer = plug.driver.create_endpoint(NID, eid, {"AddressIPv6": address6}, {})
        bare6 = address6.split("/")[0]
        assert answer["Interface"]["MacAddress"] == mac_for(bare6)
        assert (plug.store.endpoint(eid).address, plug.store.endpoint(eid).address_v6) == ("", bare6)
        addresses.append(bare6)
    assert plug.dataplane.routes == {a: veth_names(e)[0] for a, e in zip(addresses, (EID, EID2), strict=True)}
    assert plug.dataplane.programs == {} and all("route" not in plug.dataplane.links[veth_names(e)[0]]
                                                 for e in (EID, EID2))
    answer = plug.driver.join(NID, EID, "/var/run/docker/netns/x", {})
    gateway6 = link_gateway(veth_names(EID)[0])
    assert "Gateway" not in answer and answer["GatewayIPv6"] == gateway6
    assert answer["StaticRoutes"] == [{"Destination": f"{gateway6}/128", "RouteType": 1},
                                      {"Destination": net.cluster_cidr_v6, "RouteType": 0, "NextHop": gateway6}]
    # a gateway of each link's own: one container's two interfaces never share one (Docker routes by next hop)
    gateway6_2 = plug.driver.join(NID, EID2, "/var/run/docker/netns/x", {})["GatewayIPv6"]
    assert gateway6_2 == link_gateway(veth_names(EID2)[0]) != gateway6
    portmap = {"com.docker.network.portmap": [{"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080,
                                               "HostPortEnd": 8080}]}
    with pytest.raises(InvalidRequest, match="is IPv6-only .*publishes ports"):
        plug.driver.program_external_connectivity(NID, EID, portmap)
    assert plug.store.ports() == []
    assert plug.driver.program_external_connectivity(NID, EID, {}) == {}
    # a replayed CreateEndpoint gets the same answer; another address for the same id is a conflict
    assert plug.driver.create_endpoint(NID, EID, {"AddressIPv6": f"{addresses[0]}/128"}, {})["Interface"]
    with pytest.raises(Conflict, match=f"already exists with address {addresses[0]}"):
        plug.driver.create_endpoint(NID, EID, {"AddressIPv6": f"{addresses[1]}/128"}, {})
    # a replayed CreateNetwork is accepted
    plug.driver.create_network(NID, {GENERIC: {MODE_OPTION: mode}, **V6_ONLY}, [], [{"Pool": pool6}])
    for eid, bare6 in zip((EID, EID2), addresses, strict=True):
        plug.driver.delete_endpoint(NID, eid)
        plug.ipam.release_address(pool6, bare6)
    plug.driver.delete_network(NID)
    plug.ipam.release_pool(pool6)
    assert plug.store.networks() == [] and plug.store.endpoints() == [] and plug.store.pools() == []
    assert plug.dataplane.networks == {} and plug.dataplane.links == {} and plug.dataplane.routes == {}


def test_two_ipv6_only_networks_and_one_block_per_network(plug):
    """Several IPv6-only networks (rows without an IPv4 block) on one host, one per IPv6 cluster CIDR: a
    second network on the same IPv6 block is refused naming it and its holder."""
    net, pool6 = ipv6_only(plug)
    other, other6 = ipv6_only(plug, nid=NID2, subnet="fd77:1::/48")
    assert [n.network_id for n in plug.store.networks()] == [NID, NID2] and other6 != pool6
    with pytest.raises(Conflict, match=f"host CIDR {pool6} .* already used by network {NID[:12]}"):
        plug.driver.create_network("ab" * 32, {GENERIC: {MODE_OPTION: "routed"}, **V6_ONLY}, [], [{"Pool": pool6}])
    assert [n.network_id for n in plug.store.networks()] == [NID, NID2]
    # a network deleted with its endpoint still there: the leftover path removes the veth, forgets no "" peer
    plug.driver.create_endpoint(NID2, EID2, {"AddressIPv6": plug.ipam.request_address(other6)["Address"]}, {})
    plug.dataplane.calls.clear()
    plug.driver.delete_network(NID2)
    assert plug.store.leftovers() == [] and veth_names(EID2)[0] not in plug.dataplane.links
    assert all("" not in args[0] for name, *args in plug.dataplane.calls if name == "forget_peers")


def test_ipv6_only_inputs_refused_clearly_and_nothing_left(plug):
    pool4, pool6 = pool_of(plug), plug.ipam.request_pool(v6=True)["PoolID"]
    cases = [({**V6_ONLY, GENERIC: {MODE_OPTION: "routed"}}, [{"Pool": pool4}], [{"Pool": pool6}],
              r"--ipv4=false, yet Docker sent 1 IPv4 pool\(s\)"),
             ({**V6_ONLY, GENERIC: {MODE_OPTION: "routed"}}, [], [], "needs an IPv6 pool: add --ipv6"),
             ({**V6_ONLY, GENERIC: {MODE_OPTION: "bridge"}}, [], [{"Pool": pool6}], "needs -o vpcnet.mode=routed"),
             ({**V6_ONLY, GENERIC: {MODE_OPTION: "routed"}}, [], [{"Pool": "fd99::/80"}], "not a vpcnet IPv6 pool"),
             ({GENERIC: {MODE_OPTION: "routed"}}, [{"Pool": pool6}], [], r"is not a vpcnet pool \(IPv4\)")]
    for options, data4, data6, why in cases:
        with pytest.raises(InvalidRequest, match=why):
            plug.driver.create_network(NID, options, data4, data6)
        assert plug.store.networks() == [] and plug.dataplane.networks == {}
    net, pool6 = ipv6_only(plug)
    for interface, why in (({"Address": "10.200.0.5/24"}, "is IPv6-only .* no IPv4 addresses"),
                           ({}, "without an IPv6 address"),
                           ({"AddressIPv6": "fd99::5/128"}, "outside the network's IPv6 block")):
        with pytest.raises(InvalidRequest, match=why):
            plug.driver.create_endpoint(NID, EID, interface, {})
    assert plug.store.endpoints() == [] and plug.dataplane.links == {}


def test_internal_dual_stack_and_ipv6_only_networks_are_made(plug):
    """--internal --ipv6 (refused before): the network is stored internal with its IPv6 block (the
    datapath keeps its IPv6 inside the IPv6 cluster CIDR: vpcnet.datapath.ipv6)."""
    pool4, pool6 = pool_of(plug), plug.ipam.request_pool(v6=True)["PoolID"]
    plug.driver.create_network(NID, {GENERIC: {MODE_OPTION: "routed"}, INTERNAL_OPTION: True,
                                     "com.docker.network.enable_ipv6": True}, [{"Pool": pool4}], [{"Pool": pool6}])
    net = plug.store.network(NID)
    assert net.internal and net.host_cidr_v6 == pool6
    assert spec_of(net).host_cidr_v6 == pool6 and spec_of(net).cluster_cidr_v6 == net.cluster_cidr_v6
    other, _ = ipv6_only(plug, nid=NID2, subnet="fd77:1::/48", **{INTERNAL_OPTION: True})
    assert other.internal and other.host_cidr == ""


def test_an_ipv6_address_is_one_endpoints(plug):
    """Two endpoints given the same IPv6 address (distinct IPv4 ones): the second is refused, naming the holder,
    and leaves nothing; the same endpoint id again with another IPv6 address is refused too."""
    net, pool6 = dual_stack(plug)
    a4, b4 = (plug.ipam.request_address(net.host_cidr)["Address"] for _ in range(2))
    a6, other6 = (plug.ipam.request_address(pool6)["Address"] for _ in range(2))
    plug.driver.create_endpoint(NID, EID, {"Address": a4, "AddressIPv6": a6}, {})
    state = plug.snapshot()
    with pytest.raises(Conflict, match=f"IPv6 address {a6.split('/')[0]} is already used by endpoint {EID[:12]}"):
        plug.driver.create_endpoint(NID, EID2, {"Address": b4, "AddressIPv6": a6}, {})
    with pytest.raises(Conflict, match=f"already exists with address {a4.split('/')[0]} and {a6.split('/')[0]}"):
        plug.driver.create_endpoint(NID, EID, {"Address": a4, "AddressIPv6": other6}, {})
    assert plug.snapshot() == state
