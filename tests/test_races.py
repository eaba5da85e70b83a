"""Racing calls against the real plugin (`vpcnet serve`: gunicorn on a unix socket, two workers, threads)
and the real kernel, and against the real Docker engine: concurrent CreateNetwork / CreateEndpoint /
Join / Delete calls on the same objects never answer 500, never configure one object twice, never
remove another endpoint's state, and leave nothing behind (links, routes, addresses, store rows,
iptables chains). The unit-level races (tests/test_driver.py, test_ipam.py) use the fake dataplane;
these use the real one, across processes."""
from __future__ import annotations

import concurrent.futures
import re
import uuid

import pytest
from conftest import run, unique
from test_dataplane import host  # noqa: F401

RACERS = 8
SANDBOX = "/var/run/docker/netns/race"


def burst(calls) -> list:
    """Run the (function, args...) tuples all at once; their results, in order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda c: c[0](*c[1:]), calls))


def kernel(ns: str, tag: str) -> dict:
    """What the kernel holds of network `tag` and of any endpoint: links, routes, addresses, chains."""
    links = re.findall(r"^\d+: ([^:@]+)", run(["ip", "-n", ns, "-o", "link"]).stdout, re.M)
    return {"links": sorted(name for name in links if name.startswith(("vpc-", "vpp-", "vh", "vc"))),
            "routes": run(["ip", "-n", ns, "route", "show", "proto", "static"]).stdout.splitlines()
            + [r for r in run(["ip", "-n", ns, "route"]).stdout.splitlines() if "/32" in r or "vpc-" in r],
            "addresses": [a for a in run(["ip", "-n", ns, "-o", "addr"]).stdout.splitlines() if "vpc-" in a],
            "chains": [line for line in run(["ip", "netns", "exec", ns, "iptables-save"]).stdout.splitlines()
                       if tag in line],
            # ebpf mode: the network's program on the uplink (the host's default route), one per network
            "programs": [line for line in run(["ip", "netns", "exec", ns, "tc", "filter", "show", "dev", "uplink0",
                                               "ingress"]).stdout.splitlines() if f"vpcnet-{tag}" in line]}


def endpoint_programs(ns: str, veth: str, classic: bool = False) -> list[str]:
    """The eBPF filters on an endpoint's host veth's ingress (ebpf mode: its container program; the other
    modes: the peer counting program, VPCNET_PEER_METRICS being on by default); with `classic`, the classic
    BPF ones instead (bridge mode: the anti-spoofing guard)."""
    return [line for line in run(["ip", "netns", "exec", ns, "tc", "filter", "show", "dev", veth, "ingress"],
                                 check=False).stdout.splitlines()
            if " bpf " in line and " handle " in line and (" bytecode " in line) == classic]


def no_500(answers: list[tuple[int, dict]], what: str) -> list[int]:
    statuses = [status for status, _ in answers]
    assert 500 not in statuses and all(status < 500 for status in statuses), (what, answers)
    return statuses


@pytest.mark.root
@pytest.mark.parametrize("mode", ["bridge", "routed", "ebpf"])
def test_racing_raw_calls_on_the_same_ids_against_the_real_plugin(plugin_factory, host, mode):  # noqa: F811
    plugin = plugin_factory({"VPCNET_WORKERS": "2", "VPCNET_THREADS": "8"}, netns=host)
    status, pool = plugin.call("/IpamDriver.RequestPool", {"Pool": ""})
    assert status == 200, pool
    nid = uuid.uuid4().hex * 2
    tag = nid[:12]
    create_net = {"NetworkID": nid, "Options": {"com.docker.network.generic": {"vpcnet.mode": mode}},
                  "IPv4Data": [{"Pool": pool["Pool"], "Gateway": pool["Data"]["com.docker.network.gateway"]}]}
    statuses = no_500(burst([(plugin.call, "/NetworkDriver.CreateNetwork", create_net)] * RACERS),
                      "CreateNetwork")
    assert statuses.count(200) >= 1, statuses
    assert len(plugin.status()["networks"]) == 1
    state = kernel(host, tag)
    assert len([link for link in state["links"] if link.startswith("vpc-")]) == 1
    assert len(state["programs"]) == (1 if mode == "ebpf" else 0), state["programs"]

    # Two endpoints, each created and joined by several racers at once.
    eids = [uuid.uuid4().hex * 2 for _ in range(2)]
    addrs = []
    for _ in eids:
        status, answer = plugin.call("/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})
        assert status == 200, answer
        addrs.append(answer["Address"])
    calls = []
    for eid, addr in zip(eids, addrs, strict=True):
        calls += [(plugin.call, "/NetworkDriver.CreateEndpoint",
                   {"NetworkID": nid, "EndpointID": eid, "Interface": {"Address": addr}})] * (RACERS // 2)
    statuses = no_500(burst(calls), "CreateEndpoint")
    assert statuses.count(200) >= 2, statuses
    no_500(burst([(plugin.call, "/NetworkDriver.Join", {"NetworkID": nid, "EndpointID": eid,
                                                         "SandboxKey": SANDBOX}) for eid in eids] * 4), "Join")
    state = kernel(host, tag)
    host_veths = [link for link in state["links"] if link.startswith("vh")]
    assert len(host_veths) == 2, state                              # one veth pair per endpoint

    # Both pairs gone (a reboot, a sandbox that took them along): racing Joins re-make each pair once.
    for veth in host_veths:
        run(["ip", "-n", host, "link", "del", veth])
    no_500(burst([(plugin.call, "/NetworkDriver.Join", {"NetworkID": nid, "EndpointID": eid,
                                                         "SandboxKey": SANDBOX}) for eid in eids] * 4), "Join, repair")
    state = kernel(host, tag)
    assert [link for link in state["links"] if link.startswith("vh")] == host_veths, state
    assert len([link for link in state["links"] if link.startswith("vc")]) == 2, state
    for veth in host_veths:     # one program each: ebpf's container program (it counts peers too), else
        programs = endpoint_programs(host, veth)                     # the peer counting program
        assert len(programs) == 1, (veth, programs)
        assert f"name {'vpcnet_ctr' if mode == 'ebpf' else 'vpcnet_count'} " in programs[0], (veth, programs)
        guards = endpoint_programs(host, veth, classic=True)         # bridge mode: its anti-spoofing guard
        assert len(guards) == (mode == "bridge"), (veth, guards)
    endpoints = plugin.status()["networks"][0]["endpoints"]
    assert sorted(ep["address"] for ep in endpoints) == sorted(a.split("/")[0] for a in addrs)
    if mode != "bridge":        # routed and ebpf: a /32 route per endpoint
        for addr in addrs:
            ip = addr.split("/")[0]
            assert len([r for r in state["routes"] if r.startswith(f"{ip} ")]) == 1, state["routes"]

    # A third and a fourth endpoint racing for one address: one wins, the other is refused (not a 500),
    # and the loser's undo leaves the winner's veth and route.
    status, answer = plugin.call("/IpamDriver.RequestAddress", {"PoolID": pool["PoolID"]})
    shared = answer["Address"]
    rivals = [uuid.uuid4().hex * 2 for _ in range(2)]
    answers = burst([(plugin.call, "/NetworkDriver.CreateEndpoint",
                      {"NetworkID": nid, "EndpointID": eid, "Interface": {"Address": shared}})
                     for eid in rivals for _ in range(RACERS // 2)])
    statuses = no_500(answers, "CreateEndpoint, one address")
    winners = {eid for eid, (status, _) in zip([e for e in rivals for _ in range(RACERS // 2)], answers, strict=True)
               if status == 200}
    assert len(winners) == 1, answers
    (winner,) = winners
    loser = next(e for e in rivals if e != winner)
    state = kernel(host, tag)
    assert len([link for link in state["links"] if link.startswith("vh")]) == 3, state
    if mode != "bridge":
        ip = shared.split("/")[0]
        assert len([r for r in state["routes"] if r.startswith(f"{ip} ")]) == 1, state["routes"]

    # Deleting one endpoint (several racers) while others re-create and delete another: the rest stays.
    keep = eids[1]
    calls = [(plugin.call, "/NetworkDriver.DeleteEndpoint", {"NetworkID": nid, "EndpointID": eids[0]})] * 4
    calls += [(plugin.call, "/NetworkDriver.DeleteEndpoint", {"NetworkID": nid, "EndpointID": winner})] * 2
    calls += [(plugin.call, "/NetworkDriver.DeleteEndpoint", {"NetworkID": nid, "EndpointID": loser})] * 2
    calls += [(plugin.call, "/NetworkDriver.CreateEndpoint",
               {"NetworkID": nid, "EndpointID": keep, "Interface": {"Address": addrs[1]}})] * 2
    no_500(burst(calls), "DeleteEndpoint")
    state = kernel(host, tag)
    assert [link for link in state["links"] if link.startswith("vh")] == \
        [link for link in host_veths if link[2:13] == keep[:11]], state
    assert [ep["address"] for ep in plugin.status()["networks"][0]["endpoints"]] == [addrs[1].split("/")[0]]
    if mode != "bridge":
        ip = addrs[1].split("/")[0]
        assert len([r for r in state["routes"] if r.startswith(f"{ip} ")]) == 1, state["routes"]

    # Then everything goes, by racers: nothing is left anywhere.
    burst([(plugin.call, "/NetworkDriver.DeleteEndpoint", {"NetworkID": nid, "EndpointID": keep})] * 4)
    no_500(burst([(plugin.call, "/NetworkDriver.DeleteNetwork", {"NetworkID": nid})] * RACERS), "DeleteNetwork")
    for addr in [*addrs, shared]:
        plugin.call("/IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": addr.split("/")[0]})
    plugin.call("/IpamDriver.ReleasePool", {"PoolID": pool["PoolID"]})
    assert plugin.status()["networks"] == []
    state = kernel(host, tag)
    assert state == {"links": [], "routes": [r for r in state["routes"] if "vpc-" not in r and "/32" not in r],
                     "addresses": [], "chains": [], "programs": []}, state
    assert " -> 500" not in plugin.log()


def ipv6_in_order(ns: str, status: dict) -> dict:
    """The IPv6 invariants after any fault, between the kernel of `ns` and the store (`vpcnet status`): each
    IPv6 endpoint has exactly one /128 route, over its own host veth, and no other /128 route of a vpcnet veth
    is left; no IPv6 address is held twice; the ip6tables guard is what the store's endpoints want; the IPv6
    published ports' DNAT rules are exactly the store's. Returns what it read (for more checks)."""
    from vpcnet.datapath.firewall import IPV6_CHAIN, IPV6_FORWARD_CHAIN, IPV6_RULES, parse_save
    from vpcnet.datapath.ipv6 import guard_rules

    endpoints = [ep for n in status["networks"] for ep in n["endpoints"]]
    wanted = sorted(f"{ep['address_v6']} dev {ep['host_veth']}" for ep in endpoints if ep.get("address_v6"))
    v6 = [ep["address_v6"] for ep in endpoints if ep.get("address_v6")]
    assert len(v6) == len(set(v6)), f"an IPv6 address held twice: {sorted(v6)}"
    routes = [" ".join(r.split()[:3]) for r in run(["ip", "-n", ns, "-6", "route", "show"]).stdout.splitlines()
              if " dev vh" in r and "fe80::" not in r]
    assert sorted(routes) == wanted, f"/128 routes {routes}, the store's endpoints want {wanted}"
    saved = parse_save(run(["ip", "netns", "exec", ns, "ip6tables-save"]).stdout)
    guard = saved.chain("raw", IPV6_CHAIN)
    if guard is not None:             # written once the plugin started; with IPv6 endpoints, their rules
        assert guard == [*guard_rules(bool(v6)), *IPV6_RULES] or (not v6 and guard[-len(IPV6_RULES):] == IPV6_RULES), \
            guard
    if v6:
        assert saved.chain("filter", IPV6_FORWARD_CHAIN), "no IPv6 forwarding rules for the IPv6 endpoints"
    dnat = sorted(r.split("--to-destination ")[1] for chain, rules in saved.chains("nat").items()
                  if chain.startswith("VPCNET-P-") for r in rules)
    ports = sorted(f"[{ep['address_v6']}]:{p['container_port']}" for ep in endpoints for p in ep["ports"]
                   if p["family"] == "ipv6")
    assert dnat == ports, f"ip6tables DNAT to {dnat}, the store publishes {ports}"
    return {"routes": routes, "dnat": dnat}


@pytest.mark.root
def test_racing_dual_stack_calls_leave_one_route_per_ipv6_address_and_the_guard_matching(
        plugin_factory, host):  # noqa: F811
    """Dual-stack (routed): racing CreateNetwork, CreateEndpoint (the same ids; two ids for one IPv6
    address), ProgramExternalConnectivity with IPv6 ports, Revoke and deletes, across two workers: never a
    500, one /128 route per IPv6 address, no IPv6 address twice, the guard and the IPv6 DNAT rules always
    what the store holds, and nothing left at the end."""
    plugin = plugin_factory({"VPCNET_WORKERS": "2", "VPCNET_THREADS": "8"}, netns=host)
    status, pool = plugin.call("/IpamDriver.RequestPool", {"Pool": ""})
    status6, pool6 = plugin.call("/IpamDriver.RequestPool", {"Pool": "", "V6": True})
    assert status == status6 == 200, (pool, pool6)
    nid = uuid.uuid4().hex * 2
    create_net = {"NetworkID": nid, "Options": {"com.docker.network.generic": {"vpcnet.mode": "routed"},
                                                "com.docker.network.enable_ipv6": True},
                  "IPv4Data": [{"Pool": pool["Pool"], "Gateway": pool["Data"]["com.docker.network.gateway"]}],
                  "IPv6Data": [{"Pool": pool6["Pool"], "Gateway": pool6["Data"]["com.docker.network.gateway"]}]}
    no_500(burst([(plugin.call, "/NetworkDriver.CreateNetwork", create_net)] * RACERS), "CreateNetwork")
    assert plugin.status()["networks"][0]["host_cidr_v6"] == pool6["Pool"]

    def address(pool_id: str) -> str:
        status, answer = plugin.call("/IpamDriver.RequestAddress", {"PoolID": pool_id})
        assert status == 200, answer
        return answer["Address"]

    eids = [uuid.uuid4().hex * 2 for _ in range(2)]
    pairs = [(address(pool["PoolID"]), address(pool6["PoolID"])) for _ in eids]
    calls = [(plugin.call, "/NetworkDriver.CreateEndpoint",
              {"NetworkID": nid, "EndpointID": eid, "Interface": {"Address": a4, "AddressIPv6": a6}})
             for eid, (a4, a6) in zip(eids, pairs, strict=True) for _ in range(RACERS // 2)]
    assert no_500(burst(calls), "CreateEndpoint").count(200) >= 2
    ipv6_in_order(host, plugin.status())

    # two endpoints racing for one IPv6 address (distinct IPv4 ones): one wins, the other is refused
    shared6 = address(pool6["PoolID"])
    rivals = [(uuid.uuid4().hex * 2, address(pool["PoolID"])) for _ in range(2)]
    answers = burst([(plugin.call, "/NetworkDriver.CreateEndpoint",
                      {"NetworkID": nid, "EndpointID": eid, "Interface": {"Address": a4, "AddressIPv6": shared6}})
                     for eid, a4 in rivals for _ in range(RACERS // 2)])
    no_500(answers, "CreateEndpoint, one IPv6 address")
    winners = {eid for (eid, _), (status, _) in zip([r for r in rivals for _ in range(RACERS // 2)], answers,
                                                    strict=True) if status == 200}
    assert len(winners) == 1, answers
    ipv6_in_order(host, plugin.status())

    # racing Program (IPv6 ports, Docker 28's [::] beside 0.0.0.0) and Revoke on one endpoint, Program on another
    portmap = {"com.docker.network.portmap": [
        {"Proto": 6, "IP": "", "Port": 80, "HostIP": ip, "HostPort": 18580, "HostPortEnd": 18580}
        for ip in ("0.0.0.0", "::")]}
    other = {"com.docker.network.portmap": [{"Proto": 17, "IP": "", "Port": 53, "HostIP": "::", "HostPort": 18553,
                                             "HostPortEnd": 18553}]}
    calls = [(plugin.call, "/NetworkDriver.ProgramExternalConnectivity",
              {"NetworkID": nid, "EndpointID": eids[0], "Options": portmap})] * 3
    calls += [(plugin.call, "/NetworkDriver.RevokeExternalConnectivity", {"NetworkID": nid, "EndpointID": eids[0]})] * 2
    calls += [(plugin.call, "/NetworkDriver.ProgramExternalConnectivity",
               {"NetworkID": nid, "EndpointID": eids[1], "Options": other})] * 3
    no_500(burst(calls), "Program/Revoke")
    state = ipv6_in_order(host, plugin.status())
    assert f"[{pairs[1][1].split('/')[0]}]:53" in state["dnat"]
    no_500(burst([(plugin.call, "/NetworkDriver.ProgramExternalConnectivity",
                   {"NetworkID": nid, "EndpointID": eids[0], "Options": portmap})] * 3), "Program")
    assert len(ipv6_in_order(host, plugin.status())["dnat"]) == 2

    for eid in [*eids, *winners]:
        no_500(burst([(plugin.call, "/NetworkDriver.DeleteEndpoint", {"NetworkID": nid, "EndpointID": eid})] * 3),
               "DeleteEndpoint")
    state = ipv6_in_order(host, plugin.status())
    assert state == {"routes": [], "dnat": []}, state
    no_500(burst([(plugin.call, "/NetworkDriver.DeleteNetwork", {"NetworkID": nid})] * RACERS), "DeleteNetwork")
    for a4, a6 in pairs:
        plugin.call("/IpamDriver.ReleaseAddress", {"PoolID": pool["PoolID"], "Address": a4.split("/")[0]})
        plugin.call("/IpamDriver.ReleaseAddress", {"PoolID": pool6["PoolID"], "Address": a6.split("/")[0]})
    assert plugin.status()["networks"] == []
    assert nid[:12] not in run(["ip", "netns", "exec", host, "ip6tables-save"]).stdout
    assert " -> 500" not in plugin.log()


@pytest.mark.docker
def test_racing_docker_run_rm_and_network_rm_on_one_network(plugin_factory, dock):
    """Concurrent `docker run` and `docker rm -f` on one network, then `docker network rm` racing the
    last runs: Docker may refuse (active endpoints) but the plugin never answers 500, each container has
    one veth and its own address, and once all is gone nothing is left."""
    plugin = plugin_factory({"VPCNET_WORKERS": "2"})
    net = dock.network_create(plugin, None, "-o", "vpcnet.mode=routed").name
    tag = dock("network", "inspect", net, "-f", "{{.Id}}").stdout.strip()[:12]
    names = [unique("race") for _ in range(6)]
    runs = burst([(lambda n=n: dock.run_container(net, name=n),) for n in names[:4]])
    assert all(r.returncode == 0 for r in runs)
    # two more start while two of the first are removed
    results = burst([(lambda n=n: dock.run_container(net, name=n),) for n in names[4:]]
                    + [(lambda n=n: dock("rm", "-f", n),) for n in names[:2]])
    assert all(r.returncode == 0 for r in results)
    alive = names[2:]
    ips = [dock.ip_of(n) for n in alive]
    assert len(set(ips)) == len(ips), ips
    endpoints = plugin.status()["networks"][0]["endpoints"]
    assert sorted(ep["address"] for ep in endpoints) == sorted(ips)
    veths = [link for link in re.findall(r"^\d+: ([^:@]+)", run(["ip", "-o", "link"]).stdout, re.M)
             if link.startswith("vh") and any(link[2:13] == ep["endpoint_id"][:11] for ep in endpoints)]
    assert len(veths) == len(alive), (veths, endpoints)
    routes = run(["ip", "route"]).stdout.splitlines()
    for ip in ips:
        assert len([r for r in routes if r.startswith(f"{ip} ")]) == 1, routes
    assert dock.exec(alive[0], "ping", "-c1", "-W2", ips[-1], check=False).returncode == 0

    # network rm while containers are removed and one more is started: Docker decides, vpcnet never 500s.
    last = unique("race")
    burst([(lambda: dock("network", "rm", net, check=False),), (lambda: dock.run_container(net, name=last,
                                                                                            check=False),)]
          + [(lambda n=n: dock("rm", "-f", n),) for n in alive])
    dock("rm", "-f", last, check=False)
    dock("network", "rm", net, check=False)
    assert net not in dock("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert plugin.status()["networks"] == []
    assert not [line for line in plugin.log().splitlines() if " -> 500" in line]
    assert tag not in run(["iptables-save"]).stdout
    assert not [link for link in re.findall(r"^\d+: ([^:@]+)", run(["ip", "-o", "link"]).stdout, re.M)
                if link.startswith("vpc-" + tag[:11])]
    assert not [r for r in run(["ip", "route"]).stdout.splitlines() if any(r.startswith(f"{ip} ") for ip in ips)]
