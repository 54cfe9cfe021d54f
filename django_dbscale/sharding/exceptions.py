"""Exceptions raised by sharding; each message names what is wrong and how to fix it."""

from __future__ import annotations

__all__ = [
    "CrossShardRelation",
    "FanoutNotSupported",
    "InvalidShardKey",
    "RingChangeRefused",
    "ShardKeyChanged",
    "ShardKeyMissing",
    "ShardKeyRequired",
    "ShardMismatch",
    "ShardingError",
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


class ShardMismatch(ShardingError):
    """A query or write names a shard that is not the one its key maps to."""


class CrossShardRelation(ShardingError, ValueError):
    """Two objects on different shards (or groups) were related to each other."""


class FanoutNotSupported(ShardingError):
    """A fan-out query asked for something whose per-shard results cannot be combined."""


class RingChangeRefused(ShardingError):
    """A populated shard was stamped with another ring layout (vnodes, shard numbers)."""
