"""What a resharding moves, and the database objects that guard the move on each shard.

Pure computation first: :func:`moved_ranges` compares two rings point by point and
returns, per (source, target) pair, the ranges of the 32-bit key space that change owner.
A key's point is the one :class:`~django_dbscale.sharding.ring.KetamaRing` hashes: the
first 4 bytes of ``md5(ring_key)``, little-endian. :data:`INSTALL_SQL` computes the same
point inside PostgreSQL (``dbscale_ring_point(dbscale_ring_key(text))``; the test suite
checks it against Python for ints, strings and UUIDs), so rows can be selected, copied,
checksummed and refused by range on the database itself.

Then the guard, installed by the preflight on every shard a job touches, as one
``BEFORE`` row trigger per moved table calling ``dbscale_moving_guard()``. The trigger
looks up the row's key point in ``dbscale_moving`` (one row per job and direction, holding
an ``int8multirange``):

* on the shard the keys leave (``role = 'out'``): while ``state = 'copying'`` it records
  the row's primary key in ``dbscale_moving_changes`` (the catch-up re-reads those rows);
  once ``state = 'moved'`` it **refuses** the write with SQLSTATE ``DBSM1`` ("shard moved"),
  so a process still holding the old map cannot write a moved key to its old shard;
* on the shard the keys arrive at (``role = 'in'``): before cutover it refuses writes
  (nobody routes there yet), after cutover it records changes, so a rollback before
  cleanup can carry them back.

Every guarded write of a moving key first takes a *shared* transaction-level advisory lock
on the group; the cutover takes it *exclusively* for a moment, which waits for in-flight
writes of moving keys to commit and holds new ones back, while writes of other keys never
wait. The engine's own sessions set ``dbscale.resharding = on`` and pass the guard.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from django_dbscale.sharding.exceptions import ShardingError
from django_dbscale.sharding.ring import KetamaRing, ShardRing

__all__ = [
    "INSTALL_SQL",
    "LOCK_CLASS",
    "MOVED_SQLSTATE",
    "POINTS",
    "MovedTable",
    "moved_fraction",
    "moved_ranges",
    "owned_ranges",
    "multirange",
    "tables_of",
]

#: Size of the ring's key space (points are 32-bit).
POINTS = 1 << 32

#: SQLSTATE of the guard's refusal of a moved key.
MOVED_SQLSTATE = "DBSM1"

#: First key of the advisory lock on a group (second: ``hashtext(group)``).
LOCK_CLASS = 0x64627372  # "dbsr"

Range = tuple[int, int]


def _segments(ring: ShardRing) -> list[tuple[int, str]]:
    if not isinstance(ring, KetamaRing):
        raise ShardingError(
            f"Resharding needs the point layout of the ring, which {type(ring).__name__} "
            "does not expose. Reshard with the default ring (KetamaRing)."
        )
    return ring.segments()


def moved_ranges(old: ShardRing, new: ShardRing) -> dict[tuple[str, str], list[Range]]:
    """Return ``{(source, target): [[lo, hi), ...]}``: the key points that change owner.

    Ranges are half-open, sorted, merged when adjacent, and never wrap (the range that
    wraps past ``2**32`` is split at 0).
    """
    old_segments, new_segments = _segments(old), _segments(new)
    assert isinstance(old, KetamaRing) and isinstance(new, KetamaRing)
    bounds = sorted({0, *(p for p, _ in old_segments), *(p for p, _ in new_segments)})
    moves: dict[tuple[str, str], list[Range]] = {}
    for index, lo in enumerate(bounds):
        hi = bounds[index + 1] if index + 1 < len(bounds) else POINTS
        if lo >= hi:
            continue
        source, target = old.owner_of_point(lo), new.owner_of_point(lo)
        if source == target:
            continue
        ranges = moves.setdefault((source, target), [])
        if ranges and ranges[-1][1] == lo:
            ranges[-1] = (ranges[-1][0], hi)
        else:
            ranges.append((lo, hi))
    return moves


def owned_ranges(ring: ShardRing) -> dict[str, list[Range]]:
    """Return ``{alias: [[lo, hi), ...]}``: the key points each node of *ring* owns.

    Ranges are half-open and never wrap (the range past the last ring point is split at
    0); adjacent ranges of one owner are left unmerged (PostgreSQL's multirange literal
    merges them).
    """
    segments = _segments(ring)
    owned: dict[str, list[Range]] = {}
    previous = 0
    for point, owner in segments:
        if point > previous:
            owned.setdefault(owner, []).append((previous, point))
        previous = point
    if previous < POINTS:
        owned.setdefault(segments[0][1], []).append((previous, POINTS))
    return owned


def moved_fraction(moves: dict[tuple[str, str], list[Range]]) -> float:
    """Return the share of the key space that *moves* relocate."""
    return sum(hi - lo for ranges in moves.values() for lo, hi in ranges) / POINTS


def multirange(ranges: Iterable[Range]) -> str:
    """Return the ``int8multirange`` literal of *ranges*."""
    return "{" + ",".join(f"[{lo},{hi})" for lo, hi in ranges) + "}"


def _kind(spec: Any) -> str:
    """Return how the SQL side canonicalises *spec*'s key: ``int``, ``uuid`` or ``text``.

    Integer keys come from the routing's own classification (``ShardSpec.int_key``); a
    ``text`` key goes through ``dbscale_ring_key()``, which normalises as Python does.
    """
    if spec.int_key:
        return "int"
    field = spec.key_field
    target = getattr(field, "target_field", None) if field.is_relation else field
    return "uuid" if target is not None and target.get_internal_type() == "UUIDField" else "text"


def _point_sql(column: str, kind: str) -> str:
    text = f"({column})::text"
    key = text if kind in ("int", "uuid") else f"dbscale_ring_key({text})"
    return f"dbscale_ring_point({key})"


@dataclass(frozen=True)
class MovedTable:
    """One table a resharding moves: how to find its rows' keys, and what it depends on.

    A table with a shard-key column carries its key; an auto-created many-to-many table
    carries none and follows its owner row (``owner_*``), through ``key_column`` (its
    foreign key to the owner).
    """

    label: str
    table: str
    pk: str
    pk_type: str
    key_column: str
    kind: str
    columns: tuple[str, ...]
    depends_on: tuple[str, ...] = ()
    owner_table: str | None = None
    owner_pk: str | None = None
    owner_pk_type: str | None = None
    owner_key: str | None = None

    def q(self, name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    @property
    def point(self) -> str:
        """SQL of the key point of a row ``t`` (needs :attr:`source` as the FROM clause)."""
        if self.owner_table is None:
            return _point_sql(f"t.{self.q(self.key_column)}", self.kind)
        return _point_sql(f"o.{self.q(self.owner_key or '')}", self.kind)

    @property
    def source(self) -> str:
        """The FROM clause naming the table ``t`` (joined to its owner ``o`` if needed)."""
        if self.owner_table is None:
            return f"{self.q(self.table)} t"
        return (
            f"{self.q(self.table)} t JOIN {self.q(self.owner_table)} o "
            f"ON o.{self.q(self.owner_pk or '')} = t.{self.q(self.key_column)}"
        )

    def trigger_args(self, group: str) -> list[str]:
        args = [group, self.key_column, self.kind, self.pk]
        if self.owner_table is not None:
            args += [
                self.owner_table,
                self.owner_pk or "",
                self.owner_pk_type or "",
                self.owner_key or "",
            ]
        return args


def tables_of(group: str, connection: Any) -> list[MovedTable]:
    """Return the tables of *group*'s sharded models, parents before the rows pointing at them."""
    from django_dbscale.sharding.routing import shard_spec, sharded_models

    found: dict[str, MovedTable] = {}
    for spec in sharded_models(group):
        meta = spec.model._meta
        pk = meta.pk
        assert pk is not None
        deps = tuple(
            sorted(
                {
                    f.related_model._meta.db_table
                    for f in meta.concrete_fields
                    if f.is_relation
                    and isinstance(f.related_model, type)
                    and f.related_model._meta.db_table != meta.db_table
                    and getattr(f.related_model, "_dbscale_sharded", False)
                }
            )
        )
        columns = tuple(str(f.column) for f in meta.concrete_fields)
        if spec.key_field is not None:
            found[meta.db_table] = MovedTable(
                meta.label,
                meta.db_table,
                str(pk.column),
                str(pk.db_type(connection)),
                str(spec.key_field.column),
                _kind(spec),
                columns,
                deps,
            )
            continue
        owner = spec.owner
        owner_spec = shard_spec(owner)
        owner_pk = owner._meta.pk
        assert owner_spec is not None and owner_spec.key_field is not None
        assert owner_pk is not None
        link = next(f for f in meta.concrete_fields if f.is_relation and f.related_model is owner)
        found[meta.db_table] = MovedTable(
            meta.label,
            meta.db_table,
            str(pk.column),
            str(pk.db_type(connection)),
            str(link.column),
            _kind(owner_spec),
            columns,
            deps,
            owner._meta.db_table,
            str(owner_pk.column),
            str(owner_pk.db_type(connection)),
            str(owner_spec.key_field.column),
        )
    return _parents_first(found)


def _parents_first(tables: dict[str, MovedTable]) -> list[MovedTable]:
    ordered: list[MovedTable] = []
    seen: set[str] = set()

    def visit(name: str, path: Sequence[str]) -> None:
        if name in seen or name not in tables or name in path:
            return
        for dep in tables[name].depends_on:
            visit(dep, [*path, name])
        seen.add(name)
        ordered.append(tables[name])

    for name in sorted(tables):
        visit(name, [])
    return ordered


INSTALL_SQL = r"""
CREATE OR REPLACE FUNCTION dbscale_ring_key(k text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN k ~ '^[+-]?[0-9]+$' THEN (k::numeric)::text
        WHEN k ~* ('^(urn:uuid:)?\{?[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?'
                   '[0-9a-f]{4}-?[0-9a-f]{12}\}?$')
            THEN (translate(lower(regexp_replace(k, '^urn:uuid:', '', 'i')), '{}-', ''))::uuid::text
        ELSE k
    END $$;
CREATE OR REPLACE FUNCTION dbscale_ring_point(k text) RETURNS bigint
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    d bytea := decode(md5(k), 'hex');  -- PL/pgSQL: one md5 per row (3x an SQL body's cost)
BEGIN
    RETURN get_byte(d, 0)::bigint | (get_byte(d, 1)::bigint << 8)
        | (get_byte(d, 2)::bigint << 16) | (get_byte(d, 3)::bigint << 24);
END $$;
CREATE TABLE IF NOT EXISTS dbscale_moving (
    job bigint NOT NULL,
    shard_group text NOT NULL,
    peer text NOT NULL,
    role text NOT NULL CHECK (role IN ('out', 'in')),
    state text NOT NULL CHECK (state IN ('copying', 'moved')),
    ranges int8multirange NOT NULL,
    PRIMARY KEY (job, peer, role)
);
CREATE TABLE IF NOT EXISTS dbscale_moving_changes (
    id bigserial PRIMARY KEY,
    job bigint NOT NULL,
    peer text NOT NULL,
    tbl text NOT NULL,
    pk text NOT NULL
);
CREATE OR REPLACE FUNCTION dbscale_moving_guard() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    grp text := TG_ARGV[0];
    rows_ jsonb[];
    r jsonb;
    k text;
    p bigint;
    m record;
    st text;
BEGIN
    IF current_setting('dbscale.resharding', true) = 'on' THEN
        RETURN COALESCE(NEW, OLD);
    END IF;
    IF TG_OP = 'INSERT' THEN
        rows_ := ARRAY[to_jsonb(NEW)];
    ELSIF TG_OP = 'DELETE' THEN
        rows_ := ARRAY[to_jsonb(OLD)];
    ELSIF (to_jsonb(NEW) ->> TG_ARGV[1]) IS DISTINCT FROM (to_jsonb(OLD) ->> TG_ARGV[1]) THEN
        rows_ := ARRAY[to_jsonb(NEW), to_jsonb(OLD)];
    ELSE
        rows_ := ARRAY[to_jsonb(NEW)];
    END IF;
    FOREACH r IN ARRAY rows_ LOOP
        k := r ->> TG_ARGV[1];
        IF k IS NULL THEN
            CONTINUE;
        END IF;
        IF TG_NARGS > 4 THEN  -- a many-to-many row: the key is its owner's
            EXECUTE format('SELECT (%I)::text FROM %I WHERE %I = $1::%s', TG_ARGV[7],
                           TG_ARGV[4], TG_ARGV[5], TG_ARGV[6]) INTO k USING k;
            IF k IS NULL THEN
                CONTINUE;
            END IF;
        END IF;
        IF TG_ARGV[2] = 'text' THEN
            k := dbscale_ring_key(k);
        END IF;
        p := dbscale_ring_point(k);
        FOR m IN SELECT job, peer, role FROM dbscale_moving
                 WHERE shard_group = grp AND ranges @> p LOOP
            PERFORM pg_advisory_xact_lock_shared({lock}, hashtext(grp));
            -- Read the state after the lock: a cutover may have changed it meanwhile.
            SELECT state INTO st FROM dbscale_moving
                WHERE job = m.job AND peer = m.peer AND role = m.role;
            IF NOT FOUND THEN
                CONTINUE;
            END IF;
            IF m.role = 'out' AND st = 'moved' THEN
                RAISE EXCEPTION 'dbscale: shard moved: key % of shard group % (table %) '
                    'now lives on shard %',
                    k, grp, TG_TABLE_NAME, m.peer
                    USING ERRCODE = '{sqlstate}',
                    HINT = 'Re-read the row through the ORM: the shard map has changed.';
            ELSIF m.role = 'in' AND st = 'copying' THEN
                RAISE EXCEPTION 'dbscale: key % of shard group % (table %) is being moved '
                    'to this shard and still lives on shard %',
                    k, grp, TG_TABLE_NAME, m.peer
                    USING ERRCODE = '{sqlstate}',
                    HINT = 'Write it through the ORM, which routes it to the shard that owns it.';
            END IF;
            INSERT INTO dbscale_moving_changes (job, peer, tbl, pk)
                VALUES (m.job, m.peer, TG_TABLE_NAME, r ->> TG_ARGV[3]);
        END LOOP;
    END LOOP;
    RETURN COALESCE(NEW, OLD);
END $$;
""".replace("{lock}", str(LOCK_CLASS)).replace("{sqlstate}", MOVED_SQLSTATE)
