"""Replica health, lag and selection: where a read of a primary's data goes.

The routing decision (:func:`read_alias`) runs on every read and makes no network round
trip: it consults a per-process :class:`ReplicaMonitor` whose measurements are refreshed
at most every ``REPLICA_CHECK_INTERVAL`` seconds by a background thread that the first
stale read kicks off. Probes use short connect and statement timeouts, so a hung replica
delays only the prober, never a request.

A replica is **eligible** for a read when

* its last probe succeeded and it is not quarantined,
* it is still in recovery and its WAL receiver is streaming (a disconnected receiver means
  it is falling behind, whatever the numbers say), and
* its replay lag is within budget: ``lag_seconds <= MAX_REPLICA_LAG`` **or**
  ``lag_bytes <= MAX_REPLICA_LAG_BYTES``. Time lag alone misleads on an idle primary (the
  last replayed commit gets old while nothing is missing), so either measure suffices, as in
  GitLab's load balancer;
* and, when the context must read its own writes, its replayed LSN (a lower bound kept per
  process) has reached the context's required position.

A context stays on the replica it first read from (monotonic reads). Once it reads from the
primary for a reason other than ``use_replica``, it stays on the primary: moving back to a
replica could show it an older state than it has already seen.

Failures (a probe error or timeout, or a query that broke, reported by the backend) put a
replica in quarantine with exponential backoff (``REPLICA_QUARANTINE``); a successful probe
after the backoff re-admits it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from django.conf import settings
from django.db import connections

from django_dbscale import consistency, signals
from django_dbscale.conf import ReplicaSpec, dbscale_settings, on_settings_changed

__all__ = [
    "ReplicaMonitor",
    "ReplicaStatus",
    "monitor",
    "read_alias",
    "replayed_lsn",
    "report_failure",
    "route_counts",
]

logger = logging.getLogger("django_dbscale.replicas")

# Reasons a read was routed where it was; the labels of ``route_counts``.
REPLICA = "replica"
NO_REPLICAS = "no_replicas"
IN_TRANSACTION = "in_transaction"
READ_YOUR_WRITES = "read_your_writes"
LAGGING = "lagging"
DOWN = "down"
FORCED = "forced"
PINNED_PRIMARY = "pinned_primary"
UNKNOWN = "unknown"
FAILOVER = "failover"
CACHE_FILL = "cache_fill"

#: (alias read from, reason) -> number of reads routed so, in this process (kept by
#: :mod:`~django_dbscale.consistency`, which records every move of a read).
route_counts = consistency.route_counts

REPLICA_PROBE_SQL = """
SELECT pg_is_in_recovery(),
       pg_last_wal_replay_lsn()::text,
       EXTRACT(EPOCH FROM (now() - pg_last_xact_replay_timestamp()))::float8,
       (SELECT status FROM pg_stat_wal_receiver LIMIT 1)
"""
PRIMARY_PROBE_SQL = "SELECT pg_current_wal_lsn()::text"


@dataclass
class ReplicaStatus:
    """What this process last measured of one replica."""

    alias: str
    primary: str
    probed: bool = False
    healthy: bool = False
    in_recovery: bool = False
    receiver_streaming: bool = False
    replay_lsn: int | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    probed_at: float = 0.0
    failures: int = 0
    quarantined_until: float = 0.0
    last_error: str = ""
    #: healthy, in recovery, streaming and within the lag budget at the last probe
    eligible: bool = False
    #: start of the latest refresh whose primary position this replica had replayed: it
    #: holds every write committed before that moment
    caught_up_as_of: float = -math.inf

    def quarantined(self, now: float) -> bool:
        return now < self.quarantined_until

    def within_budget(self) -> bool:
        """Apply the lag rule: time lag OR byte lag within its limit."""
        max_seconds = dbscale_settings.max_replica_lag
        max_bytes = dbscale_settings.max_replica_lag_bytes
        if self.lag_seconds is not None and self.lag_seconds <= max_seconds:
            return True
        return self.lag_bytes is not None and max_bytes is not None and self.lag_bytes <= max_bytes

    def assess(self) -> None:
        """Recompute :attr:`eligible` from the measurements (after each probe)."""
        self.eligible = (
            self.healthy and self.in_recovery and self.receiver_streaming and self.within_budget()
        )

    def usable(self, now: float) -> bool:
        """Eligible and not quarantined (ignoring read-your-writes). Cheap: no settings read."""
        return self.eligible and now >= self.quarantined_until

    def reason_unusable(self, now: float) -> str:
        if not self.probed:
            return UNKNOWN
        if not self.healthy or self.quarantined(now) or not self.in_recovery:
            return DOWN
        return LAGGING


@dataclass
class _Probe:
    """A probe connection to one database, opened on demand and reused.

    Only the thread holding :attr:`lock` touches :attr:`conn`: closing a psycopg
    connection while another thread runs a query on it crashes the process (libpq frees
    what the query is using), so :meth:`close` on a probe in use only marks it retired, and
    the probe closes itself when its query ends.
    """

    alias: str
    conn: psycopg.Connection[Any] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    retired: bool = False

    def query(self, sql: str, timeout: float) -> tuple[Any, ...]:
        # A probe hung on a black-holed connection still holds the lock: fail fast.
        if not self.lock.acquire(timeout=timeout):
            raise TimeoutError(f"an earlier probe of {self.alias!r} is still hung")
        try:
            if self.retired:
                raise RuntimeError(f"the probe of {self.alias!r} was closed")
            if self.conn is None or self.conn.closed:
                self.conn = psycopg.connect(**_probe_params(self.alias, timeout), autocommit=True)
            try:
                row = self.conn.execute(sql).fetchone()
            except Exception:
                self._close_now()
                raise
        finally:
            if self.retired:
                self._close_now()
            self.lock.release()
        if self.retired and self.conn is not None:
            self.close()  # retired between our check and the release: close it now
        assert row is not None
        return tuple(row)

    def close(self) -> None:
        """Close the connection now if no probe runs on it, else when that probe ends."""
        self.retired = True
        if self.lock.acquire(blocking=False):
            try:
                self._close_now()
            finally:
                self.lock.release()

    def _close_now(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail
                conn.close()


def _probe_params(alias: str, timeout: float) -> dict[str, Any]:
    """Build psycopg connection kwargs for *alias* with short timeouts."""
    s = settings.DATABASES[alias]
    params: dict[str, Any] = {
        "dbname": s.get("NAME") or "postgres",
        "connect_timeout": max(1, math.ceil(timeout)),
        "options": f"-c statement_timeout={max(1, int(timeout * 1000))}",
        "application_name": "django_dbscale probe",
    }
    for key, param in (
        ("USER", "user"),
        ("PASSWORD", "password"),
        ("HOST", "host"),
        ("PORT", "port"),
    ):
        if s.get(key):
            params[param] = str(s[key])
    for key in ("sslmode", "sslrootcert", "sslcert", "sslkey", "passfile", "service"):
        if key in s.get("OPTIONS", {}):
            params[key] = s["OPTIONS"][key]
    return params


class ReplicaMonitor:
    """Per-process lag and health measurements of every configured replica."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict[str, ReplicaStatus] = {}
        self._probes: dict[str, _Probe] = {}
        self._refreshing = False
        self._last_refresh = -math.inf
        self._pid = os.getpid()
        self._rr: dict[str, float] = defaultdict(float)
        self._closed = False

    # -- state ------------------------------------------------------------------------
    def status(self, alias: str) -> ReplicaStatus:
        """Return the status record of replica *alias* (created unprobed on first use)."""
        status = self._status.get(alias)
        if status is None:
            primary = dbscale_settings.primary_of.get(alias)
            if primary is None:
                raise KeyError(
                    f"{alias!r} is not a replica in DBSCALE['REPLICAS'] "
                    f"(replicas: {sorted(dbscale_settings.primary_of)})."
                )
            status = self._status.setdefault(alias, ReplicaStatus(alias, primary))
        return status

    def reset(self) -> None:
        """Forget every measurement and close probe connections (settings changed)."""
        with self._lock:
            for probe in self._probes.values():
                probe.close()
            self._probes.clear()
            self._status.clear()
            self._last_refresh = -math.inf
            self._rr.clear()

    # -- refreshing -------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop background probing for good (at interpreter exit) and close probes."""
        self._closed = True
        self.reset()

    def maybe_refresh(self) -> None:
        """Start a background refresh if the measurements are older than the interval."""
        if self._closed:
            return
        now = time.monotonic()
        if now - self._last_refresh < dbscale_settings.replica_check_interval:
            return
        if os.getpid() != self._pid:  # forked: the parent's probes and thread are not ours
            self._pid = os.getpid()
            self._probes = {}
            self._refreshing = False
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True
            self._last_refresh = now
        threading.Thread(
            target=self._refresh_in_background, name="dbscale-replica-probe", daemon=True
        ).start()

    def _refresh_in_background(self) -> None:
        try:
            self.refresh()
        except Exception:  # pragma: no cover - refresh() handles probe errors itself
            logger.exception("Replica refresh failed")
        finally:
            self._refreshing = False

    def refresh(self, aliases: Iterable[str] | None = None) -> None:
        """Probe primaries, then replicas, now (blocking); used by the prober and tests.

        Every probe runs in its own thread and is given ``4 * REPLICA_PROBE_TIMEOUT + 1``
        seconds; a replica whose probe has not answered by then is marked down (a black-holed
        connection ignores server-side timeouts) and the thread is abandoned.
        """
        self._last_refresh = time.monotonic()
        timeout = dbscale_settings.replica_probe_timeout
        budget = timeout * 4 + 1
        wanted = set(aliases) if aliases is not None else None
        targets = [
            (primary, spec.alias)
            for primary, specs in dbscale_settings.replicas.items()
            for spec in specs
            if wanted is None or spec.alias in wanted
        ]
        primary_lsns: dict[str, int] = {}
        started = time.monotonic()

        def probe_primary(primary: str) -> None:
            try:
                row = self._probe(primary).query(PRIMARY_PROBE_SQL, timeout)
                primary_lsns[primary] = consistency.parse_lsn(row[0])
            except Exception as exc:  # only means "byte lag unknown"
                self._log("Probe of primary %r failed: %s", primary, exc)

        _run_all([(probe_primary, (p,)) for p in {p for p, _ in targets}], budget)
        late = _run_all(
            [
                (self._probe_replica, (alias, primary_lsns.get(p), timeout, started))
                for p, alias in targets
            ],
            budget,
        )
        for _, (alias, *_rest) in late:
            self._fail(self.status(str(alias)), "probe timed out")

    def _probe(self, alias: str) -> _Probe:
        probe = self._probes.get(alias)
        if probe is None:
            with self._lock:  # reset() iterates the probes under this lock
                probe = self._probes.setdefault(alias, _Probe(alias))
        return probe

    def _probe_replica(
        self, alias: str, primary_lsn: int | None, timeout: float, started: float
    ) -> None:
        status = self.status(alias)
        if status.quarantined(time.monotonic()):
            return
        try:
            in_recovery, replay, lag_s, receiver = self._probe(alias).query(
                REPLICA_PROBE_SQL, timeout
            )
        except Exception as exc:  # timeouts, refused, broken: all "down"
            self._fail(status, f"probe failed: {exc}".strip())
            return
        if status.probed and not status.healthy:
            signals.replica_readmitted.send(sender=ReplicaMonitor, alias=alias)
        status.probed = True
        status.healthy = True
        status.failures = 0
        status.quarantined_until = 0.0
        status.last_error = ""
        status.in_recovery = bool(in_recovery)
        status.receiver_streaming = receiver == "streaming"
        replay_lsn = consistency.parse_lsn(replay) if replay else None
        if replay_lsn is not None:
            self.note_replayed(alias, replay_lsn)
        status.lag_seconds = None if lag_s is None else max(0.0, float(lag_s))
        status.lag_bytes = (
            max(0, primary_lsn - replay_lsn)
            if primary_lsn is not None and replay_lsn is not None
            else None
        )
        status.probed_at = time.monotonic()
        if primary_lsn is not None and replay_lsn is not None and replay_lsn >= primary_lsn:
            status.caught_up_as_of = started
        status.assess()

    def _fail(self, status: ReplicaStatus, reason: str) -> None:
        first, maximum = dbscale_settings.replica_quarantine
        status.probed = True
        status.healthy = False
        status.failures += 1
        backoff = min(maximum, first * 2 ** (status.failures - 1))
        status.quarantined_until = time.monotonic() + backoff
        status.last_error = reason
        status.eligible = False
        signals.replica_quarantined.send(
            sender=ReplicaMonitor,
            alias=status.alias,
            reason=reason,
            backoff=backoff,
            failures=status.failures,
        )
        self._log(
            "Replica %r quarantined for %.1fs (failure %d): %s",
            status.alias,
            backoff,
            status.failures,
            reason,
        )

    def _log(self, message: str, *args: Any) -> None:
        # After shutdown, failures are the servers going away with the process: not news.
        (logger.debug if self._closed else logger.warning)(message, *args)

    def report_failure(self, alias: str, reason: str) -> None:
        """Quarantine *alias* after a failure seen outside the prober."""
        self._fail(self.status(alias), reason)
        with self._lock:
            probe = self._probes.pop(alias, None)  # the next probe opens a fresh connection
        if probe is not None:
            probe.close()

    def note_replayed(self, alias: str, lsn: int) -> None:
        """Raise the known lower bound of *alias*'s replayed LSN to *lsn*."""
        status = self.status(alias)
        if status.replay_lsn is None or lsn > status.replay_lsn:
            status.replay_lsn = lsn

    # -- selection --------------------------------------------------------------------
    def choose(self, usable: list[ReplicaSpec]) -> str:
        """Pick one of *usable* by weight: at random, or by smooth weighted round robin."""
        if len(usable) == 1:
            return usable[0].alias
        if dbscale_settings.replica_selection == "round_robin":
            # nginx's smooth weighted round robin: exact shares, evenly interleaved.
            with self._lock:
                total = sum(s.weight for s in usable)
                for spec in usable:
                    self._rr[spec.alias] += spec.weight
                best = max(usable, key=lambda spec: self._rr[spec.alias])
                self._rr[best.alias] -= total
            return best.alias
        return random.choices([s.alias for s in usable], [s.weight for s in usable])[0]


monitor = ReplicaMonitor()
on_settings_changed(monitor.reset)
# Before the servers go away at exit (atexit runs last-registered first), stop probing so a
# late background probe does not log failures of a process that is shutting down.
atexit.register(monitor.shutdown)


def _run_all(
    calls: list[tuple[Callable[..., None], tuple[Any, ...]]], budget: float
) -> list[tuple[Callable[..., None], tuple[Any, ...]]]:
    """Run each call in a daemon thread; return the calls still running after *budget* s."""

    def guarded(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # e.g. the settings changed under a late probe: nothing to update
            logger.debug("Probe %s%r failed", getattr(fn, "__name__", fn), args, exc_info=True)

    threads = [
        (
            threading.Thread(target=guarded, args=(fn, *args), daemon=True, name="dbscale-probe"),
            (fn, args),
        )
        for fn, args in calls
    ]
    for thread, _ in threads:
        thread.start()
    deadline = time.monotonic() + budget
    for thread, _ in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [call for thread, call in threads if thread.is_alive()]


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
    check_interval: float
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
            check_interval=dbscale_settings.replica_check_interval,
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
    if now - monitor._last_refresh >= config.check_interval:
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
    if not usable:
        reasons = {monitor.status(spec.alias).reason_unusable(now) for spec in specs}
        return _to_primary(primary, FORCED if relaxed else min(reasons), state)
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
