"""Declaring sharded models, and the queryset that routes them.

::

    class Order(ShardedModel):
        shard_group = "customers"     # a group of DBSCALE["SHARD_GROUPS"]
        shard_key = "customer"        # a concrete field or foreign key holding the key

        id = ShardedIDField(primary_key=True)
        customer = models.ForeignKey(Customer, on_delete=models.CASCADE)

Models of one group with the same key values are *colocated*: their rows with equal keys
live on the same shard, so joins and foreign keys between them work.

How a queryset of a sharded model finds its shard, first match wins:

1. ``.using(alias)``: that alias (an escape hatch), but a shard-key filter naming keys of
   other shards of the group raises :class:`~.exceptions.ShardMismatch`;
2. ``.for_key(key)`` / ``.on_shard(alias)`` / ``.for_id(pk)``;
3. an equality (or single-shard ``__in``) filter on the shard-key field in the query's
   top-level ``AND`` (``filter(customer_id=42)``, ``filter(customer=c)``, ``get(...)``,
   related managers ``customer.orders.all()``); 2 and 3 must agree or
   :class:`~.exceptions.ShardMismatch` is raised;
4. the router: the row a relation starts from, then :func:`~.context.using_shard`;
5. otherwise :class:`~.exceptions.ShardKeyRequired`. Nothing ever falls through to
   ``default``.

The explicit shard of rule 2 and the shards of rule 3 are kept on the ``Query`` object
(``query.__dict__``), which Django copies on every clone and keeps in
``combined_queries``: so ``union()`` and friends can check every part. Rule 3 is computed
from ``filter()`` keyword arguments as they are added; the ``WHERE`` tree is only walked for
``Q`` objects and other changes made around ``filter()``.

Reads ask the routers with the shard primary as the ``shard`` hint, so ``ShardRouter`` hands
it to :func:`django_dbscale.replicas.read_alias` (its replicas, with the lag budget and
read-your-writes) like every other read; writes go to the shard primary.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeVar

from django.db import DatabaseError, connections, models, router
from django.db.models import prefetch_related_objects
from django.db.models.expressions import Col
from django.db.models.lookups import Exact, In
from django.db.models.signals import post_save, pre_save
from django.db.models.sql.query import Query
from django.db.models.sql.where import AND, WhereNode
from django.dispatch import receiver

from django_dbscale.conf import dbscale_settings
from django_dbscale.sharding.context import current_shard, using_shard
from django_dbscale.sharding.exceptions import (
    CrossShardRelation,
    InvalidShardKey,
    ShardingError,
    ShardKeyChanged,
    ShardKeyRequired,
    ShardMismatch,
    UnknownShard,
)
from django_dbscale.sharding.ids import (
    ShardedIDField,
    _verified,
    shard_of_id,
    verify_ring_once,
)
from django_dbscale.sharding.routing import (
    SHARD_HINT,
    ShardSpec,
    _shard_of_related,
    _specs,
    check_write_target,
    key_required,
    refusals_as_shard_moved,
    shard_for_instance,
    shard_moved_from,
    shard_spec,
)

if TYPE_CHECKING:
    from django_dbscale.sharding.fanout import FanoutQuerySet

__all__ = [
    "ShardedManager",
    "ShardedModel",
    "ShardedQuerySet",
    "key_shards_in_query",
    "prefetch_by_shard",
]

_M = TypeVar("_M", bound=models.Model)

#: Key of ``query.__dict__`` holding the shard named by for_key()/on_shard()/for_id().
PIN = "_dbscale_pin"
#: Key of ``query.__dict__`` holding ``(len(where.children), shards or None)``: the shards
#: the query's shard-key filter allows, valid while the WHERE has that many children.
KEYS = "_dbscale_keys"

#: Key of ``query.__dict__`` holding ``(alias, len(where.children))`` of the last
#: ``.using()`` alias found consistent with the shard-key filter.
CHECKED = "_dbscale_checked"
#: Key of ``query.__dict__`` recording ``(connector, shard, shard)`` of a ``|``/``^`` of
#: querysets of different shards, for the error message.
COMBINED = "_dbscale_combined"

_KEY_LOOKUP_TYPES = (Exact, In)
_UNKNOWN: Any = object()  # a filter() value whose shards cannot be told cheaply
_SEQUENCES = (list, tuple, set, frozenset)


def _spec_of(model: type[models.Model]) -> ShardSpec:
    spec = shard_spec(model)
    if spec is None or spec.key_field is None:
        raise TypeError(f"{model._meta.label} is not a sharded model (see ShardedModel).")
    return spec


def _primary(alias: str) -> str:
    return dbscale_settings.primary_of.get(alias, alias)


def _shards_of(spec: ShardSpec, values: Iterable[Any]) -> tuple[str, ...]:
    """Return the shards (in ring order) owning key *values*."""
    ring = spec.ring
    found = {ring.node_for(spec.ring_key(v)) for v in values}
    if len(found) == 1:
        return tuple(found)
    return tuple(n for n in ring.nodes if n in found)


def _intersect(a: tuple[str, ...] | None, b: tuple[str, ...]) -> tuple[str, ...]:
    return b if a is None else tuple(s for s in a if s in b)


def _lookup_shards(child: Any, spec: ShardSpec, alias: str | None) -> tuple[str, ...] | None:
    lhs = child.lhs
    if not isinstance(lhs, Col) or lhs.alias != alias or lhs.target.column != spec.key_column:
        return None
    rhs = child.rhs
    if hasattr(rhs, "resolve_expression") or isinstance(rhs, Query):
        return None
    if isinstance(child, In):
        values = [v for v in rhs if v is not None]
        if any(hasattr(v, "resolve_expression") for v in values):
            return None
        return _shards_of(spec, values)
    return _shards_of(spec, (rhs,))


def _walk_key_shards(node: WhereNode, spec: ShardSpec, alias: str | None) -> tuple[str, ...] | None:
    """Return the shards the ``AND``-ed shard-key equalities/``__in`` allow, or None."""
    if node.connector != AND or node.negated:
        return None
    result: tuple[str, ...] | None = None
    for child in node.children:
        if isinstance(child, WhereNode):
            found = _walk_key_shards(child, spec, alias)
        elif isinstance(child, _KEY_LOOKUP_TYPES):
            found = _lookup_shards(child, spec, alias)
        else:
            continue
        if found is not None:
            result = _intersect(result, found)
    return result


def _key_shards(query: Query, spec: ShardSpec) -> tuple[str, ...] | None:
    """Return the shards the query's shard-key filter allows (None: no such filter).

    Only conditions that constrain every row are used: shard-key equality or ``__in`` on
    the model's own table inside the top-level ``AND`` (not under ``OR`` or ``NOT``);
    several such conditions intersect. An empty result means the filter matches nothing.
    """
    where = query.where
    n = len(where.children)
    d = query.__dict__
    entry = d.get(KEYS)
    if entry is not None and entry[0] == n and where.connector == AND:
        return entry[1]  # type: ignore[no-any-return]
    # The first alias is the base table. Not query.base_table: that cached property would
    # remember None if read before the query has tables, and break it.
    shards = _walk_key_shards(where, spec, next(iter(query.alias_map), None)) if n else None
    d[KEYS] = (n, shards)
    return shards


def key_shards_in_query(query: Query, spec: ShardSpec) -> list[str] | None:
    """Return the shard primaries the query's shard-key filter allows (None: no filter)."""
    if spec.key_field is None:
        return None
    shards = _key_shards(query, spec)
    return None if shards is None else list(shards)


def _kwarg_shards(spec: ShardSpec, value: Any, is_in: bool) -> Any:
    """Return the shards a ``filter(<key lookup>=value)`` allows, None, or _UNKNOWN.

    Mirrors what :func:`_walk_key_shards` finds in the lookup Django builds from it.
    """
    if is_in:
        if not isinstance(value, _SEQUENCES):
            return _UNKNOWN  # an iterator Django has consumed, a subquery: walk the tree
        values = [v for v in value if v is not None]
        if any(hasattr(v, "resolve_expression") for v in values):
            return _UNKNOWN
        return _shards_of(spec, values)
    if value is None or hasattr(value, "resolve_expression"):
        return None  # IS NULL, F(), a subquery: no key the shard can be told from
    return (spec.shard_of(value),)


def _query_primary(model: type[models.Model], query: Query, spec: ShardSpec) -> str | None:
    """Return the shard primary *query* names (rules 2 and 3), or None if it names none."""
    if query.combinator:
        return _combined_primary(model, query, spec)
    d = query.__dict__
    pin: str | None = d.get(PIN)
    shards = _key_shards(query, spec) if spec.key_column is not None else None
    if shards is None:
        return pin
    if len(shards) == 1:
        shard = shards[0]
        if pin is not None and pin != shard:
            raise _pin_mismatch(model, spec, pin, shards)
        return shard
    if not shards:
        # An empty __in (or disjoint key conditions) matches nothing anywhere; Django
        # answers it without a query, on whichever alias.
        return pin or spec.ring.nodes[0]
    if pin is not None:
        raise _pin_mismatch(model, spec, pin, shards)
    raise ShardKeyRequired(
        f"The {model._meta.label} query filters its shard key {spec.describe_key()} on keys "
        f"living on several shards {list(shards)}. Use .all_shards() to query them all, "
        "or split the keys per shard."
    )


def _pin_mismatch(
    model: type[models.Model], spec: ShardSpec, pin: str, shards: tuple[str, ...]
) -> ShardMismatch:
    return ShardMismatch(
        f"{model._meta.label} query is bound to shard {pin!r} by for_key()/on_shard() but "
        f"filters {spec.key_attname} to key(s) on {list(shards)}. Drop one of them."
    )


def _combined_primary(model: type[models.Model], query: Query, spec: ShardSpec) -> str:
    """Return the one shard every part of a union()/intersection()/difference() names."""
    found: list[str] = []
    for number, part in enumerate(query.combined_queries):
        part_spec = shard_spec(part.model) if part.model is not None else None
        primary = None
        if part_spec is not None and part_spec.group == spec.group:
            primary = _query_primary(part.model, part, part_spec)
        elif part_spec is None or part_spec.group != spec.group:
            raise ShardKeyRequired(
                f"{query.combinator}() of {model._meta.label} with "
                f"{part.model._meta.label if part.model else '?'}: they live on different "
                "databases, and one SQL query runs on one database."
            )
        if primary is None:
            primary = current_shard(spec.group)
        if primary is None:
            raise ShardKeyRequired(
                f"Cannot run the {query.combinator}() of {model._meta.label} querysets: part "
                f"{number + 1} does not name its shard in group {spec.group!r}. Give every "
                "part a shard-key filter or for_key() on the same shard, or wrap the code "
                f"in using_shard({spec.group!r}, <key>)."
            )
        found.append(primary)
    if len(set(found)) > 1:
        raise ShardKeyRequired(
            f"The {query.combinator}() of {model._meta.label} querysets combines parts on "
            f"shards {found}: one SQL query runs on one database. Run it once per shard, "
            "or fan out each part with .all_shards() and combine the rows in Python."
        )
    return found[0]


def _id_shards(node: WhereNode, group: str) -> set[str]:
    """Return the shards of the global IDs that top-level ``__in`` lookups name.

    A :class:`~.ids.ShardedIDField` value (or a foreign key to one) tells its shard; this
    is how a prefetch over rows of several shards is recognised.
    """
    found: set[str] = set()
    if node.connector != AND or node.negated:
        return found
    for child in node.children:
        if not isinstance(child, In) or not isinstance(child.lhs, Col):
            continue
        target: Any = child.lhs.target
        id_field = target if isinstance(target, ShardedIDField) else None
        if id_field is None:
            related = getattr(target, "target_field", None)
            id_field = related if isinstance(related, ShardedIDField) else None
        rhs = child.rhs
        if id_field is None or not isinstance(rhs, Iterable) or isinstance(rhs, str | bytes):
            continue
        if hasattr(rhs, "resolve_expression"):
            continue
        for value in rhs:
            if isinstance(value, int) and not isinstance(value, bool):
                try:
                    found.add(shard_of_id(group, value, js_safe=id_field.js_safe))
                except (ValueError, UnknownShard):
                    continue
    return found


_django_filter_inplace: Any = models.QuerySet._filter_or_exclude_inplace  # type: ignore[attr-defined]


class ShardedQuerySet(models.QuerySet[_M], Generic[_M]):
    """A queryset that finds the shard of a sharded model (see the module docstring)."""

    if TYPE_CHECKING:
        # Django internals the stubs leave out.
        _db: str | None
        _hints: dict[str, Any]
        _fields: tuple[str, ...]
        _for_write: bool
        _iterable_class: type[Any]
        _query: Query

        def _chain(self) -> Self: ...

    # -- choosing the shard -------------------------------------------------------------

    def _pinned(self, primary: str) -> Self:
        clone = self._chain()
        clone.query.__dict__[PIN] = primary
        return clone

    def for_key(self, key: Any) -> Self:
        """Run this query on the shard that owns shard-key value *key*.

        ``Order.objects.for_key(42).filter(status="open")``. Raises
        :class:`~.exceptions.InvalidShardKey` for ``None`` or an unsupported type.
        """
        spec = _spec_of(self.model)
        try:
            primary = spec.shard_of(key)
        except InvalidShardKey as exc:
            raise InvalidShardKey(
                f"{self.model.__name__}.objects.for_key({key!r}): not a key of "
                f"{spec.describe_key()}: {exc}"
            ) from exc
        return self._pinned(primary)

    def on_shard(self, alias: str) -> Self:
        """Run this query on shard *alias* of the model's group (reads via its replicas)."""
        spec = _spec_of(self.model)
        primary = _primary(alias)
        if primary not in spec.ring.nodes:
            raise UnknownShard(
                f"on_shard({alias!r}): not a shard of group {spec.group!r} of "
                f"{self.model._meta.label} (its shards: {list(spec.ring.nodes)})."
            )
        return self._pinned(primary)

    def for_id(self, pk: int) -> Self:
        """Filter on primary key *pk* and route to the shard the ID says made it.

        For models whose primary key is a :class:`~.ids.ShardedIDField`.
        """
        spec = _spec_of(self.model)
        pk_field = self.model._meta.pk
        if not isinstance(pk_field, ShardedIDField):
            raise TypeError(
                f"for_id(): {self.model._meta.label}'s primary key is not a ShardedIDField, "
                "so its value does not name a shard. Use for_key()."
            )
        return self.on_shard(shard_of_id(spec.group, pk, js_safe=pk_field.js_safe)).filter(pk=pk)

    def all_shards(self) -> FanoutQuerySet[_M]:
        """Return this query run on every shard of the group, merged (see ``fanout``)."""
        from django_dbscale.sharding.fanout import FanoutQuerySet

        return FanoutQuerySet(self)

    def shard_primary(self) -> str | None:
        """Return the shard primary this query is bound to, or None if only the router knows.

        Raises :class:`ShardMismatch` if ``for_key()``/``on_shard()`` and a shard-key
        filter disagree, and :class:`ShardKeyRequired` if an ``__in`` filter spans shards.
        """
        spec = shard_spec(self.model)
        if spec is None:
            return None
        return _query_primary(self.model, self.query, spec)

    def _filter_or_exclude_inplace(
        self, negate: bool, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        # Keep the shards of the shard-key filter up to date as keyword filters are added,
        # so that routing does not walk the WHERE tree (see _key_shards). On every query's
        # path: kept to a few dictionary lookups.
        query = self._query
        where = query.where
        d = query.__dict__
        before = len(where.children)
        entry = d.get(KEYS)
        _django_filter_inplace(self, negate, args, kwargs)
        if entry is None:
            if before:
                return  # unknown before: stays unknown (walked when needed)
            shards: tuple[str, ...] | None = None
        elif entry[0] != before or args or where.connector != AND:
            del d[KEYS]
            return
        else:
            shards = entry[1]
        if args:
            return
        if not negate:
            spec = _specs.get(self.model) or shard_spec(self.model)
            lookups = spec.key_lookups if spec is not None else None
            if spec is not None and lookups:
                for name, value in kwargs.items():
                    is_in = lookups.get(name)
                    if is_in is None:
                        continue
                    if not is_in and spec.int_key and type(value) is int:
                        found: Any = (spec.ring.node_for(str(value)),)
                    else:
                        found = _kwarg_shards(spec, value, is_in)
                        if found is _UNKNOWN:
                            d.pop(KEYS, None)
                            return
                        if found is None:
                            continue
                    shards = found if shards is None else _intersect(shards, found)
        d[KEYS] = (len(where.children), shards)

    def _check_using(self, db: str, query: Query, spec: ShardSpec) -> None:
        d = query.__dict__
        n = len(query.where.children)
        if d.get(CHECKED) == (db, n):
            return  # Django reads .db more than once per query
        primary = _primary(db)
        if primary in spec.ring.nodes:
            shards = _key_shards(query, spec)
            if shards and primary not in shards:
                raise ShardMismatch(
                    f"The {self.model._meta.label} query runs on {db!r} (.using()) but "
                    f"filters {spec.key_attname} to key(s) living on {list(shards)}, so it "
                    "would find nothing there. Drop .using() (the key routes the query) or "
                    f"use .using({shards[0]!r})."
                )
        # else: not a shard of the group, an escape hatch, unchecked
        d[CHECKED] = (db, n)

    @property
    def db(self) -> str:
        """Return the alias this query uses now (see the module docstring)."""
        db = self._db
        query = self.query
        spec = _specs.get(self.model) or shard_spec(self.model)
        if spec is None:
            return super().db
        if db is not None:
            if spec.key_column is not None and not query.combinator:
                self._check_using(db, query, spec)
            return db
        # The common case inline: a single-shard key filter, known from filter() kwargs.
        d = query.__dict__
        entry = d.get(KEYS)
        where = query.where
        primary: str | None = None
        if (
            entry is not None
            and entry[0] == len(where.children)
            and where.connector == AND
            and not query.combinator
        ):
            shards = entry[1]
            if shards is not None and len(shards) == 1:
                pin = d.get(PIN)
                if pin is None or pin == shards[0]:
                    primary = shards[0]
        if primary is None:
            primary = _query_primary(self.model, query, spec)
            if primary is None:
                return self._router_db(query, spec)
        if self._for_write:
            if primary not in _verified:
                verify_ring_once(primary)
            return primary
        # Where on that shard (a replica?) is the routers' decision, like every read's.
        hints = self._hints
        alias = (
            router.db_for_read(self.model, **{**hints, SHARD_HINT: primary})
            if hints
            else router.db_for_read(self.model, shard=primary)
        )
        if primary not in _verified:
            verify_ring_once(primary, alias)
        return alias

    def _router_db(self, query: Query, spec: ShardSpec) -> str:
        """Ask the routers (the row a relation starts from, using_shard), or raise."""
        instance = self._hints.get("instance")
        pinned = current_shard(spec.group) is not None
        combined = query.__dict__.get(COMBINED)
        if combined is not None and not pinned and not query.is_empty():
            connector, mine, theirs = combined
            raise ShardKeyRequired(
                f"{self.model._meta.label} querysets combined with {connector} name "
                f"different shards ({mine or 'unknown'} and {theirs or 'unknown'}), but one "
                "SQL query runs on one database: it would read one shard's rows only. Run "
                "the query per shard, or fan out each side with .all_shards() and combine "
                "the rows in Python."
            )
        if instance is not None and shard_spec(type(instance)) is not None:
            shards = _id_shards(query.where, spec.group)
            if len(shards) > 1:
                raise CrossShardRelation(
                    f"One {self.model._meta.label} query would follow relations of rows on "
                    f"shards {sorted(shards)}, but a query runs on one shard (Django's "
                    "prefetch_related_objects() queries the first row's shard only). "
                    "Prefetch per shard with django_dbscale.sharding.prefetch_by_shard(rows, "
                    "...), or fetch the rows with .all_shards().prefetch_related(...), which "
                    "prefetches on each shard."
                )
        elif not pinned and query.is_empty():
            return spec.ring.nodes[0]  # .none(): no query is made, any shard will do
        elif instance is not None and not pinned:
            # A reverse relation from an unsharded row: the router cannot know the shard.
            raise key_required(self.model, spec, "write" if self._for_write else "read")
        return super().db

    def _explicit_db(self) -> str | None:
        """Return ``_db`` unless a related manager of an unsharded row picked it.

        ``product.shard_orders.create(...)`` asks the routers for a database before the
        row exists: the answer (``default``) says nothing about the row's shard.
        """
        db = self._db
        if db is None:
            return None
        instance = self._hints.get("instance")
        if instance is not None and shard_spec(type(instance)) is None:
            spec = shard_spec(self.model)
            if spec is not None and _primary(db) not in spec.ring.nodes:
                return None
        return db

    def _without_hinted_db(self) -> Self:
        """Return self, without a ``_db`` that :meth:`_explicit_db` disregards."""
        if self._db is not None and self._explicit_db() is None:
            return self.using(None)
        return self

    # -- combining querysets ------------------------------------------------------------

    def _side_primary(self) -> str | None:
        """Return the shard this queryset would read, or None if it cannot tell."""
        spec = shard_spec(self.model)
        if spec is None:
            return None
        try:
            if self._db is not None:
                return _primary(self._db)
            primary = _query_primary(self.model, self.query, spec)
            if primary is not None:
                return primary
            instance = self._hints.get("instance")
            if instance is not None:
                return _shard_of_related(instance, spec.group, self.model)
        except ShardingError:
            return None
        return None

    def _combined(self, other: Any, combined: Any, connector: str) -> Any:
        if combined is self or combined is other or not isinstance(combined, ShardedQuerySet):
            return combined  # Django returned one side (an EmptyQuerySet was involved)
        mine = self._side_primary()
        sharded_other = isinstance(other, ShardedQuerySet)
        theirs = other._side_primary() if sharded_other else None
        d = combined.query.__dict__
        d.pop(KEYS, None)
        if connector == "&":
            # Rows must satisfy both sides: either side's shard binds the result.
            if mine is not None and theirs is not None and mine != theirs:
                raise ShardMismatch(
                    f"{self.model._meta.label} querysets of shards {mine!r} and {theirs!r} "
                    "combined with &: no row can be on both. Drop one of the shard keys."
                )
            pin = self.query.__dict__.get(PIN) or (
                other.query.__dict__.get(PIN) if sharded_other else None
            )
            if pin is not None:
                d[PIN] = pin
            other_instance = other._hints.get("instance") if sharded_other else None
            if other_instance is not None and "instance" not in combined._hints:
                combined._hints = {**combined._hints, "instance": other_instance}
            return combined
        # | and ^ take rows of both sides: one shard only if both sides name the same one.
        if mine is not None and mine == theirs:
            d[PIN] = mine
            d.pop(COMBINED, None)
            return combined
        d.pop(PIN, None)
        d[COMBINED] = (connector, mine, theirs)
        if "instance" in combined._hints:
            combined._hints = {k: v for k, v in combined._hints.items() if k != "instance"}
        if combined._db is not None and theirs is not None and _primary(combined._db) != theirs:
            raise ShardMismatch(
                f"{self.model._meta.label} queryset on {combined._db!r} combined with "
                f"{connector} with one on shard {theirs!r}: the result would read one shard."
            )
        return combined

    def __and__(self, other: Any) -> Self:
        return self._combined(other, super().__and__(other), "&")  # type: ignore[no-any-return]

    def __or__(self, other: Any) -> Self:
        return self._combined(other, super().__or__(other), "|")  # type: ignore[no-any-return]

    def __xor__(self, other: Any) -> Self:
        return self._combined(other, super().__xor__(other), "^")  # type: ignore[no-any-return]

    # -- loading -----------------------------------------------------------------------

    def only(self, *fields: Any) -> Self:
        """As Django's, but the shard key is always loaded (to refuse changing it)."""
        spec = shard_spec(self.model)
        if fields and fields != (None,) and spec is not None and spec.key_field is not None:
            field = spec.key_field
            if field.name not in fields and field.attname not in fields:
                fields = (*fields, field.name)
        return super().only(*fields)

    def defer(self, *fields: Any) -> Self:
        """As Django's, but the shard key is never deferred (to refuse changing it)."""
        spec = shard_spec(self.model)
        if spec is not None and spec.key_field is not None and fields != (None,):
            names = {spec.key_field.name, spec.key_field.attname}
            fields = tuple(f for f in fields if f not in names)
        return super().defer(*fields)

    # -- writes ------------------------------------------------------------------------

    def _routed_by(self, lookups: Mapping[str, Any]) -> Self:
        """Return self bound to the shard the *lookups* name (get_or_create and friends)."""
        if self._explicit_db() is not None or self.query.__dict__.get(PIN) is not None:
            return self
        spec = _spec_of(self.model)
        shards: tuple[str, ...] | None = None
        for name, value in lookups.items():
            is_in = spec.key_lookups.get(name)
            if is_in is not None:
                found = _kwarg_shards(spec, value, is_in)
                if found is not None and found is not _UNKNOWN:
                    shards = _intersect(shards, found)
        clone = self._without_hinted_db()
        if shards is not None and len(shards) == 1:
            return clone._pinned(shards[0])
        return clone

    def create(self, **kwargs: Any) -> _M:
        """Create a row on the shard its key maps to (refused if the key is missing)."""
        if self._explicit_db() is not None or self.query.__dict__.get(PIN) is not None:
            return super().create(**kwargs)
        obj = self.model(**kwargs)
        self._for_write = True
        # Django would pass using=self.db, asked before the row (and its key) exists.
        obj.save(force_insert=True)
        return obj

    def _check_not_key(self, fields: Iterable[str], action: str) -> None:
        spec = _spec_of(self.model)
        assert spec.key_field is not None
        names = {spec.key_field.name, spec.key_field.attname}
        if names.intersection(fields):
            raise ShardKeyChanged(
                f"{action} cannot change {spec.describe_key()}, the shard key of group "
                f"{spec.group!r}: it would leave rows on the wrong shard. Create new rows "
                "with the new key and delete the old ones."
            )

    def update(self, **kwargs: Any) -> int:
        """Update rows on the query's shard; the shard key itself can never be updated."""
        self._check_not_key(kwargs, "update()")
        with refusals_as_shard_moved():
            return super().update(**kwargs)

    def delete(self) -> tuple[int, dict[str, int]]:
        """Delete the rows; a shard that refuses moved keys raises :class:`ShardMoved`."""
        with refusals_as_shard_moved():
            return super().delete()

    delete.alters_data = True  # type: ignore[attr-defined]
    delete.queryset_only = True  # type: ignore[attr-defined]

    def bulk_create(self, objs: Iterable[_M], *args: Any, **kwargs: Any) -> list[_M]:
        """Insert *objs*, each on its key's shard (one ``bulk_create`` per shard).

        Every key is checked before the first insert. Rows of different shards are
        inserted in separate transactions: a failure on one shard does not undo another.
        """
        objs = list(objs)
        spec = _spec_of(self.model)
        target = self._explicit_db() or self.query.__dict__.get(PIN)
        if target is not None:
            for obj in objs:
                check_write_target(obj, str(target))
            created = models.QuerySet.bulk_create(self._without_hinted_db(), objs, *args, **kwargs)
            _remember_keys(objs, spec)
            return created
        by_shard: dict[str, list[_M]] = defaultdict(list)
        for obj in objs:
            shard = shard_for_instance(obj, spec)
            check_write_target(obj, shard)
            by_shard[shard].append(obj)
        for shard in spec.ring.nodes:
            rows = by_shard.get(shard)
            if rows:
                verify_ring_once(shard)
                models.QuerySet.bulk_create(self.using(shard), rows, *args, **kwargs)
                _remember_keys(rows, spec)
        return objs

    def bulk_update(
        self, objs: Iterable[_M], fields: Iterable[str], batch_size: int | None = None
    ) -> int:
        """Update *fields* of *objs*, one ``bulk_update`` per shard; never the shard key.

        Each row must still be on its key's shard with its key unchanged (as for
        ``save()``); with ``.using()``/``for_key()`` every row must belong to that shard.
        """
        fields = list(fields)
        self._check_not_key(fields, "bulk_update()")
        objs = list(objs)
        spec = _spec_of(self.model)
        target = self._explicit_db() or self.query.__dict__.get(PIN)
        if target is not None:
            for obj in objs:
                check_write_target(obj, str(target))
            return models.QuerySet.bulk_update(self._without_hinted_db(), objs, fields, batch_size)
        by_shard: dict[str, list[_M]] = defaultdict(list)
        for obj in objs:
            by_shard[check_write_target(obj, shard_for_instance(obj, spec))].append(obj)
        return sum(
            models.QuerySet.bulk_update(self.using(shard), by_shard[shard], fields, batch_size)
            for shard in spec.ring.nodes
            if by_shard.get(shard)
        )

    def get_or_create(
        self, defaults: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> tuple[_M, bool]:
        """``get_or_create`` on the shard named by the shard key among *kwargs*."""
        return models.QuerySet.get_or_create(self._routed_by(kwargs), defaults, **kwargs)

    def update_or_create(
        self,
        defaults: Mapping[str, Any] | None = None,
        create_defaults: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> tuple[_M, bool]:
        """``update_or_create`` on the shard named by the shard key among *kwargs*."""
        if defaults:
            self._check_not_key(defaults, "update_or_create(defaults=...)")
        return models.QuerySet.update_or_create(
            self._routed_by(kwargs), defaults, create_defaults, **kwargs
        )


def _remember_keys(objs: Iterable[models.Model], spec: ShardSpec) -> None:
    attname = spec.key_attname
    if attname is None:
        return
    for obj in objs:
        d = obj.__dict__
        if attname in d:
            d["_dbscale_loaded_key"] = d[attname]


class ShardedManager(models.Manager.from_queryset(ShardedQuerySet)):  # type: ignore[misc]
    """The default manager of sharded models: every queryset method, on ShardedQuerySet.

    Built with ``from_queryset`` so that the queryset's own methods (``for_key``,
    ``on_shard``, ``for_id``, ``all_shards``) are on the manager too, and type checkers
    see ``Model.objects.filter(...)`` as a :class:`ShardedQuerySet`.
    """


class ShardedModel(models.Model):
    """Abstract base of sharded models: set ``shard_group`` and ``shard_key`` on the class.

    ``shard_group`` names a group of ``DBSCALE["SHARD_GROUPS"]``; ``shard_key`` names the
    concrete field (or foreign key) whose value picks the shard. Saving with the key unset,
    saving on another shard than the key's, or changing the key of a stored row raises
    before anything is written. Give the model a :class:`~.ids.ShardedIDField` primary
    key (auto-increment keys are refused by check ``dbscale.E102``).

    ``_base_manager`` (used by Django for related objects, ``refresh_from_db()`` and
    deletion) is an unfiltered :class:`ShardedManager` too, so it routes like
    ``objects``.
    """

    shard_group: ClassVar[str]
    shard_key: ClassVar[str]
    _dbscale_sharded: ClassVar[bool] = True

    objects = ShardedManager()
    _dbscale_base_manager = ShardedManager()

    class Meta:
        abstract = True
        base_manager_name = "_dbscale_base_manager"

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Save on the key's shard.

        A shard that refuses the write because a resharding moved the key away (this
        process had not re-read the shard map yet) raises :class:`ShardMoved`, except for
        an insert outside any transaction, which is retried once on the new shard.
        """
        try:
            super().save(*args, **kwargs)
        except DatabaseError as exc:
            moved = shard_moved_from(exc)
            if moved is None:
                raise
            explicit = kwargs.get("using") or (args[2] if len(args) > 2 else None)
            retry = (
                self._state.adding
                and explicit is None
                and not any(c.in_atomic_block for c in connections.all(initialized_only=True))
            )
            if not retry:
                raise moved from exc
            with refusals_as_shard_moved():  # a cutover still under way: the caller retries
                super().save(*args, **kwargs)

    save.alters_data = True  # type: ignore[attr-defined]

    @classmethod
    def from_db(cls, db: str | None, field_names: Any, values: Any, **kwargs: Any) -> Self:
        instance = super().from_db(db, field_names, values, **kwargs)
        spec = shard_spec(cls)
        if spec is not None:
            attname = spec.key_attname
            d = instance.__dict__
            if attname is not None and attname in d:
                # Remembered to refuse a later change of the key (see check_write_target).
                d["_dbscale_loaded_key"] = d[attname]
        return instance

    def refresh_from_db(
        self,
        using: str | None = None,
        fields: Iterable[str] | None = None,
        from_queryset: models.QuerySet[Any] | None = None,
    ) -> None:
        """Reload from the database; the reloaded key becomes the key the row was read with."""
        fields = list(fields) if fields is not None else None
        super().refresh_from_db(using, fields, from_queryset)
        spec = shard_spec(type(self))
        if spec is None or spec.key_field is None or spec.key_attname is None:
            return
        refreshed = fields is None or spec.key_field.name in fields or spec.key_attname in fields
        if refreshed and spec.key_attname in self.__dict__:
            self.__dict__["_dbscale_loaded_key"] = self.__dict__[spec.key_attname]

    def delete(
        self, using: str | None = None, keep_parents: bool = False
    ) -> tuple[int, dict[str, int]]:
        """Delete the row from its shard (refused if its shard key was changed)."""
        using = using or router.db_for_write(self.__class__, instance=self)
        check_write_target(self, using, deleting=True)
        with refusals_as_shard_moved():
            return super().delete(using=using, keep_parents=keep_parents)

    @property
    def shard_alias(self) -> str:
        """The primary alias of the shard this row belongs on (from its key)."""
        return shard_for_instance(self)

    def _own_shard(self) -> AbstractContextManager[Any]:
        spec = shard_spec(type(self))
        if spec is None or spec.key_attname is None:
            return nullcontext()
        value = getattr(self, spec.key_attname)
        if value is None:
            return nullcontext()
        return using_shard(spec.group, shard=spec.shard_of(value))

    def validate_unique(self, exclude: Any = None) -> None:
        """Check unique fields on this row's shard (uniqueness is enforced per shard).

        Django looks for duplicates with ``_default_manager.filter(<unique fields>)``,
        which names no shard unless the key is among the fields: the row's shard is pinned
        for the check. (``validate_constraints()`` needs no help: Django runs it on
        ``router.db_for_write(instance=self)``, the row's shard.)
        """
        with self._own_shard():
            super().validate_unique(exclude)


@receiver(pre_save, dispatch_uid="django_dbscale.sharding.check_write_target")
def _refuse_misplaced_save(
    sender: type[models.Model], instance: models.Model, raw: bool, using: str, **kwargs: Any
) -> None:
    """Refuse a save that would misplace a sharded row, before anything is written.

    A signal rather than a ``save_base()`` override: ``loaddata`` (``DeserializedObject``)
    calls ``Model.save_base`` directly, bypassing overrides, but still sends ``pre_save``.
    """
    spec = shard_spec(sender)
    if spec is None or spec.key_attname is None:
        return
    try:
        check_write_target(instance, using)
    except ShardMismatch as exc:
        if not raw:
            raise
        raise ShardMismatch(
            f"{exc} (loaddata writes every object of a fixture to its --database: split "
            "fixtures of sharded models per shard, e.g. dumpdata --database <shard>.)"
        ) from None


@receiver(post_save, dispatch_uid="django_dbscale.sharding.remember_key")
def _remember_saved_key(sender: type[models.Model], instance: models.Model, **kwargs: Any) -> None:
    spec = shard_spec(sender)
    if spec is not None and spec.key_attname is not None:
        _remember_keys((instance,), spec)


def prefetch_by_shard(instances: Iterable[models.Model], *lookups: Any) -> None:
    """Run ``prefetch_related_objects(instances, *lookups)`` once per shard of the rows.

    Django prefetches with one query on the first row's database; rows read from several
    shards (a fan-out, or rows gathered by hand) must be prefetched shard by shard.
    Rows of unsharded models are prefetched together.
    """
    groups: dict[str | None, list[models.Model]] = {}
    for obj in instances:
        db = obj._state.db
        groups.setdefault(_primary(db) if db is not None else None, []).append(obj)
    for rows in groups.values():
        prefetch_related_objects(rows, *lookups)
