"""Consistent-hash sharding of models across PostgreSQL databases.

Public names (re-exported by :mod:`django_dbscale`): :class:`ShardedModel`,
:class:`ShardedIDField`, :func:`using_shard`, :func:`shard_for_key`, the exceptions, and
:func:`get_ring`. ``ShardedModel``, ``ShardedManager``, ``ShardedQuerySet`` and
``prefetch_by_shard`` are loaded on first access (a model class can only be defined once
Django's apps are loading).
"""

from __future__ import annotations

from typing import Any

from django_dbscale.sharding.context import current_shard, shard_for_key, using_shard
from django_dbscale.sharding.exceptions import (
    CrossShardRelation,
    FanoutNotSupported,
    InvalidShardKey,
    RingChangeRefused,
    ShardDeclarationError,
    ShardingError,
    ShardKeyChanged,
    ShardKeyMissing,
    ShardKeyRequired,
    ShardMismatch,
    ShardMoved,
    UnknownShard,
    UnknownShardGroup,
)
from django_dbscale.sharding.ids import ShardedIDField, decode_id, shard_of_id
from django_dbscale.sharding.keys import ring_key
from django_dbscale.sharding.ring import KetamaRing, ShardRing, get_ring

__all__ = [
    "CrossShardRelation",
    "FanoutNotSupported",
    "InvalidShardKey",
    "KetamaRing",
    "RingChangeRefused",
    "ShardDeclarationError",
    "ShardKeyChanged",
    "ShardKeyMissing",
    "ShardKeyRequired",
    "ShardMismatch",
    "ShardMoved",
    "ShardRing",
    "ShardedManager",
    "ShardedModel",
    "ShardedQuerySet",
    "ShardedIDField",
    "ShardingError",
    "UnknownShard",
    "UnknownShardGroup",
    "current_shard",
    "decode_id",
    "get_ring",
    "prefetch_by_shard",
    "ring_key",
    "shard_for_key",
    "shard_of_id",
    "using_shard",
]

_LAZY = frozenset({"ShardedManager", "ShardedModel", "ShardedQuerySet", "prefetch_by_shard"})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from django_dbscale.sharding import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
