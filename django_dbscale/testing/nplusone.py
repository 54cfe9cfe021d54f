"""Fail a test when a block repeats one query shape N times: the N+1 pattern, with its fix.

::

    from django_dbscale.testing.nplusone import assert_no_n_plus_one

    def test_book_list_makes_no_n_plus_one(client):
        with assert_no_n_plus_one(max_repeats=3):
            client.get("/books/")

A *shape* is the SQL Django sends with its parameters left out (``%s``), on any database.
When one shape runs more than *max_repeats* times in the block, :class:`NPlusOneDetected`
(an ``AssertionError``) names it, how often it ran, and the fix, read from the SQL with
PostgreSQL's parser and the installed models:

* ``SELECT ... FROM author WHERE author.id = %s`` repeated: a foreign key followed row by
  row -> ``select_related("author")`` on the querysets of the models that point there;
* ``SELECT ... FROM book WHERE book.author_id = %s`` repeated: a reverse relation ->
  ``prefetch_related("books")`` on the author querysets;
* the same through a many-to-many table -> ``prefetch_related("tags")``.

The same detection serves the debug-toolbar panel
(:mod:`django_dbscale.contrib.debug_toolbar`): :func:`is_read` picks the statements
counted, :func:`find_repeats` reports the shapes over the limit with their fix.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from django.apps import apps
from django.db import connections

__all__ = [
    "DEFAULT_MAX_REPEATS",
    "NPlusOneDetected",
    "Repeat",
    "assert_no_n_plus_one",
    "check_max_repeats",
    "find_repeats",
    "is_read",
    "suggest_fix",
]

#: How often one query shape may run before it is reported.
DEFAULT_MAX_REPEATS = 5


class NPlusOneDetected(AssertionError):
    """A block ran one query shape more often than allowed."""


_PLACEHOLDER = re.compile(r"%(?:\([^)]*\))?s")


def _where_column(sql: str) -> tuple[str, str] | None:
    """Return (table, column) of a ``WHERE t.c = %s`` or ``IN (...)`` filter, if that simple."""
    from pglast import ast, parse_sql
    from pglast.parser import ParseError

    try:
        (raw,) = parse_sql(_PLACEHOLDER.sub("$1", sql))
    except (ParseError, ValueError):
        return None
    where = getattr(raw.stmt, "whereClause", None)
    if isinstance(where, ast.BoolExpr):  # a LIMIT-free get(): take the first conjunct
        where = where.args[0] if where.args else None
    if not isinstance(where, ast.A_Expr):
        return None
    column = where.lexpr
    if not isinstance(column, ast.ColumnRef) or len(column.fields or ()) != 2:
        return None
    table, name = (getattr(part, "sval", None) for part in column.fields or ())
    if not isinstance(table, str) or not isinstance(name, str):
        return None
    return table, name


def suggest_fix(sql: str) -> str:
    """Return the ``select_related``/``prefetch_related`` that would remove *sql*'s repeats."""
    found = _where_column(sql)
    if found is None:
        return "fetch these rows in one query (select_related / prefetch_related / __in)"
    table, column = found
    hints: list[str] = []
    for model in apps.get_models(include_auto_created=True):
        meta = model._meta
        if meta.db_table != table:
            continue
        if meta.auto_created:  # a many-to-many table: which side filters?
            for field in meta.fields:
                if field.column == column and field.related_model is not None:
                    owner: Any = field.related_model
                    for m2m in owner._meta.many_to_many:
                        if m2m.remote_field.through is model:
                            hints.append(f'{owner.__name__}: prefetch_related("{m2m.name}")')
                    for rel in owner._meta.related_objects:
                        if rel.many_to_many and getattr(rel, "through", None) is model:
                            hints.append(
                                f'{owner.__name__}: prefetch_related("{rel.get_accessor_name()}")'
                            )
            continue
        if column == meta.pk.column:
            for other in apps.get_models():
                for field in other._meta.fields:
                    if field.is_relation and field.related_model is model:
                        hints.append(f'{other.__name__}: select_related("{field.name}")')
            continue
        for field in meta.fields:
            if field.column == column and field.is_relation and field.related_model is not None:
                target: Any = field.related_model
                accessor = field.remote_field.get_accessor_name()  # type: ignore[union-attr]
                hints.append(f'{target.__name__}: prefetch_related("{accessor}")')
    if not hints:
        return "fetch these rows in one query (select_related / prefetch_related / __in)"
    return "use " + " or ".join(sorted(set(hints)))


def is_read(sql: Any) -> bool:
    """Return whether *sql* is a statement whose repeats count as N+1 (a ``SELECT``)."""
    return isinstance(sql, str) and sql.lstrip()[:6].upper() == "SELECT"


def check_max_repeats(max_repeats: Any, where: str) -> int:
    """Return *max_repeats* if it is an int >= 1, else raise ``ValueError`` naming *where*."""
    if isinstance(max_repeats, bool) or not isinstance(max_repeats, int) or max_repeats < 1:
        raise ValueError(f"{where} is {max_repeats!r}: use an int >= 1.")
    return max_repeats


@dataclass(frozen=True)
class Repeat:
    """A query shape (*sql*, parameters left out) that ran *count* times, and its *fix*."""

    sql: str
    count: int
    fix: str


def find_repeats(shapes: Mapping[str, int], max_repeats: int) -> list[Repeat]:
    """Return the shapes of *shapes* (SQL -> times run) run more than *max_repeats* times.

    Most frequent first, each with the fix :func:`suggest_fix` reads from it.
    """
    over = sorted(
        ((sql, n) for sql, n in shapes.items() if n > max_repeats), key=lambda item: -item[1]
    )
    return [Repeat(sql, n, suggest_fix(sql)) for sql, n in over]


@contextmanager
def assert_no_n_plus_one(max_repeats: int = DEFAULT_MAX_REPEATS) -> Iterator[Counter[str]]:
    """Fail if a query shape runs more than *max_repeats* times in the block (see above).

    Watches every database connection of this thread. Yields the counter of shapes.
    """
    check_max_repeats(max_repeats, "assert_no_n_plus_one(): max_repeats")
    shapes: Counter[str] = Counter()

    def count(execute: Any, sql: Any, params: Any, many: bool, context: Any) -> Any:
        if is_read(sql):
            shapes[sql] += 1
        return execute(sql, params, many, context)

    with ExitStack() as stack:
        for alias in connections:
            stack.enter_context(connections[alias].execute_wrapper(count))
        yield shapes
    repeated = find_repeats(shapes, max_repeats)
    if repeated:
        first = repeated[0]
        sql = first.sql
        shown = sql if len(sql) <= 300 else sql[:297] + "..."
        raise NPlusOneDetected(
            f"One query shape ran {first.count} times (at most {max_repeats} allowed): "
            f"{shown}\nFix: {first.fix}."
        )
