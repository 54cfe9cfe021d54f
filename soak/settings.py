"""Settings of the soak's app: ``testproject``'s wiring, addressed through the runner.

The databases and Redis come from ``DBSCALE_SOAK_SERVICES`` (JSON written by
:mod:`soak.runner`: its harness's ``Services.databases()`` and ``redis_url()``). Replica
aliases and Redis point at the runner's :class:`~django_dbscale.testing.proxy.TcpProxy`
ports, so the faults the runner injects (cut, black-hole) reach every gunicorn worker.
With ``python -m soak --promotion`` the runner hands over ``default`` as a libpq multi-host
entry (``target_session_attrs=read-write``) naming every server of its failover cluster,
and ``default_replica`` as that cluster's replica that is never promoted: a promotion
needs no change here and no restart of the workers.
``testproject.settings`` cannot be reused as is: importing it attaches to the servers
(``get_services()``) and puts per-process proxies in front of them, out of the runner's
reach, and fails a worker's boot when a server is down.

The rest (middleware, routers, replica, shard group and cache settings) is
``testproject``'s, plus the soak's two cached models.
"""

from __future__ import annotations

import json
import os
from typing import Any

_ENV = "DBSCALE_SOAK_SERVICES"
try:
    _SERVICES: dict[str, Any] = json.loads(os.environ[_ENV])
except (KeyError, ValueError) as exc:
    raise SystemExit(
        f"soak.settings needs {_ENV}: JSON with 'databases' and 'redis' (the soak runner sets "
        f"it; run `python -m soak`): {exc!r}"
    ) from None

SECRET_KEY = "soak-not-secret"
DEBUG = False
USE_TZ = True
ROOT_URLCONF = "soak.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_dbscale",
    "soak",
]

MIDDLEWARE = ["django_dbscale.middleware.ConsistencyMiddleware"]

DATABASES: dict[str, dict[str, Any]] = _SERVICES["databases"]

DATABASE_ROUTERS = [
    "django_dbscale.routers.ShardRouter",
    "django_dbscale.routers.ReplicaRouter",
]

_REDIS_OPTIONS = {"SOCKET_CONNECT_TIMEOUT": 0.2, "SOCKET_TIMEOUT": 0.2}
# The cache's Redis: the harness's (through the runner's proxy), or under Sentinel
# (``python -m soak --sentinel``: the runner hands over the whole CACHES entry).
_CACHE: dict[str, Any] = _SERVICES.get("cache") or {
    "BACKEND": "django_redis.cache.RedisCache",
    "LOCATION": _SERVICES["redis"],
}
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "dbscale": {**_CACHE, "OPTIONS": {**_CACHE.get("OPTIONS", {}), **_REDIS_OPTIONS}},
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
    "SHARD_GROUPS": {"customers": {"SHARDS": ["shard0", "shard1", "shard2"]}},
    "CACHE": {"ALIAS": "dbscale", "PREFIX": "soak", "MODELS": ["soak.Counter", "soak.Note"]},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_dbscale": {"handlers": ["console"], "level": "WARNING"}},
}
