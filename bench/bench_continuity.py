"""What trusting Redis costs: a full verification, and a new connection to a known server.

``python -m bench.bench_continuity``. A full verification (after a start, a fork or any
Redis error) runs in the background: it reads every primary's outbox and WAL position on
short-lived PostgreSQL connections and checks the server's run id; until it ends, the
process's cached reads go to the database. A new connection to the server already verified
costs an ``INFO`` and an ``EVAL`` on top of the connect.
"""

from __future__ import annotations

import statistics
import time

from bench._common import setup_django


def main() -> None:
    setup_django()
    from django_dbscale.cache import continuity, outbox
    from django_dbscale.cache.client import gateway

    gw = gateway()
    assert continuity.wait_until_verified()
    full, connect = [], []
    for _ in range(30):
        gw.connections_lost()
        started = time.perf_counter()
        assert continuity.wait_until_verified()
        full.append(time.perf_counter() - started)
        gw.close()
        started = time.perf_counter()
        gw.client.ping()  # a new connection: connect, INFO, EVAL, then the PING
        connect.append(time.perf_counter() - started)
    aliases = len(continuity._aliases())
    outboxes = len(outbox.outbox_aliases())
    print("== Redis verification (30 rounds)")
    print(
        f"   full verification, in the background ({aliases} aliases, {outboxes} outboxes): "
        f"median {statistics.median(full) * 1000:.1f} ms, max {max(full) * 1000:.1f} ms"
    )
    print(
        "   new connection to the verified server (connect + INFO + EVAL + PING): "
        f"median {statistics.median(connect) * 1000:.2f} ms"
    )


if __name__ == "__main__":
    main()
