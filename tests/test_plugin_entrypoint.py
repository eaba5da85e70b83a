"""plugin/entrypoint.py's choice of iptables backend, run for real: in a network namespace of the test's
own (where one backend holds more rules than the other) and a mount namespace of its own (a tmpfs over
/usr/local/sbin, where the entrypoint puts its links), so the host's rules and files are never touched."""
from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import require, run

pytestmark = pytest.mark.root

ENTRYPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugin", "entrypoint.py")

# Inside the namespaces: links left by an earlier start on the other backend, one rule in the backend
# `mode`, then the entrypoint's choice, then what each tool the plugin runs resolves to through the PATH
# the entrypoint sets.
PICK = r"""
set -e
mount -t tmpfs tmpfs /usr/local/sbin
for family in iptables ip6tables; do
    for suffix in "" -save -restore; do
        ln -s /usr/sbin/$family-$OTHER$suffix /usr/local/sbin/$family$suffix
    done
done
iptables-$MODE -t filter -A INPUT -m comment --comment vpcnet-test -j ACCEPT
"$PYTHON" - <<'PY'
import importlib.util, json, os, shutil
spec = importlib.util.spec_from_file_location("entrypoint", os.environ["ENTRYPOINT"])
entrypoint = importlib.util.module_from_spec(spec)
spec.loader.exec_module(entrypoint)
entrypoint.pick_iptables()
path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
print(json.dumps({tool: os.path.realpath(shutil.which(tool, path=path)) for tool in entrypoint.BACKEND_TOOLS}))
PY
"""


@pytest.mark.parametrize("mode", ["legacy", "nft"])
def test_the_entrypoint_uses_the_hosts_backend_for_iptables_and_ip6tables(mode):
    """The backend holding the host's rules is the one every tool resolves to: ip6tables and its save and
    restore included (vpcnet's IPv6 guard must sit where the host's firewall is looked at), and the save
    and restore tools under their real names (iptables-legacy-save: vpcnet writes with iptables-restore)."""
    for family in ("iptables", "ip6tables"):
        for backend in ("legacy", "nft"):
            require(os.path.exists(f"/usr/sbin/{family}-{backend}"), f"needs /usr/sbin/{family}-{backend}")
    proc = run(["unshare", "--mount", "--propagation", "private", "--net", "sh", "-c", PICK],
               env={**os.environ, "MODE": mode, "OTHER": {"legacy": "nft", "nft": "legacy"}[mode],
                    "ENTRYPOINT": ENTRYPOINT, "PYTHON": sys.executable})
    resolved = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(resolved) == {f"{family}{suffix}" for family in ("iptables", "ip6tables")
                             for suffix in ("", "-save", "-restore")}
    for tool, target in resolved.items():
        family, _, suffix = tool.partition("-")
        wanted = os.path.realpath(f"/usr/sbin/{family}-{mode}" + (f"-{suffix}" if suffix else ""))
        assert target == wanted, (tool, target, wanted, proc.stderr)
