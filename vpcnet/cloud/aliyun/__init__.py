"""The `aliyun` provider: this host's route in the route tables of an Alibaba Cloud VPC, or (eni-prefix
addressing) its block as prefixes on its primary ENI.

One module per part: `provider` (AliyunProvider: the route-table calls), `ecs` (AliyunPrefixes: the ENI
prefix calls of the ECS API), `rpc` (the signed API client and
its error mapping), `signature` (shared with the emulator), `credentials` (AccessKey, credentials file,
RAM role) and `metadata` (the instance metadata service and this host's identity).

It needs nothing beyond vpcnet's own dependencies (requests).
"""
