"""The plugin's own side: its state (read-only; the other checks work from what this one loads), its
socket, and its /healthz on the metrics listener."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from vpcnet.cli.doctor.findings import HTTP_TIMEOUT, Checks, Finding, ok, problem

_HEALTH_FIXES = {
    "socket": "the plugin's socket does not answer: restart the plugin",
    "store": "the state dir is full or read-only: free space, check the mount",
    "reconciler": "the reconciler is stuck or dead: see the plugin's log, restart the plugin",
}


class PluginChecks(Checks):
    def check_state(self) -> list[Finding]:
        from vpcnet.state.store import Store

        ctx = self.ctx
        try:
            store = ctx.store = Store(self.config.db_path, readonly=True)
        except FileNotFoundError:
            return [problem("state", f"no vpcnet state at {self.config.db_path}",
                            "start the plugin (`vpcnet serve` or `docker plugin enable`), or point "
                            "VPCNET_STATE_DIR / --config at the state it uses")]
        ctx.networks = store.networks()
        ctx.endpoints = store.endpoints()
        ctx.claims = store.claims()
        return [ok("state", f"{self.config.db_path}: {len(ctx.networks)} network(s), "
                            f"{len(ctx.endpoints)} endpoint(s)")]

    def check_pending(self) -> list[Finding]:
        """Rows a crashed call left pending for longer than any call lasts: the plugin's datapath pass
        undoes them (at start too), so one still here means the plugin is not running its pass."""
        import time

        from vpcnet.cli.doctor.engine import STRANDED_AFTER

        store, now = self.ctx.store, time.time()
        if store is None:
            return []
        nets, eps = store.pending()
        out = [problem("pending", f"{kind} {obj_id[:12]} has been pending for {now - created:.0f} s: its call died "
                                  "between the commit and the kernel work",
                       "restart the plugin (its start undoes it), and see its log")
               for kind, obj_id, created in [("network", n.network_id, n.created) for n in nets] +
               [("endpoint", e.endpoint_id, e.created) for e in eps] if now - created > STRANDED_AFTER]
        return out or [ok("pending", "no row left pending by a crashed call")]

    def socket_path(self) -> str:
        plugin = self.ctx.plugin
        if plugin:
            return os.path.join("/run/docker/plugins", plugin["Id"], plugin["Config"]["Interface"]["Socket"])
        return self.config.socket

    def check_socket(self) -> list[Finding]:
        from vpcnet.observability.health import socket_answers

        path = self.socket_path()
        why = socket_answers(path)
        if why:
            return [problem("socket", why, "start the plugin (`systemctl start vpcnet`, `vpcnet serve`, or "
                                           "`docker plugin enable`) and check its log")]
        return [ok("socket", f"{path} answers")]

    def check_health(self) -> list[Finding]:
        from vpcnet.observability.health import read_addr

        addr = read_addr(self.config.state_dir) or self.config.metrics_addr
        if not addr:
            return [ok("health", "metrics and health listener off (VPCNET_METRICS_ADDR empty): not checked")]
        url = f"http://{addr}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            failing = {k: v.get("problem", "") for k, v in body.get("checks", {}).items() if not v.get("ok")}
            return [problem("health", f"{url}: {name} failing: {why}", _HEALTH_FIXES.get(name, "see the plugin's log"))
                    for name, why in sorted(failing.items())] or [
                problem("health", f"{url} answered HTTP {exc.code}", "see the plugin's log")]
        except (OSError, ValueError) as exc:
            return [problem("health", f"{url} does not answer: {exc}",
                            "is the plugin running, and VPCNET_METRICS_ADDR the same for it and for doctor?")]
        return [ok("health", f"{url}: " + ", ".join(sorted(body.get("checks", {}))) + " passing")]
