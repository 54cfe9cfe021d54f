"""The Redis queryset cache: opt-in per queryset or per model, never serving stale rows.

Public API (re-exported by :mod:`django_dbscale`):

* :class:`CachedQuerySet`, :class:`CachedManager`, :class:`CachedModel` —
  ``Model.objects.cache(timeout=...)`` / ``.nocache()`` / ``.explain_cache()``;
* :func:`cached_queryset` — cache a function's result, invalidated with its models;
* :func:`invalidate_model`, :func:`invalidate`, :func:`invalidate_all` — for raw-SQL writes;
* :data:`cache_read`, :data:`cache_invalidated` — signals;
* :func:`cache_stats` — hits, misses, stores, rejected fills, bypasses, invalidations and
  errors per model;
* :func:`wait_until_verified` — block until this process trusts Redis again (tests,
  start-up scripts; see "Redis outages" in the docs).

See ``docs/cache.md`` for the design, the settings and the guarantees.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from django_dbscale.cache.continuity import wait_until_verified
    from django_dbscale.cache.decorators import cached_queryset
    from django_dbscale.cache.explain import Explanation
    from django_dbscale.cache.fragments import cached_as
    from django_dbscale.cache.hooks import (
        connect,
        install,
        invalidate,
        invalidate_all,
        invalidate_model,
    )
    from django_dbscale.cache.queryset import (
        CachedManager,
        CachedModel,
        CachedQuerySet,
        CacheManagerMixin,
    )
    from django_dbscale.cache.signals import cache_invalidated, cache_read

__all__ = [
    "CacheManagerMixin",
    "CachedManager",
    "CachedModel",
    "CachedQuerySet",
    "Explanation",
    "cache_invalidated",
    "cache_read",
    "cache_stats",
    "cached_as",
    "cached_queryset",
    "connect",
    "install",
    "invalidate",
    "invalidate_all",
    "invalidate_model",
    "wait_until_verified",
]

# Loaded on first use: importing this package (for its system checks, say) must not load
# Redis clients or the cache's machinery in a project that does not use the cache.
_LAZY = {
    "wait_until_verified": "continuity",
    "cached_queryset": "decorators",
    "cached_as": "fragments",
    "Explanation": "explain",
    "connect": "hooks",
    "install": "hooks",
    "invalidate": "hooks",
    "invalidate_all": "hooks",
    "invalidate_model": "hooks",
    "CachedManager": "queryset",
    "CachedModel": "queryset",
    "CachedQuerySet": "queryset",
    "CacheManagerMixin": "queryset",
    "cache_invalidated": "signals",
    "cache_read": "signals",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def cache_stats(*, shared: bool = True) -> dict[str, dict[str, int]]:
    """Return ``{label: {event: count}}`` for models (``"app.Model"``), functions
    (``"fn:..."``) and invalidated tables (``"table:..."``).

    With *shared* (default) the totals every process has shipped to Redis plus this
    process's unshipped counts; if Redis cannot be reached, this process's counts only.
    """
    from django_dbscale.cache import stats
    from django_dbscale.cache.client import gateway
    from django_dbscale.cache.options import options

    # Fills sent without waiting count "store"/"rejected" when their reply is read.
    with contextlib.suppress(Exception):
        gateway().drain_owed()
    if not shared:
        return stats.summary()
    opts = options()
    try:
        commands = stats.drain_commands(opts.prefix)
        replies: list[Any] = gateway().pipeline([*commands, ("HGETALL", f"{opts.prefix}:stats")])
    except Exception:
        stats.restore(commands)
        return stats.summary()
    return stats.summary(replies[-1])
