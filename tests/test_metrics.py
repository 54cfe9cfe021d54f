"""The Prometheus collector reports real routing counters and replica measurements."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from django_dbscale import consistency_context, replicas
from django_dbscale.contrib.prometheus import DBScaleCollector
from django_dbscale.testing.harness import Services
from tests.testapp.models import Note

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def test_collector_exposes_routes_and_lag(services: Services) -> None:
    replicas.monitor.refresh()
    with consistency_context():
        list(Note.objects.all())
    registry = CollectorRegistry()
    registry.register(DBScaleCollector())
    text = generate_latest(registry).decode()
    assert 'dbscale_route_total{alias="default_replica",reason="replica"} 1.0' in text
    assert 'dbscale_replica_eligible{alias="default_replica"} 1.0' in text
    assert 'dbscale_replica_lag_bytes{alias="default_replica"}' in text
    with services.proxies["pg1_replica"].cut_off():
        replicas.monitor.refresh()
        text = generate_latest(registry).decode()
    assert 'dbscale_replica_eligible{alias="default_replica"} 0.0' in text


def test_collector_exposes_cache_events(services: Services) -> None:
    from django_dbscale.cache import wait_until_verified
    from tests.testapp.models_cache import CAuthor

    author = CAuthor.objects.create(name="metrics")
    assert wait_until_verified()  # a process serves nothing from Redis before it verifies
    CAuthor.objects.cache().get(pk=author.pk)
    CAuthor.objects.cache().get(pk=author.pk)
    registry = CollectorRegistry()
    registry.register(DBScaleCollector())
    text = generate_latest(registry).decode()
    assert 'dbscale_cache_events_total{event="hit",model="testapp.CAuthor"}' in text
    assert 'dbscale_cache_events_total{event="miss",model="testapp.CAuthor"}' in text


def test_status_command_shows_cache_counters_per_model(services: Services) -> None:
    import io
    import json

    from django.core.management import call_command

    from tests.testapp.models_cache import CAuthor

    def counters() -> dict[str, int]:
        buffer = io.StringIO()
        call_command("dbscale", "status", "--json", stdout=buffer)
        return dict(json.loads(buffer.getvalue())["cache"].get("testapp.CAuthor", {}))

    from django_dbscale.cache import wait_until_verified

    assert wait_until_verified()  # a process serves nothing from Redis before it verifies
    before = counters()
    author = CAuthor.objects.create(name="status")
    for _ in range(3):
        assert CAuthor.objects.cache().get(pk=author.pk).name == "status"
    after = counters()
    assert after.get("miss", 0) - before.get("miss", 0) == 1, (before, after)
    assert after.get("hit", 0) - before.get("hit", 0) == 2, (before, after)
    text = io.StringIO()
    call_command("dbscale", "status", stdout=text)
    assert f"hit={after['hit']}" in text.getvalue()


@pytest.mark.usefixtures("fast_breaker")
def test_status_command_shows_undelivered_invalidations(services: Services) -> None:
    import io
    import json

    from django.core.management import call_command

    from django_dbscale.cache import invalidation, outbox, wait_until_verified
    from tests.testapp.models_cache import CAuthor

    primaries = ("default", "shard0", "shard1", "shard2")

    def report() -> dict[str, Any]:
        buffer = io.StringIO()
        call_command("dbscale", "status", "--json", stdout=buffer)
        shown = dict(json.loads(buffer.getvalue())["cache_continuity"])
        # (default_replica_direct, a standby under an alias of its own, shows its copy.)
        shown["outbox_rows"] = {a: shown["outbox_rows"][a] for a in primaries}
        return shown

    assert wait_until_verified()
    assert report()["outbox_rows"] == {"default": 0, "shard0": 0, "shard1": 0, "shard2": 0}
    author = CAuthor.objects.create(name="owed")
    # Its invalidation was sent without waiting; read the reply now, or the cut below
    # would lose it and the outbox would (rightly) hold that one too.
    invalidation.confirm()
    with services.proxies["redis"].cut_off():
        CAuthor.objects.filter(pk=author.pk).update(name="owed2")  # delivery fails
        # The bumps went out without waiting (the send itself may not fail on a cut
        # socket): the process learns they were lost when it reads the reply, at its next
        # cached read, token, or within 50 ms. Read it now.
        invalidation.confirm()  # (or the send itself failed: outboxed already)
        shown = report()
        assert shown["outbox_rows"] == {"default": 1, "shard0": 0, "shard1": 0, "shard2": 0}
        assert "default" in shown["untrusted"] or "*" in shown["untrusted"]
        text = io.StringIO()
        call_command("dbscale", "status", stdout=text)
        assert "undelivered cache invalidations (outbox rows): default=1  " in text.getvalue()
    assert wait_until_verified()
    with outbox.connect("default") as own:
        assert outbox.pending(own) == []
    assert report()["untrusted"] == []


@pytest.mark.usefixtures("fast_breaker")
def test_collector_exposes_cache_trust(services: Services) -> None:
    from django_dbscale.cache import wait_until_verified
    from django_dbscale.cache.client import gateway

    registry = CollectorRegistry()
    registry.register(DBScaleCollector())
    assert wait_until_verified()
    assert "dbscale_cache_untrusted{" not in generate_latest(registry).decode()
    with services.proxies["redis"].cut_off():
        gateway().connections_lost()  # as after an error: nothing trusted until verified
        text = generate_latest(registry).decode()
        assert 'dbscale_cache_untrusted{alias="*"} 1.0' in text
    assert wait_until_verified()
    assert "dbscale_cache_untrusted{" not in generate_latest(registry).decode()


def test_a_scrape_while_requests_count_new_models_raises_nothing() -> None:
    # The collector runs in the exporter's thread while request threads add counters.
    import sys
    import threading

    from django_dbscale.cache import invalidation, stats
    from django_dbscale.cache.client import gateway

    # Nothing of earlier tests may count meanwhile: replies owed ("store"), deliveries in
    # flight or pending and their timers ("invalidation").
    gateway().drain_owed()
    invalidation.forget_pending()
    stats.reset()
    stop = threading.Event()

    def count() -> None:
        i = 0
        while not stop.is_set():
            stats.incr(f"app.Model{i}", "hit")
            i += 1
            if i % 2000 == 0:
                stats.reset()  # keep each summary small, and keep adding new models

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    counter = threading.Thread(target=count)
    counter.start()
    try:
        for _ in range(300):
            counted = stats.summary()
            assert all(
                counts == {**dict.fromkeys(stats.EVENTS, 0), "hit": 1}
                for counts in counted.values()
            )
    finally:
        stop.set()
        counter.join()
        sys.setswitchinterval(interval)
        stats.reset()
