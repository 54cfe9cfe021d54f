"""The queryset cache section of ``manage.py demo``: hits, invalidation, lag, an outage.

``run(out)`` assumes migrated databases (the demo command does that). It turns caching on
for ``shop.Article`` the way a project would, with ``DBSCALE["CACHE"]["MODELS"]``, and
shows against the real services:

1. a miss that fills the cache, then hits that run no SQL;
2. an ``update()`` (no signal is sent for it) invalidating the entry at once;
3. a fill while the replica's replay is paused: routing says "replica", the fill reads the
   primary, because the replica has not replayed the invalidation's WAL position;
4. Redis cut off during a write, then healed: the pending invalidation is delivered before
   the cache is used again, so the entry cached before the outage is never served.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from demo_support import expect, problem, progress, statement_log, wait_for
from django.conf import settings
from django.db import connections
from django.db.models import F
from django.test.utils import override_settings

from django_dbscale import consistency_context, replicas
from django_dbscale.cache import cache_read, cache_stats, continuity
from django_dbscale.testing.harness import get_services


@contextmanager
def _reads(out: Callable[[str], None], seen: Counter[str]) -> Iterator[None]:
    def receiver(sender: Any, hit: bool, reason: str, **kwargs: Any) -> None:
        seen[reason.split(":")[0]] += 1
        out(f"      cache: {reason}")

    cache_read.connect(receiver, weak=False)
    try:
        yield
    finally:
        cache_read.disconnect(receiver)


def run(out: Callable[[str], None]) -> str:
    """Run the cache demo, printing with *out*; return its summary line."""
    from shop.models import Article

    services = get_services()
    cache = {**settings.DBSCALE.get("CACHE", {}), "MODELS": ["shop.Article"]}
    with override_settings(DBSCALE={**settings.DBSCALE, "CACHE": cache}):
        article = Article.objects.create(title="cached article", views=1)
        services.pg1_replica.wait_for_replay()
        replicas.monitor.refresh()
        aliases = ["default", "default_replica"]
        seen: Counter[str] = Counter()
        committed = [1]  # views as last committed: every read must return it
        stale = [0]

        def read(label: str) -> int:
            out(f"  {label}")
            bypasses = seen["bypass"]
            with (
                consistency_context(),
                _reads(out, seen),
                statement_log(out, aliases, "      ", skip=lambda sql: "pg_" in sql),
            ):
                (row,) = Article.objects.filter(pk=article.pk)
            views = row.views
            out(f"      -> views = {views}")
            # A hit, and a fill (from either database), must return the last committed value;
            # a bypass is an ordinary read, which a replica within the lag budget may serve.
            if views != committed[0] and seen["bypass"] == bypasses:
                stale[0] += 1
                problem(out, f"stale read: views = {views}, but {committed[0]} was committed")
            return views

        def bump() -> None:
            Article.objects.filter(pk=article.pk).update(views=F("views") + 1)
            committed[0] += 1

        out("\n-- 1. miss, then hits (no SQL on a hit)")
        read("first read:")
        read("second read:")
        read("third read:")

        out("\n-- 2. update() invalidates at once (Django sends no signal for it)")
        bump()
        out("  explain after the write:")
        with consistency_context():
            for line in str(Article.objects.filter(pk=article.pk).explain_cache()).splitlines():
                out(f"      {line}")
        read("read after the write:")

        out("\n-- 3. replica replay paused: the fill reads the primary")
        progress(out, "pausing pg1_replica's replay")
        services.pg1_replica.pause_replay()
        try:
            bump()
            replicas.monitor.refresh()
            with consistency_context():
                out(f"  routing for a fresh context says: {replicas.read_alias('default')!r}")
            behind = services.pg1_replica.execute(
                "SELECT views FROM shop_article WHERE id = %s", (article.pk,), dbname="dbscale"
            )
            out(f"  the replica still has views = {behind[0][0]}")
            read("read while the replica lags:")
            read("and again (a hit):")
        finally:
            progress(out, "resuming replay; waiting for pg1_replica to catch up")
            services.pg1_replica.resume_replay()
            services.pg1_replica.wait_for_replay()

        out("\n-- 4. Redis cut off during a write, then healed")
        proxy = services.proxies["redis"]
        cooldown = settings.DBSCALE.get("CACHE", {}).get("CIRCUIT_BREAKER", (5, 5.0))[1]
        with expect("django_dbscale.cache", "Redis|cache outbox", "Redis cut off on purpose"):
            progress(out, "cutting the connections to Redis (a proxy in front of it refuses them)")
            with proxy.cut_off():
                bump()
                out("  the write succeeded; its invalidation waits in this process")
                out(f"  ... and in default's outbox table, for every process: {_outbox()} row(s)")
                read("read during the outage:")
            out(f"  healed; the process re-verifies Redis (retrying every {cooldown}s)")
            took = wait_for(
                out,
                "waiting for the cache to re-verify Redis and drain the outbox",
                lambda: continuity.wait_until_verified(timeout=0) and not _outbox(),
                timeout=float(cooldown) * 3,
            )
        if took is None:
            problem(out, f"Redis not re-verified {float(cooldown) * 3:.0f} s after healing")
        else:
            out(f"  verified after {took:.1f}s: outbox drained ({_outbox()} row(s) left)")
        read("read after healing (the owed invalidation was delivered first):")
        read("and again (a hit):")

        out("\n-- counters (all processes)")
        for label, counts in sorted(cache_stats().items()):
            if label.startswith(("shop.", "table:shop")):
                shown = ", ".join(f"{k}={v}" for k, v in counts.items() if v)
                out(f"  {label:<24} {shown}")
        verdict = "no stale read" if not stale[0] else f"{stale[0]} STALE read(s)"
        return (
            f"{seen['hit']} hits (no SQL), {seen['miss']} misses, {seen['bypass']} bypass; "
            f"update() invalidated at once; a lagging replica and a Redis outage: {verdict}; "
            f"Redis re-verified {took or 0:.1f} s after healing"
        )


def _outbox() -> int:
    """Rows in ``default``'s cache outbox (undelivered invalidations, for every process)."""
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT count(*) FROM dbscale_cache_outbox")
        (rows,) = cursor.fetchone()
    return int(rows)
