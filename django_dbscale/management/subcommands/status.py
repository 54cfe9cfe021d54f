"""``manage.py dbscale status``: primaries, replicas, health, lag and where reads go.

:func:`report` gathers everything the command shows as JSON-ready data; the staff status
page (:mod:`django_dbscale.contrib.status`) renders the same report, so the two never
disagree about what a replica's lag or a shard group's ring is.
"""

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
    "by reason; each shard group's ring version and key shares; and the queryset cache's "
    "counters per model."
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


def cache_configured() -> bool:
    """Return whether this process runs the queryset cache (``DBSCALE["CACHE"]`` declared,
    enabled, and its ``ALIAS`` in ``CACHES``).

    A project without the cache must not load its machinery (or need Redis) to report.
    """
    if not dbscale_settings.cache_declared:
        return False
    from django_dbscale.cache.options import options

    return options().enabled


def routes() -> dict[str, int]:
    """Return reads routed by this process: ``{"<alias> <reason>": count}``."""
    return {f"{alias} {reason}": n for (alias, reason), n in sorted(replicas.route_counts.items())}


def shard_groups() -> list[dict[str, Any]]:
    """Return one entry per shard group: the ``shards`` command's ring description plus the
    active ring's ``version`` in the shard map (``None``: no row, routed by settings) and
    whether ``SHARD_GROUPS`` declares another ring (a resharding not yet run).

    A group whose ring cannot be built is reported with an ``error`` instead of failing the
    whole report.
    """
    if not dbscale_settings.shard_groups:
        return []
    from django_dbscale.management.subcommands import shards
    from django_dbscale.sharding import shardmap
    from django_dbscale.sharding.exceptions import ShardingError
    from django_dbscale.sharding.ring import configured_ring

    # Read the map now, as the replicas are probed now: this process's copy may be up to
    # SHARD_MAP_CHECK_INTERVAL old, and a report must show a cutover that just happened.
    shardmap.refresh()
    out: list[dict[str, Any]] = []
    for name in dbscale_settings.shard_groups:
        try:
            (entry,) = shards.collect([name], [], verify=False)
            active = shardmap.active(name)
            target = configured_ring(name).fingerprint
        except ShardingError as exc:
            out.append({"group": name, "error": str(exc), "nodes": []})
            continue
        entry.pop("keys", None)
        entry["version"] = None if active is None else active.version
        entry["configured_fingerprint"] = target
        entry["resharding_pending"] = target != entry["fingerprint"]
        out.append(entry)
    return out


def report() -> dict[str, Any]:
    """Probe now and return everything ``status`` shows, ready for ``json.dumps``.

    Keys: ``budget`` (the lag budget), ``primaries`` (:func:`collect`), ``routes``,
    ``shard_groups``, ``cache`` (counters per model) and ``cache_continuity`` (outbox rows
    per primary, untrusted aliases). A pillar the project does not use reports an empty
    value and touches no server of its own (no Redis without the cache).
    """
    return {
        "budget": {
            "max_replica_lag": dbscale_settings.max_replica_lag,
            "max_replica_lag_bytes": dbscale_settings.max_replica_lag_bytes,
        },
        "primaries": collect(),
        "routes": routes(),
        "shard_groups": shard_groups(),
        "cache": cache_counters(),
        "cache_continuity": cache_continuity(),
    }


def cache_counters() -> dict[str, dict[str, int]]:
    """Return the cache's hits, misses, stores, ... per model (all processes, via Redis)."""
    if not cache_configured():
        return {}
    from django_dbscale.cache import cache_stats

    return cache_stats()


def cache_continuity() -> dict[str, Any]:
    """Return undelivered invalidations per primary (its outbox rows) and this process's trust.

    Rows in an outbox mean some write's invalidation has not reached Redis yet: normal for a
    moment after an outage, a problem if they stay.
    """
    if not cache_configured():
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
    data = report()
    if options.get("json"):
        command.stdout.write(json.dumps(data, indent=2))
        return
    rows, routed = data["primaries"], data["routes"]
    counters, continuity = data["cache"], data["cache_continuity"]
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
    for label, count in routed.items() or [("none yet", 0)]:
        command.stdout.write(f"  {label:<40} {count}")
    for group in data["shard_groups"]:
        if "error" in group:
            command.stdout.write(f"shard group {group['group']}: {group['error']}")
            continue
        version = "settings (no shard map row)" if group["version"] is None else group["version"]
        pending = "  (SHARD_GROUPS declares another ring)" if group["resharding_pending"] else ""
        shares = "  ".join(
            f"{n['alias']}={n['share']:.1%}" if "share" in n else n["alias"] for n in group["nodes"]
        )
        command.stdout.write(
            f"shard group {group['group']}: ring version {version} {group['fingerprint']}"
            f"{pending}  {shares}"
        )
    if continuity:
        owed = "  ".join(f"{a}={n}" for a, n in continuity["outbox_rows"].items())
        command.stdout.write(f"undelivered cache invalidations (outbox rows): {owed or 'none'}")
    command.stdout.write("queryset cache (all processes):")
    for label, events in sorted(counters.items()) or [("none yet", {})]:
        shown = "  ".join(f"{event}={n}" for event, n in sorted(events.items()) if n)
        command.stdout.write(f"  {label:<40} {shown}")
