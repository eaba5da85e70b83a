"""This host's blocks and their VPC routes: claim a host CIDR, keep `host CIDR -> this instance` in place
in every route table, and never touch a route vpcnet does not own.

The route tables are the cluster's shared record of who owns which block; the store keeps this host's
claim so IPAM answers without waiting on the cloud. The room, from the bottom up (imports flow this way
only; nothing here imports the Docker side, the datapath or the command line):

- `claims`: the claim rules as pure functions over route listings: which block to claim (`start_index`,
  `first_free`, `next_block`), which routes are this host's (`owned_in`, `ownership`, `collectable`),
  clusters sharing a VPC (`cluster_name`, `overlap`), other hosts' claims a batch may copy
  (`claimed_missing`), the quota check and the kinds of problem (PENDING, TRANSIENT, FATAL).
- `backoff`: `Backoff`, the bounded, jittered retries of every cloud call; `Busy` answers while the
  VPC keeps changing (given up after BUSY_DEADLINE without a change, BUSY_LIMIT in all).
- `journal`: `Journal`, the creates whose outcome is not known yet, kept across restarts and settled
  (marked, adopted) by the next pass.
- `tables`: `RouteTables`, the provider's calls as this room makes them: retried, counted (`calls`), each
  listing's size kept against the table's quota (`route_table_usage`).
- `sync`: `Sync`, one reconcile pass (claim, every table, batch creates, quota, stale blocks, forwarding),
  and its `SyncResult`.
- `loop`: `ReconcileLoop`, the host's one background reconciler (a flock elects it among workers).
- `keeper`: `RouteKeeper`, what the rest of vpcnet uses: `host_cidr` for IPAM, `reconcile`, `table`,
  `ownership`, `release`, `garbage`/`delete_garbage`, `start_background`/`stop`, `close`.
- `cli`: `vpcnet routes list|sync|release|gc`.
- `prefixes`: `PrefixPool`, eni-prefix addressing's way instead of routes: this host's prefixes on its
  network interface, kept warm by passes, the IPAM's addresses taken from them (docs/eni-prefix.md).
"""
from vpcnet.routes.backoff import Backoff
from vpcnet.routes.claims import FATAL, PENDING, TRANSIENT, start_index
from vpcnet.routes.keeper import RouteKeeper
from vpcnet.routes.sync import SyncResult

__all__ = ["FATAL", "PENDING", "TRANSIENT", "Backoff", "RouteKeeper", "SyncResult", "start_index"]
