"""Run the soak: services, gunicorn, users, a worker and the fault schedule; then check.

``python -m soak [--duration 60] [--full] [--promotion] [--users 16] [--out DIR]`` from the
repository root, in an environment with the ``soak`` and ``test`` extras. Exit code 0 when
the checker finds no violation, 1 when it finds one, 2 when the run itself could not be
carried out.
The logs stay in ``--out`` (default: a new ``soak-*`` temp dir, printed) and can be
re-checked with ``python -m soak.checker DIR``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from django_dbscale.testing.harness import (
    ALIASES,
    HarnessError,
    PgFailoverCluster,
    PgServer,
    Services,
    start_services,
)
from soak import faults
from soak.oplog import OpLog

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _primary_aliases() -> list[str]:
    return [alias for alias, (_, _, mirror) in ALIASES.items() if mirror is None]


def _on_cluster(
    databases: dict[str, dict[str, Any]], cluster: PgFailoverCluster, reader: PgServer
) -> dict[str, dict[str, Any]]:
    """Return *databases* with ``default`` and ``default_replica`` moved onto *cluster*.

    ``default`` names every server of the cluster in a libpq multi-host list with
    ``target_session_attrs=read-write``: each new connection reaches whichever server
    accepts writes, so after a promotion the gunicorn workers and the background worker
    write to the new primary without a restart or a settings change. ``default_replica``
    names *reader* only, the replica that is never promoted (``target_session_attrs=
    standby`` refuses it should it ever not be one): the library's replica probe does not
    pass ``target_session_attrs`` on (it connects to the first host that answers), so a
    multi-host replica alias would be probed on one server and read on another.
    """
    servers = cluster.servers
    default = databases["default"]
    default.update(
        HOST=",".join(server.host for server in servers),
        PORT=",".join(str(server.port) for server in servers),
        USER=servers[0].user,
        PASSWORD=servers[0].password,
        OPTIONS={"target_session_attrs": "read-write", "connect_timeout": 2},
    )
    databases["default_replica"].update(
        HOST=reader.host,
        PORT=str(reader.port),
        USER=reader.user,
        PASSWORD=reader.password,
        OPTIONS={"target_session_attrs": "standby", "connect_timeout": 2},
    )
    return databases


def _migrate() -> None:
    """Create the soak's tables (and the library's) on every primary, as a deploy does."""
    from django.core.management import call_command
    from django.db import connections

    call_command("dbscale", "migrate", "--run-syncdb", verbosity=0)
    connections.close_all()


def _start_gunicorn(out: Path, port: int, workers: int, threads: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "soak.wsgi:application",
        "--workers",
        str(workers),
        "--worker-class",
        "gthread",
        "--threads",
        str(threads),
        "--bind",
        f"127.0.0.1:{port}",
        "--timeout",
        "60",
        "--graceful-timeout",
        "10",
        "--log-level",
        "warning",
        "--error-logfile",
        str(out / "gunicorn.log"),
    ]
    with open(out / "app.log", "ab") as app_log:  # the library's warnings, per worker
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=app_log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/soak/health", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log = (out / "gunicorn.log").read_text(errors="replace")[-3000:]
                raise HarnessError(f"gunicorn did not come up:\n{log}") from None
            time.sleep(0.2)


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _placement(users: list[int]) -> dict[str, str]:
    from django_dbscale.sharding import shard_for_key
    from soak.models import GROUP

    return {str(user): shard_for_key(GROUP, user) for user in users}


def _meta(
    services: Services,
    users: list[int],
    args: argparse.Namespace,
    cluster: PgFailoverCluster | None = None,
) -> dict[str, Any]:
    """Describe the run for the checker: placement, which server each alias depends on, DSNs.

    With *cluster* (``--promotion``), ``default`` depends on :data:`faults.FAILOVER` (the
    name the promotion fault logs) and its rows are read on the cluster's primary at the
    end of the run, whichever server that is by then.
    """
    from django.conf import settings

    primaries = _primary_aliases()
    meta: dict[str, Any] = {
        "duration": args.duration,
        "full": args.full,
        "promotion": args.promotion,
        "users": users,
        "placement": _placement(users),
        "alias_server": {alias: ALIASES[alias][0] for alias in primaries},
        "replica_server": {"pg1": "pg1_replica", "pg2": "pg2_replica"},
        "max_replica_lag": settings.DBSCALE["MAX_REPLICA_LAG"],
        "replica_check_interval": settings.DBSCALE["REPLICA_CHECK_INTERVAL"],
        "dsn": {
            alias: services.servers[ALIASES[alias][0]].dsn(ALIASES[alias][1]) for alias in primaries
        },
    }
    if cluster is not None:
        meta["alias_server"]["default"] = faults.FAILOVER
        meta["replica_server"][faults.FAILOVER] = faults.FAILOVER_REPLICA
        meta["dsn"]["default"] = cluster.primary.dsn(ALIASES["default"][1])
    return meta


def run(args: argparse.Namespace) -> int:
    """Carry out one soak run; return the exit code."""
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="soak-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"soak: logs in {out}", flush=True)
    services = start_services()
    gunicorn: subprocess.Popen[bytes] | None = None
    children: list[Any] = []
    schedule: faults.Schedule | None = None
    sentinel: Any = None
    cluster: PgFailoverCluster | None = None
    reader: PgServer | None = None
    try:
        handover: dict[str, Any] = {
            "databases": services.databases(),
            "redis": services.redis_url(1),
        }
        if args.sentinel:
            from django_dbscale.testing.harness import start_redis_sentinel

            sentinel = start_redis_sentinel(services)
            handover["cache"] = sentinel.cache_settings(1)
        if args.promotion:
            from django_dbscale.testing.harness import start_failover_cluster

            cluster = start_failover_cluster(
                services, replicas=2, databases=(ALIASES["default"][1],)
            )
            reader = cluster.replicas[-1]
            handover["databases"] = _on_cluster(handover["databases"], cluster, reader)
        services_json = json.dumps(handover)
        os.environ["DBSCALE_SOAK_SERVICES"] = services_json
        os.environ["DJANGO_SETTINGS_MODULE"] = "soak.settings"
        import django

        django.setup()
        _migrate()
        port = _free_port()
        gunicorn = _start_gunicorn(out, port, args.workers, args.threads)
        users = list(range(1, args.users + 1))
        base_url = f"http://127.0.0.1:{port}"
        ctx = multiprocessing.get_context("spawn")
        handoff = ctx.Queue(maxsize=200)
        start = time.monotonic()
        deadline = start + args.duration
        from soak.users import run_users
        from soak.worker import run_worker

        children.append(
            ctx.Process(
                target=run_worker,
                args=(str(out), handoff, deadline + 2, services_json),
                name="soak-worker",
            )
        )
        for index in range(args.processes):
            chunk = users[index :: args.processes]
            children.append(
                ctx.Process(
                    target=run_users,
                    args=(
                        chunk,
                        users,
                        base_url,
                        str(out),
                        deadline,
                        handoff,
                        args.seed,
                    ),
                    name=f"soak-users-{index}",
                )
            )
        for child in children:
            child.start()
        fault_log = OpLog(out / "faults.jsonl")
        schedule = faults.Schedule(
            faults.Targets(services, sentinel, cluster, reader),
            faults.plan(args.duration, args.full, args.sentinel, args.promotion),
            fault_log,
            start,
        )
        schedule.start()
        print(
            f"soak: {len(users)} users, {args.workers} gunicorn workers x {args.threads} threads,"
            f" {len(schedule.faults)} faults over {args.duration:.0f}s",
            flush=True,
        )
        for child in children:
            child.join(timeout=max(1.0, deadline - time.monotonic()) + 120)
        schedule.stopping.set()
        schedule.join(timeout=120)
        fault_log.close()
        hung = [child.name for child in children if child.is_alive()]
        if hung or schedule.errors:
            print(f"soak: run failed: hung {hung}, fault errors {schedule.errors}", flush=True)
            return 2
        _stop_process(gunicorn)
        services.wait_for_replicas(timeout=60)
        if cluster is not None:
            cluster.wait_for_replay(timeout=60)
        meta = _meta(services, users, args, cluster)
        meta["wall_seconds"] = time.monotonic() - start
        (out / "run.json").write_text(json.dumps(meta, indent=2))
        from soak import checker

        report = checker.check_dir(out)
        print(report.table(), flush=True)
        print(f"soak: logs in {out}", flush=True)
        return 0 if report.ok else 1
    finally:
        if schedule is not None:
            schedule.stopping.set()
        for child in children:
            if child.is_alive():
                child.terminate()
        if gunicorn is not None:
            _stop_process(gunicorn)
        if sentinel is not None:
            sentinel.stop()
        if cluster is not None:
            cluster.stop()
        services.stop()


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the soak."""
    parser = argparse.ArgumentParser(prog="python -m soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (>= 30)")
    parser.add_argument("--full", action="store_true", help="the full fault schedule, repeated")
    parser.add_argument(
        "--sentinel",
        action="store_true",
        help="run the cache on Redis Sentinel; Redis faults become failovers",
    )
    parser.add_argument(
        "--promotion",
        action="store_true",
        help="run default on a primary with two replicas and add a planned switchover fault",
    )
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--processes", type=int, default=2, help="user processes")
    parser.add_argument("--workers", type=int, default=3, help="gunicorn workers")
    parser.add_argument("--threads", type=int, default=4, help="threads per gunicorn worker")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None, help="log directory (default: a new temp dir)")
    args = parser.parse_args(argv)
    if args.duration < 30:
        parser.error("--duration must be at least 30 seconds")
    if args.users < 2 or args.processes < 1 or args.users < args.processes:
        parser.error("--users must be >= 2 and >= --processes")
    try:
        return run(args)
    except HarnessError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
