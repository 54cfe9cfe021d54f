"""django_dbscale: scale a Django project's PostgreSQL layer without rewriting its code.

Read/write splitting with replica-lag awareness, consistent-hash sharding, and a Redis
queryset cache, sharing one consistency model (:mod:`django_dbscale.consistency`). The
names below are the public API. Model classes, managers and the cache API load on first
access: model classes can only be defined once Django's app registry is loading.
"""

from __future__ import annotations

from typing import Any

from django_dbscale.consistency import (
    InvalidConsistencyToken,
    consistency_context,
    consistency_token,
    read_at_least,
    use_database,
    use_primary,
    use_replica,
)
from django_dbscale.sharding import (
    CrossShardRelation,
    FanoutNotSupported,
    InvalidShardKey,
    RingChangeRefused,
    ShardDeclarationError,
    ShardedIDField,
    ShardingError,
    ShardKeyChanged,
    ShardKeyMissing,
    ShardKeyRequired,
    ShardMismatch,
    UnknownShard,
    UnknownShardGroup,
    current_shard,
    decode_id,
    get_ring,
    ring_key,
    shard_for_key,
    shard_of_id,
    using_shard,
)

__all__ = [
    "CacheManagerMixin",
    "CachedManager",
    "CachedModel",
    "CachedQuerySet",
    "CrossShardRelation",
    "FanoutNotSupported",
    "InvalidConsistencyToken",
    "InvalidShardKey",
    "RingChangeRefused",
    "ShardKeyChanged",
    "ShardKeyMissing",
    "ShardDeclarationError",
    "ShardKeyRequired",
    "ShardMismatch",
    "ShardedIDField",
    "ShardedManager",
    "ShardedModel",
    "ShardedQuerySet",
    "ShardingError",
    "UnknownShard",
    "UnknownShardGroup",
    "cache_invalidated",
    "cache_read",
    "cache_stats",
    "cached_queryset",
    "consistency_context",
    "consistency_token",
    "current_shard",
    "decode_id",
    "get_ring",
    "invalidate",
    "invalidate_all",
    "invalidate_model",
    "prefetch_by_shard",
    "read_at_least",
    "ring_key",
    "shard_for_key",
    "shard_of_id",
    "use_database",
    "use_primary",
    "use_replica",
    "using_shard",
]

_LAZY = {
    "ShardedManager": "django_dbscale.sharding",
    "ShardedModel": "django_dbscale.sharding",
    "ShardedQuerySet": "django_dbscale.sharding",
    "prefetch_by_shard": "django_dbscale.sharding",
    # The cache package defines model and manager classes: import it on first use.
    **dict.fromkeys(
        [
            "CacheManagerMixin",
            "CachedManager",
            "CachedModel",
            "CachedQuerySet",
            "cache_invalidated",
            "cache_read",
            "cache_stats",
            "cached_queryset",
            "invalidate",
            "invalidate_all",
            "invalidate_model",
        ],
        "django_dbscale.cache",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
