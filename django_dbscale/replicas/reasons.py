"""Why a read was routed where it was: the ``reason`` label of ``route_counts`` and metrics."""

from __future__ import annotations

__all__ = [
    "CACHE_FILL",
    "DOWN",
    "FAILOVER",
    "FORCED",
    "IN_TRANSACTION",
    "LAGGING",
    "NO_REPLICAS",
    "PINNED_PRIMARY",
    "PRIMARY_DOWN",
    "QUARANTINED",
    "READ_YOUR_WRITES",
    "REPLICA",
    "RESHARDED",
    "STALE",
    "UNKNOWN",
]

REPLICA = "replica"
NO_REPLICAS = "no_replicas"
IN_TRANSACTION = "in_transaction"
READ_YOUR_WRITES = "read_your_writes"
LAGGING = "lagging"
DOWN = "down"
FORCED = "forced"
PINNED_PRIMARY = "pinned_primary"
UNKNOWN = "unknown"
FAILOVER = "failover"
STALE = "stale"
QUARANTINED = "quarantined"
CACHE_FILL = "cache_fill"
#: The primary's connection broke (or refused) under a read; a caught-up replica served it.
PRIMARY_DOWN = "primary_down"
#: The replica has not replayed the resharding cutover that placed rows on its primary.
RESHARDED = "resharded"
