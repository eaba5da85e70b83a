"""`vpcnet doctor`'s reserved-range finding in eni-prefix addressing, against the clouds' stand-ins: the
real emulator's vSwitch reservations (Alibaba) and the EC2 stand-in's subnet reservations (AWS), each
over HTTP on 127.0.0.1. Doctor lists the reservations and never assigns or releases a prefix.

Network safety: every URL here is 127.0.0.1; the metadata URLs are closed local ports.
"""
from __future__ import annotations

import pytest
from aliyun_fakes import closed_port, serving_emulator
from test_aws_prefixes import Host as AwsHost
from test_aws_prefixes import aws_env, standin  # noqa: F401  (fixtures: fake keys, the EC2 stand-in)

from vpcnet.cli.doctor.findings import Context
from vpcnet.cli.doctor.prefixes import PrefixChecks
from vpcnet.config import Config
from vpcnet_lab.emulator.enis import eni_id_of

KEY_ID, SECRET = "emu-key-id", "emu-key-secret"
ME, REGION, VPC, VSW = "i-emu-h1", "cn-emu-1", "vpc-emu0001", "vsw-emu0001"
RANGE = "192.168.0.64/26"


def findings(config: Config) -> list:
    return PrefixChecks(Context(config, "/nonexistent.sock")).check_reserved_ranges()


def only_problem(found: list) -> str:
    [bad] = [f for f in found if not f.ok]
    assert bad.check == "reserved_range" and bad.fix
    return bad.detail + " | " + bad.fix


# -- Alibaba Cloud: the emulator's vSwitch reservations --------------------------------------------------
@pytest.fixture
def emu():
    with serving_emulator({}, region=REGION, vpc_id=VPC, credentials={KEY_ID: SECRET}, seed=7) as e:
        e.register_instance(ME, "192.168.0.2")
        yield e


def aliyun(emu, cluster: str) -> Config:
    return Config(provider="aliyun", addressing="eni-prefix", cluster_cidr=cluster, aliyun_endpoint=emu.test_url,
                  aliyun_region_id=REGION, aliyun_vpc_id=VPC, aliyun_instance_id=ME,
                  aliyun_network_interface_id=eni_id_of(ME), aliyun_access_key_id=KEY_ID,
                  aliyun_access_key_secret=SECRET, aliyun_metadata_url=f"http://127.0.0.1:{closed_port()}")


def test_aliyun_the_cluster_cidr_is_the_reserved_range(emu):
    emu.add_cidr_reservation(VSW, RANGE)
    emu.add_cidr_reservation(VSW, "192.168.0.192/28", "Explicit")     # not of type Prefix: not a source
    [good] = findings(aliyun(emu, RANGE))
    assert good.ok and good.detail == f"the cluster CIDR {RANGE} is the subnet's reserved IPv4 range of type prefix"
    assert emu.request_counts.get("AssignPrivateIpAddresses", 0) == 0
    assert emu.request_counts.get("UnassignPrivateIpAddresses", 0) == 0


def test_aliyun_no_reserved_range_names_how_to_reserve_one(emu):
    text = only_problem(findings(aliyun(emu, RANGE)))
    assert "the subnet has no reserved IPv4 range of type prefix" in text
    assert ("aliyun vpc CreateVSwitchCidrReservation --VSwitchId <vsw> --VSwitchCidrReservationType Prefix "
            f"--VSwitchCidrReservationCidr {RANGE}") in text


def test_aliyun_a_cluster_cidr_other_than_the_reserved_range(emu):
    emu.add_cidr_reservation(VSW, RANGE)
    outside = [f for f in findings(aliyun(emu, "10.0.0.0/16")) if not f.ok]
    texts = [f.detail for f in outside]
    assert len(texts) == 2, texts
    assert f"the cluster CIDR 10.0.0.0/16 is inside none of the subnet's reserved IPv4 ranges of type prefix " \
           f"({RANGE})" in texts[0]
    assert f"reserved IPv4 range(s) {RANGE} of type prefix reach outside the cluster CIDR 10.0.0.0/16" in texts[1]
    assert "VPCNET_CLUSTER_CIDR" in outside[0].fix
    # a cluster CIDR inside the range, but smaller: the cloud may still assign from the rest of the range
    [part] = [f for f in findings(aliyun(emu, "192.168.0.64/27")) if not f.ok]
    assert "reach outside the cluster CIDR 192.168.0.64/27" in part.detail


# -- AWS: the EC2 stand-in's subnet reservations ----------------------------------------------------------
def aws(host: AwsHost, cluster: str) -> Config:
    return host.config(addressing="eni-prefix", cluster_cidr=cluster)


def test_aws_the_cluster_cidr_is_the_reserved_range(standin):  # noqa: F811
    host = AwsHost(standin)
    reserved = host.free_block()
    host.ec2.create_subnet_cidr_reservation(SubnetId=host.subnet, Cidr=reserved, ReservationType="prefix")
    [good] = findings(aws(host, reserved))
    assert good.ok and f"the cluster CIDR {reserved} is the subnet's reserved IPv4 range" in good.detail


def test_aws_no_reserved_range_names_how_to_reserve_one(standin):  # noqa: F811
    host = AwsHost(standin)
    host.ec2.create_subnet_cidr_reservation(SubnetId=host.subnet, Cidr=host.free_block(), ReservationType="explicit")
    text = only_problem(findings(aws(host, "10.0.1.0/24")))
    assert "the subnet has no reserved IPv4 range of type prefix" in text
    assert "aws ec2 create-subnet-cidr-reservation --subnet-id <subnet> --cidr 10.0.1.0/24 --reservation-type " \
           "prefix" in text


def test_aws_a_listing_not_allowed_is_cannot_tell(standin):  # noqa: F811
    host = AwsHost(standin)
    standin.fail("GetSubnetCidrReservations", "UnauthorizedOperation", status=403)
    [said] = findings(aws(host, "10.0.1.0/24"))
    assert said.ok and said.detail.startswith("cannot tell whether the subnet has a reserved IPv4 range")
