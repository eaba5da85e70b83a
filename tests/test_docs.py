"""The guides in docs/ are tested, not prose: their code blocks are extracted and run or validated.

Block tags (the info string after ```):
- `sh test`     run here, in order, with names made unique (plugin, network, container, state dir,
                cluster CIDR, install prefix); lines ending in `# not run in tests...` are skipped.
- `sh cloud`    cloud-side commands (aliyun/aws CLIs, a real cloud): shell syntax checked, and every
                `VPCNET_*` name must be a real setting.
- `json policy` a RAM/IAM policy: must parse and name exactly the actions vpcnet calls.
- `toml config` a vpcnet.toml example: must load with vpcnet.config.load.
- `yaml prometheus` / `yaml rules` (monitoring.md): must pass `promtool check config` / `check rules`, and
                the alerts `promtool test rules` below; every `vpcnet_*` name must be a served family.
Every `sh` block must carry one of the two tags: no untested commands.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid

import pytest
from conftest import docker_up, free_cluster, is_root, require, unique

from vpcnet import config as config_mod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
GUIDES = ("managed-plugin.md", "systemd.md", "deploy-aliyun.md", "deploy-aws.md", "monitoring.md")
BLOCK = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)
SKIP_MARK = re.compile(r"#\s*not run in tests")
SETTING_NAMES = {s.env for s in config_mod.SETTINGS}

ALIYUN_ACTIONS = {"vpc:CreateRouteEntry", "vpc:CreateRouteEntries", "vpc:DeleteRouteEntry", "vpc:DescribeRouteEntryList",
                  "vpc:DescribeRouteTableList", "vpc:DescribeVSwitches", "ecs:DescribeInstances"}
ALIYUN_MUTATING = {"vpc:CreateRouteEntry", "vpc:CreateRouteEntries", "vpc:DeleteRouteEntry"}
AWS_ACTIONS = {"ec2:DescribeRouteTables", "ec2:CreateRoute", "ec2:DeleteRoute", "ec2:ReplaceRoute",
               "ec2:CreateTags", "ec2:DeleteTags", "ec2:DescribeTags", "ec2:DescribeInstances", "ec2:DescribeInstanceAttribute",
               "ec2:DescribeNetworkInterfaces", "ec2:DescribeSubnets", "ec2:ModifyInstanceAttribute",
               "ec2:ModifyNetworkInterfaceAttribute"}
AWS_MUTATING = {"ec2:CreateRoute", "ec2:DeleteRoute", "ec2:ReplaceRoute"}
AWS_TAGGING = {"ec2:CreateTags", "ec2:DeleteTags"}     # the marker: on instances and route tables
AWS_FORWARDING = {"ec2:ModifyInstanceAttribute", "ec2:ModifyNetworkInterfaceAttribute"}


def _called_actions(package: str, pattern: str) -> set[str]:
    """The API actions a provider package really calls, read from the source of its modules."""
    found: set[str] = set()
    folder = os.path.join(REPO, "vpcnet", "cloud", package)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as fh:
                found |= set(re.findall(pattern, fh.read()))
    return found


def test_the_policies_name_exactly_the_actions_the_providers_call():
    aws = {"ec2:" + "".join(w.capitalize() for w in op.split("_"))
           for op in _called_actions("aws", r'"((?:describe|create|delete|replace|modify)_[a-z_]+)"')}
    assert aws == AWS_ACTIONS
    aliyun = {"vpc:" + a for a in _called_actions("aliyun", r'\._client\(\)\.call\("(\w+)"')}
    aliyun |= {"ecs:" + a for a in _called_actions("aliyun", r'self\._ecs\.call\("(\w+)"')}
    assert aliyun == ALIYUN_ACTIONS


def blocks(doc: str, info: str | None = None) -> list[str]:
    with open(os.path.join(DOCS, doc)) as fh:
        text = fh.read()
    found = [(m.group(1).strip(), m.group(2)) for m in BLOCK.finditer(text)]
    return [body for tag, body in found if info is None or tag == info]


def all_blocks(doc: str) -> list[tuple[str, str]]:
    with open(os.path.join(DOCS, doc)) as fh:
        return [(m.group(1).strip(), m.group(2)) for m in BLOCK.finditer(fh.read())]


def runnable(body: str, subs: list[tuple[str, str]]) -> str:
    lines = [line for line in body.splitlines() if not SKIP_MARK.search(line)]
    script = "\n".join(lines)
    for old, new in subs:
        script = script.replace(old, new)
    return script


def bash(script: str, timeout: float = 1200, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, f"doc block failed ({proc.returncode}):\n{script}\n--- stdout\n{proc.stdout}" \
                                 f"\n--- stderr\n{proc.stderr[-4000:]}"
    return proc


# -- static checks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc", GUIDES)
def test_every_shell_block_is_tested_or_marked_cloud(doc):
    tags = [tag for tag, _ in all_blocks(doc)]
    assert tags, f"{doc} has no code blocks"
    for tag in tags:
        if tag.split()[:1] in (["sh"], ["bash"], ["shell"], ["console"]):
            assert tag in ("sh test", "sh cloud"), f"{doc}: untagged shell block ```{tag}"


@pytest.mark.parametrize("doc", GUIDES)
def test_settings_named_in_the_guides_exist(doc):
    with open(os.path.join(DOCS, doc)) as fh:
        names = set(re.findall(r"\bVPCNET_[A-Z0-9_]*[A-Z0-9]\b", fh.read()))
    names -= {"VPCNET_TEST_STRICT", "VPCNET_EMULATOR_ACCESS_KEYS", "VPCNET_PLUGIN_CACHE"}
    assert names <= SETTING_NAMES, f"{doc} names unknown settings: {sorted(names - SETTING_NAMES)}"


@pytest.mark.parametrize("doc", ("deploy-aliyun.md", "deploy-aws.md"))
def test_cloud_blocks_are_valid_shell(doc):
    cloud = blocks(doc, "sh cloud")
    assert cloud
    for body in cloud:
        proc = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{doc}: {proc.stderr}\n{body}"


def _policy_actions(statement) -> set[str]:
    actions = statement["Action"]
    return {actions} if isinstance(actions, str) else set(actions)


def test_aliyun_ram_policy_is_least_privilege():
    (body,) = blocks("deploy-aliyun.md", "json policy")
    policy = json.loads(body)
    assert policy["Version"] == "1"
    actions = set().union(*(_policy_actions(s) for s in policy["Statement"]))
    assert actions == ALIYUN_ACTIONS
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        if _policy_actions(statement) & ALIYUN_MUTATING:
            assert _policy_actions(statement) <= ALIYUN_MUTATING
            resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
            assert all(re.fullmatch(r"acs:vpc:[a-z0-9-]+:\d+:routetable/vtb-[a-z0-9]+", r) for r in resources)
    # the provider's own hint names the same permissions
    from vpcnet.cloud.aliyun import rpc
    for action in ALIYUN_ACTIONS:
        assert action in rpc._PERMISSIONS


def test_aws_iam_policy_is_least_privilege():
    (body,) = blocks("deploy-aws.md", "json policy")
    policy = json.loads(body)
    assert policy["Version"] == "2012-10-17"
    actions = set().union(*(_policy_actions(s) for s in policy["Statement"]))
    assert actions == AWS_ACTIONS
    for statement in policy["Statement"]:
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        if _policy_actions(statement) & AWS_MUTATING:
            assert _policy_actions(statement) <= AWS_MUTATING
            assert all(re.fullmatch(r"arn:aws:ec2:[a-z0-9-]+:\d{12}:route-table/rtb-[0-9a-f]+", r) for r in resources)
        if _policy_actions(statement) & AWS_TAGGING:
            assert _policy_actions(statement) <= AWS_TAGGING
            assert all(re.fullmatch(r"arn:aws:ec2:[a-z0-9-]+:\d{12}:(route-table/rtb-[0-9a-f]+|instance/\*)", r)
                       for r in resources)
        if _policy_actions(statement) & AWS_FORWARDING:
            assert _policy_actions(statement) <= AWS_FORWARDING
            assert all(re.fullmatch(r"arn:aws:ec2:[a-z0-9-]+:\d{12}:(instance|network-interface)/\*", r)
                       for r in resources)
    with open(os.path.join(DOCS, "deploy-aws.md")) as fh:
        text = fh.read()
    assert "--no-source-dest-check" in text and "--http-put-response-hop-limit 2" in text
    assert "L-93826ACB" in text and "VPCNET_AWS_DISABLE_SOURCE_DEST_CHECK" in text


@pytest.mark.parametrize("doc", ("systemd.md", "deploy-aliyun.md", "deploy-aws.md"))
def test_config_examples_load(doc, tmp_path):
    examples = blocks(doc, "toml config")
    assert examples
    for i, body in enumerate(examples):
        path = tmp_path / f"example{i}.toml"
        path.write_text(body)
        cfg = config_mod.load(str(path), environ={}, check_socket_dir=False)
        assert cfg.source == str(path)


# -- systemd.md, run into a temporary prefix ----------------------------------------------------------
def test_systemd_guide_commands(tmp_path):
    prefix = tmp_path / "root"
    stub = tmp_path / "bin" / "vpcnet"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    subs = [("vpcnet install-systemd", f"{sys.executable} -m vpcnet.cli install-systemd --prefix {prefix} "
                                       f"--vpcnet {stub}"),
            ("/etc/systemd/system/", f"{prefix}/etc/systemd/system/")]
    scripts = [runnable(body, subs) for body in blocks("systemd.md", "sh test")]
    if not shutil.which("systemd-analyze"):
        require(False, "needs systemd-analyze (apt-get install systemd) for systemd.md's verify step")
    for script in scripts:
        if script.strip():
            bash(script, timeout=300)
    assert (prefix / "etc/systemd/system/vpcnet.service").exists()
    assert oct((prefix / "etc/vpcnet/vpcnet.env").stat().st_mode & 0o777) == "0o600"


# -- managed-plugin.md on the real engine ------------------------------------------------------------------
@pytest.fixture
def guide_names(tmp_path, test_image):
    require(is_root(), "needs root")
    require(docker_up(), "needs a running Docker engine")
    cache = os.environ.get("VPCNET_PLUGIN_CACHE", "/var/cache/vpcnet-plugin")
    have = os.path.isdir(cache) and any(f.startswith("runtime-") for f in os.listdir(cache))
    require(shutil.which("debootstrap") is not None or have, "needs debootstrap to build the plugin")
    names = {
        "plugin": f"vpcnet-doc-{uuid.uuid4().hex[:8]}:latest",
        "state": str(tmp_path / "state"),
        "cluster": free_cluster(228, 250, shuffle=True),
        "net": unique("docnet"),
        "web": unique("docweb"),
        "dir": str(tmp_path / "plugin-dir"),
        "tgz": str(tmp_path / "plugin.tgz"),
    }
    assert test_image == "vpcnet-testbox:latest"
    yield names
    docker = ["docker"]
    subprocess.run([*docker, "rm", "-f", names["web"]], capture_output=True, timeout=60)
    subprocess.run([*docker, "network", "rm", names["net"]], capture_output=True, timeout=60)
    subprocess.run([*docker, "plugin", "disable", "-f", names["plugin"]], capture_output=True, timeout=60)
    subprocess.run([*docker, "plugin", "rm", "-f", names["plugin"]], capture_output=True, timeout=60)


def test_managed_plugin_guide_commands(guide_names):
    n = guide_names
    subs = [("vpcnet:latest", n["plugin"]), ("/var/lib/vpcnet", n["state"]), ("10.200.0.0/16", n["cluster"]),
            ("appnet", n["net"]), ("web1", n["web"]), ("/var/tmp/vpcnet-plugin-dir", n["dir"]),
            ("/var/tmp/vpcnet-plugin.tgz", n["tgz"]), ("plugin/build.sh", f"bash {REPO}/plugin/build.sh")]
    scripts = [runnable(body, subs) for body in blocks("managed-plugin.md", "sh test")]
    assert len(scripts) >= 5
    for script in scripts:
        bash(script)
    # the guide removed what it made, and the state stayed on the host
    assert subprocess.run(["docker", "plugin", "inspect", n["plugin"]], capture_output=True).returncode != 0
    assert os.path.exists(os.path.join(n["state"], "vpcnet.db"))


# -- monitoring.md: the Prometheus configuration and alerts -------------------------------------------
ALERT_TESTS = """
rule_files: [vpcnet-rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'vpcnet_route_available{instance="h1", cluster_cidr="10.200.0.0/16", host_cidr="10.200.1.0/24"}'
        values: '1 1 0 0 0 0 0'
      - series: 'vpcnet_route_available{instance="h2", cluster_cidr="10.200.0.0/16", host_cidr="10.200.2.0/24"}'
        values: '1 1 1 1 1 1 1'
      - series: 'vpcnet_route_reconcile_total{instance="h1", outcome="error"}'
        values: '0+1x20'
      - series: 'vpcnet_route_table_entries{instance="h1", table="vtb-1"}'
        values: '170x20'
      - series: 'vpcnet_route_table_quota{instance="h1", table="vtb-1"}'
        values: '200x20'
      - series: 'vpcnet_route_table_entries{instance="h1", table="vtb-2"}'
        values: '150x20'
      - series: 'vpcnet_route_table_quota{instance="h1", table="vtb-2"}'
        values: '200x20'
      - series: 'vpcnet_cloud_api_requests_total{instance="h1", provider="aliyun", action="CreateRouteEntry", outcome="throttled"}'
        values: '0+2x20'
      - series: 'vpcnet_cloud_api_requests_total{instance="h2", provider="aliyun", action="CreateRouteEntry", outcome="throttled"}'
        values: '5x20'
      - series: 'up{job="vpcnet", instance="h1"}'
        values: '1x20'
    alert_rule_test:
      - eval_time: 5m
        alertname: VpcnetRouteNotAvailable
        exp_alerts:
          - exp_labels: {severity: critical, instance: h1, cluster_cidr: 10.200.0.0/16, host_cidr: 10.200.1.0/24}
            exp_annotations:
              summary: "vpcnet route 10.200.1.0/24 of h1 is not Available"
              description: "Containers on this host are unreachable from other hosts. Run `vpcnet doctor` there."
      - eval_time: 3m
        alertname: VpcnetRouteNotAvailable
      - eval_time: 16m
        alertname: VpcnetReconcileErrors
        exp_alerts:
          - exp_labels: {severity: warning, instance: h1, outcome: error}
            exp_annotations:
              summary: "vpcnet on h1 keeps failing to reconcile its routes"
              description: "See the plugin's log and `vpcnet doctor` (cloud reachable, credentials, quota)."
      - eval_time: 15m
        alertname: VpcnetRouteTableQuotaHigh
        exp_alerts:
          - exp_labels: {severity: warning, table: vtb-1}
            exp_annotations:
              summary: "route table vtb-1 is 85% full"
              description: "New hosts cannot claim a block once it is full: `vpcnet routes gc`, or raise the quota."
      - eval_time: 16m
        alertname: VpcnetCloudThrottled
        exp_alerts:
          - exp_labels: {severity: warning, instance: h1, provider: aliyun}
            exp_annotations:
              summary: "the aliyun API throttles vpcnet on h1"
              description: "Other tools share the account's API rate; vpcnet backs off, but claims and repairs wait."
      - eval_time: 10m
        alertname: VpcnetDown
"""


@pytest.fixture
def monitoring_files(tmp_path):
    require(shutil.which("promtool") is not None, "needs promtool (Debian's prometheus package)")
    [config] = blocks("monitoring.md", "yaml prometheus")
    [rules] = blocks("monitoring.md", "yaml rules")
    (tmp_path / "prometheus.yml").write_text(config)
    (tmp_path / "vpcnet-rules.yml").write_text(rules)
    return tmp_path


def test_monitoring_config_and_rules_pass_promtool(monitoring_files):
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "vpcnet-rules.yml"]):
        proc = subprocess.run(["promtool", *args], cwd=monitoring_files, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_monitoring_alerts_fire_on_their_data_only(monitoring_files):
    (monitoring_files / "alerts-test.yml").write_text(ALERT_TESTS)
    proc = subprocess.run(["promtool", "test", "rules", "alerts-test.yml"], cwd=monitoring_files,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [rules] = blocks("monitoring.md", "yaml rules")
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS))
    assert tested == set(re.findall(r"alert: (\w+)", rules)), "every alert has a test"


def test_monitoring_names_only_served_families():
    from vpcnet.observability.events import FAMILIES

    with open(os.path.join(DOCS, "monitoring.md")) as fh:
        text = fh.read()
    named = set(re.findall(r"\bvpcnet_[a-z_]*[a-z]\b", text))
    served = set(FAMILIES) | {f + suffix for f in FAMILIES for suffix in ("_bucket", "_count", "_sum")}
    assert named - {"vpcnet_"} <= served, sorted(named - served)
    assert set(FAMILIES) <= named, f"families not documented: {sorted(set(FAMILIES) - named)}"
