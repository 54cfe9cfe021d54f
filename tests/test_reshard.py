"""Online resharding of the ``ledgers`` group, grown from shard0+shard1 to shard0+shard1+shard2.

Real PostgreSQL: shard0 on one server, shard1 and shard2 on another; the group shares these
databases with ``customers`` and ``tenants``, whose rows must not move. Every assertion on
placement reads each shard with direct SQL.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg.types.json
import pytest
from django.conf import settings
from django.core.checks import run_checks
from django.core.management import call_command
from django.db.models import F
from django.test import override_settings

from django_dbscale import consistency, replicas
from django_dbscale.conf import ShardGroupSpec, dbscale_settings
from django_dbscale.consistency import read_at_least
from django_dbscale.own_connections import connect
from django_dbscale.sharding import ShardMoved, shardmap
from django_dbscale.sharding import moves as mv
from django_dbscale.sharding import reshard as reshard_mod
from django_dbscale.sharding.ids import install_shard_functions
from django_dbscale.sharding.keys import ring_key
from django_dbscale.sharding.ring import build_ring, get_ring
from django_dbscale.testing.harness import Services, get_services
from tests.testapp.models_reshard import LedgerAccount, LedgerEntry, LedgerLabel

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

ROOT = Path(__file__).resolve().parent.parent
GROUP = "ledgers"
OLD = ShardGroupSpec(GROUP, ("shard0", "shard1"), {}, 8)
NEW = ShardGroupSpec(GROUP, ("shard0", "shard1", "shard2"), {}, 8)
SHARDS = ("shard0", "shard1", "shard2")
TABLES = (
    "testapp_ledgeraccount",
    "testapp_ledgerentry",
    "testapp_ledgerlabel",
    "testapp_ledgerentry_labels",
)


def place_map(spec: ShardGroupSpec) -> None:
    """Make *spec* the group's active ring, as ``migrate`` recorded it before ``SHARDS`` was
    edited: the map's row, and the shards' ring stamps for the group."""
    with connect("default") as conn:
        conn.execute(f'DELETE FROM {shardmap.TABLE} WHERE "group" = %s', [GROUP])
        conn.execute(
            f'INSERT INTO {shardmap.TABLE} ("group", version, shards, vnodes, fingerprint, '
            "floors) VALUES (%s, 1, %s, %s, %s, '{}')",
            [
                GROUP,
                psycopg.types.json.Jsonb(shardmap.spec_to_json(spec)),
                spec.vnodes,
                build_ring(spec).fingerprint,
            ],
        )
    shardmap.refresh()
    for alias in SHARDS:
        install_shard_functions(alias, group=GROUP, restamp=True, force=True)


def clear_guards() -> None:
    for alias in SHARDS:
        with connect(alias) as conn:
            for table in TABLES:
                conn.execute(f"DROP TRIGGER IF EXISTS dbscale_moving_guard ON {table}")
            for table in ("dbscale_moving", "dbscale_moving_changes"):
                conn.execute(
                    "DO $$ BEGIN IF to_regclass(%s) IS NOT NULL THEN "
                    f"EXECUTE 'TRUNCATE {table}'; END IF; END $$".replace("%s", f"'{table}'")
                )


@pytest.fixture
def ledgers() -> Iterator[None]:
    clear_guards()
    place_map(OLD)
    yield
    clear_guards()
    place_map(NEW)


def rows_by_shard(table: str, column: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for alias in SHARDS:
        with connect(alias) as conn:
            out[alias] = [r[0] for r in conn.execute(f"SELECT {column} FROM {table} ORDER BY 1")]
    return out


def reshard(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``manage.py dbscale reshard`` in its own process, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "django", "dbscale", "--skip-checks", "reshard", GROUP, *args],
        cwd=ROOT,
        env={
            **os.environ,
            **get_services().env(),
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def populate(accounts: int = 300) -> dict[int, tuple[int, list[int]]]:
    """Create accounts 0..n-1 (balance n) with one entry each; return number -> state."""
    for n in range(accounts):
        account = LedgerAccount.objects.create(number=n, balance=n)
        LedgerEntry.objects.create(account=account, amount=n, writer_seq=-n - 1)
    return snapshot()


def snapshot() -> dict[int, tuple[int, list[int]]]:
    """Read every shard directly: number -> (balance, sorted entry writer_seqs).

    Fails if a row exists twice or lives on a shard the active ring does not name for it.
    """
    ring = get_ring(GROUP)
    state: dict[int, tuple[int, list[int]]] = {}
    entries: dict[int, list[int]] = {}
    seen_entries: set[int] = set()
    for alias in SHARDS:
        with connect(alias) as conn:
            for number, balance in conn.execute(
                "SELECT number, balance FROM testapp_ledgeraccount"
            ):
                assert number not in state, f"account {number} twice (again on {alias})"
                assert ring.node_for(str(number)) == alias, f"account {number} on {alias}"
                state[number] = (balance, [])
            for entry_id, number, seq in conn.execute(
                "SELECT id, account_number, writer_seq FROM testapp_ledgerentry"
            ):
                assert entry_id not in seen_entries, f"entry {entry_id} twice"
                seen_entries.add(entry_id)
                assert ring.node_for(str(number)) == alias, f"entry of {number} on {alias}"
                entries.setdefault(number, []).append(seq)
    return {n: (b, sorted(entries.get(n, []))) for n, (b, _) in state.items()}


def placement() -> dict[str, int]:
    """Rows per shard (accounts)."""
    return {
        alias: len(numbers)
        for alias, numbers in rows_by_shard("testapp_ledgeraccount", "number").items()
    }


def test_adding_a_shard_moves_its_keys_and_routing_follows(ledgers: None) -> None:
    assert get_ring(GROUP).nodes == ("shard0", "shard1")
    before = populate()
    moved = next(n for n in range(300) if build_ring(NEW).node_for(str(n)) == "shard2")
    label = LedgerLabel.objects.create(account_number=moved, name="bond")
    LedgerEntry.objects.for_key(moved).get(account_id=moved).labels.add(label)
    assert placement()["shard2"] == 0

    result = reshard("--add", "shard2", "--batch-size", "50")
    assert result.returncode == 0, result.stderr + result.stdout
    out = result.stdout
    for phase in ("preflight", "copy", "catchup", "verify", "cutover", "settle", "cleanup", "done"):
        assert f"phase {phase}" in out or phase == "preflight", out
    assert "rows/s" in out and "ETA" in out and "held back" in out

    shardmap.refresh()
    assert get_ring(GROUP).fingerprint == build_ring(NEW).fingerprint
    assert snapshot() == before  # every row once, on its new owner, unchanged
    counts = placement()
    assert 0 < counts["shard2"] < 300
    account = LedgerAccount.objects.get(number=moved)
    assert account.balance == moved and account._state.db in ("shard2", "shard2_replica")
    assert [e.amount for e in account.entries.all()] == [moved]
    labels = rows_by_shard("testapp_ledgerlabel", "account_number")
    assert labels[build_ring(NEW).node_for(str(moved))] == [moved]
    assert sum(len(v) for v in labels.values()) == 1
    label = LedgerLabel.objects.get(account_number=moved)
    assert label.name == "bond"
    # The many-to-many link rows moved with their entries (no key of their own).
    links = rows_by_shard("testapp_ledgerentry_labels", "ledgerlabel_id")
    assert links == {"shard0": [], "shard1": [], "shard2": [label.pk]}
    assert [e.amount for e in label.entries.all()] == [moved]
    # A rerun of the same command finds nothing left to do.
    again = reshard("--add", "shard2")
    assert again.returncode != 0 and "already a shard" in again.stderr
    again = reshard()
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr


#: Where the command is killed (os._exit, like kill -9), in order: each rerun resumes the
#: job in the phase the previous run died in and is killed again further on.
CRASH_CHAIN = (
    "preflight",
    "copy:2",
    "catchup",
    "verify",
    "cutover",
    "cutover:1",
    "settle",
    "cleanup:1",
)


def test_a_reshard_killed_in_every_phase_while_another_process_writes_loses_nothing(
    ledgers: None, tmp_path: Path
) -> None:
    before = populate(200)
    log, stop = tmp_path / "writer.log", tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.reshard_writer", str(log), str(stop), "200", "7"],
        cwd=ROOT,
        env={**os.environ, **get_services().env(), "DJANGO_SETTINGS_MODULE": "tests.settings"},
    )
    phases = []
    try:
        deadline = time.monotonic() + 30
        while (
            not log.exists() or log.read_text().count("\n") < 50
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        for crash_at in CRASH_CHAIN:
            killed = reshard(
                "--add", "shard2", "--batch-size", "20", env={"DBSCALE_RESHARD_CRASH_AT": crash_at}
            )
            assert killed.returncode == 70, (crash_at, killed.stderr + killed.stdout)
            status = reshard("--status", "--json")
            job = json.loads(status.stdout)["job"]
            assert job["finished_at"] is None
            phases.append(job["phase"])
        done = reshard("--add", "shard2", "--batch-size", "20")
        assert done.returncode == 0, done.stderr + done.stdout
        assert "resuming job" in done.stdout
        assert "misplaced rows found by the audit: 0" in done.stdout
        time.sleep(0.5)  # the writer keeps writing after the move, on the new placement
    finally:
        stop.touch()
        writer.wait(timeout=30)
    assert phases == [
        "preflight",
        "copy",
        "catchup",
        "verify",
        "cutover",
        "cutover",
        "settle",
        "cleanup",
    ]
    assert writer.returncode == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    summary = records[-1]
    assert summary["op"] == "summary" and summary["writes"] > 100, summary
    expected = {n: [b, list(seqs)] for n, (b, seqs) in before.items()}
    for record in records:
        if record["op"] == "entry":
            expected[record["account"]][1].append(record["seq"])
        elif record["op"] == "balance":
            expected[record["account"]][0] += record["delta"]
    shardmap.refresh()
    assert get_ring(GROUP).fingerprint == build_ring(NEW).fingerprint
    after = snapshot()  # every row once, on the shard the new ring names
    assert after == {n: (b, sorted(seqs)) for n, (b, seqs) in expected.items()}
    assert placement()["shard2"] > 0


@pytest.mark.parametrize("crash_at", ["verify", "settle"])
def test_rollback_before_cleanup_restores_the_old_placement(ledgers: None, crash_at: str) -> None:
    before = populate(200)
    killed = reshard(
        "--add", "shard2", "--batch-size", "20", env={"DBSCALE_RESHARD_CRASH_AT": crash_at}
    )
    assert killed.returncode == 70, killed.stderr + killed.stdout
    flipped = crash_at == "settle"
    shardmap.refresh()
    assert (get_ring(GROUP).fingerprint == build_ring(NEW).fingerprint) is flipped
    if flipped:  # written on the new placement after cutover: must come back
        moved = next(n for n in range(200) if build_ring(NEW).node_for(str(n)) == "shard2")
        LedgerAccount.objects.filter(number=moved).update(balance=10_000)
        LedgerEntry.objects.create(account_id=moved, amount=5, writer_seq=99)
        before[moved] = (10_000, sorted([*before[moved][1], 99]))
    result = reshard("--rollback")
    assert result.returncode == 0, result.stderr + result.stdout
    shardmap.refresh()
    assert get_ring(GROUP).fingerprint == build_ring(OLD).fingerprint
    assert snapshot() == before
    assert placement()["shard2"] == 0
    # Rolled back for good: the group can be resharded again from scratch.
    assert reshard("--status").stdout.count("UNFINISHED") == 0


def test_a_process_holding_the_old_map_cannot_write_a_moved_key_to_its_old_shard(
    ledgers: None,
) -> None:
    populate(100)
    moved = next(n for n in range(100) if build_ring(NEW).node_for(str(n)) == "shard2")
    old_home = build_ring(OLD).node_for(str(moved))
    stale = LedgerAccount.objects.get(number=moved)
    assert stale._state.db in (old_home, f"{old_home}_replica")
    shardmap._cache.next_check = float("inf")  # this process stops re-reading the map
    try:
        # Stopped right after cutover, before the old copies are deleted: the window in
        # which a process that has not re-read the map still finds the row on its old shard.
        killed = reshard("--add", "shard2", env={"DBSCALE_RESHARD_CRASH_AT": "settle"})
        assert killed.returncode == 70, killed.stderr + killed.stdout
        assert get_ring(GROUP).nodes == ("shard0", "shard1")  # still the old map here
        # The old shard itself refuses the moved key, whoever asks.
        with connect(old_home) as conn, pytest.raises(psycopg.Error) as refused:
            conn.execute("UPDATE testapp_ledgeraccount SET balance = 1 WHERE number = %s", [moved])
        assert refused.value.sqlstate == "DBSM1"
        assert "shard moved" in str(refused.value) and "shard2" in str(refused.value)
        # A link row has no key: the guard finds it through its entry, and refuses it too.
        with connect(old_home) as conn, pytest.raises(psycopg.Error) as link_refused:
            conn.execute(
                "INSERT INTO testapp_ledgerentry_labels (ledgerentry_id, ledgerlabel_id) "
                "SELECT id, 1 FROM testapp_ledgerentry WHERE account_number = %s",
                [moved],
            )
        assert link_refused.value.sqlstate == "DBSM1"
        assert "testapp_ledgerentry_labels" in str(link_refused.value)
        with pytest.raises(ShardMoved, match="now lives on shard shard2"):
            LedgerAccount.objects.filter(number=moved).update(balance=1)
    finally:
        shardmap._cache.next_check = 0.0
    # The refusal re-read the map: the row read before the move is refused too, by name.
    assert get_ring(GROUP).fingerprint == build_ring(NEW).fingerprint
    stale.balance = 2
    with pytest.raises(ShardMoved, match="Re-read the row"):
        stale.save()
    LedgerAccount.objects.filter(number=moved).update(balance=3)
    assert reshard("--add", "shard2").returncode == 0  # finishes the job
    with connect("shard2") as conn:
        assert conn.execute(
            "SELECT balance FROM testapp_ledgeraccount WHERE number = %s", [moved]
        ).fetchone() == (3,)
    with connect(old_home) as conn:
        assert conn.execute(
            "SELECT count(*) FROM testapp_ledgeraccount WHERE number = %s", [moved]
        ).fetchone() == (0,)
        # After cleanup the guard stays: an insert of the moved key is still refused there.
        with pytest.raises(psycopg.Error) as refused:
            conn.execute(
                "INSERT INTO testapp_ledgeraccount (id, number, balance) VALUES (1, %s, 0)",
                [moved],
            )
        assert refused.value.sqlstate == "DBSM1"


def test_an_insert_racing_the_cutover_is_retried_on_the_new_shard(ledgers: None) -> None:
    populate(50)
    moved = next(n for n in range(1000, 2000) if build_ring(NEW).node_for(str(n)) == "shard2")
    shardmap._cache.next_check = float("inf")
    try:
        assert reshard("--add", "shard2").returncode == 0
        account = LedgerAccount.objects.create(number=moved, balance=1)  # old map: old shard
    finally:
        shardmap._cache.next_check = 0.0
    assert account._state.db == "shard2"
    with connect("shard2") as conn:
        assert conn.execute(
            "SELECT balance FROM testapp_ledgeraccount WHERE number = %s", [moved]
        ).fetchone() == (1,)


@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_adding_one_shard_to_n_moves_about_one_in_n_plus_one(n: int) -> None:
    old = ShardGroupSpec(GROUP, tuple(f"s{i}" for i in range(n)), {}, 8)
    new = ShardGroupSpec(GROUP, tuple(f"s{i}" for i in range(n + 1)), {}, 8)
    moves = mv.moved_ranges(build_ring(old), build_ring(new))
    ideal = 1 / (n + 1)
    assert {target for _, target in moves} == {f"s{n}"}  # keys only move to the new shard
    assert abs(mv.moved_fraction(moves) - ideal) <= 0.2 * ideal
    # The ranges agree with the rings key by key.
    old_ring, new_ring = build_ring(old), build_ring(new)
    keys = [str(k) for k in range(20_000)]
    moved = [k for k in keys if old_ring.node_for(k) != new_ring.node_for(k)]
    assert abs(len(moved) / len(keys) - ideal) <= 0.2 * ideal
    for key in moved[:500]:
        point = int.from_bytes(hashlib.md5(key.encode()).digest()[:4], "little")
        pair = (old_ring.node_for(key), new_ring.node_for(key))
        assert any(lo <= point < hi for lo, hi in moves[pair])


def test_the_database_computes_the_same_ring_point_as_python() -> None:
    samples: list[Any] = [0, 7, -3, 2**62, "007", "+5", "-0", "Acme", "ÉCOLE", "a b", "42x"]
    samples += [uuid.UUID(int=i * 7919) for i in range(5)]
    samples += [str(uuid.UUID(int=12345)).upper(), "{" + str(uuid.UUID(int=99)) + "}"]
    samples += [str(uuid.UUID(int=5)).replace("-", ""), f"urn:uuid:{uuid.UUID(int=8)}"]
    with connect("shard0") as conn:
        conn.execute(mv.INSTALL_SQL)
        for value in samples:
            key = ring_key(value)
            expected = int.from_bytes(hashlib.md5(key.encode()).digest()[:4], "little")
            kind = "int" if isinstance(value, int) else "text"
            row = conn.execute(
                "SELECT dbscale_ring_point(CASE WHEN %s = 'int' THEN %s::text "
                "ELSE dbscale_ring_key(%s::text) END)",
                [kind, str(value), str(value)],
            ).fetchone()
            assert row == (expected,), (value, key)


def test_bad_input_is_refused_with_nothing_moved(ledgers: None) -> None:
    before = populate(30)
    cases = {
        ("--add", "nosuchdb"): "'nosuchdb' is not in DATABASES",
        ("--remove", "grow9"): "'grow9' is not a shard of group 'ledgers'",
        ("--remove", "shard0", "--remove", "shard1"): "Cannot remove the last shard",
        ("--weight", "shard0"): "write ALIAS=N",
        ("--weight", "shard0=0"): "weights are integers >= 1",
        ("--add", "default"): "give the new shard a database alias of its own",
        ("--add", "shard2_replica"): "is a replica of 'shard2'",
    }
    for args, message in cases.items():
        result = reshard(*args)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
    unknown = subprocess.run(
        [sys.executable, "-m", "django", "dbscale", "reshard", "nosuchgroup", "--add", "shard2"],
        cwd=ROOT,
        env={**os.environ, **get_services().env(), "DJANGO_SETTINGS_MODULE": "tests.settings"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert unknown.returncode == 1 and "'nosuchgroup' is not in" in unknown.stderr
    # A target without the group's tables (nobody ran migrate there for the group).
    with connect("shard2") as conn:
        conn.execute(
            "DROP TABLE testapp_ledgerentry_labels, testapp_ledgerentry, testapp_ledgeraccount, "
            "testapp_ledgerlabel"
        )
    try:
        missing = reshard("--add", "shard2")
        assert missing.returncode == 1
        assert "shard 'shard2' has no table 'testapp_ledgeraccount'" in missing.stderr
        assert "manage.py migrate --database shard2" in missing.stderr
        assert "Nothing was changed" in missing.stderr
    finally:
        call_command("migrate", database="shard2", run_syncdb=True, verbosity=0)
    assert snapshot() == before and placement()["shard2"] == 0
    assert get_ring(GROUP).nodes == ("shard0", "shard1")
    with connect("shard0") as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'dbscale_moving_guard'"
        ).fetchone() == (0,)


def test_a_second_reshard_of_the_group_is_refused_while_one_is_unfinished(ledgers: None) -> None:
    populate(30)
    killed = reshard("--add", "shard2", env={"DBSCALE_RESHARD_CRASH_AT": "verify"})
    assert killed.returncode == 70
    other = reshard("--weight", "shard0=3")
    assert other.returncode == 1
    assert "unfinished resharding (job #" in other.stderr and "--rollback" in other.stderr
    # While a command runs, a second one is refused (the job lock on default).
    resharder = reshard_mod.Resharder(GROUP)
    with resharder.running():
        busy = reshard("--add", "shard2")
    assert (
        busy.returncode == 1 and "Another resharding of group 'ledgers' is running" in busy.stderr
    )
    assert reshard("--add", "shard2").returncode == 0


def test_plan_shows_what_moves_and_moves_nothing(ledgers: None) -> None:
    populate(120)
    result = reshard("--add", "shard2", "--plan", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    expected = sum(
        1
        for n in range(120)
        if build_ring(NEW).node_for(str(n)) != build_ring(OLD).node_for(str(n))
    )
    accounts = sum(r["rows"] for r in plan["rows"] if r["model"] == "testapp.LedgerAccount")
    assert accounts == expected and plan["total_rows"] == 2 * expected
    assert {m["to"] for m in plan["moves"]} == {"shard2"}
    assert plan["estimated_bytes_per_target"]["shard2"] > 0
    assert abs(plan["key_space_moved"] - 1 / 3) < 1 / 15
    # Settings ahead of the map: a warning on the databases' checks (migrate shows it).
    (warning,) = [m for m in run_checks(databases=["default"]) if m.id == "dbscale.W103"]
    assert "placed on ['shard0', 'shard1']" in warning.msg
    assert "declares ['shard0', 'shard1', 'shard2']" in warning.msg
    assert "manage.py dbscale reshard ledgers" in (warning.hint or "")
    text = reshard("--add", "shard2", "--plan")
    assert "rows to move" in text.stdout and "copy takes about" in text.stdout
    assert "shard2 receives about" in text.stdout
    assert placement()["shard2"] == 0 and get_ring(GROUP).nodes == ("shard0", "shard1")


def test_replicas_of_the_new_shard_serve_moved_keys_only_after_the_cutover(
    ledgers: None, services: Services, paused: Any
) -> None:
    populate(60)
    moved = next(n for n in range(60) if build_ring(NEW).node_for(str(n)) == "shard2")
    with consistency.consistency_context():
        LedgerAccount.objects.filter(number=moved).update(balance=-5)
        token = consistency.consistency_token()  # taken before the move, on the old shard
    paused(services.pg2_replica)  # shard2's replica stops replaying: it misses the copy
    # In this process: a new process attaching to the services waits for the replicas.
    call_command("dbscale", "reshard", GROUP, "--add", "shard2", stdout=io.StringIO())
    shardmap.refresh()
    floor = shardmap.active(GROUP).floors["shard2"]  # type: ignore[union-attr]
    assert consistency.placement_floor("shard2") == consistency.parse_lsn(floor)
    with consistency.consistency_context():
        replicas.route_counts.clear()
        account = LedgerAccount.objects.get(number=moved)
        assert (account.balance, account._state.db) == (-5, "shard2")
        assert replicas.route_counts[("shard2", "resharded")] == 1
    with read_at_least(token):  # a token from before the move is still honoured
        assert LedgerAccount.objects.get(number=moved).balance == -5
    services.pg2_replica.resume_replay()
    services.pg2_replica.wait_for_replay()
    replicas.monitor.reset()
    with consistency.consistency_context():
        account = LedgerAccount.objects.get(number=moved)
        assert (account.balance, account._state.db) == (-5, "shard2_replica")


def test_no_cached_result_from_before_the_move_is_served(ledgers: None) -> None:
    populate(60)
    moved = next(n for n in range(60) if build_ring(NEW).node_for(str(n)) == "shard2")
    cache = {**settings.DBSCALE["CACHE"], "MODELS": ["testapp.LedgerAccount"]}
    with override_settings(DBSCALE={**settings.DBSCALE, "CACHE": cache}):
        place_map(OLD)
        query = LedgerAccount.objects.cache().filter(number=moved)
        assert [a.balance for a in query.all()] == [moved]
        assert [a.balance for a in query.all()] == [moved]  # a hit, on the old shard
        assert reshard("--add", "shard2").returncode == 0
        shardmap.refresh()
        with connect("shard2") as conn:  # a write the ORM of this process did not see
            conn.execute(
                "UPDATE testapp_ledgeraccount SET balance = 1234 WHERE number = %s", [moved]
            )
        # Not the entry filled on the old shard before the move: the row on its new shard.
        assert [a.balance for a in query.all()] == [1234]
        LedgerAccount.objects.filter(number=moved).update(balance=F("balance") + 1)
        assert [a.balance for a in query.all()] == [1235]
        assert [a.balance for a in LedgerAccount.objects.cache().filter(number=moved)] == [1235]


def test_removing_a_shard_then_reweighting_moves_rows_between_the_others(ledgers: None) -> None:
    place_map(NEW)
    before = populate(150)
    assert all(placement()[alias] > 0 for alias in SHARDS)
    removed = reshard("--remove", "shard1")
    assert removed.returncode == 0, removed.stderr + removed.stdout
    shardmap.refresh()
    assert get_ring(GROUP).nodes == ("shard0", "shard2")
    assert snapshot() == before and placement()["shard1"] == 0
    # Settings that retire shard1 (weight 0, keeping its shard number) name the same ring.
    retired = ShardGroupSpec(GROUP, SHARDS, {"shard1": 0}, 8)
    assert build_ring(retired).fingerprint == get_ring(GROUP).fingerprint
    weighted = reshard("--weight", "shard0=3")
    assert weighted.returncode == 0, weighted.stderr + weighted.stdout
    shardmap.refresh()
    ring = get_ring(GROUP)
    assert ring.weights == {"shard0": 3, "shard2": 1}
    assert snapshot() == before
    counts = placement()
    assert counts["shard1"] == 0 and counts["shard0"] > 2 * counts["shard2"]
    # The second job replaced the first one's guards on the shards it touched; the removed
    # shard keeps refusing the keys it gave away, whoever writes there.
    jobs: set[int] = set()
    for alias in ("shard0", "shard2"):
        with connect(alias) as conn:
            jobs |= {r[0] for r in conn.execute("SELECT DISTINCT job FROM dbscale_moving")}
    assert len(jobs) == 1
    gone = next(n for n in range(150) if build_ring(NEW).node_for(str(n)) == "shard1")
    with connect("shard1") as conn, pytest.raises(psycopg.Error) as refused:
        conn.execute(
            "INSERT INTO testapp_ledgeraccount (id, number, balance) VALUES (1, %s, 0)", [gone]
        )
    assert refused.value.sqlstate == "DBSM1"


def test_a_process_follows_a_new_map_within_the_check_interval(ledgers: None) -> None:
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    assert get_ring(GROUP).nodes == ("shard0", "shard1")
    with connect("default") as conn:  # another process's cutover, as far as this one knows
        conn.execute(
            f"UPDATE {shardmap.TABLE} SET version = version + 1, shards = %s, fingerprint = %s "
            'WHERE "group" = %s',
            [
                psycopg.types.json.Jsonb(shardmap.spec_to_json(NEW)),
                build_ring(NEW).fingerprint,
                GROUP,
            ],
        )
    deadline = time.monotonic() + dbscale_settings.shard_map_check_interval
    with CaptureQueriesContext(connections["default"]) as queries:
        while get_ring(GROUP).nodes != NEW.shards:
            assert time.monotonic() < deadline + 0.1, "the map was not re-read in time"
            time.sleep(0.01)
    assert len(queries) == 0  # read on the library's own connection, not the caller's
    assert shardmap.active(GROUP).version == 2  # type: ignore[union-attr]


def test_settings_edited_before_the_map_existed_are_not_recorded_as_the_active_ring(
    ledgers: None, caplog: pytest.LogCaptureFixture
) -> None:
    populate(40)
    for alias in ("shard0", "shard1"):  # the shards say where their rows were placed: OLD
        install_shard_functions(alias, group=GROUP, restamp=True, force=True)
    with connect("default") as conn:  # an install from before the shard map...
        conn.execute(f'DELETE FROM {shardmap.TABLE} WHERE "group" = %s', [GROUP])
        # ...whose settings already declare shard2: migrate must not record that ring.
        assert shardmap.seed(conn, {GROUP: NEW}) == []
    assert "Not recording shard group 'ledgers'" in caplog.text
    shardmap.refresh()
    assert shardmap.active(GROUP) is None
    refused = reshard()
    assert refused.returncode == 1
    assert "has no row in the shard map yet" in refused.stderr
    assert "Restore the previous SHARDS, run `manage.py migrate`" in refused.stderr
    with connect("default") as conn:  # the fix: migrate with the old SHARDS records them
        assert shardmap.seed(conn, {GROUP: OLD}) == [GROUP]
    assert reshard().returncode == 0
    shardmap.refresh()
    assert get_ring(GROUP).fingerprint == build_ring(NEW).fingerprint
