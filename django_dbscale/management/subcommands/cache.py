"""``manage.py dbscale cache``: counters, Redis state, and invalidation by hand.

::

    manage.py dbscale cache                      # counters per model, over all processes
    manage.py dbscale cache --json
    manage.py dbscale cache invalidate shop.Order [--database default]
    manage.py dbscale cache invalidate --all [--database default]
    manage.py dbscale cache clear                # delete every key under CACHE["PREFIX"]
    manage.py dbscale cache capture [--database default]   # install the capture triggers
    manage.py dbscale cache capture --remove [--database default]
    manage.py dbscale cache relay                # drain captured external writes (service)
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError

HELP = "Show queryset cache counters per model; invalidate models or clear the cache."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        nargs="?",
        default="stats",
        choices=["stats", "invalidate", "clear", "capture", "relay"],
        help="stats (default), invalidate MODEL... or --all, clear, capture, relay.",
    )
    parser.add_argument("--remove", action="store_true", help="capture: drop the triggers.")
    parser.add_argument(
        "--poll", type=float, default=1.0, help="relay: seconds between outbox checks."
    )
    parser.add_argument("models", nargs="*", help="Model labels for 'invalidate'.")
    parser.add_argument("--all", action="store_true", help="Invalidate every table.")
    parser.add_argument("--database", default=None, help="Database alias (default: routed).")
    parser.add_argument("--json", action="store_true", help="Print JSON.")


def _stats(command: BaseCommand, as_json: bool) -> None:
    from django_dbscale.cache import cache_stats
    from django_dbscale.cache.client import gateway
    from django_dbscale.cache.options import options

    opts = options()
    counters = cache_stats()
    breaker = gateway().breaker.state
    if as_json:
        command.stdout.write(json.dumps({"breaker": breaker, "counters": counters}, indent=2))
        return
    command.stdout.write(
        f"cache alias {opts.alias!r}, prefix {opts.prefix!r}, enabled={opts.enabled}, "
        f"circuit breaker {breaker}"
    )
    if not counters:
        command.stdout.write("no reads or invalidations counted yet")
        return
    events = ["hit", "miss", "store", "rejected", "bypass", "too_big", "error", "invalidation"]
    command.stdout.write(f"{'model':<40} " + " ".join(f"{e:>12}" for e in events) + "   hit rate")
    for label in sorted(counters):
        row = counters[label]
        reads = row.get("hit", 0) + row.get("miss", 0) + row.get("bypass", 0)
        rate = f"{100 * row.get('hit', 0) / reads:6.1f}%" if reads else "      -"
        command.stdout.write(
            f"{label:<40} " + " ".join(f"{row.get(e, 0):>12}" for e in events) + f"   {rate}"
        )


def handle(command: BaseCommand, **options: Any) -> None:
    from redis.exceptions import RedisError

    from django_dbscale.cache import invalidate_all, invalidate_model
    from django_dbscale.cache.client import RedisUnavailable, gateway
    from django_dbscale.cache.invalidation import flush_pending
    from django_dbscale.cache.options import options as cache_options

    action = options["action"]
    if action in ("capture", "relay"):
        _capture_or_relay(command, action, options)
        return
    if action == "stats":
        _stats(command, bool(options.get("json")))
        return
    if action == "invalidate":
        if options["all"]:
            invalidate_all(options["database"] or "default")
        elif options["models"]:
            for label in options["models"]:
                try:
                    invalidate_model(label, using=options["database"])
                except (ValueError, TypeError) as exc:
                    raise CommandError(str(exc)) from exc
        else:
            raise CommandError("Name models to invalidate (app_label.ModelName ...) or pass --all.")
        if not flush_pending():
            raise CommandError("Redis is unreachable: the invalidations could not be delivered.")
        command.stdout.write("invalidated")
        return
    prefix = cache_options().prefix
    deleted = 0
    try:
        client = gateway().client
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += client.delete(*batch)
                batch.clear()
        if batch:
            deleted += client.delete(*batch)
    except (RedisUnavailable, RedisError, OSError) as exc:
        raise CommandError(f"Redis is unreachable: {exc}") from exc
    command.stdout.write(f"deleted {deleted} keys under {prefix!r}")


def _primaries(database: str | None) -> list[str]:
    from django_dbscale.cache.outbox import outbox_aliases

    aliases = outbox_aliases()
    if database is not None:
        if database not in aliases:
            raise CommandError(
                f"--database {database!r} is not a primary using the dbscale ENGINE "
                f"(primaries: {aliases})."
            )
        return [database]
    return aliases


def _capture_or_relay(command: BaseCommand, action: str, options: dict[str, Any]) -> None:
    import threading

    from django_dbscale.cache import capture

    aliases = _primaries(options["database"])
    if action == "capture":
        for alias in aliases:
            if options["remove"]:
                tables = capture.remove(alias)
                command.stdout.write(f"{alias}: capture removed from {len(tables)} tables")
            else:
                tables = capture.install(alias)
                command.stdout.write(f"{alias}: capturing writes to {len(tables)} tables")
        return
    if options["poll"] <= 0:
        raise CommandError("--poll must be a number of seconds > 0.")
    stop = threading.Event()
    command.stdout.write(f"relaying captured writes of {aliases} (Ctrl-C stops)")
    try:
        capture.relay(aliases, stop, poll=options["poll"])
    except KeyboardInterrupt:
        stop.set()
