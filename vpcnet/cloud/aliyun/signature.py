"""Alibaba Cloud RPC signature (SignatureMethod=HMAC-SHA1, SignatureVersion=1.0).

Shared by the `aliyun` provider (signs) and the emulator (verifies), so both sides agree byte for byte.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import quote


def percent_encode(value: str) -> str:
    """RFC 3986 encoding as Alibaba wants it: unreserved A-Z a-z 0-9 - _ . ~ kept, the rest %XY."""
    return quote(str(value), safe="-_.~")


def string_to_sign(method: str, params: dict[str, str]) -> str:
    canonical = "&".join(f"{percent_encode(k)}={percent_encode(v)}"
                         for k, v in sorted(params.items()) if k != "Signature")
    return f"{method.upper()}&{percent_encode('/')}&{percent_encode(canonical)}"


def sign(method: str, params: dict[str, str], secret: str) -> str:
    digest = hmac.new((secret + "&").encode(), string_to_sign(method, params).encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def verify(method: str, params: dict[str, str], secret: str) -> bool:
    return hmac.compare_digest(sign(method, params, secret), params.get("Signature", ""))
