"""`vpcnet lab`: several simulated hosts on one machine, each with its own Docker engine and vpcnet
plugin, joined by an emulated VPC router. See `vpcnet_lab.lab` for the layout and addresses."""
from vpcnet_lab.lab import DEFAULT_CLUSTER, ROUTER_NS, Lab, host_ip, host_netns
from vpcnet_lab.netns import LabError

__all__ = ["Lab", "LabError", "DEFAULT_CLUSTER", "ROUTER_NS", "host_ip", "host_netns"]
