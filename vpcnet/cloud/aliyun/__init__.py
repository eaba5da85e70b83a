"""The `aliyun` provider: this host's route in the route tables of an Alibaba Cloud VPC.

One module per part: `provider` (AliyunProvider: the route-table calls), `rpc` (the signed API client and
its error mapping), `signature` (shared with the emulator), `credentials` (AccessKey, credentials file,
RAM role) and `metadata` (the instance metadata service and this host's identity).

It needs nothing beyond vpcnet's own dependencies (requests). `AliyunProvider` is imported on first use
of the name, so that reading this package (the configuration check does, for `REQUIRES`) stays cheap.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

REQUIRES: tuple[str, ...] = ()

if TYPE_CHECKING:
    from vpcnet.cloud.aliyun.provider import AliyunProvider

__all__ = ["AliyunProvider"]


def __getattr__(name: str):
    if name == "AliyunProvider":
        value = importlib.import_module(f"{__name__}.provider").AliyunProvider
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
