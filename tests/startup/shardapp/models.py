"""One sharded model, for a project that uses sharding alone."""

from __future__ import annotations

from django.db import models

from django_dbscale.sharding.models import ShardedModel


class StartupAccount(ShardedModel):
    """Keyed by its own id, which the application assigns."""

    shard_group = "customers"
    shard_key = "id"

    id = models.BigIntegerField(primary_key=True)
    name = models.CharField(max_length=100)

    class Meta:
        app_label = "shardapp"
