"""The replica monitor: per-process health and lag measurements of every replica.

Owned machinery: one long-lived thread per process (``dbscale-replica-monitor``) starts a
probe round every ``REPLICA_CHECK_INTERVAL`` seconds whether or not the process serves
reads, and each database probed has one long-lived prober thread (``dbscale-probe[alias]``)
that runs its probes one at a time, so a hung replica delays only its own prober, never
another replica's measurements nor a request. It is started by
:meth:`ReplicaMonitor.start` or by the first read, stopped by :meth:`ReplicaMonitor.stop`,
and a forked child starts its own. The routing policy that reads these measurements is
:func:`django_dbscale.replicas.read_alias`.
"""

from __future__ import annotations

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
from django.db import OperationalError

from django_dbscale import consistency, signals
from django_dbscale.conf import ReplicaSpec, dbscale_settings
from django_dbscale.own_connections import connection_params
from django_dbscale.replicas.reasons import DOWN, LAGGING, STALE, UNKNOWN

__all__ = ["ReplicaMonitor", "ReplicaQuarantined", "ReplicaStatus", "stale_after"]

logger = logging.getLogger("django_dbscale.replicas")

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
    #: the primary did not answer the latest round (down, restarting, failing over)
    primary_unreachable: bool = False
    #: ``time.monotonic()`` of the latest round in which the primary answered while this
    #: replica streamed within the lag budget: the start of an outage's grace period
    in_budget_with_primary_at: float = -math.inf

    def quarantined(self, now: float) -> bool:
        return now < self.quarantined_until

    def within_budget(self) -> bool:
        """Apply the lag rule: time lag OR byte lag within its limit."""
        max_seconds = dbscale_settings.max_replica_lag
        max_bytes = dbscale_settings.max_replica_lag_bytes
        if self.lag_seconds is not None and self.lag_seconds <= max_seconds:
            return True
        return self.lag_bytes is not None and max_bytes is not None and self.lag_bytes <= max_bytes

    def assess(self, now: float | None = None) -> None:
        """Recompute :attr:`eligible` from the measurements (after each probe).

        While the primary does not answer (a restart, a crash, a failover) the replica's
        WAL receiver cannot stream, its time lag grows with the idle clock and its byte lag
        cannot be measured, yet it holds what the primary had up to the outage (minus what
        it had not replayed): it stays eligible if it was within the budget the last time
        the primary answered, for at most ``MAX_REPLICA_LAG`` seconds from then. Reads that
        need nothing newer than it has replayed keep working; reads that need the primary
        (a write's position not yet known, a transaction) fail as the primary does.
        """
        if self.primary_unreachable:
            now = time.monotonic() if now is None else now
            grace = dbscale_settings.max_replica_lag
            self.eligible = (
                self.healthy and self.in_recovery and now - self.in_budget_with_primary_at <= grace
            )
            return
        self.eligible = (
            self.healthy and self.in_recovery and self.receiver_streaming and self.within_budget()
        )
        if self.eligible:
            self.in_budget_with_primary_at = time.monotonic() if now is None else now

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
    """Build psycopg connection kwargs for *alias* with short timeouts.

    The library's own connection parameters (:func:`~django_dbscale.own_connections.
    connection_params`): every libpq option of the alias reaches the probe, so a probe of a
    multi-host alias measures the server ``target_session_attrs`` picks for its reads, and
    no server-side prepared statements are made (PgBouncer).
    """
    statement_timeout = f"-c statement_timeout={max(1, int(timeout * 1000))}"
    user_options = settings.DATABASES[alias].get("OPTIONS", {}).get("options")
    return connection_params(
        alias,
        connect_timeout=max(1, math.ceil(timeout)),
        options=f"{user_options} {statement_timeout}" if user_options else statement_timeout,
        application_name="django_dbscale probe",
    )


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
            status.primary_unreachable = primary_job.row is None
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
