"""The `aws` provider: this host's route in the route tables of an EC2 VPC, through botocore.

One module per part: `provider` (AwsProvider: the route-table calls, the source/destination check),
`prefixes` (AwsPrefixes: the ENI prefixes of eni-prefix addressing), `client` (the botocore session and
client, error mapping, secrets kept out of messages and logs), `markers` (which routes are vpcnet's:
instance tags, older table tags, tombstones) and `metadata` (IMDSv2 and this host's identity).

botocore is optional (the `aws` extra): the registry in vpcnet.cloud names it, and checks it before
anything here is imported.
"""
