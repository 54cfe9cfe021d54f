"""A task reads at least what the code that published it wrote: a real worker, a real broker.

The worker is a ``celery worker`` subprocess (solo pool) on the harness's Redis, attached to
the same PostgreSQL servers; the replica's replay is really held back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from django_dbscale import consistency, replicas
from django_dbscale.testing.harness import Services
from tests.testapp.models import Note

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


@pytest.fixture(scope="module")
def worker(services: Services) -> Iterator[Any]:
    from tests import celery_app

    celery_app.app.control.purge()
    env = {
        **os.environ,
        **services.env(),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": str(ROOT),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker",
         "--pool=solo", "--concurrency=1", "--without-gossip", "--without-mingle",
         "--without-heartbeat", "-l", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not celery_app.app.control.ping(timeout=0.5):
        if process.poll() is not None or time.monotonic() > deadline:
            output = process.stdout.read() if process.stdout else ""
            process.kill()
            pytest.fail(f"the Celery worker did not start:\n{output}")
    try:
        yield celery_app
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def on_replica(services: Services, pk: int) -> list[Any]:
    return services.pg1_replica.execute(
        "SELECT title FROM testapp_note WHERE id = %s", (pk,), dbname="dbscale"
    )


def test_a_task_published_after_a_write_reads_it_though_the_replica_lags(
    worker: Any, services: Services, paused: Any
) -> None:
    services.pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    paused(services.pg1_replica)
    with consistency.consistency_context():  # a request
        note = Note.objects.create(title="receipt")
        result = worker.read_note.delay(note.pk)
    assert on_replica(services, note.pk) == []  # the replica really lacks it
    assert result.get(timeout=30) == {"title": "receipt", "db": "default"}


def test_without_a_write_no_token_is_sent_and_the_task_reads_the_replica(
    worker: Any, services: Services, paused: Any
) -> None:
    note = Note.objects.create(title="old")
    services.pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    with consistency.consistency_context():  # a request that only reads
        result = worker.read_note.delay(note.pk)
        header = worker.token_header.delay()
    assert result.get(timeout=30) == {"title": "old", "db": "default_replica"}
    assert header.get(timeout=30) is None
    with consistency.consistency_context():  # a request that wrote
        Note.objects.create(title="new")
        header = worker.token_header.delay()
    token = header.get(timeout=30)
    assert token is not None
    assert set(consistency.decode_token(token).positions) == {"default"}


def test_a_waiting_task_reads_the_replica_once_it_catches_up(
    worker: Any, services: Services, paused: Any
) -> None:
    services.pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    paused(services.pg1_replica)
    with consistency.consistency_context():
        note = Note.objects.create(title="waited")
        result = worker.read_note_waiting.delay(note.pk)
    threading.Timer(0.3, services.pg1_replica.resume_replay).start()
    assert result.get(timeout=30) == {"title": "waited", "db": "default_replica"}


def test_an_always_task_reads_the_primary_even_without_a_write(
    worker: Any, services: Services
) -> None:
    note = Note.objects.create(title="fresh")
    services.pg1_replica.wait_for_replay()
    with consistency.consistency_context():
        result = worker.read_note_always.delay(note.pk)
    assert result.get(timeout=30) == {"title": "fresh", "db": "default"}


def test_each_task_runs_in_a_context_of_its_own(worker: Any) -> None:
    with consistency.consistency_context():
        assert worker.write_then_report.delay("mine").get(timeout=30) == {"positions": ["default"]}
        # The next task on the same worker process starts empty: no inherited write.
        assert worker.context_positions.delay().get(timeout=30) == []
