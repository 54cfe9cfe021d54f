"""The queryset cache alone: one database, Redis, and a third-party model cached by name."""

from __future__ import annotations

from tests.startup._base import *  # noqa: F403
from tests.startup._base import CACHES, REDIS_URL, SERVERS

DATABASES = {"default": SERVERS["default"]}
CACHES = {
    **CACHES,
    "dbscale": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": REDIS_URL},
}
DBSCALE = {
    "CACHE": {"MODELS": ["auth.Group"], "PREFIX": "dbscale-startup"},
}
