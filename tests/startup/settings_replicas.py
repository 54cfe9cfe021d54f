"""Read/write splitting alone: the README's minimal block (no CACHES["dbscale"], no Redis)."""

from __future__ import annotations

from tests.startup._base import *  # noqa: F403
from tests.startup._base import SERVERS

DATABASES = {
    "default": SERVERS["default"],
    "default_replica": {**SERVERS["default_replica"], "TEST": {"MIRROR": "default"}},
}
DATABASE_ROUTERS = ["django_dbscale.routers.ReplicaRouter"]
DBSCALE = {
    "REPLICAS": {"default": ["default_replica"]},
    "MAX_REPLICA_LAG": 5.0,
}
