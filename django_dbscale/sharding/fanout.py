"""Explicit fan-out: one query run on every shard of a group, with the results combined.

``Order.objects.filter(status="open").order_by("-created", "id").all_shards()[:20]`` runs
the query on each shard concurrently (a thread per shard, each with its own connection),
merges the per-shard results in ``order_by`` order and slices after the merge: the result is
the one a single database holding every row would give.

What can be combined, and how:

* iteration, ``len()``, ``bool()``, indexing and slicing (each shard fetches at most the
  slice's stop, the merged stream is then sliced);
* ``count()`` (sum of per-shard counts, then the slice applied), ``exists()``;
* ``aggregate()`` with ``Sum``, ``Count``, ``Min`` and ``Max`` (``default=`` applied after
  combining); ``first()``, ``last()``, ``get()``;
* ``update()`` and ``delete()`` (per shard, on the primaries; counts summed);
* ``values()``/``values_list()`` rows, made unique across shards after ``distinct()``.

What cannot, and raises :class:`~.exceptions.FanoutNotSupported` before any query: ``Avg``,
``StdDev``/``Variance``, ``Count(distinct=True)``, aggregate expressions, ``GROUP BY``
(aggregating ``annotate()``), ``distinct(*fields)``, ordering by ``?``, by a lookup across a
relation or by an expression that is not a plain field (annotate it first and order by the
annotation's name), ``extra()``, aggregating a sliced or ``distinct()`` values query.

Merging compares values in Python: numbers, dates and UUIDs sort as in PostgreSQL, NULLs are
placed as PostgreSQL does (last ascending, first descending, or as ``nulls_first``/
``nulls_last`` say), and text by code point, which is PostgreSQL's order only under a
code-point collation (``"C"``, ``"POSIX"``, ``"C.utf8"``, ``ucs_basic``). So ordering by a
text value, and ``Min``/``Max`` of one, are refused unless its collation is one of those:
the column's ``db_collation``, a ``Collate()`` around it, or else the database's default
collation (read once per shard and process).

A shard-key filter (``filter(customer_id__in=[...])``) or ``for_key()`` limits the fan-out
to the shards it names.

Threads: the calling thread queries one shard itself; the others are queried by workers of
one process-wide pool, each in a copy of the caller's :mod:`contextvars` context, which close
their thread's connections that are obsolete under ``CONN_MAX_AGE`` when done (all of them
with the default ``0``; set ``CONN_MAX_AGE`` on shard aliases to keep worker connections
open). A shard whose connection is inside ``transaction.atomic`` in the calling thread is
queried from the calling thread, so the block sees its own uncommitted rows; so is everything
when there is one shard, or when the fan-out runs inside a fan-out worker.
"""

from __future__ import annotations

import contextvars
import copy
import heapq
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from django.core.exceptions import FieldDoesNotExist, FieldError
from django.db import DatabaseError, connections, models, router
from django.db.models import CharField, Count, F, Max, Min, Sum, TextField
from django.db.models.expressions import Col, OrderBy
from django.db.models.functions import Collate
from django.db.models.query import (
    FlatValuesListIterable,
    ModelIterable,
    NamedValuesListIterable,
    ValuesIterable,
    ValuesListIterable,
)
from django.db.models.utils import create_namedtuple_class

from django_dbscale import consistency
from django_dbscale.conf import on_settings_changed
from django_dbscale.sharding.exceptions import FanoutNotSupported
from django_dbscale.sharding.ring import get_ring
from django_dbscale.sharding.routing import SHARD_HINT, shard_spec

if TYPE_CHECKING:
    from django_dbscale.sharding.models import ShardedQuerySet

__all__ = ["FanoutQuerySet", "MAX_WORKERS", "run_on_shards"]

_M = TypeVar("_M", bound=models.Model)
R = TypeVar("R")

#: Size of the process-wide worker pool shared by all fan-outs.
MAX_WORKERS = 32

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_in_worker: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "dbscale_fanout_worker", default=False
)


def _read_alias(model: Any, shard: str) -> str:
    """Ask the routers where a read of *shard*'s rows of *model* goes (a replica of it?)."""
    return router.db_for_read(model, **{SHARD_HINT: shard}) or shard


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="dbscale-fanout")
    return _pool


def _close_thread_connections() -> None:
    for conn in connections.all(initialized_only=True):
        conn.close_if_unusable_or_obsolete()


def _work(fn: Callable[[str], R], alias: str) -> R:
    _in_worker.set(True)
    try:
        return fn(alias)
    finally:
        _close_thread_connections()


def run_on_shards(aliases: Sequence[str], fn: Callable[[str], R]) -> list[R]:
    """Return ``[fn(alias) for alias in aliases]``, computed concurrently.

    All calls but one run in pool threads, each in a copy of the caller's context; the
    calling thread runs the last one itself instead of idling. Aliases whose connection is
    in an atomic block in this thread run here too (and all of them inside a worker). Every
    call finishes before the first error (in alias order) is raised, with a note naming
    its alias.
    """
    pooled = len(aliases) > 1 and not _in_worker.get()
    here: list[int] = []
    there: list[int] = []
    for index, alias in enumerate(aliases):
        (there if pooled and not connections[alias].in_atomic_block else here).append(index)
    if there and not here:
        here.append(there.pop())
    futures: dict[int, Future[R]] = {}
    if there:
        # Workers run in copies of this context. Create the consistency state first, so
        # that every copy shares it: writes the workers commit are then this context's
        # own writes (read-your-writes), and its positions route the workers' reads.
        consistency.current_state()
    for index in there:
        ctx = contextvars.copy_context()
        futures[index] = _executor().submit(ctx.run, _work, fn, aliases[index])
    outcomes: dict[int, tuple[bool, Any]] = {}
    for index in here:
        try:
            outcomes[index] = (True, fn(aliases[index]))
        except Exception as exc:
            outcomes[index] = (False, exc)
    for index, future in futures.items():
        try:
            outcomes[index] = (True, future.result())
        except Exception as exc:
            outcomes[index] = (False, exc)
    for index, alias in enumerate(aliases):
        ok, value = outcomes[index]
        if not ok:
            value.add_note(f"(raised by the fan-out query on shard {alias!r})")
            raise value
    return [outcomes[index][1] for index in range(len(aliases))]


@dataclass(frozen=True)
class _Term:
    names: tuple[str, ...]  # keys of values() rows that may hold it, first found wins
    attname: str  # attribute of model instances holding it
    descending: bool
    nulls_first: bool
    collation: str | None = None  # text: its collation ("" = the database's); else None


class _SortKey:
    """Orders rows the way PostgreSQL's ORDER BY would (text by code point)."""

    __slots__ = ("terms", "values")

    def __init__(self, values: tuple[Any, ...], terms: tuple[_Term, ...]) -> None:
        self.values = values
        self.terms = terms

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SortKey) and self.values == other.values

    def __hash__(self) -> int:
        return hash(self.values)

    def __lt__(self, other: _SortKey) -> bool:
        for a, b, term in zip(self.values, other.values, self.terms, strict=True):
            if a == b:
                continue
            if a is None:
                return term.nulls_first
            if b is None:
                return not term.nulls_first
            return bool(a > b) if term.descending else bool(a < b)
        return False


_SUPPORTED_AGGREGATES: tuple[type[Any], ...] = (Sum, Count, Min, Max)
_CHAIN_METHODS = frozenset(
    {
        "all",
        "filter",
        "exclude",
        "order_by",
        "reverse",
        "values",
        "values_list",
        "distinct",
        "annotate",
        "alias",
        "only",
        "defer",
        "select_related",
        "prefetch_related",
        "none",
        "complex_filter",
    }
)


class FanoutQuerySet(Generic[_M]):
    """A sharded queryset run on every shard of its group, results combined.

    Made by ``.all_shards()``; chain the usual methods (filter, exclude, order_by,
    values, values_list, distinct, annotate, only, defer, select_related,
    prefetch_related, reverse) before or after it. Anything else raises
    :class:`FanoutNotSupported` naming the method.
    """

    def __init__(
        self, queryset: ShardedQuerySet[_M], low: int = 0, high: int | None = None
    ) -> None:
        spec = shard_spec(queryset.model)
        if spec is None:
            raise TypeError(f"{queryset.model._meta.label} is not sharded; no fan-out needed.")
        if queryset.query.is_sliced:
            q_low, q_high = queryset.query.low_mark, queryset.query.high_mark
            queryset = queryset._chain()
            queryset.query.clear_limits()
            low, high = _combine_marks(q_low, q_high, low, high)
        self._qs = queryset
        self.model = queryset.model
        self.group = spec.group
        self._low = low
        self._high = high
        self._result_cache: list[Any] | None = None

    # -- chaining ------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name in _CHAIN_METHODS:

            def chained(*args: Any, **kwargs: Any) -> FanoutQuerySet[_M]:
                if self.is_sliced and name not in {"all", "prefetch_related"}:
                    raise FanoutNotSupported(
                        f"Cannot call {name}() on a sliced fan-out query of "
                        f"{self.model._meta.label}; call it before slicing."
                    )
                if name == "distinct" and args:
                    raise FanoutNotSupported(
                        f"distinct(*fields) (DISTINCT ON) on a fan-out query of "
                        f"{self.model._meta.label} cannot be combined across shards."
                    )
                qs = getattr(self._qs, name)(*args, **kwargs)
                return FanoutQuerySet(qs, self._low, self._high)

            return chained
        if name.startswith("_"):
            raise AttributeError(name)
        raise FanoutNotSupported(
            f"{name}() is not supported on a fan-out query of {self.model._meta.label}. "
            f"Supported: iteration, len(), slicing, count(), exists(), aggregate() with "
            f"Sum/Count/Min/Max, first(), last(), get(), update(), delete(), per_shard(), "
            f"and {sorted(_CHAIN_METHODS)}. Run it per shard with "
            f"{self.model.__name__}.objects.on_shard(alias) instead."
        )

    @property
    def query(self) -> Any:
        """The underlying (unsliced) query, as run on each shard."""
        return self._qs.query

    @property
    def shards(self) -> tuple[str, ...]:
        """The shard primaries this query runs on, in configured order.

        Every shard of the group, or those a shard-key filter (``customer_id__in=[...]``)
        or ``for_key()``/``on_shard()`` names: the others cannot hold matching rows.
        """
        from django_dbscale.sharding.models import PIN, _key_shards

        nodes = get_ring(self.group).nodes
        query = self._qs.query
        spec = shard_spec(self.model)
        pin = query.__dict__.get(PIN)
        keys = None
        if spec is not None and spec.key_column is not None and not query.combinator:
            keys = _key_shards(query, spec)
        if keys is None and pin is None:
            return nodes
        return tuple(n for n in nodes if (keys is None or n in keys) and (pin is None or n == pin))

    @property
    def is_sliced(self) -> bool:
        return self._low != 0 or self._high is not None

    @property
    def ordered(self) -> bool:
        return self._qs.ordered

    def __getitem__(self, k: int | slice) -> Any:
        if isinstance(k, int):
            if k < 0:
                raise ValueError("Negative indexing is not supported.")
            if self._result_cache is not None:
                return self._result_cache[k]
            rows = list(self[k : k + 1])
            if not rows:
                raise IndexError("fan-out query index out of range")
            return rows[0]
        if not isinstance(k, slice):
            raise TypeError(f"Fan-out query indices must be int or slice, not {type(k).__name__}.")
        if (k.start is not None and k.start < 0) or (k.stop is not None and k.stop < 0):
            raise ValueError("Negative indexing is not supported.")
        if self._result_cache is not None:
            return self._result_cache[k]
        low, high = _combine_marks(self._low, self._high, k.start or 0, k.stop)
        sliced: FanoutQuerySet[_M] = FanoutQuerySet(self._qs, low, high)
        if k.step:
            return list(sliced)[:: k.step]
        return sliced

    # -- evaluation ----------------------------------------------------------------------

    def _read_queryset(self, alias: str) -> Any:
        return self._qs.using(_read_alias(self.model, alias))

    def _check_combinable(self) -> None:
        """Refuse, before any query, what no combination of per-shard results can answer."""
        query = self._qs.query
        label = self.model._meta.label
        if query.extra or query.extra_order_by:
            raise FanoutNotSupported(
                f"extra() on a fan-out query of {label} cannot be combined across shards."
            )
        if query.group_by is not None or any(
            getattr(a, "contains_aggregate", False) for a in query.annotations.values()
        ):
            raise FanoutNotSupported(
                f"Aggregating annotate() (GROUP BY) on a fan-out query of {label} cannot be "
                "combined across shards yet (a group may span shards, and counts of groups "
                "would be summed). Use aggregate() per group value, or query per shard with "
                "on_shard()."
            )
        if query.distinct_fields:
            raise FanoutNotSupported(
                f"distinct(*fields) (DISTINCT ON) on a fan-out query of {label} cannot be "
                "combined across shards."
            )

    def _check_text_order(self, what: str, collation: str | None) -> None:
        """Refuse merging text unless PostgreSQL orders it by code point, as Python does."""
        if collation is None:
            return
        if collation:
            if _is_code_point(collation):
                return
            where = f"collation {collation!r}"
        else:
            defaults = {alias: _database_collation(alias) for alias in self.shards}
            if all(_is_code_point(c) for c in defaults.values()):
                return
            where = f"the database default collation ({defaults})"
        raise FanoutNotSupported(
            f"The fan-out query of {self.model._meta.label} {what}, a text value under "
            f"{where}: PostgreSQL sorts it by that collation's rules, the merge of the "
            "shards' rows by code point, so the merged order (and Min/Max) would differ from "
            "one database's. Declare the column with db_collation='C', or annotate "
            "Collate(<field>, 'C') and order by the annotation."
        )

    def _plan(self) -> tuple[Any, list[_Term], list[Any], Callable[[Any], Any] | None]:
        """Return (per-shard queryset, order terms, accessors, row converter)."""
        qs: Any = self._qs
        self._check_combinable()
        terms = _order_terms(qs)
        for term in terms:
            self._check_text_order(f"orders by {term.names[0]!r}", term.collation)
        iterable = qs._iterable_class
        if iterable is ModelIterable:
            return qs, terms, [_attr_getter(t) for t in terms], None
        if iterable is ValuesIterable:
            keys = set(qs._fields) if qs._fields else None
            missing = [t.names[0] for t in terms if keys is not None and not keys & set(t.names)]
            if not missing:
                return qs, terms, [_key_getter(t) for t in terms], None
            fields = list(qs._fields)
            per_shard = qs.values(*fields, *missing)

            def strip(row: dict[str, Any]) -> dict[str, Any]:
                return {k: row[k] for k in fields}

            return per_shard, terms, [_key_getter(t) for t in terms], strip
        names = _values_list_names(qs)
        missing = [t.names[0] for t in terms if not set(t.names) & set(names)]
        columns = [*names, *missing]
        accessors = [_index_getter(t, columns) for t in terms]
        per_shard = (
            qs.values_list(*columns) if (missing or iterable is not ValuesListIterable) else qs
        )
        width = len(names)
        if iterable is FlatValuesListIterable:
            return per_shard, terms, accessors, lambda row: row[0]
        if iterable is NamedValuesListIterable:
            row_class = create_namedtuple_class(*(qs._fields or names))
            return per_shard, terms, accessors, lambda row: tuple.__new__(row_class, row[:width])
        if missing:
            return per_shard, terms, accessors, lambda row: row[:width]
        return per_shard, terms, accessors, None

    def _fetch(self) -> list[Any]:
        per_shard_qs, terms, accessors, convert = self._plan()
        limit = self._high
        distinct = self._qs.query.distinct and self._qs._iterable_class is not ModelIterable

        def fetch(alias: str) -> list[Any]:
            qs = per_shard_qs.using(_read_alias(self.model, alias))
            if limit is not None:
                qs = qs[:limit]
            return list(qs)

        per_shard = run_on_shards(self.shards, fetch)
        if terms:
            frozen = tuple(terms)
            merged: Iterator[Any] = heapq.merge(
                *per_shard, key=lambda row: _SortKey(tuple(a(row) for a in accessors), frozen)
            )
        else:
            merged = (row for rows in per_shard for row in rows)
        rows: list[Any] = []
        seen: set[Any] = set()
        for row in merged:
            out = convert(row) if convert is not None else row
            if distinct:
                marker = tuple(sorted(out.items())) if isinstance(out, dict) else out
                if marker in seen:
                    continue
                seen.add(marker)
            rows.append(out)
        return rows[self._low : self._high]

    def _fetch_all(self) -> list[Any]:
        if self._result_cache is None:
            self._result_cache = self._fetch()
        return self._result_cache

    def __iter__(self) -> Iterator[Any]:
        return iter(self._fetch_all())

    def __len__(self) -> int:
        return len(self._fetch_all())

    def __bool__(self) -> bool:
        return bool(self._fetch_all())

    def __repr__(self) -> str:
        data = list(self[:21]) if self._result_cache is None else self._result_cache[:21]
        shown = [*data[:20], "...(remaining elements truncated)..."] if len(data) > 20 else data
        return f"<FanoutQuerySet {shown!r}>"

    def iterator(self, chunk_size: int | None = None) -> Iterator[Any]:
        """Iterate over the merged rows (fetched in full first)."""
        return iter(self._fetch_all())

    def per_shard(self) -> dict[str, list[Any]]:
        """Return each shard's rows (unmerged, unsliced by the fan-out), by shard alias."""
        rows = run_on_shards(self.shards, lambda alias: list(self._read_queryset(alias)))
        return dict(zip(self.shards, rows, strict=True))

    def count(self) -> int:
        """Return the number of rows the merged (and sliced) query has."""
        if self._result_cache is not None:
            return len(self._result_cache)
        self._check_combinable()
        if self._qs.query.distinct and self._qs._iterable_class is not ModelIterable:
            return len(self._fetch_all())
        total = sum(
            int(n) for n in run_on_shards(self.shards, lambda a: self._read_queryset(a).count())
        )
        if self._high is not None:
            total = min(total, self._high)
        return max(0, total - self._low)

    def exists(self) -> bool:
        """Return whether any shard has a row (honouring a slice)."""
        if self._result_cache is not None:
            return bool(self._result_cache)
        if self.is_sliced:
            return self.count() > 0
        return any(run_on_shards(self.shards, lambda alias: self._read_queryset(alias).exists()))

    def aggregate(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Combine ``Sum``/``Count``/``Min``/``Max`` over every shard's rows."""
        label = self.model._meta.label
        if self.is_sliced:
            raise FanoutNotSupported(
                f"aggregate() over a sliced fan-out query of {label} cannot be combined: "
                "each shard would aggregate its own slice."
            )
        self._check_combinable()
        if self._qs.query.distinct and self._qs._iterable_class is not ModelIterable:
            raise FanoutNotSupported(
                f"aggregate() over distinct() values of {label} cannot be combined: equal "
                "values on different shards would be counted twice."
            )
        for arg in args:
            try:
                kwargs[arg.default_alias] = arg
            except (AttributeError, TypeError) as exc:
                raise TypeError("Complex aggregates require an alias.") from exc
        per_shard_aggs: dict[str, Any] = {}
        defaults: dict[str, Any] = {}
        for name, agg in kwargs.items():
            if type(agg) not in _SUPPORTED_AGGREGATES:
                raise FanoutNotSupported(
                    f"aggregate({name}={agg!r}): only Sum, Count, Min and Max can be "
                    "combined across shards. For Avg use Sum and Count and divide; "
                    "StdDev/Variance and expressions of aggregates cannot be combined."
                )
            if getattr(agg, "distinct", False):
                raise FanoutNotSupported(
                    f"aggregate({name}={agg!r}): distinct aggregates cannot be combined: a "
                    "value on two shards would be counted twice."
                )
            if isinstance(agg, Min | Max):
                self._check_text_order(
                    f"aggregates {name}={agg!r}", _aggregate_collation(self._qs.query, agg)
                )
            agg = copy.copy(agg)
            # The default replaces an empty shard's NULL, which would corrupt Min/Max.
            defaults[name], agg.default = agg.default, None
            per_shard_aggs[name] = agg
        results = run_on_shards(
            self.shards, lambda alias: self._read_queryset(alias).aggregate(**per_shard_aggs)
        )
        combined: dict[str, Any] = {}
        for name, agg in per_shard_aggs.items():
            values = [r[name] for r in results if r[name] is not None]
            if isinstance(agg, Count):
                value: Any = sum(values)
            elif not values:
                value = None
            elif isinstance(agg, Sum):
                value = sum(values[1:], values[0])
            elif isinstance(agg, Min):
                value = min(values)
            else:
                value = max(values)
            combined[name] = (
                defaults[name] if value is None and defaults[name] is not None else value
            )
        return combined

    def first(self) -> _M | Any | None:
        """Return the first merged row (by ``pk`` when unordered) or None."""
        fan = self if self.ordered else self.order_by("pk")
        rows = list(fan[:1])
        return rows[0] if rows else None

    def last(self) -> _M | Any | None:
        """Return the last merged row (by ``pk`` when unordered) or None."""
        if self.is_sliced:
            raise FanoutNotSupported(
                f"Cannot call last() on a sliced fan-out query of {self.model._meta.label}."
            )
        fan = self.reverse() if self.ordered else self.order_by("-pk")
        rows = list(fan[:1])
        return rows[0] if rows else None

    def get(self, *args: Any, **kwargs: Any) -> Any:
        """Return the one row matching, searching every shard."""
        fan = self.filter(*args, **kwargs) if (args or kwargs) else self
        rows = list(fan[:2]) if not fan.is_sliced else list(fan)
        if not rows:
            raise cast(Any, self.model).DoesNotExist(
                f"{self.model._meta.object_name} matching query does not exist on any shard."
            )
        if len(rows) > 1:
            raise cast(Any, self.model).MultipleObjectsReturned(
                f"get() returned more than one {self.model._meta.object_name} across shards."
            )
        return rows[0]

    def update(self, **kwargs: Any) -> int:
        """Update matching rows on every shard primary; return the total count."""
        if self.is_sliced:
            raise FanoutNotSupported(
                f"Cannot update a sliced fan-out query of {self.model._meta.label}."
            )
        return sum(run_on_shards(self.shards, lambda alias: self._qs.using(alias).update(**kwargs)))

    def delete(self) -> tuple[int, dict[str, int]]:
        """Delete matching rows on every shard primary; return Django's combined counts."""
        if self.is_sliced:
            raise FanoutNotSupported(
                f"Cannot delete a sliced fan-out query of {self.model._meta.label}."
            )
        results = run_on_shards(self.shards, lambda alias: self._qs.using(alias).delete())
        total = 0
        per_model: dict[str, int] = {}
        for count, counts in results:
            total += count
            for label, n in counts.items():
                per_model[label] = per_model.get(label, 0) + n
        return total, per_model


def _combine_marks(
    low: int, high: int | None, new_low: int, new_high: int | None
) -> tuple[int, int | None]:
    # Same arithmetic as Django's Query.set_limits.
    if new_high is not None:
        high = min(high, low + new_high) if high is not None else low + new_high
    low = min(high, low + new_low) if high is not None else low + new_low
    return low, high


def _resolve_order_name(qs: Any, name: str) -> tuple[tuple[str, ...], str, str | None]:
    query = qs.query
    meta = qs.model._meta
    if name in query.annotations:
        if name not in query.annotation_select:
            raise FanoutNotSupported(
                f"order_by({name!r}) names an alias() that is not selected; use annotate()."
            )
        return (name,), name, _expression_collation(query.annotations[name])
    if name == "pk":
        pk = meta.pk
        return ("pk", pk.name, pk.attname), pk.attname, _field_collation(pk)
    if "__" in name:
        raise FanoutNotSupported(
            f"order_by({name!r}) orders by a lookup across a relation, whose values are not "
            f"in the rows to merge. Annotate it first: .annotate(sort_key=F({name!r}))"
            ".order_by('sort_key')."
        )
    try:
        field = meta.get_field(name)
    except FieldDoesNotExist as exc:
        raise FanoutNotSupported(
            f"order_by({name!r}): not a field or annotation of {meta.label}."
        ) from exc
    if field.is_relation:
        if not field.concrete or not field.many_to_one and not field.one_to_one:
            raise FanoutNotSupported(f"order_by({name!r}): cannot order by a reverse relation.")
        related: Any = field.related_model
        if name != field.attname and related._meta.ordering:
            raise FanoutNotSupported(
                f"order_by({name!r}) orders by {related.__name__}'s Meta.ordering, "
                f"which is not in the rows to merge; order by {field.attname!r} instead."
            )
    attname = str(cast(Any, field).attname)
    return (name, attname), attname, _field_collation(field)


def _order_terms(qs: Any) -> list[_Term]:
    query = qs.query
    if query.order_by:
        items = list(query.order_by)
    elif query.default_ordering and qs.model._meta.ordering:
        items = list(qs.model._meta.ordering)
    else:
        return []
    terms = []
    for item in items:
        nulls_first: bool | None = None
        nulls_last: bool | None = None
        if isinstance(item, str):
            if item == "?":
                raise FanoutNotSupported("order_by('?') (random order) cannot be merged.")
            descending = item.startswith("-")
            name = item.lstrip("-+")
        elif isinstance(item, OrderBy) and isinstance(item.expression, F):
            descending = item.descending
            nulls_first, nulls_last = item.nulls_first, item.nulls_last
            name = str(cast(Any, item.expression).name)
        elif isinstance(item, F):
            descending, name = False, str(cast(Any, item).name)
        else:
            raise FanoutNotSupported(
                f"order_by({item!r}): only field names, F() and F().asc()/desc() can be "
                "merged. Annotate the expression and order by the annotation's name."
            )
        if not query.standard_ordering:
            descending = not descending
            nulls_first, nulls_last = nulls_last, nulls_first
        first = True if nulls_first else (False if nulls_last else descending)
        names, attname, collation = _resolve_order_name(qs, name)
        terms.append(_Term(names, attname, descending, first, collation))
    return terms


def _values_list_names(qs: Any) -> list[str]:
    query = qs.query
    if qs._fields:
        return [*qs._fields, *(f for f in query.annotation_select if f not in qs._fields)]
    return [*query.extra_select, *query.values_select, *query.annotation_select]


def _attr_getter(term: _Term) -> Callable[[Any], Any]:
    attname = term.attname

    def get(row: Any) -> Any:
        try:
            return row.__dict__[attname]
        except KeyError:
            raise FanoutNotSupported(
                f"The fan-out orders by {attname!r}, which only()/defer() left out of the "
                "rows. Keep it loaded to merge by it."
            ) from None

    return get


def _key_getter(term: _Term) -> Callable[[Any], Any]:
    def get(row: dict[str, Any]) -> Any:
        for name in term.names:
            if name in row:
                return row[name]
        raise FanoutNotSupported(f"The fan-out orders by {term.names[0]!r}, missing from rows.")

    return get


def _index_getter(term: _Term, columns: list[str]) -> Callable[[Any], Any]:
    index = next(columns.index(n) for n in term.names if n in columns)
    return lambda row: row[index]


# -- text collations -------------------------------------------------------------------------

#: Collations under which PostgreSQL orders text by code point, as Python compares str.
CODE_POINT_COLLATIONS = frozenset({"c", "posix", "ucs_basic", "c.utf8", "c.utf-8", "pg_c_utf8"})

_db_collations: dict[str, str] = {}


@on_settings_changed
def _forget_collations() -> None:
    _db_collations.clear()


def _is_code_point(collation: str) -> bool:
    return collation.strip('"').lower() in CODE_POINT_COLLATIONS


def _database_collation(alias: str) -> str:
    """Return how *alias*'s database orders text by default (cached per process)."""
    known = _db_collations.get(alias)
    if known is not None:
        return known
    try:
        with connections[alias].cursor() as cursor:
            # to_jsonb: datlocprovider/datlocale exist only on newer PostgreSQL releases.
            cursor.execute(
                "SELECT datcollate, to_jsonb(d) ->> 'datlocprovider', to_jsonb(d) ->> 'datlocale'"
                " FROM pg_database d WHERE datname = current_database()"
            )
            row = cursor.fetchone()
    except DatabaseError:
        return "unknown"
    if row is None:
        return "unknown"
    collate, provider, locale = row
    if provider == "i":
        value = f"icu:{locale or collate}"
    elif provider == "b":
        value = str(locale or collate)  # builtin provider: C and C.UTF-8 are code point
    else:
        value = str(collate)
    _db_collations[alias] = value
    return value


def _text_field(field: Any) -> Any:
    """Return *field* (following foreign keys to their target) if it stores text."""
    seen = 0
    while getattr(field, "is_relation", False) and getattr(field, "target_field", None):
        field = field.target_field
        seen += 1
        if seen > 10:
            return None
    return field if isinstance(field, CharField | TextField) else None


def _field_collation(field: Any) -> str | None:
    """Return a field's collation ("" = the database default), or None if not text."""
    text = _text_field(field)
    if text is None:
        return None
    return str(getattr(text, "db_collation", None) or "")


def _expression_collation(expression: Any) -> str | None:
    """Return the collation PostgreSQL sorts a resolved expression by, or None if not text.

    ``Collate`` names it; a column has its field's; another text expression derives it
    from its inputs: an explicit collation inside wins, else the columns' if they agree,
    else the database default ("").
    """
    source = getattr(expression, "source", None)
    if source is not None and hasattr(expression, "refs"):
        return _expression_collation(source)  # a Ref to an annotation
    if isinstance(expression, Collate):
        return str(cast(Any, expression).collation)
    if isinstance(expression, Col):
        return _field_collation(expression.target)
    try:
        output = expression.output_field
    except (FieldError, AttributeError):
        return None
    if _text_field(output) is None:
        return None
    explicit: set[str] = set()
    implicit: set[str] = set()
    stack = list(expression.get_source_expressions())
    while stack:
        part = stack.pop()
        if part is None:
            continue
        if isinstance(part, Collate):
            explicit.add(str(cast(Any, part).collation))
        elif isinstance(part, Col):
            collation = _field_collation(part.target)
            if collation is not None:
                implicit.add(collation)
        else:
            stack.extend(part.get_source_expressions())
    if explicit:
        return explicit.pop() if len(explicit) == 1 else "mixed " + ", ".join(sorted(explicit))
    if len(implicit) == 1:
        return implicit.pop()
    return ""


def _aggregate_collation(query: Any, aggregate: Any) -> str | None:
    """Return the collation of a Min/Max's argument (see :func:`_expression_collation`)."""
    try:
        resolved = aggregate.resolve_expression(query.chain(), allow_joins=True, summarize=True)
        sources = resolved.get_source_expressions()
    except (FieldError, FieldDoesNotExist):
        return None  # Django raises its own error when the aggregate runs
    return _expression_collation(sources[0]) if sources else None
