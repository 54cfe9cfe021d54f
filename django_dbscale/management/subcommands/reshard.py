"""``manage.py dbscale reshard``: grow, shrink or reweight a shard group online.

::

    manage.py dbscale reshard customers --add shard3 --plan   # what moves, rows, time
    manage.py dbscale reshard customers --add shard3          # run it (or resume it)
    manage.py dbscale reshard customers                       # move to SHARD_GROUPS' ring
    manage.py dbscale reshard customers --remove shard1
    manage.py dbscale reshard customers --weight shard0=2
    manage.py dbscale reshard customers --status [--json]
    manage.py dbscale reshard customers --rollback            # any time before cleanup

Running the same command again after a crash or a kill resumes the unfinished job. See
``docs/resharding.md`` for the runbook.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from django_dbscale.sharding import shardmap
from django_dbscale.sharding.exceptions import ShardingError
from django_dbscale.sharding.ring import build_ring

HELP = "Move a shard group's rows to a new ring while the site keeps writing."

#: Copy rate assumed by --plan before any job measured one (rows per second).
ASSUMED_RATE = 20_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("group", help="The shard group (a key of DBSCALE['SHARD_GROUPS']).")
    parser.add_argument(
        "--add", action="append", default=[], metavar="ALIAS", help="Add this shard."
    )
    parser.add_argument(
        "--remove", action="append", default=[], metavar="ALIAS", help="Remove this shard."
    )
    parser.add_argument(
        "--weight", action="append", default=[], metavar="ALIAS=N", help="Set a shard's weight."
    )
    parser.add_argument("--plan", action="store_true", help="Show what would move; move nothing.")
    parser.add_argument("--status", action="store_true", help="Show the group's job and map.")
    parser.add_argument(
        "--rollback", action="store_true", help="Undo the unfinished job (before cleanup)."
    )
    parser.add_argument("--json", action="store_true", help="--plan/--status as JSON.")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=5000,
        metavar="N",
        help="Rows per copy/cleanup transaction and per checksum chunk (default 5000).",
    )


def _weights(raw: list[str]) -> dict[str, int]:
    weights: dict[str, int] = {}
    for item in raw:
        alias, sep, value = item.partition("=")
        if not sep or not alias:
            raise CommandError(f"--weight {item!r}: write ALIAS=N, e.g. --weight shard0=2.")
        try:
            weights[alias] = int(value)
        except ValueError:
            raise CommandError(f"--weight {item!r}: N must be an integer >= 1.") from None
    return weights


class _Printer:
    """Writes progress lines, at most one per second for the same phase (plus the last)."""

    def __init__(self, command: BaseCommand) -> None:
        self.command = command
        self.last: dict[str, float] = {}

    def __call__(self, text: str) -> None:
        if text.startswith("  ") and ":" in text:
            key = text.split(":", 1)[0]
            now = time.monotonic()
            if now - self.last.get(key, 0.0) < 1.0 and "ETA" in text:
                return
            self.last[key] = now
        self.command.stdout.write(text)
        self.command.stdout.flush()


def handle(command: BaseCommand, **options: Any) -> None:
    from django_dbscale.sharding import reshard

    group: str = options["group"]
    say = _Printer(command)
    try:
        resharder = reshard.Resharder(group, progress=say, batch=options.get("batch_size") or 5000)
        if options.get("status"):
            _status(command, resharder, as_json=bool(options.get("json")))
            return
        if options.get("rollback"):
            with resharder.running():
                if resharder.current() is None:
                    raise CommandError(
                        f"Group {group!r} has no unfinished resharding to roll back."
                    )
                resharder.resume()
                resharder.rollback()
            return
        add: list[str] = options.get("add") or []
        remove: list[str] = options.get("remove") or []
        weights = _weights(options.get("weight") or [])
        changed = bool(add or remove or weights)
        unfinished = resharder.current()
        base = resharder.source_of(unfinished) if unfinished is not None else None
        target = reshard.target_spec(group, add=add, remove=remove, weights=weights, base=base)
        if options.get("plan"):
            _plan(command, reshard.plan(group, target), as_json=bool(options.get("json")))
            return
        with resharder.running():
            job = resharder.current()
            if job is not None:
                wanted = build_ring(target).fingerprint
                if changed and build_ring(resharder.target_of(job)).fingerprint != wanted:
                    raise CommandError(
                        f"Group {group!r} has an unfinished resharding (job #{job.id}, phase "
                        f"{job.phase}) to another ring. Finish it first (rerun it without "
                        "options), or undo it with --rollback."
                    )
                say(f"resuming job #{job.id} in phase {job.phase}")
                resharder.resume()
            else:
                active = shardmap.active(group)
                if active is not None and active.fingerprint == build_ring(target).fingerprint:
                    say(
                        f"group {group} is already placed under ring {active.fingerprint} "
                        f"(map version {active.version}): nothing to do"
                    )
                    return
                resharder.start(target)
            resharder.run()
    except ShardingError as exc:
        raise CommandError(str(exc)) from exc
    say(_summary(resharder))


def _summary(resharder: Any) -> str:
    job = resharder.job
    progress = job.progress
    cut = progress.get("cutover", {})
    clean = progress.get("cleanup", {})
    return (
        f"done: job #{job.id}, {progress.get('rows', {}).get('copied', 0):,} rows copied "
        f"({progress.get('copy_rate', 0):,} rows/s), writes of moving keys held back "
        f"{cut.get('held_back_s', 0) * 1000:.0f} ms at cutover, {clean.get('deleted', 0):,} rows "
        f"deleted from old shards, misplaced rows found by the audit: "
        f"{sum(clean.get('misplaced', {}).values())}"
    )


def _plan(command: BaseCommand, p: Any, *, as_json: bool) -> None:
    from django_dbscale.sharding import reshard

    reshard.count_rows(p)
    rate = ASSUMED_RATE
    last = reshard.Resharder(p.group).last()
    if last is not None and last.progress.get("copy_rate"):
        rate = int(last.progress["copy_rate"])
    data = {
        "group": p.group,
        "from": list(p.source.shards),
        "to": list(p.target.shards),
        "from_ring": build_ring(p.source).fingerprint,
        "to_ring": build_ring(p.target).fingerprint,
        "key_space_moved": round(p.fraction, 4),
        "moves": [
            {
                "from": s,
                "to": t,
                "ranges": len(r),
                "key_space": round(sum(hi - lo for lo, hi in r) / 2**32, 4),
            }
            for (s, t), r in sorted(p.moves.items())
        ],
        "rows": [
            {"from": s, "to": t, "model": label, "rows": n}
            for (s, t, label), n in sorted(p.rows.items())
        ],
        "total_rows": p.total_rows,
        "estimated_bytes_per_target": {
            t: sum(b for (_, tt, _), b in p.bytes.items() if tt == t)
            for t in sorted({t for _, t in p.moves})
        },
        "estimated_copy_seconds": round(p.total_rows / rate, 1),
        "rate_assumed": rate,
    }
    if as_json:
        command.stdout.write(json.dumps(data, indent=2))
        return
    out = command.stdout.write
    out(
        f"group {p.group}: {data['from']} (ring {data['from_ring']}) -> {data['to']} "
        f"(ring {data['to_ring']})"
    )
    out(f"  {p.fraction:.1%} of the key space changes shard:")
    for move in data["moves"]:
        out(
            f"    {move['from']} -> {move['to']}: {move['key_space']:.1%} of the keys "
            f"({move['ranges']} ranges)"
        )
    out("  rows to move:")
    for row in data["rows"]:
        out(f"    {row['from']} -> {row['to']}  {row['model']:<32} {row['rows']:>10,}")
    out(
        f"  total {p.total_rows:,} rows; copy takes about {data['estimated_copy_seconds']} s "
        f"at {rate:,} rows/s"
    )
    for target, size in data["estimated_bytes_per_target"].items():
        out(
            f"  {target} receives about {size / 2**20:,.1f} MiB (table and index share): check "
            "its free disk space, which PostgreSQL does not report to SQL clients"
        )


def _status(command: BaseCommand, resharder: Any, *, as_json: bool) -> None:
    group = resharder.group
    active = shardmap.active(group)
    job = resharder.current() or resharder.last()
    from django_dbscale.conf import dbscale_settings
    from django_dbscale.sharding.ring import configured_ring

    declared = dbscale_settings.shard_groups.get(group)
    data: dict[str, Any] = {
        "group": group,
        "map": None
        if active is None
        else {
            "version": active.version,
            "shards": list(active.spec.shards),
            "fingerprint": active.fingerprint,
            "floors": dict(active.floors),
        },
        "settings_ring": configured_ring(group).fingerprint if declared else None,
        "job": None
        if job is None
        else {
            "id": job.id,
            "phase": job.phase,
            "from": [s[0] for s in job.source["shards"]],
            "to": [s[0] for s in job.target["shards"]],
            "progress": job.progress,
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        },
    }
    if as_json:
        command.stdout.write(json.dumps(data, indent=2, default=str))
        return
    out = command.stdout.write
    if active is None:
        out(f"group {group}: no shard map row yet (routing by SHARD_GROUPS); run migrate")
    else:
        out(
            f"group {group}: map version {active.version}, ring {active.fingerprint}, "
            f"shards {list(active.spec.shards)}"
        )
        if data["settings_ring"] and data["settings_ring"] != active.fingerprint:
            out(
                f"  SHARD_GROUPS declares ring {data['settings_ring']}: run `manage.py dbscale "
                f"reshard {group}` to move to it"
            )
    if job is None:
        out("  no resharding job yet")
        return
    state = "finished" if job.finished_at else "UNFINISHED"
    out(
        f"  job #{job.id} ({state}): {data['job']['from']} -> {data['job']['to']}, "
        f"phase {job.phase}"
    )
    copied = job.progress.get("rows", {}).get("copied")
    if copied is not None:
        out(f"  rows copied: {copied:,}")
    if job.progress.get("cutover"):
        out(
            f"  writes held back at cutover: {job.progress['cutover']['held_back_s'] * 1000:.0f} ms"
        )
