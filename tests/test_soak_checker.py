"""The soak's checker (soak/checker.py) catches each planted defect and passes a clean log.

No services: a synthetic run (operation log, fault log, database rows) is checked as the
soak runner checks a real one. Each test plants one defect and asserts the exact finding.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from soak import checker
from soak.checker import Rows

META: dict[str, Any] = {
    "placement": {"1": "shard1", "2": "shard0"},
    "alias_server": {"default": "pg1", "shard0": "pg1", "shard1": "pg2", "shard2": "pg2"},
    "replica_server": {"pg1": "pg1_replica", "pg2": "pg2_replica"},
}


def write(user: int, kind: str, value: int, t0: float, ok: bool = True, db: str = "") -> dict:
    home = META["placement"][str(user)] if kind == "counter" else "default"
    return {
        "op": "write",
        "user": user,
        "kind": kind,
        "target": user,
        "value": value,
        "t0": t0,
        "t1": t0 + 0.01,
        "ok": ok,
        "status": 200 if ok else 503,
        "db": (db or home) if ok else None,
        "lsn": 100 + value if ok else None,
        "error": None if ok else "OperationalError: down",
    }


def read(
    user: Any,
    mode: str,
    kind: str,
    target: int,
    t0: float,
    values: list[tuple[int | None, bool, bool]],
    floor: int | None = None,
    ok: bool = True,
) -> dict:
    """*values*: (value, cached, hit) per read of the request."""
    return {
        "op": "read",
        "user": user,
        "mode": mode,
        "kind": kind,
        "target": target,
        "seq": "".join("c" if cached else "u" for _, cached, _ in values),
        "floor": floor,
        "t0": t0,
        "t1": t0 + 0.01,
        "ok": ok,
        "status": 200 if ok else 503,
        "reads": [
            {"value": v, "db": "x", "cached": c, "hit": h, "reason": "hit" if h else None}
            for v, c, h in values
        ],
        "error": None if ok else "OperationalError: boom",
    }


def clean_run() -> tuple[list[dict], list[dict], Rows]:
    ops = [
        read(1, "own", "counter", 1, 0.5, [(None, False, False)]),
        write(1, "counter", 1, 1.0),
        write(1, "counter", 2, 2.0),
        write(2, "note", 1, 2.5),
        read(1, "own", "counter", 1, 3.0, [(2, False, False), (2, True, True)]),
        read(2, "token", "counter", 1, 3.1, [(2, True, True), (2, False, False)], floor=2),
        read("worker", "worker", "note", 2, 3.2, [(1, False, False)], floor=1),
        read(2, "peer", "counter", 1, 3.3, [(2, True, True)]),
        # pg2 (shard1, user 1's counter) is down from 10 to 15: a failed write and a failed
        # read while its replica is faulted too are not violations.
        write(1, "counter", 3, 11.0, ok=False),
        read(1, "own", "counter", 1, 12.0, [], ok=False),
        write(1, "counter", 4, 20.0),
        read(1, "own", "counter", 1, 21.0, [(4, True, False), (4, True, True)]),
    ]
    faults = [
        {"fault": "shard_server_stopped", "affects": ["pg2"], "t0": 10.0, "t1": 15.0},
        {"fault": "replica_cut", "affects": ["pg2_replica"], "t0": 11.5, "t1": 13.0},
    ]
    rows = Rows(
        ledger={
            "counter": {
                "shard0": Counter(),
                "shard1": Counter({(1, 1): 1, (1, 2): 1, (1, 4): 1}),
                "shard2": Counter(),
            },
            "note": {"default": Counter({(2, 1): 1})},
        },
        values={"counter": {1: 4}, "note": {2: 1}},
    )
    return ops, faults, rows


def findings(ops: list[dict], faults: list[dict], rows: Rows) -> list[tuple[str, str]]:
    report = checker.check(ops, faults, META, rows)
    return [(finding.kind, finding.detail) for finding in report.findings]


def test_clean_log_passes():
    ops, faults, rows = clean_run()
    report = checker.check(ops, faults, META, rows)
    assert report.findings == []
    assert report.ok
    assert report.counts["operations"] == 12
    assert report.counts["errors_primary_down (write)"] == 1
    assert report.counts["errors_primary_down (read)"] == 1
    assert report.counts["cache hits"] == 4
    assert report.counts["cache misses/bypasses"] == 1
    assert "result: PASS" in report.table()


def test_read_older_than_own_acknowledged_write_is_a_ryw_violation():
    ops, faults, rows = clean_run()
    ops.append(read(1, "own", "counter", 1, 4.0, [(1, False, False)]))
    assert findings(ops, faults, rows) == [("ryw", "read 1 < floor 2 (read #0)")]


def test_token_read_older_than_the_token_is_a_token_violation():
    ops, faults, rows = clean_run()
    ops.append(read(2, "token", "counter", 1, 4.0, [(1, False, False)], floor=2))
    ops.append(read("worker", "worker", "note", 2, 4.1, [(None, False, False)], floor=1))
    assert findings(ops, faults, rows) == [
        ("token", "read 1 < floor 2 (read #0)"),
        ("token", "read 0 < floor 1 (read #0)"),
    ]


def test_cached_read_going_back_after_an_uncached_one_is_a_monotonic_violation():
    ops, faults, rows = clean_run()
    # A peer read (no floor): only monotonic reads within the request apply.
    ops.append(read(2, "peer", "counter", 1, 0.0, [(2, False, False), (1, True, False)]))
    assert findings(ops, faults, rows) == [
        (
            "monotonic",
            "read #1 (cached) returned 1 after 2 in the same context"
            " (the write of 2 was still in flight: acknowledged after the read)",
        )
    ]


def test_hit_older_than_an_acknowledged_write_is_a_stale_cached_read():
    ops, faults, rows = clean_run()
    ops.append(read(2, "peer", "counter", 1, 2.5, [(1, True, True)]))
    assert findings(ops, faults, rows) == [
        ("stale_cached", "hit returned 1; 2 was acknowledged before the read")
    ]


def test_a_miss_older_than_an_acknowledged_write_is_not_a_stale_cached_read():
    ops, faults, rows = clean_run()
    ops.append(read(2, "peer", "counter", 1, 2.5, [(1, True, False)]))  # replica lag: allowed
    assert findings(ops, faults, rows) == []


def test_acknowledged_write_missing_from_every_database_is_lost():
    ops, faults, rows = clean_run()
    del rows.ledger["counter"]["shard1"][(1, 2)]
    assert findings(ops, faults, rows) == [("lost", "counter (1, 2) is on no database")]


def test_row_below_its_last_acknowledged_write_is_lost():
    ops, faults, rows = clean_run()
    rows.values["counter"][1] = 2
    assert findings(ops, faults, rows) == [
        ("lost", "counter row of user 1 holds 2, acknowledged 4")
    ]


def test_ledger_row_present_twice_is_duplicated():
    ops, faults, rows = clean_run()
    rows.ledger["note"]["default"][(2, 1)] = 2
    assert findings(ops, faults, rows) == [("duplicated", "note (2, 1) present 2 times")]


def test_write_on_the_wrong_shard_is_misplaced():
    ops, faults, rows = clean_run()
    rows.ledger["counter"]["shard2"][(1, 4)] = 1
    del rows.ledger["counter"]["shard1"][(1, 4)]
    ops[10] = write(1, "counter", 4, 20.0, db="shard2")
    assert findings(ops, faults, rows) == [
        ("misplaced", "acknowledged by shard2, not shard1"),
        ("misplaced", "counter (1, 4) found on ['shard2']"),
    ]


def test_error_while_the_primary_is_up_is_a_violation():
    ops, faults, rows = clean_run()
    ops.append(read(2, "own", "note", 2, 12.0, [], ok=False))  # pg1 (default) is up
    ops.append(write(1, "counter", 5, 30.0, ok=False))  # after pg2's fault and its grace
    assert findings(ops, faults, rows) == [
        ("error_primary_up", "read failed with pg1 up"),
        ("error_primary_up", "write failed with pg2 up"),
    ]


def test_read_error_while_the_primary_is_down_and_its_replica_up_is_a_violation():
    ops, faults, rows = clean_run()
    ops.append(read(1, "own", "counter", 1, 10.5, [], ok=False))  # before the replica cut
    assert findings(ops, faults, rows) == [
        (
            "read_error_replica_could_serve",
            "read failed 0.50s into pg2's outage with pg2_replica up",
        )
    ]


def test_read_error_past_the_replica_grace_of_an_outage_is_counted_not_a_violation():
    ops, faults, rows = clean_run()
    # pg2 went down at 10; the library serves from its replica for MAX_REPLICA_LAG (5) s.
    ops.append(read(1, "own", "counter", 1, 15.5, [], ok=False))
    report = checker.check(ops, faults, {**META, "max_replica_lag": 5.0}, rows)
    assert report.findings == []
    assert report.counts["errors_primary_down (read, after the grace)"] == 1


def test_errors_within_the_grace_period_after_a_fault_count_against_it():
    ops, faults, rows = clean_run()
    ops.append(write(1, "counter", 5, 15.0 + checker.GRACE - 0.5, ok=False))
    assert findings(ops, faults, rows) == []


def test_table_lists_every_violation_kind_and_fails(tmp_path: Path):
    ops, faults, rows = clean_run()
    ops.append(read(1, "own", "counter", 1, 4.0, [(1, False, False)]))
    report = checker.check(ops, faults, META, rows)
    table = report.table()
    for kind in checker.VIOLATIONS:
        assert kind in table
    assert f"  {'ryw':<44} {1:>9}" in table
    assert "result: FAIL" in table
    assert not report.ok


def test_check_dir_reads_the_run_directory_the_runner_writes(tmp_path: Path):
    ops, faults, _ = clean_run()
    planted = copy.deepcopy(ops)
    planted.append(read(1, "own", "counter", 1, 4.0, [(1, False, False)]))
    users = {1: [], 2: []}
    worker = []
    for op in planted:
        (worker if op["user"] == "worker" else users[op["user"]]).append(op)
    for user, records in users.items():
        text = "".join(json.dumps(r) + "\n" for r in records)
        (tmp_path / f"user-{user}.jsonl").write_text(text + '{"torn li')
    (tmp_path / "worker.jsonl").write_text("".join(json.dumps(r) + "\n" for r in worker))
    (tmp_path / "faults.jsonl").write_text("".join(json.dumps(f) + "\n" for f in faults))
    (tmp_path / "run.json").write_text(json.dumps(META))
    report = checker.check_dir(tmp_path, sql=False)
    assert report.counts["operations"] == 13
    assert [(f.kind, f.detail) for f in report.findings] == [("ryw", "read 1 < floor 2 (read #0)")]
    assert checker.main([str(tmp_path), "--no-sql"]) == 1


@pytest.mark.parametrize("kind", checker.VIOLATIONS)
def test_every_violation_kind_is_defined_in_the_checker_docstring(kind: str):
    assert f"``{kind}``" in (checker.__doc__ or "")


def test_check_dir_uses_the_rows_the_run_saved(tmp_path: Path):
    ops, faults, rows = clean_run()
    (tmp_path / "user-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ops))
    (tmp_path / "faults.jsonl").write_text("".join(json.dumps(f) + "\n" for f in faults))
    (tmp_path / "run.json").write_text(json.dumps(META))
    checker._save_rows(rows, tmp_path / "rows.json")
    assert checker.check_dir(tmp_path, sql=False).findings == []
    rows.ledger["counter"]["shard1"][(1, 1)] = 2  # planted in the saved rows
    checker._save_rows(rows, tmp_path / "rows.json")
    found = checker.check_dir(tmp_path, sql=False).findings
    assert [(f.kind, f.detail) for f in found] == [("duplicated", "counter (1, 1) present 2 times")]


def test_ci_schedule_plays_each_short_fault_in_60_seconds_and_full_adds_the_rest():
    from soak import faults

    assert [f.name for f in faults.plan(60, full=False)] == [
        "replica_cut",
        "replay_held",
        "redis_killed_restarted_empty",
        "replica_killed",
    ]
    assert [f.name for f in faults.plan(115, full=True)] == [f.name for f in faults.FULL]
    assert len(faults.plan(900, full=True)) > 2 * len(faults.FULL)  # the cycle repeats
    sentinel = [f.name for f in faults.plan(115, full=True, sentinel=True)]
    assert "redis_sentinel_failover" in sentinel
    assert "redis_master_killed" in sentinel
    assert not {"redis_cut", "redis_killed_restarted_empty"} & set(sentinel)


def test_a_hit_in_a_concurrent_writes_commit_window_is_counted_not_a_violation():
    ops, faults, rows = clean_run()
    # User 1's write of 2 is acknowledged at 2.01; this request began before, read 2
    # uncached (committed), then hit the entry of 1 (the invalidation not in Redis yet).
    ops.append(read(2, "peer", "counter", 1, 1.995, [(2, False, False), (1, True, True)]))
    report = checker.check(ops, faults, META, rows)
    assert [(f.kind, f.detail) for f in report.findings] == []
    assert report.counts[checker.WINDOW] == 1


def test_a_hit_older_than_an_earlier_read_of_an_acknowledged_write_is_a_violation():
    ops, faults, rows = clean_run()
    ops.append(read(2, "peer", "counter", 1, 2.5, [(2, False, False), (1, True, True)]))
    kinds = [f.kind for f in checker.check(ops, faults, META, rows).findings]
    assert kinds == ["monotonic", "stale_cached"]


def test_promotion_schedule_begins_each_cycle_with_the_switchover():
    from soak import faults

    promoted = [f.name for f in faults.plan(120, full=True, promotion=True)]
    assert promoted == ["primary_promoted"] + [f.name for f in faults.FULL]
    assert [f.name for f in faults.plan(30, full=False, promotion=True)] == ["primary_promoted"]
    assert faults.plan(900, full=True, promotion=True).count(faults.PRIMARY_PROMOTED) > 2
    assert faults.PRIMARY_PROMOTED not in faults.plan(900, full=True)  # only with the flag


# The run.json of ``--promotion``: ``default`` lives on the failover cluster, not on pg1.
PROMOTION_META: dict[str, Any] = {
    **META,
    "alias_server": {**META["alias_server"], "default": "pg_failover"},
    "replica_server": {**META["replica_server"], "pg_failover": "pg_failover_replica"},
}


def test_errors_on_default_during_the_switchover_count_against_the_failover_cluster():
    ops, faults, rows = clean_run()
    faults.append({"fault": "primary_promoted", "affects": ["pg_failover"], "t0": 30.0, "t1": 36.0})
    faults.append({"fault": "primary_restart", "affects": ["pg1"], "t0": 40.0, "t1": 45.0})
    ops.append(write(2, "note", 2, 30.5, ok=False))  # default's primary is shut down
    ops.append(read(2, "own", "note", 2, 35.0, [], ok=False))  # past the replica's grace
    ops.append(write(2, "note", 3, 41.0, ok=False))  # pg1 restarts: default is elsewhere
    ops.append(write(2, "counter", 1, 41.5, ok=False))  # user 2's counter is on shard0/pg1
    report = checker.check(ops, faults, PROMOTION_META, rows)
    assert [(f.kind, f.detail) for f in report.findings] == [
        ("error_primary_up", "write failed with pg_failover up")
    ]
    # The clean run's, the note during the switchover, the counter during pg1's restart.
    assert report.counts["errors_primary_down (write)"] == 3
    assert report.counts["errors_primary_down (read, after the grace)"] == 1
