"""Writes from outside Django invalidate the cache: triggers, the outbox and the relay.

External writes are made on the harness's own connections (like psql or another service);
the relay runs as a real ``manage.py dbscale cache relay`` process.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connections
from django.test import override_settings

from django_dbscale.cache import capture, outbox
from django_dbscale.testing.harness import Services
from tests.test_cache_support import cache_env, fresh_context, observe
from tests.testapp.models_cache import CCounter

ROOT = Path(__file__).resolve().parent.parent
TABLE = CCounter._meta.db_table

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.usefixtures(cache_env.__name__),
]


@pytest.fixture
def captured() -> Iterator[None]:
    """Capture on (Django's sessions tagged), triggers installed on ``default``."""
    cache = {**settings.DBSCALE["CACHE"], "CAPTURE": True}
    with override_settings(DBSCALE={**settings.DBSCALE, "CACHE": cache}):
        connections.close_all()  # new sessions carry dbscale.origin=django
        call_command("dbscale", "cache", "capture", "--database", "default", verbosity=0)
        try:
            yield
        finally:
            capture.remove("default")
            connections.close_all()


def outbox_rows(services: Services) -> int:
    rows = services.pg1.execute(f"SELECT count(*) FROM {outbox.TABLE}", dbname="dbscale")
    return int(rows[0][0])


def external(services: Services, statement: str, params: Any = None) -> None:
    services.pg1.execute(statement, params, dbname="dbscale")


def cached(pk: int) -> tuple[int, list[str]]:
    with fresh_context(), observe() as seen:
        value = int(CCounter.objects.cache().get(pk=pk).value)
    return value, seen.reasons


@pytest.fixture
def relay_process(services: Services) -> Iterator[subprocess.Popen[str]]:
    env = {
        **os.environ,
        **services.env(),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(ROOT),
    }
    process = subprocess.Popen(
        [sys.executable, "-u", "-m", "django", "dbscale", "cache", "relay", "--poll", "0.5"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    seen = []
    for line in process.stdout:  # system check warnings come first
        seen.append(line)
        if "relaying captured writes" in line or len(seen) > 50:
            break
    assert "relaying captured writes" in seen[-1], "".join(seen)
    _wait_for_heartbeats()
    try:
        yield process
    finally:
        process.terminate()
        process.wait(10)


def _wait_for_heartbeats() -> None:
    """Wait until the relay's heartbeats are up and this process trusts every database."""
    from django_dbscale.cache import continuity
    from django_dbscale.cache.client import gateway
    from django_dbscale.cache.options import options

    served = [a for a in outbox.outbox_aliases() if a != "default_replica_direct"]  # a standby
    keys = [continuity.relay_key(options().prefix, a) for a in served]
    deadline = time.monotonic() + 10
    while None in gateway().client.mget(keys):
        assert time.monotonic() < deadline, "the relay never beat"
        time.sleep(0.02)
    assert continuity.wait_until_verified()


def test_triggers_are_installed_on_every_table_of_the_database_and_removed(
    captured: None, services: Services
) -> None:
    installed = services.pg1.execute(
        "SELECT DISTINCT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "WHERE t.tgname = 'dbscale_capture' ORDER BY 1",
        dbname="dbscale",
    )
    names = [row[0] for row in installed]
    assert TABLE in names and outbox.TABLE not in names
    assert names == capture.tables_for("default")


def test_an_external_write_goes_to_the_outbox_and_a_django_write_does_not(
    captured: None, services: Services
) -> None:
    row = CCounter.objects.create(name="c", value=1)
    CCounter.objects.filter(pk=row.pk).update(value=2)
    with connections["default"].cursor() as cursor:  # raw SQL through Django: not captured
        cursor.execute(f"UPDATE {TABLE} SET value = 3 WHERE id = %s", [row.pk])
    assert outbox_rows(services) == 0  # Django's writes describe themselves
    external(services, f"UPDATE {TABLE} SET value = 4 WHERE id = %s", (row.pk,))
    external(services, f"TRUNCATE {TABLE}")
    assert outbox_rows(services) == 2  # one per statement, in the writer's transaction


def test_the_relay_invalidates_external_writes_within_a_bound(
    captured: None, services: Services, relay_process: Any
) -> None:
    row = CCounter.objects.create(name="c", value=0)
    delays: list[float] = []
    for value in range(1, 21):
        assert cached(row.pk)[0] == value - 1
        assert cached(row.pk) == (value - 1, ["hit"])
        started = time.monotonic()
        external(services, f"UPDATE {TABLE} SET value = %s WHERE id = %s", (value, row.pk))
        while cached(row.pk)[0] != value:
            assert time.monotonic() - started < 5, "not invalidated within 5 s"
            time.sleep(0.002)
        delays.append(time.monotonic() - started)
    deadline = time.monotonic() + 2  # the relay bumps, then deletes the drained rows
    while outbox_rows(services) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert outbox_rows(services) == 0  # drained, nothing left behind
    print(
        f"external write -> fresh read: median {statistics.median(delays) * 1000:.1f} ms, "
        f"max {max(delays) * 1000:.1f} ms over {len(delays)} writes"
    )
    assert statistics.median(delays) < 0.5


def test_external_writes_made_while_no_relay_runs_are_kept_and_delivered_later(
    captured: None, services: Services
) -> None:
    row = CCounter.objects.create(name="c", value=1)
    assert cached(row.pk)[0] == 1
    external(services, f"UPDATE {TABLE} SET value = 9 WHERE id = %s", (row.pk,))
    assert outbox_rows(services) == 1  # nobody listens: the row waits
    assert cached(row.pk) == (1, ["hit"])  # the documented window until a relay drains it
    import threading

    stop = threading.Event()
    drained: list[set[str]] = []
    worker = threading.Thread(
        target=capture.relay,
        args=(["default"], stop),
        kwargs={"poll": 0.1, "on_drained": drained.append},
    )
    worker.start()
    try:
        deadline = time.monotonic() + 5
        while not drained and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        worker.join(5)
    assert drained == [{"default"}]
    assert outbox_rows(services) == 0
    assert cached(row.pk) == (9, ["miss"])


def test_without_a_relay_every_process_drains_external_writes_itself_within_seconds(
    captured: None, services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    from django_dbscale.cache import continuity

    continuity._relay_missing.clear()  # warned about afresh in this test
    continuity._arm_poll()  # as after this process's verification, with CAPTURE on
    row = CCounter.objects.create(name="c", value=1)
    assert cached(row.pk)[0] == 1
    external(services, f"UPDATE {TABLE} SET value = 5 WHERE id = %s", (row.pk,))
    started = time.monotonic()
    while outbox_rows(services):  # this process notices the missing relay and drains it
        assert time.monotonic() - started < 2 * continuity.RELAY_CHECK_INTERVAL + 1
        time.sleep(0.05)
    assert continuity.wait_until_verified()
    assert cached(row.pk) == (5, ["miss"])
    assert any("No change-capture relay serves 'default'" in r.getMessage() for r in caplog.records)


def test_a_running_relay_keeps_its_heartbeat_so_processes_do_not_drain(
    captured: None, services: Services
) -> None:
    import threading

    from django_dbscale.cache import continuity
    from django_dbscale.cache.client import gateway
    from django_dbscale.cache.options import options

    stop = threading.Event()
    worker = threading.Thread(target=capture.relay, args=(["default"], stop), kwargs={"poll": 0.2})
    worker.start()
    try:
        key = continuity.relay_key(options().prefix, "default")
        deadline = time.monotonic() + 5
        while gateway().client.get(key) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        continuity._relay_missing.discard("default")
        continuity._check_relay(["default"])
        assert "default" not in continuity._relay_missing
        assert 0 < gateway().client.ttl(key) <= 3
    finally:
        stop.set()
        worker.join(5)
