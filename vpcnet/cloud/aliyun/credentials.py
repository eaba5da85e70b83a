"""Where the aliyun provider's AccessKey comes from, and keeping it current.

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

The secret and the token never appear in a repr (`Keys` hides them; `Credentials` shows the key id only).
"""
from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from vpcnet.cloud.aliyun.metadata import Metadata
from vpcnet.errors import Fatal, Retryable, VpcnetError

log = logging.getLogger(__name__)

REFRESH_MARGIN = 300.0              # refresh STS keys when fewer seconds than this remain


def _parse_expiration(text: str) -> float:
    """STS `Expiration` (ISO 8601 UTC, e.g. 2024-05-01T10:00:00Z) as a Unix time."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


@dataclass(frozen=True)
class Keys:
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


class Credentials:
    """Where the AccessKey comes from, and the current keys (refreshed before they expire)."""

    def __init__(self, config, metadata: Metadata):
        self._config = config
        self._metadata = metadata
        self._keys: Keys | None = None
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
        return f"Credentials(source={self.source!r}, access_key_id={key_id!r})"

    def get(self) -> Keys:
        if self._problem:
            raise Fatal(self._problem)
        with self._lock:
            if self.source == "config":
                if self._keys is None:
                    self._keys = Keys(self._config.aliyun_access_key_id,
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
        self._keys = Keys(values["access_key_id"], values["access_key_secret"],
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

    def _fetch_role(self, role: str) -> Keys:
        try:
            text = self._metadata.get(f"ram/security-credentials/{role}", f"credentials of RAM role {role}")
        except Fatal:   # 404: no such role on this instance
            raise Fatal(f"RAM role {role} is not attached to this instance (the metadata service has no "
                        "credentials for it): check VPCNET_ALIYUN_RAM_ROLE") from None
        try:
            data = json.loads(text)
            code = data.get("Code", "Success")
            if code == "Success":
                return Keys(str(data["AccessKeyId"]), str(data["AccessKeySecret"]),
                             str(data.get("SecurityToken", "")), _parse_expiration(str(data["Expiration"])),
                             source=f"RAM role {role}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise Retryable(f"RAM role {role}: unreadable credentials answer ({type(exc).__name__})") from None
        raise Retryable(f"RAM role {role}: the metadata service answered Code={code!r}")
