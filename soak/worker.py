"""The background worker: reads what a user wrote, given only the user's token.

Like a Celery task receiving ``token=consistency_token()`` as an argument, it gets
``(user, token, kind, value)`` from a queue, opens ``read_at_least(token)`` and reads the
user's row (uncached and cached, in random order, in that one context). The value must be
at least ``value``, the user's last acknowledged write of that kind when it sent the token.
It runs in its own process with Django set up on :mod:`soak.settings` (the same
databases, through the runner's proxies).
"""

from __future__ import annotations

import os
import queue
import random
import sys
import time
from pathlib import Path
from typing import Any


def run_worker(log_dir: str, handoff: Any, stop_at: float, services_json: str) -> None:
    """Serve *handoff* until ``time.monotonic() >= stop_at`` and the queue is empty."""
    os.environ["DBSCALE_SOAK_SERVICES"] = services_json
    os.environ["DJANGO_SETTINGS_MODULE"] = "soak.settings"
    # The library's warnings (probes failing during faults) go to the run's directory.
    sys.stderr = open(Path(log_dir) / "worker.log", "a", buffering=1)  # noqa: SIM115
    import django

    django.setup()
    from django.db import connections

    from django_dbscale import read_at_least
    from soak.oplog import OpLog
    from soak.views import KINDS, read_rows

    rng = random.Random(7)
    log = OpLog(Path(log_dir) / "worker.jsonl")
    try:
        while True:
            try:
                user, token, kind, value = handoff.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() >= stop_at:
                    return
                continue
            seq = rng.choice(("uc", "cu", "u", "c"))
            reads: list[dict[str, Any]] = []
            error = None
            t0 = time.monotonic()
            try:
                with read_at_least(token):
                    read_rows(KINDS[kind][0], user, seq, reads)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
            finally:
                connections.close_all()  # one job, one set of connections, like a task
            t1 = time.monotonic()
            log.write(
                {
                    "op": "read",
                    "user": "worker",
                    "mode": "worker",
                    "kind": kind,
                    "target": user,
                    "seq": seq,
                    "floor": value,
                    "t0": t0,
                    "t1": t1,
                    "ok": error is None,
                    "status": 200 if error is None else 0,
                    "reads": reads,
                    "error": error,
                }
            )
    finally:
        log.close()
