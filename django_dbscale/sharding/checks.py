"""System checks of sharded models (ids ``dbscale.E100``-``E149``, ``W100``-``W149``).

Model checks run with ``manage.py check``; the ring-stamp checks touch the shard databases
and run only with ``check --database <alias>`` (or ``--database``-less ``migrate``), as
Django does for every check tagged ``database``.

``migrate --skip-checks`` (and ``call_command("migrate")``, which skips checks) would
otherwise create tables on the wrong databases from an invalid configuration, so importing
this module also connects a ``pre_migrate`` receiver that first refuses to migrate while
the configuration has sharding errors (:func:`migrate_blockers`), then installs the ID
functions and ring stamps on a shard (:mod:`django_dbscale.sharding.ids`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

from django.apps import apps as live_apps
from django.core import checks
from django.core.checks import Tags, register
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import CommandError
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import (
    DO_NOTHING,
    AutoField,
    BigAutoField,
    ForeignKey,
    ManyToManyField,
    Model,
    SmallAutoField,
)
from django.db.models.signals import pre_migrate
from django.dispatch import receiver

from django_dbscale.conf import dbscale_settings
from django_dbscale.sharding.exceptions import ShardingError
from django_dbscale.sharding.ids import (
    ShardedIDField,
    install_on_pre_migrate,
    is_populated,
    read_stamps,
    stamp_for,
    stamp_problems,
)
from django_dbscale.sharding.ring import get_ring
from django_dbscale.sharding.routing import ShardSpec, shard_spec

__all__ = ["ALL_IDS"]

E100 = "dbscale.E100"  # shard_group names no configured group
E101 = "dbscale.E101"  # shard_key is not a concrete field / FK of the model
E102 = "dbscale.E102"  # auto-increment primary key on a sharded model
E103 = "dbscale.E103"  # foreign key between sharded models of different groups
E104 = "dbscale.E104"  # FK from a sharded to an unsharded model with a constraint/cascade
E105 = "dbscale.E105"  # foreign key from an unsharded model to a sharded one
E106 = "dbscale.E106"  # shard_group / shard_key missing or not a str
E107 = "dbscale.E107"  # ShardedIDField layout cannot number the group's shards
E108 = "dbscale.E108"  # ShardedIDField on an unsharded model
E109 = "dbscale.E109"  # "default" listed as a shard
E110 = "dbscale.E110"  # populated shard stamped with another VNODES / group / shard number
E111 = "dbscale.E111"  # one table for sharded models of two groups sharing a shard
W100 = "dbscale.W100"  # populated shard stamped with another ring fingerprint
W101 = "dbscale.W101"  # colocated models of one group with shard keys of different types
W102 = "dbscale.W102"  # a sharded model's default manager does not return ShardedQuerySet
W103 = "dbscale.W103"  # SHARD_GROUPS declares another ring than the shard map's active one

ALL_IDS = (
    E100,
    E101,
    E102,
    E103,
    E104,
    E105,
    E106,
    E107,
    E108,
    E109,
    E110,
    E111,
    W100,
    W101,
    W102,
    W103,
)


def _concrete_models(app_configs: Sequence[Any] | None) -> Iterable[type[Model]]:
    configs = app_configs if app_configs is not None else live_apps.get_app_configs()
    for config in configs:
        for model in config.get_models():
            if not model._meta.abstract and not model._meta.proxy:
                yield model


def _declared(model: type[Model]) -> bool:
    return bool(getattr(model, "_dbscale_sharded", False))


def _spec_or_error(model: type[Model]) -> tuple[ShardSpec | None, list[checks.CheckMessage]]:
    group = getattr(model, "shard_group", None)
    key = getattr(model, "shard_key", None)
    if not isinstance(group, str) or not isinstance(key, str):
        return None, [
            checks.Error(
                f"{model._meta.label} subclasses ShardedModel but shard_group={group!r} and "
                f"shard_key={key!r} are not both strings.",
                hint="Set e.g. shard_group = 'customers' and shard_key = 'customer_id' on "
                "the class.",
                obj=model,
                id=E106,
            )
        ]
    try:
        return shard_spec(model), []
    except ShardingError as exc:
        return None, [
            checks.Error(
                str(exc),
                hint="Name a concrete field or foreign key of the model in shard_key.",
                obj=model,
                id=E101,
            )
        ]


def _key_type(spec: ShardSpec) -> str:
    field = spec.key_field
    if field is None:
        return "?"
    target = getattr(field, "target_field", None) if field.is_relation else field
    if target is None:
        return "?"
    internal = str(target.get_internal_type())
    return {"AutoField": "IntegerField", "BigAutoField": "BigIntegerField"}.get(internal, internal)


@register(Tags.models)
def check_sharded_models(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Check every sharded model's declaration, primary key and relations."""
    from django_dbscale.sharding.models import ShardedQuerySet

    errors: list[checks.CheckMessage] = []
    try:
        groups = dbscale_settings.shard_groups
    except Exception:
        return []  # the foundation's dbscale.E000 reports an unparsable DBSCALE
    default_groups = dbscale_settings.groups_of_shard.get(DEFAULT_DB_ALIAS, ())
    if default_groups:
        errors.append(
            checks.Error(
                f"{DEFAULT_DB_ALIAS!r} is listed as a shard of group(s) "
                f"{', '.join(repr(g) for g in default_groups)}.",
                hint="Unsharded models live on 'default'; give the shard its own alias.",
                id=E109,
            )
        )
    key_types: dict[str, dict[str, list[str]]] = {}
    tables: dict[str, dict[str, list[str]]] = {}  # db_table -> group -> model labels
    for model in _concrete_models(app_configs):
        label = model._meta.label
        pk = model._meta.pk
        if not _declared(model):
            for field in model._meta.get_fields():
                if isinstance(field, ShardedIDField) and field.model is model:
                    errors.append(
                        checks.Error(
                            f"{label}.{field.name} is a ShardedIDField but {label} is not sharded.",
                            hint="Subclass ShardedModel, or use an ordinary primary key.",
                            obj=model,
                            id=E108,
                        )
                    )
                if (
                    isinstance(field, ForeignKey)
                    and field.model is model
                    and isinstance(field.related_model, type)
                    and _declared(field.related_model)
                ):
                    errors.append(
                        checks.Error(
                            f"{label}.{field.name} points from an unsharded model to the "
                            f"sharded {field.related_model._meta.label}: the router cannot "
                            "tell which shard to follow it to.",
                            hint="Store the sharded row's key and id as plain fields, or "
                            "shard this model in the same group.",
                            obj=model,
                            id=E105,
                        )
                    )
            continue
        spec, problems = _spec_or_error(model)
        errors.extend(problems)
        if spec is None:
            continue
        if spec.group not in groups:
            errors.append(
                checks.Error(
                    f"{label}.shard_group = {spec.group!r} is not a group of "
                    f"DBSCALE['SHARD_GROUPS'] (configured: {sorted(groups)}).",
                    hint="Add the group to the setting or fix the name.",
                    obj=model,
                    id=E100,
                )
            )
            continue
        key_types.setdefault(spec.group, {}).setdefault(_key_type(spec), []).append(label)
        for table_model in [model, *_auto_created_links(model)]:
            tables.setdefault(table_model._meta.db_table, {}).setdefault(spec.group, []).append(
                table_model._meta.label
            )
        manager = model._default_manager
        if not isinstance(manager.get_queryset(), ShardedQuerySet):
            errors.append(
                checks.Warning(
                    f"{label}'s default manager {manager.name!r} does not return a "
                    "ShardedQuerySet: filter(<shard key>=...), for_key() and all_shards() "
                    "are unavailable through it, and unpinned reads raise ShardKeyRequired.",
                    hint="Derive custom managers from ShardedManager (or build them with "
                    "ShardedManager.from_queryset(YourShardedQuerySet)).",
                    obj=model,
                    id=W102,
                )
            )
        if isinstance(pk, AutoField | BigAutoField | SmallAutoField):
            errors.append(
                checks.Error(
                    f"{label} is sharded but its primary key {pk.name!r} is a "
                    f"{type(pk).__name__}: each shard would count from 1 and ids would "
                    "collide across shards.",
                    hint="Declare id = ShardedIDField(primary_key=True), or another "
                    "globally unique key (a UUIDField with default=uuid.uuid4).",
                    obj=model,
                    id=E102,
                )
            )
        if isinstance(pk, ShardedIDField):
            shards = len(groups[spec.group].shards)
            if shards > pk.layout.max_shards:
                errors.append(
                    checks.Error(
                        f"{label}.{pk.name} is a {pk.layout.total_bits}-bit ShardedIDField "
                        f"that can number {pk.layout.max_shards} shards, but group "
                        f"{spec.group!r} has {shards}.",
                        hint="Use ShardedIDField() (64-bit, 4096 shards) instead of js_safe=True.",
                        obj=model,
                        id=E107,
                    )
                )
        for field in model._meta.get_fields():
            if (
                isinstance(field, ManyToManyField)
                and field.model is model
                and isinstance(field.related_model, type)
                and not _declared(field.related_model)
                and cast(Any, field.remote_field).through._meta.auto_created
            ):
                errors.append(
                    checks.Error(
                        f"{label}.{field.name} links the sharded {label} to the unsharded "
                        f"{field.related_model._meta.label}: its link table lives on the "
                        "shards, with a foreign key to a table that is not there.",
                        hint="Use an explicit sharded through model whose foreign key to "
                        "the reference model has db_constraint=False and "
                        "on_delete=DO_NOTHING.",
                        obj=model,
                        id=E104,
                    )
                )
            if not isinstance(field, ForeignKey) or field.model is not model:
                continue
            target = field.related_model
            if not isinstance(target, type):
                continue
            target_spec = shard_spec(target) if _declared(target) else None
            if target_spec is None:
                if getattr(field, "db_constraint", True) or (
                    field.remote_field.on_delete is not DO_NOTHING
                ):
                    errors.append(
                        checks.Error(
                            f"{label}.{field.name} points to the unsharded "
                            f"{target._meta.label}, which does not exist on the shards, "
                            "so it needs db_constraint=False and on_delete=DO_NOTHING (a "
                            "constraint or a cascade would run on the wrong database).",
                            hint="Declare ForeignKey(..., on_delete=models.DO_NOTHING, "
                            "db_constraint=False); reference rows are read from 'default'.",
                            obj=model,
                            id=E104,
                        )
                    )
            elif target_spec.group != spec.group:
                errors.append(
                    checks.Error(
                        f"{label}.{field.name} points from group {spec.group!r} to "
                        f"{target._meta.label} in group {target_spec.group!r}.",
                        hint="Related sharded models must share one group (and key).",
                        obj=model,
                        id=E103,
                    )
                )
    errors.extend(_shared_table_errors(tables, groups))
    for group, by_type in key_types.items():
        if len(by_type) > 1:
            errors.append(
                checks.Warning(
                    f"Models of shard group {group!r} have shard keys of different types "
                    f"({', '.join(f'{t}: {sorted(m)}' for t, m in sorted(by_type.items()))}); "
                    "equal-looking keys may not be colocated.",
                    hint="Use one key type (e.g. the customer's id) across the group.",
                    id=W101,
                )
            )
    return errors


@register(Tags.database)
def check_shard_stamps(
    app_configs: Sequence[Any] | None = None, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Compare each populated shard's ring stamp with the configured ring."""
    if not databases:
        return []
    messages: list[checks.CheckMessage] = []
    for alias in databases:
        groups = dbscale_settings.groups_of_shard.get(alias, ())
        if not groups or alias not in connections:
            continue
        connection = connections[alias]
        stamps = read_stamps(connection)
        for group in groups:
            messages.extend(_stamp_messages(connection, alias, group, stamps))
    return messages


def _stamp_messages(
    connection: Any, alias: str, group: str, stamps: dict[str, Any]
) -> list[checks.CheckMessage]:
    stamp = stamp_for(stamps, alias, group)
    if stamp is None:
        return []
    populated = is_populated(connection, group, stamp)
    problems = stamp_problems(alias, stamp, populated, group=group)
    if problems:
        return [
            checks.Error(
                f"Shard {alias!r} of group {group!r} is populated and " + "; ".join(problems) + ".",
                hint="Restore the previous setting, or reshard and then run "
                "`manage.py dbscale shards --stamp --force`.",
                id=E110,
            )
        ]
    fingerprint = get_ring(group).fingerprint
    if populated and stamp.fingerprint != fingerprint:
        return [
            checks.Warning(
                f"Shard {alias!r} of group {group!r} holds rows placed by ring "
                f"{stamp.fingerprint}, but the configured ring is {fingerprint} (shards or "
                "weights changed): some rows are now on a shard their key no longer maps to.",
                hint="Move the rows (reshard), then run `manage.py dbscale shards --stamp`.",
                id=W100,
            )
        ]
    return []


def _auto_created_links(model: type[Model]) -> list[type[Model]]:
    """Return the auto-created many-to-many tables *model* declares (they live with it)."""
    links = []
    for field in model._meta.local_many_to_many:
        through = cast(Any, field.remote_field).through
        if isinstance(through, type) and issubclass(through, Model) and through._meta.auto_created:
            links.append(through)
    return links


def _shared_table_errors(
    tables: dict[str, dict[str, list[str]]], groups: dict[str, Any]
) -> list[checks.CheckMessage]:
    """Return ``dbscale.E111`` for tables that sharded models of two groups would share."""
    errors: list[checks.CheckMessage] = []
    for table, by_group in sorted(tables.items()):
        names = sorted(g for g in by_group if g in groups)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                shared = sorted(set(groups[first].shards) & set(groups[second].shards))
                if not shared:
                    continue  # different databases: each group has its own table
                errors.append(
                    checks.Error(
                        f"Table {table!r} belongs to {sorted(by_group[first])} of shard group "
                        f"{first!r} and to {sorted(by_group[second])} of group {second!r}, "
                        f"whose shards {shared} overlap: both groups' rows would land in one "
                        "table on those databases.",
                        hint="Give the models different db_table names (or keep the groups "
                        "on different databases).",
                        id=E111,
                    )
                )
    return errors


#: Check ids of configuration errors that make ``migrate`` create tables in the wrong
#: places (or not at all): it refuses to run while any is reported.
MIGRATE_BLOCKING_SETTINGS_IDS = ("dbscale.E000", "dbscale.E004", "dbscale.E005")


def migrate_blockers() -> list[checks.CheckMessage]:
    """Return the sharding configuration errors that ``migrate`` refuses to run with.

    ``DBSCALE`` that does not parse (``dbscale.E000``), shard groups naming unknown or no
    aliases (``E004``, ``E005``), ``ShardRouter`` missing or misplaced (``E007``), and
    every sharded-model error (``dbscale.E1xx``).
    """
    from django_dbscale import checks as settings_checks

    try:
        dbscale_settings.validate()
    except ImproperlyConfigured as exc:
        return [
            checks.Error(
                str(exc),
                hint="docs/settings.md lists every DBSCALE key with its type and default.",
                id="dbscale.E000",
            )
        ]
    found = [
        m
        for m in settings_checks.check_dbscale_settings()
        if m.id in MIGRATE_BLOCKING_SETTINGS_IDS and m.is_serious()
    ]
    if dbscale_settings.shard_groups:
        # Only the router problems that misplace sharded tables (not ReplicaRouter's).
        found += [m for m in settings_checks._check_routers(False, True) if m.is_serious()]
    found += [m for m in check_sharded_models() if m.is_serious()]
    return found


@receiver(pre_migrate, dispatch_uid="django_dbscale.sharding.pre_migrate")
def _refuse_invalid_configuration_then_install(*, using: str, **kwargs: Any) -> None:
    # Sent once per migrated app, before migrate creates any table (django_migrations
    # included), also with --skip-checks. Both steps are cheap and idempotent.
    blockers = migrate_blockers()
    if blockers:
        lines = "\n".join(
            f"  {m.id}: {m.msg}" + (f"\n    HINT: {m.hint}" if m.hint else "") for m in blockers
        )
        raise CommandError(
            f"Refusing to migrate database {using!r}: the sharding configuration has "
            f"{len(blockers)} error(s), and migrating now would create tables on the wrong "
            f"databases.\n{lines}\nFix them (`manage.py check` lists them too) and run "
            "migrate again."
        )
    install_on_pre_migrate(using)


@register(Tags.database)
def check_shard_map(
    app_configs: Sequence[Any] | None = None, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Warn when ``SHARD_GROUPS`` declares another ring than the one a group is placed under.

    Routing follows the shard map (the active ring), so this is not an error: it is the
    state between editing ``SHARDS`` and running the resharding that moves the rows.
    """
    if not databases or DEFAULT_DB_ALIAS not in databases:
        return []
    from django_dbscale.sharding import shardmap
    from django_dbscale.sharding.ring import build_ring

    messages: list[checks.CheckMessage] = []
    for name, spec in dbscale_settings.shard_groups.items():
        active = shardmap.active(name)
        if active is None or not spec.shards:
            continue
        declared = build_ring(spec).fingerprint
        if declared != active.fingerprint:
            messages.append(
                checks.Warning(
                    f"Shard group {name!r} is placed on {list(active.spec.shards)} (shard map "
                    f"version {active.version}, ring {active.fingerprint}), but "
                    f"DBSCALE['SHARD_GROUPS'] declares {list(spec.shards)} (ring {declared}). "
                    "Rows are routed by the shard map until a resharding moves them.",
                    hint=f"Run `manage.py dbscale reshard {name} --plan`, then "
                    f"`manage.py dbscale reshard {name}`; or restore the previous SHARDS.",
                    id=W103,
                )
            )
    return messages
