"""System checks for the ``DBSCALE`` setting (``manage.py check``).

Ids are stable and listed in ``docs/checks.md``. These checks read settings only, so they
run on every ``check`` (not only with ``--database``). Each message names the alias, key or
router concerned and says how to fix it. Pillar-specific checks live next to their pillar
(``django_dbscale/sharding/checks.py``, ``django_dbscale/cache/checks.py``) and are
imported here so one import registers them all.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from django_dbscale.conf import dbscale_settings

ENGINE = "django_dbscale.backends.postgresql"
REPLICA_ROUTER = "django_dbscale.routers.ReplicaRouter"
SHARD_ROUTER = "django_dbscale.routers.ShardRouter"

E000 = "dbscale.E000"  # DBSCALE does not parse
E001 = "dbscale.E001"  # replica alias missing from DATABASES
E002 = "dbscale.E002"  # replicas listed for a primary that is not in DATABASES
E003 = "dbscale.E003"  # a replica listed twice, or a replica that is also a primary
E004 = "dbscale.E004"  # empty shard group
E005 = "dbscale.E005"  # shard alias missing from DATABASES
E006 = "dbscale.E006"  # DBSCALE["CACHE"] declared, but its CACHES alias is missing
E008 = "dbscale.E008"  # the cache's CACHES alias is not a django-redis backend
E009 = "dbscale.E009"  # SAME_DATABASE names an alias that is not in DATABASES
E007 = "dbscale.E007"  # a needed router missing, or routers in an order that breaks them
W001 = "dbscale.W001"  # alias managed by dbscale without the dbscale ENGINE
W002 = "dbscale.W002"  # a router listed after ReplicaRouter is never consulted
W003 = "dbscale.W003"  # replicas configured but ConsistencyMiddleware missing
MIDDLEWARE_PATH = "django_dbscale.middleware.ConsistencyMiddleware"

ALL_IDS = (E000, E001, E002, E003, E004, E005, E006, E007, E008, E009, W001, W002, W003)


def _router_paths() -> list[str]:
    paths = []
    for router in settings.DATABASE_ROUTERS:
        if isinstance(router, str):
            paths.append(router)
        else:
            cls = router if isinstance(router, type) else type(router)
            paths.append(f"{cls.__module__}.{cls.__qualname__}")
    return paths


@checks.register()
def check_dbscale_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Check ``DBSCALE`` against ``DATABASES``, ``CACHES`` and ``DATABASE_ROUTERS``."""
    try:
        dbscale_settings.validate()
        replicas = dbscale_settings.replicas
        groups = dbscale_settings.shard_groups
        cache = dbscale_settings.cache
    except ImproperlyConfigured as exc:
        return [
            checks.Error(
                str(exc),
                hint="docs/settings.md lists every DBSCALE key with its type and default.",
                id=E000,
            )
        ]
    databases = settings.DATABASES
    errors: list[checks.CheckMessage] = []

    seen: dict[str, str] = {}
    for primary, specs in replicas.items():
        if primary not in databases:
            errors.append(
                checks.Error(
                    f"DBSCALE['REPLICAS'] lists replicas for {primary!r}, which is not in "
                    "DATABASES.",
                    hint=f"Add {primary!r} to DATABASES or remove it from DBSCALE['REPLICAS'].",
                    id=E002,
                )
            )
        for spec in specs:
            if spec.alias not in databases:
                errors.append(
                    checks.Error(
                        f"Replica {spec.alias!r} of {primary!r} in DBSCALE['REPLICAS'] is not "
                        "in DATABASES.",
                        hint=f"Add a DATABASES[{spec.alias!r}] entry pointing at the replica.",
                        id=E001,
                    )
                )
            if spec.alias in seen or spec.alias in replicas or spec.alias == primary:
                errors.append(
                    checks.Error(
                        f"Replica {spec.alias!r} is listed twice in DBSCALE['REPLICAS'] or is "
                        "also a primary there.",
                        hint="List each replica once, under the primary it streams from.",
                        id=E003,
                    )
                )
            seen[spec.alias] = primary

    sharded: set[str] = set()
    for group in groups.values():
        if not group.shards:
            errors.append(
                checks.Error(
                    f"Shard group {group.name!r} in DBSCALE['SHARD_GROUPS'] has no shards.",
                    hint="List at least one database alias under 'SHARDS', or remove the group.",
                    id=E004,
                )
            )
        for alias in group.shards:
            if alias not in databases:
                errors.append(
                    checks.Error(
                        f"Shard {alias!r} of group {group.name!r} is not in DATABASES.",
                        hint=f"Add a DATABASES[{alias!r}] entry or remove it from the group.",
                        id=E005,
                    )
                )
            # A database may be a shard of several groups (each table on its own group's).
            sharded.add(alias)

    if cache["ENABLED"] and dbscale_settings.cache_declared:
        alias = cache["ALIAS"]
        backend = settings.CACHES.get(alias, {}).get("BACKEND")
        if backend is None:
            errors.append(
                checks.Error(
                    f"DBSCALE['CACHE']['ALIAS'] is {alias!r}, which is not in CACHES.",
                    hint=f"Add CACHES[{alias!r}] with BACKEND 'django_redis.cache.RedisCache'.",
                    id=E006,
                )
            )
        elif not backend.startswith("django_redis."):
            errors.append(
                checks.Error(
                    f"CACHES[{alias!r}] uses {backend!r}; the queryset cache needs a django-redis "
                    "backend (it runs Lua scripts on the Redis server).",
                    hint="Set BACKEND to 'django_redis.cache.RedisCache'.",
                    id=E008,
                )
            )

    for twin, target in sorted(dbscale_settings.same_database.items()):
        unknown = [a for a in (twin, target) if a not in databases]
        if unknown:
            errors.append(
                checks.Error(
                    f"DBSCALE['SAME_DATABASE'] maps {twin!r} to {target!r}, but {unknown} "
                    "is not in DATABASES.",
                    hint="Name two aliases of DATABASES that reach one database, or remove it.",
                    id=E009,
                )
            )

    errors.extend(_check_routers(bool(replicas), bool(groups)))
    if replicas and MIDDLEWARE_PATH not in getattr(settings, "MIDDLEWARE", []):
        errors.append(
            checks.Warning(
                "DBSCALE['REPLICAS'] is set but ConsistencyMiddleware is not in MIDDLEWARE: a "
                "user's next request may read a replica that lacks what they just wrote, and "
                "requests served by one thread share its consistency context.",
                hint=f"Add {MIDDLEWARE_PATH!r} near the top of MIDDLEWARE.",
                id=W003,
            )
        )

    managed = set(replicas) | set(seen) | sharded
    for alias in sorted(managed & set(databases)):
        engine = databases[alias].get("ENGINE")
        if engine != ENGINE:
            errors.append(
                checks.Warning(
                    f"DATABASES[{alias!r}] uses ENGINE {engine!r}; read-your-writes and replica "
                    "failover need the dbscale backend.",
                    hint=f"Set DATABASES[{alias!r}]['ENGINE'] = {ENGINE!r}.",
                    id=W001,
                )
            )
    return errors


def _check_routers(has_replicas: bool, has_groups: bool) -> list[checks.CheckMessage]:
    paths = _router_paths()
    errors: list[checks.CheckMessage] = []
    if has_replicas and REPLICA_ROUTER not in paths:
        errors.append(
            checks.Error(
                "DBSCALE['REPLICAS'] is set but DATABASE_ROUTERS lacks ReplicaRouter: reads "
                "would never reach a replica.",
                hint=f"Add {REPLICA_ROUTER!r} as the last entry of DATABASE_ROUTERS.",
                id=E007,
            )
        )
    if has_groups and SHARD_ROUTER not in paths:
        errors.append(
            checks.Error(
                "DBSCALE['SHARD_GROUPS'] is set but DATABASE_ROUTERS lacks ShardRouter: sharded "
                "models would be read from and written to 'default'.",
                hint=f"Add {SHARD_ROUTER!r} before {REPLICA_ROUTER!r} in DATABASE_ROUTERS.",
                id=E007,
            )
        )
    both = REPLICA_ROUTER in paths and SHARD_ROUTER in paths
    if both and paths.index(SHARD_ROUTER) > paths.index(REPLICA_ROUTER):
        errors.append(
            checks.Error(
                "ShardRouter is listed after ReplicaRouter in DATABASE_ROUTERS; ReplicaRouter "
                "answers for every model, so sharded models would go to 'default'.",
                hint=f"Put {SHARD_ROUTER!r} before {REPLICA_ROUTER!r}.",
                id=E007,
            )
        )
    if REPLICA_ROUTER in paths:
        after = paths[paths.index(REPLICA_ROUTER) + 1 :]
        if after:
            errors.append(
                checks.Warning(
                    f"DATABASE_ROUTERS lists {after} after ReplicaRouter; ReplicaRouter answers "
                    "db_for_read and db_for_write for every model, so they are never consulted "
                    "for reads or writes (only for allow_relation and allow_migrate).",
                    hint="Move them before ReplicaRouter.",
                    id=W002,
                )
            )
    return errors


def _register_pillar_checks() -> None:
    # The pillars' own checks register themselves when imported.
    import importlib

    for module in ("django_dbscale.sharding.checks", "django_dbscale.cache.checks"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


_register_pillar_checks()
