"""Per-model counters: hits, misses, stores, rejected fills, bypasses, invalidations, errors.

Counting happens in process memory (one dict increment on the hot path). The counts are
shipped to a Redis hash (``<PREFIX>:stats``, field ``"<model label>|<event>"``) at most
every :data:`FLUSH_INTERVAL` seconds, piggybacked on a round trip the cache makes anyway,
so ``manage.py dbscale cache`` and ``manage.py dbscale status`` can show totals over all
processes without costing a round trip of their own. The hash has a TTL like every key.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

__all__ = ["EVENTS", "incr", "local_counts", "summary"]

#: Every counted event.
EVENTS = ("hit", "miss", "store", "rejected", "bypass", "invalidation", "error", "too_big")

FLUSH_INTERVAL = 5.0
STATS_TTL = 7 * 24 * 3600

_lock = threading.Lock()
_unflushed: Counter[tuple[str, str]] = Counter()
_totals: Counter[tuple[str, str]] = Counter()
_last_flush = [time.monotonic()]


def incr(label: str, event: str, amount: int = 1) -> None:
    """Count *event* for model *label* (``"app.Model"``; ``"fn:<name>"`` for functions)."""
    key = (label, event)
    _unflushed[key] += amount
    _totals[key] += amount


def local_counts() -> dict[tuple[str, str], int]:
    """Return this process's counts since start (or :func:`reset`)."""
    return dict(_totals)


def reset() -> None:
    """Forget this process's counts (tests)."""
    with _lock:
        _unflushed.clear()
        _totals.clear()


def due() -> bool:
    """Return whether unflushed counts should ride along with the next round trip."""
    return bool(_unflushed) and time.monotonic() - _last_flush[0] >= FLUSH_INTERVAL


def drain_commands(prefix: str) -> list[tuple[Any, ...]]:
    """Return ``HINCRBY`` commands for the unflushed counts, and forget them."""
    with _lock:
        items = list(_unflushed.items())
        _unflushed.clear()
        _last_flush[0] = time.monotonic()
    key = f"{prefix}:stats"
    commands: list[tuple[Any, ...]] = [
        ("HINCRBY", key, f"{label}|{event}", count) for (label, event), count in items if count
    ]
    if commands:
        commands.append(("EXPIRE", key, STATS_TTL))
    return commands


def restore(commands: list[tuple[Any, ...]]) -> None:
    """Put back counts whose flush failed."""
    with _lock:
        for command in commands:
            if command[0] == "HINCRBY":
                label, _, event = command[2].rpartition("|")
                _unflushed[(label, event)] += command[3]


def summary(shared: dict[bytes, bytes] | None = None) -> dict[str, dict[str, int]]:
    """Return ``{model label: {event: count}}``.

    With *shared* (the Redis hash) the totals of every process; else this process's.
    """
    result: dict[str, dict[str, int]] = {}
    if shared is not None:
        for field, value in shared.items():
            label, _, event = field.decode().rpartition("|")
            result.setdefault(label, dict.fromkeys(EVENTS, 0))[event] = int(value)
        return result
    # A copy: other threads count (adding keys) while, say, a metrics scrape reads.
    for (label, event), count in local_counts().items():
        result.setdefault(label, dict.fromkeys(EVENTS, 0))[event] = count
    return result
