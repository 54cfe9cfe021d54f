"""The outbox: invalidations of committed writes that could not reach Redis, kept durably.

Invalidation is delivered to Redis after COMMIT. When Redis cannot be reached then, the
version keys the write must bump are written to the ``dbscale_cache_outbox`` table of the
database the write committed on (:class:`~django_dbscale.models.CacheOutbox`), so that they
survive the writer's process and reach every other process:

* **Inside a transaction while the circuit breaker is open** (Redis known to be down), the
  row is inserted *before* COMMIT, in the same transaction (under a savepoint, so a missing
  table cannot fail the user's commit): the write and its owed invalidation commit together,
  and a crash right after COMMIT loses nothing.
* **Otherwise** (the breaker was closed and delivery failed after COMMIT; autocommitted
  writes), the row is inserted right after the failed delivery, on the write's own
  connection when it is in autocommit mode, else on a short-lived connection of its own.
  A process killed between COMMIT and that insert (a window of one failed Redis call) loses
  the invalidation; that is the one gap left, documented in ``docs/cache.md``.

Rows carry no WAL position: whoever drains them bumps the keys with the primary's position
*at drain time*, which is past every commit the rows belong to. Draining happens in
:mod:`~django_dbscale.cache.continuity`'s background verification, which the writer's
process starts right after writing a row, and every other process after any Redis error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import psycopg
from django.db import connections

from django_dbscale.backends import events
from django_dbscale.cache.keys import wide_version_key
from django_dbscale.conf import dbscale_settings
from django_dbscale.own_connections import connect

__all__ = [
    "TABLE",
    "connect",
    "delete",
    "outbox_aliases",
    "pending",
    "primary_position",
    "record",
    "record_in_transaction",
]

logger = logging.getLogger("django_dbscale.cache")

TABLE = "dbscale_cache_outbox"
BACKEND = "django_dbscale.backends.postgresql"
#: How long an outbox statement may take on its own connection.
STATEMENT_TIMEOUT_MS = 2000
#: Rows read per drain; the rest wait for the next one.
DRAIN_BATCH = 1000
_INSERT = f"INSERT INTO {TABLE} (keys) VALUES (%s)"
_SELECT = f"SELECT id, keys FROM {TABLE} ORDER BY id LIMIT {DRAIN_BATCH}"
_DELETE = f"DELETE FROM {TABLE} WHERE id = ANY(%s)"


def outbox_aliases() -> list[str]:
    """Return the primaries that hold an outbox (dbscale backend), each database once."""
    names = dbscale_settings.database_of
    return sorted(
        alias
        for alias, config in connections.settings.items()
        if names.get(alias, alias) == alias and config.get("ENGINE") == BACKEND
    )


def _encode(keys: Iterable[str]) -> str:
    return "\n".join(sorted(keys))


def record_in_transaction(connection: Any, keys: Iterable[str]) -> bool:
    """Insert a row inside *connection*'s open transaction, just before its COMMIT.

    A savepoint keeps a failure (the table is missing: ``migrate`` was not run) from
    aborting the user's transaction. Returns whether the row was written.
    """
    token = events.self_described.set(True)  # the outbox row invalidates nothing cached
    try:
        with connection.cursor() as cursor:
            cursor.execute("SAVEPOINT dbscale_outbox")
            try:
                # Wait on locks at most 2 s, then restore the transaction's own setting
                # (the COMMIT that follows, with its deferred triggers, keeps it).
                cursor.execute("SELECT current_setting('lock_timeout')")
                (previous,) = cursor.fetchone()
                cursor.execute("SET LOCAL lock_timeout = '2s'")
                cursor.execute(_INSERT, [_encode(keys)])
                cursor.execute("SELECT set_config('lock_timeout', %s, true)", [previous])
            except Exception:
                cursor.execute("ROLLBACK TO SAVEPOINT dbscale_outbox")
                raise
            cursor.execute("RELEASE SAVEPOINT dbscale_outbox")
    except Exception as exc:
        _log_failure(connection.alias, exc)
        return False
    finally:
        events.self_described.reset(token)
    return True


def record(alias: str, keys: Iterable[str]) -> bool:
    """Insert a row for writes that have committed on *alias*; return whether it was written.

    Uses *alias*'s connection when it is in autocommit mode (an autocommitted write just
    ran on it), else a short-lived connection: after COMMIT, Django may still hold the
    connection outside autocommit mode, where the insert would open a transaction nobody
    commits.
    """
    encoded = _encode(keys)
    wrapper = connections[alias]
    try:
        if wrapper.connection is not None and wrapper.get_autocommit():
            # The driver's connection, in a transaction of its own bounded in time; not
            # Django's cursor, whose commit hooks and write tracking this is not for.
            _bounded(wrapper.connection, _INSERT, [encoded])
        else:
            with connect(alias) as own:
                _bounded(own, _INSERT, [encoded])
    except Exception as exc:
        _log_failure(alias, exc)
        return False
    return True


def _log_failure(alias: str, exc: Exception) -> None:
    hint = ""
    if isinstance(exc, psycopg.errors.UndefinedTable) or "does not exist" in str(exc):
        hint = f" Run `manage.py migrate django_dbscale --database {alias}`."
    logger.error(
        "Could not record undelivered cache invalidations in %s on %r: %s.%s They stay "
        "queued in this process only.",
        TABLE,
        alias,
        exc,
        hint,
    )


def _bounded(own: psycopg.Connection[Any], sql: str, params: Any = None) -> list[Any]:
    """Run *sql* in a transaction of its own, waiting on locks for at most 2 s.

    ``SET LOCAL`` rather than a session setting: safe behind PgBouncer's transaction pooling.
    """
    with own.transaction():
        own.execute(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
        cursor = own.execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []


def pending(own: psycopg.Connection[Any]) -> list[tuple[int, list[str]]]:
    """Return up to :data:`DRAIN_BATCH` rows as ``(id, keys)``; none if the table is missing."""
    try:
        rows = _bounded(own, _SELECT)
    except psycopg.errors.UndefinedTable:
        return []
    return [(int(row_id), [k for k in str(text).split("\n") if k]) for row_id, text in rows]


def has_rows(own: psycopg.Connection[Any]) -> bool:
    """Return whether the outbox holds any row (false if the table is missing)."""
    try:
        ((found,),) = _bounded(own, f"SELECT EXISTS (SELECT 1 FROM {TABLE})")
    except psycopg.errors.UndefinedTable:
        return False
    return bool(found)


def primary_position(own: psycopg.Connection[Any]) -> int:
    """Return the primary's WAL insert position (past every commit read before it)."""
    from django_dbscale.consistency import parse_lsn

    ((text,),) = _bounded(own, "SELECT pg_current_wal_insert_lsn()::text")
    return parse_lsn(text)


def in_recovery(own: psycopg.Connection[Any]) -> bool:
    """Return whether *own* reached a standby (an alias not declared as a replica)."""
    ((recovering,),) = _bounded(own, "SELECT pg_is_in_recovery()")
    return bool(recovering)


def collapse(keys: Iterable[str]) -> list[str]:
    """Return *keys* with dimension versions replaced by their table's wide version, sorted.

    A drain after an outage may carry thousands of dimension values (see
    :func:`~django_dbscale.cache.keys.wide_version_key`).
    """
    return sorted({wide_version_key(key) for key in keys})


def delete(own: psycopg.Connection[Any], ids: list[int]) -> None:
    """Delete drained rows."""
    if ids:
        _bounded(own, _DELETE, [ids])
