"""Celery: a task reads at least what the code that published it had written or seen.

Install once, where the Celery app is made::

    app = Celery("proj")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.autodiscover_tasks()

    from django_dbscale.contrib.celery import install

    install(app)

**Publishing** (``before_task_publish``): the message gets a ``dbscale_token`` header with
:func:`~django_dbscale.consistency.consistency_token` of the publishing context, when that
context wrote or has seen anything (a request after a write, a cache hit, a token it read
at least); otherwise no header and no query. A pending write's position costs one query per
primary, once per context.

**Running** (``task_prerun``/``task_postrun``): every task runs in a consistency context of
its own, so one task's writes never steer the next task's reads; it starts from the
message's token, if any, read at least the way the task asks with its
``dbscale_consistency`` option::

    @app.task(dbscale_consistency="wait")
    def send_receipt(order_id): ...

``"sticky"`` (default)
    a replica that has replayed the token's positions, else the primary;
``"wait"``
    the same, after waiting up to ``REPLICA_WAIT`` (at least 1 s) for a replica to catch up;
``"always"``
    the primaries, for the whole task (GitLab's ``:always``).

A token that is expired, forged or names an alias this worker does not know is logged and
ignored: the task runs from an empty context (it may read a lagging replica), never fails.
Tokens live ``CONSISTENCY_MAX_AGE`` seconds: a task queued for longer starts empty, which
is safe once replicas are within the lag budget.
"""

from __future__ import annotations

import logging
from typing import Any

from django_dbscale import consistency

__all__ = ["HEADER", "MODES", "install"]

logger = logging.getLogger("django_dbscale.contrib.celery")

#: The message header that carries the token.
HEADER = "dbscale_token"
#: A task's ``dbscale_consistency`` option -> the mode of :class:`read_at_least`.
MODES: dict[str, consistency.ReadMode] = {
    "sticky": "sticky",
    "wait": "wait",
    "always": "primary",
}
_OPTION = "dbscale_consistency"
#: Task id -> the read_at_least block the task runs in (entered in prerun, left in postrun).
_running: dict[str, consistency.read_at_least] = {}


def _publishing(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    if headers is None or HEADER in headers:
        return  # an explicit header (a retry, a chain) wins
    state = consistency.current_state()
    if not (state.positions or state.pending or state.write_times):
        return
    try:
        headers[HEADER] = consistency.consistency_token()
    except Exception:  # the primary is unreachable: publish anyway, without a position
        logger.warning("Could not read the WAL position for a task's token.", exc_info=True)


def _mode_of(task: Any) -> consistency.ReadMode:
    option = getattr(task, _OPTION, None) or "sticky"
    mode = MODES.get(option)
    if mode is None:
        logger.error(
            "Task %s has %s=%r; use one of %s. Running it as 'sticky'.",
            getattr(task, "name", task),
            _OPTION,
            option,
            sorted(MODES),
        )
        return "sticky"
    return mode


def _before_task(task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
    if task_id is None or task is None:
        return
    token = task.request.get(HEADER) if getattr(task, "request", None) is not None else None
    try:
        block = consistency.read_at_least(token, _mode_of(task))
    except consistency.InvalidConsistencyToken as exc:
        logger.warning("Task %s: ignoring its consistency token: %s", task_id, exc)
        block = consistency.read_at_least(None)
    block.__enter__()
    _running[task_id] = block


def _after_task(task_id: str | None = None, **kwargs: Any) -> None:
    block = _running.pop(task_id, None) if task_id is not None else None
    if block is not None:
        block.__exit__(None, None, None)


def install(app: Any = None) -> None:
    """Connect the publishing and running hooks (idempotent).

    *app* is accepted for symmetry with other Celery integrations; the hooks are Celery's
    global signals, so they serve every app in the process.
    """
    from celery.signals import before_task_publish, task_postrun, task_prerun

    before_task_publish.connect(_publishing, weak=False, dispatch_uid="dbscale_publish")
    task_prerun.connect(_before_task, weak=False, dispatch_uid="dbscale_prerun")
    task_postrun.connect(_after_task, weak=False, dispatch_uid="dbscale_postrun")
