"""Online resharding: move a group's rows to a new ring while the site keeps writing.

A job (:class:`~django_dbscale.models.ReshardJob`, one unfinished job per group) walks
these phases; each is idempotent, records its progress on ``default``, and a rerun of the
command after a crash or a kill continues from the phase it stopped in:

``preflight``
    Both rings known, every shard reachable, the target tables present with the same
    columns, the triggers installable. Installs the ring-point functions and the guard
    (:mod:`~django_dbscale.sharding.moves`) on every shard the job touches: from now on a
    write of a moving key on its source shard is recorded in ``dbscale_moving_changes``.
``copy``
    Per (source, target) pair and table, parents first: rows whose key point is in the
    moving ranges, in primary-key order, in batches (one target transaction each), all
    read from one ``REPEATABLE READ`` snapshot of the source per run. A rerun first applies
    the changes recorded so far, in that same snapshot, then continues after the last
    copied key.
``catchup``
    Applies the recorded changes (re-reading each changed row from the source; a row gone
    there is deleted on the target) until the backlog is small.
``verify``
    Chunked checksums (count and md5 of every moved row, one chunk per batch of rows) on source and
    target; a chunk that differs is re-checked after another catch-up, then re-copied.
``cutover``
    Takes the group's advisory lock exclusively on each source (waiting for in-flight
    writes of moving keys to commit, and holding new ones back; other keys never wait),
    applies the last changes, marks the ranges ``moved`` (the source now refuses those
    keys), records each target's WAL position, and bumps the shard map's version on
    ``default`` with the new ring. Then releases the lock: the held writes fail over to the
    new shard (the library retries an insert outside a transaction; see
    :mod:`~django_dbscale.sharding.models`).
``settle``
    Waits ``2 * SHARD_MAP_CHECK_INTERVAL + 1`` seconds, so every live process has re-read
    the map before the old copies are deleted.
``cleanup``
    Deletes the moved rows from their old shards (children first), stops recording
    changes on the targets, re-stamps the shards, and audits every shard of the group for
    rows whose key it does not own. The ``moved`` guards stay on the old shards until the
    group's next resharding.

``rollback`` is possible at any point before ``cleanup``: before cutover it drops the
copies; after it, it carries the changes made on the new shards back (recorded there by
the guard), flips the map back and drops the copies.

The engine copies with its own connections (``dbscale.resharding = on`` lets them pass
the guard), not with logical replication: see ``docs/resharding.md`` for why, and for the
guarantees and limits.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from psycopg import sql
from psycopg.types.json import Jsonb

from django_dbscale.conf import ShardGroupSpec, dbscale_settings
from django_dbscale.own_connections import connect
from django_dbscale.sharding import moves as mv
from django_dbscale.sharding import shardmap
from django_dbscale.sharding.exceptions import ShardingError
from django_dbscale.sharding.ring import build_ring

__all__ = [
    "PHASES",
    "Plan",
    "ReshardError",
    "Resharder",
    "plan",
    "target_spec",
]

logger = logging.getLogger("django_dbscale.sharding")

PHASES = ("preflight", "copy", "catchup", "verify", "cutover", "settle", "cleanup", "done")
FINAL = ("done", "rolled_back")

#: Rows per copy and cleanup batch (one transaction each) and per verification chunk, unless
#: the command's ``--batch-size`` says otherwise.
BATCH = 5000
#: Changes applied per catch-up batch; the catch-up ends when a pass leaves fewer.
CHANGE_BATCH = 2000
CATCHUP_DONE_BELOW = 200
#: How long the cutover waits for in-flight writes of moving keys before it gives up
#: (and retries): this bounds how long a write of a moving key can be held back.
CUTOVER_LOCK_TIMEOUT = 5.0

#: Test hook: ``<phase>[:<batches>]`` makes the command die (``os._exit``) on reaching the
#: phase (after that many batches): a kill -9 at a known point.
CRASH_ENV = "DBSCALE_RESHARD_CRASH_AT"


class ReshardError(ShardingError):
    """A resharding cannot start or go on; the message says why and what to do."""


Progress = Callable[[str], None]


def _crash_point(phase: str, batches: int = 0) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name == phase and batches >= int(count or 0):
        os._exit(70)


# -- the target ring ------------------------------------------------------------------------


def target_spec(
    group: str,
    *,
    add: Sequence[str] = (),
    remove: Sequence[str] = (),
    weights: dict[str, int] | None = None,
    base: ShardGroupSpec | None = None,
) -> ShardGroupSpec:
    """Return the ring *group* moves to: *base* (default: the active ring) changed by the
    options, or the ``SHARD_GROUPS`` ring when no option is given. Validates every alias.

    A rerun of an interrupted job passes the job's starting ring as *base*, so the same
    command line names the same target after the map has already flipped.
    """
    current = base if base is not None else _active_spec(group)
    if not add and not remove and not weights:
        declared = dbscale_settings.shard_groups.get(group)
        if declared is None:
            raise ReshardError(_unknown_group(group))
        return declared
    shards = list(current.shards)
    new_weights = dict(current.weights)
    for alias in add:
        if alias not in settings.DATABASES:
            raise ReshardError(
                f"--add {alias}: {alias!r} is not in DATABASES. Add the database to DATABASES "
                f"and to DBSCALE['SHARD_GROUPS'][{group!r}]['SHARDS'], run "
                f"`manage.py migrate --database {alias}`, then reshard."
            )
        if alias == DEFAULT_DB_ALIAS:
            raise ReshardError(
                f"--add {alias}: unsharded models live on {alias!r}; give the new shard a "
                "database alias of its own."
            )
        if alias in dbscale_settings.primary_of:
            raise ReshardError(
                f"--add {alias}: {alias!r} is a replica of "
                f"{dbscale_settings.primary_of[alias]!r}; add a primary (its replicas follow "
                "through DBSCALE['REPLICAS'])."
            )
        if alias in shards:
            raise ReshardError(f"--add {alias}: {alias!r} is already a shard of group {group!r}.")
        shards.append(alias)
    for alias in remove:
        if alias not in shards:
            raise ReshardError(
                f"--remove {alias}: {alias!r} is not a shard of group {group!r} (shards: {shards})."
            )
        shards.remove(alias)
        new_weights.pop(alias, None)
    if not shards:
        raise ReshardError(
            f"Cannot remove the last shard of group {group!r}: its rows would have nowhere to "
            "go. Add another shard in the same command (--add) first."
        )
    for alias, weight in (weights or {}).items():
        if alias not in shards:
            raise ReshardError(
                f"--weight {alias}={weight}: {alias!r} is not a shard of group {group!r} "
                f"(shards: {shards})."
            )
        if weight < 1:
            raise ReshardError(f"--weight {alias}={weight}: weights are integers >= 1.")
        new_weights[alias] = weight
    return ShardGroupSpec(
        group, tuple(shards), {a: w for a, w in new_weights.items() if w != 1}, current.vnodes
    )


def _unknown_group(group: str) -> str:
    return (
        f"Shard group {group!r} is not in DBSCALE['SHARD_GROUPS'] (configured: "
        f"{sorted(dbscale_settings.shard_groups)}). Fix the name."
    )


def _active_spec(group: str) -> ShardGroupSpec:
    mapped = shardmap.active(group)
    if mapped is not None:
        return mapped.spec
    declared = dbscale_settings.shard_groups.get(group)
    if declared is None:
        raise ReshardError(_unknown_group(group))
    return declared


# -- plan -------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Which keys move where, and how many rows that is."""

    group: str
    source: ShardGroupSpec
    target: ShardGroupSpec
    moves: dict[tuple[str, str], list[tuple[int, int]]]
    fraction: float
    #: (source, target, table label) -> rows to move (filled by :func:`count_rows`).
    rows: dict[tuple[str, str, str], int] = field(default_factory=dict)
    #: The same keys -> estimated bytes those rows take on disk (indexes included).
    bytes: dict[tuple[str, str, str], int] = field(default_factory=dict)

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


def plan(group: str, target: ShardGroupSpec) -> Plan:
    """Compare the active ring of *group* with *target* (no database is changed)."""
    source = _active_spec(group)
    if source.vnodes != target.vnodes:
        raise ReshardError(
            f"Group {group!r} is placed with VNODES={source.vnodes}; the target has "
            f"{target.vnodes}. Changing VNODES moves almost every key; keep SHARD_VNODES."
        )
    moves = mv.moved_ranges(build_ring(source), build_ring(target))
    return Plan(group, source, target, moves, mv.moved_fraction(moves))


def count_rows(p: Plan) -> None:
    """Fill ``p.rows`` and ``p.bytes``: the moving rows on each source, and their share of
    the table's size on disk (one scan per table)."""
    for (source, target), ranges in p.moves.items():
        with _connect(source) as conn:
            _install_functions(conn)
            for table in mv.tables_of(p.group, connections[source]):
                if not _table_exists(conn, table.table):
                    continue
                row = conn.execute(
                    f"SELECT count(*) FILTER (WHERE {table.point} <@ %s::int8multirange), "
                    f"count(*), pg_total_relation_size(%s) FROM {table.source}",
                    [mv.multirange(ranges), f'"{table.table}"'],
                ).fetchone()
                moving, total, size = (int(v) for v in row) if row else (0, 0, 0)
                p.rows[(source, target, table.label)] = moving
                p.bytes[(source, target, table.label)] = size * moving // total if total else 0


# -- connections ------------------------------------------------------------------------------


#: Why the engine needs direct connections, and the fix (a transaction pooler in the way).
_POOLER_HINT = (
    "The resharding engine needs direct connections to PostgreSQL: it holds session "
    "advisory locks and connects with the session setting dbscale.resharding=on, which a "
    "transaction pooler (PgBouncer in transaction mode) drops or refuses and whose locks it "
    "would leave on server sessions it hands to other clients. Point DATABASES[{alias!r}] "
    "at the PostgreSQL server itself (not PgBouncer) for `manage.py dbscale reshard`, e.g. "
    "with a settings module for operator commands (docs/deployment.md, PgBouncer)."
)


def _connect(alias: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    try:
        conn = connect(
            alias,
            autocommit=autocommit,
            options="-c dbscale.resharding=on",
            application_name="django_dbscale reshard",
        )
    except psycopg.Error as exc:
        hint = " " + _POOLER_HINT.format(alias=alias) if "startup parameter" in str(exc) else ""
        raise ReshardError(f"Cannot connect to shard {alias!r}: {exc}".strip() + hint) from exc
    _require_direct(conn, alias)
    return conn


def _require_direct(conn: psycopg.Connection[Any], alias: str) -> None:
    """Raise :class:`ReshardError` (closing *conn*) if *conn* goes through a pooler.

    *conn* was opened with ``-c dbscale.resharding=on``: PgBouncer drops startup options
    (``ignore_startup_parameters = options``) or refuses them, so the setting is in effect
    only on a direct connection (or a pooler that replays them, in session mode).
    """
    row = conn.execute("SELECT current_setting('dbscale.resharding', true)").fetchone()
    direct = row is not None and row[0] == "on"
    if not conn.autocommit:
        conn.rollback()  # callers set the isolation level of the first transaction
    if not direct:
        conn.close()
        raise ReshardError(
            f"DATABASES[{alias!r}] does not reach PostgreSQL through a direct connection. "
            + _POOLER_HINT.format(alias=alias)
        )


def _install_functions(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", [mv.LOCK_CLASS])
        conn.execute(mv.INSTALL_SQL)


def _table_exists(conn: psycopg.Connection[Any], table: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [f'"{table}"']).fetchone()
    return bool(row and row[0])


def _columns(conn: psycopg.Connection[Any], table: str) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped ORDER BY attname",
        [f'"{table}"'],
    ).fetchall()
    return [(str(a), str(b)) for a, b in rows]


# -- the job ----------------------------------------------------------------------------------


class Resharder:
    """Runs (or resumes, or rolls back) the resharding job of one group."""

    def __init__(self, group: str, *, progress: Progress | None = None, batch: int = BATCH) -> None:
        from django_dbscale.models import ReshardJob

        if group not in dbscale_settings.shard_groups and shardmap.active(group) is None:
            raise ReshardError(_unknown_group(group))
        if batch < 1:
            raise ReshardError(f"The batch size must be at least 1, not {batch}.")
        self.group = group
        self.batch = batch
        self.say: Progress = progress or (lambda text: logger.info("%s", text))
        self.model = ReshardJob
        self._lock_conn: psycopg.Connection[Any] | None = None
        self.job: Any = None

    # -- locking and state ------------------------------------------------------------------

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Hold the group's job lock on ``default`` (one command per group at a time)."""
        # Direct, like every engine connection: a pooled session would keep the lock.
        conn = _connect(DEFAULT_DB_ALIAS)
        row = conn.execute(
            "SELECT pg_try_advisory_lock(%s, hashtext(%s))", [mv.LOCK_CLASS, "job:" + self.group]
        ).fetchone()
        if not row or not row[0]:
            conn.close()
            job = self.current()
            where = f" (job #{job.id}, phase {job.phase})" if job is not None else ""
            raise ReshardError(
                f"Another resharding of group {self.group!r} is running{where}. Wait for it "
                f"to finish, or follow it with `manage.py dbscale reshard {self.group} --status`."
            )
        self._lock_conn = conn
        try:
            yield
        finally:
            self._lock_conn = None
            conn.close()

    def current(self) -> Any:
        """Return the group's unfinished job, or ``None``."""
        return (
            self.model.objects.using(DEFAULT_DB_ALIAS)
            .filter(group=self.group, finished_at__isnull=True)
            .first()
        )

    def last(self) -> Any:
        return (
            self.model.objects.using(DEFAULT_DB_ALIAS)
            .filter(group=self.group)
            .order_by("-id")
            .first()
        )

    def _save(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.job, key, value)
        self.job.updated_at = dt.datetime.now(dt.UTC)
        self.job.save(using=DEFAULT_DB_ALIAS)

    def _phase(self, phase: str) -> None:
        self._save(phase=phase)
        self.say(f"phase {phase}")

    def source_of(self, job: Any) -> ShardGroupSpec:
        """Return the ring *job* started from."""
        return shardmap.spec_from_json(self.group, job.source["shards"], job.source["vnodes"])

    @property
    def source(self) -> ShardGroupSpec:
        """The ring this job started from."""
        return self.source_of(self.job)

    def target_of(self, job: Any) -> ShardGroupSpec:
        """Return the ring *job* moves to."""
        return shardmap.spec_from_json(self.group, job.target["shards"], job.target["vnodes"])

    @property
    def target(self) -> ShardGroupSpec:
        """The ring this job moves to."""
        return self.target_of(self.job)

    @property
    def moves(self) -> dict[tuple[str, str], list[tuple[int, int]]]:
        return mv.moved_ranges(build_ring(self.source), build_ring(self.target))

    def _tables(self, alias: str) -> list[mv.MovedTable]:
        return mv.tables_of(self.group, connections[alias])

    # -- entry points -----------------------------------------------------------------------

    def start(self, target: ShardGroupSpec) -> Any:
        """Create the job (after the checks of :meth:`preflight`) and return it."""
        if shardmap.active(self.group) is None and self.group in dbscale_settings.shard_groups:
            problem = shardmap.placed_elsewhere(
                self.group, dbscale_settings.shard_groups[self.group]
            )
            if problem:
                raise ReshardError(
                    f"Group {self.group!r} has no row in the shard map yet, and {problem}: "
                    "SHARD_GROUPS was edited before the map recorded the ring the rows follow. "
                    "Restore the previous SHARDS, run `manage.py migrate` (it records that "
                    "ring), then declare the new SHARDS and run this command again."
                )
        with connect(DEFAULT_DB_ALIAS) as conn:
            shardmap.seed(
                conn,
                {self.group: dbscale_settings.shard_groups[self.group]}
                if self.group in dbscale_settings.shard_groups
                else {},
            )
        shardmap.refresh()
        existing = self.current()
        if existing is not None:
            raise ReshardError(
                f"Group {self.group!r} already has an unfinished resharding (job "
                f"#{existing.id}, phase {existing.phase}). Resume it with `manage.py dbscale "
                f"reshard {self.group} --resume`, or undo it with --rollback."
            )
        p = plan(self.group, target)
        if not p.moves:
            raise ReshardError(
                f"Nothing to move: group {self.group!r} is already placed under that ring "
                f"({build_ring(target).fingerprint})."
            )
        source = p.source
        self.job = self.model(
            group=self.group,
            phase="preflight",
            source={"shards": shardmap.spec_to_json(source), "vnodes": source.vnodes},
            target={"shards": shardmap.spec_to_json(target), "vnodes": target.vnodes},
            progress={},
        )
        self.preflight()
        count_rows(p)
        self.job.progress["expected"] = {
            f"{s}>{t}:{label}": n for (s, t, label), n in p.rows.items()
        }
        self.job.save(using=DEFAULT_DB_ALIAS)
        self.say(
            f"job #{self.job.id}: group {self.group} {list(source.shards)} -> "
            f"{list(target.shards)}, {p.fraction:.1%} of the key space moves"
        )
        return self.job

    def resume(self) -> Any:
        self.job = self.current()
        if self.job is None:
            raise ReshardError(f"Group {self.group!r} has no unfinished resharding to resume.")
        return self.job

    def run(self) -> None:
        """Run the job from its current phase to ``done``."""
        steps: dict[str, Callable[[], None]] = {
            "preflight": self._install,
            "copy": self.copy,
            "catchup": self.catchup,
            "verify": self.verify,
            "cutover": self.cutover,
            "settle": self.settle,
            "cleanup": self.cleanup,
        }
        while self.job.phase in steps:
            steps[self.job.phase]()

    # -- preflight --------------------------------------------------------------------------

    def preflight(self) -> None:
        """Check that the move can run; raise :class:`ReshardError` naming what to fix."""
        moves = self.moves
        aliases = sorted({a for pair in moves for a in pair})
        problems: list[str] = []
        reference: dict[str, list[tuple[str, str]]] = {}
        tables = self._tables(aliases[0]) if aliases else []
        for alias in aliases:
            if alias not in settings.DATABASES:
                problems.append(f"{alias!r} is not in DATABASES")
                continue
            try:
                conn = _connect(alias)
            except ReshardError as exc:
                problems.append(str(exc))
                continue
            with conn:
                for table in tables:
                    if not _table_exists(conn, table.table):
                        problems.append(
                            f"shard {alias!r} has no table {table.table!r} ({table.label}): run "
                            f"`manage.py migrate --database {alias}` (with {alias!r} in "
                            f"SHARD_GROUPS[{self.group!r}]['SHARDS'])"
                        )
                        continue
                    cols = _columns(conn, table.table)
                    first = reference.setdefault(table.table, cols)
                    if cols != first:
                        problems.append(
                            f"table {table.table!r} on {alias!r} has other columns than on the "
                            f"other shards ({sorted(set(cols) ^ set(first))}): migrate every "
                            "shard to the same state"
                        )
                    row = conn.execute(
                        "SELECT has_table_privilege(%s, 'SELECT,INSERT,UPDATE,DELETE,TRIGGER')",
                        [f'"{table.table}"'],
                    ).fetchone()
                    if not row or not row[0]:
                        problems.append(
                            f"the user of {alias!r} lacks SELECT/INSERT/UPDATE/DELETE/TRIGGER on "
                            f"{table.table!r}: grant them (or own the table)"
                        )
        if problems:
            raise ReshardError(
                f"Cannot reshard group {self.group!r}:\n  - "
                + "\n  - ".join(problems)
                + "\nNothing was changed."
            )

    def _install(self) -> None:
        """Install the functions, the moving ranges and the guard triggers on every shard."""
        job = self.job.id
        moves = self.moves
        self._drop_old_guards()
        for (source, target), ranges in moves.items():
            literal = mv.multirange(ranges)
            for alias, peer, role in ((source, target, "out"), (target, source, "in")):
                with _connect(alias) as conn:
                    _install_functions(conn)
                    conn.execute(
                        "INSERT INTO dbscale_moving (job, shard_group, peer, role, state, ranges) "
                        "VALUES (%s, %s, %s, %s, 'copying', %s::int8multirange) "
                        "ON CONFLICT (job, peer, role) DO NOTHING",
                        [job, self.group, peer, role, literal],
                    )
                    self._ensure_triggers(conn, alias)
        _crash_point("preflight")
        self._phase("copy")

    def _ensure_triggers(self, conn: psycopg.Connection[Any], alias: str) -> None:
        for table in self._tables(alias):
            args = ", ".join(
                "'" + a.replace("'", "''") + "'" for a in table.trigger_args(self.group)
            )
            conn.execute(
                sql.SQL(
                    "CREATE OR REPLACE TRIGGER dbscale_moving_guard BEFORE INSERT OR UPDATE OR "
                    "DELETE ON {} FOR EACH ROW EXECUTE FUNCTION dbscale_moving_guard({})"
                ).format(sql.Identifier(table.table), sql.SQL(args))
            )

    def _drop_old_guards(self) -> None:
        """Remove the guards left by the group's finished jobs (their processes are gone)."""
        aliases = {*self.source.shards, *self.target.shards}
        for alias in sorted(aliases):
            with _connect(alias) as conn:
                if not _table_exists(conn, "dbscale_moving"):
                    continue
                conn.execute(
                    "DELETE FROM dbscale_moving WHERE shard_group = %s AND job <> %s",
                    [self.group, self.job.id],
                )
                self._drop_triggers_if_idle(conn, alias)

    def _drop_triggers_if_idle(self, conn: psycopg.Connection[Any], alias: str) -> None:
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM dbscale_moving WHERE shard_group = %s)", [self.group]
        ).fetchone()
        if row and row[0]:
            return
        for table in self._tables(alias):
            if _table_exists(conn, table.table):
                conn.execute(
                    sql.SQL("DROP TRIGGER IF EXISTS dbscale_moving_guard ON {}").format(
                        sql.Identifier(table.table)
                    )
                )

    # -- copy and catch-up --------------------------------------------------------------------

    def copy(self) -> None:
        progress = self.job.progress.setdefault("copy", {})
        totals = self.job.progress.setdefault("rows", {})
        started = time.monotonic()
        copied_now = 0
        batches = 0
        expected = sum(int(v) for v in self.job.progress.get("expected", {}).values())
        for (source, target), ranges in self.moves.items():
            pair = f"{source}>{target}"
            literal = mv.multirange(ranges)
            done = progress.setdefault(pair, {})
            with (
                _connect(source, autocommit=False) as src,
                _connect(target, autocommit=False) as dst,
            ):
                src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                tables = self._tables(source)
                for table in tables:
                    if done.get(table.table, {}).get("complete"):
                        continue
                    # Before copying a table, the changes of the tables already (partly)
                    # copied are applied in this same snapshot: a row copied next then never
                    # points at a parent the target lacks (parents are copied first), even
                    # when a killed run copied the parents from an older snapshot.
                    begun = [t.table for t in tables if t.table in done]
                    self._apply_changes(
                        src, dst, source, target, limit=None, in_snapshot=True, only=begun
                    )
                    state = done.setdefault(table.table, {"after": None, "rows": 0})

                    def batch_done(
                        count: int,
                        last: str | None,
                        state: Any = state,
                        what: str = f"copy {pair} {table.label}",
                    ) -> None:
                        nonlocal copied_now, batches
                        state["after"] = last
                        state["rows"] += count
                        copied_now += count
                        totals["copied"] = int(totals.get("copied", 0)) + count
                        self._save()
                        batches += 1
                        self._report(
                            what,
                            int(totals["copied"]),
                            expected,
                            copied_now,
                            started,
                        )
                        _crash_point("copy", batches)

                    self._transfer(
                        src,
                        dst,
                        table,
                        *self._moving_select(table, literal, state["after"]),
                        on_batch=batch_done,
                    )
                    state["complete"] = True
                    self._save()
                src.commit()
        elapsed = max(time.monotonic() - started, 1e-9)
        self.job.progress["copy_rate"] = round(copied_now / elapsed)
        self.say(
            f"copied {copied_now:,} rows in {elapsed:.1f} s ({copied_now / elapsed:,.0f} rows/s)"
        )
        self._phase("catchup")

    def _report(self, what: str, done: int, total: int, now: int, started: float) -> None:
        elapsed = max(time.monotonic() - started, 1e-9)
        rate = now / elapsed
        eta = f", ETA {(total - done) / rate:,.0f} s" if total > done and rate > 0 else ""
        of = f"/{total:,}" if total >= done else ""  # rows inserted while copying count too
        self.say(f"  {what}: {done:,}{of} rows, {rate:,.0f} rows/s{eta}")

    def _moving_select(
        self, table: mv.MovedTable, literal: str, after: str | None
    ) -> tuple[str, list[Any]]:
        """Return the SELECT of the moving rows after primary key *after*, in key order."""
        cols = ", ".join(f"t.{table.q(c)}" for c in table.columns)
        where = f"{table.point} <@ %s::int8multirange"
        params: list[Any] = [literal]
        if after is not None:
            where += f" AND t.{table.q(table.pk)} > %s::{table.pk_type}"
            params.append(after)
        query = f"SELECT {cols} FROM {table.source} WHERE {where} ORDER BY t.{table.q(table.pk)}"
        return query, params

    def _transfer(
        self,
        src: psycopg.Connection[Any],
        dst: psycopg.Connection[Any],
        table: mv.MovedTable,
        select: str,
        params: list[Any],
        *,
        on_batch: Callable[[int, str | None], None] | None = None,
    ) -> set[str]:
        """Stream the rows *select* returns on *src* into *table* on *dst* (an upsert).

        One ``COPY (SELECT ...) TO STDOUT`` on the source (one scan, whatever the size)
        feeds ``COPY ... FROM STDIN`` on the target as raw text (no value is parsed in
        Python), through a temporary staging table that ``INSERT ... ON CONFLICT (pk) DO
        UPDATE`` merges. With *on_batch*, the target commits every ``batch`` rows and
        ``on_batch(rows, last primary key)`` runs after each commit; without it, one batch,
        and *dst*'s transaction is left open. Returns the primary keys (as text) of the
        last batch.
        """
        stage = sql.Identifier("dbscale_stage_" + table.table)
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in table.columns)
        pk = sql.Identifier(table.pk)
        updates = [c for c in table.columns if c != table.pk]
        conflict = (
            sql.SQL("DO UPDATE SET {}").format(
                sql.SQL(", ").join(
                    sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c))
                    for c in updates
                )
            )
            if updates
            else sql.SQL("DO NOTHING")
        )

        def merge(rows: list[bytes]) -> list[str]:
            dst.execute("SET CONSTRAINTS ALL DEFERRED")
            dst.execute(
                sql.SQL(
                    "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {}) ON COMMIT DELETE ROWS"
                ).format(stage, sql.Identifier(table.table))
            )
            with dst.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN").format(stage, cols)) as into:
                for row in rows:
                    into.write(row)
            keys = [
                str(r[0])
                for r in dst.execute(
                    sql.SQL("SELECT {}::text FROM {} ORDER BY {}").format(pk, stage, pk)
                ).fetchall()
            ]
            if keys:
                dst.execute(
                    sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT ({}) {}").format(
                        sql.Identifier(table.table), cols, cols, stage, pk, conflict
                    )
                )
            return keys

        pending: list[bytes] = []
        keys: list[str] = []
        with src.cursor().copy(f"COPY ({select}) TO STDOUT", params) as out:
            for data in out:  # one row per message
                pending.append(bytes(data))
                if on_batch is not None and len(pending) >= self.batch:
                    keys = merge(pending)
                    dst.commit()
                    pending = []
                    on_batch(len(keys), keys[-1] if keys else None)
        if pending or on_batch is None:
            keys = merge(pending) if pending else []
            if on_batch is not None:
                dst.commit()
                on_batch(len(keys), keys[-1] if keys else None)
        return set(keys)

    def _apply_changes(
        self,
        src: psycopg.Connection[Any],
        dst: psycopg.Connection[Any],
        source: str,
        target: str,
        *,
        limit: int | None = CHANGE_BATCH,
        in_snapshot: bool = False,
        only: Sequence[str] | None = None,
    ) -> int:
        """Apply recorded changes of moving rows from *src* to *dst*; return how many.

        Each changed row is re-read from *src*: present -> upserted on *dst*, gone ->
        deleted there. The recorded changes are deleted in *src*'s transaction, committed
        after *dst*'s: a crash in between applies them again, which is harmless. With
        ``in_snapshot`` the caller's transaction on *src* is used and left open. With
        *only*, just the changes of those tables are applied (the others stay recorded).
        """
        tables = {t.table: t for t in self._tables(source)}
        applied = 0
        while True:
            size = CHANGE_BATCH if limit is None else min(limit - applied, CHANGE_BATCH)
            if size <= 0:
                break
            if not in_snapshot:
                src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            changes = src.execute(
                "DELETE FROM dbscale_moving_changes WHERE id IN (SELECT id FROM "
                "dbscale_moving_changes WHERE job = %s AND peer = %s AND tbl = ANY(%s) "
                "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING tbl, pk",
                [self.job.id, target, list(tables) if only is None else list(only), size],
            ).fetchall()
            if not changes:
                if not in_snapshot:
                    src.commit()
                break
            by_table: dict[str, set[str]] = {}
            for tbl, pk in changes:
                by_table.setdefault(str(tbl), set()).add(str(pk))
            for table in (t for t in tables.values() if t.table in by_table):
                self._copy_keys(src, dst, table, sorted(by_table[table.table]))
            dst.commit()
            if not in_snapshot:
                src.commit()
            applied += len(changes)
            if len(changes) < size:
                break
        return applied

    def _pending(self, src: psycopg.Connection[Any]) -> int:
        row = src.execute(
            "SELECT count(*) FROM dbscale_moving_changes WHERE job = %s", [self.job.id]
        ).fetchone()
        return int(row[0]) if row else 0

    def catchup(self) -> None:
        started = time.monotonic()
        total = 0
        for _ in range(1000):
            left = 0
            for source, target in self.moves:
                with (
                    _connect(source, autocommit=False) as src,
                    _connect(target, autocommit=False) as dst,
                ):
                    total += self._apply_changes(src, dst, source, target, limit=20 * CHANGE_BATCH)
                    src.commit()
                    left += self._pending(src)
                    src.commit()
            _crash_point("catchup")
            if left < CATCHUP_DONE_BELOW:
                break
        self.say(f"caught up: {total:,} changed rows applied in {time.monotonic() - started:.1f} s")
        self._phase("verify")

    # -- verify -----------------------------------------------------------------------------

    @staticmethod
    def _chunk_where(
        table: mv.MovedTable, literal: str, lo: str | None, hi: str | None
    ) -> tuple[str, list[Any]]:
        """Return the WHERE clause (and parameters) of the moving rows with lo <= pk < hi."""
        pk = f"t.{table.q(table.pk)}"
        where = [f"{table.point} <@ %s::int8multirange"]
        params: list[Any] = [literal]
        if lo is not None:
            where.append(f"{pk} >= %s::{table.pk_type}")
            params.append(lo)
        if hi is not None:
            where.append(f"{pk} < %s::{table.pk_type}")
            params.append(hi)
        return " AND ".join(where), params

    def _chunk_sums(
        self,
        conn: psycopg.Connection[Any],
        table: mv.MovedTable,
        literal: str,
        bounds: list[str],
    ) -> dict[int, tuple[int, str]]:
        """Return chunk -> (count, md5 of the rows' md5s) of the moving rows, in one scan.

        Chunk ``i`` holds the keys in ``[bounds[i-1], bounds[i])`` (``width_bucket``), the
        first and last chunks open-ended. Empty chunks are absent.
        """
        pk = f"t.{table.q(table.pk)}"
        cols = ", ".join(f"t.{table.q(c)}" for c in table.columns)
        rows = conn.execute(
            f"SELECT width_bucket({pk}, %s::text[]::{table.pk_type}[]) AS chunk, count(*), "
            f"md5(string_agg(md5(ROW({cols})::text), '' ORDER BY {pk})) FROM {table.source} "
            f"WHERE {table.point} <@ %s::int8multirange GROUP BY chunk",
            [bounds, literal],
        ).fetchall()
        return {int(chunk): (int(count), str(digest)) for chunk, count, digest in rows}

    def verify(self) -> None:
        report = self.job.progress.setdefault("verify", {})
        checked = fixed = 0
        for (source, target), ranges in self.moves.items():
            literal = mv.multirange(ranges)
            with (
                _connect(source, autocommit=False) as src,
                _connect(target, autocommit=False) as dst,
            ):
                for table in self._tables(source):
                    pk = f"t.{table.q(table.pk)}"
                    bounds = [
                        str(r[0])
                        for r in src.execute(
                            f"SELECT pk FROM (SELECT {pk} AS pk, row_number() OVER "
                            f"(ORDER BY {pk}) AS n FROM {table.source} "
                            f"WHERE {table.point} <@ %s::int8multirange) s "
                            f"WHERE n > 1 AND (n - 1) %% {self.batch} = 0",
                            [literal],
                        ).fetchall()
                    ]
                    src.commit()
                    self._apply_changes(src, dst, source, target, limit=None)
                    ours = self._chunk_sums(src, table, literal, bounds)
                    src.commit()
                    theirs = self._chunk_sums(dst, table, literal, bounds)
                    dst.commit()
                    edges: list[str | None] = [None, *bounds, None]
                    for index in sorted(ours.keys() | theirs.keys()):
                        if ours.get(index) != theirs.get(index):
                            fixed += self._reconcile(
                                src, dst, target, table, literal, edges[index], edges[index + 1]
                            )
                    checked += len(bounds) + 1
                    report[f"{source}>{target}:{table.table}"] = "ok"
        self.job.progress["verify_fixed"] = fixed
        self.say(
            f"verified {checked} chunks: every moved row matches its source "
            f"({fixed} rows re-copied)"
        )
        _crash_point("verify")
        self._phase("cutover")

    def _reconcile(
        self,
        src: psycopg.Connection[Any],
        dst: psycopg.Connection[Any],
        target: str,
        table: mv.MovedTable,
        literal: str,
        lo: str | None,
        hi: str | None,
    ) -> int:
        """Compare a chunk whose checksums differ row by row; re-copy the rows that are wrong.

        The site keeps writing: a row whose change is still recorded (the catch-up applies
        it) may differ and is not wrong. The source, then the target, then the recorded
        changes are read, in that order, so a change committed meanwhile is always seen as
        recorded. Returns how many rows were re-copied; raises if a re-copied row still
        differs.
        """
        where, params = self._chunk_where(table, literal, lo, hi)
        cols = ", ".join(f"t.{table.q(c)}" for c in table.columns)
        rows = f"SELECT t.{table.q(table.pk)}::text, md5(ROW({cols})::text) FROM {table.source} "
        fixed = 0
        for attempt in range(2):
            source_rows = dict(src.execute(rows + f"WHERE {where}", params).fetchall())
            src.commit()
            target_rows = dict(dst.execute(rows + f"WHERE {where}", params).fetchall())
            dst.commit()
            pending = {
                str(r[0])
                for r in src.execute(
                    "SELECT pk FROM dbscale_moving_changes WHERE job = %s AND peer = %s "
                    "AND tbl = %s",
                    [self.job.id, target, table.table],
                ).fetchall()
            }
            src.commit()
            wrong = {
                str(k)
                for k in source_rows.keys() | target_rows.keys()
                if source_rows.get(k) != target_rows.get(k)
            } - pending
            if not wrong:
                return fixed
            if attempt:
                raise ReshardError(
                    f"Verification of {table.label} on {target!r}: {len(wrong)} row(s) still "
                    f"differ from their source after being re-copied (e.g. primary key "
                    f"{sorted(wrong)[0]}). The job stays in phase verify; rerun the command, "
                    "or roll back with --rollback."
                )
            self._copy_keys(src, dst, table, sorted(wrong))
            dst.commit()
            src.commit()
            fixed += len(wrong)
            self.say(f"  re-copied {len(wrong)} rows of {table.label} that differed")
        return fixed

    def _copy_keys(
        self,
        src: psycopg.Connection[Any],
        dst: psycopg.Connection[Any],
        table: mv.MovedTable,
        pks: list[str],
    ) -> None:
        """Make the rows with primary keys *pks* on *dst* what they are on *src* (present or
        deleted). Leaves both transactions open."""
        cols = ", ".join(f"t.{table.q(c)}" for c in table.columns)
        found = self._transfer(
            src,
            dst,
            table,
            f"SELECT {cols} FROM {table.q(table.table)} t "
            f"WHERE t.{table.q(table.pk)} = ANY(%s::text[]::{table.pk_type}[])",
            [pks],
        )
        gone = sorted(set(pks) - found)
        if gone:
            dst.execute(
                sql.SQL("DELETE FROM {} WHERE {} = ANY(%s::text[]::{}[])").format(
                    sql.Identifier(table.table),
                    sql.Identifier(table.pk),
                    sql.SQL(table.pk_type),
                ),
                [gone],
            )

    # -- cutover ----------------------------------------------------------------------------

    def cutover(self) -> None:
        moves = self.moves
        sources = sorted({s for s, _ in moves})
        targets = sorted({t for _, t in moves})
        locks: dict[str, psycopg.Connection[Any]] = {}
        started = time.monotonic()
        try:
            for alias in sources:
                conn = _connect(alias)
                locks[alias] = conn
                conn.execute(f"SET lock_timeout = '{int(CUTOVER_LOCK_TIMEOUT * 1000)}ms'")
                try:
                    conn.execute(
                        "SELECT pg_advisory_lock(%s, hashtext(%s))", [mv.LOCK_CLASS, self.group]
                    )
                except psycopg.errors.LockNotAvailable as exc:
                    raise ReshardError(
                        f"Cutover: writes of moving keys on {alias!r} stayed open for more than "
                        f"{CUTOVER_LOCK_TIMEOUT:.0f} s (a long transaction?). Nothing changed; "
                        "rerun the command to try again."
                    ) from exc
            locked_at = time.monotonic()
            for source, target in moves:
                with (
                    _connect(source, autocommit=False) as src,
                    _connect(target, autocommit=False) as dst,
                ):
                    self._apply_changes(src, dst, source, target, limit=None)
            _crash_point("cutover")
            floors: dict[str, str] = {}
            for alias in sources:
                with _connect(alias) as conn:
                    conn.execute(
                        "UPDATE dbscale_moving SET state = 'moved' WHERE job = %s AND role = 'out'",
                        [self.job.id],
                    )
            for alias in targets:
                with _connect(alias) as conn:
                    conn.execute(
                        "UPDATE dbscale_moving SET state = 'moved' WHERE job = %s AND role = 'in'",
                        [self.job.id],
                    )
                    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
                    floors[alias] = str(row[0]) if row else "0/0"
            _crash_point("cutover", 1)
            self._flip(self.source, self.target, floors)
            stall = time.monotonic() - locked_at
        finally:
            for conn in locks.values():
                with contextlib.suppress(psycopg.Error):
                    conn.close()  # closing the session releases its advisory lock
        self.job.progress["cutover"] = {
            "at": time.time(),
            "held_back_s": round(stall, 3),
            "floors": floors,
        }
        self._publish_writes(sorted({*sources, *targets}))
        self.say(
            f"cut over in {time.monotonic() - started:.2f} s; writes of moving keys were held "
            f"back {stall * 1000:.0f} ms; shard map version bumped"
        )
        self._phase("settle")

    def _flip(self, old: ShardGroupSpec, new: ShardGroupSpec, floors: dict[str, str]) -> None:
        """Point the shard map at *new* (compare-and-set from *old*; idempotent)."""
        new_fp = build_ring(new).fingerprint
        with connect(DEFAULT_DB_ALIAS, autocommit=False) as conn:
            row = conn.execute(
                f'SELECT version, fingerprint, floors FROM {shardmap.TABLE} WHERE "group" = %s '
                "FOR UPDATE",
                [self.group],
            ).fetchone()
            if row is None:
                raise ReshardError(f"The shard map has no row for group {self.group!r}.")
            version, fingerprint, current_floors = row
            if fingerprint != new_fp:
                merged = {**(current_floors or {}), **floors}
                conn.execute(
                    f"UPDATE {shardmap.TABLE} SET version = version + 1, shards = %s, vnodes = %s, "
                    'fingerprint = %s, floors = %s, updated_at = now() WHERE "group" = %s',
                    [
                        Jsonb(shardmap.spec_to_json(new)),
                        new.vnodes,
                        new_fp,
                        Jsonb(merged),
                        self.group,
                    ],
                )
            conn.commit()
        shardmap.refresh()

    def _publish_writes(self, aliases: Sequence[str]) -> None:
        """Tell the subscribers (the queryset cache) that the group's tables changed."""
        from django_dbscale.backends import events

        if not events.statement_wrote.receivers:
            return
        for alias in aliases:
            connection = connections[alias]
            with events.operation():
                for table in self._tables(alias):
                    events.statement_wrote.send(
                        sender=type(connection), connection=connection, table=table.table, dims=None
                    )

    # -- settle and cleanup -----------------------------------------------------------------

    def settle(self) -> None:
        _crash_point("settle")
        at = float(self.job.progress.get("cutover", {}).get("at", 0))
        wait = at + 2 * dbscale_settings.shard_map_check_interval + 1 - time.time()
        if wait > 0:
            self.say(f"waiting {wait:.1f} s for every process to re-read the shard map")
            time.sleep(wait)
        self._phase("cleanup")

    def cleanup(self) -> None:
        deleted = 0
        for (source, _target), ranges in self.moves.items():
            literal = mv.multirange(ranges)
            for table in reversed(self._tables(source)):
                deleted += self._delete_moving(source, table, literal)
        for alias in sorted({t for _, t in self.moves}):
            with _connect(alias) as conn:
                conn.execute(
                    "DELETE FROM dbscale_moving WHERE job = %s AND role = 'in'", [self.job.id]
                )
                conn.execute("DELETE FROM dbscale_moving_changes WHERE job = %s", [self.job.id])
                self._drop_triggers_if_idle(conn, alias)
        self._restamp()
        self._publish_writes(sorted({a for pair in self.moves for a in pair}))
        misplaced = self.audit(self.target)
        self.job.progress["cleanup"] = {"deleted": deleted, "misplaced": misplaced}
        self.say(f"deleted {deleted:,} moved rows from their old shards")
        if misplaced:
            self.say(
                "AUDIT: rows on a shard that does not own them: "
                + ", ".join(f"{k}: {v}" for k, v in sorted(misplaced.items()))
            )
        self._save(phase="done", finished_at=dt.datetime.now(dt.UTC))
        self.say("phase done")

    def _delete_moving(self, alias: str, table: mv.MovedTable, literal: str) -> int:
        """Delete *table*'s rows in the moving ranges on *alias*, a batch per transaction.

        The keys come from one ordered scan (a server-side cursor); each batch is deleted
        by primary key on a second connection, so the work stays linear in the table size.
        """
        deleted = 0
        with (
            _connect(alias, autocommit=False) as reader,
            _connect(alias, autocommit=False) as writer,
        ):
            with reader.cursor(name="dbscale_reshard_keys") as keys:
                keys.execute(
                    f"SELECT t.{table.q(table.pk)}::text FROM {table.source} "
                    f"WHERE {table.point} <@ %s::int8multirange",
                    [literal],
                )
                while batch := [str(r[0]) for r in keys.fetchmany(self.batch)]:
                    writer.execute("SET CONSTRAINTS ALL DEFERRED")
                    cur = writer.execute(
                        sql.SQL("DELETE FROM {} WHERE {} = ANY(%s::text[]::{}[])").format(
                            sql.Identifier(table.table),
                            sql.Identifier(table.pk),
                            sql.SQL(table.pk_type),
                        ),
                        [batch],
                    )
                    writer.commit()
                    deleted += cur.rowcount
                    _crash_point("cleanup", deleted // self.batch)
            reader.commit()
        return deleted

    def _restamp(self) -> None:
        from django_dbscale.sharding import ids

        for alias in self.target.shards:
            if self.group in dbscale_settings.groups_of_shard.get(alias, ()):
                with contextlib.suppress(ShardingError):
                    ids.install_shard_functions(alias, group=self.group, restamp=True, force=True)

    def audit(self, spec: ShardGroupSpec) -> dict[str, int]:
        """Count, on every shard of *spec*, the rows whose key it does not own."""
        owned = mv.owned_ranges(build_ring(spec))
        misplaced: dict[str, int] = {}
        for alias in spec.shards:
            literal = mv.multirange(owned.get(alias, []))
            with _connect(alias) as conn:
                _install_functions(conn)
                for table in self._tables(alias):
                    if not _table_exists(conn, table.table):
                        continue
                    row = conn.execute(
                        f"SELECT count(*) FROM {table.source} WHERE NOT ({table.point} <@ "
                        "%s::int8multirange)",
                        [literal],
                    ).fetchone()
                    if row and row[0]:
                        misplaced[f"{alias}:{table.table}"] = int(row[0])
        return misplaced

    # -- rollback ---------------------------------------------------------------------------

    def rollback(self) -> None:
        """Undo the unfinished job: the old placement back, nothing lost."""
        if self.job.phase in ("cleanup", "done"):
            raise ReshardError(
                f"Job #{self.job.id} is in phase {self.job.phase}: rows were already deleted "
                "from their old shards, so it cannot be rolled back. Finish it (--resume), "
                "then reshard back to the old ring."
            )
        mapped = shardmap.active(self.group)
        flipped = mapped is not None and mapped.fingerprint == build_ring(self.target).fingerprint
        moves = self.moves
        if flipped:
            self._carry_back(moves)
        for (_source, target), ranges in moves.items():
            literal = mv.multirange(ranges)
            with _connect(target, autocommit=False) as conn:
                for table in reversed(self._tables(target)):
                    conn.execute("SET CONSTRAINTS ALL DEFERRED")
                    conn.execute(
                        f"DELETE FROM {table.q(table.table)} t0 WHERE t0.ctid IN (SELECT t.ctid "
                        f"FROM {table.source} WHERE {table.point} <@ %s::int8multirange)",
                        [literal],
                    )
                conn.commit()
        for alias in sorted({a for pair in moves for a in pair}):
            with _connect(alias) as conn:
                if not _table_exists(conn, "dbscale_moving"):
                    continue
                conn.execute(
                    "DELETE FROM dbscale_moving WHERE job = %s AND NOT (role = 'out' AND "
                    "state = 'moved' AND %s)",
                    [self.job.id, flipped],
                )
                conn.execute("DELETE FROM dbscale_moving_changes WHERE job = %s", [self.job.id])
                self._drop_triggers_if_idle(conn, alias)
        self._publish_writes(sorted({a for pair in moves for a in pair}))
        self._save(phase="rolled_back", finished_at=dt.datetime.now(dt.UTC))
        self.say(f"job #{self.job.id} rolled back: group {self.group} is placed as before")

    def _carry_back(self, moves: dict[tuple[str, str], list[tuple[int, int]]]) -> None:
        """After cutover: apply the changes made on the new shards back to the old ones,
        guard the new shards, and flip the map back (the cutover, in reverse)."""
        targets = sorted({t for _, t in moves})
        locks = []
        try:
            for alias in targets:
                conn = _connect(alias)
                locks.append(conn)
                conn.execute(f"SET lock_timeout = '{int(CUTOVER_LOCK_TIMEOUT * 1000)}ms'")
                conn.execute(
                    "SELECT pg_advisory_lock(%s, hashtext(%s))", [mv.LOCK_CLASS, self.group]
                )
            for source, target in moves:
                with (
                    _connect(target, autocommit=False) as src,
                    _connect(source, autocommit=False) as dst,
                ):
                    self._apply_changes(src, dst, target, source, limit=None)
            for source, target in moves:
                with _connect(source) as conn:
                    conn.execute(
                        "DELETE FROM dbscale_moving WHERE job = %s AND role = 'out' AND peer = %s",
                        [self.job.id, target],
                    )
                with _connect(target) as conn:
                    conn.execute(
                        "UPDATE dbscale_moving SET role = 'out', peer = %s, state = 'moved' "
                        "WHERE job = %s AND role = 'in' AND peer = %s",
                        [source, self.job.id, source],
                    )
            self._flip(self.target, self.source, {})
        finally:
            for conn in locks:
                with contextlib.suppress(psycopg.Error):
                    conn.close()
        self.job.progress["rolled_back_at"] = time.time()
        self._save()
        wait = 2 * dbscale_settings.shard_map_check_interval + 1
        self.say(f"map flipped back; waiting {wait:.1f} s for every process to re-read it")
        time.sleep(wait)
