"""The debug-toolbar panel names, per query, the database it ran on and why.

A real request through Django's test client with the toolbar enabled (its middleware, its
store and its render view), against the harness's primary, paused replica, shards and
Redis. The panel's recorded stats are read back from the toolbar's store (serialized, as
the browser's panel gets them) and compared with where the rows really came from.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.test import Client, override_settings

from django_dbscale import replicas
from django_dbscale.conf import dbscale_settings
from django_dbscale.sharding import shard_for_key
from django_dbscale.signals import read_routed
from django_dbscale.testing.harness import Services
from tests.test_cache_reads import books
from tests.test_cache_support import cache_env
from tests.testapp.models import Note
from tests.testapp.models_cache import CCounter
from tests.testapp.models_sharding import ShardCustomer

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

PANEL = "DbscalePanel"
NOTE = "testapp_note"
AUTHOR_SQL = '"testapp_cauthor"."id" = %s'


@pytest.fixture
def toolbar() -> Iterator[Client]:
    """Turn the toolbar on with only the dbscale panel; yield a test client."""
    overrides: dict[str, Any] = {
        "DEBUG": True,
        "MIDDLEWARE": ["debug_toolbar.middleware.DebugToolbarMiddleware", *settings.MIDDLEWARE],
        "ROOT_URLCONF": "tests.urls_toolbar",
        "STATIC_URL": "/static/",
        "TEMPLATES": [
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "APP_DIRS": True,
                "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
            }
        ],
        "DEBUG_TOOLBAR_PANELS": ["django_dbscale.contrib.debug_toolbar.DbscalePanel"],
        "DEBUG_TOOLBAR_CONFIG": {
            "SHOW_TOOLBAR_CALLBACK": "tests.urls_toolbar.always",
            "IS_RUNNING_TESTS": False,
            "DBSCALE_MAX_REPEATS": 2,
        },
    }
    # The app last: its ready() loads the panels DEBUG_TOOLBAR_PANELS names, so that must be
    # in place by then. (So this module imports nothing of debug_toolbar at its top: the
    # toolbar's setting_changed receiver would import its models before the app is in.)
    apps = [*settings.INSTALLED_APPS, "debug_toolbar"]
    with override_settings(**overrides), override_settings(INSTALLED_APPS=apps):
        from debug_toolbar.store import get_store  # only importable with the app installed

        get_store().clear()
        yield Client()
        get_store().clear()
    # The toolbar's ready() registered its system checks for good; they look the app up,
    # which is gone now: unregister them, or every later `check` raises LookupError.
    from django.core.checks.registry import registry

    for checks in (registry.registered_checks, registry.deployment_checks):
        for check in list(checks):
            if getattr(check, "__module__", "").startswith("debug_toolbar"):
                checks.discard(check)


def recorded(client: Client) -> tuple[str, dict[str, Any]]:
    """Return the last request's id and the panel's stats as stored by the toolbar."""
    from debug_toolbar.store import get_store
    from debug_toolbar.toolbar import DebugToolbar

    request_id = list(get_store().request_ids())[-1]
    stored = DebugToolbar.fetch(request_id, PANEL)
    assert stored is not None
    return request_id, stored.get_panel_by_id(PANEL).get_stats()


def rows(stats: dict[str, Any]) -> list[tuple[str, str, str, str | None]]:
    """(kind, alias, reason, cache) of every entry, in order."""
    return [(e["kind"], e["alias"], e["reason"], e["cache"]) for e in stats["entries"]]


def on_server(services: Services, alias: str, title: str) -> list[tuple[Any, ...]]:
    return services.alias_server(alias).execute(
        f"SELECT title FROM {NOTE} WHERE title = %s", (title,), dbname=services.alias_dbname(alias)
    )


@pytest.mark.usefixtures(cache_env.__name__, books.__name__)
def test_panel_names_each_querys_database_and_reason(
    services: Services, paused: Any, toolbar: Client
) -> None:
    Note.objects.create(title="seed-1")
    counter = CCounter.objects.create(name="hits", value=7)
    services.pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    paused(services.pg1_replica)  # from here on the replica lacks the request's own write

    response = toolbar.get("/tour/", {"counter": counter.pk})

    assert response.status_code == 200
    body = json.loads(response.content)
    assert body["seeded"] == [["seed-1", "default_replica"]]
    assert body["counter"] == [7, 7, 8]
    assert body["own"] == [True, "default"]
    assert body["authors"] == ["Ann", "Ann", "Bob"]
    # The own write really is missing on the replica: only the primary could serve it.
    assert on_server(services, "default_replica", "mine") == []
    assert on_server(services, "default", "mine") == [("mine",)]

    request_id, stats = recorded(toolbar)
    assert rows(stats) == [
        ("query", "default_replica", "replica", None),  # the seeded notes
        ("query", "default_replica", "replica", "miss (stored)"),  # the counter's fill
        ("cache", "default", "cache_hit", "hit"),  # the same read again: no SQL
        ("query", "default", "write", None),  # INSERT of "mine" (its LSN in the same trip)
        ("query", "default", "read_your_writes", None),  # reading "mine" back
        ("query", "default", "pinned_primary", None),  # the books
        ("query", "default", "pinned_primary", None),  # each book's author: the N+1
        ("query", "default", "pinned_primary", None),
        ("query", "default", "pinned_primary", None),
        ("query", "default", "write", None),  # UPDATE of the counter, in atomic()
        ("query", "default", "in_transaction", "bypass: table written in this transaction"),
        ("query", "default", "wal_position", None),  # the commit's LSN for the invalidation
    ]
    entries = stats["entries"]
    assert NOTE in entries[0]["sql"] and "testapp_ccounter" in entries[1]["sql"]
    assert entries[1]["model"] == entries[2]["model"] == "testapp.CCounter"
    assert entries[4]["sql"].startswith(f'SELECT "{NOTE}"."id"')
    assert all(AUTHOR_SQL in e["sql"] for e in entries[6:9])
    assert all(e["thread"] == "request" and e["shard"] is None for e in entries)
    assert stats["by_reason"] == {
        "default: in_transaction": 1,
        "default: pinned_primary": 4,
        "default: read_your_writes": 1,
        "default: wal_position": 1,
        "default: write": 2,
        "default_replica: replica": 2,
    }
    assert (stats["queries"], stats["replica_reads"], stats["cache_hits"]) == (11, 2, 1)
    # The N+1 advice: the author lookup ran 3 times (more than DBSCALE_MAX_REPEATS=2).
    assert [(r["count"], r["fix"]) for r in stats["n_plus_one"]] == [
        (3, 'use CBook: select_related("author")')
    ]
    assert AUTHOR_SQL in stats["n_plus_one"][0]["sql"]

    # Rendered as the browser gets it: through the toolbar's own render view.
    rendered = toolbar.get(
        "/__debug__/render_panel/", {"request_id": request_id, "panel_id": PANEL}
    )
    assert rendered.status_code == 200
    content = json.loads(rendered.content)["content"]
    assert "11 queries, 2 on replicas, 1 cache hits" in content
    assert "Fix: use CBook: select_related(&quot;author&quot;)" in content
    assert "read-your-writes (no replica has replayed this context&#x27;s write yet)" in content
    assert "bypass: table written in this transaction" in content
    # Nothing listens once the request is over: the library's fast path is back.
    assert not read_routed.receivers


def test_panel_names_the_shard_key_and_the_fan_out(services: Services, toolbar: Client) -> None:
    for key in (1, 2, 3, 4, 5, 6, 7):
        ShardCustomer.objects.create(id=key, name=f"c{key}")
    services.pg1_replica.wait_for_replay()
    services.pg2_replica.wait_for_replay()
    replicas.monitor.refresh()
    home = shard_for_key("customers", 7)

    response = toolbar.get("/shards/", {"id": 7})

    assert json.loads(response.content) == {
        "one": ["c7", f"{home}_replica"],
        "all": sorted(f"c{key}" for key in (1, 2, 3, 4, 5, 6, 7)),
    }
    _, stats = recorded(toolbar)
    by_key = stats["entries"][0]
    assert (by_key["kind"], by_key["alias"], by_key["reason"]) == (
        "query",
        f"{home}_replica",
        "replica",
    )
    groups = ", ".join(dbscale_settings.groups_of_shard[home])  # "customers" and more
    assert (by_key["shard"], by_key["placement"]) == (f"{home} ({groups})", "shard key")
    fanned = stats["entries"][1:]
    # One statement per shard, each on that shard's replica, the workers' ones included.
    assert sorted((e["kind"], e["alias"], e["reason"], e["placement"]) for e in fanned) == [
        ("query", f"{shard}_replica", "replica", "fan-out")
        for shard in ("shard0", "shard1", "shard2")
    ]
    assert sorted(e["thread"] for e in fanned) == ["fan-out worker", "fan-out worker", "request"]
    assert all('"testapp_shardcustomer"' in e["sql"] for e in fanned)
    assert stats["n_plus_one"] == []


def test_a_bad_max_repeats_setting_is_named(toolbar: Client) -> None:
    from django.conf import settings as live

    config = {**live.DEBUG_TOOLBAR_CONFIG, "DBSCALE_MAX_REPEATS": 0}
    with override_settings(DEBUG_TOOLBAR_CONFIG=config), pytest.raises(ValueError) as caught:
        toolbar.get("/shards/", {"id": 1})
    assert str(caught.value) == 'DEBUG_TOOLBAR_CONFIG["DBSCALE_MAX_REPEATS"] is 0: use an int >= 1.'
