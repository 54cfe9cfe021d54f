"""Plans: the keys and versions of a query, memoised so repeated shapes cost a dict lookup.

A *recipe* (the frozen chain of calls of a lazy queryset) maps to a :class:`Plan` through
two process-wide memos, both bounded and cleared on settings changes:

* ``recipe text -> Plan``: a repeated query (same calls, same values) costs one ``repr``
  and one dict lookup;
* ``shape text -> ShapeInfo``: a new value in a known shape (``author_id=8`` after
  ``author_id=7``) costs the plan build without compiling; only the first query of a
  shape compiles its SQL, to learn which tables it reads.

Querysets that cannot be described by a recipe (their ``.query`` was touched, or a value
has no safe key) are planned from their compiled SQL instead (:func:`plan_for_query`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from django.core.exceptions import EmptyResultSet, FullResultSet
from django.db import connections

from django_dbscale.cache.analysis import (
    MAX_DIMENSION_VALUES,
    Collector,
    ShapeInfo,
    collector,
    current_zone,
    dimensions_from_ops,
    dimensions_from_where,
)
from django_dbscale.cache.dimensions import dimension_fields
from django_dbscale.cache.engine import Plan
from django_dbscale.cache.keys import (
    Unkeyable,
    cluster_reason,
    digest,
    entry_key_for,
    freeze,
    function_key,
    generation_key,
    version_key,
)
from django_dbscale.cache.options import options
from django_dbscale.conf import on_settings_changed

__all__ = ["plan_for_function", "plan_for_query", "plan_for_recipe", "widen"]

COMPILER_MODULE = "django_dbscale.backends.postgresql.compiler"
MAX_PLANS = 4096
MAX_SHAPES = 1024

_plans: dict[tuple[str, ...], Plan] = {}
_shapes: dict[tuple[str, str], ShapeInfo] = {}
_lock = threading.Lock()


@on_settings_changed
def clear() -> None:
    """Forget every memoised plan and shape."""
    with _lock:
        _plans.clear()
        _shapes.clear()


def _backend_reason(alias: str) -> str | None:
    module = getattr(connections[alias].ops, "compiler_module", None)
    if module != COMPILER_MODULE:
        return (
            f"database {alias!r} does not use the dbscale backend, so its writes would not "
            "invalidate the cache"
        )
    return None


def discover(query: Any, alias: str) -> ShapeInfo:
    """Compile *query* once with a collector to learn the tables it reads."""
    reason = _backend_reason(alias)
    if reason is not None:
        return ShapeInfo(frozenset(), 0, reason)
    col = Collector(base_table=query.get_meta().db_table)
    token = collector.set(col)
    try:
        query.get_compiler(using=alias).as_sql()
    except (EmptyResultSet, FullResultSet):
        pass
    finally:
        collector.reset(token)
    return ShapeInfo(col.read_tables(), col.base_count(alias), col.reason, col.zoned)


def _build(
    *,
    model: Any,
    alias: str,
    shape: ShapeInfo,
    dims: tuple[Any, frozenset[str]] | None,
    entry_key: str,
) -> Plan:
    opts = options()
    base_table = model._meta.db_table
    version_keys: list[str] = []
    aliases: list[str] = []
    description: list[str] = []
    uses_dims = dims is not None and shape.base_count == 1
    for table_alias, table in sorted(shape.tables):
        if uses_dims and table == base_table and table_alias == alias:
            assert dims is not None
            field, values = dims
            version_keys.append(version_key(opts.prefix, alias, table, "w"))
            aliases.append(alias)
            for value in sorted(values):
                version_keys.append(version_key(opts.prefix, alias, table, "d", value))
                aliases.append(alias)
            description.append(
                f"{table_alias}.{table} where {field.column} in "
                f"{sorted(v.partition('=')[2] for v in values)}"
            )
        else:
            version_keys.append(version_key(opts.prefix, table_alias, table, "a"))
            aliases.append(table_alias)
            description.append(f"{table_alias}.{table}")
    _add_generations(opts.prefix, version_keys, aliases)
    return Plan(
        label=model._meta.label,
        model=model,
        alias=alias,
        entry_key=entry_key,
        header_key=entry_key + ":h",
        lease_key=entry_key + ":l",
        version_keys=tuple(version_keys),
        version_aliases=tuple(aliases),
        tables=shape.tables,
        base_table=base_table,
        uses_dimensions=uses_dims,
        description=tuple(description),
        shape=shape,
        reason=shape.reason or cluster_reason(aliases),
    )


def _add_generations(prefix: str, version_keys: list[str], aliases: list[str]) -> None:
    """Make the plan depend on the generation of every database it reads, too."""
    for alias in sorted(set(aliases)):
        version_keys.append(generation_key(prefix, alias))
        aliases.append(alias)


def plan_for_recipe(queryset: Any, alias: str, recipe: str, kind: str, extra: Any) -> Plan:
    """Return the plan of a lazy queryset's recipe (memoised; compiles once per shape)."""
    memo_key: tuple[str, ...] = (alias, recipe)
    plan = _plans.get(memo_key)
    if plan is not None:
        if plan.zone is None:
            return plan
        # Its SQL converts to the active time zone: one plan (and key) per zone.
        zone = current_zone()
        if plan.zone == zone:
            return plan
        memo_key = (alias, recipe, zone)
        plan = _plans.get(memo_key)
        if plan is not None:
            return plan
    model = queryset.model
    shape_key = (alias, queryset._dbscale_shape(kind, extra))
    shape = _shapes.get(shape_key)
    if shape is None:
        shape = discover(queryset._clone().query, alias)
        with _lock:
            if len(_shapes) >= MAX_SHAPES:
                _shapes.clear()
            _shapes[shape_key] = shape
    fields = dimension_fields(model)
    dims = None
    if fields and shape.base_count == 1:
        found = dimensions_from_ops(model, fields, queryset.__dict__["_dbscale_ops"])
        if found is not None and len(found[1]) <= MAX_DIMENSION_VALUES:
            dims = found
    opts = options()
    plan_zone = current_zone() if shape.zoned else None
    keyed = recipe if plan_zone is None else f"{recipe}@tz={plan_zone}"
    entry_key = entry_key_for(opts.prefix, alias, digest(keyed))
    plan = _build(model=model, alias=alias, shape=shape, dims=dims, entry_key=entry_key)
    plan.zone = plan_zone
    with _lock:
        if len(_plans) >= MAX_PLANS:
            _plans.clear()
        _plans[memo_key] = plan
    return plan


def plan_for_query(model: Any, alias: str, kind: str, extra: Any, query: Any) -> Plan | None:
    """Plan a queryset from its compiled SQL (no recipe); ``None`` if it has no safe key."""
    reason = _backend_reason(alias)
    col = Collector(base_table=query.get_meta().db_table)
    token = collector.set(col)
    try:
        sql, params = query.get_compiler(using=alias).as_sql()
    except EmptyResultSet:
        sql, params = "<empty>", ()
    finally:
        collector.reset(token)
    try:
        frozen = repr((model._meta.label, kind, freeze(extra), sql, freeze(tuple(params))))
    except Unkeyable:
        return None
    shape = ShapeInfo(col.read_tables(), col.base_count(alias), reason or col.reason, col.zoned)
    fields = dimension_fields(model)
    dims = None
    if fields and shape.base_count == 1:
        pinned = dimensions_from_where(query, fields)
        for field in fields:
            if field in pinned and len(pinned[field]) <= MAX_DIMENSION_VALUES:
                dims = (field, pinned[field])
                break
    opts = options()
    entry_key = entry_key_for(opts.prefix, alias, digest(frozen))
    plan = _build(model=model, alias=alias, shape=shape, dims=dims, entry_key=entry_key)
    plan.shape = None  # not memoised: nothing to widen
    return plan


def widen(
    plan: Plan, read: frozenset[tuple[str, str]], base_count: int, zoned: bool = False
) -> None:
    """Record that fills of *plan*'s shape read *read*; drop the stale memoised plans."""
    shape = plan.shape
    if shape is None:
        return
    with _lock:
        shape.tables = shape.tables | read
        shape.base_count = max(shape.base_count, base_count)
        shape.zoned = shape.zoned or zoned
        _plans.clear()


def plan_for_function(label: str, frozen: str, tables: Iterable[tuple[str, str]]) -> Plan:
    """Plan a :func:`~django_dbscale.cache.cached_queryset` call: whole-table versions only."""
    opts = options()
    pairs = frozenset(tables)
    ordered = sorted(pairs)
    version_keys = [version_key(opts.prefix, a, t, "a") for a, t in ordered]
    aliases = [a for a, _ in ordered]
    _add_generations(opts.prefix, version_keys, aliases)
    # The databases are part of the key (two shards never share an entry), and so is the
    # active time zone (the function may filter on __date or __year).
    zone = current_zone()
    entry_key = function_key(
        opts.prefix,
        ordered[0][0] if ordered else "default",
        digest(repr((label, frozen, tuple(ordered), zone))),
    )
    plan = Plan(
        label=label,
        model=None,
        alias=sorted(pairs)[0][0] if pairs else "default",
        entry_key=entry_key,
        header_key=entry_key + ":h",
        lease_key=entry_key + ":l",
        version_keys=tuple(version_keys),
        version_aliases=tuple(aliases),
        tables=pairs,
        base_table=None,
        uses_dimensions=False,
        description=tuple(f"{a}.{t}" for a, t in sorted(pairs)),
    )
    plan.zone = zone
    plan.reason = cluster_reason(aliases)
    return plan
