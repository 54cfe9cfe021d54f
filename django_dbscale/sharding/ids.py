"""Globally unique, time-ordered 64-bit (or 53-bit) primary keys for sharded models.

In the spirit of Instagram's IDs, an ID packs, from the most significant bit down:

=====================  ==========  ============  ===========================================
layout                 time (ms)   shard number  per-shard sequence
=====================  ==========  ============  ===========================================
``ShardedIDField()``   41 bits     12 bits       10 bits  (63 bits: always a positive bigint)
``js_safe=True``       41 bits     5 bits        7 bits   (53 bits: exact in a JS ``Number``)
=====================  ==========  ============  ===========================================

*time* is milliseconds since :data:`EPOCH` (2024-01-01 UTC), good for 69 years; the *shard
number* is the shard's position in its group's ``SHARDS`` list (so append new shards, never
reorder: the stamp check refuses a reordering of populated shards); the *sequence* numbers
the IDs made on that shard within that millisecond.

IDs are generated **in the database** by ``dbscale_next_id(shard_bits, seq_bits)``, a
PL/pgSQL function that is the column's ``DEFAULT``: every insert path (``save()``,
``bulk_create()``, raw SQL, ``COPY``) gets an ID without a round trip, and the value comes
back with ``INSERT ... RETURNING``. The function (with the shard number baked in) is
installed on every shard by a ``pre_migrate`` receiver, not by a migration, because it must
exist before the first ``CREATE TABLE`` of *any* app (migrated or ``run_syncdb``) whose
sharded model uses it, and its body differs per shard.

Uniqueness: the (millisecond, sequence) pair is one counter per layout and shard, a
PostgreSQL sequence ``dbscale_id_clock_<seq_bits>`` holding ``ms << seq_bits | seq``. Each
ID takes the next counter value, or jumps the counter to the current millisecond when it
is behind the clock, under a per-shard advisory lock held for those two statements only
(session-level, released at once, also on errors; never until the end of the
transaction). So every ID of a shard is unique whatever the concurrency, with no sleeping:
more than ``2**seq_bits`` IDs in one millisecond (1,024 for 64-bit, 128 for ``js_safe``)
borrow the next millisecond's numbers, and the time part runs ahead of the clock until the
burst is over. A clock stepped backwards cannot repeat an ID either. Across shards IDs
never collide: the shard number differs.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

from django.core.exceptions import SynchronousOnlyOperation
from django.db import DatabaseError, connections, models, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Func, Value
from django.db.models.expressions import DatabaseDefault
from django.db.models.signals import pre_migrate
from django.dispatch import receiver

from django_dbscale.conf import dbscale_settings, on_settings_changed
from django_dbscale.sharding.exceptions import RingChangeRefused, UnknownShard
from django_dbscale.sharding.ring import get_ring

__all__ = [
    "EPOCH",
    "IdLayout",
    "IdParts",
    "LAYOUT_53",
    "LAYOUT_64",
    "ShardedIDField",
    "decode_id",
    "install_shard_functions",
    "ring_problems",
    "shard_number",
    "shard_of_id",
    "verify_ring_once",
]

logger = logging.getLogger(__name__)

#: Milliseconds since the Unix epoch of the IDs' epoch, 2024-01-01T00:00:00Z.
EPOCH_MS = 1_704_067_200_000
EPOCH = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class IdLayout:
    """Bit widths of an ID's parts (time in ms since :data:`EPOCH`, shard, sequence)."""

    time_bits: int
    shard_bits: int
    seq_bits: int

    @property
    def total_bits(self) -> int:
        return self.time_bits + self.shard_bits + self.seq_bits

    @property
    def max_shards(self) -> int:
        return 1 << self.shard_bits


LAYOUT_64 = IdLayout(time_bits=41, shard_bits=12, seq_bits=10)
LAYOUT_53 = IdLayout(time_bits=41, shard_bits=5, seq_bits=7)


@dataclass(frozen=True)
class IdParts:
    """What an ID says: when it was made, on which shard number, and its sequence part."""

    created: dt.datetime
    shard_number: int
    sequence: int


def decode_id(value: int, *, js_safe: bool = False) -> IdParts:
    """Split an ID made by :class:`ShardedIDField` (of the given layout) into its parts."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"decode_id({value!r}): an ID is a non-negative int.")
    layout = LAYOUT_53 if js_safe else LAYOUT_64
    if value >= 1 << layout.total_bits:
        raise ValueError(
            f"decode_id({value!r}): larger than a {layout.total_bits}-bit ID"
            + (" (pass js_safe=False for 64-bit IDs)" if js_safe else "")
            + "."
        )
    sequence = value & ((1 << layout.seq_bits) - 1)
    shard = (value >> layout.seq_bits) & ((1 << layout.shard_bits) - 1)
    ms = value >> (layout.seq_bits + layout.shard_bits)
    return IdParts(EPOCH + dt.timedelta(milliseconds=ms), shard, sequence)


def shard_number(alias: str) -> int:
    """Return the shard number of *alias*: its position in its group's ``SHARDS``."""
    group = dbscale_settings.group_of_shard.get(alias)
    if group is None:
        raise UnknownShard(
            f"{alias!r} is not a shard alias of any group in DBSCALE['SHARD_GROUPS']."
        )
    return dbscale_settings.shard_groups[group].shards.index(alias)


def shard_of_id(group: str, value: int, *, js_safe: bool = False) -> str:
    """Return the shard alias of *group* that generated ID *value*."""
    shards = get_ring(group).nodes
    number = decode_id(value, js_safe=js_safe).shard_number
    if number >= len(shards):
        raise UnknownShard(
            f"ID {value} was made by shard number {number}, but group {group!r} has only "
            f"{len(shards)} shards {list(shards)}: it is not an ID of this group"
            + ("" if js_safe else " (or it is a js_safe ID: pass js_safe=True)")
            + "."
        )
    return shards[number]


class NextShardID(Func):
    """``dbscale_next_id(shard_bits, seq_bits)``: the column default of :class:`ShardedIDField`."""

    function = "dbscale_next_id"
    output_field = models.BigIntegerField()

    def __init__(self, layout: IdLayout) -> None:
        super().__init__(Value(layout.shard_bits), Value(layout.seq_bits))


class ShardedIDField(models.BigIntegerField):  # type: ignore[type-arg]
    """A ``bigint`` filled by the database with a global, time-ordered ID on insert.

    Use it as the primary key of sharded models::

        id = ShardedIDField(primary_key=True)               # 63-bit IDs
        id = ShardedIDField(primary_key=True, js_safe=True)  # < 2**53, exact in JavaScript

    Unsaved instances have ``pk=None``; ``save()`` and ``bulk_create()`` fill it from
    ``INSERT ... RETURNING``.
    """

    description = "Global time-ordered ID generated on the shard"

    def __init__(self, *args: Any, js_safe: bool = False, **kwargs: Any) -> None:
        if "db_default" in kwargs or "default" in kwargs:
            raise TypeError("ShardedIDField() sets its own database default; drop default=.")
        self.js_safe = bool(js_safe)
        self.layout = LAYOUT_53 if self.js_safe else LAYOUT_64
        kwargs.setdefault("editable", False)
        kwargs["db_default"] = NextShardID(self.layout)
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> Any:
        name, path, args, kwargs = super().deconstruct()
        kwargs.pop("db_default", None)
        if kwargs.get("editable") is False:
            del kwargs["editable"]
        if self.js_safe:
            kwargs["js_safe"] = True
        return name, path, args, kwargs

    def get_default(self) -> Any:
        # Unsaved rows show pk=None, as with AutoField, instead of a DatabaseDefault marker.
        return None

    def get_pk_value_on_save(self, instance: models.Model) -> Any:
        # None keeps bulk_create() on the path that reads the pk back from RETURNING.
        return None

    def pre_save(self, model_instance: models.Model, add: bool) -> Any:
        value = getattr(model_instance, self.attname)
        if value is None and add:
            return DatabaseDefault(cast(Any, self.db_default), output_field=self)
        return value


# -- per-shard installation -----------------------------------------------------------------

STAMP_TABLE = "dbscale_shard_stamp"

#: First key of the advisory lock (with seq_bits as the second) serialising ID counters.
ID_LOCK_CLASS = 0x64627363  # "dbsc"

_FUNCTIONS_SQL = """
CREATE SEQUENCE IF NOT EXISTS dbscale_id_clock_10;
CREATE SEQUENCE IF NOT EXISTS dbscale_id_clock_7;
CREATE OR REPLACE FUNCTION dbscale_shard_number() RETURNS integer
    LANGUAGE sql IMMUTABLE AS $$ SELECT {number} $$;
CREATE OR REPLACE FUNCTION dbscale_next_id(shard_bits integer, seq_bits integer)
    RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    shard integer := dbscale_shard_number();
    clock regclass;
    now_c bigint;
    c bigint;
BEGIN
    IF shard >= (1 << shard_bits) THEN
        RAISE EXCEPTION 'dbscale: shard number % does not fit in % bits of the ID', shard,
            shard_bits;
    END IF;
    IF seq_bits = 10 THEN
        clock := 'dbscale_id_clock_10';
    ELSIF seq_bits = 7 THEN
        clock := 'dbscale_id_clock_7';
    ELSE
        RAISE EXCEPTION 'dbscale: no ID counter for % sequence bits (use 10 or 7)', seq_bits;
    END IF;
    -- The counter is ms << seq_bits | seq. Taking the next value, or jumping it forward to
    -- the clock, happens under a session-level advisory lock released right after (not at
    -- the end of the transaction), so concurrent sessions never share a (ms, seq) pair.
    BEGIN
        PERFORM pg_advisory_lock({lock}, seq_bits);
        c := nextval(clock);
        now_c := (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint - {epoch})
            << seq_bits;
        IF c < now_c THEN
            PERFORM setval(clock, now_c);
            c := now_c;
        END IF;
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        -- A session-level lock survives the error: release it if it was taken.
        IF EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'
                   AND pid = pg_backend_pid() AND classid = {lock}::bigint::oid
                   AND objid = seq_bits::oid AND objsubid = 2) THEN
            PERFORM pg_advisory_unlock({lock}, seq_bits);
        END IF;
        RAISE;
    END;
    PERFORM pg_advisory_unlock({lock}, seq_bits);
    RETURN ((c >> seq_bits) << (shard_bits + seq_bits)) | (shard::bigint << seq_bits)
        | (c & ((1::bigint << seq_bits) - 1));
END $$;
CREATE TABLE IF NOT EXISTS {stamp} (
    id smallint PRIMARY KEY CHECK (id = 1),
    shard_group text NOT NULL,
    alias text NOT NULL,
    shard_number integer NOT NULL,
    vnodes integer NOT NULL,
    fingerprint text NOT NULL,
    stamped_at timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True)
class ShardStamp:
    """What a shard database records about the ring it was populated under."""

    group: str
    alias: str
    shard_number: int
    vnodes: int
    fingerprint: str


def read_stamp(connection: BaseDatabaseWrapper) -> ShardStamp | None:
    """Return the stamp stored on *connection*'s database, or None if there is none."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [STAMP_TABLE])
        row = cursor.fetchone()
        if not row or not row[0]:
            return None
        cursor.execute(
            f"SELECT shard_group, alias, shard_number, vnodes, fingerprint FROM {STAMP_TABLE}"
        )
        row = cursor.fetchone()
    if row is None:
        return None
    return ShardStamp(str(row[0]), str(row[1]), int(row[2]), int(row[3]), str(row[4]))


def is_populated(
    connection: BaseDatabaseWrapper, group: str, stamp: ShardStamp | None = None
) -> bool:
    """Return whether any table of *group*'s sharded models has a row on this database.

    With *stamp*, the tables of the group the shard was stamped for count too: a shard
    moved to another group holds rows of its old group's models.
    """
    from django_dbscale.sharding.routing import sharded_models

    groups = {group} if stamp is None else {group, stamp.group}
    tables = sorted({spec.model._meta.db_table for g in groups for spec in sharded_models(g)})
    with connection.cursor() as cursor:
        for table in tables:
            cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [table])
            row = cursor.fetchone()
            if row and row[0]:
                cursor.execute(f"SELECT EXISTS (SELECT 1 FROM {connection.ops.quote_name(table)})")
                row = cursor.fetchone()
                if row and row[0]:
                    return True
    return False


def stamp_problems(alias: str, stamp: ShardStamp | None, populated: bool) -> list[str]:
    """Return why *alias*'s stamp forbids using the configured ring (empty if it does not).

    Only a populated shard is protected: an empty one may be re-stamped freely.
    """
    if stamp is None or not populated:
        return []
    group = dbscale_settings.group_of_shard[alias]
    spec = dbscale_settings.shard_groups[group]
    problems = []
    if stamp.group != group:
        problems.append(f"it holds rows of group {stamp.group!r}, now configured as {group!r}")
    if stamp.vnodes != spec.vnodes:
        problems.append(
            f"its rows were placed with VNODES={stamp.vnodes}, now {spec.vnodes} (changing "
            "VNODES moves most keys)"
        )
    if stamp.shard_number != spec.shards.index(alias):
        problems.append(
            f"it is shard number {stamp.shard_number} in its IDs, now at position "
            f"{spec.shards.index(alias)} of SHARDS (append shards, never reorder)"
        )
    return problems


def install_shard_functions(
    alias: str, *, restamp: bool = False, force: bool = False
) -> ShardStamp | None:
    """Install the ID function and the ring stamp on shard *alias* (idempotent).

    Returns the shard's stamp afterwards, or ``None`` when *alias* is not a shard. Raises
    :class:`RingChangeRefused` when the shard holds rows placed under another VNODES
    count, group or shard number, unless *force* (after a resharding). A changed ring
    fingerprint alone (shards added, weights changed) on a populated shard is re-stamped
    only with *restamp* (``manage.py dbscale shards --stamp``, run once the rows are
    moved); until then check ``dbscale.W100`` reports it.
    """
    group = dbscale_settings.group_of_shard.get(alias)
    if group is None:
        return None
    spec = dbscale_settings.shard_groups[group]
    ring = get_ring(group)
    number = spec.shards.index(alias)
    connection = connections[alias]
    existing = read_stamp(connection)
    populated = existing is not None and is_populated(connection, group, existing)
    problems = stamp_problems(alias, existing, populated)
    if problems and not force:
        raise RingChangeRefused(
            f"Shard {alias!r} of group {group!r} is populated and "
            + "; ".join(problems)
            + ". Restore the old setting, or reshard and then run "
            "`manage.py dbscale shards --stamp --force`."
        )
    sql = _FUNCTIONS_SQL.format(
        number=number, epoch=EPOCH_MS, stamp=STAMP_TABLE, lock=ID_LOCK_CLASS
    )
    new = ShardStamp(group, alias, number, spec.vnodes, ring.fingerprint)
    with connection.cursor() as cursor:
        cursor.execute(sql)
        if (
            existing is not None
            and populated
            and existing.fingerprint != new.fingerprint
            and not (restamp or force)
        ):
            logger.warning(
                "Shard %s of group %s is populated and its ring changed (stamped %s, now %s); "
                "not re-stamping.",
                alias,
                group,
                existing.fingerprint,
                new.fingerprint,
            )
            return existing
        cursor.execute(
            f"INSERT INTO {STAMP_TABLE} (id, shard_group, alias, shard_number, vnodes, "
            "fingerprint) VALUES (1, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
            "shard_group = EXCLUDED.shard_group, alias = EXCLUDED.alias, "
            "shard_number = EXCLUDED.shard_number, vnodes = EXCLUDED.vnodes, "
            "fingerprint = EXCLUDED.fingerprint, stamped_at = now()",
            [group, alias, number, spec.vnodes, new.fingerprint],
        )
    return new


def ring_problems(alias: str, stamp: ShardStamp | None, populated: bool) -> list[str]:
    """Return why routing to *alias* under the configured ring would misplace rows.

    :func:`stamp_problems`, plus a changed ring fingerprint (shards added, weights or the
    ring implementation changed) on a populated shard: keys may now map elsewhere.
    """
    problems = stamp_problems(alias, stamp, populated)
    if stamp is not None and populated and not problems:
        group = dbscale_settings.group_of_shard[alias]
        fingerprint = get_ring(group).fingerprint
        if stamp.fingerprint != fingerprint:
            problems.append(
                f"its rows were placed by ring {stamp.fingerprint}, but the configured ring "
                f"is {fingerprint} (shards added, or weights changed): some keys now map to "
                "another shard"
            )
    return problems


#: Seconds before retrying the stamp check of a shard that could not be read.
VERIFY_RETRY = 5.0

_verified: set[str] = set()
_verify_retry_at: dict[str, float] = {}


@on_settings_changed
def _forget_verified() -> None:
    _verified.clear()
    _verify_retry_at.clear()


def verify_ring_once(primary: str, via: str | None = None) -> None:
    """Refuse to route to shard *primary* if it was populated under another ring.

    Runs once per process and shard (again after a settings change): reads the shard's
    stamp (through *via*, a replica of it, if given) and raises
    :class:`RingChangeRefused` when :func:`ring_problems` finds any, so a changed
    ``VNODES``, weight or shard list fails loudly instead of reading and writing the wrong
    shard. An unreadable shard is retried after :data:`VERIFY_RETRY` seconds (the query
    that follows reports the real error). Explicit ``.using()``, fan-out and the
    management commands do not route by key and are not checked.
    """
    if primary in _verified:
        return
    group = dbscale_settings.group_of_shard.get(primary)
    if group is None:
        _verified.add(primary)
        return
    now = time.monotonic()
    if now < _verify_retry_at.get(primary, 0.0):
        return
    alias = via or primary
    connection = connections[alias]
    try:
        if connection.in_atomic_block:
            # A savepoint: a failed read must not break the caller's transaction.
            with transaction.atomic(using=alias):
                stamp = read_stamp(connection)
                populated = stamp is not None and is_populated(connection, group, stamp)
        else:
            stamp = read_stamp(connection)
            populated = stamp is not None and is_populated(connection, group, stamp)
    except (DatabaseError, SynchronousOnlyOperation, RuntimeError) as exc:
        # An unreachable shard, an async context, or database access blocked (tests that
        # build unsaved rows: Django asks the routers where a new row would go). The query
        # that follows, if any, reports the real error; the check is retried later.
        _verify_retry_at[primary] = now + VERIFY_RETRY
        logger.warning("Could not read the ring stamp of shard %s (%s); will retry.", alias, exc)
        return
    problems = ring_problems(primary, stamp, populated)
    if problems:
        raise RingChangeRefused(
            f"Refusing to route {group!r} rows to shard {primary!r}: it is populated and "
            + "; ".join(problems)
            + ". Restore the previous SHARD_GROUPS setting, or move the rows (reshard) and "
            "then run `manage.py dbscale shards --stamp` (with --force for VNODES, group or "
            "shard number changes). Explicit .using(alias) and .all_shards() still work for "
            "the move."
        )
    _verified.add(primary)


@receiver(pre_migrate, dispatch_uid="django_dbscale.sharding.install_shard_functions")
def _install_on_pre_migrate(*, using: str, **kwargs: Any) -> None:
    # Sent once per migrated app; installation is idempotent and a few statements long.
    if using in dbscale_settings.group_of_shard:
        install_shard_functions(using)
