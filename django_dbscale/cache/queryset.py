"""``CachedQuerySet``, ``CachedManager`` and ``CachedModel``: the queryset side of the cache.

Opt in per queryset with ``.cache(timeout=...)``, or for every queryset of a model by
listing it in ``CACHE["MODELS"]``; opt out with ``.nocache()``. Cached evaluations:
iteration, ``len()``, ``bool()``, ``get()``, ``first()``/``last()``, slices and indexes,
``count()``, ``exists()``, ``aggregate()``, ``in_bulk()``; with ``filter()``/``exclude()``
chains, ``select_related``, ``prefetch_related`` (stored together with the rows),
``values()``/``values_list()``, ``annotate()``, ``only()``/``defer()``, ``distinct()``.

**Lazy recipes.** A ``CachedQuerySet`` does not build its SQL ``Query`` while it is
chained: ``filter()`` and friends record their call in a tuple (the *recipe*) instead. A
cache hit is then served from the recipe alone (a ``repr`` and a dict lookup give the key),
never building or compiling the query; the query is built, by replaying the calls on a
plain ``QuerySet``, only when something needs it (a miss, or any code touching
``.query``). Touching ``.query`` turns the queryset into an ordinary eager one for good,
because the caller may change the query in place; its key then comes from the compiled SQL.
One visible consequence: an invalid lookup (``filter(no_such_field=1)``) raises when the
queryset is evaluated, not when ``filter()`` is called.

Reads never use the cache inside ``get_or_create()``/``update_or_create()``, for
``select_for_update()``, ``iterator()``, or for querysets made for writing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from django.core.exceptions import ImproperlyConfigured
from django.db import models
from django.db.models import Model, QuerySet, prefetch_related_objects
from django.db.models.manager import BaseManager
from django.db.models.query import MAX_GET_RESULTS, ModelIterable

from django_dbscale import consistency
from django_dbscale.cache import engine, planning
from django_dbscale.cache.keys import _ATOMS, Unkeyable, freeze
from django_dbscale.cache.options import database_for, options, primary_alias

if TYPE_CHECKING:
    from django_dbscale.cache.explain import Explanation

__all__ = ["CachedManager", "CachedModel", "CachedQuerySet", "CacheManagerMixin"]

logger = logging.getLogger("django_dbscale.cache")

_M = TypeVar("_M", bound=Model, covariant=True)

_LAZY = object()

#: Ops whose arguments are structure (field names), never abstracted in a shape.
_STRUCTURAL = frozenset(
    {"order_by", "select_related", "values", "values_list", "only", "defer", "distinct", "reverse"}
)


_NO_PREFETCH = freeze(())
_QUERYSET_DB = QuerySet.db
#: Queryset class -> whether its ``db`` is Django's (router-based) property.
_plain_db: dict[type[Any], bool] = {}
_PLAIN = frozenset({str, int, type(None)})
_iterable_names: dict[type[Any], str] = {}


def _iterable_name(iterable: type[Any]) -> str:
    name = _iterable_names.get(iterable)
    if name is None:
        name = _iterable_names[iterable] = f"{iterable.__module__}.{iterable.__qualname__}"
    return name


def _freeze_op(op: tuple[Any, ...], shape: bool) -> Any:
    name, args, kwargs = op
    if not shape:
        # Fast paths for the common calls (field names, limits, filters on plain values):
        # 2-tuples, never equal to the 3-tuples of the general encoding below.
        if (
            not kwargs
            and (name in _STRUCTURAL or name == "limits")
            and all(type(arg) in _PLAIN for arg in args)
        ):
            return (name, args)
        if not args and name in ("filter", "exclude"):
            items = tuple(sorted(kwargs.items()))
            if all(type(value) in _ATOMS for _, value in items):
                return (name, items)
    if name in _STRUCTURAL or name in ("annotate", "alias"):
        return (name, freeze(args), freeze(kwargs))
    return (name, freeze(args, shape), freeze(kwargs, shape))


def _copy_value(value: Any) -> Any:
    kind = type(value)
    if kind is list or kind is dict or kind is set:
        return kind(value)
    return value


def _validate_timeout(timeout: Any, where: str) -> int | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise ValueError(
            f"{where}: timeout must be a positive int (seconds) or None for "
            f"DBSCALE['CACHE']['TIMEOUT'], not {timeout!r}."
        )
    return timeout


_warned_unkeyable: set[tuple[str, str]] = set()


def _note_unkeyable(model: type[Model], exc: Unkeyable) -> None:
    """Count a read the cache cannot key (never silent); in DEBUG, warn once per cause."""
    from django.conf import settings

    from django_dbscale.cache import stats

    label = model._meta.label
    stats.incr(label, "bypass")
    cause = str(exc).split(":", 1)[0]
    if settings.DEBUG and (label, cause) not in _warned_unkeyable:
        _warned_unkeyable.add((label, cause))
        logger.warning(
            "A %s read through .cache() is not cached: %s. explain_cache() says the same; "
            "this is logged once per cause in DEBUG.",
            label,
            exc,
        )


class CachedQuerySet(QuerySet[_M], Generic[_M]):
    """A ``QuerySet`` that reads through the Redis queryset cache when asked to."""

    if TYPE_CHECKING:
        # Django's private QuerySet attributes, which django-stubs does not declare.
        _db: str | None
        _hints: dict[str, Any]
        _fields: tuple[Any, ...] | None
        _sticky_filter: bool
        _for_write: bool
        _prefetch_related_lookups: tuple[Any, ...]
        _prefetch_done: bool
        _known_related_objects: dict[Any, dict[Any, Any]]
        _iterable_class: type[Any]
        _result_cache: list[Any] | None
        _defer_next_filter: bool

        def _validate_values_are_expressions(
            self, values: tuple[Any, ...], method_name: str
        ) -> None: ...

    _dbscale_timeout: int | None = None
    _dbscale_low: int = 0
    _dbscale_high: int | None = None
    _dbscale_order: tuple[Any, ...] = ()
    _dbscale_default_ordering: bool = True
    _dbscale_annotated: bool = False
    _dbscale_distinct: bool = False

    def __init__(
        self,
        model: type[Model] | None = None,
        query: Any = None,
        using: str | None = None,
        hints: dict[str, Any] | None = None,
    ) -> None:
        self.__dict__["_dbscale_q"] = query
        self.__dict__["_dbscale_ops"] = () if query is None else None
        super().__init__(model, _LAZY if query is None else query, using, hints)  # type: ignore[arg-type]

    # -- laziness ------------------------------------------------------------------------
    @property
    def _query(self) -> Any:
        d = self.__dict__
        query = d["_dbscale_q"]
        if query is None:
            query = d["_dbscale_q"] = self._dbscale_build()
        # Whoever asked may change the query in place: the recipe no longer describes it.
        d["_dbscale_ops"] = None
        return query

    @_query.setter
    def _query(self, value: Any) -> None:
        if value is _LAZY:
            return
        self.__dict__["_dbscale_q"] = value
        self.__dict__["_dbscale_ops"] = None

    def _dbscale_build(self) -> Any:
        """Replay the recipe on a plain ``QuerySet`` and return the resulting ``Query``."""
        tmp: Any = QuerySet(model=self.model, using=self._db, hints=self._hints)
        for name, args, kwargs in self.__dict__["_dbscale_ops"]:
            if name == "sticky":
                tmp._sticky_filter = True
            elif name == "limits":
                tmp = tmp._chain()
                tmp.query.set_limits(*args)
            else:
                tmp = getattr(tmp, name)(*args, **kwargs)
        return tmp.query

    @property
    def _dbscale_lazy(self) -> bool:
        return self.__dict__["_dbscale_q"] is None

    def _dbscale_recipe(self, shape: bool = False) -> Any:
        """Return the frozen recipe (raises :class:`Unkeyable` if there is none)."""
        ops = self.__dict__["_dbscale_ops"]
        if ops is None:
            raise Unkeyable("this queryset's query was built; its recipe is gone")
        lookups = self._prefetch_related_lookups
        return (
            "QS",
            self.model._meta.label,
            self._db,
            _iterable_name(self._iterable_class),
            tuple([_freeze_op(op, shape) for op in ops]),
            freeze(tuple(lookups)) if lookups else _NO_PREFETCH,
        )

    def _dbscale_shape(self, kind: str, extra: Any) -> str:
        """Return the text of this recipe's shape (its values abstracted) for *kind*."""
        return repr((kind, freeze(extra), self._dbscale_recipe(True)))

    def _clone(self) -> CachedQuerySet[_M]:
        d = self.__dict__
        if d["_dbscale_q"] is None:
            # A lazy queryset is its attributes and an immutable recipe: copy the dict
            # (what Django's _clone copies, plus the recipe) and reset what belongs to one
            # evaluation. Several times cheaper than __init__, on every chained call.
            lazy = object.__new__(type(self))
            cd = dict(d)
            cd["_result_cache"] = None
            cd["_prefetch_done"] = False
            cd["_defer_next_filter"] = False
            cd["_deferred_filter"] = None
            lazy.__dict__ = cd
            return lazy
        # Eager: Django's _clone, through every other mixin's (a ShardedQuerySet's state).
        clone: CachedQuerySet[_M] = super()._clone()  # type: ignore[misc]
        if "_dbscale_timeout" in d:
            clone.__dict__["_dbscale_timeout"] = d["_dbscale_timeout"]
        return clone

    def _chain(self) -> CachedQuerySet[_M]:
        obj = self._clone()
        if obj._sticky_filter:
            if obj.__dict__["_dbscale_q"] is None:
                obj.__dict__["_dbscale_ops"] += (("sticky", (), {}),)
            else:
                obj.query.filter_is_sticky = True
            obj._sticky_filter = False
        return obj

    def _dbscale_push(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        clone = self._chain()
        clone.__dict__["_dbscale_ops"] += ((name, args, kwargs),)
        return clone

    def _dbscale_sliced(self) -> bool:
        return self._dbscale_low != 0 or self._dbscale_high is not None

    # -- opting in and out ------------------------------------------------------------------
    def cache(self, timeout: int | None = None) -> CachedQuerySet[_M]:
        """Return a copy read through the cache; *timeout* in seconds (default: TIMEOUT)."""
        seconds = _validate_timeout(timeout, f"{self.model.__name__}.objects.cache()")
        clone = self._chain()
        clone.__dict__["_dbscale_timeout"] = seconds if seconds is not None else options().timeout
        return clone

    def nocache(self) -> CachedQuerySet[_M]:
        """Return a copy that never reads through the cache."""
        clone = self._chain()
        clone.__dict__["_dbscale_timeout"] = None
        return clone

    def explain_cache(self, kind: str = "rows") -> Explanation:
        """Say whether this queryset is cacheable, its key, what it depends on, why it missed.

        *kind* is ``"rows"`` (iteration), ``"count"`` or ``"exists"``. Makes one Redis round
        trip when the queryset is cacheable; changes nothing in Redis.
        """
        from django_dbscale.cache.explain import explain_queryset

        return explain_queryset(self, kind)

    # -- chaining without building the query -------------------------------------------------
    def filter(self, *args: Any, **kwargs: Any) -> CachedQuerySet[_M]:
        if not self._dbscale_lazy:
            return super().filter(*args, **kwargs)
        return self._dbscale_filter("filter", args, kwargs)

    def exclude(self, *args: Any, **kwargs: Any) -> CachedQuerySet[_M]:
        if not self._dbscale_lazy:
            return super().exclude(*args, **kwargs)
        return self._dbscale_filter("exclude", args, kwargs)

    def _dbscale_filter(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> CachedQuerySet[_M]:
        if (args or kwargs) and self._dbscale_sliced():
            raise TypeError("Cannot filter a query once a slice has been taken.")
        self._defer_next_filter = False
        kwargs = {key: _copy_value(value) for key, value in kwargs.items()}
        result: CachedQuerySet[_M] = self._dbscale_push(name, args, kwargs)
        return result

    def order_by(self, *field_names: Any) -> CachedQuerySet[_M]:
        if not self._dbscale_lazy:
            return super().order_by(*field_names)
        if self._dbscale_sliced():
            raise TypeError("Cannot reorder a query once a slice has been taken.")
        clone: CachedQuerySet[_M] = self._dbscale_push("order_by", field_names, {})
        clone.__dict__["_dbscale_order"] = field_names
        if not field_names:
            clone.__dict__["_dbscale_default_ordering"] = False
        return clone

    def select_related(self, *fields: Any) -> CachedQuerySet[_M]:
        if not self._dbscale_lazy:
            return super().select_related(*fields)
        if self._fields is not None:
            raise TypeError("Cannot call select_related() after .values() or .values_list()")
        result: CachedQuerySet[_M] = self._dbscale_push("select_related", fields, {})
        return result

    def prefetch_related(self, *lookups: Any) -> CachedQuerySet[_M]:
        if not self._dbscale_lazy or self._dbscale_annotated:
            return super().prefetch_related(*lookups)
        clone = self._chain()
        if lookups == (None,):
            clone._prefetch_related_lookups = ()
        else:
            clone._prefetch_related_lookups = clone._prefetch_related_lookups + lookups
        return clone

    def values(self, *fields: Any, **expressions: Any) -> Any:
        if not self._dbscale_lazy or expressions:
            return super().values(*fields, **expressions)
        if any(hasattr(field, "resolve_expression") for field in fields):
            return super().values(*fields)
        from django.db.models.query import ValuesIterable

        clone = self._dbscale_push("values", fields, {})
        clone._fields = fields
        clone._iterable_class = ValuesIterable
        return clone

    def values_list(self, *fields: Any, flat: bool = False, named: bool = False) -> Any:
        if (
            not self._dbscale_lazy
            or any(hasattr(field, "resolve_expression") for field in fields)
            or len(set(fields)) != len(fields)
        ):
            return super().values_list(*fields, flat=flat, named=named)
        if flat and named:
            raise TypeError("'flat' and 'named' can't be used together.")
        if flat and len(fields) > 1:
            raise TypeError(
                "'flat' is not valid when values_list is called with more than one field."
            )
        from django.db.models.query import (
            FlatValuesListIterable,
            NamedValuesListIterable,
            ValuesListIterable,
        )

        clone = self._dbscale_push("values_list", fields, {"flat": flat, "named": named})
        clone._fields = fields
        clone._iterable_class = (
            NamedValuesListIterable
            if named
            else FlatValuesListIterable
            if flat
            else ValuesListIterable
        )
        return clone

    def only(self, *fields: Any) -> CachedQuerySet[_M]:
        if not self._dbscale_lazy or self._dbscale_annotated:
            return super().only(*fields)
        if self._fields is not None:
            raise TypeError("Cannot call only() after .values() or .values_list()")
        if fields == (None,):
            raise TypeError("Cannot pass None as an argument to only().")
        result: CachedQuerySet[_M] = self._dbscale_push("only", fields, {})
        return result

    def defer(self, *fields: Any) -> CachedQuerySet[_M]:
        if not self._dbscale_lazy:
            return super().defer(*fields)
        if self._fields is not None:
            raise TypeError("Cannot call defer() after .values() or .values_list()")
        result: CachedQuerySet[_M] = self._dbscale_push("defer", fields, {})
        return result

    def annotate(self, *args: Any, **kwargs: Any) -> CachedQuerySet[_M]:
        return self._dbscale_annotate("annotate", args, kwargs)

    def alias(self, *args: Any, **kwargs: Any) -> CachedQuerySet[_M]:
        return self._dbscale_annotate("alias", args, kwargs)

    def _dbscale_annotate(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> CachedQuerySet[_M]:
        from django.db.models import FilteredRelation

        if (
            not self._dbscale_lazy
            or args
            or any(isinstance(value, FilteredRelation) for value in kwargs.values())
        ):
            method: Callable[..., CachedQuerySet[_M]] = getattr(super(), name)
            return method(*args, **kwargs)
        self._validate_values_are_expressions(tuple(kwargs.values()), method_name=name)
        clone: CachedQuerySet[_M] = self._dbscale_push(name, (), kwargs)
        clone.__dict__["_dbscale_annotated"] = True
        return clone

    def distinct(self, *field_names: Any) -> CachedQuerySet[_M]:
        if not self._dbscale_lazy:
            return super().distinct(*field_names)
        if self._dbscale_sliced():
            raise TypeError("Cannot create distinct fields once a slice has been taken.")
        clone: CachedQuerySet[_M] = self._dbscale_push("distinct", field_names, {})
        if field_names:
            clone.__dict__["_dbscale_distinct"] = True
        return clone

    def reverse(self) -> CachedQuerySet[_M]:
        if not self._dbscale_lazy:
            return super().reverse()
        if self._dbscale_sliced():
            raise TypeError("Cannot reverse a query once a slice has been taken.")
        result: CachedQuerySet[_M] = self._dbscale_push("reverse", (), {})
        return result

    def _dbscale_limit(self, low: int | None, high: int | None) -> CachedQuerySet[_M]:
        """Record ``Query.set_limits(low, high)``, tracking the marks it would compute."""
        clone: CachedQuerySet[_M] = self._dbscale_push("limits", (low, high), {})
        d = clone.__dict__
        lo, hi = clone._dbscale_low, clone._dbscale_high
        if high is not None:
            hi = min(hi, lo + high) if hi is not None else lo + high
        if low is not None:
            lo = min(hi, lo + low) if hi is not None else lo + low
        d["_dbscale_low"], d["_dbscale_high"] = lo, hi
        return clone

    def __getitem__(self, k: Any) -> Any:
        if (
            not self._dbscale_lazy
            or self._result_cache is not None
            or not isinstance(k, int | slice)
        ):
            return super().__getitem__(k)
        if (isinstance(k, int) and k < 0) or (
            isinstance(k, slice)
            and ((k.start is not None and k.start < 0) or (k.stop is not None and k.stop < 0))
        ):
            raise ValueError("Negative indexing is not supported.")
        if isinstance(k, slice):
            start = int(k.start) if k.start is not None else None
            stop = int(k.stop) if k.stop is not None else None
            qs = self._dbscale_limit(start, stop)
            if qs._dbscale_low == qs._dbscale_high:
                # Django turns this into an empty query; let it.
                return super().__getitem__(k)
            return list(qs)[:: k.step] if k.step else qs
        qs = self._dbscale_limit(k, k + 1)
        qs._fetch_all()
        return qs._result_cache[0]  # type: ignore[index]

    @property
    def ordered(self) -> bool:
        if not self._dbscale_lazy or self._dbscale_annotated:
            return bool(super().ordered)
        if self._dbscale_order:
            return True
        return self._dbscale_default_ordering and bool(self.model._meta.ordering)

    def _check_ordering_first_last_queryset_aggregation(self, method: str) -> None:
        if self._dbscale_lazy and not self._dbscale_annotated:
            return  # no annotate() in the recipe: no GROUP BY to check
        super()._check_ordering_first_last_queryset_aggregation(method)  # type: ignore[misc]

    # -- evaluation ------------------------------------------------------------------------------
    def _dbscale_primary(self) -> str:
        """Return the database the keys and versions name (no replica is chosen).

        The routers decide, as for any read, but are asked only which database holds the
        rows (:func:`~django_dbscale.cache.options.database_for`): the dbscale routers then
        answer with the primary, pin nothing and count nothing. A fill asks them again,
        for real.
        """
        db = self._db
        if db is not None:
            return primary_alias(db)
        cls = type(self)
        plain = _plain_db.get(cls)
        if plain is None:
            plain = _plain_db[cls] = getattr(cls, "db", None) is _QUERYSET_DB
        if plain:
            return database_for(self.model, self._hints)
        token = consistency.naming_database.set(True)
        try:
            return primary_alias(self.db)  # a sharded queryset maps its key, then asks
        finally:
            consistency.naming_database.reset(token)

    def _dbscale_plan(self, kind: str, extra: Any = None) -> engine.Plan | None:
        """Return the cache plan for evaluating this queryset as *kind*, or ``None``."""
        if self.__dict__.get("_dbscale_timeout") is None or self._for_write:
            return None
        if engine.bypass.get() is not None or not options().enabled:
            return None
        alias = self._dbscale_primary()
        if self.__dict__["_dbscale_q"] is None:
            try:
                recipe = repr((kind, freeze(extra), self._dbscale_recipe()))
            except Unkeyable:
                pass
            else:
                return planning.plan_for_recipe(self, alias, recipe, kind, extra)
        query = self.query
        if query.select_for_update:
            return None
        iterable = self._iterable_class
        try:
            described = freeze(
                (
                    extra,
                    f"{iterable.__module__}.{iterable.__qualname__}",
                    tuple(self._prefetch_related_lookups),
                )
            )
        except Unkeyable as exc:
            _note_unkeyable(self.model, exc)
            return None
        return planning.plan_for_query(self.model, alias, kind, described, query)

    def _fetch_all(self) -> None:
        if self._result_cache is None:
            plan = self._dbscale_plan("rows")
            if plan is not None:

                def run() -> list[Any]:
                    detached = self._clone()
                    rows = list(detached._iterable_class(detached))
                    if detached._prefetch_related_lookups:
                        prefetch_related_objects(rows, *detached._prefetch_related_lookups)
                    return rows

                timeout = self.__dict__["_dbscale_timeout"]
                rows = engine.read_through(plan, run, timeout)
                if self._known_related_objects and self._iterable_class is ModelIterable:
                    self._dbscale_apply_known(rows)
                self._result_cache = rows
                self._prefetch_done = True
                return
        super()._fetch_all()

    def _dbscale_apply_known(self, rows: list[Any]) -> None:
        """Re-attach the live related instances a related manager knows (not pickled copies)."""
        import operator

        for field, related in self._known_related_objects.items():
            getter = operator.attrgetter(
                *[
                    field.attname
                    if from_field == "self"
                    else self.model._meta.get_field(from_field).attname  # type: ignore[union-attr]
                    for from_field in field.from_fields
                ]
            )
            for obj in rows:
                rel_obj = related.get(getter(obj))
                if rel_obj is not None:
                    setattr(obj, field.name, rel_obj)

    def count(self) -> int:
        if self._result_cache is not None:
            return len(self._result_cache)
        plan = self._dbscale_plan("count")
        if plan is None:
            return super().count()
        return engine.read_through(
            plan, lambda: QuerySet.count(self._clone()), self.__dict__["_dbscale_timeout"]
        )

    def exists(self) -> bool:
        if self._result_cache is not None:
            return bool(self._result_cache)
        plan = self._dbscale_plan("exists")
        if plan is None:
            return super().exists()
        return engine.read_through(
            plan, lambda: QuerySet.exists(self._clone()), self.__dict__["_dbscale_timeout"]
        )

    def aggregate(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self._dbscale_distinct and self._dbscale_lazy:
            raise NotImplementedError("aggregate() + distinct(fields) not implemented.")
        self._validate_values_are_expressions((*args, *kwargs.values()), method_name="aggregate")
        for arg in args:
            try:
                _ = arg.default_alias
            except (AttributeError, TypeError):
                raise TypeError("Complex aggregates require an alias") from None
            kwargs[arg.default_alias] = arg
        plan = self._dbscale_plan("aggregate", kwargs)
        if plan is None:
            return super().aggregate(**kwargs)
        detached = self._clone()
        return engine.read_through(
            plan, lambda: QuerySet.aggregate(detached, **kwargs), self.__dict__["_dbscale_timeout"]
        )

    def get(self, *args: Any, **kwargs: Any) -> _M:
        if not self._dbscale_lazy or self.__dict__.get("_dbscale_timeout") is None:
            return super().get(*args, **kwargs)
        if (args or kwargs) and self._dbscale_sliced():
            raise TypeError("Cannot filter a query once a slice has been taken.")
        # filter(), order_by() and set_limits(high=21), as QuerySet.get() does, recorded in
        # one clone rather than three.
        ops: tuple[Any, ...] = ()
        if args or kwargs:
            ops += (("filter", args, {key: _copy_value(v) for key, v in kwargs.items()}),)
        reorder = not self._dbscale_sliced() and not self._dbscale_distinct
        if reorder:
            ops += (("order_by", (), {}),)
        clone = self._chain()
        clone._defer_next_filter = False
        cd = clone.__dict__
        cd["_dbscale_ops"] += ops
        if reorder:
            cd["_dbscale_order"] = ()
            cd["_dbscale_default_ordering"] = False
        clone = clone._dbscale_limit(None, MAX_GET_RESULTS)
        num = len(clone)
        if num == 1:
            found: _M = clone._result_cache[0]  # type: ignore[index]
            return found
        model: Any = self.model
        if not num:
            raise model.DoesNotExist(
                f"{self.model._meta.object_name} matching query does not exist."
            )
        raise model.MultipleObjectsReturned(
            "get() returned more than one {} -- it returned {}!".format(
                self.model._meta.object_name,
                num if num < MAX_GET_RESULTS else f"more than {MAX_GET_RESULTS - 1}",
            )
        )

    def get_or_create(self, defaults: Any = None, **kwargs: Any) -> tuple[_M, bool]:
        token = engine.bypass.set("get_or_create")
        try:
            return super().get_or_create(defaults, **kwargs)
        finally:
            engine.bypass.reset(token)

    def update_or_create(
        self, defaults: Any = None, create_defaults: Any = None, **kwargs: Any
    ) -> tuple[_M, bool]:
        token = engine.bypass.set("update_or_create")
        try:
            return super().update_or_create(defaults, create_defaults, **kwargs)
        finally:
            engine.bypass.reset(token)


class CacheManagerMixin:
    """Manager mixin: querysets of models listed in ``CACHE["MODELS"]`` cache by default."""

    model: type[Model]

    def get_queryset(self) -> Any:
        queryset = super().get_queryset()  # type: ignore[misc]
        try:
            opts = options()
        except ImproperlyConfigured:
            return queryset  # reported by system check dbscale.E200; never cache meanwhile
        if opts.enabled and self.model._meta.label_lower in opts.models:
            queryset.__dict__["_dbscale_timeout"] = opts.timeout
        return queryset

    def cache(self, timeout: int | None = None) -> Any:
        """Return a queryset of all objects read through the cache."""
        seconds = _validate_timeout(timeout, f"{self.model.__name__}.objects.cache()")
        queryset = self.get_queryset()  # a fresh queryset of our own: set it in place
        queryset.__dict__["_dbscale_timeout"] = (
            seconds if seconds is not None else options().timeout
        )
        return queryset

    def nocache(self) -> Any:
        """Return a queryset of all objects that never reads through the cache."""
        return self.get_queryset().nocache()


class CachedManager(CacheManagerMixin, BaseManager.from_queryset(CachedQuerySet)):  # type: ignore[misc]
    """The default manager of :class:`CachedModel`; usable on any model."""


class CachedModel(models.Model):
    """Abstract model mixin: ``objects`` is a :class:`CachedManager`.

    Declare invalidation dimensions with a class attribute, e.g.
    ``cache_dimensions = ("author",)`` (see :mod:`django_dbscale.cache.dimensions`).
    """

    objects = CachedManager()

    class Meta:
        abstract = True
