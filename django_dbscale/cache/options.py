"""Typed, validated view of ``DBSCALE["CACHE"]``, rebuilt whenever the settings change.

:func:`options` sits on the hot path of every cached read, so it returns one frozen object
built once; :func:`django_dbscale.conf.on_settings_changed` drops it (``override_settings``
in tests takes effect at once). Errors name the key and say how to fix it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, router

from django_dbscale import consistency
from django_dbscale.conf import dbscale_settings, on_settings_changed

__all__ = ["CacheOptions", "database_for", "min_version_ttl", "options", "primary_alias"]

logger = logging.getLogger("django_dbscale.cache")


@dataclass(frozen=True)
class CacheOptions:
    """The parsed ``DBSCALE["CACHE"]`` dict (see ``docs/cache.md`` for each key)."""

    alias: str
    timeout: int
    prefix: str
    models: frozenset[str]
    max_result_bytes: int
    socket_timeout: float
    breaker_failures: int
    breaker_cooldown: float
    lock_timeout: float
    enabled: bool
    dimensions: Mapping[str, tuple[str, ...]]
    version_timeout: int
    outbox_poll_interval: float | None
    capture: bool
    #: Redis Cluster mode: every key of one database carries its hash tag (``{alias}``).
    cluster: bool = False


def _error(key: str, problem: str, fix: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"DBSCALE['CACHE'][{key!r}] {problem}. {fix}")


def _positive_int(raw: Mapping[str, Any], key: str) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _error(
            key, f"must be a positive int (seconds), not {value!r}", f"Example: {key!r}: 900."
        )
    return value


def _positive_number(raw: Mapping[str, Any], key: str, *, allow_zero: bool = False) -> float:
    value = raw[key]
    bad = isinstance(value, bool) or not isinstance(value, int | float)
    if bad or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise _error(
            key, f"must be a number {bound} (seconds), not {value!r}", f"Example: {key!r}: 0.5."
        )
    return float(value)


def _boolean(raw: Mapping[str, Any], key: str) -> bool:
    value = raw[key]
    if not isinstance(value, bool):
        raise _error(key, f"must be True or False, not {value!r}", "Example: True (or False).")
    return value


def _label(value: Any, key: str) -> str:
    if not isinstance(value, str) or value.count(".") != 1:
        raise _error(
            key,
            f"has {value!r}, which is not a model label",
            'Use "app_label.ModelName", e.g. "auth.User".',
        )
    return value.lower()


def parse(raw: Mapping[str, Any]) -> CacheOptions:
    """Validate the merged ``CACHE`` dict; raise ``ImproperlyConfigured`` naming the key."""
    alias = raw["ALIAS"]
    if not isinstance(alias, str) or not alias:
        raise _error("ALIAS", f"must be a CACHES alias, not {alias!r}", 'Example: "dbscale".')
    prefix = raw["PREFIX"]
    if not isinstance(prefix, str) or not prefix or any(c in prefix for c in " \n|{}*?[]\\"):
        raise _error(
            "PREFIX",
            "must be a non-empty str without spaces, '|', braces or glob characters "
            f"(* ? [ ] \\), not {prefix!r}",
            'Example: "dbscale".',
        )
    models_raw = raw["MODELS"]
    if isinstance(models_raw, str) or not isinstance(models_raw, list | tuple | set | frozenset):
        raise _error(
            "MODELS",
            f"must be a list of model labels, not {models_raw!r}",
            'Example: ["auth.User", "shop.Order"].',
        )
    models = frozenset(_label(item, "MODELS") for item in models_raw)
    breaker = raw["CIRCUIT_BREAKER"]
    ok = (
        isinstance(breaker, list | tuple)
        and len(breaker) == 2
        and isinstance(breaker[0], int)
        and not isinstance(breaker[0], bool)
        and breaker[0] >= 1
        and isinstance(breaker[1], int | float)
        and not isinstance(breaker[1], bool)
        and breaker[1] > 0
    )
    if not ok:
        raise _error(
            "CIRCUIT_BREAKER",
            f"must be (failures_before_opening, seconds_open), not {breaker!r}",
            "Example: (5, 5.0).",
        )
    max_bytes = raw["MAX_RESULT_BYTES"]
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise _error(
            "MAX_RESULT_BYTES",
            f"must be a positive int (bytes), not {max_bytes!r}",
            "Example: 1_048_576 (1 MiB).",
        )
    enabled = _boolean(raw, "ENABLED")
    dims_raw = raw["DIMENSIONS"]
    if not isinstance(dims_raw, Mapping):
        raise _error(
            "DIMENSIONS",
            f"must map a model label to field names, not {dims_raw!r}",
            'Example: {"shop.Order": ["customer_id"]}.',
        )
    dimensions: dict[str, tuple[str, ...]] = {}
    for label, fields in dims_raw.items():
        key = _label(label, "DIMENSIONS")
        if isinstance(fields, str):
            fields = [fields]
        if not isinstance(fields, list | tuple) or not all(isinstance(f, str) for f in fields):
            raise _error(
                "DIMENSIONS",
                f"[{label!r}] must be a list of field names, not {fields!r}",
                f'Example: {{"{label}": ["customer_id"]}}.',
            )
        dimensions[key] = tuple(fields)
    timeout = _positive_int(raw, "TIMEOUT")
    version_timeout = _positive_int(raw, "VERSION_TIMEOUT")
    if version_timeout < timeout:
        raise _error(
            "VERSION_TIMEOUT",
            f"({version_timeout}s) must be at least TIMEOUT ({timeout}s)",
            "Versions must outlive the entries built on them; raise VERSION_TIMEOUT.",
        )
    poll = raw["OUTBOX_POLL_INTERVAL"]
    if poll is not None and (
        isinstance(poll, bool) or not isinstance(poll, int | float) or poll <= 0
    ):
        raise _error(
            "OUTBOX_POLL_INTERVAL",
            f"must be None (off) or a number > 0 (seconds), not {poll!r}",
            "Example: 'OUTBOX_POLL_INTERVAL': 10.",
        )
    return CacheOptions(
        capture=_boolean(raw, "CAPTURE"),
        cluster=_boolean(raw, "CLUSTER"),
        alias=alias,
        timeout=timeout,
        prefix=prefix,
        models=models,
        max_result_bytes=max_bytes,
        socket_timeout=_positive_number(raw, "SOCKET_TIMEOUT"),
        breaker_failures=int(breaker[0]),
        breaker_cooldown=float(breaker[1]),
        lock_timeout=_positive_number(raw, "LOCK_TIMEOUT", allow_zero=True),
        enabled=enabled,
        dimensions=dimensions,
        version_timeout=version_timeout,
        outbox_poll_interval=None if poll is None else float(poll),
    )


_current: list[CacheOptions] = []


def options() -> CacheOptions:
    """Return the current cache options (parsed once per settings change).

    ``enabled`` is false unless ``DBSCALE`` declares ``CACHE`` (the cache is opt-in) and
    ``ENABLED`` is true. A declared cache whose ``ALIAS`` is missing from ``CACHES`` is
    half-configured: system check ``dbscale.E006`` reports it, and a process that runs
    without checks logs an error once and serves every read from the database (nothing is
    cached, so nothing can be stale) instead of failing its first write.
    """
    if _current:
        return _current[0]
    parsed = parse(dbscale_settings.cache)
    if parsed.enabled and not dbscale_settings.cache_declared:
        parsed = replace(parsed, enabled=False)
    elif parsed.enabled and parsed.alias not in settings.CACHES:
        logger.error(
            "DBSCALE['CACHE']['ALIAS'] is %r, which is not in CACHES: the queryset cache is "
            "off in this process (system check dbscale.E006). Add CACHES[%r] with BACKEND "
            "'django_redis.cache.RedisCache', or remove DBSCALE['CACHE'].",
            parsed.alias,
            parsed.alias,
        )
        parsed = replace(parsed, enabled=False)
    _current[:] = [parsed]
    return parsed


@on_settings_changed
def _reset() -> None:
    _current.clear()


def min_version_ttl(opts: CacheOptions) -> int:
    """Return the time-to-live of a new or bumped version key (fills extend theirs)."""
    return int(min(opts.timeout + 60, opts.version_timeout))


def database_for(model: Any, hints: Mapping[str, Any] | None = None) -> str:
    """Return the name (:func:`primary_alias`) of the database the routers read *model* from.

    Asks ``router.db_for_read`` in naming mode (``consistency.naming_database``): the
    dbscale routers answer with the primary and choose no replica, pin nothing and count
    nothing, so naming a key's database has no routing side effects.
    """
    token = consistency.naming_database.set(True)
    try:
        return primary_alias(router.db_for_read(model, **(hints or {})) or DEFAULT_DB_ALIAS)
    finally:
        consistency.naming_database.reset(token)


def primary_alias(alias: str) -> str:
    """Return the alias that names *alias*'s database in cache keys (no query).

    Cache keys and versions name the database, not the connection: a replica names its
    primary (it holds the same data), and every alias of one database shares one name
    (:attr:`~django_dbscale.conf.DBScaleSettings.database_of`).
    """
    return dbscale_settings.database_of.get(alias, alias)
