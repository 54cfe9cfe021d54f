"""Public signals of the queryset cache (dispatched only when something listens).

``cache_read``
    Sent after every read that consulted the cache. ``sender`` is the model class (``None``
    for :func:`~django_dbscale.cache.cached_queryset` functions); keyword arguments:
    ``key`` (the entry key), ``hit`` (bool), ``stored`` (bool: a miss whose fill was
    stored), ``reason`` (``"hit"``, ``"miss"``, ``"rejected"``, ``"bypass:<why>"``,
    ``"error"``), ``alias`` (the database alias of the key).

``cache_invalidated``
    Sent after invalidations reached Redis. ``sender`` is ``None``; keyword arguments:
    ``alias`` (the primary written), ``tables`` (frozenset of table names), ``keys`` (the
    version keys bumped), ``lsn`` (the primary's WAL position recorded with them, or 0).
"""

from __future__ import annotations

from django.dispatch import Signal

__all__ = ["cache_invalidated", "cache_read"]

cache_read = Signal()
cache_invalidated = Signal()
