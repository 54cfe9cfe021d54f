"""Online resharding: copy rate, and how long a write of a moving key stalls at cutover.

``python -m bench.bench_reshard [--runs 3] [--rows 100000] [--batch-size 5000]
[--writer-rate 300] [--keep]`` (boots the harness's real PostgreSQL services, like the other
benches; ``--keep`` keeps the writer logs and the command's outputs in a temporary directory).
Each run also prints the seconds the command spent in each phase (from its ``phase`` lines).

Each run places the ``ledgers`` group on shard0 + shard1 (the shard map's active ring, while
the settings declare shard0-2), loads ``--rows`` narrow rows into it with ``COPY`` (half
``LedgerAccount``, half ``LedgerEntry``, one entry per account; the IDs come from the
columns' ``dbscale_next_id`` default, as for any insert), starts a writer process
(:mod:`bench.reshard_writer`: entries and balance updates of random accounts through the
ORM, ``--writer-rate`` writes per second, every write's latency logged), runs
``manage.py dbscale reshard ledgers --add shard2`` in its own process, as an operator
would, stops the writer and reads the job row. Then it cleans up (guards dropped, tables
truncated, the map placed back on two shards) for the next run.

The targets, judged on the medians of the runs (the machine is noisy):

1. **Copy rate** ``progress["copy_rate"]`` of the job (rows copied / seconds of the copy
   phase, what the command prints as ``copied N rows in T s (R rows/s)``): >= 20,000 rows/s.
2. **Longest stall of a write of a moving key at cutover**, as the writer saw it: the
   longest latency of one write (refusals and retries included) of an account whose owner
   differs between the old and the new ring, among the writes overlapping the cutover
   window (from 1 s before the cutover took the sources' group lock to the end of the settle
   phase, when every process has re-read the map): < 1 s. The job's own
   ``progress["cutover"]["held_back_s"]`` (how long the lock was held) is shown beside it,
   and so are the longest writes of the whole reshard, of moving keys and of all keys.

The process exits with status 1 when a target is not met.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import setup_django

ROOT = Path(__file__).resolve().parent.parent
GROUP = "ledgers"
SHARDS = ("shard0", "shard1", "shard2")
OLD_SHARDS = ("shard0", "shard1")
TABLES = ("testapp_ledgeraccount", "testapp_ledgerentry", "testapp_ledgerlabel")
COPY_TARGET = 20_000.0  # rows/s
STALL_TARGET = 1.0  # seconds
#: The cutover window starts this long before the sources' group lock was taken.
WINDOW_BEFORE = 1.0


@dataclass
class Run:
    """The figures of one run."""

    rows: int
    copied: int
    copy_rate: float
    command_rate: float
    held_back: float
    cutover_at: float
    reshard_seconds: float
    #: Seconds from the command's start to its first line, then in each phase it printed.
    phases: dict[str, float]
    writes: int
    errors: int
    retries: int
    moving_in_window: int
    stall_moving: float
    stall_all_window: float
    max_moving: float
    max_all: float
    misplaced: str
    notes: list[str] = field(default_factory=list)


def specs() -> tuple[Any, Any]:
    from django_dbscale.conf import ShardGroupSpec, dbscale_settings

    vnodes = dbscale_settings.shard_groups[GROUP].vnodes
    return (
        ShardGroupSpec(GROUP, OLD_SHARDS, {}, vnodes),
        ShardGroupSpec(GROUP, SHARDS, {}, vnodes),
    )


def place_map(spec: Any) -> None:
    """Make *spec* the group's active ring (as tests/test_reshard.py does)."""
    from django_dbscale.own_connections import connect
    from django_dbscale.sharding import shardmap

    with connect("default") as conn:
        conn.execute(f'DELETE FROM {shardmap.TABLE} WHERE "group" = %s', [GROUP])
        shardmap.seed(conn, {GROUP: spec})
    shardmap.refresh()


def reseed_map() -> None:
    """Put the map back as ``migrate`` leaves it: every group's ring from the settings."""
    from django_dbscale.conf import dbscale_settings
    from django_dbscale.own_connections import connect
    from django_dbscale.sharding import shardmap

    with connect("default") as conn:
        conn.execute(f'DELETE FROM {shardmap.TABLE} WHERE "group" = %s', [GROUP])
        shardmap.seed(conn, {GROUP: dbscale_settings.shard_groups[GROUP]})
    shardmap.refresh()


def reset() -> None:
    """Drop the guards, empty the group's tables, forget unfinished jobs of the group."""
    from django.db import connections

    from django_dbscale.models import ReshardJob
    from django_dbscale.own_connections import connect

    for alias in SHARDS:
        with connect(alias) as conn:
            for table in TABLES:
                conn.execute(f"DROP TRIGGER IF EXISTS dbscale_moving_guard ON {table}")
            for table in ("dbscale_moving", "dbscale_moving_changes"):
                if conn.execute("SELECT to_regclass(%s)", [table]).fetchone() != (None,):
                    conn.execute(f"TRUNCATE {table}")
            conn.execute(f"TRUNCATE {', '.join(TABLES)}")
    ReshardJob.objects.using("default").filter(group=GROUP, finished_at__isnull=True).delete()
    connections.close_all()


def populate(rows: int) -> int:
    """Load rows // 2 accounts (numbers 0..n-1) and one entry each on their old owners.

    ``COPY`` per shard; the IDs come from the columns' default (``dbscale_next_id``), so they
    are unique across the shards like any the ORM makes. Returns the number of accounts.
    """
    from django_dbscale.own_connections import connect
    from django_dbscale.sharding.ring import build_ring

    old, _ = specs()
    ring = build_ring(old)
    accounts = rows // 2
    owners: dict[str, list[int]] = {alias: [] for alias in OLD_SHARDS}
    for number in range(accounts):
        owners[ring.node_for(str(number))].append(number)
    for alias, numbers in owners.items():
        with connect(alias, autocommit=False) as conn:
            with conn.cursor().copy(
                "COPY testapp_ledgeraccount (number, balance) FROM STDIN"
            ) as copy:
                for number in numbers:
                    copy.write_row((number, number))
            with conn.cursor().copy(
                "COPY testapp_ledgerentry (account_number, amount, writer_seq) FROM STDIN"
            ) as copy:
                for number in numbers:
                    copy.write_row((number, number % 1000, -number - 1))
            conn.commit()
            conn.autocommit = True
            conn.execute("VACUUM ANALYZE testapp_ledgeraccount")
            conn.execute("VACUUM ANALYZE testapp_ledgerentry")
    return accounts


def counts() -> dict[str, int]:
    from django_dbscale.own_connections import connect

    out = {}
    for alias in SHARDS:
        with connect(alias) as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM testapp_ledgeraccount) "
                "+ (SELECT count(*) FROM testapp_ledgerentry)"
            ).fetchone()
            out[alias] = int(row[0]) if row else 0
    return out


def child_env() -> dict[str, str]:
    from django_dbscale.testing.harness import get_services

    return {**os.environ, **get_services().env(), "DJANGO_SETTINGS_MODULE": "tests.settings"}


def run_command(command: list[str], began: float) -> tuple[int, str, dict[str, float]]:
    """Run the reshard command; return its status, its output (stderr too) and the seconds
    spent in each phase, from the time each ``phase X`` line arrived."""
    phases: dict[str, float] = {}
    lines: list[str] = []
    current, since = "start-up", began
    with subprocess.Popen(
        command,
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if line.startswith("phase "):
                now = time.perf_counter()
                phases[current] = phases.get(current, 0.0) + now - since
                current, since = line.split()[1], now
        returncode = process.wait(timeout=900)
    phases[current] = phases.get(current, 0.0) + time.perf_counter() - since
    return returncode, "".join(lines), phases


def one_run(number: int, rows: int, batch: int, rate: float, workdir: Path) -> Run:
    from django.db import connections

    from django_dbscale.conf import dbscale_settings
    from django_dbscale.models import ReshardJob

    old, new = specs()
    reset()
    place_map(old)
    started = time.perf_counter()
    accounts = populate(rows)
    before = counts()
    print(
        f"-- run {number}: loaded {sum(before.values()):,} rows "
        f"({', '.join(f'{a} {n:,}' for a, n in before.items())}) in "
        f"{time.perf_counter() - started:.1f} s",
        flush=True,
    )
    connections.close_all()

    log, stop = workdir / f"writer{number}.log", workdir / f"stop{number}"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.reshard_writer",
            str(log),
            str(stop),
            str(accounts),
            str(number),
            str(rate),
            ",".join(old.shards),
            ",".join(new.shards),
        ],
        cwd=ROOT,
        env=child_env(),
    )
    try:
        deadline = time.monotonic() + 60
        while not log.exists() or log.read_text().count("\n") < 100:
            if writer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the writer did not start (exit status {writer.returncode})")
            time.sleep(0.05)
        command = [
            sys.executable,
            "-m",
            "django",
            "dbscale",
            "--skip-checks",
            "reshard",
            GROUP,
            "--add",
            "shard2",
            "--batch-size",
            str(batch),
        ]
        began, began_wall = time.perf_counter(), time.time()
        returncode, output, phases = run_command(command, began)
        reshard_seconds = time.perf_counter() - began
        time.sleep(0.5)  # the writer goes on writing on the new placement
    finally:
        stop.touch()
        writer.wait(timeout=60)
    (workdir / f"reshard{number}.out").write_text(output)
    if returncode != 0:
        raise RuntimeError(f"reshard exited with status {returncode}:\n{output}")
    if writer.returncode != 0:
        raise RuntimeError(f"the writer exited with status {writer.returncode}; see {log}")

    job = ReshardJob.objects.using("default").filter(group=GROUP).order_by("-id").first()
    assert job is not None and job.phase == "done", job
    progress = job.progress
    cutover = progress["cutover"]
    held_back = float(cutover["held_back_s"])
    cutover_at = float(cutover["at"])
    match = re.search(r"copied (\d+) rows in ([\d.]+) s \(([\d,]+) rows/s\)", output)
    command_rate = float(match.group(3).replace(",", "")) if match else float("nan")
    audit = re.search(r"misplaced rows found by the audit: (\S+)", output)

    records = [json.loads(line) for line in log.read_text().splitlines()]
    summary = records[-1]
    assert summary["op"] == "summary", summary
    writes = [r for r in records if "lat" in r]
    window_from = cutover_at - held_back - WINDOW_BEFORE
    window_to = cutover_at + 2 * dbscale_settings.shard_map_check_interval + 1
    in_window = [w for w in writes if w["t"] <= window_to and w["t"] + w["lat"] >= window_from]
    moving_in_window = [w for w in in_window if w["moves"]]
    during = [w for w in writes if began_wall <= w["t"] <= began_wall + reshard_seconds]

    after = counts()
    notes = []
    if sum(after.values()) != sum(before.values()) + sum(1 for w in writes if w["op"] == "entry"):
        notes.append(f"row count {sum(after.values())} != loaded + entries written")
    if not after["shard2"]:
        notes.append("nothing on shard2")
    if summary["errors"]:
        notes.append(f"{summary['errors']} writer errors other than refusals (see {log})")
    return Run(
        rows=sum(before.values()),
        copied=int(progress.get("rows", {}).get("copied", 0)),
        copy_rate=float(progress.get("copy_rate", 0)),
        command_rate=command_rate,
        held_back=held_back,
        cutover_at=cutover_at,
        reshard_seconds=reshard_seconds,
        phases=phases,
        writes=len(writes),
        errors=int(summary["errors"]),
        retries=sum(w["retries"] for w in writes),
        moving_in_window=len(moving_in_window),
        stall_moving=max((w["lat"] for w in moving_in_window), default=float("nan")),
        stall_all_window=max((w["lat"] for w in in_window), default=float("nan")),
        max_moving=max((w["lat"] for w in during if w["moves"]), default=float("nan")),
        max_all=max((w["lat"] for w in writes), default=float("nan")),
        misplaced=audit.group(1) if audit else "?",
        notes=notes,
    )


def show(run: Run) -> None:
    print(
        f"   rows copied {run.copied:,}; copy {run.copy_rate:,.0f} rows/s (job row; command "
        f"printed {run.command_rate:,.0f}); reshard command {run.reshard_seconds:.1f} s; "
        f"misplaced after: {run.misplaced}"
    )
    print(
        f"   cutover: lock held {run.held_back * 1000:.0f} ms (held_back_s); writer: "
        f"{run.writes:,} writes, {run.retries} refusals/retries, {run.errors} errors"
    )
    print(
        f"   longest write, cutover window: moving keys {run.stall_moving * 1000:.0f} ms "
        f"({run.moving_in_window} writes), all keys {run.stall_all_window * 1000:.0f} ms; "
        f"whole reshard: moving keys {run.max_moving * 1000:.0f} ms; whole writer run, all "
        f"keys: {run.max_all * 1000:.0f} ms"
    )
    print("   phases: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in run.phases.items()))
    for note in run.notes:
        print(f"   ODD: {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--writer-rate", type=float, default=300.0)
    parser.add_argument("--keep", action="store_true", help="Keep the logs and outputs.")
    args, _ = parser.parse_known_args()  # nox passes the same arguments to every bench

    setup_django()
    print(
        f"Resharding {GROUP} from {list(OLD_SHARDS)} to {list(SHARDS)}: {args.rows:,} rows, "
        f"batch {args.batch_size}, a writer at {args.writer_rate:g} writes/s, "
        f"{args.runs} runs, {os.cpu_count()} CPUs shared with every PostgreSQL server",
        flush=True,
    )
    runs: list[Run] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_reshard_"))
    if args.keep:
        print(f"writer logs and command outputs in {tmp}")
    try:
        for number in range(1, args.runs + 1):
            run = one_run(number, args.rows, args.batch_size, args.writer_rate, tmp)
            show(run)
            runs.append(run)
    finally:
        reset()
        reseed_map()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    rate = statistics.median(r.copy_rate for r in runs)
    stall = statistics.median(r.stall_moving for r in runs)
    held = statistics.median(r.held_back for r in runs)
    print()
    print(f"Medians of {len(runs)} runs:")
    print(
        f"   rows copied {statistics.median(r.copied for r in runs):,.0f}, held_back_s "
        f"{held:.3f}, writes {statistics.median(r.writes for r in runs):,.0f}, longest write "
        f"of a moving key over the whole reshard "
        f"{statistics.median(r.max_moving for r in runs) * 1000:.0f} ms, of any key "
        f"{statistics.median(r.max_all for r in runs) * 1000:.0f} ms"
    )
    copy_ok = rate >= COPY_TARGET
    stall_ok = stall < STALL_TARGET
    print(
        f"1. copy rate {rate:,.0f} rows/s, target >= {COPY_TARGET:,.0f}: "
        f"{'met' if copy_ok else 'not met on this machine'}"
    )
    print(
        f"2. longest stall of a moving key's write at cutover {stall * 1000:.0f} ms, target "
        f"< {STALL_TARGET * 1000:.0f} ms: {'met' if stall_ok else 'not met on this machine'}"
    )
    failed = [name for name, ok in (("copy rate", copy_ok), ("cutover stall", stall_ok)) if not ok]
    print(f"Result: {'FAIL (' + ', '.join(failed) + ')' if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
