"""``manage.py dbscale shards``: shard groups, ring fingerprints, nodes, weights, stamps."""

from __future__ import annotations

import argparse
import json
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from django_dbscale.conf import dbscale_settings
from django_dbscale.sharding.exceptions import ShardingError
from django_dbscale.sharding.ids import (
    install_shard_functions,
    is_populated,
    read_stamps,
    stamp_for,
    stamp_problems,
)
from django_dbscale.sharding.keys import ring_key
from django_dbscale.sharding.ring import KetamaRing, get_ring

HELP = "Print each shard group's ring fingerprint, nodes and weights (and where keys go)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group", action="append", help="Only this group (repeatable).")
    parser.add_argument(
        "--key", action="append", default=[], help="Also print the shard of this key."
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="Read each shard's stamp and report whether it matches the configured ring.",
    )
    parser.add_argument(
        "--stamp",
        action="store_true",
        help="(Re)install the ID function and stamp each shard with the configured ring "
        "(after a resharding).",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="With --stamp: stamp populated shards even if VNODES or shard numbers changed.",
    )
    parser.add_argument("--json", action="store_true", help="Print JSON instead of text.")


def _server(alias: str) -> str:
    db = settings.DATABASES.get(alias, {})
    return f"{db.get('HOST') or 'local'}:{db.get('PORT') or '5432'}/{db.get('NAME', '?')}"


def _stamp_state(alias: str, group: str) -> str:
    connection = connections[alias]
    try:
        stamp = stamp_for(read_stamps(connection), alias, group)
        if stamp is None:
            return "not stamped (run migrate)"
        populated = is_populated(connection, group, stamp)
        problems = stamp_problems(alias, stamp, populated, group=group)
    finally:
        connection.close()
    if problems:
        return "REFUSED: " + "; ".join(problems)
    if stamp.fingerprint != get_ring(group).fingerprint:
        state = "populated" if populated else "empty"
        return f"ring changed since stamp {stamp.fingerprint} ({state})"
    return f"ok (stamped {stamp.fingerprint}, shard number {stamp.shard_number})"


def collect(groups: list[str] | None, keys: list[str], verify: bool) -> list[dict[str, Any]]:
    """Return one entry per group: ring, nodes with weights and shares, key placements."""
    out = []
    for name, spec in dbscale_settings.shard_groups.items():
        if groups and name not in groups:
            continue
        ring = get_ring(name)
        nodes = []
        for number, alias in enumerate(ring.nodes):
            node: dict[str, Any] = {
                "number": number,
                "alias": alias,
                "weight": ring.weights.get(alias, 1),
                "replicas": [r.alias for r in dbscale_settings.replicas.get(alias, ())],
                "server": _server(alias),
            }
            if isinstance(ring, KetamaRing):
                node["points"] = ring.points_of(alias)
                node["share"] = round(ring.share_of(alias), 4)
            if verify:
                node["stamp"] = _stamp_state(alias, name)
            nodes.append(node)
        out.append(
            {
                "group": name,
                "fingerprint": ring.fingerprint,
                "implementation": getattr(ring, "implementation", type(ring).__name__),
                "vnodes": spec.vnodes,
                "nodes": nodes,
                "keys": {key: ring.node_for(ring_key(key)) for key in keys},
            }
        )
    return out


def handle(command: BaseCommand, **options: Any) -> None:
    groups: list[str] | None = options.get("group")
    unknown = sorted(set(groups or ()) - set(dbscale_settings.shard_groups))
    if unknown:
        raise CommandError(
            f"Unknown shard group(s) {unknown}; "
            f"configured: {sorted(dbscale_settings.shard_groups)}."
        )
    if not dbscale_settings.shard_groups:
        command.stdout.write("No shard groups configured (DBSCALE['SHARD_GROUPS'] is empty).")
        return
    if options.get("stamp"):
        for name, spec in dbscale_settings.shard_groups.items():
            if groups and name not in groups:
                continue
            for alias in spec.shards:
                try:
                    stamp = install_shard_functions(
                        alias, group=name, restamp=True, force=bool(options.get("force"))
                    )
                except ShardingError as exc:
                    raise CommandError(str(exc)) from exc
                finally:
                    connections[alias].close()
                command.stdout.write(
                    f"stamped {alias}: group {name}, ring "
                    f"{stamp.fingerprint if stamp else '?'}, shard number "
                    f"{stamp.shard_number if stamp else '?'}"
                )
    try:
        entries = collect(groups, list(options.get("key") or []), bool(options.get("verify")))
    except ShardingError as exc:
        raise CommandError(str(exc)) from exc
    if options.get("json"):
        command.stdout.write(json.dumps(entries, indent=2))
        return
    for entry in entries:
        command.stdout.write(
            f"group {entry['group']}: ring {entry['fingerprint']} ({entry['implementation']}, "
            f"vnodes={entry['vnodes']}, {len(entry['nodes'])} shards)"
        )
        for node in entry["nodes"]:
            share = (
                f"  share={node['share']:.1%} points={node['points']}" if "share" in node else ""
            )
            line = (
                f"  #{node['number']:<3} {node['alias']:<16} weight={node['weight']}{share}"
                f"  {node['server']}  replicas={','.join(node['replicas']) or '-'}"
            )
            if "stamp" in node:
                line += f"  stamp: {node['stamp']}"
            command.stdout.write(line)
        for key, alias in entry["keys"].items():
            command.stdout.write(f"  key {key!r} -> {alias}")
