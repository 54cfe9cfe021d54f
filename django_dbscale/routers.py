"""Database routers: Django's router contract, delegating to sharding and replicas.

List them in this order::

    DATABASE_ROUTERS = [
        "django_dbscale.routers.ShardRouter",    # sharded models -> their shard
        "django_dbscale.routers.ReplicaRouter",  # everything else -> default primary/replicas
    ]

``ShardRouter`` answers only for sharded models and returns ``None`` ("no opinion") for the
rest. ``ReplicaRouter`` is the catch-all: it treats every model it is asked about as living
on the primary of its instance (or on ``default``), so a router listed after it is never
consulted for reads or writes, and ``ShardRouter`` must come before it (system check
``dbscale.E007``). Both are stateless; all per-request state lives in
:mod:`django_dbscale.consistency`.
"""

from __future__ import annotations

from typing import Any

from django.db import DEFAULT_DB_ALIAS
from django.db.models import Model

from django_dbscale import consistency, replicas
from django_dbscale.conf import dbscale_settings
from django_dbscale.sharding import routing as shard_routing

__all__ = ["ReplicaRouter", "ShardRouter"]


def primary_alias(alias: str) -> str:
    """Return *alias*'s primary if it is a configured replica, else *alias* itself."""
    return dbscale_settings.primary_of.get(alias, alias)


def _hinted_primary(hints: dict[str, Any]) -> str:
    instance = hints.get("instance")
    if instance is not None:
        db = instance._state.db
        if db is not None:
            return primary_alias(db)
    return DEFAULT_DB_ALIAS


class ReplicaRouter:
    """Send writes to the primary and reads to a healthy, caught-up replica of it."""

    def db_for_read(self, model: type[Model], **hints: Any) -> str | None:
        """Reads go to a replica within the lag budget that has this context's writes."""
        primary = _hinted_primary(hints)
        if consistency.naming_database.get():
            return primary
        return replicas.read_alias(primary)

    def db_for_write(self, model: type[Model], **hints: Any) -> str | None:
        """Writes go to the primary, also when the instance was read from a replica."""
        return _hinted_primary(hints)

    def allow_relation(self, obj1: Model, obj2: Model, **hints: Any) -> bool | None:
        """Objects read from a primary and from its replicas may be related."""
        db1, db2 = obj1._state.db, obj2._state.db
        if db1 is None or db2 is None:
            return None
        if primary_alias(db1) == primary_alias(db2):
            return True
        return None

    def allow_migrate(
        self, db: str, app_label: str, model_name: str | None = None, **hints: Any
    ) -> bool | None:
        """Never migrate a replica: it receives the schema through replication."""
        if db in dbscale_settings.primary_of:
            return False
        return None


class ShardRouter:
    """Send each sharded model's reads and writes to the shard its key maps to."""

    def db_for_read(self, model: type[Model], **hints: Any) -> str | None:
        """Reads of a sharded model go to (a replica of) its key's shard, or raise."""
        primary = shard_routing.primary_for_read(model, hints)
        if primary is None or consistency.naming_database.get():
            return primary
        return replicas.read_alias(primary)

    def db_for_write(self, model: type[Model], **hints: Any) -> str | None:
        """Writes of a sharded model go to its key's shard primary, or raise."""
        return shard_routing.primary_for_write(model, hints)

    def allow_relation(self, obj1: Model, obj2: Model, **hints: Any) -> bool | None:
        """Objects on different shards are never related."""
        return shard_routing.allow_relation(obj1, obj2)

    def allow_migrate(
        self, db: str, app_label: str, model_name: str | None = None, **hints: Any
    ) -> bool | None:
        """Sharded tables go on every shard of their group and nowhere else."""
        return shard_routing.allow_migrate(db, app_label, model_name, hints.get("model"))
