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
reorder: the stamp check refuses a reordering of populated shards); the *sequence* is a
per-database PostgreSQL sequence modulo ``2**seq_bits``.

IDs are generated **in the database** by ``dbscale_next_id(shard_bits, seq_bits)``, a
PL/pgSQL function that is the column's ``DEFAULT``: every insert path (``save()``,
``bulk_create()``, raw SQL, ``COPY``) gets an ID without a round trip, and the value comes
back with ``INSERT ... RETURNING``. The function (with the shard number baked in) is
installed on every shard by a ``pre_migrate`` receiver, not by a migration, because it must
exist before the first ``CREATE TABLE`` of *any* app (migrated or ``run_syncdb``) whose
sharded model uses it, and its body differs per shard.

Uniqueness: two IDs collide only if one shard hands out more than ``2**seq_bits`` IDs
within one millisecond. The function sleeps one millisecond each time the sequence wraps,
so a single session (e.g. one multi-row ``INSERT``) can never exceed that; concurrent
sessions on one shard could in theory (1,024 IDs/ms = 1M/s per shard for 64-bit, 128/ms
for ``js_safe``). Across shards IDs never collide: the shard number differs.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any, cast

from django.db import connections, models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Func, Value
from django.db.models.expressions import DatabaseDefault
from django.db.models.signals import pre_migrate
from django.dispatch import receiver

from django_dbscale.conf import dbscale_settings
from django_dbscale.sharding.exceptions import RingChangeRefused, UnknownShardGroup
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
    "shard_number",
    "shard_of_id",
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
        raise UnknownShardGroup(
            f"{alias!r} is not a shard alias of any group in DBSCALE['SHARD_GROUPS']."
        )
    return dbscale_settings.shard_groups[group].shards.index(alias)


def shard_of_id(group: str, value: int, *, js_safe: bool = False) -> str:
    """Return the shard alias of *group* that generated ID *value*."""
    shards = get_ring(group).nodes
    number = decode_id(value, js_safe=js_safe).shard_number
    if number >= len(shards):
        raise UnknownShardGroup(
            f"ID {value} was made by shard number {number}, but group {group!r} has only "
            f"{len(shards)} shards {list(shards)}."
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

_FUNCTIONS_SQL = """
CREATE SEQUENCE IF NOT EXISTS dbscale_id_seq;
CREATE OR REPLACE FUNCTION dbscale_shard_number() RETURNS integer
    LANGUAGE sql IMMUTABLE AS $$ SELECT {number} $$;
CREATE OR REPLACE FUNCTION dbscale_next_id(shard_bits integer, seq_bits integer)
    RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    seq bigint := nextval('dbscale_id_seq');
    shard integer := dbscale_shard_number();
    ms bigint;
BEGIN
    IF shard >= (1 << shard_bits) THEN
        RAISE EXCEPTION 'dbscale: shard number % does not fit in % bits of the ID', shard,
            shard_bits;
    END IF;
    -- Each wrap of the sequence part waits 1 ms so one session cannot reuse a
    -- (millisecond, sequence) pair.
    IF seq % (1 << seq_bits) = 0 THEN
        PERFORM pg_sleep(0.001);
    END IF;
    ms := floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint - {epoch};
    RETURN (ms << (shard_bits + seq_bits)) | (shard::bigint << seq_bits)
        | (seq % (1 << seq_bits));
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


def is_populated(connection: BaseDatabaseWrapper, group: str) -> bool:
    """Return whether any table of *group*'s sharded models has a row on this database."""
    from django_dbscale.sharding.routing import sharded_models

    tables = sorted({spec.model._meta.db_table for spec in sharded_models(group)})
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
    populated = existing is not None and is_populated(connection, group)
    problems = stamp_problems(alias, existing, populated)
    if problems and not force:
        raise RingChangeRefused(
            f"Shard {alias!r} of group {group!r} is populated and "
            + "; ".join(problems)
            + ". Restore the old setting, or reshard and then run "
            "`manage.py dbscale shards --stamp --force`."
        )
    sql = _FUNCTIONS_SQL.format(number=number, epoch=EPOCH_MS, stamp=STAMP_TABLE)
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


@receiver(pre_migrate, dispatch_uid="django_dbscale.sharding.install_shard_functions")
def _install_on_pre_migrate(*, using: str, **kwargs: Any) -> None:
    # Sent once per migrated app; installation is idempotent and a few statements long.
    if using in dbscale_settings.group_of_shard:
        install_shard_functions(using)
