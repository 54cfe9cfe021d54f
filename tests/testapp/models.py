"""Test models. Each pillar keeps its models in its own module, imported here."""

from __future__ import annotations

from django.db import models

from tests.testapp.models_cache import *  # noqa: F403
from tests.testapp.models_reshard import *  # noqa: F403
from tests.testapp.models_sharding import *  # noqa: F403


class Note(models.Model):
    """An unsharded, uncached model living on ``default`` and read from its replica."""

    title = models.CharField(max_length=200)
    body = models.TextField(default="")

    class Meta:
        app_label = "testapp"

    def __str__(self) -> str:
        return self.title
