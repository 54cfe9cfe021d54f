"""What a query reads: tables, dimension values, and whether it can be cached at all.

Two sources, one truth:

* **The compiler.** Every query Django runs on a dbscale connection is compiled by
  :mod:`django_dbscale.backends.postgresql.compiler`, which reports each compiled query to
  the active :class:`Collector` (a context variable, ``None`` outside cache fills). That sees
  joins, ``select_related``, multi-table parents, subqueries, ``Exists``, combinators and the
  extra queries of ``prefetch_related``, because they are all compiled there.
* **The recipe or the WHERE tree**, for dimension values: constraints like
  ``author_id=5`` or ``author__in=[5, 7]`` at the top level of a conjunction, on the model's
  own table.

A fill records what it actually read, and is stored only if that is covered by the versions
read *before* it queried (:meth:`Collector.verdict`). A query shape whose first run read
more tables than expected is widened and stored from the next miss on.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

from django.db.models import Field, Model, Q
from django.db.models.expressions import RawSQL
from django.db.models.lookups import Exact, In
from django.db.models.sql.where import ExtraWhere, WhereNode

from django_dbscale.backends import events
from django_dbscale.cache.keys import canonical_dimension

__all__ = [
    "Collector",
    "ShapeInfo",
    "collector",
    "dimensions_from_ops",
    "dimensions_from_where",
    "nondeterministic",
]

#: SQL functions whose result changes from one execution to the next.
NONDETERMINISTIC = re.compile(
    r"\b(random|now|clock_timestamp|statement_timestamp|transaction_timestamp|timeofday|"
    r"gen_random_uuid|uuid_generate_v[14]|nextval|currval|setval|setseed|txid_current|"
    r"pg_current_xact_id|pg_backend_pid|inet_client_addr|current_user|session_user)\s*\(|"
    r"\b(current_timestamp|current_date|current_time|localtime|localtimestamp)\b",
    re.IGNORECASE,
)

#: More distinct dimension values than this make a read or write use table-wide versions.
MAX_DIMENSION_VALUES = 64


#: How Django's PostgreSQL backend converts to the active time zone.
_ZONED = "AT TIME ZONE"


def current_zone() -> str:
    """Return the active time zone's name ("" without ``USE_TZ``): part of zoned keys."""
    from django.conf import settings
    from django.utils import timezone

    return timezone.get_current_timezone_name() if settings.USE_TZ else ""


@functools.lru_cache(maxsize=2048)
def nondeterministic(sql: str) -> bool:
    """Return whether *sql* calls a function whose result varies between executions.

    Memoised by SQL text: a query shape compiles to the same text at every fill (values
    are parameters), and the search over it cost about 15 µs of each miss.
    """
    return NONDETERMINISTIC.search(sql) is not None


def _has_raw_sql(node: Any, depth: int = 0) -> bool:
    if isinstance(node, RawSQL | ExtraWhere):
        return True
    if depth > 50:
        return True
    children = getattr(node, "children", None)
    if children is not None:
        return any(_has_raw_sql(child, depth + 1) for child in children)
    get_sources = getattr(node, "get_source_expressions", None)
    if get_sources is None:
        return False
    return any(_has_raw_sql(s, depth + 1) for s in get_sources() if s is not None)


#: ``extra(select=...)`` entries that only name a column of a table already in FROM, as
#: Django's own many-to-many prefetch does (``"app_book_tags"."book_id"``).
_PLAIN_COLUMN = re.compile(r'^"[^"]+"\."[^"]+"$')


def raw_sql_reason(query: Any) -> str | None:
    """Return why *query* embeds SQL the cache cannot see into, or ``None``."""
    if query.extra and not all(
        _PLAIN_COLUMN.match(sql) and not params for sql, params in query.extra.values()
    ):
        return "extra() embeds SQL whose tables cannot be known"
    if _has_raw_sql(query.where) or any(_has_raw_sql(a) for a in query.annotations.values()):
        return "RawSQL embeds SQL whose tables cannot be known"
    return None


@dataclass
class ShapeInfo:
    """What every query of one shape reads (learned from compiles, widened by fills)."""

    tables: frozenset[tuple[str, str]]
    base_count: int
    reason: str | None = None
    #: Its SQL converts to the active time zone (``__date``, ``__year``, ``Trunc`` with
    #: ``USE_TZ``): the zone's name must be part of the key.
    zoned: bool = False


@dataclass
class Collector:
    """Records what queries compiled and run during a cache fill (or a discovery compile).

    ``required``: primary alias -> WAL position its replicas must have replayed before a
    fill may read from them (``consistency.UNKNOWN_POSITION`` when unknown). ``queries``
    maps each compiled query object to the (primary alias, tables) it reads.
    """

    base_table: str | None = None
    required: dict[str, int] = field(default_factory=dict)
    queries: dict[int, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    reason: str | None = None
    #: Some compiled SQL converts to the active time zone (``AT TIME ZONE``).
    zoned: bool = False
    #: Every alias a statement of the fill ran on.
    sources: set[str] = field(default_factory=set)

    def add_tables(self, query: Any, alias: str, tables: list[str]) -> None:
        """Note the tables in one compiled query's FROM clause (called by the compiler)."""
        from django_dbscale.cache.options import primary_alias

        self.queries[id(query)] = (primary_alias(alias), tuple(tables))

    def record(self, query: Any, alias: str | None, sql: str) -> None:
        """Note one compiled query's SQL: reject what cannot be cached (called by the compiler)."""
        if not self.zoned and sql and _ZONED in sql:
            self.zoned = True
        if self.reason is None:
            if sql and nondeterministic(sql):
                self.reason = "non-deterministic SQL (random(), now(), ...)"
            else:
                self.reason = raw_sql_reason(query)
            if query.select_for_update and self.reason is None:
                self.reason = "select_for_update()"

    def read_tables(self) -> frozenset[tuple[str, str]]:
        """Return every (primary alias, table) read by the recorded queries."""
        return frozenset((alias, t) for alias, tables in self.queries.values() for t in tables)

    def base_count(self, alias: str) -> int:
        """Return how often the base table appears over all recorded queries."""
        if self.base_table is None:
            return 0
        return sum(
            tables.count(self.base_table) for a, tables in self.queries.values() if a == alias
        )


#: The collector of the fill (or discovery) running in this context, if any: the backend's
#: read observer, which its compiler reports to.
collector = events.read_observer


# -- dimension values -----------------------------------------------------------------------


def _lookup_target(
    model: type[Model], path: str, fields: tuple[Field[Any, Any], ...]
) -> tuple[Field[Any, Any], str] | None:
    """Map ``author_id__in`` to (the dimension field ``author``, ``"in"``), else ``None``."""
    parts = path.split("__")
    lookup = "exact"
    if parts[-1] in ("exact", "in") and len(parts) > 1:
        lookup = parts.pop()
    meta = model._meta
    name = parts[0]
    target: Field[Any, Any] | None = None
    for candidate in fields:
        if name in (candidate.name, candidate.attname) or (name == "pk" and candidate is meta.pk):
            target = candidate
            break
    if target is None:
        return None
    rest = parts[1:]
    if rest:
        # ``author__id`` / ``author__pk`` on a foreign key: the same column.
        remote = target.remote_field
        if remote is None or len(rest) != 1:
            return None
        target_field = target.target_field  # type: ignore[attr-defined]
        if rest[0] not in ("pk", target_field.name, target_field.attname) or (
            rest[0] == "pk" and not target_field.primary_key
        ):
            return None
    return target, lookup


def _constraint_values(field: Field[Any, Any], lookup: str, value: Any) -> set[str] | None:
    if lookup == "exact":
        dim = canonical_dimension(field, value)
        return None if dim is None else {dim}
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return None
    if hasattr(value, "resolve_expression") or hasattr(value, "query"):
        return None
    result: set[str] = set()
    for item in value:
        dim = canonical_dimension(field, item)
        if dim is None:
            if item is None:
                continue
            return None
        result.add(dim)
        if len(result) > MAX_DIMENSION_VALUES:
            return None
    return result


def _intersect(
    found: dict[Field[Any, Any], set[str]], field: Field[Any, Any], values: set[str]
) -> None:
    if field in found:
        found[field] &= values
    else:
        found[field] = set(values)


def _scan_q(
    model: type[Model],
    fields: tuple[Field[Any, Any], ...],
    children: Any,
    found: dict[Field[Any, Any], set[str]],
) -> None:
    for child in children:
        if isinstance(child, Q):
            if child.connector == Q.AND and not child.negated:
                _scan_q(model, fields, child.children, found)
            continue
        if type(child) is not tuple or len(child) != 2:
            continue
        target = _lookup_target(model, child[0], fields)
        if target is None:
            continue
        values = _constraint_values(target[0], target[1], child[1])
        if values is not None:
            _intersect(found, target[0], values)


def dimensions_from_ops(
    model: type[Model], fields: tuple[Field[Any, Any], ...], ops: tuple[Any, ...]
) -> tuple[Field[Any, Any], frozenset[str]] | None:
    """Return the first declared dimension a lazy recipe pins, and its values.

    Only ``filter()`` calls count (an ``exclude()`` never narrows to a value); ``Q`` objects
    count when they are conjunctions and not negated.
    """
    found: dict[Field[Any, Any], set[str]] = {}
    for op in ops:
        if op[0] != "filter":
            continue
        _scan_q(model, fields, op[1], found)
        _scan_q(model, fields, op[2].items(), found)
    for dim_field in fields:
        if dim_field in found:
            return dim_field, frozenset(found[dim_field])
    return None


def dimensions_from_where(
    query: Any, fields: tuple[Field[Any, Any], ...]
) -> dict[Field[Any, Any], frozenset[str]]:
    """Return dimension field -> values pinned by a resolved query's WHERE clause.

    Looks at ``exact``/``in`` lookups on columns of the base table at the top level of the
    WHERE tree (and inside nested, non-negated AND nodes). Fields not pinned are absent.
    """
    if not fields:
        return {}
    base = query.base_table
    found: dict[Field[Any, Any], set[str]] = {}

    def walk(node: WhereNode) -> None:
        if node.negated or node.connector != "AND":
            return
        for child in node.children:
            if isinstance(child, WhereNode):
                walk(child)
                continue
            if not isinstance(child, Exact | In):
                continue
            lhs = child.lhs
            target = getattr(lhs, "target", None)
            if getattr(lhs, "alias", None) != base or target not in fields:
                continue
            rhs = child.rhs
            if hasattr(rhs, "resolve_expression") or hasattr(rhs, "as_sql"):
                continue
            values = _constraint_values(target, "in" if isinstance(child, In) else "exact", rhs)
            if values is not None:
                _intersect(found, target, values)

    walk(query.where)
    return {f: frozenset(v) for f, v in found.items()}
