"""Check a soak run: the operation logs against each other, the fault log and the databases.

``python -m soak.checker DIR`` (the runner calls :func:`check_dir` itself). Definitions
(``value`` is the row value a read returned, an absent row reading as 0; an *acknowledged*
write is one answered 200; times are the monotonic ``t0``/``t1`` of each operation):

``ryw``
    A user's read of its own row (any read of an ``own`` request, cached or not) returned
    less than the user's last write of that row acknowledged before the request began.
``token``
    A read made with another user's token (``token`` requests, and the background worker's
    ``read_at_least(token)`` jobs) returned less than the writer's last acknowledged write
    when it published that token.
``monotonic``
    Within one request or job (one consistency context), a read returned less than an
    earlier read of the same row: between uncached reads, cached reads, or either after the
    other. One case is counted apart (:data:`WINDOW`), not as a violation: a cache *hit*
    older than an earlier read whose value came from a write not yet acknowledged when the
    request began. That write had committed (a replica or the primary showed it) and its
    invalidation had not reached Redis yet: the commit-to-invalidation window that
    docs/consistency.md states as a limit.
``stale_cached``
    A cache hit returned less than the last write of that row acknowledged (to anyone)
    before the request began: the cache served an entry its invalidation should have
    retired.
``lost``
    An acknowledged write whose ledger row ``(user, seq)`` is on no database, or a row whose
    final value is below its last acknowledged write (direct SQL on every primary).
``duplicated``
    A ledger row ``(user, seq)`` present more than once, over all databases.
``misplaced``
    An acknowledged write answered from, or found on, a database other than the one the
    ring assigns the user (counters) or ``default`` (notes).
``error_primary_up``
    An operation that failed while the primary it depends on was up (no fault on that
    server overlapping it, with :data:`GRACE` seconds after each fault ends).
``read_error_replica_could_serve``
    A read that failed while its primary was down and its replica was not faulted, within
    ``MAX_REPLICA_LAG - REPLICA_CHECK_INTERVAL`` seconds of the outage's start (the primary
    last answered a probe up to one interval before): the replica had every write the
    primary had acknowledged, and the library promises to serve such reads from it for
    ``MAX_REPLICA_LAG`` seconds (docs/replicas.md, "While the primary is down"). Later
    failures are counted as ``errors_primary_down (read, after the grace)``: past the grace
    the library sends reads to the primary on purpose, to bound staleness.

Failed operations while the primary was down are counted (``errors_primary_down``), not
violations. Across requests, monotonic reads are held only as far as the library promises
them: through tokens (``ryw``, ``token``); a request that read a write which was never
acknowledged (its response was lost) may be followed by one that does not see it.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soak.oplog import read_jsonl

#: Seconds after a fault is healed during which errors still count against it.
GRACE = 2.0
VIOLATIONS = (
    "ryw",
    "token",
    "monotonic",
    "stale_cached",
    "lost",
    "duplicated",
    "misplaced",
    "error_primary_up",
    "read_error_replica_could_serve",
)
#: The count of cache hits older than an earlier read of the same context, where the newer
#: value's write was still in flight (not a violation: see ``monotonic`` above).
WINDOW = "hits in a concurrent write's commit-to-invalidation window"
#: The settings' ``MAX_REPLICA_LAG`` (soak.settings), when ``run.json`` does not name it.
MAX_REPLICA_LAG = 5.0
REPLICA_CHECK_INTERVAL = 0.5
#: The ledger and row tables of each kind (``soak.models``).
TABLES = {"counter": ("soak_counterentry", "soak_counter"), "note": ("soak_noteentry", "soak_note")}


@dataclass
class Rows:
    """What direct SQL found: ledger row counts per alias, and each row's final value."""

    ledger: dict[str, dict[str, Counter[tuple[int, int]]]] = field(default_factory=dict)
    values: dict[str, dict[int, int]] = field(default_factory=dict)

    def count(self, kind: str, alias: str, key: tuple[int, int]) -> int:
        return self.ledger.get(kind, {}).get(alias, Counter())[key]


@dataclass
class Finding:
    """One violation, with the log record(s) behind it."""

    kind: str
    detail: str
    record: dict[str, Any] | None = None


@dataclass
class Report:
    """Counts of operations and findings; ``ok`` when there is no violation."""

    counts: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)

    def add(self, kind: str, detail: str, record: dict[str, Any] | None = None) -> None:
        self.findings.append(Finding(kind, detail, record))

    def violations(self) -> Counter[str]:
        found = Counter(finding.kind for finding in self.findings)
        return Counter({kind: found[kind] for kind in VIOLATIONS})

    @property
    def ok(self) -> bool:
        return self.counts["operations"] > 0 and not self.findings

    def table(self, examples: int = 3) -> str:
        """Return the report as aligned text: operations, faults, violations, examples."""
        lines = ["operations", "----------"]
        lines += [f"  {name:<44} {self.counts[name]:>9}" for name in sorted(self.counts)]
        lines += ["faults", "------"]
        for fault in self.faults:
            took = fault["t1"] - fault["t0"]
            lines.append(
                f"  {fault['fault']:<44} {took:>8.1f}s  affects {','.join(fault['affects'])}"
            )
        lines += ["violations", "----------"]
        violations = self.violations()
        lines += [f"  {kind:<44} {violations[kind]:>9}" for kind in VIOLATIONS]
        by_kind: dict[str, list[Finding]] = defaultdict(list)
        for finding in self.findings:
            by_kind[finding.kind].append(finding)
        for kind, found in by_kind.items():
            for finding in found[:examples]:
                lines.append(f"  ! {kind}: {finding.detail}")
                if finding.record is not None:
                    lines.append(f"      {json.dumps(finding.record, sort_keys=True)[:600]}")
        lines.append("result: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(lines)


class _Acks:
    """Acknowledged writes per (kind, user), sorted by acknowledgement time."""

    def __init__(self, writes: Iterable[dict[str, Any]]) -> None:
        self._times: dict[tuple[str, int], list[float]] = defaultdict(list)
        self._best: dict[tuple[str, int], list[int]] = defaultdict(list)
        for record in sorted(writes, key=lambda r: r["t1"]):
            key = (record["kind"], int(record["user"]))
            best = self._best[key]
            self._times[key].append(record["t1"])
            best.append(max(record["value"], best[-1] if best else 0))

    def before(self, kind: str, user: int, when: float) -> int:
        """Return the highest value acknowledged for the row strictly before *when*."""
        key = (kind, user)
        index = bisect.bisect_left(self._times.get(key, []), when)
        return self._best[key][index - 1] if index else 0


def _overlaps(record: dict[str, Any], fault: dict[str, Any]) -> bool:
    """Return whether *record* ran during *fault* or within :data:`GRACE` seconds after it."""
    return bool(record["t0"] <= fault["t1"] + GRACE and fault["t0"] <= record["t1"])


def check(
    ops: list[dict[str, Any]],
    fault_log: list[dict[str, Any]],
    meta: dict[str, Any],
    rows: Rows | None,
) -> Report:
    """Check *ops* (every user's and the worker's records); *rows* None skips the SQL part."""
    report = Report(faults=fault_log)
    placement: dict[str, str] = meta["placement"]
    alias_server: dict[str, str] = meta["alias_server"]
    replica_server: dict[str, str] = meta["replica_server"]
    # The primary last answered a probe up to one check interval before the fault began.
    grace_seconds = float(meta.get("max_replica_lag", MAX_REPLICA_LAG)) - float(
        meta.get("replica_check_interval", REPLICA_CHECK_INTERVAL)
    )

    def home(kind: str, user: int) -> str:
        return placement[str(user)] if kind == "counter" else "default"

    writes = [r for r in ops if r["op"] == "write"]
    by_value = {(r["kind"], int(r["target"]), int(r["value"])): r for r in writes}

    def writes_in_flight(kind: str, target: int, value: int, record: dict[str, Any]) -> str:
        """Say when the write of *value* was acknowledged, relative to *record* (diagnosis)."""
        write = by_value.get((kind, target, value))
        if write is None or not write["ok"]:
            return ""
        if write["t1"] > record["t1"]:
            return f" (the write of {value} was still in flight: acknowledged after the read)"
        return f" (the write of {value} was acknowledged {record['t1'] - write['t1']:.3f}s before)"

    def in_flight(kind: str, target: int, value: int, record: dict[str, Any]) -> bool:
        """Whether the write of *value* was not acknowledged before *record* began."""
        write = by_value.get((kind, target, value))
        return write is None or not write["ok"] or write["t1"] > record["t0"]

    acked = [r for r in writes if r["ok"]]
    acks = _Acks(acked)
    report.counts["operations"] = len(ops)
    for record in ops:
        report.counts[f"{record['op']}s {'ok' if record['ok'] else 'failed'}"] += 1
        if record["op"] == "write":
            report.counts[f"write {record['kind']}"] += 1
            continue
        report.counts[f"read {record['mode']} {record['kind']}"] += 1
        kind, target = record["kind"], int(record["target"])
        if record["mode"] == "own":
            floor, violation = acks.before(kind, target, record["t0"]), "ryw"
        elif record["mode"] in ("token", "worker"):
            floor, violation = int(record["floor"] or 0), "token"
        else:
            floor, violation = 0, ""
        stale_floor = acks.before(kind, target, record["t0"])
        highest = 0
        for index, read in enumerate(record["reads"]):
            value = int(read["value"] or 0)
            report.counts["row reads"] += 1
            if read["cached"]:
                report.counts["cache hits" if read["hit"] else "cache misses/bypasses"] += 1
            if violation and value < floor:
                report.add(violation, f"read {value} < floor {floor} (read #{index})", record)
            if (
                value < highest
                and read["cached"]
                and read["hit"]
                and in_flight(kind, target, highest, record)
            ):
                # The documented commit-to-invalidation window (docs/consistency.md,
                # "Limits"): the newer value's write had committed, its invalidation had
                # not reached Redis, and the entry it retires was served. Counted, and
                # shown, but not a violation of what the library promises.
                report.counts[WINDOW] += 1
            elif value < highest:
                report.add(
                    "monotonic",
                    f"read #{index} ({'cached' if read['cached'] else 'uncached'}) returned "
                    f"{value} after {highest} in the same context"
                    + writes_in_flight(kind, target, highest, record),
                    record,
                )
            highest = max(highest, value)
            if read["cached"] and read["hit"] and value < stale_floor:
                report.add(
                    "stale_cached",
                    f"hit returned {value}; {stale_floor} was acknowledged before the read",
                    record,
                )

    # Errors, by whether the primary the operation depends on was up.
    for record in ops:
        if record["ok"]:
            continue
        server = alias_server[home(record["kind"], int(record["target"]))]
        replica = replica_server[server]
        relevant = [f for f in fault_log if _overlaps(record, f)]
        primary_down = any(server in f["affects"] for f in relevant)
        replica_down = any(replica in f["affects"] for f in relevant)
        if not primary_down:
            report.add("error_primary_up", f"{record['op']} failed with {server} up", record)
        elif record["op"] == "read" and not replica_down:
            # The library serves from the replica for MAX_REPLICA_LAG seconds after the
            # primary last answered (docs/replicas.md, "While the primary is down"), then
            # sends reads to the primary to bound staleness: a documented limit.
            down_since = min(f["t0"] for f in relevant if server in f["affects"])
            if record["t0"] < down_since + grace_seconds:
                report.add(
                    "read_error_replica_could_serve",
                    f"read failed {record['t0'] - down_since:.2f}s into {server}'s outage"
                    f" with {replica} up",
                    record,
                )
            else:
                report.counts["errors_primary_down (read, after the grace)"] += 1
        else:
            report.counts[f"errors_primary_down ({record['op']})"] += 1

    if rows is not None:
        _check_rows(report, acked, rows, home)
    return report


def _check_rows(report: Report, acked: list[dict[str, Any]], rows: Rows, home: Any) -> None:
    highest: dict[tuple[str, int], int] = {}
    for record in acked:
        kind, user, value = record["kind"], int(record["user"]), int(record["value"])
        expected = home(kind, user)
        key = (user, value)
        aliases = rows.ledger.get(kind, {})
        total = sum(counter[key] for counter in aliases.values())
        elsewhere = [a for a, counter in aliases.items() if a != expected and counter[key]]
        if record["db"] != expected:
            report.add("misplaced", f"acknowledged by {record['db']}, not {expected}", record)
        if total == 0:
            report.add("lost", f"{kind} ({user}, {value}) is on no database", record)
        if elsewhere:
            report.add("misplaced", f"{kind} ({user}, {value}) found on {elsewhere}", record)
        highest[(kind, user)] = max(highest.get((kind, user), 0), value)
    for (kind, user), value in sorted(highest.items()):
        final = rows.values.get(kind, {}).get(user)
        if final is None or final < value:
            report.add("lost", f"{kind} row of user {user} holds {final}, acknowledged {value}")
    for kind, aliases in rows.ledger.items():
        totals: Counter[tuple[int, int]] = Counter()
        for counter in aliases.values():
            totals.update(counter)
        for (user, seq), count in sorted(totals.items()):
            report.counts[f"ledger rows {kind}"] += count
            if count > 1:
                report.add("duplicated", f"{kind} ({user}, {seq}) present {count} times")


def load_rows(dsns: dict[str, str]) -> Rows:
    """Read every ledger and row table on every primary, directly (no proxy, no router)."""
    import psycopg

    rows = Rows()
    for kind, (ledger, table) in TABLES.items():
        rows.ledger[kind] = {}
        rows.values[kind] = {}
        for alias, dsn in dsns.items():
            with psycopg.connect(dsn, autocommit=True) as conn:
                exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [ledger]).fetchone()
                if not (exists and exists[0]):
                    continue
                counter: Counter[tuple[int, int]] = Counter()
                for user, seq, count in conn.execute(
                    f'SELECT "user", seq, count(*) FROM {ledger} GROUP BY 1, 2'
                ):
                    counter[(int(user), int(seq))] = int(count)
                rows.ledger[kind][alias] = counter
                for user, value in conn.execute(f'SELECT "user", value FROM {table}'):
                    previous = rows.values[kind].get(int(user))
                    rows.values[kind][int(user)] = max(int(value), previous or 0)
    return rows


def load_ops(directory: Path) -> list[dict[str, Any]]:
    """Return every operation record of a run directory (users' and worker's logs)."""
    ops: list[dict[str, Any]] = []
    for path in sorted(directory.glob("user-*.jsonl")) + sorted(directory.glob("worker.jsonl")):
        ops.extend(read_jsonl(path))
    return ops


def _save_rows(rows: Rows, path: Path) -> None:
    data = {
        "ledger": {
            kind: {alias: [[u, q, n] for (u, q), n in c.items()] for alias, c in aliases.items()}
            for kind, aliases in rows.ledger.items()
        },
        "values": {
            kind: [[u, v] for u, v in values.items()] for kind, values in rows.values.items()
        },
    }
    path.write_text(json.dumps(data))


def _load_saved_rows(path: Path) -> Rows:
    data = json.loads(path.read_text())
    return Rows(
        ledger={
            kind: {alias: Counter({(u, q): n for u, q, n in c}) for alias, c in aliases.items()}
            for kind, aliases in data["ledger"].items()
        },
        values={kind: dict(map(tuple, values)) for kind, values in data["values"].items()},
    )


def check_dir(directory: Path, *, sql: bool = True) -> Report:
    """Check the run in *directory* (``run.json`` and the logs).

    With *sql*, the rows are read from the run's databases and saved to ``rows.json``;
    without, the saved rows are used when there are any (the services of a run are gone
    once it ends), else the database checks are skipped.
    """
    meta = json.loads((directory / "run.json").read_text())
    fault_path = directory / "faults.jsonl"
    fault_log = read_jsonl(fault_path) if fault_path.exists() else []
    saved = directory / "rows.json"
    rows: Rows | None = None
    if sql:
        rows = load_rows(meta["dsn"])
        _save_rows(rows, saved)
    elif saved.exists():
        rows = _load_saved_rows(saved)
    return check(load_ops(directory), fault_log, meta, rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m soak.checker DIR [--no-sql]``: print the table; exit 1 on a violation."""
    parser = argparse.ArgumentParser(prog="python -m soak.checker")
    parser.add_argument("directory", type=Path)
    parser.add_argument(
        "--no-sql",
        action="store_true",
        help="do not query the databases: use the rows the run saved (rows.json), if any",
    )
    args = parser.parse_args(argv)
    report = check_dir(args.directory, sql=not args.no_sql)
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
