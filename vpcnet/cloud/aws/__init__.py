"""The `aws` provider: this host's route in the route tables of an EC2 VPC, through botocore.

One module per part: `provider` (AwsProvider: the route-table calls, the source/destination check),
`client` (the botocore session and client, error mapping, secrets kept out of messages and logs),
`markers` (which routes are vpcnet's: instance tags, older table tags, tombstones) and `metadata`
(IMDSv2 and this host's identity).

botocore is optional (the `aws` extra): `REQUIRES` names it for `vpcnet.cloud.provider_class`, which
checks it before anything here imports it, and `AwsProvider` is imported on first use of the name.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

REQUIRES = ("botocore",)      # modules the provider imports beyond vpcnet's own dependencies
EXTRA = "aws"                 # the vpcnet extra that installs them

if TYPE_CHECKING:
    from vpcnet.cloud.aws.provider import AwsProvider

__all__ = ["AwsProvider"]


def __getattr__(name: str):
    if name == "AwsProvider":
        value = importlib.import_module(f"{__name__}.provider").AwsProvider
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
