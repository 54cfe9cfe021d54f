"""The example shop: notes on ``default`` (read from its replica)."""

from __future__ import annotations

from django.db import models


class Article(models.Model):
    """An unsharded model: written to ``default``, read from ``default_replica``."""

    title = models.CharField(max_length=200)
    views = models.IntegerField(default=0)

    def __str__(self) -> str:
        return self.title
