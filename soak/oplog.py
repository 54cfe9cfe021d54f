"""Append-only JSONL operation logs, one file per simulated user (and one for the worker).

Every line is one operation with ``t0``/``t1`` from :func:`time.monotonic` (one clock for
every process on the machine, so the runner's fault log and the users' logs compare).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, TextIO


class OpLog:
    """A JSONL file written one flushed line per record (safe to share between threads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        """Append *record* as one line and flush it (a crash loses at most that line)."""
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._fh.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Return the records of one JSONL file (a torn last line is dropped)."""
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records
