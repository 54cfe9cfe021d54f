"""Sharding alone: the README's minimal block (no replicas, no Redis)."""

from __future__ import annotations

from tests.startup._base import *  # noqa: F403
from tests.startup._base import INSTALLED_APPS, SERVERS

INSTALLED_APPS = [*INSTALLED_APPS, "tests.startup.shardapp"]
DATABASES = {alias: SERVERS[alias] for alias in ("default", "shard0", "shard1", "shard2")}
DATABASE_ROUTERS = ["django_dbscale.routers.ShardRouter"]
DBSCALE = {
    "SHARD_GROUPS": {"customers": {"SHARDS": ["shard0", "shard1", "shard2"]}},
}
