"""vpcnet configuration: one flat table of settings, built once into a `Config`.

Every setting has one name used three ways: the environment variable (`VPCNET_CLUSTER_CIDR`), the
TOML key in `/etc/vpcnet/vpcnet.toml` (`cluster_cidr`, lower case without the prefix), and the managed
plugin's settable `Env`. The environment wins over the file, the file over the default. `SETTINGS` is the
single source of truth: docs/settings.md's table and `plugin/config.json` are checked against
it by the tests.

Invalid configuration raises `ConfigError` with one line naming the key and the problem.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

from vpcnet import cloud
from vpcnet.cloud.prefixes import PREFIX_PROVIDERS

DEFAULT_CONFIG_FILE = "/etc/vpcnet/vpcnet.toml"


class ConfigError(Exception):
    """A configuration value is invalid; the message names the key."""


@dataclass(frozen=True)
class Setting:
    attr: str                  # Config attribute and TOML key
    default: Any
    description: str
    parse: Callable[[str], Any] = str
    secret: bool = False

    @property
    def env(self) -> str:
        return "VPCNET_" + self.attr.upper()


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _cidr_list(text: str) -> tuple[str, ...]:
    items = [part.strip() for part in text.replace(" ", ",").split(",") if part.strip()]
    return tuple(str(ipaddress.IPv4Network(item, strict=True)) for item in items)


def _cidr_or_empty(text: str) -> str:
    text = text.strip()
    return str(ipaddress.IPv4Network(text, strict=True)) if text else ""


def _cidr6_or_empty(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    try:
        return str(ipaddress.IPv6Network(text, strict=True))
    except ValueError as exc:
        if "/" in text and "." in text.split("/")[0]:
            raise ValueError("an IPv4 network: this setting takes an IPv6 CIDR (e.g. fd12:3456:789a::/48)") from None
        raise ValueError(f"not an IPv6 CIDR ({exc})") from None


def _id_list(text: str) -> str:
    """Comma-separated cloud ids, normalised (`a, b` -> `a,b`)."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    for item in items:
        if not all(c.isalnum() or c in "-_" for c in item):
            raise ValueError(f"{item!r} is not a cloud resource id")
    return ",".join(items)


def _cluster_name(text: str) -> str:
    text = text.strip()
    if text and (len(text) > 63 or not all(c.isalnum() or c in "._-" for c in text)):
        raise ValueError("a cluster name is 1-63 letters, digits, '.', '_' or '-'")
    return text


def _link_list(text: str) -> tuple[str, ...]:
    """Comma-separated interface names (what the kernel and iptables take: 1-15 letters, digits, '.', '_', '-')."""
    items = tuple(dict.fromkeys(part.strip() for part in text.replace(" ", ",").split(",") if part.strip()))
    for item in items:
        if len(item) > 15 or item in (".", "..") or not all(c.isalnum() or c in "._-" for c in item):
            raise ValueError(f"{item!r} is not an interface name (1-15 letters, digits, '.', '_' or '-')")
    return items


def _int(text: str) -> int:
    return int(str(text).strip())


def _float(text: str) -> float:
    return float(str(text).strip())


def _endpoint_metrics(text: str) -> str:
    text = text.strip().lower()
    if text not in ("container", "service"):
        raise ValueError("must be container or service")
    return text


def _on_off(text: str) -> str:
    text = text.strip().lower()
    if text not in ("on", "off"):
        raise ValueError("must be on or off")
    return text


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


ADDRESSING_MODES = ("route-table", "eni-prefix")


def _addressing(text: str) -> str:
    text = text.strip().lower()
    if text not in ADDRESSING_MODES:
        raise ValueError(f"must be {' or '.join(ADDRESSING_MODES)}")
    return text


def _warm_prefixes(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 10:
        raise ValueError("must be 0..10 (10 is the most one cloud call assigns)")
    return value


def _docker_socket(text: str) -> str:
    text = text.strip()
    text = text[len("unix://"):] if text.startswith("unix://") else text
    if text and text != "off" and not text.startswith("/"):
        raise ValueError("must be an absolute path to a unix socket (or unix://PATH), empty, or off")
    return text


SETTINGS: tuple[Setting, ...] = (
    Setting("socket", "/run/docker/plugins/vpcnet.sock",
            "Unix socket the plugin serves; its file name (without .sock) is the driver name"),
    Setting("state_dir", "/var/lib/vpcnet", "Directory for the sqlite state and the local route table"),
    Setting("provider", "local", "Route provider: local (embedded, no network calls), aliyun or aws"),
    Setting("cluster_cidr", "10.200.0.0/16",
            "Default cluster CIDR: every host's block is carved from it", _cidr_or_empty),
    Setting("host_prefix", 24, "Prefix length of each host's block (its host CIDR)", _int),
    Setting("host_cidr", "", "Static host CIDR for the default cluster CIDR (skips claiming)",
            _cidr_or_empty),
    Setting("cluster_cidr_v6", "", "Default IPv6 cluster CIDR (networks made with --ipv6): every host's IPv6 block "
            "is carved from it; empty: a ULA /48 derived from the cluster identity (fd + the first 40 bits of "
            "SHA-256 of VPCNET_CLUSTER_NAME, or of the default name of VPCNET_CLUSTER_CIDR); in eni-prefix addressing "
            "the IPv6 range the host's /80 prefix comes from (the vSwitch's or subnet's IPv6 CIDR)", _cidr6_or_empty),
    Setting("host_prefix_v6", 80, "Prefix length of each host's IPv6 block (the /80 the clouds delegate as an "
            "interface's IPv6 prefix)", _int),
    Setting("no_nat_cidrs", (), "Destinations reached without masquerade, besides the cluster CIDR "
            "(comma-separated CIDRs)", _cidr_list),
    Setting("uplinks", (), "Interfaces that count as uplinks besides the default route's (comma-separated "
            "names): cluster traffic enters and leaves only by the uplinks and vpcnet's own links, so name the "
            "VPC NIC here when it does not carry the default route", _link_list),
    Setting("mtu", 0, "Container MTU; 0 takes the MTU of the uplink (the default route's interface)",
            _int),
    Setting("default_mode", "auto", "Datapath of a network created without -o vpcnet.mode: auto (the best this "
            "kernel and the plugin's capabilities allow: ebpf, else routed, else bridge), bridge, routed or ebpf "
            "(a mode the host cannot do is refused at network create); networks keep the mode they were made with",
            lambda text: text.strip().lower()),
    Setting("log_level", "INFO", "Log level: DEBUG, INFO, WARNING, ERROR"),
    Setting("log_format", "text", "Log format: text, or json (one object per line with the Docker call, its "
            "duration and the network/endpoint ids)"),
    Setting("workers", 1, "gunicorn worker processes (state is shared through sqlite)", _int),
    Setting("threads", 8, "Threads per gunicorn worker", _int),
    Setting("reconcile_interval", 30.0, "Seconds between route reconcile passes", _float),
    Setting("datapath_interval", 30.0, "Seconds between datapath passes, which read the kernel and repair "
            "drift (firewall, bridges, routes, eBPF programs)", _float),
    Setting("metrics_addr", "127.0.0.1:9753", "HOST:PORT serving Prometheus /metrics and /healthz "
            "(loopback by default; empty turns them off)"),
    Setting("metrics_max_connections", 64, "Connections the metrics listener holds at once (a thread each); "
            "over it, the one idle longest is closed", _int),
    Setting("metrics_allow", (), "Client networks the metrics listener answers (comma-separated CIDRs); others "
            "are closed unanswered; empty: anyone who can connect", _cidr_list),
    Setting("docker_socket", "", "The Docker engine's API socket, read (in the background) for the metrics' "
            "network, container, service and application names; empty: DOCKER_HOST's unix:// path, else "
            "/var/run/docker.sock; off: no names", _docker_socket),
    Setting("endpoint_metrics", "container", "Per-endpoint traffic metrics: container (a series per container, "
            "and vpcnet_endpoint_info), or service (sums per network, application and service; no per-container "
            "series)", _endpoint_metrics),
    Setting("peer_metrics", "on", "Per-peer traffic (vpcnet_endpoint_peer_*: bytes and packets per endpoint and "
            "peer address, counted by eBPF programs on the endpoints' host veths, in every mode): on or off. Off, "
            "and with VPCNET_ENDPOINT_METRICS=service, no counting program is loaded", _on_off),
    Setting("peers_per_endpoint", 32, "Peers with a series of their own per endpoint and direction (the "
            "busiest when a slot is free, kept for the endpoint's life); the rest sum into peer=\"other\"",
            _positive_int),
    Setting("instance_id", "", "This host's instance id for the local provider (default: hostname)"),
    Setting("cluster_name", "", "This cluster's identity, written into its routes so clusters sharing a VPC "
            "never touch each other's (default: derived from the cluster CIDR, e.g. 10.200.0.0-16)",
            _cluster_name),
    Setting("route_table_quota", 0, "Custom entries each route table may hold (0: the cloud's default, "
            "Alibaba 200, AWS 50); vpcnet stops before exceeding it", _int),
    Setting("addressing", "route-table", "How a host's block reaches it: route-table (one VPC route per host "
            "and cluster CIDR) or eni-prefix (IPv4 /28 and IPv6 /80 prefixes on the host's network interface, "
            "no route; docs/eni-prefix.md)", _addressing),
    Setting("warm_prefixes", 1, "eni-prefix addressing: free IPv4 /28 prefixes kept ready (0..10), so a "
            "container start does not wait on the cloud (IPv6: a host holds at most one /80)", _warm_prefixes),
    Setting("prefix_cooldown", 30.0, "eni-prefix addressing: seconds a wholly unused prefix above the warm "
            "target stays before it is released", _float),
    # Alibaba Cloud
    Setting("aliyun_endpoint", "", "Alibaba Cloud VPC API URL (default https://vpc.<region>.aliyuncs.com/)"),
    Setting("aliyun_region_id", "", "Alibaba Cloud region id (default: from instance metadata)"),
    Setting("aliyun_route_table_id", "", "Route table(s) to program, comma-separated (default: the tables the "
            "VPC's vSwitches are bound to)", _id_list),
    Setting("aliyun_vpc_id", "", "VPC id, used to find the route table (default: from metadata)"),
    Setting("aliyun_instance_id", "", "This ECS instance's id (default: from metadata)"),
    Setting("aliyun_access_key_id", "", "AccessKey id (or use a credentials file or RAM role)"),
    Setting("aliyun_access_key_secret", "", "AccessKey secret", secret=True),
    Setting("aliyun_credentials_file", "", "File holding access_key_id/access_key_secret "
            "(must not be group- or world-readable)"),
    Setting("aliyun_ram_role", "", "RAM role attached to the instance, for temporary credentials"),
    Setting("aliyun_metadata_url", "http://100.100.100.200", "Alibaba Cloud instance metadata service"),
    Setting("aliyun_ecs_endpoint", "", "ECS API URL, for ENI prefixes and routes gc (default: the VPC "
            "endpoint with vpc→ecs, so https://ecs.<region>.aliyuncs.com/)"),
    Setting("aliyun_network_interface_id", "", "This instance's primary ENI, where eni-prefix addressing puts its "
            "prefixes (default: from metadata, the interface of the primary MAC)"),
    # AWS
    Setting("aws_region", "", "AWS region (default: from instance metadata)"),
    Setting("aws_route_table_id", "", "EC2 route table(s) to program, comma-separated (default: the tables of "
            "the VPC's subnets, else its main table)", _id_list),
    Setting("aws_subnet_ids", "", "Subnets whose route tables to program when no table is given "
            "(comma-separated; default: every subnet of the VPC)", _id_list),
    Setting("aws_disable_source_dest_check", True, "Turn off this instance's source/destination check "
            "(ModifyInstanceAttribute) when the route pass finds it on: checked on the first pass, then "
            "every 10th pass, and every pass while it finds a problem; false: only report it", _bool),
    Setting("aws_instance_id", "", "This EC2 instance's id (default: from metadata)"),
    Setting("aws_network_interface_id", "", "The network interface whose prefixes eni-prefix addressing "
            "assigns: this instance's primary one (default: from metadata, the interface of its MAC)"),
    Setting("aws_endpoint_url", "", "EC2 API URL override (e.g. a VPC endpoint, or moto in tests)"),
    Setting("aws_metadata_url", "http://169.254.169.254", "EC2 instance metadata service (IMDSv2)"),
)

_BY_ATTR = {s.attr: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    socket: str = "/run/docker/plugins/vpcnet.sock"
    state_dir: str = "/var/lib/vpcnet"
    provider: str = "local"
    cluster_cidr: str = "10.200.0.0/16"
    host_prefix: int = 24
    host_cidr: str = ""
    cluster_cidr_v6: str = ""
    host_prefix_v6: int = 80
    no_nat_cidrs: tuple[str, ...] = ()
    uplinks: tuple[str, ...] = ()
    mtu: int = 0
    default_mode: str = "auto"
    log_level: str = "INFO"
    log_format: str = "text"
    workers: int = 1
    threads: int = 8
    reconcile_interval: float = 30.0
    datapath_interval: float = 30.0
    metrics_addr: str = "127.0.0.1:9753"
    metrics_max_connections: int = 64
    metrics_allow: tuple[str, ...] = ()
    docker_socket: str = ""
    endpoint_metrics: str = "container"
    peer_metrics: str = "on"
    peers_per_endpoint: int = 32
    instance_id: str = ""
    cluster_name: str = ""
    route_table_quota: int = 0
    addressing: str = "route-table"
    warm_prefixes: int = 1
    prefix_cooldown: float = 30.0
    aliyun_endpoint: str = ""
    aliyun_region_id: str = ""
    aliyun_route_table_id: str = ""
    aliyun_vpc_id: str = ""
    aliyun_instance_id: str = ""
    aliyun_access_key_id: str = ""
    aliyun_access_key_secret: str = field(default="", repr=False)
    aliyun_credentials_file: str = ""
    aliyun_ram_role: str = ""
    aliyun_metadata_url: str = "http://100.100.100.200"
    aliyun_ecs_endpoint: str = ""
    aliyun_network_interface_id: str = ""
    aws_region: str = ""
    aws_route_table_id: str = ""
    aws_subnet_ids: str = ""
    aws_disable_source_dest_check: bool = True
    aws_instance_id: str = ""
    aws_network_interface_id: str = ""
    aws_endpoint_url: str = ""
    aws_metadata_url: str = "http://169.254.169.254"
    source: str = field(default="defaults", compare=False)

    @property
    def driver_name(self) -> str:
        name = os.path.basename(self.socket)
        return name[:-5] if name.endswith(".sock") else name

    @property
    def peers(self) -> bool:
        """Count traffic per peer: VPCNET_PEER_METRICS=on, and per-container metrics (a service sum has
        no endpoint to put a peer on)."""
        return self.peer_metrics == "on" and self.endpoint_metrics == "container"

    @property
    def db_path(self) -> str:
        return os.path.join(self.state_dir, "vpcnet.db")

    @property
    def default_cluster_cidr_v6(self) -> str:
        """The IPv6 cluster CIDR of networks made with --ipv6 and no IPv6 --subnet: VPCNET_CLUSTER_CIDR_V6, else
        `derived_ula`."""
        return self.cluster_cidr_v6 or derived_ula(self.cluster_name or self.cluster_cidr.replace("/", "-"))

    def host_prefix_for(self, cluster: str) -> int:
        """The host block prefix length in a cluster CIDR of either family."""
        return self.host_prefix_v6 if ":" in cluster else self.host_prefix

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict with secrets masked: safe for logs and `status`."""
        out = {}
        for s in SETTINGS:
            value = getattr(self, s.attr)
            out[s.attr] = ("***" if value else "") if s.secret else value
        return out


def derived_ula(identity: str) -> str:
    """A ULA /48 (RFC 4193: fd00::/8 and a 40-bit global id) whose global id is the first 40 bits of
    SHA-256 of the cluster identity: every host of a cluster computes the same one without asking anyone,
    and clusters of different identities sharing a VPC get different ones (as RFC 4193's random id)."""
    digest = hashlib.sha256(f"vpcnet-ula:{identity}".encode()).digest()[:5]
    return str(ipaddress.IPv6Network((int.from_bytes(b"\xfd" + digest + bytes(10), "big"), 48)))


assert {s.attr for s in SETTINGS} == {f.name for f in dataclasses.fields(Config)} - {"source"}


def load(path: str | None = None, environ: dict[str, str] | None = None,
         check_socket_dir: bool = True) -> Config:
    """Build the Config from defaults, the TOML file, then the environment; validate it."""
    environ = dict(os.environ) if environ is None else environ
    explicit = path is not None or "VPCNET_CONFIG" in environ
    path = path or environ.get("VPCNET_CONFIG") or DEFAULT_CONFIG_FILE
    values: dict[str, Any] = {}
    sources = []
    if os.path.exists(path):
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        for key, raw in data.items():
            setting = _BY_ATTR.get(key.lower())
            if setting is None:
                raise ConfigError(f"config file {path}: unknown key {key!r}")
            values[setting.attr] = _parse(setting, raw, f"{key} in {path}")
        sources.append(path)
    elif explicit:
        raise ConfigError(f"config file {path}: no such file")
    for setting in SETTINGS:
        if setting.env in environ:
            values[setting.attr] = _parse(setting, environ[setting.env], setting.env)
            sources.append(setting.env) if "env" not in sources else None
    config = Config(**values, source=", ".join(sources) or "defaults")
    validate(config, check_socket_dir=check_socket_dir)
    return config


def _parse(setting: Setting, raw: Any, where: str) -> Any:
    if isinstance(raw, list) and setting.parse in (_cidr_list, _link_list):
        raw = ",".join(str(x) for x in raw)
    try:
        return setting.parse(raw if isinstance(raw, str) else str(raw))
    except ValueError as exc:
        raise ConfigError(f"{where}: invalid value {'***' if setting.secret else repr(raw)}: {exc}") from None


def parse_addr(text: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`) -> (host, port). Raises ValueError naming the problem."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    host = host.strip("[]")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: port must be 0..65535")
    return host, int(port)


def validate(config: Config, check_socket_dir: bool = True) -> None:
    if config.provider not in cloud.provider_names():
        raise ConfigError(f"VPCNET_PROVIDER: unknown provider {config.provider!r} "
                          f"(choose one of {', '.join(cloud.provider_names())})")
    missing = cloud.missing_requirements(config.provider)
    if missing:
        raise ConfigError(missing)
    if not 8 <= config.host_prefix <= 30:
        raise ConfigError(f"VPCNET_HOST_PREFIX: /{config.host_prefix} is out of range: a host block needs "
                          "a gateway and at least one container address, so the prefix must be 8..30")
    if not config.cluster_cidr:
        raise ConfigError("VPCNET_CLUSTER_CIDR: must be set")
    cluster = ipaddress.IPv4Network(config.cluster_cidr)
    if config.addressing == "eni-prefix":
        # the range prefixes come from (a reserved /26 is common): no host block, at least one /28
        if cluster.prefixlen > 28:
            raise ConfigError(f"VPCNET_CLUSTER_CIDR: {cluster} holds no /28 prefix (eni-prefix addressing)")
    elif cluster.prefixlen >= config.host_prefix:
        raise ConfigError(f"VPCNET_CLUSTER_CIDR: {cluster} must be larger than one host block "
                          f"(/{config.host_prefix}, VPCNET_HOST_PREFIX)")
    if config.host_cidr:
        host = ipaddress.IPv4Network(config.host_cidr)
        if not host.subnet_of(cluster):
            raise ConfigError(f"VPCNET_HOST_CIDR: {host} is outside the cluster CIDR {cluster}")
        if host.prefixlen > 30:
            raise ConfigError(f"VPCNET_HOST_CIDR: {host} is too small for a gateway and one container "
                              "(at most /30)")
    cluster6 = ipaddress.IPv6Network(config.default_cluster_cidr_v6)
    if not 16 <= config.host_prefix_v6 <= 120:
        raise ConfigError(f"VPCNET_HOST_PREFIX_V6: /{config.host_prefix_v6} is out of range (16..120; the clouds "
                          "delegate /80 prefixes, the default)")
    if cluster6.prefixlen >= config.host_prefix_v6:
        raise ConfigError(f"VPCNET_CLUSTER_CIDR_V6: {cluster6} must be larger than one host block "
                          f"(/{config.host_prefix_v6}, VPCNET_HOST_PREFIX_V6)")
    if cluster6.is_link_local or cluster6.is_multicast or cluster6.is_loopback or cluster6.is_unspecified:
        raise ConfigError(f"VPCNET_CLUSTER_CIDR_V6: {cluster6} is not a unicast range containers can be "
                          "routed in (choose a ULA fd00::/8 range, or a global one the VPC routes)")
    if config.mtu and not 576 <= config.mtu <= 65535:
        raise ConfigError(f"VPCNET_MTU: {config.mtu} is out of range (0 = from uplink, else 576..65535)")
    if config.default_mode not in ("auto", "bridge", "routed", "ebpf"):
        raise ConfigError(f"VPCNET_DEFAULT_MODE: unknown mode {config.default_mode!r} (auto, bridge, routed or ebpf)")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"VPCNET_LOG_LEVEL: unknown level {config.log_level!r}")
    if config.log_format not in ("text", "json"):
        raise ConfigError(f"VPCNET_LOG_FORMAT: unknown format {config.log_format!r} (text or json)")
    if config.workers < 1 or config.threads < 1:
        raise ConfigError("VPCNET_WORKERS/VPCNET_THREADS: must be at least 1")
    if config.route_table_quota < 0:
        raise ConfigError("VPCNET_ROUTE_TABLE_QUOTA: must be 0 (the cloud's default) or more")
    if not 0 <= config.prefix_cooldown < float("inf"):
        raise ConfigError("VPCNET_PREFIX_COOLDOWN: must be a number of seconds, 0 or more")
    if config.addressing == "eni-prefix" and config.provider not in PREFIX_PROVIDERS:
        raise ConfigError(f"VPCNET_ADDRESSING: provider {config.provider!r} has no ENI prefixes (eni-prefix "
                          f"addressing needs one of {', '.join(sorted(PREFIX_PROVIDERS))})")
    if config.reconcile_interval <= 0:
        raise ConfigError("VPCNET_RECONCILE_INTERVAL: must be positive")
    if config.datapath_interval <= 0:
        raise ConfigError("VPCNET_DATAPATH_INTERVAL: must be positive")
    if config.metrics_addr:
        try:
            parse_addr(config.metrics_addr)
        except ValueError as exc:
            raise ConfigError(f"VPCNET_METRICS_ADDR: {exc} (e.g. 127.0.0.1:9753; empty turns metrics off)") from None
    if config.metrics_max_connections < 1:
        raise ConfigError("VPCNET_METRICS_MAX_CONNECTIONS: must be at least 1")
    if not config.socket.endswith(".sock"):
        raise ConfigError(f"VPCNET_SOCKET: {config.socket} must end in .sock (Docker discovers plugins by it)")
    sock_dir = os.path.dirname(config.socket) or "."
    if check_socket_dir and not os.path.isdir(sock_dir):
        raise ConfigError(f"VPCNET_SOCKET: directory {sock_dir} does not exist")


def markdown_table() -> str:
    """The settings table of docs/settings.md, generated from SETTINGS (`python3 -m vpcnet.config`)."""
    rows = ["| Environment variable | TOML key | Default | Meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = ",".join(s.default) if isinstance(s.default, tuple) else s.default
        rows.append(f"| `{s.env}` | `{s.attr}` | `{default}` | {s.description} |" if default != ""
                    else f"| `{s.env}` | `{s.attr}` | | {s.description} |")
    return "\n".join(rows)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML configuration file (default /etc/vpcnet/vpcnet.toml if present; "
                             "VPCNET_* environment variables override it)")


if __name__ == "__main__":
    print(markdown_table())
