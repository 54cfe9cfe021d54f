"""Shared fixtures and helpers of the queryset cache tests (no tests here)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.db import connections

from django_dbscale import consistency
from django_dbscale.cache import continuity, invalidation, planning, stats
from django_dbscale.cache.client import gateway
from django_dbscale.cache.options import options
from django_dbscale.cache.signals import cache_invalidated, cache_read


def redis() -> Any:
    """Return the raw redis-py client the cache uses (through the harness proxy)."""
    return gateway().client


def settle() -> None:
    """Wait for what this process sent Redis without waiting: invalidations and fills."""
    invalidation.confirm()
    gateway().drain_owed()


def cache_keys(pattern: str = "*") -> list[str]:
    """Return the cache's Redis keys matching *pattern* after the prefix, sorted."""
    settle()
    prefix = options().prefix
    return sorted(k.decode() for k in redis().scan_iter(match=f"{prefix}:{pattern}", count=1000))


def entry_keys() -> list[str]:
    """Return the keys holding cached payloads (not their headers or leases)."""
    return [k for k in cache_keys("e:*") if not k.endswith((":h", ":l"))]


def wipe_redis() -> None:
    keys = list(redis().scan_iter(match=f"{options().prefix}:*", count=1000))
    if keys:
        redis().delete(*keys)


@pytest.fixture
def cache_env() -> Iterator[None]:
    """Start each test with an empty cache, a closed breaker, nothing pending, Redis trusted."""
    gateway().breaker.reset()
    invalidation.forget_pending()
    planning.clear()
    stats.reset()
    wipe_redis()
    assert continuity.wait_until_verified(), f"still unverified: {continuity.untrusted}"
    yield
    gateway().breaker.reset()
    invalidation.forget_pending()


#: The breaker cooldown of the ``fast_breaker`` fixture (``tests/conftest.py``).
COOLDOWN = 0.3


@dataclass
class Reads:
    """``cache_read`` events seen in a block."""

    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [e["reason"] for e in self.events]

    @property
    def hits(self) -> int:
        return sum(1 for e in self.events if e["hit"])


@contextlib.contextmanager
def observe() -> Iterator[Reads]:
    """Capture ``cache_read`` signals sent in the block."""
    reads = Reads()

    def receiver(sender: Any, **kwargs: Any) -> None:
        reads.events.append({"sender": sender, **kwargs})

    cache_read.connect(receiver, weak=False)
    try:
        yield reads
    finally:
        cache_read.disconnect(receiver)


@contextlib.contextmanager
def invalidations() -> Iterator[list[dict[str, Any]]]:
    """Capture ``cache_invalidated`` signals sent in the block."""
    seen: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        seen.append(kwargs)

    cache_invalidated.connect(receiver, weak=False)
    try:
        yield seen
    finally:
        cache_invalidated.disconnect(receiver)


class QueryCounter:
    """Count SQL statements per database alias (wraps every connection in this thread)."""

    def __init__(self, aliases: list[str] | None = None) -> None:
        self.aliases = aliases or list(connections)
        self.counts: dict[str, int] = dict.fromkeys(self.aliases, 0)
        self.sql: list[tuple[str, str]] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> QueryCounter:
        for alias in self.aliases:

            def wrapper(
                execute: Callable[..., Any],
                sql: str,
                params: Any,
                many: bool,
                context: Any,
                alias: str = alias,
            ) -> Any:
                self.counts[alias] += 1
                self.sql.append((alias, sql))
                return execute(sql, params, many, context)

            self._stack.enter_context(connections[alias].execute_wrapper(wrapper))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def selects(self) -> int:
        return sum(
            1
            for _, sql in self.sql
            if sql.lstrip().upper().startswith("SELECT") and "pg_" not in sql
        )


def fresh_context() -> contextlib.AbstractContextManager[Any]:
    """A consistency context that has written nothing (so replicas may be read)."""
    return consistency.consistency_context()


def commandstats() -> dict[str, int]:
    """Return Redis ``INFO commandstats`` call counts by command name (lower case)."""
    settle()
    info = redis().info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}
