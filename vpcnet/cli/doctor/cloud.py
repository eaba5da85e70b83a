"""The cloud: this host's route in every table it must be in (present, Available, its next hop this
instance), each table's quota headroom, the cloud forwarding routed traffic, the clock against the API's
(signatures fail when it drifts) and the metadata service when the configuration relies on it. Only the
read-only calls `vpcnet routes list` makes. In eni-prefix addressing the route findings are skipped (said in
one finding): prefixes.py checks that mode."""
from __future__ import annotations

import email.utils
import os
import time
import urllib.error
import urllib.request
from typing import Callable

from vpcnet.cli.doctor.findings import HTTP_TIMEOUT, Checks, Context, Finding, ok, problem
from vpcnet.routes.tables import FAMILY_NAMES, table_usage

CLOCK_SKEW_LIMIT = 300.0       # seconds; signatures fail past 15 min, so warn well before
QUOTA_WARN = 0.8


class CloudChecks(Checks):
    def __init__(self, ctx: Context, provider_factory: Callable | None = None):
        super().__init__(ctx)
        self._provider_factory = provider_factory

    def provider(self):
        if not hasattr(self, "_provider"):
            from vpcnet.cloud import make_provider

            self._provider = (self._provider_factory or make_provider)(self.config)
        return self._provider

    def check_routes(self) -> list[Finding]:
        """This host's route in every table it must be in: present, Available, its next hop this
        instance; each table's quota headroom; the cloud forwarding routed traffic (AWS source/dest)."""
        from vpcnet.errors import Retryable

        if self.config.addressing == "eni-prefix":
            # No route is written in this mode, and AWS's source/destination check covers prefixes (it
            # stays on): prefixes.py checks this mode instead.
            return [ok("routes", "skipped: eni-prefix addressing writes no route, so route presence, route-table "
                                 "quota and the source/destination check do not apply (see the prefix checks)")]
        provider = self.provider()
        where = self._endpoint() or provider.table_id()
        try:
            me = provider.instance_id()
            listings = {table: provider.list_routes(table) for table in provider.table_ids()}
        except Retryable as exc:
            return [problem("cloud", f"the {self.config.provider} API ({where}) is unreachable: {exc}",
                            "check the host's network path and proxy to the API endpoint, and the "
                            "endpoint setting")]
        except Exception as exc:
            return [problem("cloud", f"cannot read the {self.config.provider} route tables: {exc}",
                            "fix the credentials or ids named above")]
        out = [ok("cloud", f"{self.config.provider} route table(s) listed: "
                           + ", ".join(f"{t} ({len(r)} entries)" for t, r in listings.items()))]
        claims = self.ctx.claims
        if not claims and self.ctx.networks:
            out.append(problem("claim", "networks exist but no host CIDR is claimed", "see the plugin's log"))
        for claim in claims:
            if not claim.host_cidr:
                out.append(problem("claim", f"no host CIDR claimed in {claim.cluster_cidr}: "
                                            f"{claim.reason or 'claim in progress'}",
                                   "see `vpcnet routes sync` for the reason"))
                continue
            for table, routes in listings.items():
                out.append(self._route_finding(claim.host_cidr, me, table, routes))
        for table, routes in listings.items():
            out.extend(self._quota_findings(provider, table, routes))
        try:
            forwarding = provider.check_forwarding(disable=False)    # look only: doctor never repairs
        except Exception as exc:
            forwarding = [f"cannot check whether the cloud forwards this host's routed traffic: {exc}"]
        for warning in forwarding:
            out.append(problem("source_dest_check", warning, "as named"))
        return out

    @staticmethod
    def _route_finding(host_cidr: str, me: str, table: str, routes: list) -> Finding:
        entry = next((r for r in routes if r.destination == host_cidr), None)
        if entry is None:
            return problem("route", f"route {host_cidr} -> {me} is missing from {table}",
                           "the reconciler re-creates it within VPCNET_RECONCILE_INTERVAL; "
                           "`vpcnet routes sync` does it now")
        if entry.next_hop != me:
            return problem("route", f"route {host_cidr} in {table} points at {entry.next_hop or '?'}, not this "
                                    f"instance {me}", "another host or a hand-made route holds the block: "
                                                      "release it there, or give this host another block")
        if entry.status != "Available":
            return problem("route", f"route {host_cidr} -> {me} in {table} is {entry.status}",
                           "wait for the cloud to settle it; if it stays, see the cloud console")
        return ok("route", f"{host_cidr} -> {me} Available in {table}")

    @staticmethod
    def _quota_findings(provider, table: str, routes: list) -> list[Finding]:
        """One finding per quota the table has: one for both families, or one per family where the cloud
        counts each against its own (AWS)."""
        out = []
        for usage in table_usage(table, routes, provider.table_quota(table),
                                 getattr(provider, "quota_per_family", False)):
            kind = "" if usage.family == "all" else f"{FAMILY_NAMES[usage.family]} "
            custom, quota = usage.entries, usage.quota
            if not quota:
                out.append(ok("quota", f"{table}: {custom} custom {kind}entries (no quota)"))
                continue
            share = custom / quota
            if share > QUOTA_WARN:
                out.append(problem("quota", f"route table {table} holds {custom} of {quota} custom {kind}entries "
                                            f"({share:.0%})", "run `vpcnet routes gc`, or raise the route table "
                                            f"quota ({provider.quota_hint or 'see the cloud console'})"))
            else:
                out.append(ok("quota", f"{table}: {custom} of {quota} custom {kind}entries ({share:.0%})"))
        return out

    def _endpoint(self) -> str:
        if self.config.provider == "aliyun":
            return self.config.aliyun_endpoint or (
                f"https://vpc.{self.config.aliyun_region_id}.aliyuncs.com/" if self.config.aliyun_region_id else "")
        if self.config.provider == "aws":
            return self.config.aws_endpoint_url or (
                f"https://ec2.{self.config.aws_region}.amazonaws.com/" if self.config.aws_region else "")
        return ""

    def check_clock(self) -> list[Finding]:
        url = self._endpoint()
        if not url:
            return [ok("clock", "no cloud endpoint to compare clocks with")]
        try:
            request = urllib.request.Request(url, method="GET")
            try:
                with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as resp:
                    date = resp.headers.get("Date")
            except urllib.error.HTTPError as exc:          # an error page still carries the Date
                date = exc.headers.get("Date")
        except OSError as exc:
            return [ok("clock", f"not compared: {url} does not answer ({exc}); see the cloud check")]
        if not date:
            return [ok("clock", f"not compared: {url} sends no Date header")]
        skew = time.time() - email.utils.parsedate_to_datetime(date).timestamp()
        if abs(skew) > CLOCK_SKEW_LIMIT:
            return [problem("clock", f"this host's clock is {skew:+.0f} s off the cloud's: request signatures "
                                     "fail past 15 minutes", "enable NTP (chrony or systemd-timesyncd)")]
        return [ok("clock", f"{skew:+.1f} s off the cloud's clock")]

    def check_metadata(self) -> list[Finding]:
        cfg = self.config
        if cfg.provider == "aliyun":
            needed = not (cfg.aliyun_region_id and cfg.aliyun_instance_id and
                          (cfg.aliyun_route_table_id or cfg.aliyun_vpc_id)) or bool(cfg.aliyun_ram_role)
            url = cfg.aliyun_metadata_url
        elif cfg.provider == "aws":
            needed = not (cfg.aws_region and cfg.aws_instance_id and cfg.aws_route_table_id) or not (
                os.environ.get("AWS_ACCESS_KEY_ID"))
            url = cfg.aws_metadata_url
        else:
            return [ok("metadata", "not needed by the local provider")]
        if not needed:
            return [ok("metadata", "not needed: ids and credentials are configured")]
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/", timeout=HTTP_TIMEOUT):
                pass
        except urllib.error.HTTPError:
            pass                               # an answer, even a 401/404, means it is reachable
        except OSError as exc:
            return [problem("metadata", f"the instance metadata service {url} is unreachable ({exc}) and the "
                                        "configuration relies on it", "configure the ids (and keys) explicitly, "
                                                                      "or allow the host to reach it")]
        return [ok("metadata", f"{url} reachable")]
