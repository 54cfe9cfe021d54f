"""The library's own tables.

* :class:`CacheOutbox`: the queryset cache's outbox of undelivered invalidations. Installed
  on every primary, shards included (the routers make an exception for this app), because a
  write's undelivered invalidation is recorded on the database it wrote to, in the same
  transaction where possible. See :mod:`django_dbscale.cache.outbox`.
* :class:`ShardMap` and :class:`ReshardJob`: the active ring of each shard group and the
  resharding jobs. Only the rows on ``default`` mean anything (the tables exist on every
  primary because this app migrates everywhere). See :mod:`django_dbscale.sharding.shardmap`
  and :mod:`django_dbscale.sharding.reshard`.
"""

from __future__ import annotations

from django.db import models
from django.db.models.functions import Now


class CacheOutbox(models.Model):
    """Version keys a committed write must bump, kept while Redis could not be reached."""

    id = models.BigAutoField(primary_key=True)
    created_at = models.DateTimeField(db_default=Now())
    #: The version keys to bump, one per line.
    keys = models.TextField()

    class Meta:
        db_table = "dbscale_cache_outbox"
        verbose_name = "cache outbox entry"
        verbose_name_plural = "cache outbox entries"

    def __str__(self) -> str:
        return f"outbox #{self.id}: {self.keys.count(chr(10)) + 1} keys"


class ShardMap(models.Model):
    """The ring a shard group's rows are placed under right now (one row per group).

    ``SHARD_GROUPS`` in settings declares the *target*; this row is the *active* ring that
    routing follows. Only a resharding changes it, bumping ``version`` when it cuts over.
    """

    group = models.CharField(max_length=100, primary_key=True)
    version = models.PositiveIntegerField()
    #: ``[[alias, weight], ...]`` in ring order.
    shards = models.JSONField()
    vnodes = models.PositiveIntegerField()
    fingerprint = models.CharField(max_length=32)
    #: Shard primary alias -> the WAL position its replicas must have replayed to serve the
    #: group's reads (the position of the last cutover that moved rows onto it).
    floors = models.JSONField(default=dict)
    updated_at = models.DateTimeField(db_default=Now())

    class Meta:
        db_table = "dbscale_shard_map"
        verbose_name = "shard map"
        verbose_name_plural = "shard maps"

    def __str__(self) -> str:
        return f"{self.group} v{self.version} ({self.fingerprint})"


class ReshardJob(models.Model):
    """One resharding of a group: its rings, its phase and its progress (resumable)."""

    id = models.BigAutoField(primary_key=True)
    group = models.CharField(max_length=100)
    phase = models.CharField(max_length=20)
    #: The active ring when the job started and the ring it moves to, as stored in ShardMap.
    source = models.JSONField()
    target = models.JSONField()
    #: Per-phase progress (copied rows, cursors) so a rerun continues where it stopped.
    progress = models.JSONField(default=dict)
    error = models.TextField(blank=True, default="")
    started_at = models.DateTimeField(db_default=Now())
    updated_at = models.DateTimeField(db_default=Now())
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "dbscale_reshard_job"
        verbose_name = "resharding job"
        verbose_name_plural = "resharding jobs"
        constraints = [
            models.UniqueConstraint(
                fields=["group"],
                condition=models.Q(finished_at__isnull=True),
                name="dbscale_one_reshard_per_group",
            )
        ]

    def __str__(self) -> str:
        return f"reshard #{self.id} of {self.group}: {self.phase}"
