"""Configuration: defaults, TOML file then environment precedence, one clear line per invalid value."""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest

from vpcnet import cloud
from vpcnet import config as config_mod
from vpcnet.config import SETTINGS, Config, ConfigError

SECRET = "s3cr3t-VALUE-never-shown"


@pytest.fixture
def env(tmp_path):
    """A minimal valid environment: no TOML file, socket dir that exists."""
    return {"VPCNET_CONFIG": os.devnull, "VPCNET_SOCKET": str(tmp_path / "vpcnet.sock")}


def load(env, path=None, **extra):
    environ = dict(env)
    environ.update(extra)
    return config_mod.load(path, environ=environ)


def refused(env, path=None, **extra) -> str:
    with pytest.raises(ConfigError) as info:
        load(env, path, **extra)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert message.strip() == message and message
    return message


def write_toml(tmp_path, text: str) -> str:
    path = tmp_path / "vpcnet.toml"
    path.write_text(text)
    return str(path)


# -- defaults -------------------------------------------------------------------------------------------
def test_defaults(tmp_path):
    cfg = config_mod.load(environ={"VPCNET_CONFIG": os.devnull}, check_socket_dir=False)
    assert cfg.socket == "/run/docker/plugins/vpcnet.sock"
    assert cfg.state_dir == "/var/lib/vpcnet"
    assert cfg.provider == "local"
    assert cfg.cluster_cidr == "10.200.0.0/16"
    assert cfg.host_prefix == 24
    assert cfg.host_cidr == ""
    assert cfg.no_nat_cidrs == ()
    assert cfg.mtu == 0
    assert cfg.log_level == "INFO"
    assert cfg.driver_name == "vpcnet"
    assert cfg.db_path == "/var/lib/vpcnet/vpcnet.db"


def test_setting_defaults_match_config_dataclass():
    blank = Config()
    for s in SETTINGS:
        assert getattr(blank, s.attr) == s.default, s.attr
        assert s.env == "VPCNET_" + s.attr.upper()


def test_missing_default_file_is_fine_but_missing_explicit_file_is_not(tmp_path, env):
    message = refused(env, VPCNET_CONFIG=str(tmp_path / "nope.toml"))
    assert "nope.toml" in message and "no such file" in message
    with pytest.raises(ConfigError, match="no such file"):
        config_mod.load(str(tmp_path / "missing.toml"), environ={"VPCNET_SOCKET": env["VPCNET_SOCKET"]})


# -- precedence -----------------------------------------------------------------------------------------
def test_toml_file_values(tmp_path, env):
    path = write_toml(tmp_path, 'cluster_cidr = "10.50.0.0/16"\nhost_prefix = 26\nmtu = 9000\n'
                                'no_nat_cidrs = ["192.168.0.0/16", "172.16.0.0/12"]\nlog_level = "DEBUG"\n')
    cfg = load(env, path)
    assert cfg.cluster_cidr == "10.50.0.0/16"
    assert cfg.host_prefix == 26
    assert cfg.mtu == 9000
    assert cfg.no_nat_cidrs == ("192.168.0.0/16", "172.16.0.0/12")
    assert cfg.log_level == "DEBUG"
    assert path in cfg.source


def test_environment_overrides_toml(tmp_path, env):
    path = write_toml(tmp_path, 'cluster_cidr = "10.50.0.0/16"\nhost_prefix = 26\nmtu = 9000\n')
    cfg = load(env, path, VPCNET_CLUSTER_CIDR="10.60.0.0/16", VPCNET_MTU="1400")
    assert cfg.cluster_cidr == "10.60.0.0/16"      # env wins
    assert cfg.mtu == 1400                         # env wins
    assert cfg.host_prefix == 26                   # file wins over the default
    assert cfg.provider == "local"                 # default


def test_config_file_named_by_environment(tmp_path, env):
    path = write_toml(tmp_path, 'host_prefix = 25\n')
    cfg = load(env, VPCNET_CONFIG=path)
    assert cfg.host_prefix == 25


def test_toml_keys_are_case_insensitive(tmp_path, env):
    cfg = load(env, write_toml(tmp_path, 'HOST_PREFIX = 27\n'))
    assert cfg.host_prefix == 27


def test_extra_uplinks_are_interface_names(env):
    assert load(env, VPCNET_UPLINKS="eth1, bond0.100 eth1").uplinks == ("eth1", "bond0.100")
    assert load(env).uplinks == ()
    for bad in ("eth1;iptables", "a" * 16, "vh+", ".."):
        with pytest.raises(ConfigError, match="VPCNET_UPLINKS: invalid value .* is not an interface name"):
            load(env, VPCNET_UPLINKS=bad)


def test_no_nat_list_from_environment(env):
    cfg = load(env, VPCNET_NO_NAT_CIDRS="192.168.0.0/16, 172.16.0.0/12 100.64.0.0/10")
    assert cfg.no_nat_cidrs == ("192.168.0.0/16", "172.16.0.0/12", "100.64.0.0/10")
    assert load(env, VPCNET_NO_NAT_CIDRS="").no_nat_cidrs == ()


def test_driver_name_follows_socket(tmp_path, env):
    cfg = load(env, VPCNET_SOCKET=str(tmp_path / "mynet.sock"))
    assert cfg.driver_name == "mynet"


# -- invalid values: one line naming the key ------------------------------------------------------------
@pytest.mark.parametrize("key,value", [
    ("VPCNET_CLUSTER_CIDR", "10.200.0.0/33"),
    ("VPCNET_CLUSTER_CIDR", "not-a-cidr"),
    ("VPCNET_CLUSTER_CIDR", "10.200.0.1/16"),          # host bits set
    ("VPCNET_HOST_CIDR", "10.200.300.0/24"),
    ("VPCNET_NO_NAT_CIDRS", "192.168.0.0/16,bogus"),
    ("VPCNET_HOST_PREFIX", "twenty"),
    ("VPCNET_MTU", "big"),
    ("VPCNET_RECONCILE_INTERVAL", "soon"),
])
def test_unparseable_value_names_key(env, key, value):
    message = refused(env, **{key: value})
    assert message.startswith(key), message
    assert "invalid value" in message


def test_host_cidr_outside_cluster(env):
    message = refused(env, VPCNET_CLUSTER_CIDR="10.200.0.0/16", VPCNET_HOST_CIDR="10.201.0.0/24")
    assert message.startswith("VPCNET_HOST_CIDR") and "outside the cluster CIDR" in message


@pytest.mark.parametrize("prefix", ["31", "32", "7", "0"])
def test_host_prefix_out_of_range(env, prefix):
    message = refused(env, VPCNET_HOST_PREFIX=prefix)
    assert message.startswith("VPCNET_HOST_PREFIX") and f"/{prefix}" in message
    assert "gateway" in message


def test_host_prefix_30_is_the_smallest_allowed(env):
    assert load(env, VPCNET_HOST_PREFIX="30").host_prefix == 30


@pytest.mark.parametrize("host_cidr", ["10.200.0.0/31", "10.200.0.1/32"])
def test_static_host_cidr_too_small(env, host_cidr):
    message = refused(env, VPCNET_HOST_CIDR=host_cidr)
    assert message.startswith("VPCNET_HOST_CIDR") and "too small" in message


@pytest.mark.parametrize("cluster,prefix", [("10.200.0.0/24", "24"), ("10.200.0.0/26", "24")])
def test_cluster_not_wider_than_host_block(env, cluster, prefix):
    message = refused(env, VPCNET_CLUSTER_CIDR=cluster, VPCNET_HOST_PREFIX=prefix)
    assert message.startswith("VPCNET_CLUSTER_CIDR") and "larger than one host block" in message


def test_ipv6_defaults_a_ula_48_derived_from_the_cluster_identity_and_80_blocks(env):
    cfg = load(env)
    assert (cfg.cluster_cidr_v6, cfg.host_prefix_v6) == ("", 80)
    derived = ipaddress.IPv6Network(cfg.default_cluster_cidr_v6)
    assert derived.prefixlen == 48 and derived.subnet_of(ipaddress.IPv6Network("fd00::/8"))
    assert cfg.default_cluster_cidr_v6 == load(env).default_cluster_cidr_v6     # every host computes the same
    named = load(env, VPCNET_CLUSTER_NAME="alpha").default_cluster_cidr_v6
    other = load(env, VPCNET_CLUSTER_CIDR="10.201.0.0/16").default_cluster_cidr_v6
    assert len({cfg.default_cluster_cidr_v6, named, other}) == 3               # clusters differ, so do their ULAs
    assert named == config_mod.derived_ula("alpha")
    given = load(env, VPCNET_CLUSTER_CIDR_V6="2001:db8:7::/48", VPCNET_HOST_PREFIX_V6="64")
    assert given.default_cluster_cidr_v6 == "2001:db8:7::/48"
    assert (given.host_prefix_for("2001:db8:7::/48"), given.host_prefix_for("10.200.0.0/16")) == (64, 24)


@pytest.mark.parametrize("extra,start,why", [
    ({"VPCNET_CLUSTER_CIDR_V6": "fd00::1/48"}, "VPCNET_CLUSTER_CIDR_V6", "host bits set"),
    ({"VPCNET_CLUSTER_CIDR_V6": "10.0.0.0/8"}, "VPCNET_CLUSTER_CIDR_V6", "an IPv4 network: this setting takes an"),
    ({"VPCNET_CLUSTER_CIDR_V6": "fd00::/80"}, "VPCNET_CLUSTER_CIDR_V6", "larger than one host block"),
    ({"VPCNET_CLUSTER_CIDR_V6": "fe80::/48"}, "VPCNET_CLUSTER_CIDR_V6", "not a unicast range"),
    ({"VPCNET_CLUSTER_CIDR_V6": "ff00::/16", "VPCNET_HOST_PREFIX_V6": "64"}, "VPCNET_CLUSTER_CIDR_V6",
     "not a unicast range"),
    ({"VPCNET_HOST_PREFIX_V6": "121"}, "VPCNET_HOST_PREFIX_V6", "out of range"),
    ({"VPCNET_HOST_PREFIX_V6": "8"}, "VPCNET_HOST_PREFIX_V6", "out of range"),
])
def test_ipv6_settings_refused_clearly(env, extra, start, why):
    message = refused(env, **extra)
    assert message.startswith(start) and why in message


def test_empty_cluster_cidr(env):
    assert refused(env, VPCNET_CLUSTER_CIDR="").startswith("VPCNET_CLUSTER_CIDR")


def test_socket_dir_missing(tmp_path, env):
    message = refused(env, VPCNET_SOCKET=str(tmp_path / "no" / "such" / "dir" / "vpcnet.sock"))
    assert message.startswith("VPCNET_SOCKET") and "does not exist" in message
    # and the check can be turned off (for `vpcnet status` on a host without the plugin dir)
    cfg = config_mod.load(environ={"VPCNET_CONFIG": os.devnull,
                                   "VPCNET_SOCKET": str(tmp_path / "no" / "vpcnet.sock")},
                          check_socket_dir=False)
    assert cfg.driver_name == "vpcnet"


def test_socket_must_end_in_sock(tmp_path, env):
    assert refused(env, VPCNET_SOCKET=str(tmp_path / "vpcnet")).startswith("VPCNET_SOCKET")


def test_unknown_provider(env):
    message = refused(env, VPCNET_PROVIDER="azure")
    assert message.startswith("VPCNET_PROVIDER") and "'azure'" in message and "local" in message


NO_BOTOCORE = ("VPCNET_PROVIDER=aws needs botocore, which is not installed: "
               "python3 -m vpcnet.bootstrap --extras aws (or pip install 'vpcnet[aws]')")
# Run first in a fresh interpreter: botocore cannot be found from then on, as on a host without it.
BLOCK_BOTOCORE = """
import sys
class NoBotocore:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "botocore":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoBotocore())
"""


def test_a_provider_whose_dependency_is_missing_is_a_configuration_error(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "botocore", None)      # `import botocore` now fails
    assert refused(env, VPCNET_PROVIDER="aws") == NO_BOTOCORE
    with pytest.raises(cloud.ProviderUnavailable) as info:
        cloud.provider_class("aws")
    assert str(info.value) == NO_BOTOCORE
    assert load(env, VPCNET_PROVIDER="aliyun").provider == "aliyun"     # needs nothing optional


def test_the_aliyun_eni_settings(env, tmp_path):
    """The ECS endpoint (a full URL, as the VPC endpoint) and the primary ENI of eni-prefix addressing:
    empty by default (then derived and read from metadata), from the environment or the TOML file."""
    c = load(env)
    assert (c.aliyun_ecs_endpoint, c.aliyun_network_interface_id) == ("", "")
    c = load(env, VPCNET_ALIYUN_ECS_ENDPOINT="http://127.0.0.1:9/", VPCNET_ALIYUN_NETWORK_INTERFACE_ID="eni-bp1x")
    assert (c.aliyun_ecs_endpoint, c.aliyun_network_interface_id) == ("http://127.0.0.1:9/", "eni-bp1x")
    path = write_toml(tmp_path, 'aliyun_network_interface_id = "eni-toml"\n')
    assert load(env, path).aliyun_network_interface_id == "eni-toml"


def test_a_provider_with_its_dependency_installed_passes_the_check(env):
    assert cloud.missing_requirements("aws") == ""
    assert load(env, VPCNET_PROVIDER="aws").provider == "aws"


@pytest.mark.parametrize("argv", [["serve"], ["routes", "list"], ["doctor"]])
def test_commands_refuse_aws_without_botocore_in_one_line(tmp_path, argv):
    sock = tmp_path / "run" / "vpcnet.sock"
    sock.parent.mkdir()
    env = dict(os.environ, VPCNET_CONFIG=os.devnull, VPCNET_PROVIDER="aws",
               VPCNET_STATE_DIR=str(tmp_path / "state"), VPCNET_SOCKET=str(sock))
    code = BLOCK_BOTOCORE + f"from vpcnet.cli.main import main\nsys.exit(main({argv!r}))\n"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == f"vpcnet: configuration error: {NO_BOTOCORE}\n"
    assert not sock.exists() and not (tmp_path / "state").exists()


def test_unknown_toml_key(tmp_path, env):
    path = write_toml(tmp_path, 'cluster_cidr = "10.50.0.0/16"\nclsuter_cidr = "10.60.0.0/16"\n')
    message = refused(env, path)
    assert "clsuter_cidr" in message and "unknown key" in message and path in message


def test_malformed_toml(tmp_path, env):
    path = write_toml(tmp_path, 'cluster_cidr = "10.50.0.0/16\n')
    message = refused(env, path)
    assert message.startswith(f"config file {path}")


def test_bad_value_in_toml_names_key_and_file(tmp_path, env):
    path = write_toml(tmp_path, 'host_prefix = "wide"\n')
    message = refused(env, path)
    assert message.startswith(f"host_prefix in {path}")


@pytest.mark.parametrize("mtu", ["575", "65536", "-1"])
def test_bad_mtu(env, mtu):
    message = refused(env, VPCNET_MTU=mtu)
    assert message.startswith("VPCNET_MTU") and "out of range" in message


@pytest.mark.parametrize("mtu", ["0", "576", "1500", "9000", "65535"])
def test_good_mtu(env, mtu):
    assert load(env, VPCNET_MTU=mtu).mtu == int(mtu)


def test_bad_log_level(env):
    assert refused(env, VPCNET_LOG_LEVEL="LOUD").startswith("VPCNET_LOG_LEVEL")


def test_bad_workers(env):
    assert "VPCNET_WORKERS" in refused(env, VPCNET_WORKERS="0")


def test_bad_reconcile_interval(env):
    assert refused(env, VPCNET_RECONCILE_INTERVAL="0").startswith("VPCNET_RECONCILE_INTERVAL")


# -- addressing: route-table or eni-prefix ----------------------------------------------------------------
def test_addressing_defaults_to_route_table_with_one_warm_prefix_and_a_30_s_cooldown(env):
    cfg = load(env)
    assert (cfg.addressing, cfg.warm_prefixes, cfg.prefix_cooldown) == ("route-table", 1, 30.0)


def test_eni_prefix_addressing_and_its_pool_from_the_file_and_the_environment(tmp_path, env):
    path = write_toml(tmp_path, 'addressing = "eni-prefix"\nwarm_prefixes = 3\nprefix_cooldown = 5\n')
    cfg = load(env, path)
    assert (cfg.addressing, cfg.warm_prefixes, cfg.prefix_cooldown) == ("eni-prefix", 3, 5.0)
    cfg = load(env, path, VPCNET_ADDRESSING="Route-Table", VPCNET_WARM_PREFIXES="0")
    assert (cfg.addressing, cfg.warm_prefixes) == ("route-table", 0)


@pytest.mark.parametrize("value", ("eni", "prefix", "vpc-route", ""))
def test_an_unknown_addressing_is_refused_naming_both_choices(env, value):
    message = refused(env, VPCNET_ADDRESSING=value)
    assert message.startswith("VPCNET_ADDRESSING") and "route-table" in message and "eni-prefix" in message


@pytest.mark.parametrize("value", ("-1", "11", "two"))
def test_warm_prefixes_is_0_to_10(env, value):
    message = refused(env, VPCNET_WARM_PREFIXES=value)
    assert message.startswith("VPCNET_WARM_PREFIXES")
    assert "0..10" in message or "invalid literal" in message


@pytest.mark.parametrize("value", ("-1", "nan", "inf"))
def test_prefix_cooldown_is_a_finite_number_of_seconds(env, value):
    assert refused(env, VPCNET_PREFIX_COOLDOWN=value).startswith("VPCNET_PREFIX_COOLDOWN")


def test_eni_prefix_addressing_needs_a_provider_with_prefixes(env, monkeypatch):
    from vpcnet.cloud import prefixes
    assert load(env, VPCNET_ADDRESSING="eni-prefix").addressing == "eni-prefix"
    monkeypatch.delitem(prefixes.PREFIX_PROVIDERS, "local")
    message = refused(env, VPCNET_ADDRESSING="eni-prefix")
    assert message.startswith("VPCNET_ADDRESSING") and "'local'" in message and "aliyun" in message


# -- secrets --------------------------------------------------------------------------------------------
def test_secret_never_in_errors(tmp_path, env):
    # an error elsewhere in a file that also holds the secret
    path = write_toml(tmp_path, f'aliyun_access_key_secret = "{SECRET}"\nmtu = 12\n')
    assert SECRET not in refused(env, path)
    path = write_toml(tmp_path, f'aliyun_access_key_secret = "{SECRET}"\nbogus = 1\n')
    assert SECRET not in refused(env, path)
    # a secret of the wrong TOML type, next to an invalid value: never echoed
    path = write_toml(tmp_path, f'aliyun_access_key_secret = ["{SECRET}"]\nmtu = 12\n')
    assert SECRET not in refused(env, path)
    assert SECRET not in refused(env, VPCNET_ALIYUN_ACCESS_KEY_SECRET=SECRET, VPCNET_PROVIDER="nope")


def test_secret_parse_error_masks_value():
    from vpcnet.config import Setting, _parse

    def boom(text):
        raise ValueError("bad")

    setting = Setting("aliyun_access_key_secret", "", "x", boom, secret=True)
    with pytest.raises(ConfigError) as info:
        _parse(setting, SECRET, "VPCNET_ALIYUN_ACCESS_KEY_SECRET")
    assert SECRET not in str(info.value) and "***" in str(info.value)


def test_redacted_hides_secret(env):
    cfg = load(env, VPCNET_ALIYUN_ACCESS_KEY_SECRET=SECRET, VPCNET_ALIYUN_ACCESS_KEY_ID="LTAIxyz")
    red = cfg.redacted()
    assert red["aliyun_access_key_secret"] == "***"
    assert red["aliyun_access_key_id"] == "LTAIxyz"
    assert SECRET not in repr(red)
    assert SECRET not in repr(cfg)
    assert set(red) == {s.attr for s in SETTINGS}
    assert load(env).redacted()["aliyun_access_key_secret"] == ""


def test_the_source_dest_check_help_says_when_the_route_pass_checks():
    """The route pass checks it on its first pass, then every FORWARDING_EVERY-th, and every pass while it
    finds a problem (vpcnet.routes.sync): the setting's help (docs/settings.md, the managed plugin's Env)
    says the same, not "every pass"."""
    from vpcnet.routes import sync

    [setting] = [s for s in SETTINGS if s.env == "VPCNET_AWS_DISABLE_SOURCE_DEST_CHECK"]
    assert "on every pass" not in setting.description
    assert f"first pass, then every {sync.FORWARDING_EVERY}th pass" in setting.description
    assert "every pass while it finds a problem" in setting.description
    with open(cloud.__file__) as fh:
        source = fh.read()
    comment = source[source.index("checks_forwarding = False") - 300:source.index("checks_forwarding = False")]
    assert "FORWARDING_EVERY" in comment and "called every pass" not in comment


def test_the_aws_network_interface_comes_from_the_environment_or_the_file(tmp_path, env):
    """VPCNET_AWS_NETWORK_INTERFACE_ID names the interface eni-prefix addressing assigns prefixes to (empty:
    the AWS prefix provider reads it from instance metadata); the environment wins over the file."""
    assert load(env).aws_network_interface_id == ""
    path = write_toml(tmp_path, 'aws_network_interface_id = "eni-0file0000000000001"\n')
    assert load(env, path).aws_network_interface_id == "eni-0file0000000000001"
    cfg = load(env, path, VPCNET_AWS_NETWORK_INTERFACE_ID="eni-0env00000000000001")
    assert cfg.aws_network_interface_id == "eni-0env00000000000001"
