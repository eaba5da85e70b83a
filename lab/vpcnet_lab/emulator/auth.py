"""Who may call the emulated API: AccessKeys (plain or STS), signature, timestamp window and nonces.

Signatures are checked with the same signer the plugin uses (`vpcnet.cloud.aliyun.signature`), so a
request the emulator accepts is one Alibaba's endpoint would accept too. Nonces are kept until the
timestamp check would refuse a replay anyway, and go into the state file with the rest.
"""
from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

from vpcnet.cloud.aliyun.signature import verify
from vpcnet_lab.emulator.errors import ApiError, missing

#: Timestamps further than this from the emulator's clock are refused (Alibaba: 15 minutes).
TIMESTAMP_WINDOW = 15 * 60
#: Nonces are remembered this long (past it, the timestamp check refuses a replay anyway).
NONCE_TTL = 2 * TIMESTAMP_WINDOW + 60
MAX_NONCES = 200_000


def _parse_timestamp(value: str) -> float:
    for fmt in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%fZ"):
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=timezone.utc).timestamp()
        except (ValueError, TypeError):
            continue
    raise ApiError("InvalidTimeStamp.Format",
                   "The specified Timestamp is not in the format YYYY-MM-DDThh:mm:ssZ (UTC).")


class Authenticator:
    """Credentials (key id -> (secret, security token or None for a plain AccessKey)) and the nonces seen,
    guarded by `lock`, shared with the rest of the emulator."""

    def __init__(self, lock: threading.RLock, credentials: dict[str, str] | None = None):
        self._lock = lock
        self._credentials: dict[str, tuple[str, str | None]] = {}
        creds = {"emu-key-id": "emu-key-secret"} if credentials is None else credentials
        for key_id, secret in creds.items():
            self._credentials[key_id] = (secret, None)
        self.nonces: dict[str, float] = {}         # nonce -> time seen

    def add_credentials(self, key_id: str, secret: str) -> None:
        with self._lock:
            self._credentials[key_id] = (secret, None)

    def add_sts_credentials(self, key_id: str, secret: str, token: str) -> None:
        """A temporary (STS) key: requests must carry this SecurityToken."""
        with self._lock:
            self._credentials[key_id] = (secret, token)

    def key_count(self) -> int:
        with self._lock:
            return len(self._credentials)

    def authenticate(self, method: str, params: dict[str, str], now: float | None = None) -> str:
        """Check the common parameters of a signed request; returns the AccessKeyId. Raises ApiError."""
        now = time.time() if now is None else now
        for name in ("AccessKeyId", "Signature", "SignatureNonce", "Timestamp"):
            if not params.get(name):
                raise missing(name)
        if params.get("SignatureMethod", "HMAC-SHA1") != "HMAC-SHA1":
            raise ApiError("InvalidSignatureMethod", "The specified SignatureMethod is not supported "
                           "(HMAC-SHA1 only).")
        if params.get("SignatureVersion", "1.0") != "1.0":
            raise ApiError("InvalidSignatureVersion", "The specified SignatureVersion is not supported (1.0).")
        key_id = params["AccessKeyId"]
        with self._lock:
            cred = self._credentials.get(key_id)
        if cred is None:
            raise ApiError("InvalidAccessKeyId.NotFound", "Specified access key is not found.", 404)
        secret, token = cred
        if not verify(method, params, secret):
            raise ApiError("SignatureDoesNotMatch", "Specified signature is not matched with our calculation.")
        stamp = _parse_timestamp(params["Timestamp"])
        if abs(now - stamp) > TIMESTAMP_WINDOW:
            raise ApiError("InvalidTimeStamp.Expired", "Specified time stamp or date value is expired "
                           "(more than 15 minutes away from the server's clock).")
        given = params.get("SecurityToken")
        if token is not None and not given:
            raise ApiError("MissingSecurityToken", "This AccessKeyId is a temporary (STS) key: "
                           "SecurityToken is required.")
        if given is not None and given != (token or ""):
            raise ApiError("InvalidSecurityToken.MismatchWithAccessKey",
                           "The SecurityToken does not match the AccessKeyId.")
        nonce = params["SignatureNonce"]
        with self._lock:
            if nonce in self.nonces:
                raise ApiError("SignatureNonceUsed", "Specified signature nonce was used already.")
            self.nonces[nonce] = now
            if len(self.nonces) > MAX_NONCES or len(self.nonces) % 1000 == 0:
                self._prune_nonces(now)
        return key_id

    def _prune_nonces(self, now: float) -> None:
        cutoff = now - NONCE_TTL
        for nonce in [n for n, t in self.nonces.items() if t < cutoff]:
            del self.nonces[nonce]
        while len(self.nonces) > MAX_NONCES:
            del self.nonces[next(iter(self.nonces))]

    def restore(self, data: dict) -> None:
        """Take the nonces from a state file's contents (secrets are never written there)."""
        self.nonces = {k: float(v) for k, v in data.get("nonces", {}).items()}
