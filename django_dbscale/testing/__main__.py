"""Command line for the test harness: ``python -m django_dbscale.testing {up,check}``.

``up``
    Boot the services (or attach, with ``DBSCALE_TEST_EXTERNAL=1``), print their
    description as JSON (``--format json``, the default) or as shell ``export`` lines
    (``--format env``, for another process to attach with ``DBSCALE_TEST_EXTERNAL=1``), then
    block until Ctrl-C or SIGTERM and tear everything down.
``check``
    Boot the services, verify that a row written on each primary database is replayed on
    its replica (read directly and through the proxy) and that Redis answers through its
    proxy, print a summary, tear down, and exit 0 on success or 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from types import FrameType

import psycopg

from django_dbscale.testing.harness import (
    ALIASES,
    PRIMARY_DATABASES,
    HarnessError,
    Services,
    start_services,
)


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks tear down the services."""
    raise SystemExit(128 + signum)


def _up(services: Services, fmt: str) -> int:
    """Print the description and block until interrupted."""
    if fmt == "env":
        for key, value in services.env().items():
            print(f"export {key}={shlex.quote(value)}")
    else:
        print(json.dumps(services.describe(), indent=2))
    sys.stdout.flush()
    print(f"services up in {services.boot_seconds:.2f}s; press Ctrl-C to stop", file=sys.stderr)
    threading.Event().wait()
    return 0  # pragma: no cover - only reached through an exception


def _redis_ping(url: str) -> bool:
    """Return True when Redis at ``url`` (``redis://host:port/db``) answers PING."""
    import socket

    hostport = url.split("//", 1)[1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


def _check(services: Services) -> int:
    """Verify replication and proxies; print one line per check; return the exit code."""
    failures = 0
    token = uuid.uuid4().hex
    for primary_name, dbnames in PRIMARY_DATABASES.items():
        primary = services.servers[primary_name]
        replica = services.servers[f"{primary_name}_replica"]
        for dbname in dbnames:
            started = time.monotonic()
            try:
                primary.execute(
                    "CREATE TABLE IF NOT EXISTS dbscale_harness_check (token text)", dbname=dbname
                )
                primary.execute(
                    "INSERT INTO dbscale_harness_check VALUES (%s)", [token], dbname=dbname
                )
                replica.wait_for_replay()
                direct = replica.execute(
                    "SELECT count(*) FROM dbscale_harness_check WHERE token = %s",
                    [token],
                    dbname=dbname,
                )[0][0]
                alias = next(
                    a for a, (s, d, _) in ALIASES.items() if s == replica.name and d == dbname
                )
                with psycopg.connect(services.dsn(alias)) as conn:
                    row = conn.execute(
                        "SELECT pg_is_in_recovery(), count(*) FROM dbscale_harness_check"
                        " WHERE token = %s",
                        [token],
                    ).fetchone()
                ok = direct == 1 and row == (True, 1)
                primary.execute("DROP TABLE dbscale_harness_check", dbname=dbname)
            except (HarnessError, psycopg.Error) as exc:
                ok = False
                print(f"  {primary_name}/{dbname}: {exc}", file=sys.stderr)
            failures += not ok
            elapsed = (time.monotonic() - started) * 1000
            print(
                f"{'ok ' if ok else 'FAIL'} {primary_name} -> {replica.name} {dbname}"
                f" ({elapsed:.0f} ms)"
            )
    try:
        ok = _redis_ping(services.redis_url())
    except OSError as exc:
        ok = False
        print(f"  redis: {exc}", file=sys.stderr)
    failures += not ok
    print(f"{'ok ' if ok else 'FAIL'} redis PING via proxy {services.redis_url()}")
    print(f"boot {services.boot_seconds:.2f}s; {'all checks passed' if not failures else 'FAILED'}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; return the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m django_dbscale.testing",
        description="Boot throwaway PostgreSQL (primaries + streaming replicas) and Redis.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="boot, print the description, block until Ctrl-C")
    up.add_argument("--format", choices=("json", "env"), default="json")
    up.add_argument("--dir", type=Path, default=None, help="parent dir (logs are kept there)")
    check = sub.add_parser("check", help="boot, verify replication and proxies, tear down")
    check.add_argument("--dir", type=Path, default=None, help="parent dir (logs are kept there)")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    try:
        services = start_services(args.dir)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "up":
            return _up(services, args.format)
        return _check(services)
    except KeyboardInterrupt:
        return 0
    finally:
        services.stop()


if __name__ == "__main__":
    sys.exit(main())
