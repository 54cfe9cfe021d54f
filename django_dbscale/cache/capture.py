"""Change capture: writes made outside Django invalidate the cache too.

Django's own writes are described by the backend (compiler and raw SQL). A write from
psql, another service or a cron job in another language is not; PostgreSQL sees it, so
PostgreSQL reports it:

* :func:`install` puts two statement-level triggers on every table of a database that the
  cache can read (``AFTER INSERT OR UPDATE OR DELETE`` and ``AFTER TRUNCATE``). In the
  writer's own transaction they insert the table's version keys into the cache outbox
  (:mod:`~django_dbscale.cache.outbox`) and ``NOTIFY dbscale_cache``. Nothing is lost if
  nobody listens: the row waits in the outbox.
* Sessions of the dbscale backend carry ``dbscale.origin=django`` (a startup option, set
  when ``CACHE["CAPTURE"]`` is on), and the trigger returns at once for them: the
  library's own writes do not pay twice.
* :func:`relay` (``manage.py dbscale cache relay``, one long-running process per
  deployment) listens on every primary and, on each notification (and every
  ``poll`` seconds as a safety net), has the outbox drained into Redis by
  :mod:`~django_dbscale.cache.continuity`: the versions are bumped with the primary's WAL
  position, like any invalidation.

Why triggers and a relay rather than logical decoding: triggers need no replication slot
(none to leak WAL when the relay is down), work on managed databases that forbid
``wal_level=logical`` changes, fire for ``TRUNCATE``, and ride the outbox and drain that
already exist; a slot would see every write of the cluster without a table list to keep up
to date, at the price of a slot per database and a decoder. Statement-level triggers cost
the external writer one outbox row per statement, not per row.

Limits: dimension values of external writes are unknown (the table's wide version is
bumped); staleness after an external COMMIT is bounded by the relay's notification round
trip and drain (measured in ``docs/cache.md``), and by ``poll`` if a notification is lost;
while no relay runs, external writes wait in the outbox (``dbscale status`` shows them).
"""

from __future__ import annotations

import logging
import selectors
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from django.apps import apps
from django.db import router
from psycopg import sql

from django_dbscale.cache import continuity, outbox
from django_dbscale.cache.invalidation import write_keys
from django_dbscale.cache.options import options, primary_alias

__all__ = ["CHANNEL", "install", "installed_tables", "relay", "remove", "tables_for"]

logger = logging.getLogger("django_dbscale.cache")

CHANNEL = "dbscale_cache"
FUNCTION = "dbscale_capture"
TRIGGER = "dbscale_capture"
TRUNCATE_TRIGGER = "dbscale_capture_truncate"

_FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF coalesce(current_setting('dbscale.origin', true), '') = 'django' THEN
    RETURN NULL;
  END IF;
  INSERT INTO {outbox.TABLE} (keys) VALUES (TG_ARGV[0]);
  PERFORM pg_notify('{CHANNEL}', TG_TABLE_NAME);
  RETURN NULL;
END
$$
"""


def tables_for(alias: str) -> list[str]:
    """Return the tables of installed models that live on database *alias* (sorted)."""
    tables: set[str] = set()
    for model in apps.get_models(include_auto_created=True):
        meta = model._meta
        if meta.proxy or not meta.managed or meta.db_table == outbox.TABLE:
            continue
        if router.allow_migrate_model(alias, model):
            tables.add(meta.db_table)
    return sorted(tables)


def install(alias: str, tables: Iterable[str] | None = None) -> list[str]:
    """Install the capture triggers on *alias*'s tables; return the tables done (idempotent)."""
    name = primary_alias(alias)
    prefix = options().prefix
    done: list[str] = []
    with outbox.connect(alias) as own, own.transaction():
        own.execute(_FUNCTION_SQL)
        for table in tables if tables is not None else tables_for(alias):
            (exists,) = own.execute("SELECT to_regclass(%s) IS NOT NULL", [table]).fetchone()  # type: ignore[misc]
            if not exists:
                continue
            keys = "\n".join(write_keys(prefix, name, table, None))
            for trigger, events in (
                (TRIGGER, "INSERT OR UPDATE OR DELETE"),
                (TRUNCATE_TRIGGER, "TRUNCATE"),
            ):
                own.execute(
                    sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                        sql.Identifier(trigger), sql.Identifier(table)
                    )
                )
                own.execute(
                    sql.SQL(
                        "CREATE TRIGGER {} AFTER " + events + " ON {} FOR EACH STATEMENT "
                        "EXECUTE FUNCTION {}({})"
                    ).format(
                        sql.Identifier(trigger),
                        sql.Identifier(table),
                        sql.Identifier(FUNCTION),
                        sql.Literal(keys),
                    )
                )
            done.append(table)
    return done


def remove(alias: str) -> list[str]:
    """Drop every capture trigger and the function from *alias*; return the tables."""
    with outbox.connect(alias) as own, own.transaction():
        tables = installed_tables(own)
        for table in tables:
            for trigger in (TRIGGER, TRUNCATE_TRIGGER):
                own.execute(
                    sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                        sql.Identifier(trigger), sql.Identifier(table)
                    )
                )
        own.execute(f"DROP FUNCTION IF EXISTS {FUNCTION}()")
    return tables


def installed_tables(own: Any) -> list[str]:
    """Return the tables that carry the capture trigger, on connection *own*."""
    rows = own.execute(
        "SELECT DISTINCT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "WHERE t.tgname = %s ORDER BY 1",
        [TRIGGER],
    ).fetchall()
    return [str(row[0]) for row in rows]


def _heartbeat(aliases: list[str], ttl: int) -> None:
    """Tell every process that a relay serves *aliases* (they drain by themselves if not)."""
    from django_dbscale.cache.client import gateway

    prefix = options().prefix
    try:
        pipe = gateway().client.pipeline(transaction=False)
        for alias in aliases:
            pipe.set(continuity.relay_key(prefix, alias), "1", ex=ttl)
        pipe.execute()
    except Exception as exc:  # Redis down or cut: the processes drain by themselves
        logger.warning("The relay could not refresh its heartbeat: %s", exc)


def relay(
    aliases: Iterable[str],
    stop: threading.Event,
    *,
    poll: float = 1.0,
    on_drained: Callable[[set[str]], None] | None = None,
) -> None:
    """Drain the outboxes of *aliases* into Redis as external writes are notified.

    Listens on one connection per database; a notification, or rows found by the check
    every *poll* seconds, hands the database to the continuity thread, which drains it.
    Notifications that arrive while a drain runs are coalesced into the next one. Returns
    when *stop* is set.
    """
    listeners: dict[str, Any] = {}
    for alias in sorted({primary_alias(alias) for alias in aliases}):
        own = outbox.connect(alias)
        if outbox.in_recovery(own):  # a standby under an alias of its own: no writes there
            own.close()
            continue
        listeners[alias] = own
    names = sorted(listeners)
    selector = selectors.DefaultSelector()
    try:
        for alias, own in listeners.items():
            own.execute(f"LISTEN {CHANNEL}")
            selector.register(own.fileno(), selectors.EVENT_READ, alias)
        next_check = 0.0
        beat_ttl = max(3, int(3 * poll) + 1)
        while not stop.is_set():
            _heartbeat(names, beat_ttl)
            due: set[str] = set()
            for key, _ in selector.select(timeout=min(poll, 0.5)):
                alias = key.data
                if any(True for _ in listeners[alias].notifies(timeout=0)):
                    due.add(alias)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + poll
                due |= {a for a, own in listeners.items() if outbox.has_rows(own)}
            if not due:
                continue
            for alias in sorted(due):
                continuity.owe(alias)
            if not continuity.wait_until_verified(timeout=30):
                logger.warning("The relay could not drain %s yet; retrying.", sorted(due))
                continue
            if on_drained is not None:
                on_drained(due)
    finally:
        selector.close()
        for own in listeners.values():
            own.close()
