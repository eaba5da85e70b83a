"""The `aliyun` provider: this host's route in an Alibaba Cloud VPC route table.

Speaks the VPC OpenAPI 2016-04-28 (RPC style) over one `requests.Session`: CreateRouteEntry,
CreateRouteEntries (a host's route into several tables in one call), DeleteRouteEntry,
DescribeRouteEntryList (NextToken paging), DescribeRouteTableList (to find the VPC's
route tables), DescribeVSwitches (CIDRs a host block must avoid) and ECS DescribeInstances (for
`routes gc`). Each call is made once, and every request passes through `_RpcClient.call` (the one
place to count or time API calls): retries with backoff live in `vpcnet.routes`, which sees `Busy`
(TaskConflict, OperationConflict, throttling) / `Retryable` / `DuplicateRoute` / `QuotaExceeded` /
`Fatal` from here.

Route tables: `VPCNET_ALIYUN_ROUTE_TABLE_ID` takes one id or a comma-separated list (every host's route
goes into each, in that order; the first is where blocks are claimed, so give every host the same
list). Without it the tables are discovered once: those the VPC's vSwitches are bound to
(DescribeRouteTableList's `VSwitchIds`), or the VPC's only table. A VPC with several tables none of
which shows a bound vSwitch is ambiguous: vpcnet refuses, naming the candidates and the setting. A
table's quota is `VPCNET_ROUTE_TABLE_QUOTA`, or Alibaba's default of 200 custom entries.

Requests are POSTed with the signed parameters in a form body, never in the URL, so neither the
signature nor an STS token can reach a URL-logging library (urllib3 logs request lines at DEBUG) or the
text of a connection error.

Identity: a value given in the configuration wins; otherwise it is read from the instance metadata
service (`VPCNET_ALIYUN_METADATA_URL`), lazily, only for the values that are missing, and only once.
The metadata service is used in hardened mode (a session token from `PUT /latest/api/token`) and falls
back to plain GETs when the token request is refused.

Credentials, first match wins:
1. `VPCNET_ALIYUN_ACCESS_KEY_ID` + `VPCNET_ALIYUN_ACCESS_KEY_SECRET` (config file or environment);
2. `VPCNET_ALIYUN_CREDENTIALS_FILE`: a file readable by its owner only (mode 0600 or stricter; anything
   group- or world-readable is refused). Its format is forgiving so the usual files all work: one
   `key = value` (or `key: value`) per line; `#`/`;` comments, `[section]` headers (INI, TOML) and
   quotes around values (TOML) are ignored; the first occurrence of a key wins. Keys:
   `access_key_id` and `access_key_secret` (case, `-`/`_` and an `aliyun_`/`alibaba_cloud_` prefix do
   not matter, so `ALIBABA_CLOUD_ACCESS_KEY_ID=...` works too), optionally `security_token`. Example::

       # /etc/vpcnet/aliyun.credentials   (chmod 600)
       access_key_id = LTAI5t...
       access_key_secret = ...

   The file is re-read when it changes, so keys can be rotated without a restart;
3. `VPCNET_ALIYUN_RAM_ROLE`: temporary STS keys of the RAM role attached to the instance, from
   `<metadata>/latest/meta-data/ram/security-credentials/<role>`, refreshed when less than five minutes
   remain before their `Expiration`, and sent with their `SecurityToken`.

Several tables: when this host's route is missing from more than one table (every table but the
claiming one after a claim, or a repair), `create_routes` writes them all with one CreateRouteEntries
call (up to 50 entries, one VPC write). A failure of the whole call (TaskConflict while another host
writes, throttling, a lost answer) is raised and retried by the RouteKeeper with the same ClientToken
and the same entries, so an entry that landed is not created twice (the ClientToken makes the repeated
call idempotent; the emulator keys each entry on the token and its position). A failure of single entries comes back in
`FailedRouteEntries`, per table: each entry is created whole or not at all, so nothing is half-written
and nothing is rolled back; a duplicate means another route holds the block in that table (reported,
never touched), a quota error names the table, the figures and the Quota Center, a retryable one
gets that table its own CreateRouteEntry (a fresh token: the batch's token covers the whole list).
An endpoint without the batch call (InvalidAction) gets one CreateRouteEntry per table from then on
(BatchUnsupported tells the RouteKeeper).

Source/destination check: not checked or changed here (AWS's provider does). The API facts this module is
built against (PROTOCOL.md: VPC 2016-04-28 route calls, ECS DescribeInstances) expose no ENI or instance
attribute for Alibaba's ENI source/destination check, and no ECS action and parameter for it could be
confirmed, so vpcnet makes no guessed call; docs/deploy-aliyun.md tells the operator to turn it off.

Secrets (the AccessKey secret, the STS token, request signatures) never appear in a log line, an
exception message or a repr: error messages from the API are scrubbed of them before they are raised.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

import requests

from vpcnet import __version__
from vpcnet.cloud import BatchUnsupported, DuplicateRoute, Provider, QuotaExceeded, Route, table_list
from vpcnet.cloud.aliyun.signature import percent_encode, sign
from vpcnet.errors import Busy, Fatal, Retryable, VpcnetError
from vpcnet.observability import events

log = logging.getLogger(__name__)

VPC_API_VERSION = "2016-04-28"
ECS_API_VERSION = "2014-05-26"
API_TIMEOUT = (3.0, 10.0)           # (connect, read) seconds for every API call
METADATA_TIMEOUT = 2.0              # the metadata service is link-local: answer fast or not at all
METADATA_TOKEN_TTL = 21600          # seconds asked for a hardened-mode metadata token
REFRESH_MARGIN = 300.0              # refresh STS keys when fewer seconds than this remain
PAGE_SIZE = 100                     # DescribeRouteEntryList's MaxResult ceiling
MAX_PAGES = 50                      # 5000 entries: far above any route table quota
VSWITCH_CACHE_SECONDS = 300.0
DEFAULT_QUOTA = 200                 # custom entries per route table unless raised with Alibaba Cloud
MAX_BATCH = 50                      # entries one CreateRouteEntries call takes
_NO_PROXY: dict = {"http": None, "https": None}   # the metadata service is never reached through a proxy

# -- error codes ---------------------------------------------------------------------------------------
# Compared case-insensitively: Alibaba's own spelling varies (InvalidCIDRBlock vs InvalidCidrBlock).
RETRYABLE_CODES = {c.lower() for c in (
    "TaskConflict", "OperationConflict", "IncorrectRouteEntryStatus", "IncorrectStatus.RouteTableStatus",
    "IncorrectVpcStatus", "IncorrectInstanceStatus", "Throttling", "Throttling.User", "Throttling.Api",
    "ServiceUnavailable", "InternalError", "SystemBusy", "ServiceBusy", "UnknownError",
    "SignatureNonceUsed", "OperationFailed.LastTokenProcessing", "LastTokenProcessing",
)}
RETRYABLE_PREFIXES = ("throttling", "incorrectstatus", "serviceunavailable", "internalerror")
# "Not now" rather than "failed": another write of the VPC in progress, or throttling (vpcnet.routes
# keeps retrying these until a deadline that covers a boot storm).
BUSY_CODES = {c.lower() for c in ("TaskConflict", "OperationConflict", "LastTokenProcessing",
                                   "OperationFailed.LastTokenProcessing", "IncorrectStatus.RouteTableStatus",
                                   "IncorrectVpcStatus", "SystemBusy", "ServiceBusy")}
QUOTA_HINT = ("raise the quota of custom route entries per route table in the Alibaba Cloud Quota Center "
              "(https://quotas.console.aliyun.com/, product VPC, \"custom route entries per route table\"), then "
              "set VPCNET_ROUTE_TABLE_QUOTA to the new figure; or remove unused entries (`vpcnet routes gc`)")
DUPLICATE_CODES = {c.lower() for c in (
    "InvalidCIDRBlock.Duplicate", "InvalidRouteEntry.Duplicate", "RouterEntryConflict.Duplicated",
)}
# DeleteRouteEntry answers these for an entry that is already gone.
GONE_CODES = {c.lower() for c in (
    "InvalidRouteEntry.NotFound", "InvalidRouteEntryId.NotFound", "InvalidRouteEntry.NotExist",
    "InvalidRouteEntryId.NotExist", "InvalidRouteEntry.NotExists", "RouteEntryNotExist",
)}
UNSUPPORTED_CODES = {c.lower() for c in ("InvalidAction.NotFound", "InvalidAction", "UnsupportedOperation",
                                          "InvalidApi.NotFound")}
STS_EXPIRED_CODES = {c.lower() for c in ("InvalidSecurityToken.Expired",)}

_PERMISSIONS = ("vpc:CreateRouteEntry, vpc:CreateRouteEntries, vpc:DeleteRouteEntry, vpc:DescribeRouteEntryList, "
                "vpc:DescribeRouteTableList, vpc:DescribeVSwitches and ecs:DescribeInstances")
# What to check, per fatal code (matched case-insensitively, longest prefix first).
FATAL_HINTS = {k.lower(): v for k, v in {
    "SignatureDoesNotMatch": "check the AccessKey secret (VPCNET_ALIYUN_ACCESS_KEY_SECRET or the "
                             "credentials file) and that no proxy rewrites requests",
    "IncompleteSignature": "check the AccessKey secret and that no proxy rewrites requests",
    "InvalidAccessKeyId.NotFound": "check the AccessKey id (VPCNET_ALIYUN_ACCESS_KEY_ID or the "
                                   "credentials file): Alibaba Cloud does not know it",
    "InvalidAccessKeyId.Inactive": "the AccessKey is disabled: enable it or use another one",
    "InvalidAccessKeyId": "check the AccessKey id (VPCNET_ALIYUN_ACCESS_KEY_ID or the credentials file)",
    "Forbidden.RAM": f"the RAM user or role lacks a permission: grant it {_PERMISSIONS}",
    "Forbidden": f"the RAM user or role lacks a permission: grant it {_PERMISSIONS}",
    "NoPermission": f"the RAM user or role lacks a permission: grant it {_PERMISSIONS}",
    "InvalidTimeStamp": "this host's clock is off by more than 15 minutes: check NTP (chrony, "
                        "systemd-timesyncd)",
    "InvalidSecurityToken": "the STS SecurityToken is not valid for this AccessKey: check "
                            "VPCNET_ALIYUN_RAM_ROLE or the credentials file's security_token",
    "MissingSecurityToken": "this AccessKey is a temporary (STS) key: put its security_token in the "
                            "credentials file, or use VPCNET_ALIYUN_RAM_ROLE",
    "InvalidRouteTableId.NotFound": "check VPCNET_ALIYUN_ROUTE_TABLE_ID (every id of the list) and "
                                    "VPCNET_ALIYUN_REGION_ID",
    "InvalidInstanceId.NotFound": "the next-hop instance is not in this region: check "
                                  "VPCNET_ALIYUN_INSTANCE_ID and VPCNET_ALIYUN_REGION_ID",
    "InvalidCidrBlock.Malformed": "the destination is not a valid CIDR",
    "InvalidCidrBlock": "the destination overlaps a vSwitch CIDR or 100.64.0.0/10: choose another "
                        "VPCNET_CLUSTER_CIDR",
    "InvalidDestinationCidrBlock": "the destination overlaps a vSwitch CIDR or a reserved range: choose "
                                   "another VPCNET_CLUSTER_CIDR",
    "InvalidRegionId": "check VPCNET_ALIYUN_REGION_ID",
    "InvalidVpcId.NotFound": "check VPCNET_ALIYUN_VPC_ID and VPCNET_ALIYUN_REGION_ID",
    "InvalidAction": "the endpoint does not know this action: check VPCNET_ALIYUN_ENDPOINT",
    "MissingParameter": "vpcnet sent an incomplete request: please report it",
    "InvalidParameter": "the API refused a parameter: check the configured ids",
}.items()}


def _code_in(code: str, codes: set[str]) -> bool:
    return code.lower() in codes


def _hint(code: str) -> str:
    low = code.lower()
    for key in sorted(FATAL_HINTS, key=len, reverse=True):
        if low.startswith(key):
            return FATAL_HINTS[key]
    return "see the Alibaba Cloud VPC API error reference"


def _error(cls: type[VpcnetError], message: str, code: str = "") -> VpcnetError:
    """An exception of the vpcnet family that also carries the API error code."""
    exc = cls(message)
    exc.code = code  # type: ignore[attr-defined]
    return exc


def _parse_expiration(text: str) -> float:
    """STS `Expiration` (ISO 8601 UTC, e.g. 2024-05-01T10:00:00Z) as a Unix time."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


# -- instance metadata -------------------------------------------------------------------------------
class _Metadata:
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
        return f"_Metadata({self.base_url!r}, mode={'plain' if self._plain else 'token'})"

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


# -- credentials -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Keys:
    access_key_id: str
    secret: str = field(repr=False)
    token: str = field(default="", repr=False)
    expires: float = 0.0     # Unix time; 0 = long-lived keys
    source: str = ""

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.secret, self.token) if s)


_CREDENTIAL_KEYS = {"accesskeyid": "access_key_id", "accesskeysecret": "access_key_secret",
                    "securitytoken": "security_token", "ststoken": "security_token"}


def _credential_key(name: str) -> str:
    """`ALIBABA_CLOUD_ACCESS_KEY_ID`, `AccessKeyId`, `access-key-id` ... -> `access_key_id`."""
    key = name.strip().lower()
    if key.startswith("export "):
        key = key[len("export "):].strip()
    compact = key.replace("-", "").replace("_", "")
    for prefix in ("alibabacloud", "alicloud", "aliyun"):
        if compact.startswith(prefix):
            compact = compact[len(prefix):]
    return _CREDENTIAL_KEYS.get(compact, key)


def parse_credentials_text(text: str) -> dict[str, str]:
    """`access_key_id` / `access_key_secret` / `security_token` from INI, TOML or key=value text."""
    found: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;[":
            continue
        cut = min((i for i in (line.find("="), line.find(":")) if i > 0), default=-1)
        if cut < 0:
            continue
        key = _credential_key(line[:cut])
        value = line[cut + 1:].strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if key in ("access_key_id", "access_key_secret", "security_token") and value:
            found.setdefault(key, value)
    return found


class _Credentials:
    """Where the AccessKey comes from, and the current keys (refreshed before they expire)."""

    def __init__(self, config, metadata: _Metadata):
        self._config = config
        self._metadata = metadata
        self._keys: _Keys | None = None
        self._file_stamp: tuple | None = None
        self._lock = threading.Lock()
        self._problem = ""     # a configuration mistake, raised on first use (construction never fails)
        if config.aliyun_access_key_id or config.aliyun_access_key_secret:
            self.source = "config"
            if not (config.aliyun_access_key_id and config.aliyun_access_key_secret):
                missing = ("VPCNET_ALIYUN_ACCESS_KEY_SECRET" if config.aliyun_access_key_id
                           else "VPCNET_ALIYUN_ACCESS_KEY_ID")
                self._problem = (f"aliyun credentials: {missing} is not set (an AccessKey needs both its "
                                 "id and its secret)")
        elif config.aliyun_credentials_file:
            self.source = "file"
        elif config.aliyun_ram_role:
            self.source = "ram-role"
        else:
            self.source = "none"
            self._problem = ("aliyun credentials: none configured. Set VPCNET_ALIYUN_ACCESS_KEY_ID and "
                             "VPCNET_ALIYUN_ACCESS_KEY_SECRET, or VPCNET_ALIYUN_CREDENTIALS_FILE (a file "
                             "with access_key_id/access_key_secret, mode 0600), or VPCNET_ALIYUN_RAM_ROLE "
                             "(the RAM role attached to this instance)")

    def __repr__(self) -> str:
        key_id = self._keys.access_key_id if self._keys else "?"
        return f"_Credentials(source={self.source!r}, access_key_id={key_id!r})"

    def get(self) -> _Keys:
        if self._problem:
            raise Fatal(self._problem)
        with self._lock:
            if self.source == "config":
                if self._keys is None:
                    self._keys = _Keys(self._config.aliyun_access_key_id,
                                       self._config.aliyun_access_key_secret, source="config")
            elif self.source == "file":
                self._load_file()
            else:
                self._refresh_role()
            assert self._keys is not None
            return self._keys

    def invalidate(self) -> None:
        """Forget temporary keys the API called expired, so the next call fetches new ones."""
        with self._lock:
            if self.source == "ram-role":
                self._keys = None

    def _load_file(self) -> None:
        path = self._config.aliyun_credentials_file
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise Fatal(f"aliyun credentials file {path}: cannot open it: {exc.strerror}") from None
        try:
            st = os.fstat(fd)   # checked on the open file, so the mode is that of what is read
            if not stat.S_ISREG(st.st_mode):
                raise Fatal(f"aliyun credentials file {path}: not a regular file")
            if st.st_mode & 0o077:
                raise Fatal(f"aliyun credentials file {path} is readable or writable by group or others "
                            f"(mode {stat.S_IMODE(st.st_mode):04o}): refusing it; run "
                            f"`chmod 600 {path}`")
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._keys is not None and stamp == self._file_stamp:
                return
            with os.fdopen(os.dup(fd), encoding="utf-8") as fh:
                text = fh.read()
        finally:
            os.close(fd)
        values = parse_credentials_text(text)
        missing = [k for k in ("access_key_id", "access_key_secret") if k not in values]
        if missing:
            raise Fatal(f"aliyun credentials file {path}: no {' or '.join(missing)} found (expected "
                        "lines `access_key_id = ...` and `access_key_secret = ...`)")
        if self._keys is not None:
            log.info("aliyun credentials file %s changed: reloaded", path)
        self._keys = _Keys(values["access_key_id"], values["access_key_secret"],
                           values.get("security_token", ""), source=f"file {path}")
        self._file_stamp = stamp

    def _refresh_role(self) -> None:
        keys = self._keys
        if keys is not None and keys.expires - time.time() > REFRESH_MARGIN:
            return
        role = self._config.aliyun_ram_role
        try:
            fresh = self._fetch_role(role)
        except VpcnetError as exc:
            if keys is not None and keys.expires > time.time():
                log.warning("RAM role %s: refreshing credentials failed (%s); the current ones are valid "
                            "for %.0f s more", role, exc, keys.expires - time.time())
                return
            raise
        log.info("RAM role %s: got temporary credentials %s, valid until %s", role, fresh.access_key_id,
                 datetime.fromtimestamp(fresh.expires, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        self._keys = fresh

    def _fetch_role(self, role: str) -> _Keys:
        try:
            text = self._metadata.get(f"ram/security-credentials/{role}", f"credentials of RAM role {role}")
        except Fatal:   # 404: no such role on this instance
            raise Fatal(f"RAM role {role} is not attached to this instance (the metadata service has no "
                        "credentials for it): check VPCNET_ALIYUN_RAM_ROLE") from None
        try:
            data = json.loads(text)
            code = data.get("Code", "Success")
            if code == "Success":
                return _Keys(str(data["AccessKeyId"]), str(data["AccessKeySecret"]),
                             str(data.get("SecurityToken", "")), _parse_expiration(str(data["Expiration"])),
                             source=f"RAM role {role}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise Retryable(f"RAM role {role}: unreadable credentials answer ({type(exc).__name__})") from None
        raise Retryable(f"RAM role {role}: the metadata service answered Code={code!r}")


# -- the RPC client ----------------------------------------------------------------------------------
class _RpcClient:
    """Signed RPC calls to one Alibaba Cloud API endpoint, mapped to vpcnet's exception family."""

    def __init__(self, session: requests.Session, endpoint: str, version: str, region: str,
                 credentials: _Credentials):
        self.endpoint = endpoint
        self.version = version
        self.region = region
        self._session = session
        self._credentials = credentials

    def __repr__(self) -> str:
        return f"_RpcClient({self.endpoint!r}, version={self.version!r}, region={self.region!r})"

    @events.cloud_call("aliyun")
    def call(self, action: str, params: dict[str, str] | None = None) -> dict:
        keys = self._credentials.get()
        body = {
            "Action": action,
            "Version": self.version,
            "Format": "JSON",
            "AccessKeyId": keys.access_key_id,
            "SignatureMethod": "HMAC-SHA1",
            "SignatureVersion": "1.0",
            "SignatureNonce": str(uuid.uuid4()),
            "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "RegionId": self.region,
        }
        if keys.token:
            body["SecurityToken"] = keys.token
        body.update({k: str(v) for k, v in (params or {}).items()})
        body["Signature"] = sign("POST", body, keys.secret)
        secrets = keys.secrets() + (body["Signature"],)
        try:
            resp = self._session.post(self.endpoint, data=body, timeout=API_TIMEOUT, allow_redirects=False,
                                      headers={"Accept": "application/json",
                                               "User-Agent": f"vpcnet/{__version__}"})
        except requests.exceptions.SSLError as exc:
            raise _error(Fatal, f"{action}: TLS with {self.endpoint} failed: "
                                f"{_scrub(str(exc), secrets)}: check VPCNET_ALIYUN_ENDPOINT and the CA "
                                "certificates") from None
        except requests.Timeout:
            raise _error(Retryable, f"{action}: {self.endpoint} did not answer within "
                                    f"{API_TIMEOUT[0]:.0f}+{API_TIMEOUT[1]:.0f} s") from None
        except requests.RequestException as exc:
            raise _error(Retryable, f"{action}: cannot reach {self.endpoint}: {_reason(exc)}") from None
        return self._answer(action, resp, secrets)

    def _answer(self, action: str, resp: requests.Response, secrets: tuple[str, ...]) -> dict:
        status = resp.status_code
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            if status >= 500 or status == 429:
                raise _error(Retryable, f"{action}: {self.endpoint} answered HTTP {status}")
            if status == 200:
                raise _error(Retryable, f"{action}: {self.endpoint} answered HTTP 200 without JSON")
            raise _error(Fatal, f"{action}: {self.endpoint} answered HTTP {status} without an Alibaba "
                                "Cloud error body: check VPCNET_ALIYUN_ENDPOINT")
        if 200 <= status < 300 and "Code" not in data:
            return data
        if 200 <= status < 300 and str(data.get("Code")) in ("200", "Success", "OK"):
            return data
        code = str(data.get("Code") or f"HTTP{status}")
        message = _scrub(_short(str(data.get("Message", ""))), secrets)
        where = f"{action} ({code}: {message}; RequestId {data.get('RequestId', '?')})"
        if _code_in(code, STS_EXPIRED_CODES) and self._credentials.source == "ram-role":
            self._credentials.invalidate()
            raise _error(Retryable, f"{where}: fetching new RAM role credentials", code)
        raise _classify(code, where, status)


def _classify(code: str, where: str, status: int = 400) -> VpcnetError:
    """The vpcnet error for an API error code (of a whole call, or of one entry of a batch call)."""
    if _code_in(code, DUPLICATE_CODES):
        return _error(DuplicateRoute, f"{where}: the destination already has an entry", code)
    if code.lower().startswith("quotaexceeded"):
        return _error(QuotaExceeded, where, code)
    if _code_in(code, BUSY_CODES) or code.lower().startswith("throttling") or status == 429:
        return _error(Busy, where, code)
    if (_code_in(code, RETRYABLE_CODES) or code.lower().startswith(RETRYABLE_PREFIXES)
            or status >= 500):
        return _error(Retryable, where, code)
    return _error(Fatal, f"{where}: {_hint(code)}", code)


def _reason(exc: requests.RequestException) -> str:
    """A short cause for a failed request, without echoing the request (urllib3's text is long)."""
    text = str(exc)
    for needle, reason in (("refused", "connection refused"), ("Name or service not known", "unknown host"),
                           ("name resolution", "unknown host"), ("Connection reset", "connection reset"),
                           ("aborted", "connection closed by the server"),
                           ("RemoteDisconnected", "connection closed by the server"),
                           ("unreachable", "network unreachable")):
        if needle in text:
            return reason
    return type(exc).__name__


def _short(text: str, limit: int = 300) -> str:
    """An API message without the echoed string-to-sign (it holds the STS token), bounded in length."""
    for marker in ("server string to sign is", "string to sign is", "StringToSign"):
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut].rstrip(" :,;")
    return text if len(text) <= limit else text[:limit] + "..."


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    """Mask each secret, raw or percent-encoded once or twice (as an echoed string-to-sign has it)."""
    for secret in secrets:
        if not secret:
            continue
        once = percent_encode(secret)
        for form in (percent_encode(once), once, secret):
            text = text.replace(form, "***")
    return text


def _ecs_endpoint(vpc_endpoint: str) -> str:
    """ECS's endpoint next to a VPC endpoint: vpc.<region>.aliyuncs.com -> ecs.<region>.aliyuncs.com.

    Any other host (a private gateway, the emulator) is assumed to serve both APIs.
    """
    parts = urlsplit(vpc_endpoint)
    host = parts.hostname or ""
    if host.startswith(("vpc.", "vpc-")):
        netloc = parts.netloc.replace(host, "ecs" + host[3:], 1)
        return urlunsplit(parts._replace(netloc=netloc))
    return vpc_endpoint


# -- the provider ------------------------------------------------------------------------------------
class AliyunProvider(Provider):
    """The route table of one Alibaba Cloud VPC, seen from one ECS instance."""

    name = "aliyun"
    instant = False
    quota_hint = QUOTA_HINT
    batch_create = True      # CreateRouteEntries; turned off for an endpoint that does not know it

    def __init__(self, config, ecs_endpoint: str = ""):
        self._config = config
        self._session = requests.Session()
        self._metadata = _Metadata(config.aliyun_metadata_url, self._session)
        self._credentials = _Credentials(config, self._metadata)
        self._ecs_endpoint = ecs_endpoint or getattr(config, "aliyun_ecs_endpoint", "")
        self._values: dict[str, str] = {}
        self._lock = threading.RLock()
        self._vpc: _RpcClient | None = None
        self._ecs: _RpcClient | None = None
        self._vswitches: tuple[float, list[str]] | None = None
        self._no_batch = False

    def __repr__(self) -> str:
        known = ", ".join(f"{k}={v!r}" for k, v in sorted(self._values.items()))
        return f"AliyunProvider({known}, credentials={self._credentials.source!r})"

    # -- identity, resolved lazily ----------------------------------------------------------------
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

    def endpoint(self) -> str:
        return self._config.aliyun_endpoint or f"https://vpc.{self.region()}.aliyuncs.com/"

    def _client(self) -> _RpcClient:
        with self._lock:
            if self._vpc is None:
                self._vpc = _RpcClient(self._session, self.endpoint(), VPC_API_VERSION, self.region(),
                                       self._credentials)
            return self._vpc

    def _route_tables(self) -> list[str]:
        with self._lock:
            if "tables" not in self._values:
                configured = table_list(self._config.aliyun_route_table_id)
                self._values["tables"] = ",".join(configured or self._discover_tables())
            return self._values["tables"].split(",")

    def _route_table(self, table: str = "") -> str:
        return table or self._route_tables()[0]

    def _discover_tables(self) -> list[str]:
        """The tables the VPC's vSwitches are bound to; the VPC's only table; else refuse to guess."""
        vpc = self.vpc_id()
        tables: list[dict] = []
        for page in range(1, 11):
            data = self._client().call("DescribeRouteTableList",
                                       {"VpcId": vpc, "PageSize": "50", "PageNumber": str(page)})
            batch = _items(data, "RouterTableList", "RouterTableListType") or _items(
                data, "RouteTables", "RouteTable")
            tables += batch
            total = int(data.get("TotalCount") or 0)
            if not batch or len(tables) >= total:
                break
        tables = [t for t in tables if t.get("VpcId", vpc) == vpc and t.get("RouteTableId")
                  and t.get("RouterType", "VRouter") == "VRouter"]
        if not tables:
            raise Fatal(f"no route table found for VPC {vpc} in region {self.region()}: check "
                        "VPCNET_ALIYUN_VPC_ID, or set VPCNET_ALIYUN_ROUTE_TABLE_ID")

        def rank(t: dict) -> tuple:
            return (t.get("RouteTableType", "System") != "System", t["RouteTableId"])

        tables.sort(key=rank)
        if len(tables) == 1:
            found = [tables[0]["RouteTableId"]]
        else:
            found = [t["RouteTableId"] for t in tables if _items(t, "VSwitchIds", "VSwitchId")
                     or (isinstance((t.get("VSwitchIds") or {}).get("VSwitchId"), list)
                         and t["VSwitchIds"]["VSwitchId"])]
            if not found:
                names = ", ".join(f"{t['RouteTableId']} ({t.get('RouteTableType', '?')})" for t in tables)
                raise Fatal(f"VPC {vpc} has {len(tables)} route tables ({names}) and none shows a bound "
                            "vSwitch: vpcnet does not guess which ones carry container traffic; set "
                            "VPCNET_ALIYUN_ROUTE_TABLE_ID to the comma-separated list of the tables your "
                            "hosts' vSwitches use")
        log.info("aliyun route tables of VPC %s: %s", vpc, ", ".join(found))
        return found

    def table_id(self) -> str:
        """The first table's id; a description instead when it cannot be found yet (messages only)."""
        try:
            return self._route_table()
        except VpcnetError as exc:
            return f"(route table not yet known: {exc})"

    def table_ids(self) -> list[str]:
        return list(self._route_tables())

    def table_quota(self, table: str = "") -> int:
        return int(getattr(self._config, "route_table_quota", 0) or 0) or DEFAULT_QUOTA

    # -- routes -----------------------------------------------------------------------------------
    def list_routes(self, table: str = "") -> list[Route]:
        table = self._route_table(table)
        routes: list[Route] = []
        token = ""
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            params = {"RouteTableId": table, "MaxResult": str(PAGE_SIZE)}
            if token:
                params["NextToken"] = token
            data = self._client().call("DescribeRouteEntryList", params)
            routes += [_route(e, table) for e in _items(data, "RouteEntrys", "RouteEntry")]
            token = str(data.get("NextToken") or "")
            if not token:
                return routes
            if token in seen:
                raise Retryable(f"DescribeRouteEntryList of {table}: NextToken repeated; listing again later")
            seen.add(token)
        raise Retryable(f"DescribeRouteEntryList of {table}: more than {MAX_PAGES} pages; giving up this pass")

    def create_route(self, destination: str, name: str, description: str, client_token: str,
                     table: str = "") -> None:
        table = self._route_table(table)
        try:
            self._client().call("CreateRouteEntry", {
                "RouteTableId": table, "DestinationCidrBlock": destination, "NextHopType": "Instance",
                "NextHopId": self.instance_id(), "RouteEntryName": name, "Description": description,
                "ClientToken": client_token})
        except QuotaExceeded as exc:
            raise _error(QuotaExceeded, f"route table {table} has no room for another custom entry (quota "
                                        f"{self.table_quota(table)} custom entries per table; "
                                        f"{QUOTA_HINT}): {exc}", getattr(exc, "code", "")) from None
        except DuplicateRoute as exc:
            raise _error(DuplicateRoute, f"route table {table} already has an entry for {destination}: {exc}",
                         getattr(exc, "code", "")) from None

    def create_routes(self, destination: str, name: str, description: str, client_token: str,
                      tables: list[str]) -> dict[str, VpcnetError | None]:
        """`destination -> this instance` in several tables with CreateRouteEntries (one VPC write for up
        to MAX_BATCH entries). A failure of the whole call (TaskConflict, throttling, a lost answer) is
        raised, so the caller retries the same entries with the same ClientToken (entries that landed are
        not created twice); failures of single entries come back per table, nothing of them retried here.
        Where the endpoint has no batch call: BatchUnsupported (and `batch_create` turns False)."""
        if self._no_batch:
            raise BatchUnsupported(f"{self.endpoint()} has no CreateRouteEntries")
        if len(tables) > MAX_BATCH:
            raise Fatal(f"{len(tables)} route tables: CreateRouteEntries takes at most {MAX_BATCH} entries")
        params = {"ClientToken": client_token}
        for i, table in enumerate(tables, 1):
            params.update({f"RouteEntries.{i}.RouteTableId": table, f"RouteEntries.{i}.DstCidrBlock": destination,
                           f"RouteEntries.{i}.NextHopType": "Instance",
                           f"RouteEntries.{i}.NextHop": self.instance_id(), f"RouteEntries.{i}.Name": name,
                           # Alibaba's spelling of this field in CreateRouteEntries
                           f"RouteEntries.{i}.Describption": description})
        try:
            data = self._client().call("CreateRouteEntries", params)
        except Fatal as exc:
            if getattr(exc, "code", "").lower() not in UNSUPPORTED_CODES:
                raise
            log.info("aliyun: the endpoint has no CreateRouteEntries; creating one entry per call")
            self._no_batch = True
            self.batch_create = False
            raise BatchUnsupported(f"{self.endpoint()} has no CreateRouteEntries ({exc})") from None
        failed = data.get("FailedRouteEntries") or []
        if isinstance(failed, dict):         # {"FailedRouteEntry": [...]} in some answers
            failed = next(iter(failed.values()), []) or []
        out: dict[str, VpcnetError | None] = {t: None for t in tables}
        for entry in failed:
            table = str(entry.get("RouteTableId", ""))
            if table not in out:
                raise Retryable(f"CreateRouteEntries answered a failure for unknown route table {table!r}; "
                                "listing again")
            code = str(entry.get("FailedCode", "") or "UnknownError")
            where = (f"CreateRouteEntries, entry {destination} in {table} ({code}: "
                     f"{_short(str(entry.get('FailedMessage', '')))})")
            err = _classify(code, where)
            if isinstance(err, QuotaExceeded):
                err = _error(QuotaExceeded, f"route table {table} has no room for another custom entry (quota "
                                            f"{self.table_quota(table)} custom entries per table; {QUOTA_HINT}): "
                                            f"{where}", code)
            elif isinstance(err, DuplicateRoute):
                err = _error(DuplicateRoute, f"route table {table} already has an entry for {destination}: {where}",
                             code)
            out[table] = err
        return out

    def delete_route(self, route: Route) -> None:
        params = {"RouteTableId": self._route_table(route.table)}
        if route.route_id:
            params["RouteEntryId"] = route.route_id
        else:
            params["DestinationCidrBlock"] = route.destination
            if route.next_hop:
                params["NextHopId"] = route.next_hop
        try:
            self._client().call("DeleteRouteEntry", params)
        except Fatal as exc:
            code = getattr(exc, "code", "").lower()
            if code in GONE_CODES or (code.startswith("invalidrouteentry") and "notfound" in code):
                log.info("route %s -> %s was already gone", route.destination, route.next_hop or "?")
                return
            raise

    # -- the rest of the interface ----------------------------------------------------------------
    def reserved_cidrs(self) -> list[str]:
        """The VPC's vSwitch CIDRs (a route may not overlap them); [] where DescribeVSwitches is missing
        or not permitted. Cached for a few minutes: vSwitches rarely change and claims are rare."""
        with self._lock:
            if self._vswitches and time.monotonic() - self._vswitches[0] < VSWITCH_CACHE_SECONDS:
                return list(self._vswitches[1])
        vpc = self.vpc_id()
        cidrs: list[str] = []
        try:
            for page in range(1, 11):
                data = self._client().call("DescribeVSwitches",
                                           {"VpcId": vpc, "PageSize": "50", "PageNumber": str(page)})
                batch = _items(data, "VSwitches", "VSwitch")
                cidrs += [str(v["CidrBlock"]) for v in batch if v.get("CidrBlock")]
                if not batch or len(cidrs) >= int(data.get("TotalCount") or 0):
                    break
        except Fatal as exc:
            # Optional knowledge: without it a clash shows up as CreateRouteEntry's InvalidCidrBlock.
            if getattr(exc, "code", "").lower() in UNSUPPORTED_CODES or "HTTP 404" in str(exc):
                log.info("endpoint does not support DescribeVSwitches: no vSwitch CIDRs to avoid")
            else:
                log.warning("cannot list the vSwitches of %s (%s): claiming without avoiding their CIDRs",
                            vpc, exc)
            cidrs = []
        with self._lock:
            self._vswitches = (time.monotonic(), cidrs)
        return list(cidrs)

    def instance_exists(self, instance_id: str) -> bool:
        """Whether ECS still knows the instance. True whenever unsure: `routes gc` must never delete
        the route of a live host because an API call failed."""
        try:
            with self._lock:
                if self._ecs is None:
                    self._ecs = _RpcClient(self._session, self._ecs_endpoint or _ecs_endpoint(self.endpoint()),
                                           ECS_API_VERSION, self.region(), self._credentials)
            data = self._ecs.call("DescribeInstances", {"InstanceIds": json.dumps([instance_id]),
                                                        "PageSize": "10"})
            instances = data.get("Instances")
            if not isinstance(instances, dict) or not isinstance(instances.get("Instance"), list):
                log.warning("DescribeInstances answered an unexpected shape; assuming %s exists", instance_id)
                return True
            return any(i.get("InstanceId") == instance_id for i in instances["Instance"])
        except VpcnetError as exc:
            log.warning("cannot tell whether instance %s exists (%s); assuming it does", instance_id, exc)
            return True

    def close(self) -> None:
        self._session.close()


def _items(data: dict, outer: str, inner: str) -> list[dict]:
    """`data[outer][inner]` as a list of dicts, tolerating the missing or empty shapes Alibaba uses."""
    box = data.get(outer)
    if isinstance(box, dict):
        box = box.get(inner)
    if isinstance(box, dict):
        box = [box]
    return [x for x in box if isinstance(x, dict)] if isinstance(box, list) else []


def _route(entry: dict, table: str = "") -> Route:
    """One RouteEntry as a Route; `next_hop` is the instance id only for a single Instance next hop."""
    hops = _items(entry, "NextHops", "NextHop")
    if not hops and (entry.get("NextHopId") or entry.get("InstanceId")):
        hops = [{"NextHopId": entry.get("NextHopId") or entry.get("InstanceId"),
                 "NextHopType": entry.get("NextHopType", "Instance")}]
    if len(hops) == 1:
        hop_type = str(hops[0].get("NextHopType") or "")
        next_hop = str(hops[0].get("NextHopId") or "") if hop_type == "Instance" else ""
    else:
        hop_type = "ECMP" if hops else ""
        next_hop = ""
    return Route(destination=str(entry.get("DestinationCidrBlock", "")), next_hop=next_hop,
                 status=str(entry.get("Status") or "Available"), kind=str(entry.get("Type") or "Custom"),
                 name=str(entry.get("RouteEntryName") or ""), description=str(entry.get("Description") or ""),
                 route_id=str(entry.get("RouteEntryId") or ""), next_hop_type=hop_type,
                 table=str(entry.get("RouteTableId") or table))
