"""Settings of the example project: how a team wires django_dbscale in.

The databases and Redis come from the repo's services harness (it boots throwaway servers,
or attaches to running ones when ``DBSCALE_TEST_EXTERNAL=1``). A real project writes the
same ``DATABASES`` by hand; everything else below is what it would copy.
"""

from __future__ import annotations

from typing import Any

from django_dbscale.testing.harness import get_services

services = get_services()

SECRET_KEY = "example-project-not-secret"
DEBUG = False
USE_TZ = True
ROOT_URLCONF = "testproject.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_dbscale",
    "shop",
]

MIDDLEWARE = ["django_dbscale.middleware.ConsistencyMiddleware"]

# Every alias uses the dbscale backend: it tracks writes for read-your-writes and fails
# reads over from a broken replica to its primary.
DATABASES: dict[str, dict[str, Any]] = services.databases()

DATABASE_ROUTERS = [
    "django_dbscale.routers.ShardRouter",
    "django_dbscale.routers.ReplicaRouter",
]

CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "dbscale": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": services.redis_url(1),
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.2, "SOCKET_TIMEOUT": 0.2},
    },
}

DBSCALE: dict[str, Any] = {
    "REPLICAS": {
        "default": ["default_replica"],
        "shard0": ["shard0_replica"],
        "shard1": ["shard1_replica"],
        "shard2": ["shard2_replica"],
    },
    "MAX_REPLICA_LAG": 5.0,
    "REPLICA_CHECK_INTERVAL": 0.5,
    "SHARD_GROUPS": {
        "customers": {"SHARDS": ["shard0", "shard1", "shard2"]},
        # Grown online by the demo (testproject/demo_reshard.py): it places the group's rows
        # on shard0 and shard1 (the active ring in the shard map), then reshards it onto the
        # three shards declared here while a writer keeps writing.
        "ledgers": {"SHARDS": ["shard0", "shard1", "shard2"]},
    },
    "CACHE": {"ALIAS": "dbscale", "PREFIX": "shop"},
}

LOGGING = {
    "version": 1,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_dbscale": {"handlers": ["console"], "level": "WARNING"}},
}
