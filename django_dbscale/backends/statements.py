"""Judge whether a SQL statement changed data: what read-your-writes tracking relies on."""

from __future__ import annotations

import re
from typing import Any

_READ_PREFIXES = ("SELECT", "SHOW", "SET ", "SAVEPOINT", "RELEASE", "ROLLBACK", "BEGIN", "COMMIT")
# Command tags (psycopg's ``cursor.statusmessage``) of statements that change no data.
_READ_TAGS = frozenset(
    {
        "SELECT", "SHOW", "SET", "RESET", "BEGIN", "START", "COMMIT", "ROLLBACK", "SAVEPOINT",
        "RELEASE", "EXPLAIN", "DECLARE", "FETCH", "MOVE", "CLOSE", "LISTEN", "UNLISTEN",
        "DISCARD", "DEALLOCATE", "PREPARE",
    }
)  # fmt: skip


def is_write(sql: Any, status: str | None = None) -> bool:
    """Return whether a statement may have changed data.

    *status* is the command tag PostgreSQL returned (``"INSERT 0 1"``, ``"UPDATE 3"``); a
    tag of a data-changing command settles it. Otherwise the SQL text decides, statement by
    statement (psycopg reports only the first tag of a multi-statement string), looking
    inside ``WITH`` for data-modifying CTEs (whose tag is their outer ``SELECT``'s). Errs
    towards "wrote": a false "wrote" costs one cheap LSN query, a false "read" a stale read.
    Not detected: functions with side effects called from a ``SELECT``, and
    ``SELECT ... INTO`` (documented limits).
    """
    if isinstance(sql, str) and sql.startswith("SELECT") and ";" not in sql:
        return False  # the shape of every query Django itself sends: decide without a tag
    if status and status.split(" ", 1)[0] not in _READ_TAGS:
        return True
    if not isinstance(sql, str):
        return status is None  # psycopg.sql.Composed without a tag: assume it wrote
    # Several statements: psycopg reports the first one's tag, so judge each by its text
    # (a ';' inside a literal only makes this err towards "wrote").
    return any(_statement_writes(part) for part in sql.split(";") if part.strip())


_DATA_MODIFYING = re.compile(r"\b(INSERT|UPDATE|DELETE|MERGE)\b")


def _statement_writes(sql: str) -> bool:
    head = sql.lstrip(" \n\t(").upper()
    if head.startswith("/*"):
        head = head.split("*/", 1)[-1].lstrip(" \n\t(")
    if head.startswith("WITH"):
        # A data-modifying CTE reports its outer SELECT's tag: look inside.
        return bool(_DATA_MODIFYING.search(head))
    if head.startswith("EXPLAIN"):
        return "ANALYZE" in head and bool(_DATA_MODIFYING.search(head))
    return not head.startswith(_READ_PREFIXES)
