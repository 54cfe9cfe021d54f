"""Routing overhead of dbscale's routers on a primary-key lookup (read/write splitting).

Run: ``python -m bench.bench_routing`` (or ``python3 noxfile.py -s bench``).

The same ``Note`` PK lookup on the same real streaming replica, three ways:

A. ``Note.objects.using(replica).get(pk=...)``: routing skipped altogether;
B. ``Note.objects.get(pk=...)`` with a one-line router returning the replica: the cost of
   Django's routing machinery itself, what a project pays with any router;
C. ``Note.objects.get(pk=...)`` through ``ShardRouter`` + ``ReplicaRouter`` (lag-aware,
   read-your-writes, pinned).

Blocks alternate (A C A C ..., then B C B C ...), one process, the router list swapped
between blocks; figures are medians of per-block means and of the paired differences and
ratios. The replica is reached directly, not through the harness's Python TCP proxy, whose
threads would add GIL noise. The routing decision is also timed inside the query loop (where
caches are cold, unlike a tight loop). Statements per read are counted on every connection.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

from bench._common import paired, setup_django, us

REPLICA = "default_replica_direct"


def main() -> int:
    setup_django()
    from django.conf import settings
    from django.db import connections, router
    from django.test.utils import CaptureQueriesContext, override_settings

    from django_dbscale import consistency, replicas
    from django_dbscale.testing.harness import get_services
    from tests.testapp.models import Note

    override_settings(
        DBSCALE={
            **settings.DBSCALE,
            "REPLICA_CHECK_INTERVAL": 1.0,  # production default
            "REPLICAS": {**settings.DBSCALE["REPLICAS"], "default": [REPLICA]},
        }
    ).enable()
    note = Note.objects.create(title="bench")
    get_services().pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    consistency.open_context()

    class ConstantRouter:
        def db_for_read(self, model: Any, **hints: Any) -> str:
            return REPLICA

    dbscale_routers = router.routers
    constant_routers = [ConstantRouter()]

    def skipped() -> None:
        Note.objects.using(REPLICA).get(pk=note.pk)

    def constant() -> None:
        router.routers = constant_routers
        Note.objects.get(pk=note.pk)

    def dbscale() -> None:
        router.routers = dbscale_routers
        Note.objects.get(pk=note.pk)

    for _ in range(300):
        skipped(), constant(), dbscale()
    assert Note.objects.filter(pk=note.pk).first()._state.db == REPLICA  # type: ignore[union-attr]

    vs_skipped = paired(skipped, dbscale, blocks=100, per_block=100)
    vs_constant = paired(constant, dbscale, blocks=100, per_block=100)

    # The decision itself, timed inside the query loop.
    decide = type(router).db_for_read
    samples: dict[str, list[int]] = {"constant": [], "dbscale": []}
    current: list[int] = []

    def timed(self: Any, model: Any, **hints: Any) -> Any:
        start = time.perf_counter_ns()
        result = decide(self, model, **hints)
        current.append(time.perf_counter_ns() - start)
        return result

    type(router).db_for_read = timed  # type: ignore[method-assign]
    try:
        for block in range(20):
            name = "constant" if block % 2 == 0 else "dbscale"
            router.routers = constant_routers if name == "constant" else dbscale_routers
            current.clear()
            for _ in range(200):
                Note.objects.get(pk=note.pk)
            samples[name].append(int(statistics.median(current)))
    finally:
        type(router).db_for_read = decide  # type: ignore[method-assign]
        router.routers = dbscale_routers
    decision = {k: statistics.median(v) / 1e9 for k, v in samples.items()}

    n = 200
    with (
        CaptureQueriesContext(connections[REPLICA]) as on_replica,
        CaptureQueriesContext(connections["default"]) as on_primary,
    ):
        for _ in range(n):
            Note.objects.get(pk=note.pk)

    overhead = vs_constant["diff"]
    print("Routing overhead: Note.objects.get(pk=...) on a real streaming replica")
    print(f"  A routing skipped (.using)        median {us(vs_skipped['a'])} per query")
    print(f"  B constant one-line router        median {us(vs_constant['a'])} per query")
    print(f"  C dbscale Shard+ReplicaRouter     median {us(vs_skipped['b'])} per query")
    print(f"  C - A paired median {us(vs_skipped['diff'])}   C / A {vs_skipped['ratio']:.4f}")
    print(f"  C - B paired median {us(overhead)}   C / B {vs_constant['ratio']:.4f}")
    print(
        f"  decision timed in the query loop: constant {us(decision['constant'])}, "
        f"dbscale {us(decision['dbscale'])}; "
        f"difference {(decision['dbscale'] - decision['constant']) / vs_skipped['a'] * 100:.2f}% "
        "of the query"
    )
    print(
        f"  statements per read: replica {len(on_replica.captured_queries) / n:.2f}, "
        f"primary {len(on_primary.captured_queries) / n:.2f} (target 1.00 / 0.00)"
    )
    # The target, judged on the end-to-end paired median against no routing at all (A).
    passed = vs_skipped["diff"] <= 5e-6
    print(f"  target: C - A <= 5 µs per query -> {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
