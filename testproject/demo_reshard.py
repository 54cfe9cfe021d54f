"""The resharding section of ``manage.py demo``: a shard group grows by one shard while written.

The ``ledgers`` group is declared in settings on shard0, shard1 and shard2, but its rows are
placed on shard0 and shard1 only: the section makes that two-shard ring the active one in the
shard map (what ``migrate`` recorded before someone added shard2 to ``SHARDS``). Then it

1. creates two colocated models (accounts, and entries pointing at them) on every shard of
   the group and inserts some thousands of rows;
2. starts a writer in a process of its own (it holds its own copy of the shard map, like any
   web worker) that inserts entries and updates balances of random accounts through the ORM,
   retries a write refused with :class:`~django_dbscale.sharding.ShardMoved`, and logs every
   committed write as a JSON line;
3. runs ``manage.py dbscale reshard ledgers --add shard2`` in this process and prints its
   progress lines;
4. stops the writer and proves with direct SQL on each shard (the harness's own connections,
   not the library) that every row exists exactly once, on the shard the new ring names, and
   that the data is exactly the initial rows plus the writer's log;
5. drops the tables and puts the shard map and the job table back as ``migrate`` left them.

The resharding engine moves the tables of the *installed* sharded models of a group (it
finds them in the app registry, as ``migrate`` does), so the two models are declared in the
live registry for the duration of the section and removed from it afterwards (the sharding
section's models live in a private registry: routing alone does not need the registry).

Run as a script (``python demo_reshard.py writer LOG STOP ACCOUNTS SEED``) this module is the
writer process.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from demo_support import expected, problem, progress, wrap
from django.apps import apps
from django.core.management import call_command
from django.db import connections, models
from django.db.models import F

from django_dbscale.conf import ShardGroupSpec, dbscale_settings
from django_dbscale.own_connections import connect
from django_dbscale.sharding import ShardedIDField, ShardMoved, get_ring, shardmap
from django_dbscale.sharding.ring import build_ring
from django_dbscale.sharding.routing import clear_spec_cache
from django_dbscale.testing.harness import get_services

HERE = Path(__file__).resolve().parent

GROUP = "ledgers"
OLD_SHARDS = ("shard0", "shard1")
NEW_SHARD = "shard2"
ACCOUNTS = 3000
ENTRIES_PER_ACCOUNT = 2
BATCH = 300
ACCOUNT_TABLE = "shop_demoaccount"
ENTRY_TABLE = "shop_demoentry"


# -- the models (declared in this process and in the writer's) ---------------------------------


def _declare_models() -> tuple[Any, Any]:
    """Declare the group's two models in the live app registry and return them."""
    from django_dbscale.sharding.models import ShardedModel

    class DemoAccount(ShardedModel):
        shard_group = GROUP
        shard_key = "number"
        id = ShardedIDField(primary_key=True)
        number = models.BigIntegerField(unique=True)
        balance = models.BigIntegerField(default=0)

        class Meta:
            app_label = "shop"

    class DemoEntry(ShardedModel):
        shard_group = GROUP
        shard_key = "account"
        id = ShardedIDField(primary_key=True)
        account = models.ForeignKey(
            DemoAccount,
            models.CASCADE,
            to_field="number",
            db_column="account_number",
            related_name="entries",
        )
        amount = models.IntegerField()
        #: The writer's sequence number of the insert (negative: inserted before the move).
        writer_seq = models.BigIntegerField()

        class Meta:
            app_label = "shop"

    return DemoAccount, DemoEntry


@contextmanager
def _installed_models() -> Iterator[tuple[Any, Any]]:
    """The section's models, installed in the live app registry until the block ends."""
    account_model, entry_model = _declare_models()
    try:
        yield account_model, entry_model
    finally:
        for model in (entry_model, account_model):
            apps.all_models["shop"].pop(model._meta.model_name, None)
        apps.clear_cache()
        clear_spec_cache((account_model, entry_model))


# -- the writer process ------------------------------------------------------------------------


def _writer(log_path: str, stop_path: str, accounts: int, seed: int) -> None:
    """Until *stop_path* exists, write random accounts; log each committed write to *log_path*.

    Two threads, as in a threaded web worker: one inserts entries, the other updates
    balances. Lines: ``{"op": "entry", "account", "seq", "amount", "t", "d"}`` (an insert),
    ``{"op": "balance", "account", "delta", "t", "d"}`` (an update), ``{"op": "retry",
    "account", "error"}`` (a write a shard refused with ShardMoved because its key had moved;
    then retried), and a last ``{"op": "summary", "writes"}``. ``t`` is when the write
    started (wall clock), ``d`` how long it took, retries included.
    """
    account_model, entry_model = _declare_models()
    lock = threading.Lock()
    writes = 0
    failed: list[BaseException] = []

    def loop(log: Any, op: str, rng: random.Random) -> None:
        nonlocal writes
        seq = 0
        try:
            while not os.path.exists(stop_path) and not failed:
                account = rng.randrange(accounts)
                amount = rng.randrange(1, 100)
                started, wall = time.monotonic(), time.time()
                for attempt in range(100):
                    try:
                        if op == "entry":
                            entry_model.objects.create(
                                account_id=account, amount=amount, writer_seq=seq + 1
                            )
                            seq += 1
                            record = {"op": op, "account": account, "seq": seq, "amount": amount}
                        else:
                            updated = account_model.objects.filter(number=account).update(
                                balance=F("balance") + amount
                            )
                            if updated != 1:
                                raise RuntimeError(f"account {account}: {updated} rows updated")
                            record = {"op": op, "account": account, "delta": amount}
                        break
                    except ShardMoved as exc:
                        retry = {"op": "retry", "account": account, "error": str(exc)}
                        with lock:
                            log.write(json.dumps(retry) + "\n")
                        time.sleep(0.01 * attempt)
                else:
                    raise RuntimeError(f"account {account}: refused 100 times")
                record.update(t=wall, d=time.monotonic() - started)
                with lock:
                    log.write(json.dumps(record) + "\n")
                    writes += 1
        except BaseException as exc:
            failed.append(exc)
            raise
        finally:
            connections.close_all()

    with open(log_path, "a", buffering=1) as log:
        threads = [
            threading.Thread(target=loop, args=(log, "entry", random.Random(seed)), daemon=True),
            threading.Thread(
                target=loop, args=(log, "balance", random.Random(seed + 1)), daemon=True
            ),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        log.write(json.dumps({"op": "summary", "writes": writes, "t": time.time()}) + "\n")
    if failed:
        sys.exit(1)


# -- the section -------------------------------------------------------------------------------


def run(out: Callable[[str], None]) -> str:
    """Print the resharding demo with *out* (one line per call); return its summary line."""
    problems: list[str] = []
    summary = ""
    _reset_group()
    try:
        with _installed_models() as (account_model, entry_model):
            for alias in (*OLD_SHARDS, NEW_SHARD):
                with connections[alias].schema_editor() as editor:
                    editor.create_model(account_model)
                    editor.create_model(entry_model)
            problems, summary = _show(out, account_model, entry_model)
    finally:
        _reset_group()
    if problems:
        raise RuntimeError("resharding demo: " + "; ".join(problems))
    return summary


def _reset_group() -> None:
    """Drop the section's tables and its jobs' traces; put back the ring ``migrate`` seeded."""
    from django_dbscale.models import ReshardJob

    jobs = list(
        ReshardJob.objects.using("default").filter(group=GROUP).values_list("id", flat=True)
    )
    for alias in (*OLD_SHARDS, NEW_SHARD):
        with connections[alias].cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {ENTRY_TABLE}, {ACCOUNT_TABLE}")
            cursor.execute("SELECT to_regclass('dbscale_moving') IS NOT NULL")
            (installed,) = cursor.fetchone()
            if installed:
                cursor.execute("DELETE FROM dbscale_moving WHERE shard_group = %s", [GROUP])
                cursor.execute("DELETE FROM dbscale_moving_changes WHERE job = ANY(%s)", [jobs])
    ReshardJob.objects.using("default").filter(id__in=jobs).delete()
    _place(dbscale_settings.shard_groups[GROUP])


def _place(spec: Any) -> None:
    """Make *spec* the group's active ring (the row ``migrate`` seeds from settings)."""
    with connect("default") as conn:
        conn.execute(f'DELETE FROM {shardmap.TABLE} WHERE "group" = %s', [GROUP])
        shardmap.seed(conn, {GROUP: spec})
    shardmap.refresh()


@dataclass
class _Shards:
    """What direct SQL found on the group's shards."""

    #: alias -> [(number, balance)] and [(id, account_number, writer_seq, amount)]
    accounts: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    entries: dict[str, list[tuple[int, int, int, int]]] = field(default_factory=dict)

    def state(self) -> dict[int, tuple[int, list[tuple[int, int]]]]:
        """Return number -> (balance, sorted (writer_seq, amount) of its entries)."""
        entries: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for rows in self.entries.values():
            for _id, number, seq, amount in rows:
                entries[number].append((seq, amount))
        return {
            number: (balance, sorted(entries.pop(number, [])))
            for rows in self.accounts.values()
            for number, balance in rows
        } | {number: (0, sorted(orphans)) for number, orphans in entries.items()}


def _read_shards(shards: tuple[str, ...]) -> _Shards:
    """Read the group's tables on each shard's primary with the harness's own connections."""
    services = get_services()
    found = _Shards()
    for alias in shards:
        server, dbname = services.alias_server(alias), services.alias_dbname(alias)
        found.accounts[alias] = [
            (int(n), int(b))
            for n, b in server.execute(
                f"SELECT number, balance FROM {ACCOUNT_TABLE}", dbname=dbname
            )
        ]
        found.entries[alias] = [
            (int(i), int(n), int(s), int(a))
            for i, n, s, a in server.execute(
                f"SELECT id, account_number, writer_seq, amount FROM {ENTRY_TABLE}", dbname=dbname
            )
        ]
    return found


def _show(
    out: Callable[[str], None], account_model: Any, entry_model: Any
) -> tuple[list[str], str]:
    """Populate, reshard under writes, verify; return the checks that failed and a summary."""
    services = get_services()
    declared = dbscale_settings.shard_groups[GROUP]
    all_shards = declared.shards
    _place(ShardGroupSpec(GROUP, OLD_SHARDS, {}, declared.vnodes))
    before_ring = shardmap.active(GROUP)
    assert before_ring is not None
    out(
        wrap(
            f"group {GROUP!r}: SHARD_GROUPS declares {list(all_shards)}, but its rows are placed "
            f"on {list(before_ring.spec.shards)} (the shard map's active ring, version "
            f"{before_ring.version}: what migrate recorded before {NEW_SHARD} was added to SHARDS)"
        )
    )
    progress(
        out,
        f"inserting {ACCOUNTS:,} accounts and {ACCOUNTS * ENTRIES_PER_ACCOUNT:,} entries "
        "(bulk_create, split by shard)",
    )

    accounts = [account_model(number=n, balance=n) for n in range(ACCOUNTS)]
    account_model.objects.bulk_create(accounts, batch_size=1000)
    entries = [
        entry_model(account_id=n, amount=n % 97 + k, writer_seq=-(n * ENTRIES_PER_ACCOUNT + k + 1))
        for n in range(ACCOUNTS)
        for k in range(ENTRIES_PER_ACCOUNT)
    ]
    entry_model.objects.bulk_create(entries, batch_size=1000)
    before = _read_shards(all_shards)
    initial = before.state()
    out(
        wrap(
            f"inserted {ACCOUNTS:,} accounts and {len(entries):,} entries: "
            + ", ".join(
                f"{a} {len(before.accounts[a]) + len(before.entries[a]):,} rows" for a in all_shards
            )
        )
    )

    _reshard(out, "--status")
    _reshard(out, "--add", NEW_SHARD, "--plan")

    progress(
        out, "starting the writer process (it boots Django, then writes; waiting for 50 writes)"
    )
    with tempfile.TemporaryDirectory(prefix="dbscale-demo-") as tmp:
        log_path, stop_path, err_path = (Path(tmp) / n for n in ("writes.log", "stop", "err"))
        with open(err_path, "w") as err:
            writer = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "writer",
                    str(log_path),
                    str(stop_path),
                    str(ACCOUNTS),
                    "7",
                ],
                env={
                    **os.environ,
                    **services.env(),
                    "DJANGO_SETTINGS_MODULE": "testproject.settings",
                },
                stdout=err,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 60
            while _lines(log_path) < 50 and writer.poll() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("the writer process wrote nothing for 60 s")
                time.sleep(0.05)
            if writer.poll() is not None:
                raise RuntimeError(
                    f"the writer process exited with status {writer.returncode}:\n"
                    + err_path.read_text()
                )
            out(
                wrap(
                    f"writer process {writer.pid} started: random inserts and updates of the "
                    f"{ACCOUNTS:,} accounts through the ORM, each committed write logged"
                )
            )
            phases = _reshard(out, "--add", NEW_SHARD, "--batch-size", str(BATCH))
            finished = time.time()
        finally:
            progress(out, "stopping the writer process")
            stop_requested = time.time()
            stop_path.touch()
            try:
                writer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                writer.kill()
                writer.wait()
        records = [json.loads(line) for line in log_path.read_text().splitlines()]
        writer_output = err_path.read_text().strip()
        ended = next((r["t"] for r in records if r["op"] == "summary" and "t" in r), None)
        _writer_records(out, Path(f"{log_path}.records"), ended, stop_requested)

    shardmap.refresh()
    after_ring = shardmap.active(GROUP)
    assert after_ring is not None
    ring = get_ring(GROUP)
    out("")
    out(
        wrap(
            f"active ring now {list(after_ring.spec.shards)} (ring {after_ring.fingerprint}, "
            f"version {after_ring.version}); routing in this process: {list(ring.nodes)}"
        )
    )
    problems: list[str] = []
    if ring.fingerprint != build_ring(declared).fingerprint:
        problems.append("the active ring is not the one SHARD_GROUPS declares")
    if writer.returncode != 0:
        problems.append(f"the writer exited with status {writer.returncode}")
    if writer_output:
        problem(
            out,
            f"output of the writer process (asked to stop at {_clock(stop_requested)}, its "
            f"threads ended at {_clock(ended) if ended else '?'}):",
        )
        for line in writer_output.splitlines():
            out(f"    {line}")

    progress(out, "reading every row of both tables on each shard (direct SQL)")
    after = _read_shards(all_shards)
    problems += _prove(out, ring, before, after, initial, records)
    old_ring = build_ring(before_ring.spec)
    moving = {n for n in range(ACCOUNTS) if old_ring.node_for(str(n)) != ring.node_for(str(n))}
    _writes_table(out, records, phases, finished, moving)

    writes = [r for r in records if r["op"] in ("entry", "balance")]
    verdict = "nothing lost or duplicated" if not problems else "PROBLEMS FOUND"
    summary = (
        f"{GROUP} grown from {len(OLD_SHARDS)} to {len(all_shards)} shards online, "
        f"{len(moving):,} of {ACCOUNTS:,} accounts moved with their entries, "
        f"{len(writes):,} writes kept flowing, {verdict}"
    )
    out("")
    out(wrap(summary))
    return problems, summary


def _prove(
    out: Callable[[str], None],
    ring: Any,
    before: _Shards,
    after: _Shards,
    initial: dict[int, tuple[int, list[tuple[int, int]]]],
    records: list[dict[str, Any]],
) -> list[str]:
    """Print the checks on the data found by direct SQL; return the failed ones."""
    problems: list[str] = []
    out("\n  checked with direct SQL on each shard's primary (not through the library):")
    out(
        f"    {'shard':<8} {'accounts before':>16} {'after':>7} {'entries before':>16} {'after':>7}"
    )
    for alias in after.accounts:
        out(
            f"    {alias:<8} {len(before.accounts[alias]):>16,} {len(after.accounts[alias]):>7,} "
            f"{len(before.entries[alias]):>16,} {len(after.entries[alias]):>7,}"
        )
    total = [
        sum(len(rows) for rows in side.values())
        for side in (before.accounts, after.accounts, before.entries, after.entries)
    ]
    out(f"    {'total':<8} {total[0]:>16,} {total[1]:>7,} {total[2]:>16,} {total[3]:>7,}")

    numbers = Counter(n for rows in after.accounts.values() for n, _ in rows)
    ids = Counter(i for rows in after.entries.values() for i, *_ in rows)
    twice = sum(1 for c in numbers.values() if c > 1) + sum(1 for c in ids.values() if c > 1)
    misplaced = sum(
        1
        for alias, rows in after.accounts.items()
        for n, _ in rows
        if ring.node_for(str(n)) != alias
    ) + sum(
        1
        for alias, rows in after.entries.items()
        for _, n, *_ in rows
        if ring.node_for(str(n)) != alias
    )
    verdict = "ok" if not twice and not misplaced else "FAILED"
    out(
        f"    every row exactly once, on the shard the new ring names: {verdict} "
        f"({len(numbers):,} accounts and {len(ids):,} entries; {twice} duplicated, "
        f"{misplaced} misplaced)"
    )
    if verdict != "ok":
        problems.append(f"{twice} duplicated and {misplaced} misplaced rows")

    expected = {n: (b, list(e)) for n, (b, e) in initial.items()}
    for record in records:
        if record["op"] == "entry":
            expected[record["account"]][1].append((record["seq"], record["amount"]))
        elif record["op"] == "balance":
            balance, rows = expected[record["account"]]
            expected[record["account"]] = (balance + record["delta"], rows)
    wanted = {n: (b, sorted(e)) for n, (b, e) in expected.items()}
    found = after.state()
    wrong = sorted(n for n in wanted.keys() | found.keys() if wanted.get(n) != found.get(n))
    logged = sum(1 for r in records if r["op"] in ("entry", "balance"))
    verdict = "ok" if not wrong else f"FAILED for accounts {wrong[:10]}"
    out(
        f"    data == initial rows + the writer's {logged:,} logged writes: {verdict} "
        "(balances and entries of every account)"
    )
    if wrong:
        problems.append(f"{len(wrong)} accounts differ from the writer's log")
    return problems


def _reshard(out: Callable[[str], None], *args: str) -> list[tuple[float, str]]:
    """Run ``manage.py dbscale reshard GROUP *args`` here, printing its output indented.

    Returns when each phase began (wall clock, phase name), from the command's progress lines.
    """
    phases = [(time.time(), "preflight")]

    def say(line: str) -> None:
        if line.startswith("phase "):
            phases.append((time.time(), line.removeprefix("phase ")))
        out(f"    {line}")

    out(f"\n  $ manage.py dbscale reshard {GROUP} {' '.join(args)}")
    call_command("dbscale", "reshard", GROUP, *args, stdout=_Lines(say))
    return phases


def _writes_table(
    out: Callable[[str], None],
    records: list[dict[str, Any]],
    phases: list[tuple[float, str]],
    finished: float,
    moving: set[int],
) -> None:
    """Print what the writer did during the move, from its log."""
    started = phases[0][0]
    writes = [r for r in records if r["op"] in ("entry", "balance")]
    during = [r for r in writes if started <= r["t"] <= finished]
    retries = [r for r in records if r["op"] == "retry"]
    out(
        f"    writes during the move ({finished - started:.1f} s): {len(during):,} "
        f"({sum(r['op'] == 'entry' for r in during):,} inserts, "
        f"{sum(r['op'] == 'balance' for r in during):,} updates; "
        f"{sum(r['account'] in moving for r in during):,} of them of moving keys); "
        f"{len(retries)} refused with ShardMoved and retried"
    )
    if writes:
        slow = max(writes, key=lambda r: r["d"])
        what = "an insert" if slow["op"] == "entry" else "an update"
        key = "a moving key" if slow["account"] in moving else "a key that stays"
        phase = next((name for at, name in reversed(phases) if at <= slow["t"]), "")
        when = f", begun in phase {phase}" if started <= slow["t"] <= finished else ""
        median = sorted(r["d"] for r in writes)[len(writes) // 2]
        out(
            f"    longest write stall: {slow['d'] * 1000:.0f} ms ({what} of {key}{when}); "
            f"median write {median * 1000:.1f} ms"
        )
    if retries:
        out("    first refusal the writer retried (ShardMoved, expected right after cutover):")
        for line in textwrap.wrap(retries[0]["error"], 96):
            out(f"      {line}")


class _RecordFile(logging.Handler):
    """The writer's log handler: each warning/error record as a JSON line in *path*.

    The file is never closed (only flushed): records emitted while the interpreter exits,
    after ``logging.shutdown``, are kept too.
    """

    def __init__(self, path: str) -> None:
        super().__init__(logging.WARNING)
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - open until the process ends

    def emit(self, record: logging.LogRecord) -> None:
        line = {
            "t": record.created,
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": self.format(record),
        }
        self.file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self.file.flush()
        super().close()


def _writer_records(
    out: Callable[[str], None], path: Path, ended: float | None, stop_requested: float
) -> None:
    """Print the writer's log records: expected when its exit caused them, else UNEXPECTED."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        record = json.loads(line)
        where = f"writer process, {_clock(record['t'])}, thread {record['thread']}"
        exiting = ended is not None and record["t"] >= ended
        if (
            exiting
            and record["logger"].startswith("django_dbscale.cache")
            and "Redis" in record["message"]
        ):
            expected(
                out,
                record["level"],
                "the writer process is exiting: its harness closed its Redis proxy",
                f"{record['message']} [{where}]",
            )
        else:
            problem(
                out,
                f"{record['level']} from {record['logger']} in the {where} (asked to stop at "
                f"{_clock(stop_requested)}): {record['message']}",
            )


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


class _Lines:
    """A file-like ``stdout`` for ``call_command`` that hands each complete line to *say*."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.say(line)
        return len(text)

    def flush(self) -> None:
        pass


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "writer":
        sys.exit(f"usage: {sys.argv[0]} writer LOG STOP ACCOUNTS SEED")
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    import django

    django.setup()
    # Warnings and errors go to LOG.records as JSON lines (the demo judges each), not stderr.
    logging.getLogger("django_dbscale").handlers.clear()
    logging.getLogger().addHandler(_RecordFile(sys.argv[2] + ".records"))
    logging.captureWarnings(True)
    _writer(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
