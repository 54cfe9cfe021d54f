"""django_dbscale: scale a Django project's PostgreSQL layer without rewriting its code.

Read/write splitting with replica-lag awareness and read-your-writes, consistent-hash
sharding, and a Redis queryset cache, sharing one consistency model
(:mod:`django_dbscale.consistency`). The names below are the public API.
"""

from __future__ import annotations

from django_dbscale.consistency import (
    InvalidConsistencyToken,
    consistency_context,
    consistency_token,
    read_at_least,
    use_database,
    use_primary,
    use_replica,
)

__all__ = [
    "InvalidConsistencyToken",
    "consistency_context",
    "consistency_token",
    "read_at_least",
    "use_database",
    "use_primary",
    "use_replica",
]
