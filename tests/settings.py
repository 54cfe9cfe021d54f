"""Settings for the test suite: real PostgreSQL primaries, replicas, shards and Redis.

Importing this module boots the services through :mod:`django_dbscale.testing.harness`
(once per process), unless ``DBSCALE_TEST_EXTERNAL=1`` points it at running ones.
"""

from __future__ import annotations

from django_dbscale.testing.harness import get_services
from tests.settings_static import *  # noqa: F403

_services = get_services()

DATABASES = _services.databases()
# The default database through Django's own PostgreSQL backend: a "foreign ENGINE" primary
# (no WAL tracking by the dbscale backend) for the time-based read-your-writes fallback.
DATABASES["default_plain"] = {
    **DATABASES["default"],
    "ENGINE": "django.db.backends.postgresql",
    "TEST": {"MIRROR": "default"},
}
# A second dbscale alias of the default database (as a project keeps one for another
# isolation level): the cache must treat both as one database.
DATABASES["default_twin"] = {**DATABASES["default"], "TEST": {"MIRROR": "default"}}
# A second alias for the same replica server, reached directly (not through the proxy):
# lets tests spread reads over two "replicas" by weight. Listed in REPLICAS only by tests.
DATABASES["default_replica_direct"] = {
    **DATABASES["default_replica"],
    "HOST": _services.pg1_replica.host,
    "PORT": str(_services.pg1_replica.port),
}

CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "dbscale": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": _services.redis_url(0),
        "OPTIONS": {
            "SOCKET_CONNECT_TIMEOUT": 0.5,
            "SOCKET_TIMEOUT": 0.5,
        },
    },
}
