"""The library's own table: the queryset cache's outbox of undelivered invalidations.

Installed on every primary, shards included (the routers make an exception for this app),
because a write's undelivered invalidation is recorded on the database it wrote to, in the
same transaction where possible. See :mod:`django_dbscale.cache.outbox`.
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
