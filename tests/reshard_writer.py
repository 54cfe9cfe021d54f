"""A background writer for tests/test_reshard.py, run in its own process.

``python -m tests.reshard_writer LOG STOP ACCOUNTS SEED``: until the file STOP exists,
inserts entries and updates balances of random accounts of the ``ledgers`` group through
the ORM, and appends one JSON line per committed write to LOG:
``{"op": "entry", "account": n, "seq": s, "amount": a}`` or
``{"op": "balance", "account": n, "delta": d}``, plus ``{"op": "retry", ...}`` for each
write a shard refused because its key had moved (then retried), and a final
``{"op": "summary", "writes": n, "max_seconds": x}`` with the slowest write.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time


def main() -> None:
    log_path, stop_path, accounts, seed = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
    )
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    from django.db.models import F

    from django_dbscale.sharding import ShardMoved
    from tests.testapp.models_reshard import LedgerAccount, LedgerEntry

    rng = random.Random(seed)
    seq = 0
    writes = 0
    slowest = 0.0
    with open(log_path, "a", buffering=1) as log:
        while not os.path.exists(stop_path):
            account = rng.randrange(accounts)
            amount = rng.randrange(1, 100)
            started = time.monotonic()
            while True:
                try:
                    if rng.random() < 0.5:
                        seq += 1
                        LedgerEntry.objects.create(
                            account_id=account, amount=amount, writer_seq=seq
                        )
                        record = {"op": "entry", "account": account, "seq": seq, "amount": amount}
                    else:
                        updated = LedgerAccount.objects.filter(number=account).update(
                            balance=F("balance") + amount
                        )
                        assert updated == 1, (account, updated)
                        record = {"op": "balance", "account": account, "delta": amount}
                    break
                except ShardMoved as exc:
                    log.write(
                        json.dumps({"op": "retry", "account": account, "error": str(exc)}) + "\n"
                    )
            slowest = max(slowest, time.monotonic() - started)
            log.write(json.dumps(record) + "\n")
            writes += 1
        log.write(json.dumps({"op": "summary", "writes": writes, "max_seconds": slowest}) + "\n")


if __name__ == "__main__":
    main()
