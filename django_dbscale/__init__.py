"""django_dbscale: scale a Django project's PostgreSQL layer without rewriting its code.

Read/write splitting with replica-lag awareness, consistent-hash sharding, and a Redis
queryset cache, sharing one consistency model (:mod:`django_dbscale.consistency`).

The names below are the public API a project writes in its models, views and tasks; they
are listed, with what lives elsewhere, in ``docs/api.md``. Operator and introspection tools
stay in their pillar's package (:mod:`django_dbscale.sharding`, :mod:`django_dbscale.cache`,
:mod:`django_dbscale.replicas`). Model classes, managers and the cache API load on first
access: model classes can only be defined once Django's app registry is loading, and a
project that does not use the cache never imports it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from django_dbscale.consistency import (
    InvalidConsistencyToken,
    consistency_context,
    consistency_token,
    read_at_least,
    use_database,
    use_primary,
    use_replica,
)

if TYPE_CHECKING:
    from django_dbscale.cache import (
        CachedManager,
        CachedModel,
        CachedQuerySet,
        CacheManagerMixin,
        cached_as,
        cached_queryset,
        invalidate,
        invalidate_all,
        invalidate_model,
    )
    from django_dbscale.sharding import (
        ShardedIDField,
        ShardedManager,
        ShardedModel,
        ShardedQuerySet,
        ShardingError,
        ShardKeyRequired,
        prefetch_by_shard,
        shard_for_key,
        using_shard,
    )

__all__ = [
    # One consistency model (any pillar).
    "InvalidConsistencyToken",
    "consistency_context",
    "consistency_token",
    "read_at_least",
    "use_database",
    "use_primary",
    "use_replica",
    # Sharding.
    "ShardKeyRequired",
    "ShardedIDField",
    "ShardedManager",
    "ShardedModel",
    "ShardedQuerySet",
    "ShardingError",
    "prefetch_by_shard",
    "shard_for_key",
    "using_shard",
    # Queryset cache.
    "CacheManagerMixin",
    "CachedManager",
    "CachedModel",
    "CachedQuerySet",
    "cached_as",
    "cached_queryset",
    "invalidate",
    "invalidate_all",
    "invalidate_model",
]

_LAZY = {
    **dict.fromkeys(
        [
            "ShardKeyRequired",
            "ShardedIDField",
            "ShardedManager",
            "ShardedModel",
            "ShardedQuerySet",
            "ShardingError",
            "prefetch_by_shard",
            "shard_for_key",
            "using_shard",
        ],
        "django_dbscale.sharding",
    ),
    **dict.fromkeys(
        [
            "CacheManagerMixin",
            "CachedManager",
            "CachedModel",
            "CachedQuerySet",
            "cached_as",
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
        raise AttributeError(
            f"module {__name__!r} has no attribute {name!r}; operator tools live in "
            "django_dbscale.sharding, django_dbscale.cache and django_dbscale.replicas "
            "(docs/api.md)"
        )
    return getattr(importlib.import_module(module), name)
