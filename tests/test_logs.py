"""Log formats of a real `vpcnet serve` (aliyun provider against the real emulator, so cloud calls are
signed with a secret), both captured at DEBUG: the default text lines are unchanged, `json` gives one
JSON object per line with the Docker call, its duration and the ids, and the secret appears in neither."""
from __future__ import annotations

import json
import logging
import re

import pytest
from conftest import wait_for
from test_plugin_cloud import ME, SECRET, TABLE, cloud_env, emu, mine  # noqa: F401  (emu: fixture)

from vpcnet.observability.logs import JsonFormatter

NID = "f00dfeedbeef" + "2" * 52
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
POOL_REQUEST = {"AddressSpace": "vpcnet-local", "Pool": "", "SubPool": "", "Options": {}, "V6": False}


def test_json_formatter_carries_the_call_fields_and_nothing_else():
    record = logging.LogRecord("vpcnet.docker.transport", logging.DEBUG, __file__, 1, "%s -> %d", ("/X", 200), None)
    record.call, record.duration_ms, record.network = "NetworkDriver.Join", 1.5, "abc"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "/X -> 200" and line["level"] == "DEBUG" and line["logger"] == "vpcnet.docker.transport"
    assert (line["call"], line["duration_ms"], line["network"]) == ("NetworkDriver.Join", 1.5, "abc")
    assert "endpoint" not in line and line["time"].endswith("Z")


def _exercise(plugin, emu) -> None:  # noqa: F811
    assert wait_for(lambda: plugin.call("/IpamDriver.RequestPool", POOL_REQUEST)[0] == 200, 15), plugin.log()
    assert wait_for(lambda: [e for e in mine(emu) if e["Status"] == "Available"], 15)
    assert plugin.call("/NetworkDriver.DeleteEndpoint", {"NetworkID": NID, "EndpointID": "e" * 64})[0] == 200
    assert plugin.call("/NetworkDriver.Join", {"NetworkID": NID})[0] == 400        # an error line too


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_format_at_debug_and_no_secret(emu, plugin_factory, fmt):  # noqa: F811
    env = cloud_env(emu.test_url, VPCNET_LOG_LEVEL="DEBUG")
    if fmt == "json":
        env["VPCNET_LOG_FORMAT"] = "json"
    plugin = plugin_factory(env)
    _exercise(plugin, emu)
    plugin.stop()
    with open(plugin.log_path, errors="replace") as fh:
        lines = [line for line in fh.read().splitlines() if line.strip()]
    assert lines and SECRET not in "\n".join(lines), "the AccessKey secret reached the log"
    if fmt == "text":
        ours = [line for line in lines if TEXT_LINE.match(line)]
        assert any("vpcnet.docker.transport: /NetworkDriver.DeleteEndpoint -> 200" in line for line in ours), lines
        assert not any(line.lstrip().startswith("{") for line in lines), "a JSON line in the text format"
        return
    records = [json.loads(line) for line in lines]          # every line is one JSON object
    calls = {r["call"]: r for r in records if "call" in r}
    delete = calls["NetworkDriver.DeleteEndpoint"]
    assert delete["network"] == NID[:12] and delete["endpoint"] == "e" * 12 and delete["status"] == 200
    assert isinstance(delete["duration_ms"], float) and delete["level"] == "DEBUG"
    assert calls["NetworkDriver.Join"]["status"] == 400 and calls["NetworkDriver.Join"]["level"] == "INFO"
    assert "IpamDriver.RequestPool" in calls
    claimed = [r for r in records if r.get("event") == "route_claim" and r.get("outcome") == "claimed"]
    assert len(claimed) == 1, records                           # the route pass's line, with its fields
    entry = mine(emu)[0]
    assert (claimed[0]["table"], claimed[0]["destination"], claimed[0]["next_hop"]) == \
        (TABLE, entry["DestinationCidrBlock"], ME)
    assert claimed[0]["cluster"] and claimed[0]["message"].startswith(f"claimed block {entry['DestinationCidrBlock']}")
    assert any(r["logger"].startswith("gunicorn") for r in records), "gunicorn's lines are JSON too"
