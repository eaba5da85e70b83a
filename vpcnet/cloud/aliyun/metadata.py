"""The ECS instance metadata service, and this host's identity (region, instance, VPC) read from it.

Identity: a value given in the configuration wins; otherwise it is read from the instance metadata
service (`VPCNET_ALIYUN_METADATA_URL`), lazily, only for the values that are missing, and only once.
The metadata service is used in hardened mode (a session token from `PUT /latest/api/token`) and falls
back to plain GETs when the token request is refused. It also serves a RAM role's temporary keys
(`vpcnet.cloud.aliyun.credentials`).
"""
from __future__ import annotations

import logging
import threading
import time

import requests

from vpcnet.errors import Fatal, Retryable

log = logging.getLogger(__name__)

METADATA_TIMEOUT = 2.0              # the metadata service is link-local: answer fast or not at all
METADATA_TOKEN_TTL = 21600          # seconds asked for a hardened-mode metadata token
_NO_PROXY: dict = {"http": None, "https": None}   # the metadata service is never reached through a proxy


class Metadata:
    """The ECS instance metadata service, hardened (token) mode first, plain GETs when refused.

    Contacted only when a value is missing from the configuration; every call has a short timeout,
    since a host outside ECS would otherwise hang on an address nobody answers.
    """

    def __init__(self, base_url: str, session: requests.Session):
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._token = ""
        self._token_expires = 0.0
        self._plain = False            # the token PUT was refused: plain mode from now on
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Metadata({self.base_url!r}, mode={'plain' if self._plain else 'token'})"

    def _unreachable(self, exc: Exception) -> Retryable:
        return Retryable(f"instance metadata service {self.base_url} unreachable ({type(exc).__name__}): "
                         "is this an ECS instance? Otherwise set the VPCNET_ALIYUN_* identity settings")

    def _get_token(self, renew: bool = False) -> str:
        with self._lock:
            if self._plain:
                return ""
            if self._token and not renew and time.monotonic() < self._token_expires:
                return self._token
            try:
                resp = self._session.put(
                    f"{self.base_url}/latest/api/token",
                    headers={"X-aliyun-ecs-metadata-token-ttl-seconds": str(METADATA_TOKEN_TTL)},
                    timeout=METADATA_TIMEOUT, allow_redirects=False, proxies=_NO_PROXY)
            except requests.RequestException as exc:
                raise self._unreachable(exc) from None
            if resp.status_code in (403, 404, 405):
                log.info("metadata service %s refused a session token (HTTP %d): using plain mode",
                         self.base_url, resp.status_code)
                self._plain = True
                return ""
            if resp.status_code != 200 or not resp.text.strip():
                raise Retryable(f"instance metadata service {self.base_url}: token request answered "
                                f"HTTP {resp.status_code}")
            self._token = resp.text.strip()
            self._token_expires = time.monotonic() + METADATA_TOKEN_TTL - 60
            return self._token

    def get(self, path: str, what: str) -> str:
        """The text at `/latest/meta-data/<path>`; `what` names it in error messages."""
        url = f"{self.base_url}/latest/meta-data/{path}"
        token = self._get_token()
        for attempt in (1, 2):   # a second try only when the token was rejected (expired)
            headers = {"X-aliyun-ecs-metadata-token": token} if token else {}
            try:
                resp = self._session.get(url, headers=headers, timeout=METADATA_TIMEOUT,
                                         allow_redirects=False, proxies=_NO_PROXY)
            except requests.RequestException as exc:
                raise self._unreachable(exc) from None
            if resp.status_code == 401 and token and attempt == 1:
                token = self._get_token(renew=True)
                continue
            break
        if resp.status_code == 404:
            raise Fatal(f"instance metadata has no {what} ({url} answered 404)")
        if resp.status_code != 200:
            raise Retryable(f"instance metadata service: {what} answered HTTP {resp.status_code}")
        return resp.text.strip()


class Identity:
    """Region, instance id and VPC id of this host: the configured value, else instance metadata (once)."""

    def __init__(self, config, metadata: Metadata):
        self._config = config
        self._metadata = metadata
        self._values: dict[str, str] = {}
        self._lock = threading.Lock()

    def known(self) -> dict[str, str]:
        """The values resolved so far (for a repr)."""
        with self._lock:
            return dict(self._values)

    def _value(self, name: str, configured: str, path: str, what: str) -> str:
        with self._lock:
            if name not in self._values:
                if configured:
                    self._values[name] = configured
                else:
                    value = self._metadata.get(path, what)
                    if not value:
                        raise Fatal(f"instance metadata gave an empty {what}")
                    log.info("aliyun %s from instance metadata: %s", what, value)
                    self._values[name] = value
            return self._values[name]

    def region(self) -> str:
        return self._value("region", self._config.aliyun_region_id, "region-id",
                           "region id (VPCNET_ALIYUN_REGION_ID)")

    def instance_id(self) -> str:
        return self._value("instance", self._config.aliyun_instance_id, "instance-id",
                           "instance id (VPCNET_ALIYUN_INSTANCE_ID)")

    def vpc_id(self) -> str:
        return self._value("vpc", self._config.aliyun_vpc_id, "vpc-id", "VPC id (VPCNET_ALIYUN_VPC_ID)")
