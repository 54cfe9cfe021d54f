"""Samples for the status page's charts: a small bounded ring kept in the serving process.

Every hit of the page or its JSON endpoint takes a sample of what the report just measured
(each replica's lag, each model's cumulative cache hits and misses), at most one every
:data:`MIN_INTERVAL` seconds however many people watch, and samples older than
:data:`WINDOW` seconds (or beyond :data:`MAX_SAMPLES`) are dropped.

Why in process memory and not in Redis: the page must work for a project without Redis
(replicas or sharding alone), and the lag figures are what *this* process's replica
monitor measured, so they belong to it. The price: history starts when someone opens the
page, a restart forgets it, and behind a load balancer each worker keeps its own, so a
chart shows the samples of the worker that answered. The cache counters in a sample are
totals over every process (kept in Redis by :mod:`django_dbscale.cache.stats`), so the hit
rate between two samples covers the whole site whichever worker took them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django_dbscale.conf import on_settings_changed

__all__ = ["MAX_SAMPLES", "MIN_INTERVAL", "WINDOW", "History", "Sample", "history"]

#: Seconds of history the charts cover.
WINDOW = 15 * 60.0
#: At most one sample this often (seconds), however many viewers refresh.
MIN_INTERVAL = 1.0
#: Upper bound on samples kept (a safety net: ``WINDOW / MIN_INTERVAL`` is larger).
MAX_SAMPLES = 600

Point = list[float]  # [unix time, value]: JSON-friendly


@dataclass(frozen=True)
class Sample:
    """What one report measured, reduced to what the charts draw."""

    #: ``time.time()`` when the sample was taken.
    at: float
    #: Replica alias -> replay lag in seconds (``None``: not measured).
    lag_seconds: Mapping[str, float | None]
    #: Replica alias -> replay lag in bytes (``None``: not measured).
    lag_bytes: Mapping[str, int | None]
    #: Cache label -> cumulative ``(hits, misses)`` over every process.
    lookups: Mapping[str, tuple[int, int]]

    @classmethod
    def from_report(cls, report: Mapping[str, Any], at: float) -> Sample:
        """Reduce a :func:`~django_dbscale.management.subcommands.status.report`."""
        lag_s: dict[str, float | None] = {}
        lag_b: dict[str, int | None] = {}
        for primary in report.get("primaries", ()):
            for replica in primary["replicas"]:
                lag_s[replica["alias"]] = replica["lag_seconds"]
                lag_b[replica["alias"]] = replica["lag_bytes"]
        lookups = {
            label: (int(events.get("hit", 0)), int(events.get("miss", 0)))
            for label, events in report.get("cache", {}).items()
        }
        return cls(at, lag_s, lag_b, lookups)


class History:
    """A thread-safe, bounded, time-windowed list of :class:`Sample`."""

    def __init__(
        self,
        *,
        window: float = WINDOW,
        min_interval: float = MIN_INTERVAL,
        max_samples: int = MAX_SAMPLES,
    ) -> None:
        if window <= 0 or min_interval < 0 or max_samples < 2:
            raise ValueError(
                "History needs window > 0, min_interval >= 0 and max_samples >= 2, got "
                f"window={window!r}, min_interval={min_interval!r}, max_samples={max_samples!r}."
            )
        self.window = window
        self.min_interval = min_interval
        self._samples: deque[Sample] = deque(maxlen=max_samples)
        self._lock = threading.Lock()

    def record(self, report: Mapping[str, Any], *, now: float | None = None) -> bool:
        """Add a sample of *report* unless the last one is younger than ``min_interval``.

        Returns whether a sample was added.
        """
        at = time.time() if now is None else now
        with self._lock:
            if self._samples and at - self._samples[-1].at < self.min_interval:
                return False
            self._samples.append(Sample.from_report(report, at))
            self._prune(at)
            return True

    def _prune(self, now: float) -> None:
        while self._samples and self._samples[0].at < now - self.window:
            self._samples.popleft()

    def samples(self) -> list[Sample]:
        """Return the samples kept, oldest first."""
        with self._lock:
            return list(self._samples)

    def clear(self) -> None:
        """Forget every sample (the settings changed: aliases may mean other servers)."""
        with self._lock:
            self._samples.clear()

    def series(self) -> dict[str, Any]:
        """Return the chart data: ``[[unix time, value], ...]`` per replica and cache label.

        ``cache_hit_rate`` holds, per label and for ``"*"`` (every label together), the
        percentage of lookups that hit *between* consecutive samples; an interval without
        lookups has no point, and one where a counter went down (Redis lost the totals,
        counters were reset) is skipped rather than drawn as a negative rate.
        """
        samples = self.samples()
        lag_s: dict[str, list[Point]] = {}
        lag_b: dict[str, list[Point]] = {}
        for sample in samples:
            for alias, seconds in sample.lag_seconds.items():
                if seconds is not None:
                    lag_s.setdefault(alias, []).append([sample.at, float(seconds)])
            for alias, size in sample.lag_bytes.items():
                if size is not None:
                    lag_b.setdefault(alias, []).append([sample.at, float(size)])
        rates: dict[str, list[Point]] = {}
        for before, after in zip(samples, samples[1:], strict=False):
            total_hits = total_lookups = 0
            for label, (hits, misses) in after.lookups.items():
                old_hits, old_misses = before.lookups.get(label, (0, 0))
                d_hits, d_misses = hits - old_hits, misses - old_misses
                if d_hits < 0 or d_misses < 0 or d_hits + d_misses == 0:
                    continue
                rates.setdefault(label, []).append([after.at, 100.0 * d_hits / (d_hits + d_misses)])
                total_hits += d_hits
                total_lookups += d_hits + d_misses
            if total_lookups:
                rates.setdefault("*", []).append([after.at, 100.0 * total_hits / total_lookups])
        return {
            "window_seconds": self.window,
            "min_interval_seconds": self.min_interval,
            "samples": len(samples),
            "since": samples[0].at if samples else None,
            "until": samples[-1].at if samples else None,
            "replica_lag_seconds": lag_s,
            "replica_lag_bytes": lag_b,
            "cache_hit_rate": rates,
        }


#: This process's history, shared by every request it serves.
history = History()
on_settings_changed(history.clear)
