"""Docker's side: the plugin socket's HTTP (transport), the network model (driver), addresses (ipam)."""
