"""Read/write splitting: where a read of a primary's data goes (the replica policy).

The routing decision (:func:`read_alias`) runs on every read and makes no network round
trip: it consults a per-process :class:`ReplicaMonitor`. The monitor is owned machinery:
one long-lived thread per process (``dbscale-replica-monitor``) starts a probe round every
``REPLICA_CHECK_INTERVAL`` seconds whether or not the process serves reads, and each
database probed has one long-lived prober thread (``dbscale-probe[alias]``) that runs its
probes one at a time, so a hung replica delays only its own prober, never another
replica's measurements nor a request. It is started by :meth:`ReplicaMonitor.start` or by
the first read, stopped by :meth:`ReplicaMonitor.stop`, and a forked child starts its own.

A replica is **eligible** for a read when

* its last probe succeeded and it is not quarantined,
* it is still in recovery and its WAL receiver is streaming (a disconnected receiver means
  it is falling behind, whatever the numbers say), and
* its replay lag is within budget: ``lag_seconds <= MAX_REPLICA_LAG`` **or**
  ``lag_bytes <= MAX_REPLICA_LAG_BYTES``. Time lag alone misleads on an idle primary (the
  last replayed commit gets old while nothing is missing), so either measure suffices, as in
  GitLab's load balancer;
* its measurements are fresh: taken less than ``2 * REPLICA_CHECK_INTERVAL + 2 *
  REPLICA_PROBE_TIMEOUT`` seconds ago (see :func:`stale_after`). A running monitor never
  lets them get that old; when it does not deliver (stopped, starved, a process resumed
  after a pause), reads go to the primary with reason ``"stale"`` instead of trusting a
  replica that may since have fallen seconds or megabytes behind;
* and, when the context must read its own writes, its replayed LSN (a lower bound kept per
  process) has reached the context's required position.

A process's first read of a primary whose replicas have never been probed (a fresh worker,
or the first read after a settings change) waits for the first probe round, at most
``REPLICA_PROBE_TIMEOUT`` seconds; a replica that has not answered by then counts as down
for that read. So a deploy that restarts every worker does not send every read to the
primaries, and a dead replica costs each early read at most the probe timeout.

A context stays on the replica it first read from (monotonic reads). Once it reads from the
primary for a reason other than ``use_replica``, it stays on the primary: moving back to a
replica could show it an older state than it has already seen.

Failures (a probe error or timeout, or a query that broke, reported by the backend) put a
replica in quarantine with exponential backoff (``REPLICA_QUARANTINE``); a successful probe
after the backoff re-admits it. While a replica is quarantined the backend dials no new
connection of its alias, whichever path asks for one (:func:`check_not_quarantined`).
"""

from __future__ import annotations

import atexit
import math
import os
import time
from dataclasses import dataclass

from django.conf import settings
from django.db import connections

from django_dbscale import consistency, signals
from django_dbscale.conf import ReplicaSpec, dbscale_settings, on_settings_changed
from django_dbscale.replicas.monitor import (
    ReplicaMonitor,
    ReplicaQuarantined,
    ReplicaStatus,
    _after_fork_in_child,
    stale_after,
)
from django_dbscale.replicas.reasons import (
    CACHE_FILL,
    DOWN,
    FAILOVER,
    FORCED,
    IN_TRANSACTION,
    LAGGING,
    NO_REPLICAS,
    PINNED_PRIMARY,
    PRIMARY_DOWN,
    QUARANTINED,
    READ_YOUR_WRITES,
    REPLICA,
    RESHARDED,
    STALE,
    UNKNOWN,
)

__all__ = [
    "CACHE_FILL",
    "DOWN",
    "FAILOVER",
    "FORCED",
    "IN_TRANSACTION",
    "LAGGING",
    "NO_REPLICAS",
    "PINNED_PRIMARY",
    "PRIMARY_DOWN",
    "QUARANTINED",
    "READ_YOUR_WRITES",
    "REPLICA",
    "RESHARDED",
    "STALE",
    "UNKNOWN",
    "ReplicaMonitor",
    "ReplicaQuarantined",
    "ReplicaStatus",
    "check_not_quarantined",
    "failed_over",
    "replica_for_down_primary",
    "monitor",
    "read_alias",
    "replayed_lsn",
    "report_failure",
    "route_counts",
    "stale_after",
]

#: (alias read from, reason) -> number of reads routed so, in this process (kept by
#: :mod:`~django_dbscale.consistency`, which records every move of a read).
route_counts = consistency.route_counts

monitor = ReplicaMonitor()
on_settings_changed(monitor.reset)
# Before the servers go away at exit (atexit runs last-registered first), stop probing so a
# late probe does not log failures of a process that is shutting down.
atexit.register(monitor.shutdown)
# A forked child (gunicorn, Celery prefork) inherits no threads: it starts its own prober.
os.register_at_fork(after_in_child=_after_fork_in_child)


def replayed_lsn(alias: str) -> int | None:
    """Return the known lower bound of replica *alias*'s replayed LSN (no query)."""
    status = monitor._status.get(alias)
    return None if status is None else status.replay_lsn


def report_failure(alias: str, reason: str) -> None:
    """Quarantine replica *alias*; the backend calls this when a query on it broke."""
    monitor.report_failure(alias, reason)


def failed_over(replica: str, primary: str, reason: str) -> None:
    """Quarantine *replica* whose read was re-run on *primary*, and pin the context there.

    The context has now read the primary's latest state; going back to a replica after
    the quarantine could show it an older one.
    """
    monitor.report_failure(replica, reason)
    consistency.read_from_primary(primary, FAILOVER)
    signals.read_failed_over.send(sender=ReplicaMonitor, alias=replica, primary=primary)


def replica_for_down_primary(primary: str) -> str | None:
    """Return a replica of *primary* to re-run a read its broken primary could not serve.

    The backend asks this when a read on *primary* failed to connect or broke outside a
    transaction (a restart, a crash, a failover in progress): the monitor may not have
    seen the outage yet (it probes every ``REPLICA_CHECK_INTERVAL``), and until it has, the
    router keeps choosing the primary. A replica qualifies only if the monitor still deems
    it usable (within the lag budget: past the outage's grace the library reads the
    primary on purpose, to bound staleness) and if it has replayed everything this context
    must read at least, asked of the replica itself now (one query). A context whose own
    write's position is unknown (it wrote and never needed the position since) gets
    ``None``: the replica may lack that write; so does a block under ``use_primary()`` or
    ``use_database()``, which asked for the primary itself. The read is counted with
    reason ``primary_down``.
    """
    specs = dbscale_settings.replicas.get(primary)
    if not specs or consistency.forced_target.get() is not None:
        return None  # use_primary()/use_database(): the caller asked for that database
    state = consistency.current_state()
    if primary in state.pending:
        return None
    need = max(state.positions.get(primary, 0), consistency.placement_floor(primary) or 0)
    now = time.monotonic()
    for spec in specs:
        if not monitor.status(spec.alias).usable(now):
            continue
        try:
            with connections[spec.alias].cursor() as cursor:
                cursor.execute("SELECT pg_last_wal_replay_lsn()::text")
                row = cursor.fetchone()
        except Exception:  # a replica that fails too is simply not chosen
            continue
        if row is None or row[0] is None or consistency.parse_lsn(row[0]) < need:
            continue
        consistency.count_route(spec.alias, PRIMARY_DOWN)
        return spec.alias
    return None


def check_not_quarantined(alias: str) -> None:
    """Raise :class:`ReplicaQuarantined` if replica *alias* is in quarantine now.

    The backend calls this before it dials a new connection of a replica alias, on every
    path (a routed read, ``.using(alias)``, ``connections[alias].cursor()``,
    ``atomic(using=alias)``): a replica that just failed is not dialled again until a
    probe re-admits it, so a black-holed one costs one connect timeout, not one per use.
    """
    status = monitor._status.get(alias)
    if status is not None:
        now = time.monotonic()
        if now < status.quarantined_until:
            raise ReplicaQuarantined(status, now)


def _route(alias: str, reason: str) -> str:
    consistency.count_route(alias, reason)
    return alias


def _to_primary(primary: str, reason: str, state: consistency.ConsistencyState) -> str:
    consistency.read_from_primary(primary, reason, state)
    return primary


def _wait_for(replica_aliases: list[str], lsn: int, timeout: float) -> str | None:
    """Poll replicas until one has replayed *lsn*; return it, or None after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        for alias in replica_aliases:
            try:  # on the probe connection: its timeouts keep a hung replica from hanging us
                row = monitor._probe(alias).query(
                    "SELECT pg_last_wal_replay_lsn()::text", dbscale_settings.replica_probe_timeout
                )
            except Exception as exc:
                report_failure(alias, f"wait probe failed: {exc}")
                continue
            if row[0]:
                monitor.note_replayed(alias, consistency.parse_lsn(row[0]))
                if consistency.parse_lsn(row[0]) >= lsn:
                    return alias
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))


@dataclass(frozen=True)
class _RoutingConfig:
    """The settings the routing hot path reads, parsed once per settings change."""

    replicas: dict[str, tuple[ReplicaSpec, ...]]
    primary_of: dict[str, str]
    read_your_writes: str
    sticky_seconds: float
    probe_timeout: float
    replica_wait: float
    #: primaries whose transaction state the dbscale backend reports (dbscale ENGINE)
    tracked: frozenset[str]


_config: _RoutingConfig | None = None


def _routing_config() -> _RoutingConfig:
    global _config
    if _config is None:
        from django_dbscale.checks import ENGINE

        _config = _RoutingConfig(
            replicas=dbscale_settings.replicas,
            primary_of=dbscale_settings.primary_of,
            read_your_writes=dbscale_settings.read_your_writes,
            sticky_seconds=dbscale_settings.sticky_seconds,
            probe_timeout=dbscale_settings.replica_probe_timeout,
            replica_wait=dbscale_settings.replica_wait,
            tracked=frozenset(
                alias for alias, db in settings.DATABASES.items() if db.get("ENGINE") == ENGINE
            ),
        )
    return _config


@on_settings_changed
def _drop_routing_config() -> None:
    global _config
    _config = None


def _in_transaction(primary: str, config: _RoutingConfig) -> bool:
    if primary in config.tracked:
        return primary in consistency.open_transactions.get()
    return bool(connections[primary].in_atomic_block)


def read_alias(primary: str) -> str:
    """Return the alias a read of *primary*'s data should use now.

    In order: ``use_primary()`` -> *primary*; inside a transaction on *primary* -> *primary*;
    ``use_database(alias)`` for an alias of this primary -> that alias; the replica this
    context is pinned to if it is still usable and has this context's writes; a context
    pinned to the primary stays there until a later probe shows a replica that had replayed
    everything the primary had when the context was pinned; else an eligible replica
    (random or round robin, by weight), which the context is then pinned to; else
    *primary*. ``use_replica()`` skips read-your-writes and pinning.

    Replicas whose measurements are older than :func:`stale_after` are not used (reason
    ``"stale"``). If no replica is usable because some were never probed (a fresh process,
    or settings just changed), the read first waits for the monitor's first round, at most
    ``REPLICA_PROBE_TIMEOUT``; a replica still silent then counts as down for this read.

    No network round trip, except to fetch this context's own pending write position once,
    or when ``REPLICA_WAIT`` / ``read_at_least(mode="wait")`` asks to wait for a replica.
    This runs on every read: keep it lean.
    """
    config = _config or _routing_config()
    specs = config.replicas.get(primary)
    forced = consistency.forced_target.get()
    state = consistency.current_state()
    if forced == "primary":
        if specs:
            return _to_primary(primary, FORCED, state)
        return _route(primary, FORCED)
    if forced is not None and forced != "replica":
        if forced != primary and config.primary_of.get(forced) != primary:
            forced = None  # use_database() of another primary's alias: not ours to apply
        elif forced == primary or not _in_transaction(primary, config):
            return _route(forced, FORCED)
    if not specs:
        return _route(primary, NO_REPLICAS)
    if _in_transaction(primary, config):
        return _to_primary(primary, IN_TRANSACTION, state)
    relaxed = forced == "replica"  # use_replica(): no read-your-writes, no pinning
    pinned = None if relaxed else state.pinned.get(primary)

    now = time.monotonic()
    if now >= monitor._kick_after:  # the probing thread is overdue: not started, or reset
        monitor.maybe_refresh()
    fresh_since = -math.inf
    if pinned == primary:
        fresh_since = state.pinned_at.get(primary, -math.inf)
        if not any(
            monitor.status(s.alias).caught_up_as_of > fresh_since
            and monitor.status(s.alias).usable(now)
            for s in specs
        ):
            state.pinned_at[primary] = now  # it has now seen the primary as of this moment
            return _route(primary, PINNED_PRIMARY)
        pinned = None  # a replica has since caught up with all the primary had then

    required: int | None = None
    if not relaxed:
        if config.read_your_writes == "lsn":
            if state.pending or state.positions:
                required = consistency.required_position(primary)
        elif config.read_your_writes == "time" and consistency.wrote_recently(
            primary, config.sticky_seconds
        ):
            return _to_primary(primary, READ_YOUR_WRITES, state)
    behind = READ_YOUR_WRITES  # why a replica that has not replayed `required` is skipped
    block = consistency.block_floor.get()
    if block is not None:  # a cache fill: its source must have replayed its header
        need = block.get(primary)
        if need is not None and (required is None or need > required):
            required, behind = need, CACHE_FILL
            if need >= consistency.UNKNOWN_POSITION:
                return _to_primary(primary, CACHE_FILL, state)

    placed = consistency.placement_floor(primary)
    if placed is not None and (required is None or placed > required):
        required, behind = placed, RESHARDED  # applies even to use_replica(): rows, not lag

    if pinned is not None:
        status = monitor.status(pinned)
        if not status.usable(now):
            return _to_primary(primary, status.reason_unusable(now), state)
        if required is None or (status.replay_lsn or -1) >= required:
            return _route(pinned, REPLICA)
        return _to_primary(primary, behind, state)

    usable = [
        spec
        for spec in specs
        if monitor.status(spec.alias).usable(now)
        and monitor.status(spec.alias).caught_up_as_of >= fresh_since
    ]
    silent = UNKNOWN
    if not usable and not all(monitor.status(spec.alias).probed for spec in specs):
        # Never probed (a fresh process, or the settings just changed): wait for the first
        # round rather than send the read to the primary, but never beyond the probe timeout.
        if not monitor.wait_for_first_probe([s.alias for s in specs], config.probe_timeout):
            silent = DOWN  # did not answer in time: down, for this read
        now = time.monotonic()
        usable = [
            spec
            for spec in specs
            if monitor.status(spec.alias).usable(now)
            and monitor.status(spec.alias).caught_up_as_of >= fresh_since
        ]
    if not usable:
        reasons = {monitor.status(spec.alias).reason_unusable(now) for spec in specs}
        reason = FORCED if relaxed else min(silent if r == UNKNOWN else r for r in reasons)
        return _to_primary(primary, reason, state)
    if required is not None:
        caught_up = [s for s in usable if (monitor.status(s.alias).replay_lsn or -1) >= required]
        if not caught_up:
            wait = state.wait if state.wait is not None else config.replica_wait
            chosen = _wait_for([s.alias for s in usable], required, wait) if wait > 0 else None
            if chosen is None:
                return _to_primary(primary, behind, state)
            caught_up = [s for s in usable if s.alias == chosen]
        usable = caught_up
    alias = monitor.choose(usable)
    if not relaxed:
        state.pinned[primary] = alias
        state.pinned_at.pop(primary, None)
    return _route(alias, REPLICA)


def replica_aliases(primary: str) -> list[str]:
    """Return the replica aliases configured for *primary*."""
    return [spec.alias for spec in dbscale_settings.replicas.get(primary, ())]
