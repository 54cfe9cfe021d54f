"""Continuity: what a process checks on a new Redis connection before its first command.

An entry is served only if the versions it was filled under are still current. That rule is
as good as Redis's memory of the versions, and there are two ways for that memory to be
wrong that the read path cannot see:

1. **Rolled back.** Redis restarted from a snapshot (RDB or AOF), or a failover promoted a
   replica that had not received the latest bumps: versions and entries roll back
   together, so an entry filled before a lost bump matches its version again.
2. **Never told.** A write committed while its process could not reach Redis; its
   invalidation waits in that database's outbox (:mod:`~django_dbscale.cache.outbox`),
   while other processes may be talking to Redis again.

Both are caught where they must show: on a *new connection*. Every connection the cache
opens runs :func:`on_connect` first, and after any Redis error a process drops all its
connections (:meth:`~django_dbscale.cache.client.Gateway.connections_lost`), so the next
command, whatever its path, goes through this check. A process that already verified the
same server since its last error only compares run ids (one ``INFO``); otherwise it
verifies:

* it compares the server's ``run_id`` with the one recorded at ``<PREFIX>:run``. A
  different (or missing) one means a restart or a failover: every database's *generation*
  (:func:`~django_dbscale.cache.keys.generation_key`, a version every entry depends on) is
  bumped, so nothing filled before can match, with each primary's current WAL position, so
  no fill reads a replica that lacks a write whose bump was lost;
* it drains every primary's outbox: bumps the keys of every row, with the primary's
  current position, and deletes the rows.

A primary whose outbox cannot be read (database unreachable) is *untrusted* in this
process: cached reads touching it go to the database, and a background timer retries every
``BREAKER_COOLDOWN`` until the drain succeeds. The check runs on a short-lived PostgreSQL
connection of its own, never inside the caller's transaction.

The one case left: a process that made no Redis call during an outage and whose idle
connections survived it (a network black hole that sent no reset) sees no error, so keeps
serving until some process that did see the outage drains the outbox (the writer's own
background retry does, within ``BREAKER_COOLDOWN``). ``docs/cache.md`` states this.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from django.db import connections
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from django_dbscale.cache import outbox, stats
from django_dbscale.cache.keys import generation_key, tokens
from django_dbscale.cache.options import options
from django_dbscale.conf import dbscale_settings, on_settings_changed

__all__ = ["distrust", "on_connect", "untrusted", "verified_run_id"]

logger = logging.getLogger("django_dbscale.cache")

#: Primaries whose outbox could not be drained: reads touching them bypass the cache.
untrusted: set[str] = set()

_lock = threading.Lock()
#: The run id of the server this process verified since its last Redis error.
_verified: list[str] = []
_reverify: list[threading.Timer] = []

_UNKNOWN_LSN = "f" * 16


def verified_run_id() -> str | None:
    """Return the run id this process verified since its last Redis error, if any."""
    return _verified[0] if _verified else None


def distrust() -> None:
    """Forget the verification: the next new connection verifies again (after errors)."""
    _verified.clear()


@on_settings_changed
def _reset() -> None:
    with _lock:
        _verified.clear()
        untrusted.clear()
        for timer in _reverify:
            timer.cancel()
        _reverify.clear()


def _after_fork_in_child() -> None:
    # The timer's thread does not exist in the child, and a worker forked long after its
    # parent verified must verify for itself: it was not watching what happened since.
    _reverify.clear()
    _verified.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def on_connect(connection: Any) -> None:
    """Set up a new Redis connection, then verify the server before anything else uses it.

    Given to redis-py as ``redis_connect_func``, so it runs inside ``connect()``; errors
    other than Redis's own become :class:`redis.exceptions.ConnectionError`, so the cache
    is bypassed rather than the caller's query failing.
    """
    connection.on_connect()
    try:
        run_id = _run_id(connection)
        if _verified and _verified[0] == run_id:
            return
        with _lock:
            if _verified and _verified[0] == run_id:
                return
            _verify(connection, run_id)
    except RedisError:
        raise
    except Exception as exc:
        logger.exception("Verifying a new Redis connection failed.")
        raise RedisConnectionError(f"dbscale could not verify the Redis server: {exc}") from exc


def _call(connection: Any, *args: Any) -> Any:
    connection.send_command(*args)
    return connection.read_response()


def _run_id(connection: Any) -> str:
    info = _call(connection, "INFO", "server")
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line.partition(":")[2].strip()
    raise RedisConnectionError("INFO server returned no run_id")


def _bump(connection: Any, keys: list[str], lsn_hex: str) -> None:
    from django_dbscale.cache.client import BUMP

    opts = options()
    args = (
        "EVALSHA",
        BUMP.sha,
        len(keys),
        *keys,
        tokens.next(),
        lsn_hex,
        opts.version_timeout,
        min(opts.timeout + 60, opts.version_timeout),
    )
    try:
        _call(connection, *args)
    except NoScriptError:
        _call(connection, "SCRIPT", "LOAD", BUMP.source)
        _call(connection, *args)


def _aliases() -> list[str]:
    """Every database entries can come from: each alias that is not a replica."""
    replicas = dbscale_settings.primary_of
    return sorted(alias for alias in connections.settings if alias not in replicas)


def _inspect(alias: str) -> tuple[str, list[tuple[int, list[str]]], Any]:
    """Return *alias*'s position (hex), outbox rows and the open connection (or ``None``)."""
    if alias not in outbox.outbox_aliases():
        return "0" * 16, [], None
    own = outbox.connect(alias)
    try:
        rows = outbox.pending(own)
        # Read after the rows: past the commit of every one of them.
        lsn = outbox.primary_position(own) if dbscale_settings.replicas.get(alias) else 0
    except BaseException:
        own.close()
        raise
    return f"{lsn:016x}", rows, own


def _verify(connection: Any, run_id: str) -> None:
    opts = options()
    run_key = f"{opts.prefix}:run"
    stored = _call(connection, "GET", run_key)
    new_server = stored is None or stored.decode() != run_id
    complete = True
    for alias in _aliases():
        try:
            lsn_hex, rows, own = _inspect(alias)
        except Exception as exc:
            logger.warning(
                "Could not read %r's cache outbox (%s); cached reads of %r go to the "
                "database until it can be drained.",
                alias,
                exc,
                alias,
            )
            untrusted.add(alias)
            complete = False
            if new_server:
                _bump(connection, [generation_key(opts.prefix, alias)], _UNKNOWN_LSN)
            continue
        try:
            if new_server:
                _bump(connection, [generation_key(opts.prefix, alias)], lsn_hex)
            if rows:
                keys = sorted({key for _, row_keys in rows for key in row_keys})
                _bump(connection, keys, lsn_hex)
                if own is not None:
                    try:
                        outbox.delete(own, [row_id for row_id, _ in rows])
                    except Exception as exc:  # e.g. a read-only standby: bumped again later
                        logger.warning("Could not delete %r's drained outbox rows: %s", alias, exc)
                stats.incr(f"db:{alias}", "outbox_drained", len(rows))
                logger.warning(
                    "Delivered %d undelivered invalidation(s) from %r's cache outbox.",
                    len(rows),
                    alias,
                )
            untrusted.discard(alias)
        finally:
            if own is not None:
                own.close()
    if new_server:
        # No run id at all is a new or flushed Redis (nothing to revive): not alarming.
        logger.log(
            logging.INFO if stored is None else logging.WARNING,
            "Redis server %s is not the one the cache last verified (%s): restarted, "
            "failed over or flushed. Every cached entry was invalidated.",
            run_id,
            stored.decode() if stored is not None else "none recorded",
        )
        stats.incr("redis", "generation_bump")
    if complete:
        _call(connection, "SET", run_key, run_id, "EX", opts.version_timeout)
    _verified[:] = [run_id]
    if untrusted:
        _schedule_reverify()


def _schedule_reverify() -> None:
    if _reverify:
        return
    timer = threading.Timer(max(options().breaker_cooldown, 0.05), _reverify_now)
    timer.daemon = True
    _reverify.append(timer)
    timer.start()


def _reverify_now() -> None:
    from django_dbscale.cache.client import gateway

    with _lock:
        _reverify.clear()
    distrust()
    try:
        gateway().verify()
    except Exception:
        logger.warning("Re-verifying the cache's Redis connection failed; retrying later.")
    if untrusted:
        with _lock:
            _schedule_reverify()
