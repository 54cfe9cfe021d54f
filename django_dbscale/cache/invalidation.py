"""Invalidation: turning committed writes into version bumps, exactly once per commit.

Every ORM write statement reaches :func:`record_write` through the backend's
:data:`~django_dbscale.backends.events.statement_wrote` event, with its table and, when the
model has dimensions, the dimension values of the rows it touched (``None`` when unknown).
What happens next depends on the connection:

* **Autocommit**: the statement has committed when it returns; the versions are bumped at
  once, in one pipelined Redis round trip, with the primary's WAL position.
* **Inside a transaction** (``atomic()`` or ``set_autocommit(False)``): the keys are added
  to the transaction's pending set and the tables to its *dirty* set (reads of dirty
  tables bypass the cache until the transaction ends). The receiver of
  ``transaction_committed`` bumps everything in one round trip right after COMMIT, before
  Django's ``on_commit`` callbacks run (so they read fresh data); the receiver of
  ``transaction_rolled_back`` drops the set. A
  savepoint rollback keeps the keys: bumping keys of rolled-back writes as well is
  harmless (it only costs misses).

Invalidations that cannot reach Redis (down, cut off, breaker open) are kept in a
process-wide pending set and delivered before this process uses the cache again, or by a
background timer retrying every breaker cooldown, whichever comes first; until they are,
every cached read in this process goes to the database. They are also written to the
database's outbox (:mod:`~django_dbscale.cache.outbox`), inside the transaction when Redis
is already known to be down: that copy survives this process and reaches the others, which
drain it before they use Redis again (:mod:`~django_dbscale.cache.continuity`).

The transaction state lives on the connection object because it belongs to the
connection's transaction (Django keeps connections per thread and per async task).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from django.db import DatabaseError, connections
from redis.exceptions import NoScriptError

from django_dbscale import consistency
from django_dbscale.backends import events
from django_dbscale.cache import continuity, outbox, stats
from django_dbscale.cache.analysis import MAX_DIMENSION_VALUES, dimensions_from_where
from django_dbscale.cache.client import RedisUnavailable, bump_call, gateway, pack
from django_dbscale.cache.dimensions import dimension_fields_for_table
from django_dbscale.cache.keys import (
    UNKNOWN_LSN,
    canonical_dimension,
    version_key,
    wide_version_key,
)
from django_dbscale.cache.options import options, primary_alias
from django_dbscale.cache.signals import cache_invalidated
from django_dbscale.conf import dbscale_settings

__all__ = [
    "confirm",
    "dirty_tables",
    "flush_pending",
    "has_pending",
    "invalidate_tables",
    "record_write",
    "write_keys",
]

logger = logging.getLogger("django_dbscale.cache")

#: Above this many pending keys, dimension keys collapse into their table's "wide" key.
MAX_PENDING_KEYS = 10_000


def write_keys(prefix: str, alias: str, table: str, dims: Iterable[str] | None) -> list[str]:
    """Return the version keys a write to *table* bumps.

    The table version always; the dimension versions of the touched values when they are
    known, else the table's "wide" version (which every dimension-filtered read of the
    table depends on). Writes to tables without dimensions bump "wide" too, so a later
    deploy that declares dimensions never misses a write by older code.
    """
    keys = [version_key(prefix, alias, table, "a")]
    if dims is None:
        keys.append(version_key(prefix, alias, table, "w"))
    else:
        keys.extend(version_key(prefix, alias, table, "d", dim) for dim in dims)
    return keys


# -- transactions -----------------------------------------------------------------------


@dataclass
class _TxState:
    keys: dict[str, set[str]] = field(default_factory=dict)
    tables: dict[str, set[str]] = field(default_factory=dict)
    #: Whether the keys went into the outbox inside the transaction (before COMMIT).
    outboxed: bool = False


def in_transaction(connection: Any) -> bool:
    """Return whether *connection* is inside ``atomic()`` or a manual transaction."""
    return bool(connection.in_atomic_block) or not getattr(connection, "autocommit", True)


def dirty_tables(alias: str) -> set[str] | None:
    """Return the tables written in the open transaction on connection *alias* (or none)."""
    connection = connections[alias]
    if not in_transaction(connection):
        return None
    state: _TxState | None = getattr(connection, "_dbscale_cache_tx", None)
    if state is None:
        return None
    return state.tables.get(primary_alias(alias))


def _before_commit(connection: Any, **kwargs: Any) -> None:
    """Pre-commit listener: if Redis is known to be down, write the outbox in the transaction.

    Then the write and its owed invalidation commit together: a crash right after COMMIT
    cannot lose it. When Redis is believed up, nothing is written here (no cost); a
    delivery that fails after COMMIT writes the outbox then (see :func:`deliver`).
    """
    state: _TxState | None = getattr(connection, "_dbscale_cache_tx", None)
    if state is None or not state.keys:
        return
    state.outboxed = False  # a COMMIT that failed earlier may have left it set
    if _in_flight:
        confirm()  # deliveries sent without waiting: delivered, or lost?
    # Not has_pending(): another thread's invalidations are pending while it sends them,
    # which says nothing about Redis (threaded workers, `dbscale migrate`'s threads).
    if not _failing[0] and gateway().breaker.state == "closed":
        return
    try:
        keys = set().union(*state.keys.values())
        state.outboxed = outbox.record_in_transaction(connection, keys)
    except Exception:  # never fail the user's COMMIT; delivery after it writes the outbox
        logger.exception("Could not write the cache outbox before COMMIT.")
        return
    if state.outboxed:
        stats.incr(f"db:{connection.alias}", "outboxed")


def _on_commit(connection: Any, **kwargs: Any) -> None:
    """Commit listener of the dbscale backend: deliver the transaction's invalidations.

    Runs right after COMMIT and before Django's ``on_commit`` callbacks, so those read
    invalidated caches; covers ``atomic()`` and ``set_autocommit(False)`` transactions.
    """
    state: _TxState | None = getattr(connection, "_dbscale_cache_tx", None)
    if state is None:
        return
    connection._dbscale_cache_tx = None
    try:
        batch = {a: (k, state.tables.get(a, set())) for a, k in state.keys.items()}
        positions: dict[str, int] | None = None
        if not getattr(connection, "autocommit", True) and connection.connection is not None:
            # Still in non-autocommit mode (Django restores autocommit after the
            # listeners; manual transactions stay in it): the position query opens a
            # transaction, which must be closed before anyone else uses the connection.
            try:
                positions = {alias: _position(alias) for alias in batch}
            finally:
                raw = connection.connection
                try:
                    if raw is not None and raw.info.transaction_status != 0:  # not IDLE
                        raw.rollback()
                except Exception:
                    logger.warning("Could not end the WAL position query's transaction.")
        deliver(batch, positions, outboxed=state.outboxed)
    except Exception:  # listeners must not raise: the COMMIT already happened
        logger.exception("Could not deliver the invalidations of a committed transaction.")


def _before_token(**kwargs: Any) -> None:
    """Before a consistency token leaves this context: confirm the invalidations in flight.

    The token's holder (the next request, a task) may read from another process at once;
    the writes the token covers must have invalidated the cache by then.
    """
    if _pending_keys:
        flush_pending()


def _on_rollback(connection: Any, **kwargs: Any) -> None:
    """Rollback listener: the transaction's writes are gone, and so are its invalidations."""
    connection._dbscale_cache_tx = None


def connect_receivers() -> None:
    """Subscribe to the backend's write and transaction events (the cache app's ``ready()``)."""
    consistency.token_issuing.connect(_before_token, dispatch_uid="dbscale_cache_token")
    events.statement_wrote.connect(_on_statement_wrote, dispatch_uid="dbscale_cache_write")
    events.transaction_committing.connect(_before_commit, dispatch_uid="dbscale_cache_precommit")
    events.transaction_committed.connect(_on_commit, dispatch_uid="dbscale_cache_commit")
    events.transaction_rolled_back.connect(_on_rollback, dispatch_uid="dbscale_cache_rollback")
    events.describe_writes_with(_WRITE_ANALYSIS)


class _DimensionAnalysis:
    """The cache's :class:`~django_dbscale.backends.events.WriteAnalysis`: its dimensions."""

    max_values = MAX_DIMENSION_VALUES

    def fields(self, model: Any) -> tuple[Any, ...]:
        return dimension_fields_for_table(model)

    def canonical(self, field: Any, value: Any) -> str | None:
        return canonical_dimension(field, value)

    def pinned(self, query: Any, fields: tuple[Any, ...]) -> dict[Any, frozenset[str]]:
        return dimensions_from_where(query, fields)


_WRITE_ANALYSIS = _DimensionAnalysis()


def _on_statement_wrote(
    sender: Any,
    connection: Any,
    table: str | None,
    dims: Iterable[str] | None,
    position: int | None = None,
    **kwargs: Any,
) -> None:
    if table is not None:
        record_write(connection, table, dims, position)
        return
    # Raw SQL whose tables cannot be named (TRUNCATE ... CASCADE, a function call): every
    # installed table on that database may have changed. Counted: a project that sees many
    # should call invalidate_model() itself and keep such statements out of the cache's way.
    if not options().enabled:
        return
    from django.apps import apps

    stats.incr(f"db:{primary_alias(connection.alias)}", "unknown_write")
    tables = sorted({m._meta.db_table for m in apps.get_models(include_auto_created=True)})
    with events.operation():
        for name in tables:
            record_write(connection, name, None)


def record_write(
    connection: Any, table: str, dims: Iterable[str] | None, position: int | None = None
) -> None:
    """Invalidate *table* (and *dims*) for a write statement that just succeeded.

    *position*: the primary's WAL position right after the statement committed, when the
    backend read it in the statement's round trip (autocommit); it spares a query.
    """
    opts = options()
    if not opts.enabled:
        return
    alias = primary_alias(connection.alias)  # every alias of one database: one name
    keys = write_keys(opts.prefix, alias, table, dims)
    if in_transaction(connection):
        # Delivered by _on_commit after COMMIT, dropped by _on_rollback. A savepoint
        # rollback keeps them: bumping keys of rolled-back writes only costs misses.
        state: _TxState | None = getattr(connection, "_dbscale_cache_tx", None)
        if state is None:
            state = connection._dbscale_cache_tx = _TxState()
        state.keys.setdefault(alias, set()).update(keys)
        state.tables.setdefault(alias, set()).add(table)
        return
    buffered = _batch.get()
    if buffered is None:
        # One ORM call running several autocommitted statements: deliver at its end.
        buffered = {}
        known: dict[str, int | None] = {}
        token = _batch.set(buffered)
        known_token = _batch_positions.set(known)

        def deliver_buffered() -> None:
            _batch.reset(token)
            _batch_positions.reset(known_token)
            deliver(buffered, {a: p for a, p in known.items() if p is not None})

        if not events.at_operation_end(deliver_buffered):
            _batch.reset(token)
            _batch_positions.reset(known_token)
            deliver(
                {alias: (set(keys), {table})},
                {alias: position} if position is not None else None,
            )
            return
    pending_keys, pending_tables = buffered.setdefault(alias, (set(), set()))
    pending_keys.update(keys)
    pending_tables.add(table)
    # Only the last statement's position covers every commit of the batch before it.
    positions = _batch_positions.get()
    if positions is not None:
        positions[alias] = position


#: Autocommitted writes of the running operation (``events.operation()``: an ORM call of
#: several statements, a raw statement writing several tables, ``invalidate_tables``),
#: opened by its first write and delivered together when it ends.
_batch: ContextVar[dict[str, tuple[set[str], set[str]]] | None] = ContextVar(
    "dbscale_cache_batch", default=None
)
#: For that batch, per primary: the WAL position read with its last statement, if any.
_batch_positions: ContextVar[dict[str, int | None] | None] = ContextVar(
    "dbscale_cache_batch_positions", default=None
)


def invalidate_tables(alias: str, tables: Iterable[tuple[str, Iterable[str] | None]]) -> None:
    """Invalidate (table, dims) pairs on primary *alias* now, or at commit if in ``atomic()``.

    Outside ``atomic()`` the pairs go out together: one WAL position query and one Redis
    round trip, however many tables (``invalidate_all`` names every installed table).
    """
    connection = connections[alias]
    with events.operation():  # record_write delivers the whole operation at its end
        for table, dims in tables:
            record_write(connection, table, dims)


# -- delivery ---------------------------------------------------------------------------

_lock = threading.Lock()
#: Serialises sending and confirming (reentrant: a cache_invalidated receiver may read).
_flush_lock = threading.RLock()
#: primary alias -> {version key: sequence number of the latest write that queued it}
_pending_keys: dict[str, dict[str, int]] = {}
_pending_lsn: dict[str, int] = {}
_pending_tables: dict[str, set[str]] = {}
_sequence = [0]

#: Seconds within which a delivery sent without waiting is confirmed (or found undelivered
#: and written to the outbox) even if this process makes no cached read meanwhile.
CONFIRM_WITHIN = 0.05
#: Deliveries in flight above which a write waits for the older ones' replies.
MAX_IN_FLIGHT = 16


@dataclass
class _Sent:
    """A delivery sent on a held connection whose replies are not read yet."""

    connection: Any
    calls: list[tuple[Any, ...]]
    extra: list[tuple[Any, ...]]
    keys: dict[str, dict[str, int]]
    lsns: dict[str, int]
    tables: dict[str, set[str]]


_in_flight: list[_Sent] = []
#: A delivery failed and some of its keys are still undelivered (set by _undelivered(),
#: cleared when nothing is pending any more): Redis is not taking invalidations.
_failing = [False]


def has_pending() -> bool:
    """Return whether invalidations are unconfirmed (reads must not use Redis yet)."""
    return bool(_pending_keys)


def _position(alias: str) -> int:
    """Return the WAL position every replica must replay to see *alias*'s latest commits."""
    if not dbscale_settings.replicas.get(alias):
        return 0
    try:
        state = consistency.current_state()
        if alias in state.pending:
            position = consistency.required_position(alias)
            if position is not None:
                return position
        return consistency.fetch_primary_lsn(alias)
    except DatabaseError:
        logger.warning("Could not read %r's WAL position; fills read the primary.", alias)
        return UNKNOWN_LSN


def deliver(
    batch: dict[str, tuple[set[str], set[str]]],
    positions: dict[str, int] | None = None,
    *,
    outboxed: bool = False,
) -> None:
    """Queue *batch* (alias -> (version keys, tables)) and send everything queued.

    *positions* are the primaries' WAL positions after the writes committed (fetched here
    for those not given). The bumps are sent without waiting for Redis's reply (see
    :func:`flush_pending`); if Redis cannot take them, the batch is also written to each
    database's outbox, unless it already is (*outboxed*: written before COMMIT).
    """
    if not batch:
        return
    given = positions or {}
    positions = {alias: given.get(alias) or _position(alias) for alias in batch}
    with _lock:
        _sequence[0] += 1
        seq = _sequence[0]
        for alias, (keys, tables) in batch.items():
            queued = _pending_keys.setdefault(alias, {})
            for key in keys:
                queued[key] = seq
            _pending_tables.setdefault(alias, set()).update(tables)
            _pending_lsn[alias] = max(_pending_lsn.get(alias, 0), positions[alias])
            if len(queued) > MAX_PENDING_KEYS:
                _collapse(alias)
    # Observers of cache_invalidated, and an outbox row to settle, need the reply now.
    wait = outboxed or bool(cache_invalidated.receivers)
    if not flush_pending(wait=wait):
        _undelivered({alias: keys for alias, (keys, _) in batch.items()}, outboxed=outboxed)
    elif outboxed:
        for alias in batch:
            continuity.owe(alias)  # delivered after all: drain the row written before COMMIT


def _undelivered(keys: Mapping[str, Iterable[str]], *, outboxed: bool = False) -> None:
    """Keep invalidations Redis did not take: outbox them and retry in the background."""
    _failing[0] = True
    for alias, alias_keys in keys.items():
        if outboxed or outbox.record(alias, alias_keys):
            if not outboxed:
                stats.incr(f"db:{alias}", "outboxed")
            continuity.owe(alias)  # drained by this process once Redis is back
    _schedule_retry()


#: The background retry of undelivered invalidations (at most one at a time), and the
#: background confirmation of deliveries in flight (likewise).
_retry: list[threading.Timer] = []
_confirm: list[threading.Timer] = []


def _schedule_retry() -> None:
    """Retry delivery in the background until it succeeds.

    Readers of this process deliver before using the cache anyway; the timer makes sure
    the invalidations reach Redis (and so other processes) soon after it is back, even if
    this process never reads through the cache again.
    """
    with _lock:
        if _retry or not _pending_keys:
            return
        delay = max(options().breaker_cooldown, 0.05)
        timer = threading.Timer(delay, _retry_now)
        timer.daemon = True
        _retry.append(timer)
    timer.start()


def _schedule_confirm() -> None:
    """Confirm the deliveries in flight within :data:`CONFIRM_WITHIN` seconds."""
    with _lock:
        if _confirm:
            return
        timer = threading.Timer(CONFIRM_WITHIN, _confirm_now)
        timer.daemon = True
        _confirm.append(timer)
    timer.start()


def _forget_timers_after_fork() -> None:
    # The timers' threads do not exist in the child; the held connections are the
    # parent's sockets (the parent reads their replies): forget them, never read them.
    _retry.clear()
    _confirm.clear()
    _in_flight.clear()


os.register_at_fork(after_in_child=_forget_timers_after_fork)


def _confirm_at_exit() -> None:
    # A script that writes and exits at once: find out now whether its last invalidations
    # reached Redis, so that lost ones still go to the outbox (a killed process cannot).
    try:
        confirm()
    except Exception:
        logger.debug("Could not confirm the invalidations in flight at exit.", exc_info=True)


atexit.register(_confirm_at_exit)


def _retry_now() -> None:
    with _lock:
        _retry.clear()
    try:
        delivered = flush_pending()
    except Exception:
        logger.exception("Background delivery of invalidations failed.")
        delivered = False
    if not delivered:
        _schedule_retry()


def _confirm_now() -> None:
    with _lock:
        _confirm.clear()
    try:
        confirm()
    except Exception:
        logger.exception("Background confirmation of invalidations failed.")


def _collapse(alias: str) -> None:
    """Replace dimension keys by their table's wide key (bounded memory while Redis is down)."""
    queued = _pending_keys[alias]
    collapsed: dict[str, int] = {}
    for key, seq in queued.items():
        wide = wide_version_key(key)
        collapsed[wide] = max(seq, collapsed.get(wide, 0))
    _pending_keys[alias] = collapsed


def confirm() -> bool:
    """Read the replies of every delivery in flight; return whether all were delivered.

    A delivery whose connection broke stays pending (so this process's reads bypass the
    cache), goes to the outbox and is retried, exactly like one that failed to send.
    """
    if not _in_flight:
        return True
    with _flush_lock:
        return _confirm_locked()


def _confirm_locked() -> bool:
    ok = True
    gw = gateway()
    while _in_flight:
        sent = _in_flight.pop(0)
        try:
            replies = gw.finish_held(sent.connection, len(sent.calls) + len(sent.extra))
            if any(isinstance(r, NoScriptError) for r in replies):
                gw.pipeline(sent.calls + sent.extra)  # loads the scripts, runs them again
            else:
                errors = [r for r in replies if isinstance(r, Exception)]
                if errors:
                    gw.failed(errors[0], "invalidation")
                    raise RedisUnavailable(str(errors[0]))
        except RedisUnavailable:
            stats.restore(sent.extra)
            for alias in sent.keys:
                stats.incr(f"db:{alias}", "error")
            _undelivered(sent.keys)
            ok = False
            continue
        _delivered(sent)
    return ok


def flush_pending(*, wait: bool = True) -> bool:
    """Send queued invalidations in one round trip; return whether none are left.

    With *wait* false (a write's own delivery) the bumps are sent without reading the
    reply: the write returns after one ``send``. Their replies are read (:func:`confirm`)
    before this process's next cached read, before it issues a consistency token, and
    within :data:`CONFIRM_WITHIN` seconds otherwise; until then :func:`has_pending` is true.
    Redis runs a connection's commands in order, and no read is sent before the bumps
    sent ahead of it are confirmed: a context always reads its own invalidations.
    """
    if not _pending_keys:
        return True
    with _flush_lock:
        if _in_flight and not _confirm_locked():
            wait = True  # a delivery failed: find out about the rest now, not later
        if not _pending_keys:
            return True
        gw = gateway()
        if not gw.available():
            return False
        opts = options()
        with _lock:
            snapshot = {alias: dict(keys) for alias, keys in _pending_keys.items()}
            lsns = dict(_pending_lsn)
            tables = {alias: set(t) for alias, t in _pending_tables.items()}
        calls = [bump_call(sorted(keys), lsns.get(alias, 0)) for alias, keys in snapshot.items()]
        extra = stats.drain_commands(opts.prefix) if stats.due() else []
        sent = _Sent(None, calls, extra, snapshot, lsns, tables)
        try:
            if wait:
                gw.pipeline(calls + extra)
            else:
                sent.connection = gw.send_held(b"".join(pack(*call) for call in calls + extra))
        except RedisUnavailable:
            stats.restore(extra)
            for alias in snapshot:
                stats.incr(f"db:{alias}", "error")
            return False
        if wait:
            _delivered(sent)
            return not _pending_keys
        _in_flight.append(sent)
        if len(_in_flight) >= MAX_IN_FLIGHT:
            _confirm_locked()
    _schedule_confirm()
    return True


def _delivered(sent: _Sent) -> None:
    """Forget the keys *sent* delivered (unless queued again since) and tell observers."""
    with _lock:
        for alias, keys in sent.keys.items():
            queued = _pending_keys.get(alias, {})
            for key, seq in keys.items():
                if queued.get(key) == seq:
                    del queued[key]
            if not queued:
                _pending_keys.pop(alias, None)
                _pending_lsn.pop(alias, None)
                _pending_tables.pop(alias, None)
        if not _pending_keys:
            _failing[0] = False
    for alias, keys in sent.keys.items():
        for table in sent.tables.get(alias, ()):
            stats.incr(f"table:{table}", "invalidation")
        if cache_invalidated.receivers:
            cache_invalidated.send(
                sender=None,
                alias=alias,
                tables=frozenset(sent.tables.get(alias, ())),
                keys=tuple(sorted(keys)),
                lsn=sent.lsns.get(alias, 0),
            )


def forget_pending() -> None:
    """Drop undelivered invalidations (tests that reset Redis wholesale)."""
    with _flush_lock:
        for sent in _in_flight:
            sent.connection.disconnect()
        _in_flight.clear()
    with _lock:
        for timer in (*_retry, *_confirm):
            timer.cancel()
        _retry.clear()
        _confirm.clear()
        _pending_keys.clear()
        _pending_lsn.clear()
        _pending_tables.clear()
        _failing[0] = False


def model_tables(model: Any) -> list[str]:
    """Return the tables holding *model*'s rows and links: its own, parents', m2m links."""
    meta = model._meta.concrete_model._meta
    tables = [meta.db_table]
    tables.extend(parent._meta.db_table for parent in meta.get_parent_list())
    for m2m in meta.local_many_to_many:
        through = m2m.remote_field.through
        if through is not None and through._meta.auto_created:
            tables.append(through._meta.db_table)
    return tables


def dims_for_instance(instance: Any) -> set[str] | None:
    """Return the canonical dimension values of *instance*'s row (``None``: unknown)."""
    from django_dbscale.cache.keys import canonical_dimension

    fields = dimension_fields_for_table(type(instance))
    if not fields:
        return None
    dims: set[str] = set()
    for dim_field in fields:
        value = getattr(instance, dim_field.attname)
        if value is None:
            continue
        dim = canonical_dimension(dim_field, value)
        if dim is None:
            return None
        dims.add(dim)
    return dims
