"""Which tables a raw SQL statement writes, read by PostgreSQL's own parser.

The ORM's writes are described by the compilers (table and dimension values). Everything
else that reaches a dbscale cursor -- ``connection.cursor().execute()``, ``executemany()``,
``RunSQL`` in a migration, ``COPY ... FROM`` -- is only SQL text. :func:`written_tables`
parses it with `pglast <https://pypi.org/project/pglast/>`_ (PostgreSQL's parser,
``libpg_query``, as a library) rather than with regular expressions, and walks the whole
tree, so data-modifying CTEs, ``MERGE``, ``TRUNCATE`` lists and several statements in one
string are all seen.

The answer is a set of table names, or :data:`UNKNOWN` when the statement may write tables
that cannot be named: ``TRUNCATE ... CASCADE`` (it empties every table that references the
named ones), a statement that does not parse, or one that calls a function (which may
write anything). Callers must then invalidate conservatively.

Schema names are dropped (``public.book`` is ``book``): Django's ``db_table`` names a
table on the connection's search path. Statements that define objects (``CREATE TABLE``,
``CREATE INDEX``, ``GRANT``) write no existing table's rows; ``ALTER TABLE`` and ``DROP
TABLE`` count as writing the table they name, so results read from it are invalidated.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Final

__all__ = ["UNKNOWN", "written_tables"]


class _Unknown:
    """The tables a statement writes cannot be named (see the module docstring)."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()

#: psycopg placeholders (``%s``, ``%(name)s``) become ``$1`` for the parser; ``%%`` is ``%``.
_PLACEHOLDER = re.compile(r"%(?:\([^)]*\))?s|%%")

#: Statement kinds that name the tables whose rows they change in ``relation``.
_DML = ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt")
#: Statement kinds that define or inspect objects and change no existing table's rows.
_NO_ROWS = frozenset(
    {
        "CreateStmt", "IndexStmt", "CreateSeqStmt", "AlterSeqStmt", "ViewStmt", "CommentStmt",
        "GrantStmt", "GrantRoleStmt", "CreateSchemaStmt", "CreateFunctionStmt",
        "CreateExtensionStmt", "CreateTrigStmt", "CreateEnumStmt", "CompositeTypeStmt",
        "DefineStmt", "VariableSetStmt", "VariableShowStmt", "TransactionStmt", "LockStmt",
        "ListenStmt", "NotifyStmt", "UnlistenStmt", "ExplainStmt", "DeallocateStmt",
        "PrepareStmt", "DiscardStmt", "CheckPointStmt", "VacuumStmt", "ReindexStmt",
        "CreateTableAsStmt", "RuleStmt", "AlterOwnerStmt", "RenameStmt", "ClusterStmt",
        "CreatePolicyStmt", "AlterPolicyStmt", "DoStmt", "CallStmt",
    }
)  # fmt: skip
#: Of those, the ones that may run arbitrary code: their writes cannot be named.
_RUNS_CODE = frozenset({"DoStmt", "CallStmt"})


def written_tables(sql: str) -> frozenset[str] | _Unknown:
    """Return the tables *sql* writes (possibly none), or :data:`UNKNOWN`.

    Parsing costs tens of microseconds; results are cached per SQL text (the same raw
    statement usually runs again with other parameters).
    """
    return _parse(sql)


@functools.lru_cache(maxsize=1024)
def _parse(sql: str) -> frozenset[str] | _Unknown:
    from pglast import ast, parse_sql
    from pglast.parser import ParseError

    text = _PLACEHOLDER.sub(lambda m: "%" if m.group() == "%%" else "$1", sql)
    try:
        statements = parse_sql(text)
    except ParseError:
        return UNKNOWN
    tables: set[str] = set()
    for raw in statements:
        statement = raw.stmt
        kind = type(statement).__name__
        if kind in _RUNS_CODE:
            return UNKNOWN
        if isinstance(statement, ast.TruncateStmt):
            if statement.behavior == 1:  # DROP_CASCADE: referencing tables are emptied too
                return UNKNOWN
            tables.update(r.relname for r in statement.relations or () if r.relname)
            continue
        if isinstance(statement, ast.CopyStmt):
            relation = statement.relation
            if statement.is_from and relation is not None and relation.relname:
                tables.add(relation.relname)
            continue
        if isinstance(statement, ast.AlterTableStmt | ast.DropStmt):
            names = _altered_or_dropped(statement)
            if names is None:
                return UNKNOWN
            tables.update(names)
            continue
        if kind not in _NO_ROWS and kind not in _DML and kind != "SelectStmt":
            return UNKNOWN  # a kind this module does not know: assume the worst
        found = _modified_anywhere(statement)
        if found is None:
            return UNKNOWN
        tables.update(found)
    return frozenset(tables)


def _modified_anywhere(node: Any) -> set[str] | None:
    """Return the relations of every INSERT/UPDATE/DELETE/MERGE in *node* (CTEs included).

    ``None`` if a function is called outside a plain ``SELECT`` list whose writes could
    matter: only a ``SELECT`` that calls no function is known to write nothing.
    """
    from pglast import ast

    found: set[str] = set()
    stack: list[Any] = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, tuple | list):
            stack.extend(current)
            continue
        if not isinstance(current, ast.Node):
            continue
        if type(current).__name__ in _DML:
            relation = current.relation  # type: ignore[attr-defined]
            if relation is not None:
                found.add(relation.relname)
        elif isinstance(current, ast.FuncCall) and _may_write(current):
            return None
        for name in current:  # the node's attribute names
            stack.append(getattr(current, name))
    return found


#: Built-in functions Django and projects call in raw SQL that never write tables.
_PURE_FUNCTIONS = frozenset(
    {
        "abs", "array_agg", "avg", "bool_and", "bool_or", "btrim", "ceil", "char_length",
        "coalesce", "concat", "count", "current_setting", "date_part", "date_trunc",
        "floor", "greatest", "json_agg", "json_build_object", "jsonb_agg",
        "jsonb_build_object", "least", "length", "lower", "ltrim", "max", "min", "now",
        "nullif", "pg_current_wal_insert_lsn", "pg_current_wal_lsn", "pg_is_in_recovery",
        "pg_last_wal_replay_lsn", "random", "replace", "round", "rtrim", "string_agg",
        "substr", "substring", "sum", "to_char", "trim", "upper", "set_config",
        "gen_random_uuid", "clock_timestamp", "statement_timestamp", "timezone",
        "to_timestamp", "make_interval", "extract", "cast", "array_length", "unnest",
        "generate_series", "row_number", "rank", "dense_rank", "lag", "lead",
        "nextval", "setval", "currval", "pg_get_serial_sequence", "pg_sleep",
        "uuid_generate_v1", "uuid_generate_v4", "md5", "encode", "decode", "digest",
        "crypt", "gen_salt", "to_tsvector", "to_tsquery", "setweight", "jsonb_set",
        "jsonb_build_array", "json_build_array", "jsonb_strip_nulls", "array_append",
        "array_remove", "array_cat", "array_position", "age", "left", "right", "position",
        "split_part", "format", "concat_ws", "regexp_replace", "date", "make_date",
        "make_timestamp", "make_timestamptz", "localtimestamp", "current_date",
    }
)  # fmt: skip


def _may_write(call: Any) -> bool:
    """Return whether a function call could write tables (a user function could)."""
    names = [getattr(part, "sval", None) for part in call.funcname or ()]
    name = names[-1] if names else None
    schema = names[0] if len(names) > 1 else None
    if schema not in (None, "pg_catalog"):
        return True
    return name is None or name.lower() not in _PURE_FUNCTIONS


def _altered_or_dropped(statement: Any) -> set[str] | None:
    from pglast import ast

    if isinstance(statement, ast.AlterTableStmt):
        relation = statement.relation
        return {relation.relname} if relation is not None and relation.relname else None
    # DROP TABLE/VIEW/...: objects is a list of name lists; the last part is the name.
    names: set[str] = set()
    for obj in statement.objects or ():
        parts = obj if isinstance(obj, tuple | list) else getattr(obj, "names", None)
        if not parts:
            continue
        last = parts[-1]
        value = getattr(last, "sval", None)
        if isinstance(value, str):
            names.add(value)
    return names
