"""SQL compilers of the dbscale backend: where the queryset cache sees every read and write.

Django compiles every query through ``connection.ops.compiler(...)``; the dbscale backend
points that at this module, which makes it the one hook with complete coverage:

* **Writes.** ``save()``, ``create()``, ``update()``, ``bulk_create()``, ``bulk_update()``,
  queryset and cascading ``delete()``, the ``UPDATE`` Django runs for
  ``on_delete=SET_NULL``/``SET_DEFAULT``, many-to-many ``add()``/``remove()``/``clear()``/
  ``set()`` from either side and through custom ``through`` models, ``loaddata``: each
  ends in ``execute_sql`` of one of the compilers below, which publish the written table
  (and, for tables with invalidation dimensions, the dimension values of the rows touched)
  as :data:`~django_dbscale.backends.events.statement_wrote`. Without receivers they run
  Django's own code unchanged.

  Old dimension values of updated and deleted rows are read in the same statement (no
  extra round trip): a ``DELETE`` gets ``RETURNING``; an ``UPDATE`` whose WHERE clause does
  not pin them gets ``RETURNING`` if it assigns no dimension (they are unchanged), runs as
  ``... WHERE pk = %s AND dim = <value assigned> RETURNING dim`` if it is ``save()``'s
  one-row update (:meth:`SQLUpdateCompiler._dbscale_execute_unchanged`), and otherwise is
  rewritten to ``UPDATE ... FROM (SELECT pk, dims ... FOR UPDATE) RETURNING old, new``
  inside a CTE that aggregates the distinct values (:meth:`SQLUpdateCompiler._dbscale_wrap`).
* **Reads**, during cache fills only: each compiled query reports the tables it reads to
  the active collector. Where a fill's statements run is decided by the routers, like any
  read (see :func:`django_dbscale.consistency.at_least`).

Outside fills, the read path costs one context-variable lookup per compile. This module
never imports the cache: what counts as a dimension comes from the registered
:class:`~django_dbscale.backends.events.WriteAnalysis`.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import EmptyResultSet, FullResultSet
from django.db import InterfaceError, OperationalError
from django.db.models.lookups import Exact
from django.db.models.sql import compiler
from django.db.models.sql.constants import GET_ITERATOR_CHUNK_SIZE, MULTI, NO_RESULTS, ROW_COUNT

from django_dbscale.backends import events
from django_dbscale.backends.positions import reading_position

logger = logging.getLogger("django_dbscale.backends")

__all__ = [
    "SQLAggregateCompiler",
    "SQLCompiler",
    "SQLDeleteCompiler",
    "SQLInsertCompiler",
    "SQLUpdateCompiler",
]


class _ReadHooks:
    """Report compiled queries to the fill collector."""

    query: Any
    using: str | None
    connection: Any

    def as_sql(self, *args: Any, **kwargs: Any) -> Any:
        col = events.read_observer.get()
        if col is None:
            return super().as_sql(*args, **kwargs)  # type: ignore[misc]
        sql = ""
        try:
            result = super().as_sql(*args, **kwargs)  # type: ignore[misc]
            sql = result[0]
            return result
        finally:
            col.record(self.query, self.using or self.connection.alias, sql)

    def get_from_clause(self) -> Any:
        result = super().get_from_clause()  # type: ignore[misc]
        col = events.read_observer.get()
        if col is not None:
            # Only here are the reference counts those of the SQL being built (as_sql
            # restores them afterwards): joins trimmed while resolving lookups are gone,
            # select_related and multi-table parent joins are present.
            query = self.query
            refcount = query.alias_refcount
            tables = [
                join.table_name for alias, join in query.alias_map.items() if refcount.get(alias)
            ]
            tables.extend(query.extra_tables)
            col.add_tables(query, self.using or self.connection.alias, tables)
        return result


class SQLCompiler(_ReadHooks, compiler.SQLCompiler):
    """Django's SELECT compiler plus the cache's read hooks and reads of a down primary."""

    def execute_sql(
        self,
        result_type: Any = MULTI,
        chunked_fetch: bool = False,
        chunk_size: int = GET_ITERATOR_CHUNK_SIZE,
    ) -> Any:
        try:
            return super().execute_sql(result_type, chunked_fetch, chunk_size)
        except (OperationalError, InterfaceError):
            replica = _replica_instead(self.connection)
            if replica is None:
                raise
            logger.warning(
                "Primary %r failed under a read; re-running it on replica %r.",
                self.connection.alias,
                replica,
            )
            again = self.query.get_compiler(using=replica)
            return again.execute_sql(result_type, chunked_fetch, chunk_size)


def _replica_instead(connection: Any) -> str | None:
    """Return the replica to re-run a read on, if *connection* is a primary that broke."""
    if connection.in_atomic_block or connection.dbscale_primary() is not None:
        return None
    raw = connection.connection
    if raw is not None and not (raw.broken or raw.closed):
        return None  # an error of the statement itself, not of the server
    from django_dbscale import replicas

    return replicas.replica_for_down_primary(connection.alias)


class SQLAggregateCompiler(_ReadHooks, compiler.SQLAggregateCompiler):
    """Django's aggregate-over-subquery compiler plus the cache's read hooks."""


# -- writes --------------------------------------------------------------------------------


class _NoDimensions:
    """The analysis used when no subscriber registered one: tables only, never values."""

    max_values = 0

    def fields(self, model: Any) -> tuple[Any, ...]:
        return ()

    def canonical(self, field: Any, value: Any) -> str | None:
        return None

    def pinned(self, query: Any, fields: tuple[Any, ...]) -> dict[Any, frozenset[str]]:
        return {}


_NO_DIMENSIONS = _NoDimensions()


def _publishing() -> events.WriteAnalysis | None:
    """Return the write analysis if anyone listens to writes, else ``None`` (plain Django)."""
    if not events.statement_wrote.receivers:
        return None
    return events.write_analysis() or _NO_DIMENSIONS


def _wrote(connection: Any, table: str, dims: set[str] | None, position: int | None = None) -> None:
    events.statement_wrote.send(
        sender=type(connection), connection=connection, table=table, dims=dims, position=position
    )


def _last(positions: list[int]) -> int | None:
    """Return the position read with the last statement, or ``None`` if it could not be."""
    return positions[-1] if positions else None


def _dims_or_none(
    analysis: events.WriteAnalysis, per_field: dict[Any, set[str]], fields: tuple[Any, ...]
) -> set[str] | None:
    if not fields:
        return None
    dims: set[str] = set()
    for field in fields:
        values = per_field.get(field)
        if values is None:
            return None
        dims |= values
    if len(dims) > analysis.max_values * len(fields):
        return None
    return dims


#: (alias, table) pairs whose updates met a BEFORE UPDATE row trigger: their old dimension
#: values are read by the join (:meth:`SQLUpdateCompiler._dbscale_wrap`). Process-wide.
_rewritten_by_triggers: set[tuple[str, str]] = set()


def _rewriting_trigger(quoted_table: str) -> str:
    """SQL: whether the table has a ``BEFORE UPDATE ... FOR EACH ROW`` trigger (it may
    rewrite the new row, dimensions included). ``tgtype`` bits: 1 row, 2 before, 16 update.
    *quoted_table* is the table's name as the UPDATE quotes it."""
    literal = "'" + quoted_table.replace("'", "''") + "'"
    return (
        "EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = "
        f"{literal}::regclass AND NOT tgisinternal AND tgtype & 19 = 19)"
    )


def _pins_one_row(query: Any, pk: Any) -> bool:
    """Return whether *query*'s WHERE is exactly ``pk = <value>`` (``save()``'s UPDATE)."""
    where = query.where
    if where.negated or where.connector != "AND" or len(where.children) != 1:
        return False
    lookup = where.children[0]
    lhs = getattr(lookup, "lhs", None)
    return (
        isinstance(lookup, Exact)
        and getattr(lhs, "target", None) == pk
        and getattr(lhs, "alias", None) == query.base_table
        and not hasattr(lookup.rhs, "resolve_expression")
    )


def _canonical_set(analysis: events.WriteAnalysis, field: Any, values: Any) -> set[str] | None:
    result: set[str] = set()
    for value in values or ():
        if value is None:
            continue
        dim = analysis.canonical(field, value)
        if dim is None:
            return None
        result.add(dim)
    return result


class SQLInsertCompiler(compiler.SQLInsertCompiler):
    """Django's INSERT compiler; publishes the table and the inserted dimension values."""

    def execute_sql(self, returning_fields: Any = None) -> Any:  # type: ignore[override]
        analysis = _publishing()
        if analysis is None:
            return super().execute_sql(returning_fields)
        token = events.self_described.set(True)
        try:
            with reading_position() as positions:
                rows = super().execute_sql(returning_fields)
        finally:
            events.self_described.reset(token)
        self._dbscale_publish(analysis, _last(positions))
        return rows

    def _dbscale_publish(self, analysis: events.WriteAnalysis, position: int | None) -> None:
        from django.db.models.constants import OnConflict

        query: Any = self.query
        meta = query.get_meta()
        fields = analysis.fields(query.model)
        dims: set[str] | None = None
        if fields and query.on_conflict != OnConflict.UPDATE:
            per_field: dict[Any, set[str]] = {}
            for field in fields:
                values = _canonical_set(
                    analysis, field, [getattr(obj, field.attname) for obj in query.objs]
                )
                if values is None:
                    break
                per_field[field] = values
            dims = _dims_or_none(analysis, per_field, fields)
        _wrote(self.connection, meta.db_table, dims, position)


class SQLDeleteCompiler(compiler.SQLDeleteCompiler):
    """Django's DELETE compiler; publishes the table and the deleted dimension values."""

    def execute_sql(self, result_type: Any = MULTI, *args: Any, **kwargs: Any) -> Any:
        analysis = _publishing()
        if analysis is None:
            return super().execute_sql(result_type, *args, **kwargs)
        token = events.self_described.set(True)
        try:
            return self._dbscale_execute(analysis, result_type, *args, **kwargs)
        finally:
            events.self_described.reset(token)

    def _dbscale_execute(
        self, analysis: events.WriteAnalysis, result_type: Any, *args: Any, **kwargs: Any
    ) -> Any:
        fields = analysis.fields(self.query.model)
        table = self.query.get_meta().db_table
        if not fields:
            with reading_position() as positions:
                result = super().execute_sql(result_type, *args, **kwargs)
            _wrote(self.connection, table, None, _last(positions))
            return result
        try:
            sql, params = self.as_sql()
        except EmptyResultSet:
            return None if result_type not in (ROW_COUNT,) else 0
        pinned = analysis.pinned(self.query, fields)
        if all(f in pinned for f in fields):
            with reading_position() as positions:
                result = super().execute_sql(result_type, *args, **kwargs)
            _wrote(
                self.connection,
                table,
                _dims_or_none(analysis, {f: set(v) for f, v in pinned.items()}, fields),
                _last(positions),
            )
            return result
        qn: Any = self.connection.ops.quote_name
        returning = ", ".join(f"{qn(f.column)} AS n{i}" for i, f in enumerate(fields))
        aggregates = ", ".join(f"array_agg(DISTINCT n{i})" for i in range(len(fields)))
        wrapped = f"WITH u AS ({sql} RETURNING {returning}) SELECT count(*), {aggregates} FROM u"
        with self.connection.cursor() as cursor, reading_position() as positions:
            cursor.execute(wrapped, params)
            row = cursor.fetchone()
        per_field = {}
        for i, field in enumerate(fields):
            values = _canonical_set(analysis, field, row[1 + i])
            if values is None:
                break
            per_field[field] = values
        _wrote(self.connection, table, _dims_or_none(analysis, per_field, fields), _last(positions))
        if result_type == ROW_COUNT:
            return row[0]
        return None


class SQLUpdateCompiler(compiler.SQLUpdateCompiler):
    """Django's UPDATE compiler; publishes the table and old and new dimension values."""

    def execute_sql(self, result_type: Any) -> Any:  # type: ignore[override]
        analysis = _publishing()
        if analysis is None:
            return super().execute_sql(result_type)
        # A multi-table child's update() also updates its parents' tables, in statements
        # of their own: one operation, so subscribers can act once for all of them.
        token = events.self_described.set(True)
        try:
            return self._dbscale_execute_all(result_type, analysis)
        finally:
            events.self_described.reset(token)

    def _dbscale_execute_all(self, result_type: Any, analysis: events.WriteAnalysis) -> Any:
        with events.operation():
            row_count = self._dbscale_execute_main(result_type, analysis)
            is_empty = row_count is None
            row_count = row_count or 0
            for query in self.query.get_related_updates():
                aux_row_count = query.get_compiler(self.using).execute_sql(result_type)
                if is_empty and aux_row_count:
                    row_count = aux_row_count
                    is_empty = False
        return row_count

    def _dbscale_execute_main(self, result_type: Any, analysis: events.WriteAnalysis) -> int | None:
        """Run this compiler's own UPDATE (not the related ones) and publish it."""
        query = self.query
        fields = analysis.fields(query.model)
        try:
            sql, params = self.as_sql()
            if not sql:
                raise EmptyResultSet
        except EmptyResultSet:
            return None
        if fields:
            count = self._dbscale_execute_unchanged(analysis, fields, sql, params)
            if count is not None:
                return None if result_type in (NO_RESULTS, None) else count
        meta = query.get_meta()
        table = meta.db_table
        dims: set[str] | None = None
        wrapped: tuple[str, bool] | None = None
        if fields:
            static = self._dbscale_static_dims(analysis, fields)
            if static is not None:
                dims = static
            else:
                wrapped = self._dbscale_wrap(sql, fields)
        rewritten = False
        with self.connection.cursor() as cursor, reading_position() as positions:
            if wrapped is None:
                cursor.execute(sql, params)
                count = cursor.rowcount
            else:
                wrapped_sql, per_row = wrapped
                cursor.execute(wrapped_sql, params)
                values: list[tuple[Any, Any]]  # (old values, new values) per field
                if per_row:  # UPDATE ... RETURNING new values, old ones equal
                    rows = cursor.fetchall()
                    count = len(rows)
                    values = [([r[i] for r in rows],) * 2 for i in range(len(fields))]
                    rewritten = any(r[-1] for r in rows)
                else:  # one row: count, then old and new arrays per field
                    row = cursor.fetchone()
                    count = row[0]
                    values = [(row[1 + 2 * i], row[2 + 2 * i]) for i in range(len(fields))]
                    rewritten = bool(row[-1])
                per_field: dict[Any, set[str]] = {}
                for field, (old_values, new_values) in zip(fields, values, strict=True):
                    old = _canonical_set(analysis, field, old_values)
                    new = _canonical_set(analysis, field, new_values)
                    if old is None or new is None:
                        break
                    per_field[field] = old | new
                dims = None if rewritten else _dims_or_none(analysis, per_field, fields)
        if rewritten:
            # A BEFORE UPDATE row trigger may have changed a dimension that the statement
            # did not assign: its old values are unknown, so the whole table was bumped
            # (dims None); this table's updates read old values by the join from now on.
            _rewritten_by_triggers.add((self.connection.alias, table))
        _wrote(self.connection, table, dims, _last(positions))
        if result_type in (NO_RESULTS, None):
            return None
        return int(count)

    def _dbscale_static_dims(
        self, analysis: events.WriteAnalysis, fields: tuple[Any, ...]
    ) -> set[str] | None:
        """Return the touched dimension values if WHERE and SET determine them, else ``None``."""
        pinned = analysis.pinned(self.query, fields)
        per_field: dict[Any, set[str]] = {}
        query: Any = self.query
        assigned = {field: value for field, _, value in query.values}
        for field in fields:
            if field not in pinned:
                return None
            values = set(pinned[field])
            if field in assigned:
                new = assigned[field]
                if new is not None:
                    dim = analysis.canonical(field, new)
                    if dim is None:
                        return None
                    values.add(dim)
            per_field[field] = values
        return _dims_or_none(analysis, per_field, fields)

    def _dbscale_execute_unchanged(
        self, analysis: events.WriteAnalysis, fields: tuple[Any, ...], sql: str, params: Any
    ) -> int | None:
        """Update one row assuming its dimension values are the ones being assigned.

        ``save()`` assigns every field, dimensions included, and usually leaves the
        dimensions as they were. For an UPDATE of one row by primary key (*sql*, compiled:
        ``... WHERE pk = %s``) that assigns every dimension a plain value, this runs
        ``... WHERE pk = %s AND dim = <assigned> RETURNING dim``: if the row is updated,
        its old dimension values were the assigned ones (checked by PostgreSQL, in the
        statement that writes) and ``RETURNING`` gives the values stored (a ``BEFORE
        UPDATE`` trigger may have changed them), so the touched values are known without
        the join of :meth:`_dbscale_wrap`, which costs about as much again as the UPDATE.
        The condition is appended to the compiled SQL: adding it as a filter cost about
        60 µs of Django's lookup machinery. Returns the row count (1) after publishing the
        write, or ``None`` when the guess does not apply or the row did not match (its
        dimension changed, or it does not exist): the caller then runs the join, one
        more statement.
        """
        query: Any = self.query
        meta = query.get_meta()
        if meta.is_composite_pk or query.related_updates or not _pins_one_row(query, meta.pk):
            return None
        assigned = {field: value for field, _, value in query.values}
        per_field: dict[Any, set[str]] = {}
        db_values: list[Any] = []
        for field in fields:
            value = assigned.get(field)
            if (
                value is None
                or hasattr(value, "resolve_expression")
                or hasattr(field, "get_placeholder")
            ):
                return None
            dim = analysis.canonical(field, value)
            if dim is None:
                return None
            per_field[field] = {dim}
            # As Django's UPDATE compiler turns a value into a parameter.
            if hasattr(value, "prepare_database_save"):
                if not field.remote_field:
                    return None
                db_values.append(value.prepare_database_save(field))
            else:
                db_values.append(field.get_db_prep_save(value, connection=self.connection))
        dims: set[str] | None = _dims_or_none(analysis, per_field, fields)
        if dims is None or self._dbscale_static_dims(analysis, fields) is not None:
            return None  # no guess possible, or none needed (the WHERE pins the values)
        qn: Any = self.connection.ops.quote_name
        table = qn(meta.db_table)
        columns = [f"{table}.{qn(field.column)}" for field in fields]
        guard = " AND ".join(f"{column} = %s" for column in columns)
        with self.connection.cursor() as cursor, reading_position() as positions:
            cursor.execute(
                f"{sql} AND {guard} RETURNING {', '.join(columns)}", (*params, *db_values)
            )
            rows = cursor.fetchall()
        if len(rows) != 1:
            return None
        for field, stored in zip(fields, rows[0], strict=True):
            new = _canonical_set(analysis, field, [stored])
            if new is None:
                dims = None
                break
            dims |= new
        _wrote(self.connection, meta.db_table, dims, _last(positions))
        return 1

    def _dbscale_wrap(self, sql: str, fields: tuple[Any, ...]) -> tuple[str, bool] | None:
        """Rewrite ``UPDATE t SET ... WHERE w`` to also return the dimension values it touches.

        Returns the SQL and whether it returns one row per updated row (``RETURNING`` the
        new values, then whether a trigger may have rewritten them) or a single row (the
        count, then the distinct old and new values of each field, then that flag):

        * an UPDATE that assigns no dimension leaves them as they were, so the values it
          returns are the old ones too: ``UPDATE ... RETURNING`` for one row by primary
          key (``filter(pk=...).update(n=F("n") + 1)``), a CTE aggregating them otherwise.
          Unless a ``BEFORE UPDATE`` row trigger changed them, which the statement checks
          in the catalog as it runs (a few microseconds; the flag); the caller then bumps
          the whole table and this table's later updates take the join below;
        * an UPDATE that assigns a dimension (or of such a table) reads the old values by
          joining the table as it was, ``FROM (SELECT pk, dims ... FOR UPDATE)``, inside a
          CTE (about as costly again as the UPDATE itself: only where it is needed).
        """
        query: Any = self.query
        meta = query.get_meta()
        if meta.is_composite_pk:
            return None
        qn: Any = self.connection.ops.quote_name
        table = qn(meta.db_table)
        head = f"UPDATE {table} SET "
        if not sql.startswith(head):
            return None
        columns = [f"{table}.{qn(f.column)}" for f in fields]
        assigned = {field for field, _, _ in query.values}
        if assigned.isdisjoint(fields) and (
            (self.connection.alias, meta.db_table) not in _rewritten_by_triggers
        ):
            rewrites = _rewriting_trigger(table)
            if _pins_one_row(query, meta.pk):
                return f"{sql} RETURNING {', '.join(columns)}, {rewrites}", True
            returning = ", ".join(f"{column} AS n{i}" for i, column in enumerate(columns))
            aggregates = ", ".join(
                f"array_agg(DISTINCT n{i}), array_agg(DISTINCT n{i})" for i in range(len(fields))
            )
            return (
                f"WITH u AS ({sql} RETURNING {returning}) "
                f"SELECT count(*), {aggregates}, {rewrites} FROM u",
                False,
            )
        try:
            where, _ = self.compile(self.query.where)  # type: ignore[arg-type]
        except FullResultSet:
            where = ""
        except EmptyResultSet:
            return None
        tail = f" WHERE {where}" if where else ""
        if not sql.endswith(tail):
            return None
        sets = sql[len(head) : len(sql) - len(tail)]
        pk = qn(meta.pk.column)
        old_cols = ", ".join(f"{column} AS o{i}" for i, column in enumerate(columns))
        returning = ", ".join(
            f'"__dbscale_old".o{i} AS o{i}, {column} AS n{i}' for i, column in enumerate(columns)
        )
        aggregates = ", ".join(
            f"array_agg(DISTINCT o{i}), array_agg(DISTINCT n{i})" for i in range(len(fields))
        )
        return (
            f"WITH u AS (UPDATE {table} SET {sets} FROM (SELECT {table}.{pk} AS k, {old_cols} "
            f'FROM {table}{tail} FOR UPDATE) AS "__dbscale_old" '
            f'WHERE {table}.{pk} = "__dbscale_old".k RETURNING {returning}) '
            f"SELECT count(*), {aggregates}, false FROM u",
            False,
        )
