"""Deliberately broken DBSCALE, for the ``manage.py check`` subprocess test."""

from __future__ import annotations

from tests.settings import *  # noqa: F403

DBSCALE = {
    "REPLICAS": {"default": ["no_such_replica"]},
    "SHARD_GROUPS": {"customers": {"SHARDS": []}},
}
DATABASE_ROUTERS: list[str] = []
