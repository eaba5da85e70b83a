"""Signed RPC calls to Alibaba Cloud APIs (VPC, ECS), and what their error answers mean to vpcnet.

Every request passes through `RpcClient.call` (the one place to count or time API calls, through
`events.cloud_call`). Each call is made once, with an explicit (connect, read) timeout: retries with
backoff live in `vpcnet.routes`, which sees `Busy` (TaskConflict, OperationConflict, throttling) /
`Retryable` / `DuplicateRoute` / `QuotaExceeded` / `Fatal` from here, each carrying the API's error code
in `.code`. A fatal code comes with what to check (`FATAL_HINTS`).

Requests are POSTed with the signed parameters in a form body, never in the URL, so neither the
signature nor an STS token can reach a URL-logging library (urllib3 logs request lines at DEBUG) or the
text of a connection error.

Secrets (the AccessKey secret, the STS token, request signatures) never appear in a log line, an
exception message or a repr: error messages from the API are scrubbed of them before they are raised.
"""
from __future__ import annotations

import time
import uuid

import requests

from vpcnet import __version__
from vpcnet.cloud import DuplicateRoute, QuotaExceeded
from vpcnet.cloud.aliyun.credentials import Credentials
from vpcnet.cloud.aliyun.signature import percent_encode, sign
from vpcnet.errors import Busy, Fatal, Retryable, VpcnetError
from vpcnet.observability import events

API_TIMEOUT = (3.0, 10.0)           # (connect, read) seconds for every API call

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


def coded_error(cls: type[VpcnetError], message: str, code: str = "") -> VpcnetError:
    """An exception of the vpcnet family that also carries the API error code."""
    exc = cls(message)
    exc.code = code  # type: ignore[attr-defined]
    return exc


class RpcClient:
    """Signed RPC calls to one Alibaba Cloud API endpoint, mapped to vpcnet's exception family."""

    def __init__(self, session: requests.Session, endpoint: str, version: str, region: str,
                 credentials: Credentials):
        self.endpoint = endpoint
        self.version = version
        self.region = region
        self._session = session
        self._credentials = credentials

    def __repr__(self) -> str:
        return f"RpcClient({self.endpoint!r}, version={self.version!r}, region={self.region!r})"

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
            raise coded_error(Fatal, f"{action}: TLS with {self.endpoint} failed: "
                                     f"{_scrub(str(exc), secrets)}: check VPCNET_ALIYUN_ENDPOINT and the CA "
                                     "certificates") from None
        except requests.Timeout:
            raise coded_error(Retryable, f"{action}: {self.endpoint} did not answer within "
                                         f"{API_TIMEOUT[0]:.0f}+{API_TIMEOUT[1]:.0f} s") from None
        except requests.RequestException as exc:
            raise coded_error(Retryable, f"{action}: cannot reach {self.endpoint}: {_reason(exc)}") from None
        return self._answer(action, resp, secrets)

    def _answer(self, action: str, resp: requests.Response, secrets: tuple[str, ...]) -> dict:
        status = resp.status_code
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            if status >= 500 or status == 429:
                raise coded_error(Retryable, f"{action}: {self.endpoint} answered HTTP {status}")
            if status == 200:
                raise coded_error(Retryable, f"{action}: {self.endpoint} answered HTTP 200 without JSON")
            raise coded_error(Fatal, f"{action}: {self.endpoint} answered HTTP {status} without an Alibaba "
                                     "Cloud error body: check VPCNET_ALIYUN_ENDPOINT")
        if 200 <= status < 300 and "Code" not in data:
            return data
        if 200 <= status < 300 and str(data.get("Code")) in ("200", "Success", "OK"):
            return data
        code = str(data.get("Code") or f"HTTP{status}")
        message = _scrub(short_message(str(data.get("Message", ""))), secrets)
        where = f"{action} ({code}: {message}; RequestId {data.get('RequestId', '?')})"
        if _code_in(code, STS_EXPIRED_CODES) and self._credentials.source == "ram-role":
            self._credentials.invalidate()
            raise coded_error(Retryable, f"{where}: fetching new RAM role credentials", code)
        raise classify(code, where, status)


def classify(code: str, where: str, status: int = 400) -> VpcnetError:
    """The vpcnet error for an API error code (of a whole call, or of one entry of a batch call)."""
    if _code_in(code, DUPLICATE_CODES):
        return coded_error(DuplicateRoute, f"{where}: the destination already has an entry", code)
    if code.lower().startswith("quotaexceeded"):
        return coded_error(QuotaExceeded, where, code)
    if _code_in(code, BUSY_CODES) or code.lower().startswith("throttling") or status == 429:
        return coded_error(Busy, where, code)
    if (_code_in(code, RETRYABLE_CODES) or code.lower().startswith(RETRYABLE_PREFIXES)
            or status >= 500):
        return coded_error(Retryable, where, code)
    return coded_error(Fatal, f"{where}: {_hint(code)}", code)


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


def short_message(text: str, limit: int = 300) -> str:
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
