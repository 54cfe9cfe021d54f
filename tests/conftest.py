"""Fixtures shared by the whole suite: real services, migrated databases, clean state."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.management import create_permissions
from django.contrib.contenttypes.management import create_contenttypes
from django.core.management import call_command
from django.db.models.signals import post_migrate
from django.test import override_settings

from django_dbscale import consistency, replicas
from django_dbscale.conf import dbscale_settings
from django_dbscale.testing.harness import PgServer, Services, get_services


def primary_aliases() -> list[str]:
    """Every alias that is not a replica (the default database and the shards)."""
    return [
        alias
        for alias, entry in settings.DATABASES.items()
        if alias not in dbscale_settings.primary_of and not entry.get("TEST", {}).get("MIRROR")
    ]


@pytest.fixture(scope="session")
def django_db_setup(django_db_blocker: Any) -> None:
    """Migrate every primary of the harness's throwaway servers (no test_ databases).

    Replicas get the schema through streaming replication; ``TEST["MIRROR"]`` keeps
    Django from flushing them.
    """
    with django_db_blocker.unblock():
        for alias in primary_aliases():
            call_command("migrate", database=alias, run_syncdb=True, verbosity=0, interactive=False)
            call_command("flush", database=alias, interactive=False, verbosity=0)
    # Every transactional test ends with a flush of each primary, which sends post_migrate:
    # recreating content types and permissions there was 90% of the flush (0.6 s a test).
    # No test reads them; the cache's own post_migrate hook (invalidate on flush) stays.
    post_migrate.disconnect(create_contenttypes)
    post_migrate.disconnect(
        create_permissions, dispatch_uid="django.contrib.auth.management.create_permissions"
    )


@pytest.fixture(scope="session")
def services() -> Services:
    return get_services()


@pytest.fixture(autouse=True)
def _fresh_dbscale_state() -> Iterator[None]:
    """Give each test its own consistency context and a clean replica monitor."""
    replicas.monitor.reset()
    replicas.route_counts.clear()
    token = consistency.open_context()
    try:
        yield
    finally:
        consistency.close_context(token)
        replicas.monitor.reset()


@pytest.fixture
def paused(services: Services) -> Iterator[Any]:
    """Return a function that pauses replay on a replica server until the test ends."""
    paused_servers: list[PgServer] = []

    def pause(server: PgServer) -> PgServer:
        server.pause_replay()
        paused_servers.append(server)
        return server

    yield pause
    for server in paused_servers:
        server.resume_replay()
        server.wait_for_replay()


@pytest.fixture
def fast_breaker() -> Iterator[None]:
    """Cache breaker: open after 2 failures, probe after 0.3 s; 0.1 s socket timeouts."""
    from tests.test_cache_support import COOLDOWN

    cache = {**settings.DBSCALE["CACHE"], "CIRCUIT_BREAKER": (2, COOLDOWN), "SOCKET_TIMEOUT": 0.1}
    with override_settings(DBSCALE={**settings.DBSCALE, "CACHE": cache}):
        yield


@pytest.fixture
def no_shard_map(django_db_blocker: Any) -> Iterator[None]:
    """Route every group by its ``SHARD_GROUPS`` entry (no shard map rows) during the test.

    For tests of what settings changes do to a group routed by its settings (the behaviour
    before ``migrate`` seeds the map). The rows come back from the settings afterwards.
    """
    from django_dbscale.own_connections import connect
    from django_dbscale.sharding import shardmap

    with connect("default") as conn:
        conn.execute(f"DELETE FROM {shardmap.TABLE}")
    shardmap.refresh()
    try:
        yield
    finally:
        # Seeding reads the shards' stamps through Django's connections, like migrate.
        with django_db_blocker.unblock(), connect("default") as conn:
            conn.execute(f"DELETE FROM {shardmap.TABLE}")
            shardmap.seed(conn)
        shardmap.refresh()
