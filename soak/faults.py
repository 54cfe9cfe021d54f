"""The fault schedule: what breaks when, applied to the harness's services and logged.

Faults run one at a time, each ``hold`` seconds, with quiet time between them. Each is
logged to ``faults.jsonl`` with ``t0`` (before it is applied), ``t_active`` (applied),
``t_heal`` (healing begins) and ``t1`` (healed: a restarted server accepts connections, a
resumed replica has caught up), on the same monotonic clock as the operation logs, and
the servers it ``affects`` (``pg1``, ``pg1_replica``, ``pg2``, ``pg2_replica``, ``redis``),
which the checker uses to split errors by whether the primary was up.

Short schedule (CI, the whole cycle from 60 s): replica path cut, replay held beyond the
budget, Redis killed and restarted empty, a replica killed and restarted. The full schedule
(``--full``) adds a replica path black-holed, Redis cut, the ``default`` primary restarted
and a shard server stopped, and repeats the cycle until the end of the run. With
``--sentinel`` the cache runs on Redis Sentinel and the Redis faults become a Sentinel
failover and a killed master (the sentinels promote the replica; the old master comes
back as a replica).

With ``--promotion`` the ``default`` database runs on a
:class:`~django_dbscale.testing.harness.PgFailoverCluster` (a primary and two streaming
replicas, logged as ``pg_failover`` and ``pg_failover_replica``) and each cycle begins
with a planned switchover (:data:`PRIMARY_PROMOTED`): the primary is shut down, a replica
promoted, the other replica re-pointed at it, and the old primary rebuilt as a replica.
``primary_restart`` then restarts ``pg1`` with only ``shard0`` on it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from django_dbscale.testing.harness import (
    HarnessError,
    PgFailoverCluster,
    PgServer,
    RedisNode,
    RedisSentinel,
    Services,
)
from soak.oplog import OpLog

#: Seconds of quiet before the first fault and at the end of the run.
LEAD_IN = 4.0
TAIL = 8.0
#: Seconds of quiet between two faults.
GAP = 4.0
#: Replay is held longer than the settings' MAX_REPLICA_LAG (5 s) while users write.
REPLAY_HOLD = 9.0
#: Seconds a restart or a catch-up adds to a fault's hold, for planning.
RESTART = 2.0
#: The names the fault log and ``run.json`` give the ``--promotion`` cluster's roles:
#: whichever server is primary now, and the replica ``default_replica`` reads.
FAILOVER = "pg_failover"
FAILOVER_REPLICA = "pg_failover_replica"


@dataclass
class Targets:
    """What faults act on: the harness's services, Redis Sentinel and the failover cluster.

    ``sentinel`` is set with ``--sentinel``; ``cluster`` and ``reader`` with
    ``--promotion``: ``reader`` is the cluster's replica that ``default_replica`` names,
    which stays a replica (only the other two servers take turns as primary), so the
    library's replica probe and its reads always reach the same server.
    """

    services: Services
    sentinel: RedisSentinel | None = None
    cluster: PgFailoverCluster | None = None
    reader: PgServer | None = None
    old_master: RedisNode | None = field(default=None, repr=False)
    old_primary: PgServer | None = field(default=None, repr=False)

    def require_sentinel(self) -> RedisSentinel:
        if self.sentinel is None:
            raise HarnessError(
                "a Sentinel fault needs the run's Sentinel (python -m soak --sentinel)"
            )
        return self.sentinel

    def require_cluster(self) -> tuple[PgFailoverCluster, PgServer]:
        if self.cluster is None or self.reader is None:
            raise HarnessError(
                "a promotion fault needs the run's failover cluster (python -m soak --promotion)"
            )
        return self.cluster, self.reader


@dataclass(frozen=True)
class Fault:
    """One fault: ``begin`` breaks, ``end`` heals (and waits until healed)."""

    name: str
    hold: float
    affects: tuple[str, ...]
    begin: Callable[[Targets], None]
    end: Callable[[Targets], None]


def _proxy(name: str, mode: str) -> Callable[[Targets], None]:
    return lambda t: getattr(t.services.proxies[name], mode)()


def _stop(server: str) -> Callable[[Targets], None]:
    return lambda t: t.services.servers[server].stop()


def _start(server: str) -> Callable[[Targets], None]:
    def start(t: Targets) -> None:
        t.services.servers[server].start()
        if server.endswith("_replica"):
            t.services.servers[server].wait_for_replay(timeout=60)

    return start


def _pause(server: str) -> Callable[[Targets], None]:
    return lambda t: t.services.servers[server].pause_replay()


def _resume(server: str) -> Callable[[Targets], None]:
    def resume(t: Targets) -> None:
        t.services.servers[server].resume_replay()
        t.services.servers[server].wait_for_replay(timeout=60)

    return resume


def _redis_stop(t: Targets) -> None:
    t.services.redis.stop()


def _redis_start_empty(t: Targets) -> None:
    t.services.redis.start()  # the harness's Redis always starts empty


def _sentinel_failover(t: Targets) -> None:
    sentinel = t.require_sentinel()
    t.old_master = sentinel.master
    sentinel.failover()


def _sentinel_settle(t: Targets) -> None:
    assert t.old_master is not None
    t.require_sentinel().wait_for_replica(t.old_master)


def _sentinel_kill_master(t: Targets) -> None:
    sentinel = t.require_sentinel()
    t.old_master = sentinel.master
    sentinel.kill_node(t.old_master)


def _sentinel_restart_old_master(t: Targets) -> None:
    sentinel, old = t.require_sentinel(), t.old_master
    assert old is not None
    new = next(node for node in sentinel.data_nodes if node is not old)
    sentinel.wait_for_master(new)  # the sentinels promote the replica by themselves
    sentinel.start_node(old)
    sentinel.wait_for_replica(old)


def _switchover(t: Targets) -> None:
    """Shut the primary down (fast), promote the other writable candidate, re-point the rest.

    A fast shutdown ends only once the WAL senders have sent every record, the shutdown
    checkpoint included, and the replicas have confirmed it: the promoted replica holds
    every acknowledged write, and the other one has replayed no further than the promotion
    point, so it can follow the new timeline.
    """
    cluster, reader = t.require_cluster()
    old = cluster.primary
    new = next(replica for replica in cluster.replicas if replica is not reader)
    t.old_primary = old
    old.stop()
    cluster.promote(new)
    for replica in cluster.replicas:
        if replica is not new:
            cluster.follow(replica, new)


def _rejoin_old_primary(t: Targets) -> None:
    """Rebuild the old primary as a replica of the new one; wait until the replicas caught up.

    If the promotion never happened (no server accepts writes), the old primary is
    restarted as it was instead.
    """
    cluster, _ = t.require_cluster()
    old, t.old_primary = t.old_primary, None
    if old is None:  # the switchover failed before it stopped anything
        return
    try:
        new = cluster.primary
    except StopIteration:  # nothing was promoted: the old primary comes back as it was
        old.start()
        return
    if new is not old:
        cluster.rejoin(old, new)
    cluster.wait_for_replay(timeout=60)


REPLICA_CUT = Fault(
    "replica_cut",
    6.0,
    ("pg1_replica",),
    _proxy("pg1_replica", "cut"),
    _proxy("pg1_replica", "heal"),
)
REPLAY_HELD = Fault(
    "replay_held", REPLAY_HOLD, ("pg2_replica",), _pause("pg2_replica"), _resume("pg2_replica")
)
REDIS_RESTART_EMPTY = Fault(
    "redis_killed_restarted_empty", 4.0, ("redis",), _redis_stop, _redis_start_empty
)
REPLICA_KILLED = Fault(
    "replica_killed", 5.0, ("pg2_replica",), _stop("pg2_replica"), _start("pg2_replica")
)
REPLICA_BLACKHOLED = Fault(
    "replica_blackholed",
    6.0,
    ("pg1_replica",),
    _proxy("pg1_replica", "blackhole"),
    _proxy("pg1_replica", "heal"),
)
REDIS_CUT = Fault("redis_cut", 5.0, ("redis",), _proxy("redis", "cut"), _proxy("redis", "heal"))
PRIMARY_RESTART = Fault("primary_restart", 5.0, ("pg1",), _stop("pg1"), _start("pg1"))
SHARD_SERVER_STOPPED = Fault("shard_server_stopped", 8.0, ("pg2",), _stop("pg2"), _start("pg2"))
#: ``--promotion`` only: a planned switchover of ``default``'s primary, healed by rebuilding
#: the old primary as a replica. The primary is down from the shutdown until the promoted
#: replica accepts writes (about a second); the rest of the hold runs on the new primary.
PRIMARY_PROMOTED = Fault("primary_promoted", 4.0, (FAILOVER,), _switchover, _rejoin_old_primary)

#: With ``--sentinel`` the cache's Redis is a Sentinel-managed master and replica: these
#: replace the faults on the plain Redis.
SENTINEL_FAILOVER = Fault(
    "redis_sentinel_failover", 4.0, ("redis",), _sentinel_failover, _sentinel_settle
)
SENTINEL_MASTER_KILLED = Fault(
    "redis_master_killed", 6.0, ("redis",), _sentinel_kill_master, _sentinel_restart_old_master
)

SHORT = (REPLICA_CUT, REPLAY_HELD, REDIS_RESTART_EMPTY, REPLICA_KILLED)
FULL = (
    REPLICA_CUT,
    REPLAY_HELD,
    REDIS_RESTART_EMPTY,
    REPLICA_KILLED,
    REPLICA_BLACKHOLED,
    REDIS_CUT,
    PRIMARY_RESTART,
    SHARD_SERVER_STOPPED,
)


def plan(
    duration: float, full: bool, sentinel: bool = False, promotion: bool = False
) -> list[Fault]:
    """Return the faults to run in *duration* seconds (the cycle repeats with ``full``).

    With *sentinel*, the faults on the plain Redis are replaced by a Sentinel failover and
    a killed master (the cache then runs on Sentinel, out of reach of the Redis proxy).
    With *promotion*, each cycle begins with :data:`PRIMARY_PROMOTED`: first, so that a
    short run (from 30 s) still has one.
    """
    cycle: tuple[Fault, ...] = FULL if full else SHORT
    if sentinel:
        replaced = {REDIS_RESTART_EMPTY: SENTINEL_MASTER_KILLED, REDIS_CUT: SENTINEL_FAILOVER}
        cycle = tuple(replaced.get(fault, fault) for fault in cycle)
    if promotion:
        cycle = (PRIMARY_PROMOTED, *cycle)
    budget = duration - LEAD_IN - TAIL
    faults: list[Fault] = []
    spent = 0.0
    while True:
        for fault in cycle:
            # A restart takes a few seconds on top of the hold.
            cost = fault.hold + GAP + RESTART
            if spent + cost > budget:
                return faults
            faults.append(fault)
            spent += cost
        if not full:
            return faults


class Schedule(threading.Thread):
    """Run the faults of :func:`plan` on *targets*, logging each; heal on stop."""

    def __init__(self, targets: Targets, faults: list[Fault], log: OpLog, start_at: float):
        super().__init__(name="soak-faults", daemon=True)
        self.targets = targets
        self.faults = faults
        self.log = log
        self.start_at = start_at
        self.stopping = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        self.stopping.wait(max(0.0, self.start_at + LEAD_IN - time.monotonic()))
        for fault in self.faults:
            if self.stopping.is_set():
                return
            record: dict[str, object] = {"fault": fault.name, "affects": list(fault.affects)}
            record["t0"] = time.monotonic()
            try:
                fault.begin(self.targets)
                record["t_active"] = time.monotonic()
                self.stopping.wait(fault.hold)
            except Exception as exc:
                self.errors.append(f"{fault.name} begin: {exc!r}")
                record["error"] = repr(exc)
            finally:
                record["t_heal"] = time.monotonic()
                try:
                    fault.end(self.targets)
                except Exception as exc:
                    self.errors.append(f"{fault.name} end: {exc!r}")
                    record["error"] = repr(exc)
                record["t1"] = time.monotonic()
                self.log.write(record)
            self.stopping.wait(GAP)
