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

1. ``.using(alias)``: that alias, unchecked (an escape hatch);
2. ``.for_key(key)`` / ``.on_shard(alias)``;
3. an equality (or single-shard ``__in``) filter on the shard-key field in the query's
   top-level ``AND`` (``filter(customer_id=42)``, ``filter(customer=c)``, ``get(...)``,
   related managers ``customer.orders.all()``); 2 and 3 must agree or
   :class:`~.exceptions.ShardMismatch` is raised;
4. the router: the row a relation starts from, then :func:`~.context.using_shard`;
5. otherwise :class:`~.exceptions.ShardKeyRequired`. Nothing ever falls through to
   ``default``.

Reads go through :func:`django_dbscale.replicas.read_alias` of the shard primary (its
replicas, with the lag budget and read-your-writes); writes go to the shard primary.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeVar, cast

from django.db import models, router
from django.db.models.expressions import Col
from django.db.models.lookups import Exact, In
from django.db.models.sql.query import Query
from django.db.models.sql.where import AND, WhereNode

from django_dbscale import replicas
from django_dbscale.conf import dbscale_settings
from django_dbscale.sharding.context import current_shard, using_shard
from django_dbscale.sharding.exceptions import (
    ShardKeyChanged,
    ShardKeyRequired,
    ShardMismatch,
    UnknownShardGroup,
)
from django_dbscale.sharding.ids import ShardedIDField, shard_of_id
from django_dbscale.sharding.ring import get_ring
from django_dbscale.sharding.routing import (
    ShardSpec,
    check_write_target,
    key_required,
    shard_for_instance,
    shard_spec,
)

if TYPE_CHECKING:
    from django_dbscale.sharding.fanout import FanoutQuerySet

__all__ = ["ShardedManager", "ShardedModel", "ShardedQuerySet", "key_shards_in_query"]

_M = TypeVar("_M", bound=models.Model)


def _spec_of(model: type[models.Model]) -> ShardSpec:
    spec = shard_spec(model)
    if spec is None or spec.key_field is None:
        raise TypeError(f"{model._meta.label} is not a sharded model (see ShardedModel).")
    return spec


def _find_key_values(node: WhereNode, column: str | None, alias: str | None) -> list[Any] | None:
    """Return the values an ``AND``-ed equality/``__in`` on *column* allows, or None."""
    if node.connector != AND or node.negated:
        return None
    for child in node.children:
        if isinstance(child, WhereNode):
            found = _find_key_values(child, column, alias)
            if found is not None:
                return found
            continue
        if not isinstance(child, Exact | In):
            continue
        lhs = child.lhs
        if not isinstance(lhs, Col) or lhs.alias != alias or lhs.target.column != column:
            continue
        rhs = child.rhs
        if hasattr(rhs, "resolve_expression") or isinstance(rhs, Query):
            continue
        if isinstance(child, In):
            return [v for v in rhs if v is not None]
        return [rhs]
    return None


def key_shards_in_query(query: Query, spec: ShardSpec) -> list[str] | None:
    """Return the shard primaries the query's shard-key filter allows (None: no filter).

    Only conditions that constrain every row are used: shard-key equality or ``__in`` on
    the model's own table inside the top-level ``AND`` (not under ``OR`` or ``NOT``).
    """
    if spec.key_field is None or not query.where.children:
        return None
    values = _find_key_values(query.where, spec.key_field.column, query.base_table)
    if values is None:
        return None
    ring = get_ring(spec.group)
    shards: list[str] = []
    for value in values:
        shard = ring.node_for(spec.ring_key(value))
        if shard not in shards:
            shards.append(shard)
    return shards


class ShardedQuerySet(models.QuerySet[_M], Generic[_M]):
    """A queryset that finds the shard of a sharded model (see the module docstring)."""

    if TYPE_CHECKING:
        # Django internals the stubs leave out.
        _db: str | None
        _hints: dict[str, Any]
        _fields: tuple[str, ...]
        _for_write: bool
        _iterable_class: type[Any]

        def _chain(self) -> Self: ...

    def __init__(
        self,
        model: type[_M] | None = None,
        query: Query | None = None,
        using: str | None = None,
        hints: dict[str, models.Model] | None = None,
    ) -> None:
        super().__init__(model, query, using, hints)
        self._dbscale_primary: str | None = None

    def _clone(self) -> Self:
        clone = cast(Self, cast(Any, super())._clone())
        clone._dbscale_primary = self._dbscale_primary
        return clone

    # -- choosing the shard -------------------------------------------------------------

    def for_key(self, key: Any) -> ShardedQuerySet[_M]:
        """Run this query on the shard that owns shard-key value *key*.

        ``Order.objects.for_key(42).filter(status="open")``. Raises
        :class:`~.exceptions.InvalidShardKey` for ``None`` or an unsupported type.
        """
        spec = _spec_of(self.model)
        clone = self._chain()
        clone._dbscale_primary = get_ring(spec.group).node_for(spec.ring_key(key))
        return clone

    def on_shard(self, alias: str) -> ShardedQuerySet[_M]:
        """Run this query on shard *alias* of the model's group (reads via its replicas)."""
        spec = _spec_of(self.model)
        ring = get_ring(spec.group)
        primary = dbscale_settings.primary_of.get(alias, alias)
        if primary not in ring.nodes:
            raise UnknownShardGroup(
                f"on_shard({alias!r}): not a shard of group {spec.group!r} of "
                f"{self.model._meta.label} (its shards: {list(ring.nodes)})."
            )
        clone = self._chain()
        clone._dbscale_primary = primary
        return clone

    def for_id(self, pk: int) -> ShardedQuerySet[_M]:
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
        explicit = self._dbscale_primary
        shards = key_shards_in_query(self.query, spec)
        if shards is None:
            return explicit
        if explicit is not None:
            if shards and shards != [explicit]:
                raise ShardMismatch(
                    f"{self.model._meta.label} query is bound to shard {explicit!r} by "
                    f"for_key()/on_shard() but filters {spec.key_field.attname if spec.key_field else '?'} "  # noqa: E501
                    f"to key(s) on {shards}. Drop one of them."
                )
            return explicit
        if len(shards) > 1:
            raise ShardKeyRequired(
                f"The {self.model._meta.label} query filters its shard key on keys living "
                f"on several shards {shards}. Use .all_shards() to query them all, or "
                "split the keys per shard."
            )
        if not shards:
            # An empty __in matches nothing anywhere; Django answers it without a query.
            return get_ring(spec.group).nodes[0]
        return shards[0]

    @property
    def db(self) -> str:
        """Return the alias this query uses now (see the module docstring)."""
        if self._db is not None:
            return self._db
        primary = self.shard_primary()
        if primary is None:
            spec = shard_spec(self.model)
            instance = self._hints.get("instance")
            if (
                spec is not None
                and instance is not None
                and shard_spec(type(instance)) is None
                and current_shard(spec.group) is None
            ):
                # A reverse relation from an unsharded row: the router cannot know the shard.
                raise key_required(self.model, spec, "read" if not self._for_write else "write")
            return super().db
        if self._for_write:
            return primary
        return replicas.read_alias(primary)

    # -- writes ------------------------------------------------------------------------

    def _routed_by(self, lookups: Mapping[str, Any]) -> ShardedQuerySet[_M]:
        """Return self bound to the shard the *lookups* name (get_or_create and friends)."""
        if self._db is not None or self._dbscale_primary is not None:
            return self
        spec = _spec_of(self.model)
        shards = key_shards_in_query(self.filter(**lookups).query, spec)
        if shards and len(shards) == 1:
            clone = self._chain()
            clone._dbscale_primary = shards[0]
            return clone
        return self

    def create(self, **kwargs: Any) -> _M:
        """Create a row on the shard its key maps to (refused if the key is missing)."""
        if self._db is not None or self._dbscale_primary is not None:
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
        return super().update(**kwargs)

    def bulk_create(self, objs: Iterable[_M], *args: Any, **kwargs: Any) -> list[_M]:
        """Insert *objs*, each on its key's shard (one ``bulk_create`` per shard).

        Every key is checked before the first insert. Rows of different shards are
        inserted in separate transactions: a failure on one shard does not undo another.
        """
        objs = list(objs)
        spec = _spec_of(self.model)
        if self._db is not None or self._dbscale_primary is not None:
            target = self._db or self._dbscale_primary
            for obj in objs:
                check_write_target(obj, str(target))
            return super().bulk_create(objs, *args, **kwargs)
        by_shard: dict[str, list[_M]] = defaultdict(list)
        for obj in objs:
            by_shard[shard_for_instance(obj, spec)].append(obj)
        for shard in get_ring(spec.group).nodes:
            if by_shard.get(shard):
                models.QuerySet.bulk_create(self.using(shard), by_shard[shard], *args, **kwargs)
        return objs

    def bulk_update(
        self, objs: Iterable[_M], fields: Iterable[str], batch_size: int | None = None
    ) -> int:
        """Update *fields* of *objs*, one ``bulk_update`` per shard; never the shard key."""
        fields = list(fields)
        self._check_not_key(fields, "bulk_update()")
        objs = list(objs)
        spec = _spec_of(self.model)
        if self._db is not None or self._dbscale_primary is not None:
            return super().bulk_update(objs, fields, batch_size)
        by_shard: dict[str, list[_M]] = defaultdict(list)
        for obj in objs:
            by_shard[check_write_target(obj, shard_for_instance(obj, spec))].append(obj)
        return sum(
            models.QuerySet.bulk_update(self.using(shard), by_shard[shard], fields, batch_size)
            for shard in get_ring(spec.group).nodes
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
    """

    shard_group: ClassVar[str]
    shard_key: ClassVar[str]
    _dbscale_sharded: ClassVar[bool] = True

    objects = ShardedManager()

    class Meta:
        abstract = True

    @classmethod
    def from_db(cls, db: str | None, field_names: Any, values: Any, **kwargs: Any) -> Self:
        instance = super().from_db(db, field_names, values, **kwargs)
        spec = shard_spec(cls)
        if spec is not None and spec.key_attname is not None:
            # Remembered to refuse a later change of the key (see check_write_target).
            instance._dbscale_loaded_key = instance.__dict__.get(spec.key_attname)
        return instance

    @property
    def shard_alias(self) -> str:
        """The primary alias of the shard this row belongs on (from its key)."""
        return shard_for_instance(self)

    def save_base(
        self,
        raw: bool = False,
        force_insert: Any = False,
        force_update: bool = False,
        using: str | None = None,
        update_fields: Iterable[str] | None = None,
    ) -> None:
        using = using or router.db_for_write(self.__class__, instance=self)
        check_write_target(self, using)
        super().save_base(
            raw=raw,
            force_insert=force_insert,
            force_update=force_update,
            using=using,
            update_fields=update_fields,
        )
        spec = shard_spec(type(self))
        if spec is not None and spec.key_attname is not None:
            self._dbscale_loaded_key = getattr(self, spec.key_attname)

    def delete(
        self, using: str | None = None, keep_parents: bool = False
    ) -> tuple[int, dict[str, int]]:
        """Delete the row from its shard (refused if its shard key was changed)."""
        using = using or router.db_for_write(self.__class__, instance=self)
        check_write_target(self, using, deleting=True)
        return super().delete(using=using, keep_parents=keep_parents)

    def _own_shard(self) -> AbstractContextManager[Any]:
        spec = shard_spec(type(self))
        if spec is None or spec.key_attname is None:
            return nullcontext()
        value = getattr(self, spec.key_attname)
        return nullcontext() if value is None else using_shard(spec.group, value)

    def validate_unique(self, exclude: Any = None) -> None:
        """Check unique fields on this row's shard (uniqueness is enforced per shard)."""
        with self._own_shard():
            super().validate_unique(exclude)

    def validate_constraints(self, exclude: Any = None) -> None:
        """Check constraints on this row's shard (constraints are enforced per shard)."""
        with self._own_shard():
            super().validate_constraints(exclude)
