"""Service-free part of the test settings (also what mypy's Django plugin loads)."""

from __future__ import annotations

from typing import Any

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ROOT_URLCONF = "tests.urls"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_dbscale",
    "tests.testapp",
]

MIDDLEWARE = [
    "django_dbscale.middleware.ConsistencyMiddleware",
]

DATABASE_ROUTERS = [
    "django_dbscale.routers.ShardRouter",
    "django_dbscale.routers.ReplicaRouter",
]

DATABASES: dict[str, dict[str, Any]] = {
    "default": {"ENGINE": "django_dbscale.backends.postgresql", "NAME": "dbscale"},
}

CACHES: dict[str, dict[str, Any]] = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    # tests/settings.py points it at the harness's Redis; nothing connects at import.
    "dbscale": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": "redis://127.0.0.1:1"},
}

DBSCALE: dict[str, Any] = {
    "REPLICAS": {
        "default": ["default_replica"],
        "shard0": ["shard0_replica"],
        "shard1": ["shard1_replica"],
        "shard2": ["shard2_replica"],
    },
    "MAX_REPLICA_LAG": 2.0,
    "MAX_REPLICA_LAG_BYTES": 1024 * 1024,
    "REPLICA_CHECK_INTERVAL": 0.2,
    "REPLICA_QUARANTINE": (0.2, 2.0),
    # Processes re-read the shard map this often: a resharding's settle phase waits 1.4 s.
    "SHARD_MAP_CHECK_INTERVAL": 0.2,
    "SHARD_GROUPS": {
        "customers": {"SHARDS": ["shard0", "shard1", "shard2"]},
        # Overlaps "customers" on shard1 and shard2, in another order: a database is shard
        # number 2 of customers and 0 of tenants (tests/test_sharding_overlap.py).
        "tenants": {"SHARDS": ["shard2", "shard1"]},
        # Resharded by tests/test_reshard.py: placed on shard0 and shard1 (the shard map),
        # with shard2 declared here as the target.
        "ledgers": {"SHARDS": ["shard0", "shard1", "shard2"]},
    },
    "CACHE": {"ALIAS": "dbscale", "PREFIX": "dbscale-test"},
}
