"""Where a sharded model's rows live: the functions behind ``routers.ShardRouter``.

A model is *sharded* when it subclasses :class:`~django_dbscale.sharding.models.ShardedModel`
(or is the auto-created many-to-many table of one). Its rows live on the shard of its group
whose ring owns the row's shard-key value. These functions answer Django's router questions
for such models and return ``None`` ("no opinion") for every other model, except where an
unsharded model is reached *from* a sharded row (see :func:`primary_for_read`).

The first time a process routes to a shard (after each settings change), the shard's ring
stamp is compared with the configured ring (:func:`~.ids.verify_ring_once`): a populated
shard placed under another ring raises :class:`~.exceptions.RingChangeRefused` instead of
misrouting.

All functions here are stateless and cheap: the ring lookup is one md5 and a binary search;
per-model metadata is cached by class.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from django.apps import apps as live_apps
from django.db import DEFAULT_DB_ALIAS, DatabaseError
from django.db.models import Field, Model

from django_dbscale.conf import dbscale_settings
from django_dbscale.sharding import keys, shardmap
from django_dbscale.sharding.context import current_shard
from django_dbscale.sharding.exceptions import (
    CrossShardRelation,
    ShardDeclarationError,
    ShardKeyChanged,
    ShardKeyMissing,
    ShardKeyRequired,
    ShardMismatch,
    ShardMoved,
)
from django_dbscale.sharding.ids import ShardedIDField, verify_ring_once
from django_dbscale.sharding.ring import ShardRing, get_ring

__all__ = [
    "ShardSpec",
    "allow_migrate",
    "allow_relation",
    "check_write_target",
    "is_sharded",
    "key_required",
    "primary_for_read",
    "primary_for_write",
    "shard_for_instance",
    "refusals_as_shard_moved",
    "shard_moved_from",
    "shard_spec",
]


class ShardSpec:
    """How one model is sharded.

    ``key_field`` is the concrete shard-key field (``None`` for an auto-created
    many-to-many table, whose rows follow the model that declares the relation: ``owner``).
    Everything routing reads on every query is precomputed here: the key's attribute name
    and column, the ``filter()`` keyword names that constrain the key (``key_lookups``,
    name -> whether it is an ``__in``). The ring is looked up on each use (a dict lookup):
    the shard map may change it at any moment.
    """

    __slots__ = (
        "_target_attname",
        "group",
        "int_key",
        "key_attname",
        "key_column",
        "key_field",
        "key_lookups",
        "model",
        "owner",
    )

    def __init__(
        self,
        model: type[Model],
        group: str,
        key_field: Field[Any, Any] | None,
        owner: type[Model],
        int_key: bool = False,
    ) -> None:
        self.model = model
        self.group = group
        self.key_field = key_field
        self.owner = owner
        self.int_key = int_key  # the key is stored as an integer: ints need no to_python()
        #: The attribute holding the raw key value (``customer_id`` for a foreign key).
        self.key_attname: str | None = None if key_field is None else key_field.attname
        self.key_column: str | None = None if key_field is None else key_field.column
        self.key_lookups: dict[str, bool] = _key_lookups(key_field)
        target = getattr(key_field, "target_field", None) if key_field is not None else None
        self._target_attname: str | None = None
        if key_field is not None and key_field.is_relation and target is not None:
            self._target_attname = str(target.attname)

    def __repr__(self) -> str:
        return f"<ShardSpec {self.model._meta.label} group={self.group!r} key={self.key_attname}>"

    @property
    def ring(self) -> ShardRing:
        """The active ring of the model's group (the shard map's, else the settings')."""
        return get_ring(self.group)

    def ring_key(self, value: Any) -> str:
        """Return the canonical ring string of a key *value* of this model."""
        if self.int_key and type(value) is int:
            return str(value)
        if self._target_attname is not None and isinstance(value, Model):
            # A related row stands for the value the foreign key stores (its to_field).
            value = getattr(value, self._target_attname)
        return keys.ring_key(value, field=self.key_field)

    def shard_of(self, value: Any) -> str:
        """Return the shard primary alias owning key *value*."""
        return self.ring.node_for(self.ring_key(value))

    def describe_key(self) -> str:
        """Return ``Model.field`` for messages."""
        field = self.key_field.name if self.key_field is not None else "?"
        return f"{self.model.__name__}.{field}"


def _key_lookups(field: Field[Any, Any] | None) -> dict[str, bool]:
    """Return the ``filter()`` keywords that compare the key column (name -> is ``__in``)."""
    if field is None:
        return {}
    bases = {field.name, field.attname}
    if field.primary_key:
        bases.add("pk")
    target = getattr(field, "target_field", None) if field.is_relation else None
    if target is not None:
        # customer__id=42 compares the local customer_id column: Django trims the join.
        bases.add(f"{field.name}__{target.name}")
        if target.primary_key:
            bases.add(f"{field.name}__pk")
    lookups: dict[str, bool] = {}
    for base in bases:
        lookups[base] = False
        lookups[f"{base}__exact"] = False
        lookups[f"{base}__in"] = True
    return lookups


_specs: dict[type[Model], ShardSpec | None] = {}
_INT_TYPES = frozenset(
    {
        "AutoField",
        "BigAutoField",
        "SmallAutoField",
        "IntegerField",
        "BigIntegerField",
        "SmallIntegerField",
        "PositiveIntegerField",
        "PositiveBigIntegerField",
        "PositiveSmallIntegerField",
    }
)


def _build_spec(model: type[Model]) -> ShardSpec | None:
    meta = model._meta
    if meta.abstract:
        return None
    owner = meta.auto_created
    if isinstance(owner, type) and owner is not model and issubclass(owner, Model):
        owner_spec = shard_spec(owner)
        if owner_spec is None:
            return None
        return ShardSpec(model, owner_spec.group, None, owner)
    if not getattr(model, "_dbscale_sharded", False):
        return None
    group = getattr(model, "shard_group", None)
    key_name = getattr(model, "shard_key", None)
    if not isinstance(group, str) or not isinstance(key_name, str):
        # The system checks (dbscale.E106) explain this; routing refuses to guess.
        raise ShardDeclarationError(
            f"{meta.label} subclasses ShardedModel but does not set both shard_group and "
            "shard_key as strings. Declare e.g. shard_group = 'customers' and "
            "shard_key = 'customer_id' on the class."
        )
    try:
        field = meta.get_field(key_name)
    except Exception as exc:
        raise ShardDeclarationError(
            f"{meta.label}.shard_key = {key_name!r} is not a field of the model. Name a "
            "concrete field (or a foreign key) holding the shard key."
        ) from exc
    if not getattr(field, "concrete", False) or getattr(field, "many_to_many", False):
        raise ShardDeclarationError(
            f"{meta.label}.shard_key = {key_name!r} must be a concrete field or foreign key."
        )
    target = getattr(field, "target_field", None) if field.is_relation else field
    internal = target.get_internal_type() if target is not None else ""
    int_key = internal in _INT_TYPES
    return ShardSpec(model, group, field, model, int_key)  # type: ignore[arg-type]


def shard_spec(model: type[Model]) -> ShardSpec | None:
    """Return how *model* is sharded, or ``None`` if it is not sharded (cached per class)."""
    try:
        return _specs[model]
    except KeyError:
        spec = _specs[model] = _build_spec(model)
        return spec


def is_sharded(model: type[Model]) -> bool:
    """Return whether *model* (a class) is sharded."""
    return shard_spec(model) is not None


def _primary(alias: str | None) -> str | None:
    if alias is None:
        return None
    return dbscale_settings.primary_of.get(alias, alias)


def shard_for_instance(instance: Model, spec: ShardSpec | None = None) -> str:
    """Return the shard primary alias owning *instance*, from its shard-key value.

    Raises :class:`ShardKeyMissing` when the key is ``None``.
    """
    spec = spec or shard_spec(type(instance))
    if spec is None or spec.key_attname is None:
        raise TypeError(f"{type(instance).__name__} is not a sharded model with a shard key.")
    value = getattr(instance, spec.key_attname)
    if value is None:
        raise ShardKeyMissing(
            f"{spec.describe_key()} is None on {instance!r}, so it has no shard in group "
            f"{spec.group!r}. Set {spec.key_field.name if spec.key_field else '?'} before "
            "saving, deleting or following relations."
        )
    return spec.shard_of(value)


def _is_shard(alias: str, group: str) -> bool:
    """Return whether *alias* is (or was) a shard of *group*: in its settings or its ring."""
    spec = dbscale_settings.shard_groups.get(group)
    return alias in get_ring(group).nodes or (spec is not None and alias in spec.shards)


def shard_moved_from(exc: BaseException) -> ShardMoved | None:
    """Return a :class:`ShardMoved` if *exc* is a shard's refusal of a moved key, else None.

    The refusal comes from the guard a resharding leaves on the old shard (SQLSTATE
    ``DBSM1``); the shard map is re-read at once so the next attempt routes to the new shard.
    """
    from django_dbscale.sharding import moves

    cause: BaseException | None = exc
    while cause is not None and getattr(cause, "sqlstate", None) != moves.MOVED_SQLSTATE:
        cause = cause.__cause__
    if cause is None:
        return None
    shardmap.refresh()
    detail = str(getattr(getattr(cause, "diag", None), "message_primary", "") or cause)
    return ShardMoved(
        f"{detail.removeprefix('dbscale: ')}. The shard map was re-read: re-read the row "
        "and write it again (the key's new shard serves it)."
    )


@contextmanager
def refusals_as_shard_moved() -> Iterator[None]:
    """Raise :class:`ShardMoved` for a shard's refusal of a moved key inside the block.

    Any other database error propagates unchanged. The map is re-read on a refusal (see
    :func:`shard_moved_from`).
    """
    try:
        yield
    except DatabaseError as exc:
        moved = shard_moved_from(exc)
        if moved is None:
            raise
        raise moved from exc


def _shard_of_related(instance: Model, group: str, model: type[Model]) -> str | None:
    """Return the shard a related *instance* lives on, or None if it cannot tell.

    A row read from the database is where ``_state.db`` says (a replica maps to its
    primary); an unsaved row is where its key maps.
    """
    ispec = shard_spec(type(instance))
    if ispec is None:
        return None
    if ispec.group != group:
        raise CrossShardRelation(
            f"{type(instance).__name__} (shard group {ispec.group!r}) and "
            f"{model.__name__} (shard group {group!r}) live in different shard groups, so "
            "no relation between them can be followed. Keep related sharded models in one "
            "group (same shard_group and key)."
        )
    ring = ispec.ring
    if not instance._state.adding:
        db = _primary(instance._state.db)
        if db in ring.nodes:
            return db
    attname = ispec.key_attname
    if attname is None:
        return None
    value = instance.__dict__.get(attname)
    if value is None:
        return None
    return ring.node_for(ispec.ring_key(value))


def _link_field_name(spec: ShardSpec) -> str:
    for field in spec.owner._meta.many_to_many:
        if getattr(field.remote_field, "through", None) is spec.model:
            return f"{spec.owner.__name__}.{field.name}"
    return spec.owner.__name__


def key_required(model: type[Model], spec: ShardSpec, action: str) -> ShardKeyRequired:
    """Return the :class:`ShardKeyRequired` for an unroutable *action* on *model*."""
    pin = f"using_shard({spec.group!r}, <key>) or using_shard({spec.group!r}, shard=<alias>)"
    if spec.key_field is None:
        # An auto-created many-to-many table: no key column, no ShardedManager.
        link = _link_field_name(spec)
        return ShardKeyRequired(
            f"Cannot {action} {model._meta.label}, the link table of {link}, without knowing "
            f"its shard in group {spec.group!r}: its rows live with the {spec.owner.__name__} "
            f"rows they link. Go through the relation from a row (e.g. "
            f"obj.{link.rsplit('.', 1)[-1]}.all()), or wrap the code in {pin}."
        )
    key = spec.key_field.name
    attname = spec.key_attname or key
    ways = [
        f"filter on {attname}=<value> (equality or __in on one shard)",
        f"wrap the code in {pin}",
    ]
    manager = model._default_manager
    if hasattr(manager, "for_key"):
        ways.insert(0, f"use {model.__name__}.{manager.name}.for_key(<{key}>)")
        ways.append(".all_shards() to query every shard explicitly")
    else:
        ways.append(
            f"give {model.__name__} a ShardedManager (its default manager {manager.name!r} "
            "has no for_key()/all_shards(): dbscale.W102)"
        )
    text = "; ".join(ways[:-1]) + f"; or {ways[-1]}."
    return ShardKeyRequired(
        f"Cannot {action} {model._meta.label} without knowing its shard in group "
        f"{spec.group!r}. {text[0].upper()}{text[1:]}"
    )


#: Router hint naming the shard primary a sharded queryset's key filter maps to: the
#: queryset computes it, and asks the routers (the one decision point) where to read it.
SHARD_HINT = "shard"


def primary_for_read(model: type[Model], hints: dict[str, Any]) -> str | None:
    """Return the shard primary a read of *model* must use, or ``None`` if not sharded.

    In order: ``hints["shard"]`` (set by sharded querysets and fan-out, which map the key
    themselves); the shard of ``hints["instance"]`` when following a relation from a row of
    the same group; else the :func:`~.context.using_shard` pin of the model's group; else
    :class:`ShardKeyRequired` (never ``default``), except when the hint is an unsharded
    row (``product.shard_orders``): then ``None``, and the sharded queryset raises
    :class:`ShardKeyRequired` when evaluated without a shard-key filter.

    An *unsharded* model reached from a sharded row (``order.product``) is read from
    ``default``, and this is an answer, not "no opinion": the next router
    (``ReplicaRouter``) would follow the hinted row's ``_state.db``, a shard, which holds
    no reference tables. Reference tables live on ``default`` only (``allow_migrate``
    keeps them off the shards), so a project whose reference tables live elsewhere must
    route them with a router listed *before* ``ShardRouter``.
    """
    shard = hints.get(SHARD_HINT)
    if shard is not None:  # first: every key-routed read and fan-out comes this way
        return str(shard)  # the sharded queryset already mapped its key (ring verified)
    spec = shard_spec(model)
    instance = hints.get("instance")
    if spec is None:
        if instance is not None and shard_spec(type(instance)) is not None:
            return DEFAULT_DB_ALIAS
        return None
    if instance is not None:
        primary = _shard_of_related(instance, spec.group, model)
        if primary is not None:
            verify_ring_once(primary)
            return primary
    pinned = current_shard(spec.group)
    if pinned is not None:
        verify_ring_once(pinned)
        return pinned
    if instance is not None and shard_spec(type(instance)) is None:
        # product.shard_orders asks the router before its filter exists, only to look up
        # backend features; ShardedQuerySet.db raises at evaluation if no key turns up.
        return None
    raise key_required(model, spec, "read")


def primary_for_write(model: type[Model], hints: dict[str, Any]) -> str | None:
    """Return the shard primary a write of *model* must use, or ``None`` if not sharded.

    For a row of the model itself (``save()``, ``delete()``), the shard its key maps to
    (:class:`ShardKeyMissing` when the key is ``None``); for a write reached through a
    relation (``customer.orders.create()``, many-to-many tables), the related row's shard;
    else the :func:`~.context.using_shard` pin; else :class:`ShardKeyRequired`. When the
    hinted instance is an unsharded row (``Order(product=p)`` asks where the new order
    goes), the answer is left to the next router: the order's own key decides at save.
    An unsharded model written from a sharded row goes to ``default`` (see
    :func:`primary_for_read`).
    """
    spec = shard_spec(model)
    instance = hints.get("instance")
    if spec is None:
        if instance is not None and shard_spec(type(instance)) is not None:
            return DEFAULT_DB_ALIAS
        return None
    if instance is not None:
        if type(instance) is model and spec.key_field is not None:
            own = shard_for_instance(instance, spec)
            verify_ring_once(own)
            return own
        if shard_spec(type(instance)) is None:
            return None
        related = _shard_of_related(instance, spec.group, model)
        if related is not None:
            verify_ring_once(related)
            return related
    pinned = current_shard(spec.group)
    if pinned is not None:
        verify_ring_once(pinned)
        return pinned
    raise key_required(model, spec, "write")


_UNKNOWN: Any = object()


def check_write_target(instance: Model, using: str, *, deleting: bool = False) -> str:
    """Refuse, before anything is written, a save or delete that would misplace *instance*.

    Checks that the key is set, that *using* is the shard the key maps to, and that the
    key of a row loaded from the database has not changed (which would leave the old row
    behind on its shard). Returns the shard primary alias.
    """
    spec = shard_spec(type(instance))
    if spec is None or spec.key_attname is None:
        return using
    verb = "delete" if deleting else "save"
    target = shard_for_instance(instance, spec)
    current_value = getattr(instance, spec.key_attname)
    if not instance._state.adding:
        loaded = instance.__dict__.get("_dbscale_loaded_key", _UNKNOWN)
        known = loaded is not _UNKNOWN and loaded is not None
        if known and spec.ring_key(loaded) != spec.ring_key(current_value):
            raise ShardKeyChanged(
                f"Cannot {verb} {instance!r}: its shard key {spec.describe_key()} changed "
                f"from {loaded!r} to {current_value!r}. A row's shard key is fixed once "
                "written; create a new row with the new key and delete the old one."
            )
        home = _primary(instance._state.db)
        ring = spec.ring
        if (
            known
            and home is not None
            and home != target
            and _is_shard(home, spec.group)
            and shardmap.active(spec.group) is not None  # moved by a resharding, not edited
        ):
            raise ShardMoved(
                f"Cannot {verb} {instance!r}: it was read from shard {home!r}, but the key "
                f"{spec.describe_key()}={current_value!r} now lives on shard {target!r} "
                f"(group {spec.group!r} was resharded, ring {ring.fingerprint}). Re-read the "
                "row and write it again: its current version is on the new shard."
            )
        if home in ring.nodes and home != target:
            cause = (
                f"the ring of group {spec.group!r} changed (now fingerprint "
                f"{ring.fingerprint}). Move the group's rows (reshard) before writing them"
                if known
                else f"its shard key {spec.describe_key()} was changed after it was read, "
                f"or the ring of group {spec.group!r} changed. Write rows from the shard "
                "they were read from; a row's shard key is fixed once written"
            )
            raise ShardKeyChanged(
                f"Cannot {verb} {instance!r}: it was read from shard {home!r} but its key "
                f"{spec.describe_key()}={current_value!r} maps to {target!r}: {cause}."
            )
    for related in instance._state.fields_cache.values():
        if isinstance(related, Model) and shard_spec(type(related)) is not None:
            other = _shard_of_related(related, spec.group, type(instance))
            if other is not None and other != target:
                raise CrossShardRelation(
                    f"Cannot {verb} {instance!r} on shard {target!r} (its key "
                    f"{spec.describe_key()}={current_value!r}): it points to {related!r}, "
                    f"which lives on shard {other!r}. Related rows must share the shard key "
                    "value."
                )
    if _primary(using) != target:
        raise ShardMismatch(
            f"Cannot {verb} {instance!r} on {using!r}: its key "
            f"{spec.describe_key()}={current_value!r} maps to shard {target!r} of group "
            f"{spec.group!r}. Writes go to the key's shard: let the router choose it (no "
            "using=, .using() or .db_manager() naming another database), or name "
            f"{target!r}."
        )
    return target


def _sharded_by_history(model: Any) -> str | None:
    """Return the group of a historical sharded model the live registry no longer has.

    Historical models keep their fields but not ``ShardedModel``'s class attributes. A
    :class:`~.ids.ShardedIDField` only exists on sharded models (``dbscale.E108``), so a
    model having one was sharded; its group is known when only one group is configured.
    Returns the group, ``""`` for "sharded, group unknown", or ``None`` (not sharded, as
    far as can be told).
    """
    meta = getattr(model, "_meta", None)
    if meta is None:
        return None
    if not any(isinstance(f, ShardedIDField) for f in meta.concrete_fields):
        return None
    groups = list(dbscale_settings.shard_groups)
    return groups[0] if len(groups) == 1 else ""


def _live_model(app_label: str, model_name: str | None, model: Any) -> type[Model] | None:
    # Historical models in migrations lose abstract bases such as ShardedModel, so the
    # decision is taken on the live model with the same label.
    if isinstance(model, type) and issubclass(model, Model) and shard_spec(model) is not None:
        return model
    if model_name is None:
        return None
    try:
        return live_apps.get_model(app_label, model_name)
    except LookupError:
        return None


def _app_has_sharded_models(app_label: str) -> bool:
    try:
        config = live_apps.get_app_config(app_label)
    except LookupError:
        return False
    return any(shard_spec(m) is not None for m in config.get_models(include_auto_created=True))


def allow_migrate(
    db: str, app_label: str, model_name: str | None, model: type[Model] | None
) -> bool | None:
    """Put sharded tables on every shard of their group and unsharded ones off the shards.

    Sharded model: ``True`` on its group's shard aliases, ``False`` anywhere else (also on
    the shards of other groups, even where a database is a shard of several groups).
    Unsharded model on a shard alias: ``False``, except this library's own models, which
    every primary holds (``None``). An operation without a model (RunSQL,
    RunPython) on a shard alias: ``False`` for apps without sharded models, else no
    opinion (pass ``hints={"model_name": ...}`` to such operations). Otherwise ``None``.

    The live model with the same label decides (historical models lose the
    ``ShardedModel`` base). A model that no longer exists live (deleted or renamed since)
    counts as sharded when its historical version has a ``ShardedIDField``: then it is
    ``False`` off the shards, and on the shards ``True`` if only one group is configured
    (else no opinion). A deleted sharded model without a ``ShardedIDField`` cannot be
    recognised: keep its class (or pass ``hints={"model": ...}``) until its
    ``DeleteModel`` ran everywhere.
    """
    if app_label == "django_dbscale":
        return None  # the library's own outbox lives on every primary, shards included
    # A database may be a shard of several groups; each table goes to its own group's.
    groups = dbscale_settings.groups_of_shard.get(db, ())
    live = _live_model(app_label, model_name, model)
    spec = shard_spec(live) if live is not None else None
    if spec is not None:
        return spec.group in groups
    if live is None and model is not None:
        historical = _sharded_by_history(model)
        if historical is not None:
            if not groups:
                return False
            return None if historical == "" else historical in groups
    if not groups:
        return None
    if live is None and model_name is None and _app_has_sharded_models(app_label):
        return None
    return False


def _shard_of_object(obj: Model, group: str) -> str | None:
    ring = get_ring(group)
    if not obj._state.adding:
        db = _primary(obj._state.db)
        if db in ring.nodes:
            return db
    spec = shard_spec(type(obj))
    if spec is None or spec.key_attname is None:
        return None
    value = obj.__dict__.get(spec.key_attname)
    return None if value is None else ring.node_for(spec.ring_key(value))


def allow_relation(obj1: Model, obj2: Model) -> bool | None:
    """Refuse, by raising :class:`CrossShardRelation`, relations between shards.

    Two rows of one group are related only if they live on the same shard (``True``);
    rows of different groups never (raise). A sharded row may point to an unsharded
    reference row (``True``). Unsharded pairs: ``None``. Raising (rather than returning
    ``False``) puts the shards and keys in the error instead of Django's generic message.
    """
    spec1, spec2 = shard_spec(type(obj1)), shard_spec(type(obj2))
    if spec1 is None and spec2 is None:
        return None
    if spec1 is None or spec2 is None:
        return True
    if spec1.group != spec2.group:
        raise CrossShardRelation(
            f"{obj1!r} (group {spec1.group!r}) and {obj2!r} (group {spec2.group!r}) are in "
            "different shard groups and cannot be related."
        )
    shard1, shard2 = _shard_of_object(obj1, spec1.group), _shard_of_object(obj2, spec2.group)
    if shard1 is not None and shard2 is not None and shard1 != shard2:
        raise CrossShardRelation(
            f"{obj1!r} lives on shard {shard1!r} and {obj2!r} on shard {shard2!r} (group "
            f"{spec1.group!r}): rows on different shards cannot be related. Give both the "
            "same shard key value so they are colocated."
        )
    return True


def sharded_models(group: str | None = None) -> list[ShardSpec]:
    """Return the specs of every installed sharded model (of *group* if given)."""
    specs = []
    for model in live_apps.get_models(include_auto_created=True):
        spec = shard_spec(model)
        if spec is not None and (group is None or spec.group == group):
            specs.append(spec)
    return specs


def clear_spec_cache(models: Iterable[type[Model]] | None = None) -> None:
    """Forget cached specs (all, or of *models*); for tests that build models on the fly."""
    if models is None:
        _specs.clear()
    else:
        for model in models:
            _specs.pop(model, None)
