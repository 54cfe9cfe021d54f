"""Function, view-helper and template-fragment caches invalidated by the data they show.

Django's ``{% cache %}`` and ``cache.get/set`` expire only by time. These use the queryset
cache's versions instead: a result is served only while nothing it depends on was written,
with the same fences (a fill is stored only if no dependency changed while it ran, only
from a source that has replayed the last invalidation), the same transaction rules and the
same behaviour when Redis fails (the function simply runs).

* :func:`cached_as` decorates a function: ``@cached_as(Book.objects.filter(public=True),
  Author, timeout=600)``.
* ``{% cachedas timeout name dep ... %}...{% endcachedas %}`` (``{% load dbscale_cache %}``)
  caches a template fragment; querysets and models among the arguments are dependencies,
  every other argument varies the key (like ``{% cache %}``'s ``vary_on``).

A dependency is a queryset (the tables it reads, found by compiling it once; its filters
and parameters are part of the key), a model class or ``"app_label.ModelName"`` (its
tables), or a model instance (its model's tables, its primary key in the key). The whole
tables are versioned: any write to them invalidates, whatever the rows. A fill that reads a
table its dependencies do not name is not stored (counted as a bypass): a forgotten
dependency costs misses, never stale data.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from django.db.models import Model, QuerySet

from django_dbscale.cache import engine, planning, stats
from django_dbscale.cache.decorators import _resolve
from django_dbscale.cache.invalidation import model_tables
from django_dbscale.cache.keys import Unkeyable, _freeze_queryset, freeze
from django_dbscale.cache.options import database_for, options, primary_alias

__all__ = ["cached_as", "read_through_dependencies", "resolve_dependencies"]

F = TypeVar("F", bound=Callable[..., Any])


def dependency(item: Any, where: str) -> tuple[frozenset[tuple[str, str]], Any]:
    """Return the (database, table) pairs *item* reads and its part of the key."""
    if isinstance(item, QuerySet):
        queryset: Any = item  # Django's private _db and _hints (not in django-stubs)
        db, hints = queryset._db, queryset._hints
        alias = primary_alias(db) if db else database_for(item.model, hints)
        shape = planning.discover(item.query, alias)
        if shape.reason is not None:
            raise Unkeyable(shape.reason)
        return shape.tables, ("qs", alias, _freeze_queryset(item, False))
    if isinstance(item, Model):
        model = type(item)
        alias = primary_alias(item._state.db) if item._state.db else database_for(model)
        tables = frozenset((alias, t) for t in model_tables(model))
        return tables, ("obj", model._meta.label, freeze(item.pk))
    model = _resolve(item, where)
    alias = database_for(model)
    return frozenset((alias, t) for t in model_tables(model)), ("model", model._meta.label)


Resolved = tuple[frozenset[tuple[str, str]], tuple[Any, ...]]


def resolve_dependencies(dependencies: Iterable[Any], where: str) -> Resolved:
    """Return every (database, table) the dependencies read and their part of the key.

    Compiles each queryset once (about as costly as a query's SQL): :func:`cached_as`
    resolves its fixed dependencies on the first call only; a template fragment, whose
    querysets come from each request's context, resolves them on every render.
    """
    tables: set[tuple[str, str]] = set()
    parts: list[Any] = []
    for item in dependencies:
        pairs, part = dependency(item, where)
        tables |= pairs
        parts.append(part)
    return frozenset(tables), tuple(parts)


def read_through_dependencies(
    label: str,
    resolved: Resolved,
    vary_on: Any,
    run: Callable[[], Any],
    timeout: int | None,
) -> Any:
    """Return ``run()`` through the cache, keyed by *label*, *vary_on* and the dependencies."""
    opts = options()
    if not opts.enabled or engine.bypass.get() is not None:
        return run()
    tables, parts = resolved
    try:
        frozen = repr((freeze(vary_on), parts))
    except Unkeyable:
        stats.incr(label, "bypass")
        return run()
    plan = planning.plan_for_function(label, frozen, tables)
    return engine.read_through(plan, run, timeout or opts.timeout)


def cached_as(*dependencies: Any, timeout: int | None = None) -> Callable[[F], F]:
    """Cache the decorated function's result until a write to what *dependencies* read.

    The key is the function's qualified name, its arguments (values with a stable key:
    numbers, strings, dates, UUIDs, model instances by primary key) and the dependencies;
    calls with other arguments run uncached (counted as a bypass). *timeout* in seconds
    (``None``: ``CACHE["TIMEOUT"]``).
    """
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0
    ):
        raise ValueError(f"cached_as(timeout={timeout!r}): use a positive int (seconds) or None.")
    if not dependencies:
        raise ValueError(
            "cached_as() needs what the function reads: querysets, models or model labels, "
            "e.g. @cached_as(Book.objects.filter(public=True), Author)."
        )
    for item in dependencies:
        if not isinstance(item, QuerySet | Model):
            _resolve(item, "cached_as()")  # a bad label fails at import, not on first call

    def decorate(func: F) -> F:
        name = f"{func.__module__}.{func.__qualname__}"
        if inspect.iscoroutinefunction(func):
            raise TypeError(
                f"@cached_as on {name}: async functions are not supported; decorate a sync "
                "function and call it through sync_to_async."
            )
        label = f"fn:{name}"
        resolved: list[Resolved] = []

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not options().enabled or engine.bypass.get() is not None:
                return func(*args, **kwargs)
            if not resolved:
                try:
                    resolved.append(resolve_dependencies(dependencies, f"@cached_as on {name}"))
                except Unkeyable:
                    stats.incr(label, "bypass")
                    return func(*args, **kwargs)
            return read_through_dependencies(
                label, resolved[0], (args, kwargs), lambda: func(*args, **kwargs), timeout
            )

        wrapper.dbscale_label = label  # type: ignore[attr-defined]
        return cast(F, wrapper)

    return decorate
