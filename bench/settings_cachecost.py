"""Settings of the miss/write cost workers of ``bench.bench_cache`` (one per process).

The test settings, with every database and Redis reached directly (not through the
harness's Python TCP proxies, which would add their own latency to both sides of every
ratio), and the queryset cache declared or not: ``BENCH_CACHE=off`` leaves
``DBSCALE["CACHE"]`` out, so the cache is off the way a project without it has it off (no
hooks connected, no cache code imported by the backend).
"""

from __future__ import annotations

import os

from django_dbscale.testing.harness import ALIASES
from tests.settings import *  # noqa: F403
from tests.settings import CACHES, DATABASES, DBSCALE, _services

for _alias, _entry in DATABASES.items():
    if _alias in ALIASES:
        _server = _services.alias_server(_alias)
        _entry["HOST"], _entry["PORT"] = _server.host, str(_server.port)

CACHES["dbscale"]["LOCATION"] = _services.redis.direct_url

if os.environ.get("BENCH_CACHE") == "off":
    DBSCALE = {key: value for key, value in DBSCALE.items() if key != "CACHE"}
