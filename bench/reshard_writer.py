"""The background writer of bench/bench_reshard.py, run in its own process.

``python -m bench.reshard_writer LOG STOP ACCOUNTS SEED RATE OLD NEW``: until the file STOP
exists, inserts an entry or updates the balance of a random account of the ``ledgers``
group through the ORM, about RATE writes per second (0: as fast as it can), and appends
one JSON line per committed write to LOG::

    {"t": 1700000000.123, "lat": 0.0012, "account": 17, "op": "entry", "moves": true,
     "retries": 0}

``t`` is the wall-clock time the write began (``time.time()``, to compare with the job
row's cutover time), ``lat`` the seconds until it committed, counting every refusal of a
moved key and its retry (by the library or by this loop) and every other error and its
retry; ``moves`` whether the account's owner differs between the rings OLD and NEW
(comma-separated shard aliases). A refusal or error is also logged as
``{"op": "retry", "account": n, "error": "..."}``; the last line is
``{"op": "summary", "writes": n, "errors": e, "max_seconds": x}``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time


def main() -> None:
    log_path, stop_path = sys.argv[1], sys.argv[2]
    accounts, seed, rate = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    old_shards, new_shards = sys.argv[6].split(","), sys.argv[7].split(",")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    from django.db import DatabaseError
    from django.db.models import F

    from django_dbscale.conf import ShardGroupSpec, dbscale_settings
    from django_dbscale.sharding import ShardMoved
    from django_dbscale.sharding.ring import build_ring
    from tests.testapp.models_reshard import LedgerAccount, LedgerEntry

    vnodes = dbscale_settings.shard_groups["ledgers"].vnodes
    old = build_ring(ShardGroupSpec("ledgers", tuple(old_shards), {}, vnodes))
    new = build_ring(ShardGroupSpec("ledgers", tuple(new_shards), {}, vnodes))
    rng = random.Random(seed)
    interval = 1.0 / rate if rate > 0 else 0.0
    seq = writes = errors = 0
    slowest = 0.0
    next_at = time.perf_counter()
    with open(log_path, "a", buffering=1) as log:
        while not os.path.exists(stop_path):
            if interval:
                now = time.perf_counter()
                if next_at > now:
                    time.sleep(next_at - now)
                # Paced from a schedule, without bursts to make up for a slow write.
                next_at = max(next_at + interval, time.perf_counter() - interval)
            account = rng.randrange(accounts)
            amount = rng.randrange(1, 100)
            entry = rng.random() < 0.5
            wall = time.time()
            started = time.perf_counter()
            retries = 0
            while True:
                try:
                    if entry:
                        seq += 1
                        LedgerEntry.objects.create(
                            account_id=account, amount=amount, writer_seq=seq
                        )
                    else:
                        updated = LedgerAccount.objects.filter(number=account).update(
                            balance=F("balance") + amount
                        )
                        assert updated == 1, (account, updated)
                    break
                except (ShardMoved, DatabaseError) as exc:
                    retries += 1
                    if not isinstance(exc, ShardMoved):
                        errors += 1
                        time.sleep(0.01)
                    log.write(
                        json.dumps(
                            {
                                "op": "retry",
                                "account": account,
                                "error": f"{type(exc).__name__}: {exc}"[:300],
                            }
                        )
                        + "\n"
                    )
                    if retries > 100:
                        raise
            latency = time.perf_counter() - started
            slowest = max(slowest, latency)
            key = str(account)
            log.write(
                json.dumps(
                    {
                        "t": wall,
                        "lat": latency,
                        "account": account,
                        "op": "entry" if entry else "balance",
                        "moves": old.node_for(key) != new.node_for(key),
                        "retries": retries,
                    }
                )
                + "\n"
            )
            writes += 1
        log.write(
            json.dumps(
                {"op": "summary", "writes": writes, "errors": errors, "max_seconds": slowest}
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
