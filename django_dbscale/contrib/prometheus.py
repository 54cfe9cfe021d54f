"""Prometheus metrics for django_dbscale (the ``metrics`` extra: ``pip install -e '.[metrics]'``).

Register the collector once, e.g. in your ``AppConfig.ready()``::

    from prometheus_client import REGISTRY
    from django_dbscale.contrib.prometheus import DBScaleCollector

    REGISTRY.register(DBScaleCollector())

Metrics (labels never carry keys or primary keys):

``dbscale_route_total{alias,reason}``
    reads routed in this process, by the database they went to and why;
``dbscale_replica_lag_seconds{alias}`` / ``dbscale_replica_lag_bytes{alias}``
    the last measured replay lag of each replica;
``dbscale_replica_eligible{alias}``
    1 if the replica currently receives reads, else 0.
``dbscale_cache_events_total{model,event}``
    the queryset cache's hits, misses, stores, rejected fills, bypasses, invalidations and
    errors per model (or ``fn:...`` for ``cached_queryset`` functions). These are totals
    over every process, kept in Redis: scrape them from one target, or aggregate with
    ``max`` rather than ``sum``. Read with one Redis round trip per scrape.
``dbscale_cache_untrusted{alias}``
    1 while this process does not trust Redis about *alias* (``*``: about any database)
    and its cached reads of it go to the database: after start-up, a Redis error, a
    failover or an owed invalidation, until the background verification settles it. A
    value that stays 1 means an outbox that cannot be drained (see ``docs/cache.md``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from django_dbscale import replicas
from django_dbscale.conf import dbscale_settings


class DBScaleCollector(Collector):
    """Expose routing counters and replica measurements at scrape time."""

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        routes = CounterMetricFamily(
            "dbscale_route",
            "Reads routed, by database alias and reason.",
            labels=["alias", "reason"],
        )
        for (alias, reason), count in sorted(replicas.route_counts.items()):
            routes.add_metric([alias, reason], count)
        yield routes

        lag_s = GaugeMetricFamily(
            "dbscale_replica_lag_seconds", "Replay lag in seconds.", labels=["alias"]
        )
        lag_b = GaugeMetricFamily(
            "dbscale_replica_lag_bytes", "Replay lag in bytes.", labels=["alias"]
        )
        eligible = GaugeMetricFamily(
            "dbscale_replica_eligible", "1 if the replica receives reads.", labels=["alias"]
        )
        now = time.monotonic()
        for alias in sorted(dbscale_settings.primary_of):
            status = replicas.monitor.status(alias)
            if status.lag_seconds is not None:
                lag_s.add_metric([alias], status.lag_seconds)
            if status.lag_bytes is not None:
                lag_b.add_metric([alias], status.lag_bytes)
            eligible.add_metric([alias], 1.0 if status.usable(now) else 0.0)
        yield lag_s
        yield lag_b
        yield eligible

        untrusted = GaugeMetricFamily(
            "dbscale_cache_untrusted",
            "1 while this process serves no cached reads of the database from Redis.",
            labels=["alias"],
        )
        if dbscale_settings.cache["ENABLED"]:
            from django_dbscale.cache import continuity

            for alias in sorted(set(continuity.untrusted)):
                untrusted.add_metric([alias], 1.0)
        yield untrusted

        cache_events = CounterMetricFamily(
            "dbscale_cache_events",
            "Queryset cache events per model (all processes).",
            labels=["model", "event"],
        )
        if dbscale_settings.cache["ENABLED"]:
            from django_dbscale.cache import cache_stats

            for label, events in sorted(cache_stats().items()):
                for event, count in sorted(events.items()):
                    cache_events.add_metric([label, event], count)
        yield cache_events
