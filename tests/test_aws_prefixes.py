"""The `aws` prefix provider (vpcnet.cloud.aws.prefixes) over real HTTP against the EC2 stand-in
(tests/ec2_standin.py: moto's EC2 server behind a front that answers the prefix calls), and a fake IMDSv2.

Network safety: every URL here is 127.0.0.1; the metadata URL is a local fake or a closed local port.
"""
from __future__ import annotations

import http.server
import ipaddress
import threading

import boto3
import pytest
from ec2_standin import Ec2Standin, free_port

from vpcnet.cloud.aws.prefixes import AwsPrefixes
from vpcnet.cloud.prefixes import (
    IPV4_PREFIX_LEN,
    IPV6_PREFIX_LEN,
    InterfaceFull,
    NoFreePrefix,
    PrefixesUnsupported,
    make_prefix_provider,
)
from vpcnet.config import Config
from vpcnet.errors import Busy, Fatal, Retryable

REGION = "us-east-1"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzPREFIXzzKEY"
IMAGE = "ami-12c6146b"       # one of moto's built-in AMIs


@pytest.fixture(scope="module")
def standin():
    server = Ec2Standin(REGION).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    """Fake keys in the environment, no shared config files, no proxy: nothing that could reach AWS."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_EC2_METADATA_DISABLED", "AWS_DEFAULTS_MODE",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_ENDPOINT_URL", "HTTP_PROXY", "HTTPS_PROXY",
                "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


class Host:
    """A dual-stack VPC and subnet in moto, and one instance in it, made with boto3 straight to moto."""

    def __init__(self, standin: Ec2Standin, instance_type: str = "m5.large", subnet_cidr: str = "10.0.1.0/24"):
        self.standin = standin
        self.ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=standin.moto_url)
        vpc = self.ec2.create_vpc(CidrBlock="10.0.0.0/16", AmazonProvidedIpv6CidrBlock=True)["Vpc"]
        self.vpc = vpc["VpcId"]
        vpc56 = self.ec2.describe_vpcs(VpcIds=[self.vpc])["Vpcs"][0]["Ipv6CidrBlockAssociationSet"][0]["Ipv6CidrBlock"]
        self.subnet_v6 = str(next(ipaddress.IPv6Network(vpc56).subnets(new_prefix=64)))
        self.subnet_cidr = subnet_cidr
        self.subnet = self.ec2.create_subnet(VpcId=self.vpc, CidrBlock=subnet_cidr,
                                             Ipv6CidrBlock=self.subnet_v6)["Subnet"]["SubnetId"]
        described = self.ec2.run_instances(ImageId=IMAGE, MinCount=1, MaxCount=1, SubnetId=self.subnet,
                                           InstanceType=instance_type)["Instances"][0]
        self.instance = described["InstanceId"]
        self.interface = described["NetworkInterfaces"][0]["NetworkInterfaceId"]
        self.address = ipaddress.ip_address(described["PrivateIpAddress"])

    def config(self, **extra) -> Config:
        values = dict(provider="aws", aws_region=REGION, aws_instance_id=self.instance,
                      aws_network_interface_id=self.interface, aws_endpoint_url=self.standin.url,
                      aws_metadata_url=f"http://127.0.0.1:{free_port()}")   # closed: never used
        values.update(extra)
        return Config(**values)

    def listed(self) -> dict:
        """What moto's own DescribeNetworkInterfaces answers (through botocore, not through vpcnet)."""
        return self.ec2.describe_network_interfaces(NetworkInterfaceIds=[self.interface])["NetworkInterfaces"][0]

    def free_block(self) -> str:
        """A /28 of the subnet that holds no address in use (nor the addresses AWS reserves)."""
        net = ipaddress.IPv4Network(self.subnet_cidr)
        return str(next(b for b in list(net.subnets(new_prefix=28))[1:-1] if self.address not in b))


@pytest.fixture
def providers():
    made: list[AwsPrefixes] = []

    def make(config: Config) -> AwsPrefixes:
        made.append(AwsPrefixes(config))
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.fixture
def host(standin):
    return Host(standin)


# -- success paths --------------------------------------------------------------------------------
def test_ipv4_prefixes_are_assigned_listed_and_unassigned(host, providers):
    p = providers(host.config())
    assert p.interface_id() == host.interface
    before = p.describe()
    assert (before.ipv4, before.ipv6, before.ipv4_addresses, before.ipv6_addresses) == ((), (), 1, 0)

    got = p.assign(4, 2, "token-1")
    assert len(got) == 2 and len(set(got)) == 2
    for prefix in got:
        net = ipaddress.IPv4Network(prefix)
        assert net.prefixlen == IPV4_PREFIX_LEN and net.subnet_of(ipaddress.IPv4Network(host.subnet_cidr))
        assert host.address not in net
    assert sorted(p.describe().ipv4) == sorted(got) == sorted(host.standin.prefixes(host.interface, 4))
    # moto's own DescribeNetworkInterfaces lists them, in the shape botocore reads
    assert sorted(x["Ipv4Prefix"] for x in host.listed()["Ipv4Prefixes"]) == sorted(got)

    p.unassign(4, [got[0]])
    assert p.describe().ipv4 == (got[1],)
    p.unassign(4, [got[0], got[1]])            # one already gone: not an error, the other goes
    assert p.describe().ipv4 == ()
    p.unassign(4, [got[0]])                    # all gone: done
    p.unassign(4, [])


def test_ipv6_prefixes_are_assigned_listed_and_unassigned(host, providers):
    p = providers(host.config())
    got = p.assign(6, 1, "token-6")
    assert len(got) == 1
    net = ipaddress.IPv6Network(got[0])
    assert net.prefixlen == IPV6_PREFIX_LEN and net.subnet_of(ipaddress.IPv6Network(host.subnet_v6))
    held = p.describe()
    assert held.ipv6 == tuple(got) and held.ipv4 == ()
    assert [x["Ipv6Prefix"] for x in host.listed()["Ipv6Prefixes"]] == got
    p.unassign(6, got)
    assert p.describe().ipv6 == ()
    p.unassign(6, got)                          # gone: done


def test_the_interface_and_instance_type_come_from_metadata(host, providers, fake_imds):
    mac = "02:00:00:00:00:01"
    fake_imds.data.update({
        "/latest/meta-data/mac": mac,
        f"/latest/meta-data/network/interfaces/macs/{mac}/interface-id": host.interface,
        "/latest/meta-data/instance-type": "m5.large",
        "/latest/meta-data/placement/region": REGION,
    })
    p = providers(host.config(aws_network_interface_id="", aws_instance_id="", aws_region="",
                              aws_metadata_url=fake_imds.url))
    assert p.interface_id() == host.interface
    assert p.describe().interface_id == host.interface
    seen = len(host.standin.calls)
    assert p.capacity().instance_type == "m5.large"
    assert host.standin.calls[seen:] == ["DescribeInstanceTypes"]     # the type came from metadata


def test_without_metadata_the_interface_setting_is_named(host, providers):
    p = providers(host.config(aws_network_interface_id=""))
    with pytest.raises(Fatal) as info:
        p.interface_id()
    assert "VPCNET_AWS_NETWORK_INTERFACE_ID" in str(info.value)


def test_make_prefix_provider_chooses_the_aws_module(host):
    p = make_prefix_provider(host.config())
    try:
        assert isinstance(p, AwsPrefixes) and p.idempotent_assign is False
    finally:
        p.close()


# -- capacity -------------------------------------------------------------------------------------
def test_capacity_of_a_nitro_instance_type(host, providers):
    cap = providers(host.config()).capacity()
    # m5.large: 10 IPv4 addresses per interface (one is the primary) and 10 IPv6
    assert (cap.instance_type, cap.ipv4_prefixes, cap.ipv6_prefixes, cap.supported) == ("m5.large", 9, 10, True)


def test_capacity_of_a_xen_instance_type_says_no_and_why(standin, providers):
    xen = Host(standin, instance_type="t2.micro")
    cap = providers(xen.config()).capacity()
    assert cap.instance_type == "t2.micro" and not cap.supported
    assert (cap.ipv4_prefixes, cap.ipv6_prefixes) == (0, 0)
    assert "xen" in cap.reason and "Nitro" in cap.reason and "route-table" in cap.reason


def test_capacity_of_a_bare_metal_type_which_lists_no_hypervisor(standin, providers):
    metal = Host(standin, instance_type="m5.metal")
    p = providers(metal.config())
    cap = p.capacity()
    assert (cap.instance_type, cap.ipv4_prefixes, cap.ipv6_prefixes, cap.supported) == ("m5.metal", 49, 50, True)
    assert len(p.assign(4, 1, "t")) == 1


# -- errors ---------------------------------------------------------------------------------------
def test_a_full_interface_is_interface_full(host, providers):
    p = providers(host.config())
    assert len(p.assign(4, 9, "t")) == 9              # m5.large: the primary address + 9 prefixes
    with pytest.raises(InterfaceFull) as info:
        p.assign(4, 1, "t")
    assert "PrivateIpAddressLimitExceeded" in str(info.value) and "instance type" in str(info.value)
    assert len(p.describe().ipv4) == 9


def test_a_subnet_without_a_free_block_is_no_free_prefix_and_says_how_to_reserve(host, providers):
    reserved = host.free_block()
    host.ec2.create_subnet_cidr_reservation(SubnetId=host.subnet, Cidr=reserved, ReservationType="prefix")
    p = providers(host.config())
    assert p.reserved_ranges() == [reserved]
    assert p.reserved_ranges(6) == []
    assert p.assign(4, 1, "t") == [reserved]         # prefixes come from the reserved range
    with pytest.raises(NoFreePrefix) as info:
        p.assign(4, 1, "t")
    text = str(info.value)
    assert "InsufficientCidrBlocks" in text and host.subnet in text
    assert "aws ec2 create-subnet-cidr-reservation" in text and "--reservation-type prefix" in text


def test_insufficient_free_addresses_is_no_free_prefix(host, providers):
    host.standin.fail("AssignPrivateIpAddresses", "InsufficientFreeAddressesInSubnet")
    p = providers(host.config())
    p.describe()
    with pytest.raises(NoFreePrefix) as info:
        p.assign(4, 1, "t")
    assert "--reservation-type prefix" in str(info.value)
    assert p.describe().ipv4 == ()


def test_a_xen_instance_cannot_take_prefixes(standin, providers):
    xen = Host(standin, instance_type="m4.large")
    with pytest.raises(PrefixesUnsupported) as info:
        providers(xen.config()).assign(4, 1, "t")
    assert "Nitro" in str(info.value)


@pytest.mark.parametrize("code,status", [("RequestLimitExceeded", 503), ("Throttling", 400)])
def test_throttling_is_busy(host, providers, code, status):
    host.standin.fail("AssignIpv6Addresses", code, status=status)
    p = providers(host.config())
    with pytest.raises(Busy) as info:
        p.assign(6, 1, "t")
    assert code in str(info.value)
    assert p.describe().ipv6 == ()
    assert len(p.assign(6, 1, "t")) == 1             # the next call goes through


@pytest.mark.parametrize("code,status", [("InternalError", 500), ("Unavailable", 503)])
def test_server_errors_are_retryable(host, providers, code, status):
    host.standin.fail("AssignPrivateIpAddresses", code, status=status)
    p = providers(host.config())
    with pytest.raises(Retryable) as info:
        p.assign(4, 1, "t")
    assert not isinstance(info.value, Busy) and code in str(info.value)


def test_a_lost_answer_is_retryable_and_a_describe_shows_what_to_adopt(host, providers):
    p = providers(host.config())
    kept = p.assign(4, 1, "t")
    before = p.describe()
    host.standin.lose_answer("AssignPrivateIpAddresses")
    with pytest.raises(Retryable) as info:
        p.assign(4, 2, "t")
    assert not isinstance(info.value, Busy) and "adopt" in str(info.value)
    after = p.describe()
    appeared = set(after.ipv4) - set(before.ipv4)
    assert len(appeared) == 2 and set(kept) <= set(after.ipv4)
    assert appeared == set(host.standin.prefixes(host.interface, 4)) - set(kept)


def test_an_unassign_whose_answer_was_lost_is_done_on_its_retry(host, providers):
    p = providers(host.config())
    got = p.assign(4, 2, "t")
    host.standin.lose_answer("UnassignPrivateIpAddresses")
    with pytest.raises(Retryable):
        p.unassign(4, got)
    assert host.standin.prefixes(host.interface, 4) == []      # it took effect
    p.unassign(4, got)                                          # EC2 refuses the retry: gone is done
    assert p.describe().ipv4 == ()


def test_an_unassign_refused_while_the_prefix_is_still_held_is_fatal(host, providers):
    """The second round (only what is still held) is refused again: no loop, the refusal is reported."""
    p = providers(host.config())
    got = p.assign(4, 1, "t")
    host.standin.fail("UnassignPrivateIpAddresses", "InvalidParameterValue", times=2)
    with pytest.raises(Fatal) as info:
        p.unassign(4, got)
    assert not isinstance(info.value, Retryable) and "InvalidParameterValue" in str(info.value)
    assert p.describe().ipv4 == tuple(got)


def test_a_lost_ipv6_answer_too(host, providers):
    p = providers(host.config())
    before = p.describe()
    host.standin.lose_answer("AssignIpv6Addresses")
    with pytest.raises(Retryable):
        p.assign(6, 1, "t")
    assert len(set(p.describe().ipv6) - set(before.ipv6)) == 1


def test_an_unknown_interface_names_the_setting(host, providers):
    p = providers(host.config(aws_network_interface_id="eni-0123456789abcdef0"))
    with pytest.raises(Fatal) as info:
        p.describe()
    assert "VPCNET_AWS_NETWORK_INTERFACE_ID" in str(info.value)
    p.unassign(4, ["10.0.1.16/28"])                  # its prefixes are gone with it


def test_reserved_ranges_not_allowed_is_none(host, providers):
    host.standin.fail("GetSubnetCidrReservations", "UnauthorizedOperation", status=403)
    assert providers(host.config()).reserved_ranges() is None


def test_a_refused_call_is_fatal_and_names_the_policy_without_a_secret(host, providers):
    host.standin.fail("UnassignPrivateIpAddresses", "UnauthorizedOperation", status=403)
    p = providers(host.config())
    got = p.assign(4, 1, "t")
    with pytest.raises(Fatal) as info:
        p.unassign(4, got)
    assert not isinstance(info.value, Retryable)
    assert "IAM" in str(info.value) and SECRET not in str(info.value)
    assert p.describe().ipv4 == tuple(got)


# -- the fake IMDSv2 ------------------------------------------------------------------------------
class _FakeImds(http.server.BaseHTTPRequestHandler):
    """IMDSv2: PUT /latest/api/token, then GETs carrying the token."""

    def _reply(self, status: int, body: str = "") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self):  # noqa: N802
        ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        self._reply(200, self.server.token) if ok else self._reply(400)

    def do_GET(self):  # noqa: N802
        if self.headers.get("X-aws-ec2-metadata-token") != self.server.token:
            return self._reply(401)
        body = self.server.data.get(self.path)
        self._reply(404) if body is None else self._reply(200, body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_imds():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeImds)
    server.token, server.data = "imds-token-prefixes", {}
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- the warm pool on an interface with room for several /80s ---------------------------------------------
def test_the_pool_keeps_exactly_one_80_where_the_instance_type_takes_ten(host, providers, tmp_path):
    """m5.large takes 10 IPv6 prefixes: the warm target (IPv4's) must not make the pool want a second /80
    when the first has addresses in use; an extra one (assigned by an older version) goes after the
    cooldown, the one in use stays."""
    from vpcnet.routes.prefixes import PrefixPool
    from vpcnet.state.store import AssignRecord, Store

    config = host.config(state_dir=str(tmp_path / "state"), cluster_cidr=host.subnet_cidr,
                         cluster_cidr_v6=host.subnet_v6, addressing="eni-prefix", warm_prefixes=2,
                         prefix_cooldown=0.0)
    store = Store(str(tmp_path / "vpcnet.db"))
    provider = providers(config)
    pool = PrefixPool(config, store, provider)

    def record(db, address: str) -> None:
        db.execute("INSERT OR IGNORE INTO pools(pool_id, cluster_cidr, gateway, cursor) VALUES('eni', ?, ?, 0)",
                   (host.subnet_cidr, "10.0.1.1"))
        db.execute("INSERT INTO addresses(pool_id, address) VALUES('eni', ?)", (address,))

    try:
        mine = pool.take_address(6, record=record).prefix
        first = pool.sync()
        assert first.ok and first.full == [] and len(first.assigned) == 2, first     # two IPv4 /28s only
        assert provider.describe().ipv6 == (mine,)
        v4, v6 = pool.status().families
        assert v6.room == 9 and not v6.short and not v4.short and not pool.short_of_warm_target()
        # an older version's second /80, its answer recorded as a lost assign: adopted, then given back
        store.record_assign(AssignRecord("vpcnet-older", "ipv6", 1, (mine,), 0.0))
        extra = provider.assign(6, 1, "vpcnet-older")
        second = pool.sync()                    # cooldown 0: adopted and given back at once
        assert second.ok and second.adopted == extra and second.released == extra, second
        assert provider.describe().ipv6 == (mine,) and [p.prefix for p in store.held_prefixes("ipv6")] == [mine]
        assert pool.sync().assigned == [], "and no second /80 again"
    finally:
        store.close()
