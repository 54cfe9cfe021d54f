"""Continuity: a process serves nothing from Redis until it has settled what it missed.

An entry is served only if the versions it was filled under are still current. That rule is
as good as Redis's memory of the versions, and there are two ways for that memory to be
wrong that the read path cannot see:

1. **Rolled back.** Redis restarted from a snapshot (RDB or AOF), or a failover promoted a
   replica that had not received the latest bumps: versions and entries roll back
   together, so an entry filled before a lost bump matches its version again.
2. **Never told.** A write committed while its process could not reach Redis; its
   invalidation waits in that database's outbox (:mod:`~django_dbscale.cache.outbox`).

So a process *trusts* Redis only after it has **verified** it, and stops trusting it at
every sign that it may have missed something:

* at start-up (and in each forked worker), everything is untrusted;
* after any Redis error, the process drops all its connections
  (:meth:`~django_dbscale.cache.client.Gateway.connections_lost`) and everything is
  untrusted again;
* every new connection runs :func:`on_connect`, which compares the server's ``run_id``
  with the one verified (a different server makes everything untrusted), and checks the
  verifying thread's kept idle connection (the *canary*): found closed or reset, it means
  a cut or a restart this process's own calls did not see;
* a write whose invalidation went to an outbox makes that database untrusted (:func:`owe`).

While a database is untrusted, cached reads of it go to the database and fills are not
stored (``bypass:unverified``). One background thread per process (:func:`kick`) does the
verifying, so no request ever waits for it:

* it compares the server's ``run_id`` with the one recorded at ``<PREFIX>:run``; a
  different or missing one means a restart, a failover or a flush, and every database's
  *generation* (:func:`~django_dbscale.cache.keys.generation_key`, a version every entry
  depends on) is bumped with the primary's current WAL position, so nothing filled before
  matches and no fill reads a replica lacking a write whose bump was lost;
* it drains every primary's outbox, batch after batch, bumping the rows' keys (dimension
  keys collapsed into their table's wide key, in chunks) with the primary's position read
  after the rows, and deleting them.

A database whose outbox cannot be read stays untrusted and is retried every
``BREAKER_COOLDOWN``; the others are trusted as soon as they are settled. The thread
talks to PostgreSQL on short-lived connections of its own, one at a time.

The one case left: a process that made no Redis call during an outage and whose idle
connections survived it (a network black hole that sent no reset) sees no error, so keeps
trusting Redis until the writer's process (which did see the outage) drains the outbox,
within ``BREAKER_COOLDOWN`` of Redis coming back. ``docs/cache.md`` states this.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import connections
from redis.exceptions import NoScriptError, RedisError

from django_dbscale.cache import outbox, stats
from django_dbscale.cache.keys import UNKNOWN_LSN, format_lsn_hex, generation_key
from django_dbscale.cache.options import options
from django_dbscale.conf import dbscale_settings, on_settings_changed

__all__ = [
    "ALL",
    "distrust",
    "exiting",
    "kick",
    "on_connect",
    "owe",
    "untrusted",
    "verified_run_id",
    "wait_until_verified",
]

logger = logging.getLogger("django_dbscale.cache")

#: In :data:`untrusted`: the server itself is not verified yet, so no database is trusted.
ALL = "*"

#: What reads must not take from Redis yet: :data:`ALL`, or primary aliases whose outbox
#: is not drained. Read on the hot path without the lock (a set's truthiness is atomic).
untrusted: set[str] = {ALL}

_UNKNOWN_HEX = format_lsn_hex(UNKNOWN_LSN).encode()
#: Keys of one outbox bump call (each costs the server a GET, a TTL and a SET).
BUMP_CHUNK = 500
#: Outbox batches drained per database per round; the rest wait for the next round.
MAX_BATCHES = 50

_REFRESH_RUN = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('EXPIRE', KEYS[1], ARGV[2]) end return 0"
)

_lock = threading.Lock()
#: Incremented by every event that may invalidate a verification in progress.
_epoch = [0]
#: The run id verified (empty until the first verification succeeds).
_verified: list[str] = []
#: Run ids seen by connections opened while nothing was verified.
_seen_unverified: set[str] = set()
#: The verifying thread, while one runs.
_worker: list[threading.Thread] = []

#: Set when the interpreter starts exiting: Redis failures seen by background threads from
#: then on (services closing under them) are logged at DEBUG, not as warnings.
_exiting = threading.Event()
atexit.register(_exiting.set)


def exiting() -> bool:
    """Return whether the interpreter is exiting (its ``atexit`` handlers have begun)."""
    return _exiting.is_set()


#: Databases whose generation a detected restart or failover still requires bumping, and
#: the run id to record once none is left.
_owed_generations: set[str] = set()
_run_to_record: list[str] = []
#: The verifying thread's last connection, kept idle: if it is found dead (a reset, a cut,
#: a restart), this process missed something even if its own calls never failed.
_canary: list[Any] = []
_canary_lock = threading.Lock()
#: The outbox poll (``OUTBOX_POLL_INTERVAL``), while armed.
_poll: list[threading.Timer] = []
#: Set when connections reached another server during a round: drop them all.
_drop_connections: list[bool] = []
#: What the ALIAS and PREFIX settings were at the last verification.
_identity: list[tuple[str, str]] = []


def epoch() -> int:
    """Return a number that changes whenever trust in Redis may have been lost.

    A read compares it before and after talking to Redis: a change means what Redis said
    may predate a verification, even if trust is back by then.
    """
    return _epoch[0]


def verified_run_id() -> str | None:
    """Return the run id of the Redis server this process verified, if it trusts one."""
    return _verified[0] if _verified else None


def distrust() -> None:
    """Trust nothing until a new verification (after a Redis error or a server change)."""
    with _lock:
        _epoch[0] += 1
        _verified.clear()
        untrusted.add(ALL)
    _set_canary(None)
    kick()


def owe(alias: str) -> None:
    """Distrust *alias* until its outbox is drained (a write just put a row in it)."""
    with _lock:
        _epoch[0] += 1
        untrusted.add(alias)
    kick()


def kick() -> None:
    """Start the verifying thread if anything is untrusted and none runs."""
    if not untrusted or _worker:  # the common cases, without the lock
        return
    with _lock:
        if _worker or not untrusted:
            return
        worker = threading.Thread(target=_run, name="dbscale-cache-verify", daemon=True)
        _worker.append(worker)
    try:
        worker.start()
    except RuntimeError as exc:  # no thread could be started: try again on the next kick
        with _lock:
            _worker.clear()
        logger.error("Could not start the cache's verifying thread: %s", exc)


def wait_until_verified(timeout: float = 10.0) -> bool:
    """Block until nothing is untrusted (tests, start-up scripts); return whether it is so."""
    deadline = time.monotonic() + timeout
    while untrusted:
        kick()
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


@on_settings_changed
def _reset() -> None:
    with _lock:
        for timer in _poll:
            timer.cancel()
        _poll.clear()
    if _verified:
        with contextlib.suppress(Exception):  # invalid settings: reported where used
            _arm_poll()
    identity = _current_identity()
    if identity is not None and _identity and _identity[0] != identity:
        # Another Redis, or another key space: verify it. Not started from here: the
        # gateway is rebuilt by another settings receiver; the next read starts it.
        with _lock:
            _epoch[0] += 1
            _verified.clear()
            untrusted.add(ALL)


def _current_identity() -> tuple[str, str] | None:
    try:
        raw = dbscale_settings.cache  # unvalidated: a bad value is reported where it is used
    except ImproperlyConfigured:
        return None  # reported by the system checks and by the first use
    return (str(raw.get("ALIAS")), str(raw.get("PREFIX")))


def _after_fork_in_child() -> None:
    # A worker forked long after its parent verified was not watching since; the parent's
    # lock may be held by a thread that does not exist here.
    global _lock, _canary_lock
    _lock = threading.Lock()
    _canary_lock = threading.Lock()
    _worker.clear()
    _poll.clear()
    _canary.clear()  # the parent's socket: never used from here
    _verified.clear()
    _seen_unverified.clear()
    untrusted.clear()
    untrusted.add(ALL)


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- on every new connection -------------------------------------------------------------


#: The run id this process last verified, kept when trust is lost (``_verified`` is not).
#: Verifying another server then invalidates everything even if that server's recorded run
#: id is its own (another process verified it first): this process may have sent
#: invalidations to the old server meanwhile, which the new one never got (a failover's
#: old master stays writable until the sentinels demote it).
_last_verified: list[str] = []


def on_connect(connection: Any) -> None:
    """Set up a new Redis connection and check which server it reached (``INFO``).

    Given to redis-py as ``redis_connect_func``. A server other than the verified one makes
    everything untrusted; on the verified one, the recorded run id's time-to-live is
    refreshed. Never waits for the verification itself.
    """
    connection.on_connect()
    run_id = _run_id(connection)
    verified = _verified[0] if _verified else None
    if verified is None:
        with _lock:
            _seen_unverified.add(run_id)
        kick()
    elif run_id not in verified.split(","):
        logger.warning("Redis server changed (%s -> %s): verifying it.", verified, run_id)
        # Stop using connections to the other server at once, not only once they fail
        # (a failover's old master stays writable for a while). The verification that
        # follows invalidates everything: see _last_verified.
        from django_dbscale.cache.client import gateway

        gateway().connections_lost()
    elif not untrusted and _canary_dead():
        # This process's own calls never failed, but Redis dropped its idle connection
        # (a cut, a restart): it may have missed invalidations meanwhile.
        logger.warning("The cache's idle Redis connection was lost: verifying Redis.")
        distrust()
    else:
        # Extend the recorded run id's life, but never record it: only the verifying
        # thread does, once every generation is bumped.
        key = f"{options().prefix}:run"
        if options().cluster and not _holds(connection, key):
            return  # another node holds it (a connection to that one refreshes it)
        _call(connection, "EVAL", _REFRESH_RUN, 1, key, verified, _run_ttl())


def _holds(connection: Any, key: str) -> bool:
    """Return whether *connection*'s cluster node owns *key*'s slot (``False`` if unknown)."""
    from django_dbscale.cache.client import RedisUnavailable, gateway

    try:
        owner = gateway()._node_for(key.encode())
    except (RedisUnavailable, RedisError):  # the slot map is not read yet
        return False
    return bool(owner.name == f"{connection.host}:{connection.port}")


def _call(connection: Any, *args: Any) -> Any:
    connection.send_command(*args)
    return connection.read_response()


def _run_id(connection: Any) -> str:
    """Return the run id of the server behind *connection*.

    For a Redis Cluster (the verifying thread's
    :class:`~django_dbscale.cache.client.ClusterRoute`) the cluster's identity: the run ids
    of all its primaries, sorted and joined with ``,``. The cluster is "the verified
    server" as a whole: a restart or failover of any primary changes it, and then every
    database's generation is bumped (whichever node it lives on), as for a single Redis. A
    new connection to one node is checked against the members of that identity.
    """
    nodes = getattr(connection, "node_connections", None)
    if nodes is not None:
        return ",".join(sorted(_run_id(node) for node in nodes()))
    info = _call(connection, "INFO", "server")
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line.partition(":")[2].strip()
    if not _warned_no_run_id:
        _warned_no_run_id.append(True)
        logger.error(
            "The cache's Redis server reports no run_id in INFO (a proxy?): restarts and "
            "failovers cannot be detected, so entries rolled back with them may be served."
        )
    return "unknown"


_warned_no_run_id: list[bool] = []


def _set_canary(connection: Any) -> None:
    with _canary_lock:
        old = _canary[0] if _canary else None
        _canary[:] = [connection] if connection is not None else []
    if old is not None and old is not connection:
        with contextlib.suppress(Exception):
            old.disconnect()


def _canary_dead() -> bool:
    """Return whether the kept idle connection was closed or reset since it was kept.

    No connection kept yet (a round is just ending) is not a death.
    """
    with _canary_lock:
        connection = _canary[0] if _canary else None
        if connection is None:
            return False
        if getattr(connection, "_sock", None) is None:
            return True
        try:
            return bool(connection.can_read(timeout=0))  # an idle connection has nothing
        except Exception:  # closed by the server: reading says so
            return True


def _run_ttl() -> int:
    return options().version_timeout


# -- the verifying thread ----------------------------------------------------------------


def _run() -> None:
    try:
        while True:
            try:
                outcome = _verify_once()
                delay = options().breaker_cooldown if outcome == "failed" else 0.05
            except Exception as exc:
                log = logger.debug if exiting() else logger.warning
                log("Verifying the cache's Redis failed (%s); retrying.", exc)
                outcome, delay = "failed", 1.0
                with _suppress_settings_errors():
                    delay = options().breaker_cooldown
            with _lock:
                done = not untrusted
            if done:
                with contextlib.suppress(Exception):  # invalid settings: reported where used
                    _arm_poll()
                return
            if outcome != "settled":
                time.sleep(max(delay, 0.05))
    finally:
        with _lock:
            _worker.clear()
        if untrusted:
            kick()  # ended by an error while work was left: hand over to a new thread


@contextlib.contextmanager
def _suppress_settings_errors() -> Iterator[None]:
    try:
        yield
    except Exception:
        logger.warning("The cache settings are invalid; retrying in 1 s.")


class _Abandoned(Exception):
    """Something happened during a round (an error, another server, a new outbox row)."""


#: Seconds between checks of the change-capture relay's heartbeat (``CACHE["CAPTURE"]``).
RELAY_CHECK_INTERVAL = 1.0
#: Databases whose relay heartbeat was missing at the last check (warned about once).
_relay_missing: set[str] = set()
#: Aliases found to reach a standby: no relay serves them, and nothing is written there.
_standbys: set[str] = set()


def relay_key(prefix: str, alias: str) -> str:
    """Return the Redis key the change-capture relay refreshes while it serves *alias*."""
    return f"{prefix}:relay:{alias}"


def _arm_poll() -> None:
    """Check the outboxes every ``OUTBOX_POLL_INTERVAL`` seconds, and the relay, if set.

    For what no Redis error reveals: another process's owed invalidation while this one's
    connections stayed up (a black hole, or an outage only the writer saw). A database with
    rows becomes untrusted, and the verifying thread drains it. With ``CACHE["CAPTURE"]``,
    every ``RELAY_CHECK_INTERVAL`` seconds: a database whose relay heartbeat is missing is
    untrusted and drained by this process itself, so writes from outside Django are never
    served stale for longer than that while the relay is down.
    """
    opts = options()
    intervals = [opts.outbox_poll_interval] if opts.outbox_poll_interval is not None else []
    if opts.capture:
        intervals.append(RELAY_CHECK_INTERVAL)
    if not intervals:
        return
    with _lock:
        if _poll:
            return
        timer = threading.Timer(min(intervals), _poll_outboxes)
        timer.daemon = True
        _poll.append(timer)
    timer.start()


def _check_relay(aliases: list[str]) -> None:
    """Untrust the databases whose change-capture relay is not running (heartbeat gone)."""
    from django_dbscale.cache.client import gateway

    prefix = options().prefix
    try:
        client = gateway().client
        keys = [relay_key(prefix, alias) for alias in aliases]
        # One key at a time on a cluster: it refuses an MGET across slots.
        cluster = options().cluster
        beats = [client.get(key) for key in keys] if cluster else client.mget(keys)
    except Exception:  # Redis unreachable: the breaker and verification deal with that
        return
    for alias, beat in zip(aliases, beats, strict=True):
        if beat is not None:
            if alias in _relay_missing:
                _relay_missing.discard(alias)
                logger.warning("The cache's change-capture relay for %r is back.", alias)
            continue
        if alias not in _relay_missing:
            _relay_missing.add(alias)
            logger.warning(
                "No change-capture relay serves %r (`manage.py dbscale cache relay`): this "
                "process drains its outbox itself every %.0f s meanwhile.",
                alias,
                RELAY_CHECK_INTERVAL,
            )
        if alias not in untrusted and ALL not in untrusted and alias not in _standbys:
            owe(alias)


_last_outbox_poll = [0.0]


def _poll_outboxes() -> None:
    with _lock:
        _poll.clear()
    try:
        opts = options()
        aliases = outbox.outbox_aliases()
        if opts.capture:
            _check_relay(aliases)
        interval = opts.outbox_poll_interval
        now = time.monotonic()
        if interval is not None and now - _last_outbox_poll[0] >= interval * 0.99:
            _last_outbox_poll[0] = now
            for alias in aliases:
                if alias in untrusted or ALL in untrusted:
                    continue
                with outbox.connect(alias) as own:
                    if outbox.has_rows(own) and not outbox.in_recovery(own):
                        logger.warning("%r's cache outbox has rows: draining them.", alias)
                        owe(alias)
    except Exception as exc:
        logger.warning("Polling the cache outboxes failed: %s", exc)
    with contextlib.suppress(Exception):
        _arm_poll()


def _verify_once() -> str:
    """Run one round; return ``settled``, ``failed``, ``more`` or ``abandoned``."""
    from django_dbscale.cache.client import gateway

    with _lock:
        epoch = _epoch[0]
        whole = ALL in untrusted
        aliases = _aliases() if whole else sorted(untrusted)
        identity = _current_identity()
        if identity is not None:
            _identity[:] = [identity]
    gw = gateway()
    if not gw.available():
        return "failed"
    connection = gw.open_connection()
    keep = False
    try:
        outcome = _verify_on(connection, epoch, whole, aliases)
        keep = True  # a round that ran to its end talked to the verified server
        return outcome
    except _Abandoned:
        return "abandoned"
    except (RedisError, OSError) as exc:
        gw.failed(exc, "verify")
        raise
    finally:
        if keep:
            _set_canary(connection)  # the server it verified: watch it from now on
        else:
            connection.disconnect()
        if _drop_connections:
            _drop_connections.clear()
            gw.connections_lost()


def _verify_on(connection: Any, epoch: int, whole: bool, aliases: list[str]) -> str:
    """Verify the server behind *connection* and settle *aliases* (see the module docstring).

    Return ``settled``, ``failed`` (a database could not be settled) or ``more`` (an outbox
    holds more rows than one round drains). Each database is trusted as soon as it is
    settled, so one slow or unreachable primary does not hold back the others. Anything
    that happens meanwhile (an error, another server, a new outbox row) raises
    :class:`_Abandoned`: the caller starts another round shortly. Generation bumps a
    restart requires are remembered across rounds until each is done.
    """
    opts = options()
    run_id = _run_id(connection)
    stored = None
    if whole:
        stored = _call(connection, "GET", f"{opts.prefix}:run")
        with _lock:
            _still(epoch, run_id)
            switched = bool(_last_verified) and _last_verified[0] != run_id
            if stored is None or stored.decode() != run_id or switched:
                _owed_generations.update(aliases)  # a whole round: every alias
                _run_to_record[:] = [run_id]
                stats.incr("redis", "generation_bump")
                if switched and stored is not None and stored.decode() == run_id:
                    logger.warning(
                        "Redis server %s: this process was using another one (%s) until "
                        "now (a failover). Every cached entry is invalidated.",
                        run_id,
                        _last_verified[0],
                    )
                else:
                    logger.log(
                        logging.INFO if stored is None else logging.WARNING,
                        "Redis server %s is not the one last verified (%s): restarted, failed "
                        "over or flushed. Every cached entry is invalidated.",
                        run_id,
                        stored.decode() if stored is not None else "none recorded",
                    )
            elif not _owed_generations:
                _run_to_record[:] = [run_id]  # refresh its time-to-live
            # The server is known now; each database stays untrusted until it is settled
            # (added before ALL goes: readers look without the lock).
            _verified[:] = [run_id]
            _last_verified[:] = [run_id]
            untrusted.update(aliases)
            untrusted.discard(ALL)
    failed: set[str] = set()
    more = False
    for alias in aliases:
        try:
            _settle(connection, alias, epoch)
        except (RedisError, _Abandoned):
            raise
        except _MoreRows:
            more = True
            continue
        except Exception as exc:
            logger.warning(
                "Could not drain %r's cache outbox (%s); its cached reads go to the "
                "database until it is drained.",
                alias,
                exc,
            )
            failed.add(alias)
            if alias in _owed_generations:  # bumped now; given a position once readable
                _bump(connection, [generation_key(opts.prefix, alias)], UNKNOWN_LSN)
                _owed_generations.discard(alias)
            continue
        with _lock:
            _still(epoch, run_id)
            untrusted.discard(alias)
    if _run_to_record and not _owed_generations:
        # Only now: every generation is bumped (a process dying before this leaves the
        # old run id, and the next process bumps them all again).
        _call(connection, "SET", f"{opts.prefix}:run", _run_to_record[0], "EX", _run_ttl())
        _run_to_record.clear()
    with _lock:
        _still(epoch, run_id)
    return "failed" if failed else "more" if more else "settled"


class _MoreRows(Exception):
    """An outbox holds more rows than one round drains: continue in the next round."""


def _still(epoch: int, run_id: str) -> None:
    """Raise :class:`_Abandoned` if anything happened since the round began (lock held).

    Connections opened meanwhile that reached another server (a failover under way) are
    dropped, which starts everything over.
    """
    others = _seen_unverified - set(run_id.split(","))
    _seen_unverified.clear()
    if others:
        _drop_connections.append(True)  # done by _verify_once, outside the lock
        raise _Abandoned
    if _epoch[0] != epoch:
        raise _Abandoned


def _aliases() -> list[str]:
    """Every database entries can come from, once: by the alias that names it."""
    names = dbscale_settings.database_of
    return sorted(alias for alias in connections.settings if names.get(alias, alias) == alias)


def _settle(connection: Any, alias: str, epoch: int) -> None:
    """Bump *alias*'s generation if owed and drain its outbox (raises if it cannot)."""
    generation = generation_key(options().prefix, alias)
    owed = alias in _owed_generations

    def bump_generation(lsn: int) -> None:
        _bump(connection, [generation], lsn)
        _owed_generations.discard(alias)

    if alias not in outbox.outbox_aliases():
        if owed:
            bump_generation(0)
        return
    with outbox.connect(alias) as own:
        if outbox.in_recovery(own):  # a standby under an alias not declared a replica
            _standbys.add(alias)  # no relay serves it: the relay check leaves it alone
            if owed:
                bump_generation(0)
            return
        has_replicas = bool(dbscale_settings.replicas.get(alias))
        lsn = _position(own, has_replicas)
        current = None if owed else _call(connection, "GET", generation)
        if owed or (current is not None and current.endswith(_UNKNOWN_HEX)):
            # Owed after a restart, or bumped earlier while this primary's position was
            # unknown: give it one.
            bump_generation(lsn)
        for _ in range(MAX_BATCHES):
            rows = outbox.pending(own)
            if not rows:
                return
            # Read after the rows: past the commit of every one of them.
            lsn = _position(own, has_replicas)
            keys = outbox.collapse(key for _, row_keys in rows for key in row_keys)
            for start in range(0, len(keys), BUMP_CHUNK):
                _bump(connection, keys[start : start + BUMP_CHUNK], lsn)
            if _epoch[0] != epoch:  # e.g. the settings now name another Redis: keep them
                raise _Abandoned
            outbox.delete(own, [row_id for row_id, _ in rows])
            stats.incr(f"db:{alias}", "outbox_drained", len(rows))
            # Info, not a warning: with change capture on, the outbox also carries every
            # external write, drained by the relay in normal operation.
            logger.info(
                "Delivered %d invalidation(s) from %r's cache outbox.",
                len(rows),
                alias,
            )
            if len(rows) < outbox.DRAIN_BATCH:
                return
        raise _MoreRows


def _position(own: Any, has_replicas: bool) -> int:
    return outbox.primary_position(own) if has_replicas else 0


def _bump(connection: Any, keys: list[str], lsn: int) -> None:
    from django_dbscale.cache.client import BUMP, bump_call, gateway

    # One call per hash slot in a cluster (keys queued before CLUSTER was set lack the tag).
    for group in gateway().slot_groups(keys):
        args = bump_call(group, lsn)
        try:
            _call(connection, *args)
        except NoScriptError:
            _call(connection, "SCRIPT", "LOAD", BUMP.source)
            _call(connection, *args)
