"""The `aws` provider against moto's real EC2 server (ThreadedMotoServer on 127.0.0.1), a fake IMDSv2 on
127.0.0.1, and vpcnet's RouteKeeper end to end.

Network safety: every URL here is 127.0.0.1; the metadata URL is always a local fake or a closed local
port, so nothing can reach 169.254.169.254 or a real AWS endpoint.

What moto cannot do (tested otherwise or not at all): it has no route quota (RouteLimitExceeded) and never
throttles, so those two answers come from a tiny fake EC2 endpoint below; its routes are always
`active` (no `blackhole` after an instance terminates); and its ModifyInstanceAttribute(SourceDestCheck)
does not update the primary ENI's own attribute as AWS does (the provider checks the instance attribute,
and only secondary ENIs separately).
"""
from __future__ import annotations

import http.server
import ipaddress
import json
import logging
import socket
import threading
import time

import boto3
import pytest
from aliyun_fakes import blocks_of
from moto.server import ThreadedMotoServer

from vpcnet.cli.doctor.cloud import CloudChecks
from vpcnet.cloud import DuplicateRoute, QuotaExceeded
from vpcnet.cloud.aws.markers import tag_key
from vpcnet.cloud.aws.provider import AwsProvider
from vpcnet.config import Config
from vpcnet.errors import Fatal, NotReady, Retryable
from vpcnet.routes.backoff import Backoff
from vpcnet.routes.keeper import RouteKeeper
from vpcnet.state.store import Store

REGION = "us-east-1"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzSECRETzzKEY"
TOKEN = "FwoGZXIvYXdzEXAMPLEzzSESSIONzzTOKENzz0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_url():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        assert host == "127.0.0.1"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Fake keys in the environment, no shared config files, nothing else that could reach AWS."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_EC2_METADATA_DISABLED", "AWS_DEFAULTS_MODE",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


class Vpc:
    """A VPC, a subnet, a route table and instances in moto, driven with boto3 (the 'hand' of a user)."""

    _image = ""   # moto's default AMIs: listed once (the listing is large and slow)

    def __init__(self, url: str):
        self.url = url
        self.ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=url)
        self.vpc = self.ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        self.subnet = self.ec2.create_subnet(VpcId=self.vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
        self.table = self.ec2.create_route_table(VpcId=self.vpc)["RouteTable"]["RouteTableId"]
        self.ec2.associate_route_table(RouteTableId=self.table, SubnetId=self.subnet)
        if not Vpc._image:
            Vpc._image = self.ec2.describe_images(Owners=["amazon"], MaxResults=5)["Images"][0]["ImageId"]
        self.image = Vpc._image

    def instance(self) -> str:
        return self.ec2.run_instances(ImageId=self.image, MinCount=1, MaxCount=1,
                                      SubnetId=self.subnet)["Instances"][0]["InstanceId"]

    def config(self, instance: str, **extra) -> Config:
        values = dict(provider="aws", aws_region=REGION, aws_route_table_id=self.table,
                      aws_instance_id=instance, aws_endpoint_url=self.url,
                      aws_metadata_url=f"http://127.0.0.1:{_free_port()}")  # closed: never used
        values.update(extra)
        return Config(**values)

    def routes(self) -> dict[str, dict]:
        table = self.ec2.describe_route_tables(RouteTableIds=[self.table])["RouteTables"][0]
        return {r.get("DestinationCidrBlock"): r for r in table["Routes"]}

    def tags(self) -> dict[str, str]:
        """The route table's tags (older markers, tombstones)."""
        table = self.ec2.describe_route_tables(RouteTableIds=[self.table])["RouteTables"][0]
        return {t["Key"]: t["Value"] for t in table.get("Tags", [])}

    def markers(self, instance: str) -> dict[str, str]:
        """vpcnet's marker tags on an instance."""
        tags = self.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [instance]}])["Tags"]
        return {t["Key"]: t["Value"] for t in tags if t["Key"].startswith("vpcnet:")}


@pytest.fixture
def vpc(moto_url, aws_env):
    return Vpc(moto_url)


@pytest.fixture
def provider_for():
    made = []

    def make(config):
        p = AwsProvider(config)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


# -- routes ---------------------------------------------------------------------------------------
def test_create_list_delete(vpc, provider_for):
    me = vpc.instance()
    p = provider_for(vpc.config(me))
    assert p.instance_id() == me and p.table_id() == vpc.table

    before = p.list_routes()
    local = next(r for r in before if r.destination == "10.0.0.0/16")
    assert local.kind == "System" and local.next_hop == "local" and local.status == "Available"
    assert not local.marked

    p.create_route("10.200.3.0/24", "vpcnet-x", "vpcnet: x", "tok-1")
    route = next(r for r in p.list_routes() if r.destination == "10.200.3.0/24")
    assert (route.next_hop, route.next_hop_type, route.kind, route.status) == (me, "Instance", "Custom", "Available")
    assert route.marked and route.name.startswith("vpcnet") and route.description.startswith("vpcnet")
    assert vpc.markers(me) == {tag_key("10.200.3.0/24"): ""}     # on the instance, not the table
    assert vpc.tags() == {}
    assert vpc.routes()["10.200.3.0/24"]["InstanceId"] == me

    p.delete_route(route)
    assert "10.200.3.0/24" not in vpc.routes()
    assert vpc.markers(me) == {}
    p.delete_route(route)                       # already gone: not an error
    assert [r.destination for r in p.list_routes()] == [r.destination for r in before]


def test_duplicate_route(vpc, provider_for):
    a, b = vpc.instance(), vpc.instance()
    pa, pb = provider_for(vpc.config(a)), provider_for(vpc.config(b))
    pa.create_route("10.200.5.0/24", "vpcnet-5", "vpcnet: 5", "tok-a")
    with pytest.raises(DuplicateRoute, match="10.200.5.0/24"):
        pb.create_route("10.200.5.0/24", "vpcnet-5", "vpcnet: 5", "tok-b")
    with pytest.raises(DuplicateRoute):          # our own route, a fresh create: still a duplicate
        pa.create_route("10.200.5.0/24", "vpcnet-5", "vpcnet: 5", "tok-a2")
    assert vpc.routes()["10.200.5.0/24"]["InstanceId"] == a
    assert tag_key("10.200.5.0/24") in vpc.markers(a) and vpc.markers(b) == {}


def test_ownership_marker(vpc, provider_for):
    me, other = vpc.instance(), vpc.instance()
    p = provider_for(vpc.config(me))
    p.create_route("10.200.1.0/24", "", "", "t1")
    provider_for(vpc.config(other)).create_route("10.200.2.0/24", "", "", "t2")
    vpc.ec2.create_route(RouteTableId=vpc.table, DestinationCidrBlock="10.200.9.0/24", InstanceId=me)
    # a hand-made route re-pointed at another instance no longer matches its tag
    p.create_route("10.200.4.0/24", "", "", "t4")
    vpc.ec2.replace_route(RouteTableId=vpc.table, DestinationCidrBlock="10.200.4.0/24", InstanceId=other)

    routes = {r.destination: r for r in p.list_routes()}
    assert routes["10.200.1.0/24"].marked and routes["10.200.1.0/24"].next_hop == me
    assert routes["10.200.2.0/24"].marked and routes["10.200.2.0/24"].next_hop == other
    hand = routes["10.200.9.0/24"]
    assert hand.next_hop == me and hand.kind == "Custom" and not hand.marked
    assert routes["10.200.4.0/24"].next_hop == other and not routes["10.200.4.0/24"].marked
    assert not routes["10.0.0.0/16"].marked

    # delete_route does not remove a route that was re-pointed since it was listed
    stale = routes["10.200.1.0/24"]
    vpc.ec2.replace_route(RouteTableId=vpc.table, DestinationCidrBlock="10.200.1.0/24", InstanceId=other)
    p.delete_route(stale)
    assert vpc.routes()["10.200.1.0/24"]["InstanceId"] == other

    # replace_route points a route here and marks it
    p.replace_route("10.200.4.0/24")
    assert {r.destination: r for r in p.list_routes()}["10.200.4.0/24"].marked


def test_retried_create_that_landed_is_completed(vpc, provider_for):
    """A create whose answer was lost lands; the retry with the same token tags it, not a duplicate."""
    me = vpc.instance()
    p = provider_for(vpc.config(me))
    vpc.ec2.create_route(RouteTableId=vpc.table, DestinationCidrBlock="10.200.7.0/24", InstanceId=me)
    with pytest.raises(DuplicateRoute):          # no earlier uncertain attempt: a hand-made route
        p.create_route("10.200.7.0/24", "", "", "fresh")
    assert not {r.destination: r for r in p.list_routes()}["10.200.7.0/24"].marked
    p._uncertain.add(("lost", "10.200.7.0/24", vpc.table))  # as after a timeout on the first attempt
    p.create_route("10.200.7.0/24", "", "", "lost")
    assert {r.destination: r for r in p.list_routes()}["10.200.7.0/24"].marked


# -- instance checks ------------------------------------------------------------------------------
def test_source_dest_check_reported_when_vpcnet_may_not_change_it(vpc, provider_for):
    me = vpc.instance()
    p = provider_for(vpc.config(me))
    problems = p.check_forwarding(disable=False)
    assert len(problems) == 1, problems
    assert f"source/destination check is enabled on {me}" in problems[0]
    assert f"aws ec2 modify-instance-attribute --instance-id {me} --no-source-dest-check" in problems[0]
    attr = vpc.ec2.describe_instance_attribute(InstanceId=me, Attribute="sourceDestCheck")
    assert attr["SourceDestCheck"]["Value"] is True                  # only looked
    vpc.ec2.modify_instance_attribute(InstanceId=me, SourceDestCheck={"Value": False})
    assert p.check_forwarding(disable=False) == []


def test_source_dest_check_turned_off_and_kept_off(vpc, provider_for, caplog):
    me = vpc.instance()
    p = provider_for(vpc.config(me))
    assert p.check_forwarding(disable=True) == []
    attr = vpc.ec2.describe_instance_attribute(InstanceId=me, Attribute="sourceDestCheck")
    assert attr["SourceDestCheck"]["Value"] is False                 # ModifyInstanceAttribute, through moto
    # someone turns it on again: the next check turns it off again, and says so
    vpc.ec2.modify_instance_attribute(InstanceId=me, SourceDestCheck={"Value": True})
    caplog.set_level(logging.WARNING)
    assert p.check_forwarding(disable=True) == []
    assert vpc.ec2.describe_instance_attribute(InstanceId=me, Attribute="sourceDestCheck")[
        "SourceDestCheck"]["Value"] is False
    assert "turned on again" in caplog.text


def test_source_dest_check_on_secondary_eni(vpc, provider_for):
    me = vpc.instance()
    vpc.ec2.modify_instance_attribute(InstanceId=me, SourceDestCheck={"Value": False})
    eni = vpc.ec2.create_network_interface(SubnetId=vpc.subnet)["NetworkInterface"]["NetworkInterfaceId"]
    vpc.ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=me, DeviceIndex=1)
    p = provider_for(vpc.config(me))
    problems = p.check_forwarding(disable=False)
    assert len(problems) == 1 and eni in problems[0] and "--no-source-dest-check" in problems[0], problems
    assert p.check_forwarding(disable=True) == []
    [desc] = vpc.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"]
    assert desc["SourceDestCheck"] is False
    assert p.check_forwarding(disable=False) == []


def test_instance_exists(vpc, provider_for):
    me, other = vpc.instance(), vpc.instance()
    p = provider_for(vpc.config(me))
    assert p.instance_exists(other)
    vpc.ec2.terminate_instances(InstanceIds=[other])
    assert not p.instance_exists(other)
    assert not p.instance_exists("i-0123456789abcdef0")      # never existed: NotFound
    assert p.instance_exists("eni-0123456789abcdef0")        # not an instance: in doubt, exists


def test_reserved_cidrs(vpc, provider_for):
    p = provider_for(vpc.config(vpc.instance()))
    assert p.reserved_cidrs() == ["10.0.1.0/24"]


def test_missing_table_is_fatal(vpc, provider_for):
    p = provider_for(vpc.config(vpc.instance(), aws_route_table_id="rtb-0000000000000000a"))
    with pytest.raises(Fatal, match="rtb-0000000000000000a does not exist"):
        p.list_routes()


# -- errors ---------------------------------------------------------------------------------------
def test_unreachable_endpoint_is_retryable_quickly(aws_env, provider_for):
    config = Config(provider="aws", aws_region=REGION, aws_route_table_id="rtb-1", aws_instance_id="i-1",
                    aws_endpoint_url=f"http://127.0.0.1:{_free_port()}",
                    aws_metadata_url=f"http://127.0.0.1:{_free_port()}")
    p = provider_for(config)
    start = time.monotonic()
    with pytest.raises(Retryable, match="unreachable") as info:
        p.list_routes()
    assert time.monotonic() - start < 5
    with pytest.raises(Retryable):
        p.create_route("10.200.0.0/24", "", "", "t")
    assert SECRET not in str(info.value) and TOKEN not in str(info.value)


class _FakeEc2(http.server.BaseHTTPRequestHandler):
    """Answers every EC2 call with the error in `server.answer` = (status, code)."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append(self.path)
        status, code = self.server.answer
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
                f"<Message>fake {code}</Message></Error></Errors><RequestID>r-1</RequestID></Response>")
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _serve(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def fake_ec2():
    server, thread = _serve(_FakeEc2)
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.parametrize("status,code,error", [
    (400, "RouteLimitExceeded", QuotaExceeded),        # moto has no route quota
    (503, "RequestLimitExceeded", Retryable),          # moto never throttles
    (500, "InternalError", Retryable),
    (400, "ConcurrentTagAccess", Retryable),
    (400, "RouteAlreadyExists", DuplicateRoute),
    (403, "UnauthorizedOperation", Fatal),
])
def test_error_mapping(aws_env, fake_ec2, provider_for, status, code, error):
    fake_ec2.answer = (status, code)
    config = Config(provider="aws", aws_region=REGION, aws_route_table_id="rtb-full", aws_instance_id="i-1",
                    aws_endpoint_url=f"http://127.0.0.1:{fake_ec2.server_address[1]}",
                    aws_metadata_url=f"http://127.0.0.1:{_free_port()}")
    p = provider_for(config)
    with pytest.raises(error) as info:
        p.create_route("10.200.0.0/24", "", "", "t")
    assert len(fake_ec2.requests) == 1                 # botocore's own retries are off
    if error is QuotaExceeded:
        assert "rtb-full" in str(info.value) and "quota 50" in str(info.value)
        assert "L-93826ACB" in str(info.value) and "VPCNET_ROUTE_TABLE_QUOTA" in str(info.value)
    if error is Fatal:
        assert not isinstance(info.value, DuplicateRoute) and code in str(info.value)
    if error is Retryable:
        assert ("t", "10.200.0.0/24", "rtb-full") in p._uncertain


# -- IMDSv2 ---------------------------------------------------------------------------------------
class _FakeImds(http.server.BaseHTTPRequestHandler):
    """IMDSv2: PUT /latest/api/token (TTL header required), then GETs carrying the token."""

    protocol_version = "HTTP/1.0"

    def _reply(self, status, body=""):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self):  # noqa: N802
        self.server.requests.append(("PUT", self.path, {k.lower(): v for k, v in self.headers.items()}))
        if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self._reply(400)
        self._reply(200, self.server.token)

    def do_GET(self):  # noqa: N802
        self.server.requests.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
        if self.headers.get("X-aws-ec2-metadata-token") != self.server.token:
            return self._reply(401)
        body = self.server.data.get(self.path)
        if body is None:
            return self._reply(404)
        self._reply(200, body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_imds():
    server, thread = _serve(_FakeImds)
    server.token = "imds-token-123"
    server.data = {}
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_imds_identity(vpc, fake_imds, provider_for):
    me = vpc.instance()
    mac = "02:00:00:00:00:01"
    fake_imds.data.update({
        "/latest/meta-data/instance-id": me,
        "/latest/meta-data/placement/region": REGION,
        "/latest/meta-data/mac": mac,
        f"/latest/meta-data/network/interfaces/macs/{mac}/subnet-id": vpc.subnet,
        f"/latest/meta-data/network/interfaces/macs/{mac}/vpc-id": vpc.vpc,
    })
    p = provider_for(vpc.config("", aws_region="", aws_route_table_id="", aws_metadata_url=fake_imds.url))
    assert p.instance_id() == me
    assert p.region() == REGION
    assert p.table_id() == vpc.table                      # the subnet's table, found through EC2
    p.create_route("10.200.8.0/24", "", "", "t")
    assert vpc.routes()["10.200.8.0/24"]["InstanceId"] == me
    puts = [r for r in fake_imds.requests if r[0] == "PUT"]
    gets = [r for r in fake_imds.requests if r[0] == "GET"]
    assert len(puts) == 1 and puts[0][2].get("x-aws-ec2-metadata-token-ttl-seconds") == "21600"
    assert gets and all(r[2].get("x-aws-ec2-metadata-token") == "imds-token-123" for r in gets)
    assert fake_imds.requests[0][0] == "PUT"
    # botocore took the keys from the environment and asked IMDS for nothing
    assert not any("security-credentials" in r[1] for r in fake_imds.requests)


def test_imds_region_from_identity_document(vpc, fake_imds, provider_for):
    fake_imds.data["/latest/dynamic/instance-identity/document"] = json.dumps({"region": "eu-west-3"})
    p = provider_for(vpc.config("i-1", aws_region="", aws_metadata_url=fake_imds.url))
    assert p.region() == "eu-west-3"


def test_config_values_win(vpc, fake_imds, provider_for):
    me = vpc.instance()
    p = provider_for(vpc.config(me, aws_metadata_url=fake_imds.url))
    assert p.instance_id() == me
    p.list_routes()
    p.create_route("10.200.6.0/24", "", "", "t")
    p.check_forwarding(disable=False)
    assert fake_imds.requests == []


def test_imds_credentials_go_to_configured_url(vpc, fake_imds, provider_for, monkeypatch):
    """No keys in the environment: botocore's instance-profile lookup uses the configured URL."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var)
    fake_imds.data.update({
        "/latest/meta-data/iam/security-credentials/": "vpcnet-role",
        "/latest/meta-data/iam/security-credentials/vpcnet-role": json.dumps({
            "Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "ASIAEXAMPLEEXAMPLE01",
            "SecretAccessKey": SECRET, "Token": TOKEN, "Expiration": "2099-01-01T00:00:00Z"}),
    })
    me = vpc.instance()
    p = provider_for(vpc.config(me, aws_metadata_url=fake_imds.url))
    assert any(r.destination == "10.0.0.0/16" for r in p.list_routes())
    assert any(r[1].startswith("/latest/meta-data/iam/security-credentials/") for r in fake_imds.requests)


def test_imds_unreachable_is_a_clear_fatal(aws_env, provider_for):
    p = provider_for(Config(provider="aws", aws_route_table_id="rtb-1",
                            aws_metadata_url=f"http://127.0.0.1:{_free_port()}"))
    with pytest.raises(Fatal, match="hop limit must be at least 2") as info:
        p.instance_id()
    assert "VPCNET_AWS_INSTANCE_ID" in str(info.value)


def test_imds_silent_times_out(aws_env, provider_for):
    """The hop-limit symptom: the token PUT's answer never arrives."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)                   # accepts connections (backlog), never answers
        port = listener.getsockname()[1]
        p = provider_for(Config(provider="aws", aws_route_table_id="rtb-1",
                                aws_metadata_url=f"http://127.0.0.1:{port}"))
        start = time.monotonic()
        with pytest.raises(Fatal, match="hop limit"):
            p.instance_id()
        assert time.monotonic() - start < 6


def test_no_secret_in_logs_or_errors(vpc, fake_imds, provider_for, monkeypatch, caplog):
    """Instance-profile keys (from the fake IMDS) never reach a log record or an error, even at DEBUG."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var)
    role_secret, role_token = "RoleSecretKeyEXAMPLEzz0123456789abcdefXYZ", "RoleSessionTokenEXAMPLEzz" + "x" * 40
    fake_imds.data.update({
        "/latest/meta-data/iam/security-credentials/": "vpcnet-role",
        "/latest/meta-data/iam/security-credentials/vpcnet-role": json.dumps({
            "Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": "ASIAEXAMPLEEXAMPLE01",
            "SecretAccessKey": role_secret, "Token": role_token, "Expiration": "2099-01-01T00:00:00Z"}),
    })
    me = vpc.instance()                         # the test's own boto3 calls happen before capture
    caplog.set_level(logging.DEBUG)
    p = provider_for(vpc.config(me, aws_metadata_url=fake_imds.url))
    messages = []
    p.create_route("10.200.11.0/24", "", "", "t")
    p.list_routes()
    for call in (lambda: p.create_route("10.200.11.0/24", "", "", "t2"),
                 lambda: provider_for(vpc.config(me, aws_route_table_id="rtb-0000000000000000b")).list_routes()):
        with pytest.raises(Fatal) as info:
            call()
        messages.append(str(info.value))
    messages.extend(p.check_forwarding(disable=False))
    text = caplog.text + "\n".join(messages)
    assert "security-credentials" in caplog.text or any(
        "security-credentials" in r[1] for r in fake_imds.requests)   # the role keys were really used
    assert role_secret not in text and role_token not in text


# -- end to end with the RouteKeeper --------------------------------------------------------------
def _keeper(vpc, tmp_path, name, instance, **extra):
    (tmp_path / name).mkdir()
    config = vpc.config(instance, state_dir=str(tmp_path / name), cluster_cidr="10.200.0.0/16", host_prefix=24,
                        **extra)
    store = Store(str(tmp_path / name / "s.db"))
    keeper = RouteKeeper(config, store, provider_factory=lambda: AwsProvider(config),
                         backoff=Backoff(attempts=3, base=0.01, cap=0.05, deadline=5))
    return keeper, store


def test_route_keeper_end_to_end(vpc, tmp_path):
    a, b = vpc.instance(), vpc.instance()
    ka, sa = _keeper(vpc, tmp_path, "a", a)
    kb, sb = _keeper(vpc, tmp_path, "b", b)
    try:
        # a hand-made route to host a inside the cluster CIDR: never adopted, never deleted
        hand = blocks_of(a, "10.200.0.0/16")[0]      # the block host a would try first
        vpc.ec2.create_route(RouteTableId=vpc.table, DestinationCidrBlock=hand, InstanceId=a)
        assert ka.reconcile().ok
        block_a = sa.claim("10.200.0.0/16").host_cidr
        assert block_a == blocks_of(a, "10.200.0.0/16")[1]
        assert kb.reconcile().ok
        block_b = sb.claim("10.200.0.0/16").host_cidr
        assert block_b not in (block_a, hand)
        routes = vpc.routes()
        assert routes[block_a]["InstanceId"] == a and routes[block_b]["InstanceId"] == b
        assert vpc.markers(a) == {tag_key(block_a): "cluster=10.200.0.0-16"}
        assert vpc.markers(b) == {tag_key(block_b): "cluster=10.200.0.0-16"}
        assert vpc.tags() == {}

        # restart of host a: same block, found through the table (store forgotten)
        sa.forget_claim("10.200.0.0/16")
        assert ka.reconcile().ok and sa.claim("10.200.0.0/16").host_cidr == block_a

        # drift: host b's route deleted behind vpcnet's back is re-created
        vpc.ec2.delete_route(RouteTableId=vpc.table, DestinationCidrBlock=block_b)
        assert kb.reconcile().ok and vpc.routes()[block_b]["InstanceId"] == b

        removed = ka.release()
        assert [r.destination for r in removed] == [block_a]
        routes = vpc.routes()
        assert block_a not in routes
        assert routes[block_b]["InstanceId"] == b
        assert routes[hand]["InstanceId"] == a      # hand-made: untouched
        assert vpc.markers(a) == {} and vpc.markers(b) == {tag_key(block_b): "cluster=10.200.0.0-16"}

        # gc: host b terminated; host a's keeper finds b's route as garbage and removes it
        vpc.ec2.terminate_instances(InstanceIds=[b])
        garbage = ka.garbage()
        assert [r.destination for r in garbage] == [block_b]
        ka.delete_garbage(garbage)
        assert block_b not in vpc.routes() and vpc.tags() == {}
        assert hand in vpc.routes()
    finally:
        for keeper, store in ((ka, sa), (kb, sb)):
            keeper.close()
            store.close()


V6 = "fd00:aaaa:bbbb::/48"      # a ULA cluster range: outside the VPC's /56, what route-table mode can use


def _v6_routes(vpc) -> dict[str, dict]:
    table = vpc.ec2.describe_route_tables(RouteTableIds=[vpc.table])["RouteTables"][0]
    return {r["DestinationIpv6CidrBlock"]: r for r in table["Routes"] if r.get("DestinationIpv6CidrBlock")}


def test_ipv6_blocks_are_claimed_with_destination_ipv6_cidr_block_and_counted_per_family(vpc, tmp_path):
    """IPv6 host blocks go into the route table as CreateRoute DestinationIpv6CidrBlock -> the instance, marked
    and owned as IPv4 ones; AWS counts each family's routes against its own quota, so a table full of IPv4
    routes still takes IPv6 ones."""
    a, b = vpc.instance(), vpc.instance()
    ka, sa = _keeper(vpc, tmp_path, "a", a, route_table_quota=2, cluster_cidr_v6=V6)
    kb, sb = _keeper(vpc, tmp_path, "b", b, route_table_quota=2, cluster_cidr_v6=V6)
    try:
        assert ka.reconcile().ok and kb.reconcile().ok            # two IPv4 routes: the IPv4 quota is full
        for keeper in (ka, kb):
            with pytest.raises(NotReady, match="not yet claimed"):
                keeper.host_cidr(V6)                              # IPAM asks: the next pass claims it
            result = keeper.reconcile()
            assert result.ok, result.problems
        _tables, _me, listing = ka.table()                        # a listing: the usage, per family
        assert ka.route_table_usage() == {vpc.table: {"ipv4": (2, 2), "ipv6": (2, 2)}}
        findings = CloudChecks._quota_findings(ka.provider, vpc.table, listing)      # `vpcnet doctor`
        assert [(f.ok, f.detail) for f in findings] == [
            (False, f"route table {vpc.table} holds 2 of 2 custom IPv4 entries (100%)"),
            (False, f"route table {vpc.table} holds 2 of 2 custom IPv6 entries (100%)")]
        block_a, block_b = sa.claim(V6).host_cidr, sb.claim(V6).host_cidr
        assert block_a != block_b and all(ipaddress.IPv6Network(x).subnet_of(ipaddress.IPv6Network(V6))
                                          and x.endswith("/80") for x in (block_a, block_b))
        routes = _v6_routes(vpc)
        assert (routes[block_a]["InstanceId"], routes[block_b]["InstanceId"]) == (a, b)
        assert vpc.markers(a)[tag_key(block_a)] == "cluster=fd00.aaaa.bbbb..-48"
        tables, me, listed = ka.table()
        owners = {r.destination: ka.ownership(r, me) for r in listed}
        assert owners[block_a] == "mine" and owners[block_b] == "ours-other-host"

        # drift: host b's IPv6 route deleted behind vpcnet's back is re-created; a restart finds its block
        vpc.ec2.delete_route(RouteTableId=vpc.table, DestinationIpv6CidrBlock=block_b)
        sb.forget_claim(V6)
        sb.want_claim(V6, "restart")
        assert kb.reconcile().ok and sb.claim(V6).host_cidr == block_b
        assert _v6_routes(vpc)[block_b]["InstanceId"] == b

        # a third IPv4 block does not fit, an IPv6 one would: the quota is per family
        c = vpc.instance()
        kc, sc = _keeper(vpc, tmp_path, "c", c, route_table_quota=2)
        try:
            result = kc.reconcile()
            assert not result.ok and "is full: 2/2" in result.problems[0]
        finally:
            kc.close()
            sc.close()

        # release and gc cover IPv6 routes as IPv4 ones
        v4_a = sa.claim("10.200.0.0/16").host_cidr
        assert sorted(r.destination for r in ka.release()) == sorted([block_a, v4_a])
        assert block_a not in _v6_routes(vpc)
        vpc.ec2.terminate_instances(InstanceIds=[b])
        garbage = ka.garbage()
        assert block_b in [r.destination for r in garbage]
        ka.delete_garbage(garbage)
        assert _v6_routes(vpc) == {}
    finally:
        for keeper, store in ((ka, sa), (kb, sb)):
            keeper.close()
            store.close()


def test_two_hosts_claim_at_once(vpc, tmp_path):
    instances = [vpc.instance() for _ in range(4)]
    keepers = [_keeper(vpc, tmp_path, f"h{i}", inst) for i, inst in enumerate(instances)]
    results = {}
    barrier = threading.Barrier(len(keepers))

    def run(i, keeper):
        barrier.wait(5)
        results[i] = keeper.reconcile()

    threads = [threading.Thread(target=run, args=(i, k)) for i, (k, _) in enumerate(keepers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(r.ok for r in results.values()) and len(results) == len(keepers), results
        blocks = [s.claim("10.200.0.0/16").host_cidr for _, s in keepers]
        assert len(set(blocks)) == len(blocks)
        routes = vpc.routes()
        for block, inst in zip(blocks, instances, strict=True):
            assert routes[block]["InstanceId"] == inst
            assert vpc.markers(inst) == {tag_key(block): "cluster=10.200.0.0-16"}
    finally:
        for keeper, store in keepers:
            keeper.close()
            store.close()


# -- several route tables, discovery, leaks -------------------------------------------------------
class ZonedVpc(Vpc):
    """A VPC with two zones: subnets a and b, each associated with its own route table, and a third
    subnet left on the main table."""

    def __init__(self, url: str):
        super().__init__(url)
        self.subnet_b = self.ec2.create_subnet(VpcId=self.vpc, CidrBlock="10.0.2.0/24")["Subnet"]["SubnetId"]
        self.table_b = self.ec2.create_route_table(VpcId=self.vpc)["RouteTable"]["RouteTableId"]
        self.ec2.associate_route_table(RouteTableId=self.table_b, SubnetId=self.subnet_b)
        self.subnet_c = self.ec2.create_subnet(VpcId=self.vpc, CidrBlock="10.0.3.0/24")["Subnet"]["SubnetId"]
        self.main = next(t["RouteTableId"] for t in self.ec2.describe_route_tables(
            Filters=[{"Name": "vpc-id", "Values": [self.vpc]}, {"Name": "association.main", "Values": ["true"]}]
        )["RouteTables"])

    def routes_of(self, table: str) -> dict[str, dict]:
        described = self.ec2.describe_route_tables(RouteTableIds=[table])["RouteTables"][0]
        return {r.get("DestinationCidrBlock"): r for r in described["Routes"]}


def test_tables_discovered_from_subnet_associations_and_the_main_table(moto_url, aws_env, provider_for, fake_imds):
    zoned = ZonedVpc(moto_url)
    me = zoned.instance()
    mac = "02:00:00:00:00:09"
    fake_imds.data.update({"/latest/meta-data/mac": mac,
                           f"/latest/meta-data/network/interfaces/macs/{mac}/vpc-id": zoned.vpc})
    p = provider_for(zoned.config(me, aws_route_table_id="", aws_metadata_url=fake_imds.url))
    assert p.table_ids() == sorted([zoned.table, zoned.table_b, zoned.main])
    # the subnets named in a setting instead: only their tables
    q = provider_for(zoned.config(me, aws_route_table_id="", aws_subnet_ids=f"{zoned.subnet},{zoned.subnet_c}"))
    assert q.table_ids() == sorted([zoned.table, zoned.main])


def test_route_keeper_keeps_one_block_in_every_table(moto_url, aws_env, tmp_path):
    zoned = ZonedVpc(moto_url)
    a, b = zoned.instance(), zoned.instance()
    tables = f"{zoned.table},{zoned.table_b}"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    made = []
    for name, inst in (("a", a), ("b", b)):
        config = zoned.config(inst, aws_route_table_id=tables, state_dir=str(tmp_path / name),
                              cluster_cidr="10.200.0.0/16", host_prefix=24)
        store = Store(str(tmp_path / name / "s.db"))
        made.append((RouteKeeper(config, store, provider_factory=lambda c=config: AwsProvider(c),
                                 backoff=Backoff(attempts=3, base=0.01, cap=0.05, deadline=5)), store))
    (ka, sa), (kb, sb) = made
    try:
        assert ka.reconcile().ok and kb.reconcile().ok
        block_a, block_b = sa.claim("10.200.0.0/16").host_cidr, sb.claim("10.200.0.0/16").host_cidr
        assert block_a != block_b
        for table in (zoned.table, zoned.table_b):
            routes = zoned.routes_of(table)
            assert routes[block_a]["InstanceId"] == a and routes[block_b]["InstanceId"] == b
        # source/destination check turned off by the pass
        assert zoned.ec2.describe_instance_attribute(InstanceId=a, Attribute="sourceDestCheck")[
            "SourceDestCheck"]["Value"] is False
        # host a's route lost from the second table only: re-created there, same block
        zoned.ec2.delete_route(RouteTableId=zoned.table_b, DestinationCidrBlock=block_a)
        assert ka.reconcile().ok
        assert zoned.routes_of(zoned.table_b)[block_a]["InstanceId"] == a
        removed = ka.release()
        assert sorted(r.table for r in removed) == sorted([zoned.table, zoned.table_b])
        assert block_a not in zoned.routes_of(zoned.table) and block_a not in zoned.routes_of(zoned.table_b)
        assert zoned.routes_of(zoned.table_b)[block_b]["InstanceId"] == b
    finally:
        for keeper, store in made:
            keeper.close()
            store.close()


class TagsFailing(AwsProvider):
    """CreateTags answers RequestLimitExceeded while `failing` is set (CreateRoute itself works)."""

    failing = True

    def _api(self, what, op, **params):
        if op == "create_tags" and TagsFailing.failing:
            from vpcnet.cloud.aws.client import ApiError
            raise ApiError(what, "RequestLimitExceeded", "Request limit exceeded.", 503)
        return super()._api(what, op, **params)


def test_a_route_whose_tagging_failed_is_adopted_on_the_next_pass(vpc, tmp_path):
    """CreateRoute lands, CreateTags keeps failing: the untagged route must not become foreign forever."""
    me = vpc.instance()
    (tmp_path / "h").mkdir()
    config = vpc.config(me, state_dir=str(tmp_path / "h"), cluster_cidr="10.200.0.0/16", host_prefix=24)
    store = Store(str(tmp_path / "h" / "s.db"))
    TagsFailing.failing = True
    keeper = RouteKeeper(config, store, provider_factory=lambda: TagsFailing(config),
                         backoff=Backoff(attempts=3, base=0.01, cap=0.02, deadline=2, busy_deadline=0.5))
    try:
        result = keeper.reconcile()
        assert not result.ok
        [landed] = [d for d, r in vpc.routes().items() if r.get("InstanceId") == me]
        assert vpc.markers(me) == {}                                   # untagged: looks hand-made
        # a restart in between: what is uncertain is on disk, not only in the provider's memory
        keeper.close()
        TagsFailing.failing = False
        keeper = RouteKeeper(config, store, provider_factory=lambda: TagsFailing(config),
                             backoff=Backoff(attempts=3, base=0.01, cap=0.02, deadline=2))
        assert keeper.reconcile().ok
        assert store.claim("10.200.0.0/16").host_cidr == landed         # adopted, no second block
        assert vpc.markers(me) == {tag_key(landed): "cluster=10.200.0.0-16"}
        assert [d for d, r in vpc.routes().items() if r.get("InstanceId") == me] == [landed]
        assert [r.destination for r in keeper.release()] == [landed]  # and it can be released
    finally:
        keeper.close()
        store.close()


# -- the marker at scale: more than 50 routes, two clusters, older table tags, gone instances ----------
def _keeper_for(vpc, tmp_path, name, instance, cluster_cidr, **extra):
    (tmp_path / name).mkdir()
    config = vpc.config(instance, state_dir=str(tmp_path / name), cluster_cidr=cluster_cidr, host_prefix=24,
                        route_table_quota=1000, **extra)
    store = Store(str(tmp_path / name / "s.db"))
    keeper = RouteKeeper(config, store, provider_factory=lambda: AwsProvider(config),
                         backoff=Backoff(attempts=3, base=0.01, cap=0.05, deadline=5))
    return keeper, store


def _close(*pairs):
    for keeper, store in pairs:
        keeper.close()
        store.close()


def test_sixty_routes_of_two_clusters_in_one_table(vpc, tmp_path, provider_for):
    """A table with 60 vpcnet routes (more than the 50 tags a table holds) of many instances and two
    clusters: every route is marked, and each cluster's keeper claims, releases and collects only its own."""
    instances = [i["InstanceId"] for i in vpc.ec2.run_instances(
        ImageId=vpc.image, MinCount=62, MaxCount=62, SubnetId=vpc.subnet)["Instances"]]
    red, blue = instances[:40], instances[40:60]
    for n, inst in enumerate(red):       # cluster "red": 10.200.0.0/16
        provider_for(vpc.config(inst)).create_route(f"10.200.{n}.0/24", "", "vpcnet: x cluster=red", f"r{n}")
    for n, inst in enumerate(blue):      # cluster "blue": 10.201.0.0/16
        provider_for(vpc.config(inst)).create_route(f"10.201.{n}.0/24", "", "vpcnet: x cluster=blue", f"b{n}")
    listed = {r.destination: r for r in provider_for(vpc.config(red[0])).list_routes()}
    vpcnet_routes = [r for r in listed.values() if r.marked]
    assert len(vpcnet_routes) == 60 and vpc.tags() == {}
    assert {r.cluster for r in vpcnet_routes} == {"red", "blue"}
    assert all(listed[f"10.200.{n}.0/24"].next_hop == inst for n, inst in enumerate(red))

    ka, sa = _keeper_for(vpc, tmp_path, "red", instances[60], "10.200.0.0/16", cluster_name="red")
    kb, sb = _keeper_for(vpc, tmp_path, "blue", instances[61], "10.201.0.0/16", cluster_name="blue")
    try:
        assert ka.reconcile().ok and kb.reconcile().ok
        block_a, block_b = sa.claim("10.200.0.0/16").host_cidr, sb.claim("10.201.0.0/16").host_cidr
        assert block_a not in listed and block_b not in listed       # free blocks, nothing claimed twice
        assert len([r for r in ka.provider.list_routes() if r.marked]) == 62
        ownership = {r.destination: ka.ownership(r, instances[60]) for r in ka.provider.list_routes()}
        assert ownership[block_a] == "mine" and ownership["10.200.7.0/24"] == "ours-other-host"
        assert ownership[block_b] == "ours-other-cluster" and ownership["10.201.3.0/24"] == "ours-other-cluster"
        # a blue host's CIDR overlapping red's is refused, naming the other cluster
        kc, sc = _keeper_for(vpc, tmp_path, "clash", instances[59], "10.200.0.0/15", cluster_name="green")
        try:
            result = kc.reconcile()
            assert not result.ok and "overlaps" in " ".join(result.problems)
            assert sc.claim("10.200.0.0/15").host_cidr is None
        finally:
            _close((kc, sc))
        # gc: three red hosts and two blue ones terminated; each cluster collects only its own
        vpc.ec2.terminate_instances(InstanceIds=red[:3] + blue[:2])
        garbage = ka.garbage()
        assert sorted(r.destination for r in garbage) == sorted(f"10.200.{n}.0/24" for n in range(3))
        ka.delete_garbage(garbage)
        routes = vpc.routes()
        assert not any(f"10.200.{n}.0/24" in routes for n in range(3))
        assert all(f"10.201.{n}.0/24" in routes for n in range(20))     # blue's dead routes: blue's to collect
        assert sorted(r.destination for r in kb.garbage()) == ["10.201.0.0/24", "10.201.1.0/24"]
        # release: only this host's route
        assert [r.destination for r in ka.release()] == [block_a]
        assert block_a not in vpc.routes() and len([r for r in kb.provider.list_routes() if r.marked]) == 58
    finally:
        _close((ka, sa), (kb, sb))


def test_routes_marked_by_older_table_tags_still_count(vpc, tmp_path):
    """A deployment from before instance tags: its routes are marked by table tags, and stay vpcnet's."""
    me, other = vpc.instance(), vpc.instance()
    for inst, block in ((me, "10.200.1.0/24"), (other, "10.200.2.0/24")):
        vpc.ec2.create_route(RouteTableId=vpc.table, DestinationCidrBlock=block, InstanceId=inst)
        vpc.ec2.create_tags(Resources=[vpc.table], Tags=[{"Key": tag_key(block),
                                                          "Value": f"{inst} cluster=10.200.0.0-16"}])
    keeper, store = _keeper_for(vpc, tmp_path, "old", me, "10.200.0.0/16")
    try:
        assert keeper.reconcile().ok
        assert store.claim("10.200.0.0/16").host_cidr == "10.200.1.0/24"       # found, not claimed anew
        assert [d for d, r in vpc.routes().items() if r.get("InstanceId") == me] == ["10.200.1.0/24"]
        assert [r.destination for r in keeper.release()] == ["10.200.1.0/24"]
        assert vpc.tags() == {tag_key("10.200.2.0/24"): f"{other} cluster=10.200.0.0-16"}  # its tag went with it
    finally:
        _close((keeper, store))


def test_gc_after_the_instance_and_its_tags_are_gone(vpc, tmp_path):
    """A terminated instance is visible (with its tags) for a while only: a live host keeps the marker of
    its routes on the table (a tombstone), so `routes gc` still removes them later; nothing else is kept."""
    a, b = vpc.instance(), vpc.instance()
    ka, sa = _keeper_for(vpc, tmp_path, "a", a, "10.200.0.0/16")
    kb, sb = _keeper_for(vpc, tmp_path, "b", b, "10.200.0.0/16")
    try:
        assert ka.reconcile().ok and kb.reconcile().ok
        block_b = sb.claim("10.200.0.0/16").host_cidr
        hand = "10.200.250.0/24"           # a hand-made route to b: never tombstoned, never collected
        vpc.ec2.create_route(RouteTableId=vpc.table, DestinationCidrBlock=hand, InstanceId=b)
        assert ka.reconcile().ok           # host a has seen b's route marked
        vpc.ec2.terminate_instances(InstanceIds=[b])
        vpc.ec2.delete_tags(Resources=[b], Tags=[{"Key": tag_key(block_b)}])   # AWS forgets the instance
        assert ka.reconcile().ok           # host a's pass keeps the marker on the table
        assert vpc.tags() == {tag_key(block_b): f"{b} cluster=10.200.0.0-16"}
        # a fresh keeper (another host, no memory of its own) sees it as vpcnet's garbage too
        garbage = ka.garbage()
        assert [r.destination for r in garbage] == [block_b]
        ka.delete_garbage(garbage)
        assert block_b not in vpc.routes() and vpc.tags() == {}
        assert vpc.routes()[hand]["InstanceId"] == b
    finally:
        _close((ka, sa), (kb, sb))


def test_a_marker_removed_by_hand_from_a_live_instance_makes_no_tombstone(vpc, tmp_path, provider_for):
    me, other = vpc.instance(), vpc.instance()
    p = provider_for(vpc.config(me, state_dir=str(tmp_path)))
    provider_for(vpc.config(other)).create_route("10.200.4.0/24", "", "vpcnet: x cluster=c", "t")
    assert {r.destination: r for r in p.list_routes()}["10.200.4.0/24"].marked
    vpc.ec2.delete_tags(Resources=[other], Tags=[{"Key": tag_key("10.200.4.0/24")}])
    assert not {r.destination: r for r in p.list_routes()}["10.200.4.0/24"].marked
    assert vpc.tags() == {}


class DescribeThrottled(AwsProvider):
    """DescribeInstances answers RequestLimitExceeded while `throttled` is set."""

    throttled = False

    def _api(self, what, op, **params):
        if op == "describe_instances" and self.throttled:
            from vpcnet.cloud.aws.client import ApiError
            raise ApiError(what, "RequestLimitExceeded", "Request limit exceeded.", 503)
        return super()._api(what, op, **params)


def test_a_gone_instance_is_tombstoned_once_ec2_can_say_so(vpc, tmp_path, provider_for):
    """While EC2 cannot say whether the instance is gone, the marker is remembered, not dropped."""
    me, other = vpc.instance(), vpc.instance()
    provider_for(vpc.config(other)).create_route("10.200.6.0/24", "", "vpcnet: x cluster=c", "t")
    p = DescribeThrottled(vpc.config(me, state_dir=str(tmp_path)))
    try:
        assert {r.destination: r for r in p.list_routes()}["10.200.6.0/24"].marked
        vpc.ec2.terminate_instances(InstanceIds=[other])
        vpc.ec2.delete_tags(Resources=[other], Tags=[{"Key": tag_key("10.200.6.0/24")}])
        p.throttled = True
        assert not {r.destination: r for r in p.list_routes()}["10.200.6.0/24"].marked
        assert vpc.tags() == {}
        p.throttled = False
        route = {r.destination: r for r in p.list_routes()}["10.200.6.0/24"]
        assert route.marked and route.next_hop == other and route.cluster == "c"
        assert vpc.tags() == {tag_key("10.200.6.0/24"): f"{other} cluster=c"}
    finally:
        p.close()
