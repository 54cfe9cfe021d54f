"""``manage.py dbscale status``: primaries, replicas, health, lag and where reads go."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from django.core.management.base import BaseCommand

from django_dbscale import replicas
from django_dbscale.conf import dbscale_settings
from django_dbscale.consistency import format_lsn

HELP = (
    "Probe every replica now and print health, lag and where reads would go; reads routed "
    "by reason; and the queryset cache's counters per model."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")


def collect() -> list[dict[str, Any]]:
    """Probe now and return one row per primary with its replicas' measurements."""
    replicas.monitor.refresh()
    rows = []
    now = time.monotonic()
    for primary, specs in dbscale_settings.replicas.items():
        # Where a fresh context's reads would go, without routing one (and counting it).
        eligible = [s.alias for s in specs if replicas.monitor.status(s.alias).usable(now)]
        entry: dict[str, Any] = {
            "primary": primary,
            "reads_go_to": ", ".join(eligible) if eligible else primary,
            "replicas": [],
        }
        for spec in specs:
            st = replicas.monitor.status(spec.alias)
            entry["replicas"].append(
                {
                    "alias": spec.alias,
                    "weight": spec.weight,
                    "healthy": st.healthy and not st.quarantined(now),
                    "streaming": st.receiver_streaming,
                    "eligible": st.usable(now),
                    "lag_bytes": st.lag_bytes,
                    "lag_seconds": None if st.lag_seconds is None else round(st.lag_seconds, 3),
                    "replay_lsn": None if st.replay_lsn is None else format_lsn(st.replay_lsn),
                    "error": st.last_error,
                }
            )
        rows.append(entry)
    return rows


def cache_counters() -> dict[str, dict[str, int]]:
    """Return the cache's hits, misses, stores, ... per model (all processes, via Redis)."""
    if not dbscale_settings.cache["ENABLED"]:
        return {}
    from django_dbscale.cache import cache_stats

    return cache_stats()


def cache_continuity() -> dict[str, Any]:
    """Return undelivered invalidations per primary (its outbox rows) and this process's trust.

    Rows in an outbox mean some write's invalidation has not reached Redis yet: normal for a
    moment after an outage, a problem if they stay.
    """
    if not dbscale_settings.cache["ENABLED"]:
        return {}
    from django.db import connections

    from django_dbscale.cache import continuity, outbox

    rows: dict[str, int | str] = {}
    for alias in outbox.outbox_aliases():
        try:
            with connections[alias].cursor() as cursor:
                cursor.execute(f"SELECT count(*) FROM {outbox.TABLE}")
                (count,) = cursor.fetchone() or (0,)
            rows[alias] = int(count)
        except Exception as exc:  # a status report must not fail on one database
            rows[alias] = f"unreadable: {exc}".splitlines()[0]
    return {
        "outbox_rows": rows,
        "verified_run_id": continuity.verified_run_id(),
        "untrusted": sorted(continuity.untrusted),
    }


def handle(command: BaseCommand, **options: Any) -> None:
    rows = collect()
    routes = {
        f"{alias} {reason}": n for (alias, reason), n in sorted(replicas.route_counts.items())
    }
    counters = cache_counters()
    continuity = cache_continuity()
    if options.get("json"):
        report = {
            "primaries": rows,
            "routes": routes,
            "cache": counters,
            "cache_continuity": continuity,
        }
        command.stdout.write(json.dumps(report, indent=2))
        return
    budget = (
        f"budget: {dbscale_settings.max_replica_lag}s or "
        f"{dbscale_settings.max_replica_lag_bytes} bytes"
    )
    command.stdout.write(budget)
    for entry in rows:
        command.stdout.write(f"primary {entry['primary']}: reads go to {entry['reads_go_to']}")
        for r in entry["replicas"]:
            state = "eligible" if r["eligible"] else ("DOWN" if not r["healthy"] else "LAGGING")
            command.stdout.write(
                f"  {r['alias']:<20} {state:<9} lag={r['lag_bytes']} bytes / "
                f"{r['lag_seconds']} s  replay_lsn={r['replay_lsn']}  weight={r['weight']}"
                + (f"  error={r['error']}" if r["error"] else "")
            )
    command.stdout.write("reads routed by this process (alias, reason):")
    for label, count in routes.items() or [("none yet", 0)]:
        command.stdout.write(f"  {label:<40} {count}")
    if continuity:
        owed = "  ".join(f"{a}={n}" for a, n in continuity["outbox_rows"].items())
        command.stdout.write(f"undelivered cache invalidations (outbox rows): {owed or 'none'}")
    command.stdout.write("queryset cache (all processes):")
    for label, events in sorted(counters.items()) or [("none yet", {})]:
        shown = "  ".join(f"{event}={n}" for event, n in sorted(events.items()) if n)
        command.stdout.write(f"  {label:<40} {shown}")
