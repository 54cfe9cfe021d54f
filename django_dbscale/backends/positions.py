"""A write's WAL position, read in the write's own round trip.

Read-your-writes and the cache's invalidations both need the primary's WAL position after
an autocommitted write commits; fetched afterwards it costs a second round trip, about as
much as the write itself on a fast network. Instead, a write compiler asks for it
(:func:`reading_position`) and the dbscale cursor sends the statement as::

    <statement>; COMMIT; SELECT pg_current_wal_insert_lsn()::text

in one simple-protocol message. PostgreSQL runs the statements of one message as one
implicit transaction until an explicit ``COMMIT``, which ends it; the ``SELECT`` then runs
in a transaction of its own, after the commit record, so the position it returns covers
the write. The cursor keeps the statement's own result (its rows and row count) for the
caller and hands the position over (:func:`django_dbscale.consistency.note_commit_position`
and the list :func:`reading_position` yields).

Only where it pays and is possible: on a primary that has replicas (a primary without
them is always read from itself, so its position is never needed), outside a transaction,
with ``READ_YOUR_WRITES = "lsn"``, and with Django's client-side binding cursor (the
extended protocol of ``server_side_binding`` takes one statement per message). Anywhere
else the statement runs unchanged and the position is fetched later, as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import psycopg

from django_dbscale.conf import dbscale_settings

__all__ = ["THEN_POSITION", "reading_position", "wanted", "worth_it"]

THEN_POSITION = "; COMMIT; SELECT pg_current_wal_insert_lsn()::text"

#: While a write compiler runs: the list the cursor appends the position to.
wanted: ContextVar[list[int] | None] = ContextVar("dbscale_position_wanted", default=None)


@contextmanager
def reading_position() -> Iterator[list[int]]:
    """Ask the dbscale cursor to read the WAL position of the writes run in the block.

    Yields the list the positions are appended to, one per statement that could read it
    (empty where it could not: the caller then passes no position on).
    """
    positions: list[int] = []
    token = wanted.set(positions)
    try:
        yield positions
    finally:
        wanted.reset(token)


def worth_it(db: Any, cursor: Any, sql: Any) -> bool:
    """Return whether *sql* on *db* (a ``DatabaseWrapper``) should read its position."""
    if not isinstance(sql, str) or db.in_atomic_block or not db.get_autocommit():
        return False
    alias = db.alias
    if dbscale_settings.read_your_writes != "lsn" or not dbscale_settings.replicas.get(alias):
        return False
    return isinstance(cursor, psycopg.ClientCursor)
