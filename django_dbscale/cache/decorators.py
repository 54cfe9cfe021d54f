"""``@cached_queryset``: cache what a function builds from querysets, per argument values.

::

    @cached_queryset(timeout=300, depends_on=[Book, "shop.Author"])
    def bestsellers(genre: str) -> list[dict[str, Any]]:
        ...

The result is pickled into Redis under a key made of the function's qualified name and its
arguments (the same value types as queryset filters: numbers, strings, dates, UUIDs, model
instances by primary key; calls with other arguments simply run uncached). It depends on
the whole tables of the listed models (their multi-table parents and auto-created
many-to-many tables included), on the database each model is read from, and is
invalidated by any write to them. A fill is stored only if every query it ran read those
tables and nothing else, so a forgotten model in ``depends_on`` shows up as a never-stored
result (counted as a bypass, with the tables named in the ``cache_read`` signal), never as
stale data. Reads through raw SQL are not seen: list their models.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from django.apps import apps
from django.db.models import Model

from django_dbscale.cache import engine, planning, stats
from django_dbscale.cache.invalidation import model_tables
from django_dbscale.cache.keys import Unkeyable, freeze
from django_dbscale.cache.options import database_for, options

__all__ = ["cached_queryset"]

F = TypeVar("F", bound=Callable[..., Any])


def _resolve(item: Any, where: str) -> type[Model]:
    if isinstance(item, type) and issubclass(item, Model):
        return item
    if isinstance(item, str):
        try:
            return apps.get_model(item)
        except (LookupError, ValueError) as exc:
            raise ValueError(
                f"{where}: depends_on names {item!r}, which is not an installed model. "
                'Use a model class or an "app_label.ModelName" label.'
            ) from exc
    raise TypeError(
        f"{where}: depends_on items must be model classes or 'app_label.ModelName' labels, "
        f"not {item!r}."
    )


def cached_queryset(
    timeout: int | None = None, depends_on: Iterable[type[Model] | str] = ()
) -> Callable[[F], F]:
    """Cache the decorated function's result until a write to a *depends_on* model.

    *timeout* is in seconds (``None``: ``CACHE["TIMEOUT"]``). *depends_on* must list every
    model whose table the function reads.
    """
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0
    ):
        raise ValueError(
            f"cached_queryset(timeout={timeout!r}): use a positive int (seconds) or None."
        )
    if isinstance(depends_on, str | type):
        depends_on = [depends_on]
    declared = list(depends_on)
    if not declared:
        raise ValueError(
            "cached_queryset(depends_on=[...]) needs the models the function reads, e.g. "
            "depends_on=[Book, Author]; without them no write could invalidate its result."
        )

    def decorate(func: F) -> F:
        name = f"{func.__module__}.{func.__qualname__}"
        where = f"@cached_queryset on {name}"
        if inspect.iscoroutinefunction(func):
            raise TypeError(
                f"{where}: async functions are not supported; decorate a sync function and "
                "call it through sync_to_async."
            )
        for item in declared:
            if not isinstance(item, str):
                _resolve(item, where)
        label = f"fn:{name}"
        resolved: list[type[Model]] = []

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            opts = options()
            if not opts.enabled or engine.bypass.get() is not None:
                return func(*args, **kwargs)
            if not resolved:
                resolved.extend(_resolve(item, where) for item in declared)
            try:
                frozen = repr(freeze((args, kwargs)))
            except Unkeyable:
                stats.incr(label, "bypass")
                return func(*args, **kwargs)
            tables = {
                (database_for(model), table) for model in resolved for table in model_tables(model)
            }
            plan = planning.plan_for_function(label, frozen, tables)
            return engine.read_through(plan, lambda: func(*args, **kwargs), timeout or opts.timeout)

        wrapper.dbscale_label = label  # type: ignore[attr-defined]
        return cast(F, wrapper)

    return decorate
