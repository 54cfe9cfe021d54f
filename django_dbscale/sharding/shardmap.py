"""The shared, versioned shard map: the ring each group's rows are placed under right now.

``DBSCALE["SHARD_GROUPS"]`` declares the ring each group *should* have (the target). The
``dbscale_shard_map`` table on ``default`` holds the ring its rows *are* placed under (the
active ring), one row per group with a version that only a resharding bumps, at cutover.
Routing follows the active ring, so every process agrees on where a key lives even while
their settings differ (a deploy rolling out a new ``SHARDS`` list), and a process can tell
that its settings are ahead of the active map (``manage.py dbscale reshard --status``,
check ``dbscale.W103``).

Each process keeps a copy of the map and re-reads the versions at most every
``SHARD_MAP_CHECK_INTERVAL`` seconds (default 1), from the first routing decision after the
interval: one ``SELECT`` of a few rows on a connection of the library's own, so it never
joins the caller's transaction or counts in its ``assertNumQueries``. A process that has
not re-read yet cannot write a moved key to its old shard: the old shard refuses it (see
:mod:`~django_dbscale.sharding.moves`), and the library refreshes the map on that refusal.

A group without a row routes by its settings, as before the map existed; ``migrate`` seeds
the rows from settings (:func:`seed`), so the map records the ring the rows were placed
under before anyone edits ``SHARDS``.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from django.db import DEFAULT_DB_ALIAS
from django.db.models.signals import post_migrate
from django.dispatch import receiver
from psycopg.types.json import Jsonb

from django_dbscale import consistency
from django_dbscale.conf import ShardGroupSpec, dbscale_settings, on_settings_changed
from django_dbscale.own_connections import connect

__all__ = [
    "TABLE",
    "ActiveRing",
    "active",
    "placed_elsewhere",
    "maybe_refresh",
    "on_change",
    "read_map",
    "refresh",
    "seed",
    "spec_from_json",
    "spec_to_json",
]

logger = logging.getLogger("django_dbscale.sharding")

TABLE = "dbscale_shard_map"


@dataclass(frozen=True)
class ActiveRing:
    """One group's row of the shard map."""

    group: str
    version: int
    spec: ShardGroupSpec
    fingerprint: str
    #: Shard alias -> WAL position its replicas must have replayed (last cutover onto it).
    floors: Mapping[str, str] = field(default_factory=dict)


def spec_to_json(spec: ShardGroupSpec) -> list[list[Any]]:
    """Return the ``shards`` column value of *spec*: ``[[alias, weight], ...]``."""
    return [[alias, int(spec.weights.get(alias, 1))] for alias in spec.shards]


def spec_from_json(group: str, shards: Any, vnodes: int) -> ShardGroupSpec:
    """Build a :class:`ShardGroupSpec` from a stored ``shards`` value."""
    aliases = tuple(str(item[0]) for item in shards)
    weights = {str(item[0]): int(item[1]) for item in shards if int(item[1]) != 1}
    return ShardGroupSpec(group, aliases, weights, int(vnodes))


def read_map(conn: psycopg.Connection[Any]) -> dict[str, ActiveRing]:
    """Read every row of the map through *conn* (empty when the table does not exist)."""
    with conn.cursor() as cursor:
        try:  # one round trip: this runs every check interval in every process
            cursor.execute(
                f'SELECT "group", version, shards, vnodes, fingerprint, floors FROM {TABLE}'
            )
        except psycopg.errors.UndefinedTable:
            if not conn.autocommit:
                conn.rollback()
            return {}
        rows = cursor.fetchall()
    return {
        str(group): ActiveRing(
            str(group),
            int(version),
            spec_from_json(str(group), shards, vnodes),
            str(fingerprint),
            dict(floors or {}),
        )
        for group, version, shards, vnodes, fingerprint, floors in rows
    }


Listener = Callable[[], None]


class _MapCache:
    """This process's copy of the map, re-read at most every check interval."""

    def __init__(self) -> None:
        self.rings: dict[str, ActiveRing] = {}
        self.next_check = 0.0
        self.lock = threading.Lock()
        self.conn: psycopg.Connection[Any] | None = None
        self.pid = os.getpid()
        self.listeners: list[Listener] = []
        self.failing = False
        #: Connections inherited through fork: kept referenced so their finalizer never
        #: closes the parent's socket from the child.
        self.abandoned: list[psycopg.Connection[Any]] = []

    def connection(self) -> psycopg.Connection[Any]:
        if self.pid != os.getpid():
            if self.conn is not None:
                self.abandoned.append(self.conn)
            self.conn, self.pid = None, os.getpid()
        if self.conn is None or self.conn.closed:
            timeout_ms = max(100, int(dbscale_settings.shard_map_check_interval * 1000))
            self.conn = connect(
                DEFAULT_DB_ALIAS,
                connect_timeout=2,
                options=f"-c statement_timeout={timeout_ms}",
                application_name="django_dbscale shard map",
            )
        return self.conn


_cache = _MapCache()


def _after_fork_in_child() -> None:
    # A fork taken while another thread refreshed would leave the lock held forever.
    _cache.lock = threading.Lock()
    _cache.next_check = 0.0


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_at_exit() -> None:
    conn = _cache.conn
    if conn is not None and _cache.pid == os.getpid() and not conn.closed:
        conn.close()


def on_change(listener: Listener) -> Listener:
    """Call *listener* (no arguments) whenever this process's copy of the map changes."""
    _cache.listeners.append(listener)
    return listener


def _apply(rings: dict[str, ActiveRing]) -> bool:
    old = {g: (r.version, r.fingerprint) for g, r in _cache.rings.items()}
    new = {g: (r.version, r.fingerprint) for g, r in rings.items()}
    _cache.rings = rings
    if old == new:  # floors only change with a version
        return False
    floors: dict[str, int] = {}
    for ring in rings.values():
        for alias, position in ring.floors.items():
            value = consistency.parse_lsn(position)
            floors[alias] = max(value, floors.get(alias, 0))
    consistency.set_placement_floors(floors)
    for listener in list(_cache.listeners):
        listener()
    return True


def refresh(*, wait: bool = True) -> bool:
    """Re-read the map now; return whether this process's copy changed.

    With ``wait=False`` a thread that finds another one refreshing returns at once (the
    routing path); errors reaching ``default`` are logged and the copy is kept until the
    next interval.
    """
    if not _cache.lock.acquire(blocking=wait):
        return False
    try:
        interval = dbscale_settings.shard_map_check_interval
        try:
            rings = read_map(_cache.connection())
        except psycopg.Error as exc:
            # Once per outage, not once per interval.
            log = logger.debug if _cache.failing else logger.warning
            log(
                "Could not read the shard map on %r (%s); keeping this process's copy.",
                DEFAULT_DB_ALIAS,
                exc,
            )
            _cache.failing = True
            if _cache.conn is not None and not _cache.conn.closed:
                _cache.conn.close()
            _cache.next_check = time.monotonic() + interval
            return False
        _cache.next_check = time.monotonic() + interval
        _cache.failing = False
        return _apply(rings)
    finally:
        _cache.lock.release()


def maybe_refresh() -> None:
    """Re-read the map if this process's copy is older than the check interval."""
    if time.monotonic() >= _cache.next_check:
        refresh(wait=False)


def active(group: str) -> ActiveRing | None:
    """Return the active ring of *group* from the map, or ``None`` if it has no row."""
    maybe_refresh()
    return _cache.rings.get(group)


@on_settings_changed
def _forget() -> None:
    # The settings may point ``default`` elsewhere: reconnect and re-read on next use.
    with _cache.lock:
        if _cache.conn is not None and _cache.pid == os.getpid() and not _cache.conn.closed:
            _cache.conn.close()
        _cache.conn = None
        _cache.next_check = 0.0


def seed(
    conn: psycopg.Connection[Any], groups: Mapping[str, ShardGroupSpec] | None = None
) -> list[str]:
    """Record the settings' ring of each group that has no row yet; return those groups.

    Run by ``migrate`` on ``default`` (and by the resharding command), so the map holds the
    ring a group's rows were placed under before anyone edits ``SHARDS``. A group already in
    the map is never changed here: only a resharding's cutover changes it. A group whose
    populated shards are stamped with another ring is not recorded (logged as an error:
    :func:`placed_elsewhere`).
    """
    from django_dbscale.sharding.ring import build_ring

    specs = dbscale_settings.shard_groups if groups is None else groups
    seeded = []
    with conn.cursor() as cursor:
        cursor.execute(f'SELECT "group" FROM {TABLE}')
        present = {str(r[0]) for r in cursor.fetchall()}
        for name, spec in specs.items():
            if not spec.shards or name in present:
                continue
            placed_under = placed_elsewhere(name, spec)
            if placed_under:
                logger.error(
                    "Not recording shard group %r in the shard map: %s. Restore the SHARDS "
                    "its rows were placed under, run migrate (which records them), then "
                    "declare the new SHARDS and run `manage.py dbscale reshard %s`.",
                    name,
                    placed_under,
                    name,
                )
                continue
            cursor.execute(
                f'INSERT INTO {TABLE} ("group", version, shards, vnodes, fingerprint, floors) '
                "VALUES (%s, 1, %s, %s, %s, '{}') ON CONFLICT (\"group\") DO NOTHING "
                'RETURNING "group"',
                [
                    name,
                    Jsonb(spec_to_json(spec)),
                    spec.vnodes,
                    build_ring(spec).fingerprint,
                ],
            )
            if cursor.fetchone():
                seeded.append(name)
    return seeded


def placed_elsewhere(group: str, spec: ShardGroupSpec) -> str:
    """Return why *group*'s rows are not placed under *spec*'s ring, or ``""``.

    Read from the ring stamps of the group's populated shards (each records the ring its
    rows were placed under): the map must never record, as the active ring, a ring the
    rows do not follow (a project that edited ``SHARDS`` before upgrading to the map).
    A shard that cannot be read counts as agreeing (its routing check refuses it later).
    """
    from django.core.exceptions import SynchronousOnlyOperation
    from django.db import DatabaseError, connections

    from django_dbscale.sharding import ids
    from django_dbscale.sharding.ring import build_ring

    fingerprint = build_ring(spec).fingerprint
    for alias in spec.shards:
        if alias not in connections:
            continue
        connection = connections[alias]
        try:
            stamp = ids.read_stamp(connection, group)
            if (
                stamp is not None
                and stamp.fingerprint != fingerprint
                and ids.is_populated(connection, group, stamp)
            ):
                return (
                    f"shard {alias!r} holds rows placed under ring {stamp.fingerprint}, "
                    f"but SHARD_GROUPS declares ring {fingerprint}"
                )
        except (DatabaseError, SynchronousOnlyOperation):
            continue
    return ""


@receiver(post_migrate, dispatch_uid="django_dbscale.sharding.seed_shard_map")
def _seed_on_migrate(*, using: str, app_config: Any, **kwargs: Any) -> None:
    if using != DEFAULT_DB_ALIAS or app_config.label != "django_dbscale":
        return
    if not dbscale_settings.shard_groups:
        return
    with connect(using) as conn:
        seeded = seed(conn)
    if seeded:
        logger.info("Recorded the active ring of shard groups %s in %s.", seeded, TABLE)
    refresh()
