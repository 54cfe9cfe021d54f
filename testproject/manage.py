#!/usr/bin/env python3
"""The example project's manage.py (run from anywhere)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    if sys.argv[1:2] == ["demo"]:
        # The settings boot the services (seconds, more on a busy machine): say so first.
        os.environ["DBSCALE_DEMO_STARTED"] = repr(time.time())
        external = os.environ.get("DBSCALE_TEST_EXTERNAL", "").lower() in {"1", "true", "yes", "on"}
        verb = "attaching to running" if external else "booting"
        print(
            f"... {verb} PostgreSQL primaries, streaming replicas and Redis "
            "(django_dbscale.testing.harness)",
            flush=True,
        )
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
