"""Change capture: what it costs Django's writes, and how soon an external write is seen.

``python -m bench.bench_capture``.

1. **ORM write overhead.** The same ``update()`` (with its cache invalidation), timed in
   alternating blocks with the capture triggers removed (A) and installed (B), Django's
   sessions tagged ``dbscale.origin=django`` throughout (``CACHE["CAPTURE"]``): the paired
   ratio B / A is what the trigger's early return costs. Goal: <= 1.05.
2. **External write to invalidation.** A relay (``capture.relay``, in a thread) listens;
   another connection commits ``UPDATE``s; the time from each COMMIT's return to the table's
   version key changing in Redis. Goal: p99 < 50 ms on loopback.
"""

from __future__ import annotations

import statistics
import threading
import time

from bench._common import per_call, setup_django


def main() -> None:
    setup_django()
    from django.conf import settings
    from django.db import connections
    from django.db.models import F
    from django.test.utils import override_settings

    from django_dbscale.cache import capture, continuity, outbox
    from django_dbscale.cache.client import gateway
    from django_dbscale.cache.invalidation import write_keys
    from django_dbscale.cache.options import options
    from django_dbscale.testing.harness import get_services
    from tests.testapp.models_cache import CCounter

    cache = {**settings.DBSCALE["CACHE"], "CAPTURE": True}
    override = override_settings(DBSCALE={**settings.DBSCALE, "CACHE": cache})
    override.enable()
    connections.close_all()
    assert continuity.wait_until_verified()
    row = CCounter.objects.create(name="bench-capture", value=0)
    table = CCounter._meta.db_table

    def write() -> None:
        CCounter.objects.filter(pk=row.pk).update(value=F("value") + 1)

    for _ in range(200):
        write()  # warm up
    without, with_ = [], []
    for block in range(12):
        order = (False, True) if block % 2 == 0 else (True, False)
        for installed in order:
            if installed:
                capture.install("default", [table])
            else:
                capture.remove("default")
            (with_ if installed else without).append(per_call(write, 150))
    capture.remove("default")
    ratios = [b / a for a, b in zip(without, with_, strict=True)]
    print("== ORM update() with the capture trigger installed (B) or not (A), 12 paired blocks")
    print(
        f"   A {statistics.median(without) * 1e6:8.1f} µs   B {statistics.median(with_) * 1e6:8.1f}"
        f" µs   B / A {statistics.median(ratios):.3f} (range {min(ratios):.3f}-"
        f"{max(ratios):.3f})   goal <= 1.05"
    )

    capture.install("default", [table])
    stop = threading.Event()
    relay = threading.Thread(target=capture.relay, args=(["default"], stop), kwargs={"poll": 1.0})
    relay.start()
    key = write_keys(options().prefix, "default", table, None)[0]
    client = gateway().client
    pg1 = get_services().pg1
    delays = []
    try:
        time.sleep(0.3)  # the relay is listening
        for i in range(200):
            before = client.get(key)
            pg1.execute(
                f"UPDATE {table} SET value = %s WHERE id = %s", (i, row.pk), dbname="dbscale"
            )
            committed = time.perf_counter()
            while client.get(key) == before:
                if time.perf_counter() - committed > 5:
                    raise AssertionError("an external write was not invalidated within 5 s")
                time.sleep(0.0005)
            delays.append(time.perf_counter() - committed)
    finally:
        stop.set()
        relay.join(10)
        capture.remove("default")
    delays.sort()
    p99 = delays[int(len(delays) * 0.99) - 1]
    print("== External UPDATE (another connection) -> version bumped in Redis, 200 writes")
    print(
        f"   median {statistics.median(delays) * 1000:.1f} ms   p99 {p99 * 1000:.1f} ms   "
        f"max {delays[-1] * 1000:.1f} ms   goal p99 < 50 ms"
    )
    with outbox.connect("default") as own:
        assert not outbox.has_rows(own), "rows left in the outbox"
    override.disable()


if __name__ == "__main__":
    main()
