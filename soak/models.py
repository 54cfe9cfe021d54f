"""The soak's rows: a per-user counter on a shard, a per-user note on ``default``.

Every write sets the row's value to the writer's next sequence number (monotonically
increasing per user and kind) and appends one ledger row ``(user, seq)`` in the same
transaction, so the checker can count, with direct SQL, that every acknowledged write is
present exactly once on the database that acknowledged it. The ledgers have no unique
constraint on purpose: a duplicate must be visible, not refused.
"""

from __future__ import annotations

from django.db import models

from django_dbscale.sharding import ShardedIDField
from django_dbscale.sharding.models import ShardedModel

GROUP = "customers"


class Counter(ShardedModel):
    """One row per user on the shard of its user id (cached: listed in ``CACHE.MODELS``)."""

    shard_group = GROUP
    shard_key = "user"
    user = models.BigIntegerField(primary_key=True)
    value = models.BigIntegerField()

    class Meta:
        app_label = "soak"


class CounterEntry(ShardedModel):
    """The counter's ledger: one row per committed counter write, on the same shard."""

    shard_group = GROUP
    shard_key = "user"
    id = ShardedIDField(primary_key=True)
    user = models.BigIntegerField()
    seq = models.BigIntegerField()

    class Meta:
        app_label = "soak"


class Note(models.Model):
    """One row per user on ``default`` (read from its replica; cached)."""

    user = models.BigIntegerField(primary_key=True)
    value = models.BigIntegerField()

    class Meta:
        app_label = "soak"

    def __str__(self) -> str:
        return f"note of {self.user}: {self.value}"


class NoteEntry(models.Model):
    """The note's ledger on ``default``."""

    user = models.BigIntegerField()
    seq = models.BigIntegerField()

    class Meta:
        app_label = "soak"

    def __str__(self) -> str:
        return f"note {self.user} #{self.seq}"
