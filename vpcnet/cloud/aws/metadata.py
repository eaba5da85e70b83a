"""The EC2 instance metadata service (IMDSv2), and this host's identity read from it.

Identity: `VPCNET_AWS_INSTANCE_ID` / `VPCNET_AWS_REGION` win; what is missing comes from IMDSv2 at
`VPCNET_AWS_METADATA_URL` (token PUT, then GETs; 2 s timeouts, no proxy), once. The provider also reads
this instance's VPC from here when it discovers the route tables; botocore's own metadata lookups
(instance-profile credentials) are pointed at the same URL (`vpcnet.cloud.aws.client`).
"""
from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request

from vpcnet.errors import Fatal

IMDS_TIMEOUT = 2.0
IMDS_TOKEN_TTL = 21600

HOP_LIMIT_HINT = (
    "set VPCNET_AWS_INSTANCE_ID and VPCNET_AWS_REGION (and VPCNET_AWS_ROUTE_TABLE_ID), or make IMDSv2 "
    "reachable: from inside a managed Docker plugin the metadata token's hop limit must be at least 2 "
    "(aws ec2 modify-instance-metadata-options --instance-id <id> --http-endpoint enabled "
    "--http-put-response-hop-limit 2)")


class ImdsMissing(Fatal):
    """IMDS answered, but not this path (HTTP 404)."""


class Imds:
    """IMDSv2 client: a session token (PUT), then GETs carrying it. Never through a proxy."""

    def __init__(self, url: str):
        self.url = (url or "http://169.254.169.254").rstrip("/")
        self._token = ""
        self._token_expires = 0.0
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._lock = threading.Lock()

    def _fail(self, what: str, reason: object) -> Fatal:
        return Fatal(f"EC2 instance metadata service (IMDSv2) at {self.url} did not answer {what} "
                     f"({reason}); {HOP_LIMIT_HINT}")

    def _open(self, request: urllib.request.Request, what: str) -> str:
        if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
            raise Fatal(f"cannot read {what}: the instance metadata service is disabled "
                        "(AWS_EC2_METADATA_DISABLED=true); set VPCNET_AWS_INSTANCE_ID and VPCNET_AWS_REGION")
        try:
            with self._opener.open(request, timeout=IMDS_TIMEOUT) as resp:
                return resp.read(65536).decode("utf-8", "replace").strip()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise ImdsMissing(f"EC2 instance metadata at {self.url} has no {what} (HTTP 404)") from None
            raise self._fail(what, f"HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise self._fail(what, f"{type(reason).__name__}: {reason}" if str(reason) else
                             type(reason).__name__) from None

    def token(self) -> str:
        with self._lock:
            if not self._token or time.monotonic() >= self._token_expires:
                req = urllib.request.Request(
                    self.url + "/latest/api/token", method="PUT", data=b"",
                    headers={"X-aws-ec2-metadata-token-ttl-seconds": str(IMDS_TOKEN_TTL)})
                self._token = self._open(req, "the token request (PUT /latest/api/token)")
                if not self._token:
                    raise self._fail("the token request", "empty token")
                self._token_expires = time.monotonic() + IMDS_TOKEN_TTL - 60
            return self._token

    def get(self, path: str) -> str:
        req = urllib.request.Request(self.url + path, headers={"X-aws-ec2-metadata-token": self.token()})
        return self._open(req, f"GET {path}")


class Identity:
    """This instance's id and region: the configured value, else IMDS (once)."""

    def __init__(self, config, imds: Imds):
        self._imds = imds
        self._instance = config.aws_instance_id
        self._region = config.aws_region
        self._lock = threading.Lock()

    def instance_id(self) -> str:
        with self._lock:
            if not self._instance:
                self._instance = self._imds.get("/latest/meta-data/instance-id")
            return self._instance

    def region(self) -> str:
        with self._lock:
            if not self._region:
                try:
                    self._region = self._imds.get("/latest/meta-data/placement/region")
                except ImdsMissing:
                    doc = self._imds.get("/latest/dynamic/instance-identity/document")
                    try:
                        self._region = str(json.loads(doc)["region"])
                    except (ValueError, KeyError, TypeError):
                        raise Fatal(f"EC2 instance identity document at {self._imds.url} has no region; "
                                    "set VPCNET_AWS_REGION") from None
            return self._region
