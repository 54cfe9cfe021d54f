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

IDs are generated **in the database** by ``dbscale_next_id(shard_bits, seq_bits, group)``, a
PL/pgSQL function that is the column's ``DEFAULT``: every insert path (``save()``,
``bulk_create()``, raw SQL, ``COPY``) gets an ID without a round trip, and the value comes
back with ``INSERT ... RETURNING``. A database may be a shard of several groups, at a
different position in each, so the column default names the model's group. The functions
(with the shard numbers baked in, one per group) are installed on every shard by a
``pre_migrate`` receiver, not by a migration, because they must exist before the first
``CREATE TABLE`` of *any* app (migrated or ``run_syncdb``) whose sharded model uses them,
and their bodies differ per shard.

Each shard keeps one *stamp* row per group in ``dbscale_shard_stamp`` (its shard number,
VNODES and ring fingerprint in that group); the functions are regenerated from those rows,
so the numbers in the IDs are always the ones the stamps record. Tables made before groups
could share a database have the two-argument ``dbscale_next_id(shard_bits, seq_bits)`` as
their default: it numbers IDs in the database's first stamped group, which for an upgraded
database is the group it was stamped for before (its one-row stamp table is upgraded in
place on the next ``migrate``).

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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from django.apps import apps as live_apps
from django.core.exceptions import SynchronousOnlyOperation
from django.db import DatabaseError, connections, models, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Func, Value
from django.db.models.expressions import DatabaseDefault

from django_dbscale.conf import dbscale_settings, on_settings_changed
from django_dbscale.sharding import shardmap
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
    "read_stamp",
    "read_stamps",
    "ring_problems",
    "shard_number",
    "shard_of_id",
    "stamp_for",
    "stamp_problems",
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


def shard_number(alias: str, group: str | None = None) -> int:
    """Return the shard number of *alias* in *group*: its position in the group's ``SHARDS``.

    *group* may be left out when *alias* is a shard of one group only.
    """
    groups = dbscale_settings.groups_of_shard.get(alias, ())
    if group is None:
        if len(groups) > 1:
            raise UnknownShard(
                f"{alias!r} is a shard of several groups {list(groups)}; pass the group: "
                f"shard_number({alias!r}, {groups[0]!r})."
            )
        group = groups[0] if groups else None
    if group is None or group not in groups:
        where = f"group {group!r}" if group is not None else "any group"
        raise UnknownShard(f"{alias!r} is not a shard alias of {where} in DBSCALE['SHARD_GROUPS'].")
    return _position(alias, group)


def _position(alias: str, group: str) -> int:
    """Return *alias*'s number in *group*: its index in the group's ``SHARDS`` setting.

    Shards are appended, never reordered (the stamps refuse a reordering of populated
    shards), so this is also its index in the nodes of the group's active ring, which
    :func:`shard_of_id` decodes with.
    """
    return dbscale_settings.shard_groups[group].shards.index(alias)


def shard_of_id(group: str, value: int, *, js_safe: bool = False) -> str:
    """Return the shard alias of *group* that generated ID *value*.

    Shards are numbered by their position in ``SHARD_GROUPS`` (retired shards, of weight
    0, keep theirs). After a resharding this names where the row was created, not
    necessarily where it lives now.
    """
    declared = dbscale_settings.shard_groups.get(group)
    shards = declared.shards if declared is not None else get_ring(group).nodes
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
    """``dbscale_next_id(shard_bits, seq_bits, group)``: the default of :class:`ShardedIDField`.

    Without a group (a model whose group is unknown), ``dbscale_next_id(shard_bits,
    seq_bits)``: the form tables made before groups could share databases keep in their
    column default, which numbers IDs in the database's first stamped group.
    """

    function = "dbscale_next_id"
    output_field = models.BigIntegerField()

    def __init__(self, layout: IdLayout, group: str | None = None) -> None:
        args: list[Any] = [Value(layout.shard_bits), Value(layout.seq_bits)]
        if group is not None:
            args.append(Value(group, output_field=models.TextField()))
        super().__init__(*args)


def _group_of_model(model: type[models.Model]) -> str | None:
    """Return the shard group of *model*, live or historical, or None if unknown."""
    group = getattr(model, "shard_group", None)
    if isinstance(group, str):
        return group
    # Historical models (migrations) lose ShardedModel's class attributes: the live model
    # with the same label knows the group (the router decides the same way).
    if not live_apps.models_ready:
        return None
    try:
        live = live_apps.get_model(model._meta.app_label, model._meta.model_name)
    except LookupError:
        return None
    group = getattr(live, "shard_group", None)
    return group if isinstance(group, str) else None


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

    def contribute_to_class(
        self, cls: type[models.Model], name: str, *args: Any, **kwargs: Any
    ) -> None:
        super().contribute_to_class(cls, name, *args, **kwargs)
        # The group goes into the column default so that a database that is a shard of
        # several groups numbers each group's IDs with its position in that group.
        self.db_default = NextShardID(self.layout, _group_of_model(cls))

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
#: Second key of the advisory lock serialising installations on one database.
_INSTALL_LOCK = 0

# The stamp table holds one row per shard group the database is a shard of. ``seq``
# orders the rows by first stamping: the first group is the one the two-argument
# ``dbscale_next_id(shard_bits, seq_bits)`` (the column default of tables made before
# several groups could share a database) numbers IDs in. Until then the table held one row
# (``id = 1``): it is upgraded in place, keeping that row, which becomes the first group.
_SCHEMA_SQL = """
CREATE SEQUENCE IF NOT EXISTS dbscale_id_clock_10;
CREATE SEQUENCE IF NOT EXISTS dbscale_id_clock_7;
CREATE TABLE IF NOT EXISTS {stamp} (
    shard_group text PRIMARY KEY,
    alias text NOT NULL,
    shard_number integer NOT NULL,
    vnodes integer NOT NULL,
    fingerprint text NOT NULL,
    stamped_at timestamptz NOT NULL DEFAULT now(),
    seq bigint GENERATED BY DEFAULT AS IDENTITY
);
DO $dbscale$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{stamp}'::regclass
               AND attname = 'id' AND NOT attisdropped) THEN
        ALTER TABLE {stamp} DROP COLUMN id;
        ALTER TABLE {stamp} ADD PRIMARY KEY (shard_group);
        ALTER TABLE {stamp} ADD COLUMN seq bigint GENERATED BY DEFAULT AS IDENTITY;
    END IF;
END $dbscale$;
"""

# Regenerated from the stamp rows after every stamping, so the numbers baked into the
# functions are always the ones the stamps record.
_FUNCTIONS_SQL = """
CREATE OR REPLACE FUNCTION dbscale_shard_number(shard_group text) RETURNS integer
    LANGUAGE sql IMMUTABLE AS $dbscale$ SELECT CASE $1 {cases} END $dbscale$;
CREATE OR REPLACE FUNCTION dbscale_shard_number() RETURNS integer
    LANGUAGE sql IMMUTABLE AS $dbscale$ SELECT {first_number} $dbscale$;
CREATE OR REPLACE FUNCTION dbscale_next_id(shard_bits integer, seq_bits integer,
                                           shard_group text)
    RETURNS bigint LANGUAGE plpgsql VOLATILE AS $dbscale$
DECLARE
    shard integer := dbscale_shard_number(shard_group);
    clock regclass;
    now_c bigint;
    c bigint;
BEGIN
    IF shard IS NULL THEN
        RAISE EXCEPTION 'dbscale: this database is not a stamped shard of group %',
            quote_literal(shard_group)
            USING HINT = 'Run migrate on it (or manage.py dbscale shards --stamp).';
    END IF;
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
    -- The counter is shared by the groups of the database: their IDs differ anyway.
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
END $dbscale$;
CREATE OR REPLACE FUNCTION dbscale_next_id(shard_bits integer, seq_bits integer)
    RETURNS bigint LANGUAGE sql VOLATILE
    AS $dbscale$ SELECT dbscale_next_id($1, $2, {first_group}) $dbscale$;
"""


def _literal(text: str) -> str:
    """Return *text* as an SQL string literal (standard_conforming_strings is on)."""
    return "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True)
class ShardStamp:
    """What a shard database records, per group, about the ring it was populated under."""

    group: str
    alias: str
    shard_number: int
    vnodes: int
    fingerprint: str


def read_stamps(connection: BaseDatabaseWrapper) -> dict[str, ShardStamp]:
    """Return every stamp stored on *connection*'s database, group -> stamp, first first."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT to_regclass(%s) IS NOT NULL, EXISTS (SELECT 1 FROM pg_attribute WHERE "
            "attrelid = to_regclass(%s) AND attname = 'seq' AND NOT attisdropped)",
            [STAMP_TABLE, STAMP_TABLE],
        )
        row = cursor.fetchone()
        if not row or not row[0]:
            return {}
        # A table not yet upgraded (one row, no seq column) is read as it is.
        order = "seq" if row[1] else "shard_group"
        cursor.execute(
            f"SELECT shard_group, alias, shard_number, vnodes, fingerprint FROM {STAMP_TABLE} "
            f"ORDER BY {order}"
        )
        rows = cursor.fetchall()
    return {
        str(r[0]): ShardStamp(str(r[0]), str(r[1]), int(r[2]), int(r[3]), str(r[4])) for r in rows
    }


def read_stamp(connection: BaseDatabaseWrapper, group: str | None = None) -> ShardStamp | None:
    """Return the stamp of *group* on *connection*'s database, or None if there is none.

    Without *group*, the database's first stamp: the group its two-argument
    ``dbscale_next_id()`` and ``dbscale_shard_number()`` number IDs in.
    """
    stamps = read_stamps(connection)
    if group is not None:
        return stamps.get(group)
    return next(iter(stamps.values()), None)


def stamp_for(stamps: Mapping[str, ShardStamp], alias: str, group: str) -> ShardStamp | None:
    """Return the stamp that protects *group*'s rows on shard *alias* among *stamps*.

    The group's own stamp; without one, the first stamp of a group that no longer lists
    *alias* (the group was renamed, or the shard moved to another group): if that group's
    rows are still there, :func:`stamp_problems` refuses the new group.
    """
    stamp = stamps.get(group)
    if stamp is not None:
        return stamp
    configured = dbscale_settings.groups_of_shard.get(alias, ())
    return next((s for g, s in stamps.items() if g not in configured), None)


def is_populated(
    connection: BaseDatabaseWrapper, group: str, stamp: ShardStamp | None = None
) -> bool:
    """Return whether any table of *group*'s sharded models has a row on this database.

    With *stamp*, the tables of the group the stamp is of count too: a shard moved to
    another group holds rows of its old group's models. Tables of other groups sharing the
    database do not count.
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


def _resolve_group(alias: str, group: str | None, stamp: ShardStamp | None) -> str:
    groups = dbscale_settings.groups_of_shard.get(alias, ())
    if group is not None:
        return group
    if len(groups) == 1:
        return groups[0]
    if stamp is not None and stamp.group in groups:
        return stamp.group
    if not groups:
        raise UnknownShard(
            f"{alias!r} is not a shard alias of any group in DBSCALE['SHARD_GROUPS']."
        )
    raise UnknownShard(f"{alias!r} is a shard of several groups {list(groups)}: pass group=.")


def stamp_problems(
    alias: str, stamp: ShardStamp | None, populated: bool, *, group: str | None = None
) -> list[str]:
    """Return why *alias*'s stamp forbids using *group*'s configured ring (empty if none).

    *stamp* is what :func:`stamp_for` finds for the group; *group* may be left out when
    *alias* is a shard of one group. Only a populated shard is protected: an empty one may
    be re-stamped freely.
    """
    if stamp is None or not populated:
        return []
    group = _resolve_group(alias, group, stamp)
    spec = dbscale_settings.shard_groups[group]
    number = _position(alias, group)
    problems = []
    if stamp.group != group:
        problems.append(f"it holds rows of group {stamp.group!r}, now configured as {group!r}")
    if stamp.vnodes != spec.vnodes:
        problems.append(
            f"its rows were placed with VNODES={stamp.vnodes}, now {spec.vnodes} (changing "
            "VNODES moves most keys)"
        )
    if stamp.shard_number != number:
        problems.append(
            f"it is shard number {stamp.shard_number} in its IDs, now at position "
            f"{number} of SHARDS (append shards, never reorder)"
        )
    return problems


def ring_problems(
    alias: str, stamp: ShardStamp | None, populated: bool, *, group: str | None = None
) -> list[str]:
    """Return why routing *group*'s rows to *alias* under its configured ring would misplace them.

    :func:`stamp_problems`, plus a changed ring fingerprint (shards added, weights or the
    ring implementation changed) on a populated shard: keys may now map elsewhere. A group
    with a row in the shard map routes by that row, so its fingerprint is not compared.
    """
    problems = stamp_problems(alias, stamp, populated, group=group)
    if stamp is not None and populated and not problems:
        resolved = _resolve_group(alias, group, stamp)
        if shardmap.active(resolved) is not None:
            # The shard map is the authority: routing follows the ring the rows are placed
            # under, and only a resharding (which moves the rows first) changes it.
            return problems
        fingerprint = get_ring(resolved).fingerprint
        if stamp.fingerprint != fingerprint:
            problems.append(
                f"its rows were placed by ring {stamp.fingerprint}, but the configured ring "
                f"is {fingerprint} (shards added, or weights changed): some keys now map to "
                "another shard"
            )
    return problems


def _functions_sql(stamps: Mapping[str, ShardStamp]) -> str:
    first = next(iter(stamps.values()))
    cases = " ".join(f"WHEN {_literal(g)} THEN {int(s.shard_number)}" for g, s in stamps.items())
    return _FUNCTIONS_SQL.format(
        cases=cases,
        first_number=int(first.shard_number),
        first_group=_literal(first.group),
        lock=ID_LOCK_CLASS,
        epoch=EPOCH_MS,
    )


def install_shard_functions(
    alias: str, *, restamp: bool = False, force: bool = False, group: str | None = None
) -> ShardStamp | None:
    """Install the ID functions and the ring stamps on shard *alias* (idempotent).

    Stamps *group*, or every group *alias* is a shard of (``None``), and returns that
    group's stamp afterwards (the first group's, for ``None``), or ``None`` when *alias* is
    not a shard of *group* (of any group). Raises :class:`RingChangeRefused`, changing
    nothing, when a group's rows on the shard were placed under another VNODES count,
    group or shard number, unless *force* (after a resharding). A changed ring fingerprint
    alone (shards added, weights changed) on a populated shard is re-stamped only with
    *restamp* (``manage.py dbscale shards --stamp``, run once the rows are moved); until
    then check ``dbscale.W100`` reports it.
    """
    configured = dbscale_settings.groups_of_shard.get(alias, ())
    if group is not None and group not in configured:
        return None
    targets = (group,) if group is not None else configured
    if not targets:
        return None
    connection = connections[alias]
    result: dict[str, ShardStamp] = {}
    with transaction.atomic(using=alias):
        with connection.cursor() as cursor:
            # Processes migrating the same shard at once take turns.
            cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [ID_LOCK_CLASS, _INSTALL_LOCK])
            cursor.execute(_SCHEMA_SQL.format(stamp=STAMP_TABLE))
        stamps = read_stamps(connection)
        writes: list[ShardStamp] = []
        for name in targets:
            spec = dbscale_settings.shard_groups[name]
            existing = stamp_for(stamps, alias, name)
            populated = existing is not None and is_populated(connection, name, existing)
            problems = stamp_problems(alias, existing, populated, group=name)
            if problems and not force:
                raise RingChangeRefused(
                    f"Shard {alias!r} of group {name!r} is populated and "
                    + "; ".join(problems)
                    + ". Restore the old setting, or reshard and then run "
                    "`manage.py dbscale shards --stamp --force`."
                )
            new = ShardStamp(
                name, alias, _position(alias, name), spec.vnodes, get_ring(name).fingerprint
            )
            if (
                existing is not None
                and existing.group == name
                and populated
                and existing.fingerprint != new.fingerprint
                and not (restamp or force)
            ):
                logger.warning(
                    "Shard %s of group %s is populated and its ring changed (stamped %s, "
                    "now %s); not re-stamping.",
                    alias,
                    name,
                    existing.fingerprint,
                    new.fingerprint,
                )
                result[name] = existing
                continue
            writes.append(new)
            result[name] = new
        with connection.cursor() as cursor:
            for new in writes:
                cursor.execute(
                    f"INSERT INTO {STAMP_TABLE} (shard_group, alias, shard_number, vnodes, "
                    "fingerprint) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (shard_group) DO "
                    "UPDATE SET alias = EXCLUDED.alias, shard_number = EXCLUDED.shard_number, "
                    "vnodes = EXCLUDED.vnodes, fingerprint = EXCLUDED.fingerprint, "
                    "stamped_at = now()",
                    [new.group, new.alias, new.shard_number, new.vnodes, new.fingerprint],
                )
        stamps = read_stamps(connection)
        with connection.cursor() as cursor:
            cursor.execute(_functions_sql(stamps))
    return result[targets[0]]


def install_on_pre_migrate(using: str) -> None:
    """Install the ID functions and stamps on *using* if it is a shard (``pre_migrate``)."""
    if using in dbscale_settings.groups_of_shard:
        install_shard_functions(using)


#: Seconds before retrying the stamp check of a shard that could not be read.
VERIFY_RETRY = 5.0

#: Shards every group of which is verified (callers may skip the call for these).
_verified: set[str] = set()
#: (shard, group) pairs verified.
_verified_groups: set[tuple[str, str]] = set()
_verify_retry_at: dict[str, float] = {}


@on_settings_changed
def _forget_verified() -> None:
    _verified.clear()
    _verified_groups.clear()
    _verify_retry_at.clear()


def verify_ring_once(primary: str, via: str | None = None, *, group: str | None = None) -> None:
    """Refuse to route *group*'s rows to shard *primary* if it was populated under another ring.

    Runs once per process, shard and group (again after a settings change): reads the
    shard's stamps (through *via*, a replica of it, if given) and raises
    :class:`RingChangeRefused` when :func:`ring_problems` finds any, so a changed
    ``VNODES``, weight or shard list fails loudly instead of reading and writing the wrong
    shard. Without *group*, every group *primary* is a shard of is checked. An unreadable
    shard is retried after :data:`VERIFY_RETRY` seconds (the query that follows reports the
    real error). Explicit ``.using()``, fan-out and the management commands do not route
    by key and are not checked.
    """
    if primary in _verified:
        return
    groups = dbscale_settings.groups_of_shard.get(primary, ())
    wanted = groups if group is None else (group,) if group in groups else ()
    todo = [g for g in wanted if (primary, g) not in _verified_groups]
    if not todo:
        if not groups:
            _verified.add(primary)
        return
    now = time.monotonic()
    if now < _verify_retry_at.get(primary, 0.0):
        return
    alias = via or primary
    connection = connections[alias]

    def read() -> list[tuple[str, ShardStamp | None, bool]]:
        stamps = read_stamps(connection)
        states = []
        for name in todo:
            stamp = stamp_for(stamps, primary, name)
            states.append(
                (name, stamp, stamp is not None and is_populated(connection, name, stamp))
            )
        return states

    try:
        if connection.in_atomic_block:
            # A savepoint: a failed read must not break the caller's transaction.
            with transaction.atomic(using=alias):
                states = read()
        else:
            states = read()
    except (DatabaseError, SynchronousOnlyOperation, RuntimeError) as exc:
        # An unreachable shard, an async context, or database access blocked (tests that
        # build unsaved rows: Django asks the routers where a new row would go). The query
        # that follows, if any, reports the real error; the check is retried later.
        _verify_retry_at[primary] = now + VERIFY_RETRY
        logger.warning("Could not read the ring stamp of shard %s (%s); will retry.", alias, exc)
        return
    for name, stamp, populated in states:
        problems = ring_problems(primary, stamp, populated, group=name)
        if problems:
            raise RingChangeRefused(
                f"Refusing to route {name!r} rows to shard {primary!r}: it is populated and "
                + "; ".join(problems)
                + ". Restore the previous SHARD_GROUPS setting, or move the rows (reshard) "
                "and then run `manage.py dbscale shards --stamp` (with --force for VNODES, "
                "group or shard number changes). Explicit .using(alias) and .all_shards() "
                "still work for the move."
            )
        _verified_groups.add((primary, name))
    if all((primary, g) in _verified_groups for g in groups):
        _verified.add(primary)
