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
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from django.apps import apps
from django.db import connections

__all__ = ["NPlusOneDetected", "assert_no_n_plus_one", "suggest_fix"]


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


@contextmanager
def assert_no_n_plus_one(max_repeats: int = 5) -> Iterator[Counter[str]]:
    """Fail if a query shape runs more than *max_repeats* times in the block (see above).

    Watches every database connection of this thread. Yields the counter of shapes.
    """
    if isinstance(max_repeats, bool) or not isinstance(max_repeats, int) or max_repeats < 1:
        raise ValueError(f"assert_no_n_plus_one(max_repeats={max_repeats!r}): use an int >= 1.")
    shapes: Counter[str] = Counter()

    def count(execute: Any, sql: Any, params: Any, many: bool, context: Any) -> Any:
        if isinstance(sql, str) and sql.lstrip()[:6].upper() == "SELECT":
            shapes[sql] += 1
        return execute(sql, params, many, context)

    with ExitStack() as stack:
        for alias in connections:
            stack.enter_context(connections[alias].execute_wrapper(count))
        yield shapes
    repeated = [(sql, n) for sql, n in shapes.most_common() if n > max_repeats]
    if repeated:
        sql, n = repeated[0]
        shown = sql if len(sql) <= 300 else sql[:297] + "..."
        raise NPlusOneDetected(
            f"One query shape ran {n} times (at most {max_repeats} allowed): {shown}\n"
            f"Fix: {suggest_fix(sql)}."
        )
