"""Routing overhead of ReplicaRouter on a primary-key lookup (issue: read/write splitting).

Run: ``python -m bench.bench_routing`` (or ``python3 noxfile.py -s bench``).

A: ``Note.objects.using("default_replica").get(pk=...)`` -- Django's routing skipped, the
   same replica, the same query. B: ``Note.objects.get(pk=...)`` through ``ReplicaRouter``
   (lag-aware, read-your-writes, pinned). Blocks alternate A B A B; figures are medians of
   per-block means and of the paired differences and ratios. Also times the routing
   decision alone against Django's router with no routers configured, and counts
   statements per read on every connection.
"""

from __future__ import annotations

import sys

from bench._common import paired, setup_django, us


def main() -> int:
    setup_django()
    from django.conf import settings
    from django.db import connections
    from django.test.utils import CaptureQueriesContext, override_settings

    from django_dbscale import consistency, replicas
    from tests.testapp.models import Note

    # Production defaults for the probe interval (the test settings probe every 0.2 s).
    override_settings(DBSCALE={**settings.DBSCALE, "REPLICA_CHECK_INTERVAL": 1.0}).enable()
    note = Note.objects.create(title="bench")
    from django_dbscale.testing.harness import get_services

    get_services().pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    consistency.open_context()
    assert Note.objects.get(pk=note.pk)._state.db == "default_replica"

    def unrouted() -> None:
        Note.objects.using("default_replica").get(pk=note.pk)

    def routed() -> None:
        Note.objects.get(pk=note.pk)

    for _ in range(200):  # warm both paths and the connection
        unrouted()
        routed()
    query = paired(unrouted, routed, blocks=100, per_block=100)

    # The decision alone: Django's router with no routers vs with dbscale's.
    from django.db.utils import ConnectionRouter

    no_routers = ConnectionRouter([])
    ours = ConnectionRouter(
        ["django_dbscale.routers.ShardRouter", "django_dbscale.routers.ReplicaRouter"]
    )
    decision = paired(
        lambda: no_routers.db_for_read(Note),
        lambda: ours.db_for_read(Note),
        blocks=60,
        per_block=2000,
    )

    n = 200
    with (
        CaptureQueriesContext(connections["default_replica"]) as rq,
        CaptureQueriesContext(connections["default"]) as pq,
    ):
        for _ in range(n):
            routed()
    print("Routing overhead, ReplicaRouter, PK lookup on a real replica")
    print(f"  A unrouted .using(replica).get(pk)   median {us(query['a'])} per query")
    print(f"  B routed   .get(pk)                  median {us(query['b'])} per query")
    print(f"  paired B-A (routing overhead)        median {us(query['diff'])}")
    print(f"  paired B/A                           median {query['ratio']:.4f}")
    print(
        f"  routing decision alone: no routers {us(decision['a'])}, dbscale {us(decision['b'])}, "
        f"overhead {us(decision['diff'])} = {decision['diff'] / query['a'] * 100:.2f}% of the query"
    )
    print(
        f"  statements per read: replica {len(rq.captured_queries) / n:.2f}, "
        f"primary {len(pq.captured_queries) / n:.2f} (zero extra round trips: 1.00 / 0.00)"
    )
    print(
        f"  target: decision overhead <= 5 µs -> {'PASS' if decision['diff'] <= 5e-6 else 'FAIL'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
