"""``manage.py dbscale migrate``: migrate every primary database, shards in parallel.

Replicas are skipped (they receive the schema by replication), as are ``TEST["MIRROR"]``
aliases. Databases that are not shards are migrated first, one after the other; then the
shards, concurrently, each in its own thread with its own connection. ``allow_migrate``
decides what lands where (sharded tables only on their group's shards). The report has one
line per database; the command fails if any database failed.
"""

from __future__ import annotations

import argparse
import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connections
from django.db.migrations.recorder import MigrationRecorder

from django_dbscale.conf import dbscale_settings

HELP = "Migrate every database (the default, then all shards in parallel); report per database."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("app_label", nargs="?", help="Only this app (as in migrate).")
    parser.add_argument("migration_name", nargs="?", help="Migrate to this migration.")
    parser.add_argument(
        "--database",
        action="append",
        dest="databases",
        help="Only these aliases (repeatable); default: every primary.",
    )
    parser.add_argument(
        "--parallel", type=int, default=0, help="Shards migrated at once (default: all)."
    )
    parser.add_argument(
        "--run-syncdb", action="store_true", help="Create tables for apps without migrations."
    )
    parser.add_argument("--fake", action="store_true", help="Record without running.")


@dataclass
class Outcome:
    """What migrating one database did."""

    alias: str
    ok: bool
    applied: list[str]
    seconds: float
    output: str
    error: str = ""


def primary_aliases() -> list[str]:
    """Every alias to migrate: all of ``DATABASES`` but replicas and test mirrors."""
    return [
        alias
        for alias, db in settings.DATABASES.items()
        if alias not in dbscale_settings.primary_of and not (db.get("TEST") or {}).get("MIRROR")
    ]


def _applied(alias: str) -> set[tuple[str, str]]:
    recorder = MigrationRecorder(connections[alias])
    if not recorder.has_table():
        return set()
    return set(recorder.applied_migrations())


def migrate_one(alias: str, options: dict[str, Any]) -> Outcome:
    """Run Django's ``migrate`` on *alias*, capturing its output; never raises."""
    started = time.monotonic()
    out = io.StringIO()
    args = [a for a in (options.get("app_label"), options.get("migration_name")) if a]
    try:
        before = _applied(alias)
        call_command(
            "migrate",
            *args,
            database=alias,
            interactive=False,
            verbosity=max(1, int(options.get("verbosity", 1))),
            run_syncdb=bool(options.get("run_syncdb")),
            fake=bool(options.get("fake")),
            stdout=out,
            stderr=out,
        )
        applied = sorted(f"{app}.{name}" for app, name in _applied(alias) - before)
        return Outcome(alias, True, applied, time.monotonic() - started, out.getvalue())
    except Exception as exc:
        return Outcome(
            alias,
            False,
            [],
            time.monotonic() - started,
            out.getvalue(),
            f"{type(exc).__name__}: {exc}",
        )
    finally:
        connections[alias].close()


def migrate_all(aliases: list[str], options: dict[str, Any]) -> list[Outcome]:
    """Migrate non-shard *aliases* in order, then the shard ones concurrently."""
    shards = [a for a in aliases if a in dbscale_settings.groups_of_shard]
    others = [a for a in aliases if a not in dbscale_settings.groups_of_shard]
    outcomes = [migrate_one(alias, options) for alias in others]
    if shards:
        workers = options.get("parallel") or len(shards)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dbscale-migrate") as pool:
            outcomes += list(pool.map(lambda alias: migrate_one(alias, options), shards))
    return outcomes


def handle(command: BaseCommand, **options: Any) -> None:
    known = primary_aliases()
    wanted: list[str] = options.get("databases") or known
    unknown = [a for a in wanted if a not in known]
    if unknown:
        raise CommandError(
            f"Cannot migrate {unknown}: not primary aliases of DATABASES (migratable: {known})."
        )
    if options.get("parallel") is not None and options["parallel"] < 0:
        raise CommandError("--parallel must be >= 1 (or 0 for all shards at once).")
    outcomes = migrate_all(wanted, options)
    width = max(len(o.alias) for o in outcomes)
    for o in outcomes:
        role = "shard" if o.alias in dbscale_settings.groups_of_shard else "db"
        status = command.style.SUCCESS("ok") if o.ok else command.style.ERROR("FAILED")
        applied = f"{len(o.applied)} applied" if o.applied else "up to date"
        command.stdout.write(
            f"{o.alias:<{width}}  {role:<5}  {status}  {applied}  {o.seconds:.2f}s"
        )
        if int(options.get("verbosity", 1)) >= 2:
            for name in o.applied:
                command.stdout.write(f"    {name}")
        if not o.ok:
            command.stdout.write(f"    {o.error}")
    failed = [o.alias for o in outcomes if not o.ok]
    if failed:
        raise CommandError(f"Migration failed on {failed}; see the report above.")
