"""A thin wrapper of Django's PostgreSQL backend: the one place that sees every statement.

Set ``"ENGINE": "django_dbscale.backends.postgresql"`` on every alias (primaries, replicas,
shards). It adds three things to Django's backend and changes nothing else:

* **Write tracking for read-your-writes.** After a transaction that wrote commits (or a
  write statement in autocommit mode returns), it calls
  :func:`django_dbscale.consistency.record_write` for the connection's alias. No query is
  made here; the WAL position is fetched lazily, once, when the context next needs it.
* **Failover of reads.** A router cannot re-run a query that already failed, so the
  retry lives here: when a *replica* fails to connect, or its connection breaks during a
  statement outside a transaction, the replica is quarantined
  (:func:`django_dbscale.replicas.report_failure`) and the statement is re-run on the
  replica's primary. The caller sees rows, not an error. Inside a transaction nothing is
  retried (re-running a statement of a broken transaction elsewhere would be wrong).
* **Events.** ``compiler_module`` points at
  :mod:`django_dbscale.backends.postgresql.compiler`, which publishes every ORM write;
  ``commit()`` and ``rollback()`` publish the transaction's end. Subscribers (the queryset
  cache) connect to :mod:`django_dbscale.backends.events`; this module imports none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import DatabaseError, InterfaceError, OperationalError
from django.db.backends.postgresql import base as pg_base
from django.db.backends.postgresql.operations import DatabaseOperations as PgOperations
from django.db.backends.utils import CursorDebugWrapper as DjangoCursorDebugWrapper
from django.db.backends.utils import CursorWrapper as DjangoCursorWrapper

from django_dbscale import consistency
from django_dbscale.backends import events
from django_dbscale.backends.positions import THEN_POSITION
from django_dbscale.backends.positions import wanted as positions_wanted
from django_dbscale.backends.positions import worth_it as positions_worth_it
from django_dbscale.backends.statements import is_write
from django_dbscale.backends.written_tables import UNKNOWN, written_tables
from django_dbscale.conf import dbscale_settings

logger = logging.getLogger("django_dbscale.backends")

_FAILOVER_ERRORS = (OperationalError, InterfaceError)


def _statusmessage(cursor: Any) -> str | None:
    try:
        return cursor.statusmessage  # type: ignore[no-any-return]
    except Exception:  # a cursor type without it (or closed): judge by the SQL
        return None


def _note_write(db: Any, sql: Any = None, cursor: Any = None) -> None:
    note_write = getattr(db, "note_write", None)
    if note_write is not None:  # None: a primary without the dbscale ENGINE (dbscale.W001)
        note_write()
    if sql is not None and events.statement_wrote.receivers and not events.self_described.get():
        _publish_raw_write(db, sql, cursor)


def _publish_raw_write(db: Any, sql: Any, cursor: Any) -> None:
    """Publish the tables a raw SQL write changed (``statement_wrote``), read by the parser.

    The write compilers publish their own statements (with dimension values); this covers
    everything else: ``cursor.execute()``/``executemany()``, ``COPY ... FROM``, ``RunSQL``.
    Replicas never publish (nothing can write to a standby). Statements whose tables
    cannot be named are published with ``table=None``.
    """
    if getattr(db, "dbscale_primary", lambda: None)() is not None:
        return
    if isinstance(sql, str):
        text: str | None = sql
    else:  # psycopg.sql.Composed and friends
        try:
            text = sql.as_string(cursor)
        except Exception:
            text = None
    tables = written_tables(text) if text is not None else UNKNOWN
    if not tables:
        return
    with events.operation():  # several tables, one statement: subscribers act once
        if tables is UNKNOWN:
            events.statement_wrote.send(sender=type(db), connection=db, table=None, dims=None)
            return
        assert isinstance(tables, frozenset)
        for table in sorted(tables):
            events.statement_wrote.send(sender=type(db), connection=db, table=table, dims=None)


def _connection_broken(db: Any) -> bool:
    conn = db.connection
    return conn is None or bool(getattr(conn, "broken", False)) or bool(conn.closed)


class _DBScaleCursorMixin:
    """Track writes and fail reads over from a broken replica to its primary."""

    db: Any  # our DatabaseWrapper, or the primary's after a failover
    cursor: Any
    #: The statement's own result, kept when its WAL position was read after it
    #: (:mod:`~django_dbscale.backends.positions`): rows and row count.
    _dbscale_kept: tuple[list[Any] | None, int] | None = None

    def _execute(self, sql: Any, params: Any, *wrapper_args: Any) -> Any:
        self._dbscale_kept = None
        positions = positions_wanted.get()
        if positions is not None and positions_worth_it(self.db, self.cursor, sql):
            return self._execute_reading_position(sql, params, positions, *wrapper_args)
        try:
            result = super()._execute(sql, params, *wrapper_args)  # type: ignore[misc]
        except _FAILOVER_ERRORS:
            if not self._fail_over(sql):
                raise
            result = super()._execute(sql, params, *wrapper_args)  # type: ignore[misc]
        if is_write(sql, _statusmessage(self.cursor)):
            _note_write(self.db, sql, self.cursor)
        return result

    def _execute_reading_position(
        self, sql: str, params: Any, positions: list[int], *wrapper_args: Any
    ) -> Any:
        """Run an autocommitted write and read the WAL position after its commit, at once."""
        result = super()._execute(sql + THEN_POSITION, params, *wrapper_args)  # type: ignore[misc]
        cursor = self.cursor
        wrote = is_write(sql, _statusmessage(cursor))
        with self.db.wrap_database_errors:
            rows = cursor.fetchall() if cursor.description is not None else None
            self._dbscale_kept = (rows, cursor.rowcount)
            cursor.nextset()  # COMMIT
            cursor.nextset()  # SELECT pg_current_wal_insert_lsn()
            (text,) = cursor.fetchone()
        if wrote:
            _note_write(self.db, sql, cursor)
        position = consistency.insert_position(text)
        consistency.note_commit_position(self.db.alias, position)
        positions.append(position)
        return result

    # The statement's own result, when _execute_reading_position moved the cursor past it.
    def fetchone(self) -> Any:
        kept = self._dbscale_kept
        if kept is None or kept[0] is None:
            with self.db.wrap_database_errors:
                return self.cursor.fetchone()
        return kept[0].pop(0) if kept[0] else None

    def fetchmany(self, size: int = 0) -> list[Any]:
        kept = self._dbscale_kept
        if kept is None or kept[0] is None:
            with self.db.wrap_database_errors:
                return self.cursor.fetchmany(size) if size else self.cursor.fetchmany()  # type: ignore[no-any-return]
        count = size or 1
        taken, kept[0][:count] = kept[0][:count], []
        return taken

    def fetchall(self) -> list[Any]:
        kept = self._dbscale_kept
        if kept is None or kept[0] is None:
            with self.db.wrap_database_errors:
                return self.cursor.fetchall()  # type: ignore[no-any-return]
        taken, kept[0][:] = kept[0][:], []
        return taken

    @property
    def rowcount(self) -> int:
        kept = self._dbscale_kept
        return int(self.cursor.rowcount) if kept is None else kept[1]

    def _executemany(self, sql: Any, param_list: Any, *wrapper_args: Any) -> Any:
        result = super()._executemany(sql, param_list, *wrapper_args)  # type: ignore[misc]
        if is_write(sql, _statusmessage(self.cursor)):
            _note_write(self.db, sql, self.cursor)
        return result

    @contextmanager
    def copy(self, statement: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """psycopg's ``cursor.copy()``, noting ``COPY ... FROM STDIN`` as a write."""
        with self.db.wrap_database_errors, self.cursor.copy(statement, *args, **kwargs) as copy:
            yield copy
        text = statement if isinstance(statement, str) else repr(statement)
        if "FROM STDIN" in " ".join(text.upper().split()):
            _note_write(self.db, statement, self.cursor)

    def _fail_over(self, sql: Any) -> bool:
        """Point this cursor at the primary if a replica's connection broke under a read.

        Only when re-running is safe and useful: the connection is a configured replica's,
        it is in autocommit mode (no transaction whose earlier statements would be lost),
        the statement is a read, and the connection is really broken -- a statement
        timeout or a recovery-conflict cancellation leaves it usable and is re-raised.
        """
        replica = self.db
        primary_alias = replica.dbscale_primary()
        if (
            primary_alias is None
            or replica.in_atomic_block
            or not replica.autocommit
            or is_write(sql)
            or not _connection_broken(replica)
        ):
            return False
        primary = replica.fail_over_to(primary_alias, "query failed")
        try:
            replica.close()
        except DatabaseError:
            replica.connection = None
        primary.ensure_connection()
        self.cursor = primary.create_cursor()
        self.db = primary
        return True


class CursorWrapper(_DBScaleCursorMixin, DjangoCursorWrapper):
    """Django's cursor wrapper plus write tracking and replica failover."""


class CursorDebugWrapper(_DBScaleCursorMixin, pg_base.CursorDebugWrapper):
    """Django's debug cursor wrapper plus write tracking and replica failover."""


assert issubclass(pg_base.CursorDebugWrapper, DjangoCursorDebugWrapper)


class DatabaseOperations(PgOperations):
    compiler_module = "django_dbscale.backends.postgresql.compiler"


class DatabaseWrapper(pg_base.DatabaseWrapper):
    """Django's PostgreSQL ``DatabaseWrapper`` with the additions described above."""

    ops_class = DatabaseOperations

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._in_atomic_block = False
        super().__init__(*args, **kwargs)
        self.dbscale_dirty = False

    # Django sets this attribute on entering and leaving transaction.atomic(); mirroring it
    # (and set_autocommit(False) transactions) into the consistency context lets routing
    # check it without a connections[] lookup.
    @property
    def in_atomic_block(self) -> bool:
        return self._in_atomic_block

    @in_atomic_block.setter
    def in_atomic_block(self, value: bool) -> None:
        self._in_atomic_block = value
        self._mirror_transaction_state()

    def set_autocommit(self, autocommit: bool, *args: Any, **kwargs: Any) -> None:
        super().set_autocommit(autocommit, *args, **kwargs)
        self._mirror_transaction_state()

    def _mirror_transaction_state(self) -> None:
        # Before the first connect Django leaves autocommit False: that is no transaction.
        in_transaction = self._in_atomic_block or (
            getattr(self, "connection", None) is not None and not getattr(self, "autocommit", True)
        )
        consistency.note_transaction(self.alias, in_transaction)

    def get_connection_params(self) -> dict[str, Any]:
        """Django's parameters, plus ``dbscale.origin=django`` when change capture is on.

        The capture triggers (``manage.py dbscale cache capture``) skip sessions that carry
        it: this backend describes its own writes, so they are not captured twice. A startup
        option costs no round trip. Behind a pooler that rejects startup options, leave
        ``CACHE["CAPTURE"]`` off: the triggers then also capture Django's writes (correct,
        one outbox row more per statement).
        """
        params: dict[str, Any] = super().get_connection_params()
        cache = dbscale_settings.cache if dbscale_settings.cache_declared else {}
        if cache.get("CAPTURE") is True:
            tag = "-c dbscale.origin=django"
            given = params.get("options")
            params["options"] = f"{given} {tag}" if given else tag
        return params

    def dbscale_primary(self) -> str | None:
        """Return this alias's primary if this alias is a configured replica."""
        return dbscale_settings.primary_of.get(self.alias)

    # -- write tracking ---------------------------------------------------------------
    def note_write(self) -> None:
        """Record a successful write statement (now if autocommitted, else at COMMIT).

        Replicas never record writes: a "write" seen there is a misjudged read (nothing can
        write to a standby), and fetching a WAL insert position from it would fail.
        """
        if self.dbscale_primary() is not None:
            return
        if self.in_atomic_block or not self.autocommit:
            self.dbscale_dirty = True
        else:
            consistency.record_write(self.alias)

    def commit(self) -> None:
        if events.transaction_committing.receivers and self.connection is not None:
            events.transaction_committing.send(sender=type(self), connection=self)
        super().commit()
        if self.dbscale_dirty:
            self.dbscale_dirty = False
            consistency.record_write(self.alias)
        # Before Django runs transaction.on_commit() callbacks: they must see invalidated
        # caches, so subscribers (the queryset cache) deliver here rather than in a callback.
        if events.transaction_committed.receivers:
            events.transaction_committed.send(sender=type(self), connection=self)

    def rollback(self) -> None:
        self.dbscale_dirty = False
        super().rollback()
        if events.transaction_rolled_back.receivers:
            events.transaction_rolled_back.send(sender=type(self), connection=self)

    # -- cursors ----------------------------------------------------------------------
    def make_cursor(self, cursor: Any) -> CursorWrapper:
        return CursorWrapper(cursor, self)

    def make_debug_cursor(self, cursor: Any) -> CursorDebugWrapper:
        return CursorDebugWrapper(cursor, self)

    def ensure_connection(self) -> None:
        """Connect if there is no connection, but never dial a replica in quarantine.

        Every way to a new connection passes here (a cursor, ``atomic()``,
        ``get_autocommit()``), whether the alias came from the router, ``.using()`` or
        ``connections[alias]``: a quarantined replica raises
        :class:`~django_dbscale.replicas.ReplicaQuarantined` instead of costing another
        connect timeout. :meth:`_cursor` turns that into a read on the primary outside a
        transaction; inside one it propagates.

        An open connection the driver knows is broken (the server went away under an
        earlier statement, which raised) is replaced outside a transaction, so a process
        that outlives a primary restart or failover writes again at its next statement
        rather than at its next request; inside ``atomic()`` the broken connection stays
        until the block ends, as Django wants. That check reads two attributes of the
        driver's connection: no query on the per-statement path.
        """
        raw = self.connection
        if raw is not None and not self.in_atomic_block and (raw.broken or raw.closed):
            logger.info("Replacing the broken connection of %r.", self.alias)
            try:
                self.close()
            except DatabaseError:
                self.connection = None
        if self.connection is None and self.dbscale_primary() is not None:
            from django_dbscale import replicas

            replicas.check_not_quarantined(self.alias)
        super().ensure_connection()

    def _cursor(self, name: str | None = None) -> Any:
        try:
            return super()._cursor(name)  # type: ignore[misc]
        except _FAILOVER_ERRORS as exc:
            primary_alias = self.dbscale_primary()
            if primary_alias is None or self.in_atomic_block:
                raise
            from django_dbscale import replicas

            if isinstance(exc, replicas.ReplicaQuarantined):
                # Not dialled (ensure_connection refused): straight to the primary.
                return self.fail_over_to(primary_alias, replicas.QUARANTINED)._cursor(name)
            primary = self.fail_over_to(primary_alias, "connect failed")
            return primary._cursor(name)

    def fail_over_to(self, primary_alias: str, reason: str) -> Any:
        """Move this replica's read to *primary_alias*; return the primary's wrapper.

        After a failure (*reason* says what broke) the replica is quarantined and the
        failover counted, signalled and logged. With ``replicas.QUARANTINED`` (the replica
        is already quarantined and was not dialled) the read is only counted, once, under
        that reason: no new failure, so the quarantine is not extended by its own users.
        """
        from django.db import connections

        from django_dbscale import replicas

        if reason == replicas.QUARANTINED:
            # Counted once and pinned, like every move of a read to a primary; not a new
            # failure: the quarantine is not extended by its own users.
            consistency.read_from_primary(primary_alias, replicas.QUARANTINED)
            logger.debug("Replica %r is quarantined; reading from %r.", self.alias, primary_alias)
        else:
            replicas.failed_over(self.alias, primary_alias, reason)
            logger.warning("Replica %r: %s; reading from %r.", self.alias, reason, primary_alias)
        return connections[primary_alias]
