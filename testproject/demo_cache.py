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

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from django.conf import settings
from django.db import connections
from django.db.models import F
from django.test.utils import override_settings

from django_dbscale import consistency_context, replicas
from django_dbscale.cache import cache_read, cache_stats, continuity
from django_dbscale.testing.harness import get_services


@contextmanager
def _statements(out: Callable[[str], None], aliases: list[str]) -> Iterator[list[str]]:
    """Print (and collect) every statement with the alias that ran it."""
    ran: list[str] = []

    def make(alias: str) -> Callable[..., Any]:
        def log(
            execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
        ) -> Any:
            if "pg_" not in sql:
                ran.append(alias)
                out(f"      [{alias:>15}] {' '.join(sql.split())[:80]}")
            return execute(sql, params, many, context)

        return log

    with ExitStack() as stack:
        for alias in aliases:
            stack.enter_context(connections[alias].execute_wrapper(make(alias)))
        yield ran


@contextmanager
def _reads(out: Callable[[str], None]) -> Iterator[None]:
    def receiver(sender: Any, hit: bool, reason: str, **kwargs: Any) -> None:
        out(f"      cache: {reason}")

    cache_read.connect(receiver, weak=False)
    try:
        yield
    finally:
        cache_read.disconnect(receiver)


def run(out: Callable[[str], None]) -> None:
    """Run the cache demo, printing with *out*."""
    from shop.models import Article

    services = get_services()
    cache = {**settings.DBSCALE.get("CACHE", {}), "MODELS": ["shop.Article"]}
    with override_settings(DBSCALE={**settings.DBSCALE, "CACHE": cache}):
        article = Article.objects.create(title="cached article", views=1)
        services.pg1_replica.wait_for_replay()
        replicas.monitor.refresh()
        aliases = ["default", "default_replica"]

        def read(label: str) -> int:
            out(f"  {label}")
            with consistency_context(), _reads(out), _statements(out, aliases):
                (row,) = Article.objects.filter(pk=article.pk)
            views = row.views
            out(f"      -> views = {views}")
            return views

        out("\n-- 1. miss, then hits (no SQL on a hit)")
        read("first read:")
        read("second read:")
        read("third read:")

        out("\n-- 2. update() invalidates at once (Django sends no signal for it)")
        Article.objects.filter(pk=article.pk).update(views=F("views") + 1)
        out("  explain after the write:")
        with consistency_context():
            for line in str(Article.objects.filter(pk=article.pk).explain_cache()).splitlines():
                out(f"      {line}")
        read("read after the write:")

        out("\n-- 3. replica replay paused: the fill reads the primary")
        services.pg1_replica.pause_replay()
        try:
            Article.objects.filter(pk=article.pk).update(views=F("views") + 1)
            replicas.monitor.refresh()
            with consistency_context():
                out(f"  routing for a fresh context says: {replicas.read_alias('default')!r}")
            stale = services.pg1_replica.execute(
                "SELECT views FROM shop_article WHERE id = %s", (article.pk,), dbname="dbscale"
            )
            out(f"  the replica still has views = {stale[0][0]}")
            read("read while the replica lags:")
            read("and again (a hit):")
        finally:
            services.pg1_replica.resume_replay()
            services.pg1_replica.wait_for_replay()

        out("\n-- 4. Redis cut off during a write, then healed")
        proxy = services.proxies["redis"]
        with proxy.cut_off():
            Article.objects.filter(pk=article.pk).update(views=F("views") + 1)
            out("  the write succeeded; its invalidation waits in this process")
            with connections["default"].cursor() as cursor:
                cursor.execute("SELECT count(*) FROM dbscale_cache_outbox")
                (rows,) = cursor.fetchone()
            out(f"  ... and in default's outbox table, for every process: {rows} row(s)")
            read("read during the outage:")
        cooldown = settings.DBSCALE.get("CACHE", {}).get("CIRCUIT_BREAKER", (5, 5.0))[1]
        out(f"  healed; the process re-verifies Redis (retrying every {cooldown}s)")
        started = time.monotonic()
        continuity.wait_until_verified(timeout=float(cooldown) * 3)
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT count(*) FROM dbscale_cache_outbox")
            (rows,) = cursor.fetchone()
        out(
            f"  verified after {time.monotonic() - started:.1f}s: outbox drained "
            f"({rows} row(s) left)"
        )
        read("read after healing (the owed invalidation was delivered first):")
        read("and again (a hit):")

        out("\n-- counters (all processes)")
        for label, counts in sorted(cache_stats().items()):
            if label.startswith(("shop.", "table:shop")):
                shown = ", ".join(f"{k}={v}" for k, v in counts.items() if v)
                out(f"  {label:<24} {shown}")
