"""``manage.py dbscale advise``: the indexes that would end sequential scans on filters.

For each primary (or ``--database ALIAS``), the statements ``pg_stat_statements`` recorded
in that database are parsed with PostgreSQL's own parser (pglast): every column compared
with a value in a ``WHERE`` clause (``=``, ``<``, ``IN``, ``LIKE``, ``BETWEEN``, ``IS NULL``;
in sub-queries, ``UPDATE`` and ``DELETE`` too) is resolved to its table through the
``FROM`` clause. A column is advised when its table has had at least ``--min-seq-scans``
sequential scans (``pg_stat_user_tables``), holds at least ``--min-rows`` live rows (on
smaller tables a sequential scan is the cheapest plan anyway), and no index starts with it
(``pg_indexes``)::

    shop_order: 12,000 seq scans filtering on customer_id (11,800 calls) —
    CREATE INDEX CONCURRENTLY shop_order_customer_id_idx ON shop_order (customer_id);

It reads statistics only and changes nothing. The statistics are the server's since its
last reset (``SELECT pg_stat_statements_reset()``), so run it on a server that has served
real traffic. ``pg_stat_statements`` must be preloaded and created; otherwise the command
says how, in one line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from django_dbscale.conf import dbscale_settings

__all__ = ["Advice", "HELP", "add_arguments", "advise", "handle"]

HELP = (
    "Read pg_stat_statements and name the sequential scans on filtered columns, with the "
    "CREATE INDEX that would avoid them."
)

EXTENSION = "pg_stat_statements"
ENABLE = (
    f"add shared_preload_libraries = '{EXTENSION}' to postgresql.conf, restart PostgreSQL, "
    f"then run CREATE EXTENSION {EXTENSION}; in that database"
)

_STATE_SQL = f"""
SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = '{EXTENSION}'),
       EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = '{EXTENSION}'),
       current_setting('shared_preload_libraries'),
       current_database()
"""
_STATEMENTS_SQL = f"""
SELECT query, calls FROM {EXTENSION}
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
_TABLES_SQL = """
SELECT relname, seq_scan, n_live_tup FROM pg_stat_user_tables
WHERE schemaname = current_schema()
"""
_INDEXES_SQL = "SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
_COLUMNS_SQL = """
SELECT table_name, column_name FROM information_schema.columns
WHERE table_schema = current_schema()
"""

#: Operators an index on the column can serve (btree; LIKE with a left-anchored pattern).
_OPERATORS = frozenset({"=", "<", ">", "<=", ">=", "~~", "!~~"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database", metavar="ALIAS", help="Only this database alias (default: every primary)."
    )
    parser.add_argument(
        "--min-seq-scans",
        type=int,
        default=100,
        help="Advise only tables scanned sequentially at least this often (default 100).",
    )
    parser.add_argument(
        "--min-rows",
        type=int,
        default=1000,
        help="Advise only tables with at least this many live rows (default 1000).",
    )
    parser.add_argument("--json", action="store_true", help="Print JSON instead of text.")


@dataclass
class Advice:
    """One column filtered by statements on a sequentially scanned table without an index."""

    alias: str
    table: str
    column: str
    seq_scans: int
    live_rows: int
    calls: int
    create_index: str
    statements: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.table}: {self.seq_scans:,} seq scans filtering on {self.column} "
            f"({self.calls:,} calls) \N{EM DASH} {self.create_index}"
        )


# -- which columns a statement filters on --------------------------------------------------


def _nodes(value: Any) -> Iterator[Any]:
    """Yield every pglast AST node in *value*, depth first."""
    from pglast import ast

    if isinstance(value, ast.Node):
        yield value
        for name in value:  # a Node iterates over its attribute names
            yield from _nodes(getattr(value, name))
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _nodes(item)


def _ranges(items: Iterable[Any]) -> dict[str, str]:
    """Return {name or alias: table} for the plain tables of a FROM clause (joins included)."""
    from pglast import ast

    scope: dict[str, str] = {}
    for item in items:
        if isinstance(item, ast.RangeVar) and item.relname:
            name = item.alias.aliasname if item.alias and item.alias.aliasname else item.relname
            scope[str(name)] = str(item.relname)
        elif isinstance(item, ast.JoinExpr):
            scope.update(_ranges([item.larg, item.rarg]))
    return scope


def _is_value(node: Any) -> bool:
    """Return whether *node* is a constant, a parameter, or a list or cast of those."""
    from pglast import ast

    if isinstance(node, ast.TypeCast):
        return _is_value(node.arg)
    if isinstance(node, tuple | list):
        return all(_is_value(n) for n in node)
    if isinstance(node, ast.A_ArrayExpr):
        return _is_value(node.elements or ())
    return isinstance(node, ast.A_Const | ast.ParamRef)


def _column_ref(node: Any) -> tuple[str | None, str] | None:
    """Return (qualifier or None, column) of a plain column reference, else None."""
    from pglast import ast

    if isinstance(node, ast.TypeCast):
        node = node.arg
    if not isinstance(node, ast.ColumnRef):
        return None
    names = [getattr(part, "sval", None) for part in node.fields or ()]
    if not names or not all(isinstance(n, str) for n in names):
        return None  # "t.*"
    if len(names) == 1:
        return None, str(names[0])
    return str(names[-2]), str(names[-1])


def _predicates(where: Any) -> Iterator[tuple[str | None, str]]:
    """Yield the columns a WHERE clause compares with values (through AND, OR and NOT)."""
    from pglast import ast, enums

    if isinstance(where, ast.BoolExpr):
        for arg in where.args or ():
            yield from _predicates(arg)
    elif isinstance(where, ast.NullTest):
        ref = _column_ref(where.arg)
        if ref is not None:
            yield ref
    elif isinstance(where, ast.A_Expr):
        kind = where.kind
        op = getattr((where.name or (None,))[-1], "sval", None)
        usable = (
            kind in (enums.A_Expr_Kind.AEXPR_IN, enums.A_Expr_Kind.AEXPR_BETWEEN)
            or (kind == enums.A_Expr_Kind.AEXPR_OP and op in _OPERATORS)
            or kind == enums.A_Expr_Kind.AEXPR_LIKE
            or (kind == enums.A_Expr_Kind.AEXPR_OP_ANY and op == "=")
        )
        if not usable:
            return
        for column, other in ((where.lexpr, where.rexpr), (where.rexpr, where.lexpr)):
            ref = _column_ref(column)
            if ref is not None and _is_value(other):
                yield ref


def filtered_columns(sql: str, columns: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Return the (table, column) pairs *sql*'s WHERE clauses compare with values.

    *columns* maps each table of the schema to its columns: an unqualified column is
    resolved to the one table of its statement's FROM clause that has it. Statements that
    do not parse give nothing.
    """
    from pglast import ast, parse_sql
    from pglast.parser import ParseError

    try:
        statements = parse_sql(sql)
    except (ParseError, ValueError):
        return set()
    found: set[tuple[str, str]] = set()
    for node in _nodes(statements):
        if isinstance(node, ast.SelectStmt):
            scope = _ranges(node.fromClause or ())
        elif isinstance(node, ast.UpdateStmt):
            scope = _ranges([node.relation, *(node.fromClause or ())])
        elif isinstance(node, ast.DeleteStmt):
            scope = _ranges([node.relation, *(node.usingClause or ())])
        else:
            continue
        for qualifier, column in _predicates(node.whereClause):
            if qualifier is not None:
                table = scope.get(qualifier)
            else:
                having = [t for t in set(scope.values()) if column in columns.get(t, ())]
                table = having[0] if len(having) == 1 else None
            if table is not None and column in columns.get(table, ()):
                found.add((table, column))
    return found


def _leading_column(indexdef: str) -> str | None:
    """Return the first column of a ``CREATE INDEX`` statement, or None (an expression)."""
    from pglast import ast, parse_sql

    stmt = parse_sql(indexdef)[0].stmt
    if not isinstance(stmt, ast.IndexStmt) or not stmt.indexParams:
        return None
    name = stmt.indexParams[0].name
    return str(name) if name else None


def _create_index(table: str, column: str) -> str:
    from pglast.stream import maybe_double_quote_name as quote

    name = f"{table}_{column}_idx"
    if len(name) > 63:  # NAMEDATALEN - 1: keep it unique when PostgreSQL would truncate
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[:50]}_{digest}_idx"
    return f"CREATE INDEX CONCURRENTLY {quote(name)} ON {quote(table)} ({quote(column)});"


# -- reading the server --------------------------------------------------------------------


def _require_extension(cursor: Any, alias: str) -> None:
    """Raise :class:`CommandError` (one line, how to enable it) unless the view is usable."""
    cursor.execute(_STATE_SQL)
    created, available, preload, dbname = cursor.fetchone()
    loaded = EXTENSION in {p.strip().strip('"') for p in str(preload).split(",")}
    if created and loaded:
        return
    if not available:
        what = "this PostgreSQL install does not ship it (install its contrib package)"
    elif not loaded:
        what = "the server does not preload it"
    else:
        what = "the extension is not created in this database"
    raise CommandError(
        f"{EXTENSION} is not enabled for database alias {alias!r} (database {dbname!r}): "
        f"{what}. To enable it, {ENABLE}."
    )


def advise(alias: str, min_seq_scans: int = 100, min_rows: int = 1000) -> list[Advice]:
    """Return the indexes to add on *alias*'s database, most sequential scans first.

    Raises :class:`CommandError` if ``pg_stat_statements`` is not enabled there.
    """
    with connections[alias].cursor() as cursor:
        _require_extension(cursor, alias)
        cursor.execute(_STATEMENTS_SQL)
        statements = [(str(q), int(c)) for q, c in cursor.fetchall() if q]
        cursor.execute(_TABLES_SQL)
        tables = {str(t): (int(s or 0), int(n or 0)) for t, s, n in cursor.fetchall()}
        cursor.execute(_INDEXES_SQL)
        indexed = {(str(t), _leading_column(str(d))) for t, d in cursor.fetchall()}
        cursor.execute(_COLUMNS_SQL)
        columns: dict[str, set[str]] = {}
        for table, column in cursor.fetchall():
            columns.setdefault(str(table), set()).add(str(column))

    found: dict[tuple[str, str], Advice] = {}
    for sql, calls in statements:
        for table, column in filtered_columns(sql, columns):
            seq_scans, live_rows = tables.get(table, (0, 0))
            if seq_scans < min_seq_scans or live_rows < min_rows or (table, column) in indexed:
                continue
            advice = found.get((table, column))
            if advice is None:
                advice = found[(table, column)] = Advice(
                    alias, table, column, seq_scans, live_rows, 0, _create_index(table, column)
                )
            advice.calls += calls
            if len(advice.statements) < 3:
                advice.statements.append(sql)
    return sorted(found.values(), key=lambda a: (-a.seq_scans, a.table, -a.calls, a.column))


def _primaries() -> list[str]:
    """Every PostgreSQL alias that names its own database and is not a replica."""
    database_of = dbscale_settings.database_of
    return [
        alias
        for alias in settings.DATABASES
        if alias not in dbscale_settings.primary_of
        and database_of.get(alias, alias) == alias
        and connections[alias].vendor == "postgresql"
    ]


def _check_positive(value: int, option: str) -> None:
    if value < 0:
        raise CommandError(f"{option} must be >= 0, not {value}.")


def handle(command: BaseCommand, **options: Any) -> None:
    alias = options.get("database")
    if alias is not None and alias not in settings.DATABASES:
        known = sorted(settings.DATABASES)
        raise CommandError(f"--database {alias!r}: no such alias in DATABASES (known: {known}).")
    min_seq_scans, min_rows = options["min_seq_scans"], options["min_rows"]
    _check_positive(min_seq_scans, "--min-seq-scans")
    _check_positive(min_rows, "--min-rows")
    aliases = [alias] if alias is not None else _primaries()
    advice = [a for name in aliases for a in advise(name, min_seq_scans, min_rows)]
    if options.get("json"):
        command.stdout.write(json.dumps([asdict(a) for a in advice], indent=2))
        return
    if not advice:
        command.stdout.write(
            f"No sequential scans to index on {', '.join(aliases)} (tables with at least "
            f"{min_seq_scans} seq scans and {min_rows} rows)."
        )
        return
    for a in advice:
        prefix = f"[{a.alias}] " if len(aliases) > 1 else ""
        command.stdout.write(prefix + a.line())
