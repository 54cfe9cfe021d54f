"""``manage.py dbscale drift``: shards whose applied migrations or schema differ.

For every shard group, each shard's applied migrations (``django_migrations``) and schema
(tables and columns with types, nullability and defaults; indexes; constraints; in the
connection's current schema) are read and compared with what most shards of the group have;
tables of other groups' sharded models (a database may be a shard of several groups) are
left out.
A shard is reported with what it lacks and what it has extra; the command fails when any
shard drifts, so CI can run it after deployments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from django_dbscale.conf import dbscale_settings

HELP = "Report shards whose applied migrations or schema differ from the rest of their group."

_SCHEMA_SQL = [
    (
        "column",
        """SELECT table_name || '.' || column_name || ' ' || data_type
            || CASE WHEN is_nullable = 'YES' THEN ' NULL' ELSE ' NOT NULL' END
            || COALESCE(' DEFAULT ' || column_default, '')
            || COALESCE(' COLLATE ' || collation_name, '')
           FROM information_schema.columns WHERE table_schema = current_schema()""",
    ),
    (
        "index",
        "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema()",
    ),
    (
        "constraint",
        """SELECT c.relname || ' ' || k.conname || ' ' || pg_get_constraintdef(k.oid)
           FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema()""",
    ),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group", action="append", help="Only this group (repeatable).")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of text.")


@dataclass
class ShardState:
    """What one shard has applied and what its schema contains."""

    alias: str
    migrations: set[str] = field(default_factory=set)
    schema: set[str] = field(default_factory=set)
    error: str = ""

    @property
    def schema_digest(self) -> str:
        return hashlib.sha256("\n".join(sorted(self.schema)).encode()).hexdigest()[:12]


def read_state(alias: str) -> ShardState:
    """Read *alias*'s applied migrations and schema objects (errors are recorded, not raised)."""
    state = ShardState(alias)
    connection = connections[alias]
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT to_regclass('django_migrations') IS NOT NULL")
            row = cursor.fetchone()
            if row and row[0]:
                cursor.execute("SELECT app || '.' || name FROM django_migrations")
                state.migrations = {r[0] for r in cursor.fetchall()}
            for kind, query in _SCHEMA_SQL:
                cursor.execute(query)
                state.schema |= {f"{kind} {r[0]}" for r in cursor.fetchall()}
    except Exception as exc:
        state.error = f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()
    return state


def _majority(sets: list[set[str]]) -> set[str]:
    counts = Counter(item for s in sets for item in s)
    return {item for item, n in counts.items() if n * 2 > len(sets)}


def _table_of(item: str) -> str:
    """Return the table a schema object of :func:`read_state` belongs to."""
    kind, _, rest = item.partition(" ")
    if kind == "index":
        match = re.search(r" ON (?:ONLY )?(?:\S+\.)?\"?([^\s\"]+)\"? ", rest)
        return match.group(1) if match else ""
    first = rest.split(" ", 1)[0]
    return first.split(".", 1)[0] if kind == "column" else first


def _other_groups_tables(group: str) -> set[str]:
    """Return the tables of sharded models of other groups (a shard may serve several)."""
    from django_dbscale.sharding.routing import sharded_models

    own = {spec.model._meta.db_table for spec in sharded_models(group)}
    return {spec.model._meta.db_table for spec in sharded_models()} - own


def compare(group: str) -> list[dict[str, Any]]:
    """Return one report per shard of *group*: missing/extra migrations and schema objects."""
    states = [read_state(alias) for alias in dbscale_settings.shard_groups[group].shards]
    others = _other_groups_tables(group)
    for state in states:
        state.schema = {item for item in state.schema if _table_of(item) not in others}
    readable = [s for s in states if not s.error]
    base_migrations = _majority([s.migrations for s in readable])
    base_schema = _majority([s.schema for s in readable])
    reports = []
    for s in states:
        report: dict[str, Any] = {
            "group": group,
            "alias": s.alias,
            "error": s.error,
            "migrations": len(s.migrations),
            "schema_objects": len(s.schema),
            "schema_digest": s.schema_digest,
            "missing_migrations": sorted(base_migrations - s.migrations),
            "extra_migrations": sorted(s.migrations - base_migrations),
            "missing_schema": sorted(base_schema - s.schema),
            "extra_schema": sorted(s.schema - base_schema),
        }
        report["drift"] = bool(
            s.error
            or report["missing_migrations"]
            or report["extra_migrations"]
            or report["missing_schema"]
            or report["extra_schema"]
        )
        reports.append(report)
    return reports


def handle(command: BaseCommand, **options: Any) -> None:
    groups = options.get("group") or list(dbscale_settings.shard_groups)
    unknown = sorted(set(groups) - set(dbscale_settings.shard_groups))
    if unknown:
        raise CommandError(
            f"Unknown shard group(s) {unknown}; "
            f"configured: {sorted(dbscale_settings.shard_groups)}."
        )
    reports = [r for group in groups for r in compare(group)]
    if options.get("json"):
        command.stdout.write(json.dumps(reports, indent=2))
    else:
        for r in reports:
            head = (
                f"{r['group']}/{r['alias']}: {r['migrations']} migrations, "
                f"{r['schema_objects']} schema objects (schema {r['schema_digest']})"
            )
            if not r["drift"]:
                command.stdout.write(f"{head}  {command.style.SUCCESS('in sync')}")
                continue
            command.stdout.write(f"{head}  {command.style.ERROR('DRIFT')}")
            if r["error"]:
                command.stdout.write(f"    unreadable: {r['error']}")
            for key, label in (
                ("missing_migrations", "missing migration"),
                ("extra_migrations", "extra migration"),
                ("missing_schema", "missing"),
                ("extra_schema", "extra"),
            ):
                for item in r[key]:
                    command.stdout.write(f"    {label}: {item}")
    drifted = [f"{r['group']}/{r['alias']}" for r in reports if r["drift"]]
    if drifted:
        raise CommandError(f"Drift found on {drifted}.")
