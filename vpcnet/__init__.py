"""vpcnet: a Docker network + IPAM plugin that routes containers through the VPC route table."""
__version__ = "0.1.0"
