"""Replica health, lag and selection: where a read of a primary's data goes.

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
import contextlib
import logging
import math
import os
import queue
import random
import socket
import threading
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from django.conf import settings
from django.db import OperationalError, connections

from django_dbscale import consistency, signals
from django_dbscale.conf import ReplicaSpec, dbscale_settings, on_settings_changed

__all__ = [
    "ReplicaMonitor",
    "ReplicaQuarantined",
    "ReplicaStatus",
    "check_not_quarantined",
    "failed_over",
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
STALE = "stale"
QUARANTINED = "quarantined"
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
    #: ``time.monotonic()`` when the last successful probe answered
    probed_at: float = 0.0
    #: the measurements admit no read from this moment on (``probed_at + stale_after()``)
    fresh_until: float = -math.inf
    failures: int = 0
    quarantined_until: float = 0.0
    #: ``time.monotonic()`` of the last failure: a probe sent before it cannot re-admit
    failed_at: float = -math.inf
    last_error: str = ""
    #: healthy, in recovery, streaming and within the lag budget at the last probe
    eligible: bool = False
    #: when the primary position was read in the latest round whose position this replica
    #: had replayed: it holds every write committed before that moment
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
        """Eligible, fresh and not quarantined (ignoring read-your-writes).

        Cheap: no settings read (the staleness bound was applied when the probe answered).
        """
        return self.eligible and self.quarantined_until <= now < self.fresh_until

    def reason_unusable(self, now: float) -> str:
        if not self.probed:
            return UNKNOWN
        if not self.healthy or self.quarantined(now) or not self.in_recovery:
            return DOWN
        if self.eligible:
            return STALE
        return LAGGING


class ReplicaQuarantined(OperationalError):
    """A connection of a quarantined replica's alias was asked for; none was dialled.

    Outside a transaction the backend never lets this out: it moves the read to the
    replica's primary. Inside one there is nothing to fall back to, so it propagates.
    """

    def __init__(self, status: ReplicaStatus, now: float) -> None:
        self.alias = status.alias
        self.primary = status.primary
        self.remaining = max(0.0, status.quarantined_until - now)
        super().__init__(
            f"Replica {status.alias!r} is quarantined for another {self.remaining:.1f}s after "
            f"{status.failures} failure(s) (last: {status.last_error or 'unknown'}), so "
            "django_dbscale does not connect to it. Reads outside a transaction go to its "
            f"primary {status.primary!r} meanwhile; a transaction on the replica cannot move. "
            f"Run it on {status.primary!r}, or retry once the quarantine "
            "(DBSCALE['REPLICA_QUARANTINE']) is over."
        )


@dataclass
class _Probe:
    """A probe connection to one database, opened on demand and reused.

    Only the thread holding :attr:`lock` touches :attr:`conn`: closing a psycopg
    connection while another thread runs a query on it crashes the process (libpq frees
    what the query is using), so :meth:`close` on a probe in use only marks it retired, and
    the probe closes itself when its query ends. What another thread may do to a running
    query is :meth:`abort` it.
    """

    alias: str
    conn: psycopg.Connection[Any] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    retired: bool = False
    #: socket descriptor of the query running now (None between queries), for abort()
    _fd: int | None = None
    _fd_lock: threading.Lock = field(default_factory=threading.Lock)
    #: close the connection after the running query: the next one opens a fresh one
    _drop: bool = False

    def query(self, sql: str, timeout: float) -> tuple[Any, ...]:
        # A probe hung on a black-holed connection still holds the lock: fail fast.
        if not self.lock.acquire(timeout=timeout):
            raise TimeoutError(f"an earlier probe of {self.alias!r} is still hung")
        try:
            if self.retired:
                raise RuntimeError(f"the probe of {self.alias!r} was closed")
            if self.conn is None or self.conn.closed:
                self.conn = psycopg.connect(**_probe_params(self.alias, timeout), autocommit=True)
            with self._fd_lock:
                self._fd = self.conn.fileno()
            try:
                row = self.conn.execute(sql).fetchone()
            except Exception:
                self._forget_fd()
                self._close_now()
                raise
            self._forget_fd()
        finally:
            if self.retired or self._drop:
                self._forget_fd()
                self._drop = False
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

    def discard_connection(self) -> None:
        """Make the next probe open a fresh connection (close this one now or after use)."""
        self._drop = True
        if self.lock.acquire(blocking=False):
            try:
                self._drop = False
                self._close_now()
            finally:
                self.lock.release()

    def abort(self) -> None:
        """End a running query now, from another thread (a probe hung on a dead path).

        Shuts the connection's socket down through a duplicate of its descriptor: nothing
        libpq owns is freed or closed here, the waiting query sees the connection end and
        raises, and its own thread closes the connection. The descriptor is recorded only
        while a query runs and cleared under :attr:`_fd_lock` before any close, so it can
        never name another socket by then. A connect in progress cannot be aborted; it
        ends by its connect timeout.
        """
        with self._fd_lock:
            if self._fd is None:
                return
            try:
                sock = socket.socket(fileno=os.dup(self._fd))
            except OSError:
                return
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _forget_fd(self) -> None:
        with self._fd_lock:
            self._fd = None

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


def stale_after() -> float:
    """Return how old measurements may be and still admit a replica, in seconds.

    ``2 * REPLICA_CHECK_INTERVAL + 2 * REPLICA_PROBE_TIMEOUT``: the next probe of a replica
    is due one interval after the last, a round may start late by another interval (the
    previous one ran long, the process was busy), and a probe is given up to twice the
    probe timeout (connect plus statement) to answer. A running monitor therefore never
    lets measurements get this old; older ones mean it did not deliver (stopped, starved,
    a process resumed after a pause), and reads then go to the primary (reason
    ``"stale"``) rather than to a replica that may since have fallen seconds or megabytes
    behind. Derived from the two settings it depends on, so it needs no setting of its
    own; a read never waits for a fresh probe because of it (a wait that the probe timeout
    bounds would still be added to every read after an idle period).
    """
    return 2 * (dbscale_settings.replica_check_interval + dbscale_settings.replica_probe_timeout)


class _Job:
    """One probe query asked of a :class:`_Prober`, and its answer.

    Rounds read :attr:`finished` without a lock, so it is always set last, after
    :attr:`row` and :attr:`error`.
    """

    __slots__ = (
        "answered_at",
        "deadline",
        "error",
        "finished",
        "listeners",
        "prober",
        "row",
        "sql",
        "submitted",
        "timeout",
    )

    def __init__(
        self,
        prober: _Prober,
        sql: str,
        timeout: float,
        deadline: float,
        inbox: queue.SimpleQueue[_Job | None],
    ) -> None:
        self.prober = prober
        self.sql = sql
        self.timeout = timeout  # the probe's own connect/statement/lock timeout
        self.deadline = deadline  # when the round gives up on it
        self.listeners = [inbox]  # told when it is answered (rounds sharing it add theirs)
        self.submitted = time.monotonic()
        self.answered_at = 0.0
        self.finished = False
        self.row: tuple[Any, ...] | None = None
        self.error = ""


class _Prober:
    """A long-lived thread that runs the probes of one database, one at a time, in order.

    The round waiting for a probe gives up at its deadline (:meth:`expire`), which also
    aborts the query if it is the one running, so a probe hung on a dead network path
    frees the thread instead of holding it until TCP gives up. While a probe runs past its
    deadline anyway (a connect in progress cannot be aborted), new probes fail at once.
    """

    def __init__(self, owner: ReplicaMonitor, alias: str) -> None:
        self.alias = alias
        self.retired = False
        self._owner = owner
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._running: _Job | None = None
        self._in_use: _Probe | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"dbscale-probe[{alias}]", daemon=True
        )
        self.thread.start()

    def submit(
        self,
        sql: str,
        timeout: float,
        deadline: float,
        inbox: queue.SimpleQueue[_Job | None],
        *,
        share: bool = False,
    ) -> _Job:
        """Queue a probe; once answered it is put on *inbox*, unless it expired first.

        With *share*, a probe of the same query that is queued or running and not yet
        overdue is returned instead of a new one (and will be put on *inbox* too).
        """
        job = _Job(self, sql, timeout, deadline, inbox)
        with self._cond:
            if share:
                for other in (self._running, *self._queue):
                    if (
                        other is not None
                        and other.sql == sql
                        and not other.finished
                        and job.submitted <= other.deadline
                    ):
                        other.listeners.append(inbox)
                        return other
            running = self._running
            if self.retired:
                job.error = "the monitor was reset"
                job.finished = True
            elif running is not None and job.submitted > running.deadline:
                job.error = f"an earlier probe of {self.alias!r} is still hung"
                job.finished = True
            else:
                self._queue.append(job)
                self._cond.notify()
        return job

    def busy(self) -> bool:
        """Return whether a probe is queued or running that has not been answered yet."""
        with self._cond:
            running = self._running
            return (running is not None and not running.finished) or any(
                not job.finished for job in self._queue
            )

    def expire(self, job: _Job, reason: str) -> None:
        """Give up on *job* (unless it has finished); abort its query if it is running."""
        with self._cond:
            if job.finished:
                return
            job.error = reason
            job.finished = True
            probe = self._in_use if self._running is job else None
        if probe is not None:
            probe.abort()

    def retire(self) -> None:
        """End the thread after (aborting) the probe it runs; queued probes fail."""
        with self._cond:
            self.retired = True
            probe = self._in_use
            self._cond.notify_all()
        if probe is not None:
            probe.abort()

    def _run(self) -> None:
        try:
            while self._run_one():
                pass
        except Exception:  # pragma: no cover - a probe thread must never die loudly
            logger.exception("Replica prober of %r failed", self.alias)

    def _run_one(self) -> bool:
        with self._cond:
            while not self._queue and not self.retired:
                self._cond.wait()
            if self.retired:
                for queued in self._queue:
                    queued.error = "the monitor was reset"
                    queued.finished = True
                self._queue.clear()
                return False
            job = self._queue.popleft()
            if job.finished:  # expired while queued
                return True
        probe = self._owner._probe(self.alias)
        with self._cond:
            if job.finished:
                return True
            self._running, self._in_use = job, probe
        row: tuple[Any, ...] | None = None
        error = ""
        try:
            row = probe.query(job.sql, job.timeout)
        except Exception as exc:  # refused, timed out, aborted, broken: the caller judges
            error = str(exc).strip() or type(exc).__name__
        with self._cond:
            self._running, self._in_use = None, None
            if job.finished:  # expired meanwhile: nobody reads this answer
                return True
            job.row, job.error = row, error
            job.answered_at = time.monotonic()
            job.finished = True
        for inbox in job.listeners:
            inbox.put(job)
        return True


class _Round:
    """One probe of every (or some) replica and its primary, recorded as answers come.

    Primaries are asked for their WAL position and replicas for their replay state at
    once, each on its database's :class:`_Prober`; a replica is recorded as soon as its
    answer and its primary's are in, and every probe not answered within
    ``2 * REPLICA_PROBE_TIMEOUT`` (connect plus statement) fails (the replica is marked
    down, its query aborted). A scheduled round skips a replica still busy with an earlier
    round's probe (that round records it) and shares a primary's probe still in flight.
    """

    def __init__(
        self,
        owner: ReplicaMonitor,
        inbox: queue.SimpleQueue[_Job | None],
        aliases: Iterable[str] | None = None,
        *,
        scheduled: bool = False,
    ) -> None:
        timeout = dbscale_settings.replica_probe_timeout
        self.owner = owner
        self.epoch = owner._epoch
        self.fresh_for = stale_after()
        self.started = started = time.monotonic()
        self.deadline = started + 2 * timeout
        self.reason = f"timed out after {2 * timeout:g}s"
        owner._last_refresh = started
        if scheduled:
            interval = dbscale_settings.replica_check_interval
            owner._kick_after = started + interval + 2 * timeout
        wanted = set(aliases) if aliases is not None else None
        targets = [
            (primary, spec.alias)
            for primary, specs in dbscale_settings.replicas.items()
            for spec in specs
            if (wanted is None or spec.alias in wanted)
            and not owner.status(spec.alias).quarantined(started)
            and not (scheduled and owner._prober(spec.alias).busy())
        ]
        self.primary_jobs = {
            primary: owner._prober(primary).submit(
                PRIMARY_PROBE_SQL, timeout, self.deadline, inbox, share=scheduled
            )
            for primary in dict.fromkeys(primary for primary, _ in targets)
        }
        self.replica_jobs = {
            alias: (
                primary,
                owner._prober(alias).submit(REPLICA_PROBE_SQL, timeout, self.deadline, inbox),
            )
            for primary, alias in targets
        }
        self._logged: set[str] = set()

    def poll(self) -> bool:
        """Record the replicas answered; fail what is overdue. Return whether it waits on."""
        for alias, (primary, job) in list(self.replica_jobs.items()):
            primary_job = self.primary_jobs[primary]
            if job.finished and primary_job.finished:
                del self.replica_jobs[alias]
                if primary_job.row is None and primary not in self._logged:
                    self._logged.add(primary)  # only means "byte lag unknown"
                    self.owner._log("Probe of primary %r failed: %s", primary, primary_job.error)
                self.owner._record(alias, job, primary_job, self.epoch, self.fresh_for)
        if not self.replica_jobs:
            return False
        if time.monotonic() < self.deadline:
            return True
        for primary, job in self.replica_jobs.values():
            job.prober.expire(job, self.reason)
            self.primary_jobs[primary].prober.expire(self.primary_jobs[primary], self.reason)
        return self.poll()


#: Every monitor of this process, so that a forked child resets each one.
_monitors: weakref.WeakSet[ReplicaMonitor] = weakref.WeakSet()
#: Probe connections a forked child inherited from its parent: never used or closed here
#: (closing one would end the parent's session on the shared socket), and kept referenced
#: so that they are not collected with a "deleted while still open" warning either.
_inherited: list[object] = []


class ReplicaMonitor:
    """Per-process lag and health measurements of every configured replica.

    Owned machinery: one probing thread per process, started by :meth:`start` or lazily by
    the first read, stopped by :meth:`stop` (reads then see the measurements age and go to
    the primaries once they are stale), restarted in a forked child by its first read.
    Each round probes the primaries' WAL positions and the replicas concurrently, one
    long-lived :class:`_Prober` thread per database, and waits for each answer at most
    ``2 * REPLICA_PROBE_TIMEOUT`` (connect plus statement); a replica that has not
    answered by then is marked down and its hung query aborted.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # probes, probers, round robin, the thread
        self._update = threading.Condition()  # status changes; readers awaiting a first probe
        self._status: dict[str, ReplicaStatus] = {}
        self._probes: dict[str, _Probe] = {}
        self._probers: dict[str, _Prober] = {}
        self._rr: dict[str, float] = defaultdict(float)
        self._epoch = 0  # bumped by reset() and stop(): answers to older rounds are dropped
        self._last_refresh = -math.inf
        #: the routing hot path calls maybe_refresh() once time.monotonic() reaches this:
        #: only when the thread is overdue (not started, dead, forked, or just reset)
        self._kick_after = -math.inf
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        #: the thread's wake-ups: answered probes, and None for "a round now" or "stop"
        self._inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._stopped = False  # stop() was called: no lazy start
        self._closed = False  # shutdown(): never again
        self._pid = os.getpid()
        _monitors.add(self)

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
        """Forget every measurement and close probe connections (settings changed).

        The thread keeps running; the next read asks it for a round at once.
        """
        with self._update:
            self._epoch += 1
            self._status.clear()
        self._close_probes()
        with self._lock:
            self._rr.clear()
        self._last_refresh = -math.inf
        self._kick_after = -math.inf

    def _close_probes(self) -> None:
        with self._lock:  # _probe() and _prober() add under this lock
            probers, self._probers = list(self._probers.values()), {}
            probes, self._probes = list(self._probes.values()), {}
        for prober in probers:
            prober.retire()
        for probe in probes:
            probe.close()

    # -- the thread ---------------------------------------------------------------------
    def start(self) -> None:
        """Start this process's probing thread (idempotent; reads also start it)."""
        with self._lock:
            if self._closed:
                return
            self._stopped = False
            thread = self._thread
            if thread is not None and thread.is_alive() and self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._stopping = stopping = threading.Event()
            inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
            self._inbox = inbox
            self._thread = threading.Thread(
                target=self._run,
                args=(stopping, inbox),
                name="dbscale-replica-monitor",
                daemon=True,
            )
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the probing thread and the probers, and close probe connections.

        Reads do not restart it (:meth:`start` does); :meth:`refresh` still probes. Waits
        up to *timeout* seconds (default: a round's deadline plus one) for the thread.
        """
        with self._lock:
            self._stopped = True
            thread, self._thread = self._thread, None
            self._stopping.set()
            self._inbox.put(None)
        with self._update:
            self._epoch += 1  # answers to probes retired below are no news of the replicas
        self._kick_after = math.inf
        if thread is not None and thread is not threading.current_thread():
            if timeout is None:
                try:
                    timeout = 2 * dbscale_settings.replica_probe_timeout + 1
                except Exception:  # settings broken: do not hang the caller on them
                    timeout = 2.0
            thread.join(timeout)
        self._close_probes()

    @property
    def running(self) -> bool:
        """Return whether this process's probing thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive() and self._pid == os.getpid()

    def shutdown(self) -> None:
        """Stop probing for good (at interpreter exit) and close probes."""
        self._closed = True
        self.stop()
        self.reset()

    def maybe_refresh(self) -> None:
        """Make sure a round comes soon: start the thread, or wake it (routing calls this).

        Called when the thread is overdue: never started, stopped, dead, in a forked
        child, or the measurements were just reset.
        """
        if self._closed or self._stopped:
            self._kick_after = math.inf
            return
        try:
            interval = dbscale_settings.replica_check_interval
        except Exception:  # the settings are broken: routing will say so, not the monitor
            interval = 1.0
        self._kick_after = time.monotonic() + interval
        if self.running:
            self._inbox.put(None)
        else:
            self.start()

    def _run(self, stopping: threading.Event, inbox: queue.SimpleQueue[_Job | None]) -> None:
        """Start a round every ``REPLICA_CHECK_INTERVAL`` seconds until :meth:`stop`.

        Rounds overlap: the thread never waits for a slow probe, it records each answer as
        it comes and gives up on each probe at its deadline, so a hung replica changes
        nobody else's cadence.
        """
        rounds: list[_Round] = []
        next_round = time.monotonic()
        while not stopping.is_set():
            now = time.monotonic()
            if now >= next_round:
                interval = 1.0
                try:
                    interval = dbscale_settings.replica_check_interval
                    rounds.append(_Round(self, inbox, scheduled=True))
                except Exception as exc:  # e.g. the settings changed into something broken
                    self._log("Replica probe round failed: %s", exc)
                next_round = now + interval
            try:
                rounds = [each for each in rounds if each.poll()]
            except Exception as exc:  # pragma: no cover - poll() handles probe errors
                self._log("Replica probe round failed: %s", exc)
                rounds = []
            wake_at = min([next_round, *(each.deadline for each in rounds)])
            try:
                item = inbox.get(timeout=max(0.0, wake_at - time.monotonic()))
            except queue.Empty:
                continue
            if item is None:  # kicked (or stopping): a round now
                next_round = time.monotonic()

    def _after_fork_in_child(self) -> None:
        # The parent's threads do not exist here and its locks may have been held at fork
        # time: start afresh, keeping the measurements (monotonic time is system-wide, so
        # they age correctly). The first read starts this process's own thread.
        self._lock = threading.Lock()
        self._update = threading.Condition()
        self._inbox = queue.SimpleQueue()
        self._stopping = threading.Event()
        _inherited.append((self._probes, self._probers))
        self._probes, self._probers = {}, {}
        self._thread = None
        self._pid = os.getpid()
        self._kick_after = math.inf if self._stopped or self._closed else -math.inf

    # -- probing ------------------------------------------------------------------------
    def refresh(self, aliases: Iterable[str] | None = None) -> None:
        """Probe primaries and replicas now, in this thread, and wait for the answers.

        Used by tests and ``manage.py dbscale status``; the probing thread runs the same
        rounds. Returns within ``2 * REPLICA_PROBE_TIMEOUT`` (plus scheduling): a replica
        that has not answered by then is marked down.
        """
        inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        probing = _Round(self, inbox, aliases)
        while probing.poll():
            with contextlib.suppress(queue.Empty):
                inbox.get(timeout=max(0.0, probing.deadline - time.monotonic()))

    def _prober(self, alias: str) -> _Prober:
        prober = self._probers.get(alias)
        if prober is None or prober.retired:
            with self._lock:
                prober = self._probers.get(alias)
                if prober is None or prober.retired:
                    prober = self._probers[alias] = _Prober(self, alias)
        return prober

    def _probe(self, alias: str) -> _Probe:
        probe = self._probes.get(alias)
        if probe is None:
            with self._lock:  # reset() empties the probes under this lock
                probe = self._probes.setdefault(alias, _Probe(alias))
        return probe

    def _record(
        self, alias: str, job: _Job, primary_job: _Job, epoch: int, fresh_for: float
    ) -> None:
        """Apply one replica's answer (or failure) to its status, unless it is outdated."""
        if job.row is None:
            self._fail(self.status(alias), f"probe failed: {job.error}", epoch=epoch)
            return
        in_recovery, replay, lag_s, receiver = job.row
        primary_lsn: int | None = None
        if primary_job.row is not None and primary_job.row[0]:
            primary_lsn = consistency.parse_lsn(primary_job.row[0])
        replay_lsn = consistency.parse_lsn(replay) if replay else None
        with self._update:
            if epoch != self._epoch:
                return  # reset() since this round began: settings may have changed
            status = self.status(alias)
            if status.failed_at >= job.submitted:
                return  # a failure seen after this probe was sent is the newer news
            readmitted = status.probed and not status.healthy
            status.probed = True
            status.healthy = True
            status.failures = 0
            status.quarantined_until = 0.0
            status.last_error = ""
            status.in_recovery = bool(in_recovery)
            status.receiver_streaming = receiver == "streaming"
            if replay_lsn is not None:
                self.note_replayed(alias, replay_lsn)
            status.lag_seconds = None if lag_s is None else max(0.0, float(lag_s))
            status.lag_bytes = (
                max(0, primary_lsn - replay_lsn)
                if primary_lsn is not None and replay_lsn is not None
                else None
            )
            status.probed_at = job.answered_at
            status.fresh_until = job.answered_at + fresh_for
            if primary_lsn is not None and replay_lsn is not None and replay_lsn >= primary_lsn:
                # It holds everything committed before the primary's position was read.
                status.caught_up_as_of = max(status.caught_up_as_of, primary_job.submitted)
            status.assess()
            self._update.notify_all()
        if readmitted:
            signals.replica_readmitted.send(sender=ReplicaMonitor, alias=alias)

    def wait_for_first_probe(self, aliases: Iterable[str], timeout: float) -> bool:
        """Wait up to *timeout* seconds until every replica in *aliases* has been probed.

        Return False if some had not answered (or failed) by then. Asks the thread for a
        round at once; returns at once, True, when the monitor is stopped (no round comes).
        """
        names = list(aliases)
        if time.monotonic() >= self._kick_after:
            self.maybe_refresh()
        if self._stopped or self._closed:
            return True
        deadline = time.monotonic() + timeout
        with self._update:
            while not all(self.status(alias).probed for alias in names):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._update.wait(remaining)
        return True

    def _fail(self, status: ReplicaStatus, reason: str, *, epoch: int | None = None) -> None:
        first, maximum = dbscale_settings.replica_quarantine
        with self._update:
            if epoch is not None and epoch != self._epoch:
                return
            now = time.monotonic()
            status.probed = True
            status.healthy = False
            status.failures += 1
            failures = status.failures
            backoff = min(maximum, first * 2 ** (failures - 1))
            status.quarantined_until = now + backoff
            status.failed_at = now
            status.last_error = reason
            status.eligible = False
            self._update.notify_all()
        signals.replica_quarantined.send(
            sender=ReplicaMonitor,
            alias=status.alias,
            reason=reason,
            backoff=backoff,
            failures=failures,
        )
        self._log(
            "Replica %r quarantined for %.1fs (failure %d): %s",
            status.alias,
            backoff,
            failures,
            reason,
        )

    def _log(self, message: str, *args: Any) -> None:
        # After shutdown, failures are the servers going away with the process: not news.
        (logger.debug if self._closed else logger.warning)(message, *args)

    def report_failure(self, alias: str, reason: str) -> None:
        """Quarantine *alias* after a failure seen outside the prober."""
        self._fail(self.status(alias), reason)
        probe = self._probes.get(alias)
        if probe is not None:
            probe.discard_connection()  # the next probe opens a fresh connection

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


def _after_fork_in_child() -> None:
    for each in list(_monitors):
        each._after_fork_in_child()


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


def read_quarantined_from_primary(replica: str, primary: str) -> None:
    """Record that a read of quarantined *replica*'s alias runs on *primary*, undialled.

    Counted once as ``(primary, "quarantined")`` and pinned there like every move of a
    read to a primary; not a new failure (the quarantine is not extended).
    """
    consistency.read_from_primary(primary, QUARANTINED)


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
