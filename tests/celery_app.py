"""The Celery app of the Celery tests: a real worker runs it against the suite's servers.

The worker is started by ``tests/test_celery.py`` with ``DJANGO_SETTINGS_MODULE`` set and the
harness's ``Services.env()``, so it attaches to the same PostgreSQL servers and Redis.
"""

from __future__ import annotations

import os
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
django.setup()

from celery import Celery  # noqa: E402

from django_dbscale.contrib.celery import install  # noqa: E402
from django_dbscale.testing.harness import get_services  # noqa: E402

_services = get_services()
app = Celery(
    "dbscale_tests",
    broker=_services.redis_url(3),
    backend=_services.redis_url(4),
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
install(app)


def _read(pk: int) -> dict[str, Any]:
    from tests.testapp.models import Note

    note = Note.objects.filter(pk=pk).first()
    return {
        "title": None if note is None else note.title,
        "db": None if note is None else note._state.db,
    }


@app.task(name="tests.read_note")
def read_note(pk: int) -> dict[str, Any]:
    return _read(pk)


@app.task(name="tests.read_note_waiting", dbscale_consistency="wait")
def read_note_waiting(pk: int) -> dict[str, Any]:
    return _read(pk)


@app.task(name="tests.read_note_always", dbscale_consistency="always")
def read_note_always(pk: int) -> dict[str, Any]:
    return _read(pk)


@app.task(name="tests.write_then_report")
def write_then_report(title: str) -> dict[str, Any]:
    """Write in the task; a later task must not inherit this one's context."""
    from django_dbscale import consistency
    from tests.testapp.models import Note

    Note.objects.create(title=title)
    state = consistency.current_state()
    return {"positions": sorted(set(state.positions) | set(state.pending))}


@app.task(name="tests.context_positions")
def context_positions() -> list[str]:
    from django_dbscale import consistency

    state = consistency.current_state()
    return sorted(set(state.positions) | set(state.pending))


@app.task(name="tests.token_header", bind=True)
def token_header(self: Any) -> str | None:
    from django_dbscale.contrib.celery import HEADER

    value = self.request.get(HEADER)
    return None if value is None else str(value)
