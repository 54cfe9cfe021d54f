"""Connections the library opens for itself, independent of Django's per-thread ones.

Used where Django's connection may be inside the caller's transaction (or counted by the
caller's ``assertNumQueries``): the cache outbox and relays, the shard map's version check,
and the resharding engine, which streams rows between databases while the site writes.
"""

from __future__ import annotations

from typing import Any

import psycopg
from django.db import connections

__all__ = ["connect", "connection_params"]


def connection_params(alias: str, **overrides: Any) -> dict[str, Any]:
    """Return psycopg connection parameters for Django database *alias*.

    Django's own (so every libpq option of the alias's ``OPTIONS``: TLS, service files,
    ``target_session_attrs`` of a multi-host alias), without the driver objects Django adds
    for its own connections, plus short network timeouts: a server that stops answering
    mid-statement (a network black hole) must not hold the caller for the kernel's
    retransmission timeout (minutes). *overrides* replace any parameter
    (``connect_timeout``, ``options``, ``application_name``).
    """
    params = connections[alias].get_connection_params()
    for key in ("cursor_factory", "context", "prepare_threshold", "client_encoding"):
        params.pop(key, None)
    params.setdefault("connect_timeout", 3)
    params.setdefault("tcp_user_timeout", 5000)
    params.setdefault("keepalives", 1)
    params.setdefault("keepalives_idle", 5)
    params.setdefault("keepalives_interval", 2)
    params.setdefault("keepalives_count", 2)
    # No server-side prepared statements (psycopg prepares a query run 5 times on one
    # connection, as the relay's poll and the lag probes do): behind PgBouncer's
    # transaction pooling (< 1.21) the next run may land on a server session that never
    # saw the PREPARE.
    params.setdefault("prepare_threshold", None)
    params.update(overrides)
    return params


def connect(alias: str, *, autocommit: bool = True, **overrides: Any) -> psycopg.Connection[Any]:
    """Return a new psycopg connection to Django database *alias* (the caller closes it).

    With :func:`connection_params` (the alias's options, short network timeouts,
    *overrides*).
    """
    return psycopg.connect(**connection_params(alias, **overrides), autocommit=autocommit)
