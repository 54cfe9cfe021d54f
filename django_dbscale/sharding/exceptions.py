"""Exceptions raised by sharding; each message names what is wrong and how to fix it."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured

__all__ = [
    "CrossShardRelation",
    "FanoutNotSupported",
    "InvalidShardKey",
    "RingChangeRefused",
    "ShardKeyChanged",
    "ShardKeyMissing",
    "ShardKeyRequired",
    "ShardMismatch",
    "ShardMoved",
    "ShardDeclarationError",
    "ShardingError",
    "UnknownShard",
    "UnknownShardGroup",
]


class ShardingError(Exception):
    """Base class of every sharding error."""


class ShardKeyRequired(ShardingError):
    """A query of a sharded model has no way to know which shard it belongs to.

    Raised instead of reading (or writing) the ``default`` database or a guessed shard.
    """


class ShardKeyMissing(ShardingError, ValueError):
    """A sharded row is being saved with its shard key unset (``None``)."""


class ShardKeyChanged(ShardingError, ValueError):
    """The shard key of a row that exists in the database was changed."""


class InvalidShardKey(ShardingError, TypeError):
    """A shard key value has a type without a canonical ring form (float, bool, bytes...)."""


class UnknownShardGroup(ShardingError, LookupError):
    """A shard group name is not in ``DBSCALE["SHARD_GROUPS"]``."""


class UnknownShard(ShardingError, LookupError):
    """An alias or shard number is not a shard of the group it was used with.

    ``on_shard("default")``, ``using_shard(group, shard="replica")``, or an ID whose shard
    number is beyond the group's ``SHARDS``.
    """


class ShardDeclarationError(ShardingError, ImproperlyConfigured):
    """A ``ShardedModel`` subclass declares its ``shard_group``/``shard_key`` wrongly.

    The system checks (``dbscale.E101``, ``dbscale.E106``) report the same problem at
    start-up; routing raises this instead of guessing.
    """


class ShardMismatch(ShardingError):
    """A query or write names a shard that is not the one its key maps to."""


class CrossShardRelation(ShardingError, ValueError):
    """Two objects on different shards (or groups) were related to each other.

    Also raised when one query would follow relations of rows living on several shards
    (``prefetch_related_objects()`` over rows of different shards).
    """


class FanoutNotSupported(ShardingError):
    """A fan-out query asked for something whose per-shard results cannot be combined."""


class RingChangeRefused(ShardingError):
    """A populated shard was stamped with another ring layout (vnodes, shard numbers)."""


class ShardMoved(ShardingError):
    """A write reached a shard its key has been moved away from by a resharding.

    Raised when a row read before the cutover is saved or deleted afterwards, and when the
    old shard itself refuses a write (a process that had not re-read the shard map yet).
    The shard map is re-read when this is raised: re-read the row and write it again, as
    after a serialization failure. An insert outside a transaction is retried once on the
    new shard by the library itself.
    """
