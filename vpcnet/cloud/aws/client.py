"""EC2 through botocore: one client per provider, one HTTP request per call, errors mapped, secrets kept out.

Requests are signed by botocore (never by hand); credentials come from botocore's normal chain
(environment, shared config/credentials files, container role, instance profile): vpcnet keeps none of
its own. botocore's own metadata lookups (instance-profile credentials) are pointed at the configured
IMDS URL through the session's `ec2_metadata_service_endpoint` variable (this session only, not the
process environment), and when credentials are present in the environment the instance-profile provider
is removed from this session's chain, so botocore never touches a metadata service at all.

Every request passes through `Ec2Client.api` and the client's botocore hooks
(`events.instrument_botocore`, the one place to count or time API calls). Retries belong to
`vpcnet.routes.backoff.Backoff` (bounded exponential backoff with jitter), so botocore's own retries are
switched off (`total_max_attempts=1`): one provider call = one HTTP request, and a throttled or failed
call comes back at once as `Retryable` (`Busy` for "not now").

Secrets: no secret key or session token is ever formatted into a message; messages are also scrubbed of
the session's secret values as a second line of defence, and botocore's DEBUG logging (which prints
request headers, including `X-Amz-Security-Token`) is capped at INFO unless the operator configured the
`botocore` logger explicitly.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable

import botocore.config
import botocore.exceptions
import botocore.session

from vpcnet.cloud.aws.metadata import IMDS_TIMEOUT
from vpcnet.errors import Busy, Fatal, Retryable, VpcnetError
from vpcnet.observability import events

# Error codes worth retrying (besides any HTTP 5xx). ConcurrentTagAccess: two hosts tagging the same
# route table at the same moment.
RETRYABLE_CODES = frozenset({
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "SlowDown", "InternalError",
    "InternalFailure", "ServiceUnavailable", "Unavailable", "RequestTimeout", "RequestTimeoutException",
    "ConcurrentTagAccess", "PriorRequestNotComplete",
})
# Of those, the ones meaning "not now" (throttled, or another change in progress): retried until a
# deadline that covers a boot storm.
BUSY_CODES = frozenset({
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "SlowDown", "ConcurrentTagAccess",
    "PriorRequestNotComplete",
})

_CONNECTION_ERRORS = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,      # ReadTimeoutError, ConnectionClosedError, ...
)
_CREDENTIAL_ERRORS = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
)


def cap_botocore_debug() -> None:
    """botocore's DEBUG records print request headers (the session token among them): keep them out."""
    logger = logging.getLogger("botocore")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


class ApiError(Exception):
    """An EC2 error answer, before it is mapped to vpcnet's error family."""

    def __init__(self, what: str, code: str, message: str, status: int):
        super().__init__(f"{what}: {code}: {message}")
        self.what, self.code, self.message, self.status = what, code, message, status

    def mapped(self) -> VpcnetError:
        text = f"{self.what}: EC2 answered {self.code or 'HTTP ' + str(self.status)}: {self.message}"
        if self.code in BUSY_CODES or self.status == 429:
            return Busy(text)
        if self.code in RETRYABLE_CODES or self.status >= 500:
            return Retryable(text)
        return Fatal(text)


class Ec2Client:
    """The botocore session and EC2 client of one provider, made on first use (the region may come from
    IMDS); `api` makes one call and maps what goes wrong."""

    def __init__(self, config, imds_url: str, region: Callable[[], str],
                 session: botocore.session.Session | None = None):
        self._endpoint_url = config.aws_endpoint_url
        self._imds_url = imds_url
        self._region = region
        self._given_session = session
        self._session: botocore.session.Session | None = None
        self._client = None
        self._lock = threading.Lock()
        cap_botocore_debug()

    def _make_session(self) -> botocore.session.Session:
        session = self._given_session or botocore.session.get_session()
        # botocore's own IMDS lookups (instance-profile credentials) go to the configured URL, for this
        # session only; no process-wide environment change.
        session.set_config_variable("ec2_metadata_service_endpoint", self._imds_url + "/")
        session.set_config_variable("metadata_service_timeout", IMDS_TIMEOUT)
        session.set_config_variable("metadata_service_num_attempts", 1)
        # "auto" defaults mode would ask IMDS for the region: fixed defaults instead.
        session.set_config_variable("defaults_mode", "legacy")
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            # Keys in the environment: the chain stops there anyway; removing the instance-profile
            # provider makes sure this session never contacts a metadata service.
            try:
                session.get_component("credential_provider").remove("iam-role")
            except Exception:  # noqa: BLE001 - best effort, the env provider comes first regardless
                pass
        return session

    def client(self):
        with self._lock:
            if self._client is None:
                region = self._region()
                self._session = self._make_session()
                self._client = self._session.create_client(
                    "ec2", region_name=region, endpoint_url=self._endpoint_url or None,
                    config=botocore.config.Config(
                        connect_timeout=3, read_timeout=10,
                        # botocore's retries are OFF (one attempt per call): vpcnet.routes retries
                        # Retryable answers with its own bounded backoff and jitter.
                        retries={"total_max_attempts": 1, "mode": "standard"}))
                events.instrument_botocore(self._client, "aws")
            return self._client

    def _secrets(self) -> list[str]:
        creds = None
        try:
            creds = self._session._credentials if self._session else None  # resolved by create_client
        except AttributeError:
            pass
        if creds is None:
            return []
        values = []
        for attr in ("_secret_key", "secret_key", "_token", "token"):
            value = vars(creds).get(attr)
            if isinstance(value, str) and len(value) >= 8:
                values.append(value)
        return values

    def _scrub(self, text: str) -> str:
        for secret in self._secrets():
            text = text.replace(secret, "***")
        return text

    def api(self, what: str, op: str, **params):
        """One EC2 call; EC2 error answers raise `ApiError`, everything else vpcnet's errors."""
        client = self.client()
        try:
            return getattr(client, op)(**params)
        except botocore.exceptions.ClientError as exc:
            err = exc.response.get("Error", {}) or {}
            status = int((exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
            raise ApiError(what, str(err.get("Code", "")), self._scrub(str(err.get("Message", ""))),
                           status) from None
        except _CREDENTIAL_ERRORS as exc:
            raise Fatal(f"{what}: no usable AWS credentials ({self._scrub(str(exc))}): give the instance "
                        "an instance profile, or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from None
        except _CONNECTION_ERRORS as exc:
            raise Retryable(f"{what}: EC2 API unreachable: {self._scrub(str(exc))}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise Fatal(f"{what}: {type(exc).__name__}: {self._scrub(str(exc))}") from None

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass
