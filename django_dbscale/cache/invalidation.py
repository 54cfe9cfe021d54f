"""Invalidation: turning committed writes into version bumps, exactly once per commit.

Every write statement reaches :func:`record_write` from the dbscale compiler with its table
and, when the model has dimensions, the dimension values of the rows it touched (``None``
when unknown). What happens next depends on the connection:

* **Autocommit**: the statement has committed when it returns; the versions are bumped at
  once, in one pipelined Redis round trip, with the primary's WAL position.
* **Inside ``atomic()``**: the keys are added to the transaction's pending set and the
  tables to its *dirty* set (reads of dirty tables bypass the cache until the transaction
  ends). One ``on_commit`` callback bumps everything in one round trip after COMMIT; a
  rollback drops the callback and nothing is bumped. A savepoint rollback that drops the
  callback is noticed by the next write, which registers it again; bumping keys of rolled
  back writes as well is harmless (it only costs misses).
* **Manual transactions** (``set_autocommit(False)``): no commit hook exists, so versions
  are bumped at once, before COMMIT. Use ``atomic()``; see the docs' limits.

Invalidations that cannot reach Redis (down, cut off, breaker open) are kept in a
process-wide pending set and delivered before this process uses the cache again; until
they are, every cached read in this process goes to the database.

The transaction state lives on the connection object, next to Django's own
``run_on_commit`` list, because it belongs to the connection's transaction (Django keeps
connections per thread and per async task).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.db import DatabaseError, connections

from django_dbscale import consistency
from django_dbscale.cache import stats
from django_dbscale.cache.client import BUMP, RedisUnavailable, gateway
from django_dbscale.cache.dimensions import dimension_fields_for_table
from django_dbscale.cache.keys import tokens, version_key
from django_dbscale.cache.options import options
from django_dbscale.cache.signals import cache_invalidated
from django_dbscale.conf import dbscale_settings

__all__ = [
    "dirty_tables",
    "flush_pending",
    "has_pending",
    "invalidate_tables",
    "record_write",
    "write_keys",
]

logger = logging.getLogger("django_dbscale.cache")

#: The LSN recorded when the primary's position could not be read: fill from the primary.
UNKNOWN_LSN = (1 << 64) - 1

#: Above this many pending keys, dimension keys collapse into their table's "wide" key.
MAX_PENDING_KEYS = 10_000


def format_lsn_hex(lsn: int) -> str:
    """Return *lsn* as 16 hex digits (what the Lua scripts compare as strings)."""
    return f"{lsn:016x}"


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
    callback: Any = None
    #: The outermost ``Atomic`` of the transaction the state belongs to.
    owner: Any = None


def _tx_state(connection: Any) -> _TxState | None:
    state: _TxState | None = getattr(connection, "_dbscale_cache_tx", None)
    if state is not None and (
        not connection.in_atomic_block
        or not connection.atomic_blocks
        or connection.atomic_blocks[0] is not state.owner
    ):
        # The transaction ended without our commit callback running (it rolled back), or
        # another transaction began since: its dirty tables and pending keys are void.
        connection._dbscale_cache_tx = None
        return None
    return state


def _registered(connection: Any, callback: Any) -> bool:
    return any(entry[1] is callback for entry in connection.run_on_commit)


def dirty_tables(alias: str) -> set[str] | None:
    """Return the tables written in the open transaction on *alias* (``None``: none)."""
    connection = connections[alias]
    if not connection.in_atomic_block:
        return None
    state = _tx_state(connection)
    if state is None:
        return None
    return state.tables.get(alias)


def record_write(connection: Any, table: str, dims: Iterable[str] | None) -> None:
    """Invalidate *table* (and *dims*) for a write statement that just succeeded."""
    opts = options()
    if not opts.enabled:
        return
    alias = connection.alias
    keys = write_keys(opts.prefix, alias, table, dims)
    if connection.in_atomic_block:
        state = _tx_state(connection)
        if state is None:
            owner = connection.atomic_blocks[0] if connection.atomic_blocks else None
            state = _TxState(owner=owner)
            connection._dbscale_cache_tx = state
        state.keys.setdefault(alias, set()).update(keys)
        state.tables.setdefault(alias, set()).add(table)
        if state.callback is None or not _registered(connection, state.callback):

            def on_commit(state: _TxState = state) -> None:
                if getattr(connection, "_dbscale_cache_tx", None) is state:
                    connection._dbscale_cache_tx = None
                deliver({a: (k, state.tables.get(a, set())) for a, k in state.keys.items()})

            state.callback = on_commit
            connection.on_commit(on_commit, robust=True)
        return
    deliver({alias: (set(keys), {table})})


def invalidate_tables(alias: str, tables: Iterable[tuple[str, Iterable[str] | None]]) -> None:
    """Invalidate (table, dims) pairs on primary *alias* now, or at commit if in ``atomic()``."""
    connection = connections[alias]
    for table, dims in tables:
        record_write(connection, table, dims)


# -- delivery ---------------------------------------------------------------------------

_lock = threading.Lock()
#: primary alias -> {version key: sequence number of the latest write that queued it}
_pending_keys: dict[str, dict[str, int]] = {}
_pending_lsn: dict[str, int] = {}
_pending_tables: dict[str, set[str]] = {}
_sequence = [0]


def has_pending() -> bool:
    """Return whether invalidations are waiting for Redis (reads must not use it)."""
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


def deliver(batch: dict[str, tuple[set[str], set[str]]]) -> None:
    """Queue *batch* (alias -> (version keys, tables)) and send everything queued."""
    if not batch:
        return
    positions = {alias: _position(alias) for alias in batch}
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
    flush_pending()


def _collapse(alias: str) -> None:
    """Replace dimension keys by their table's wide key (bounded memory while Redis is down)."""
    queued = _pending_keys[alias]
    collapsed: dict[str, int] = {}
    for key, seq in queued.items():
        head, sep, _ = key.partition(":d:")
        if sep:
            key = f"{head}:w"
        collapsed[key] = max(seq, collapsed.get(key, 0))
    _pending_keys[alias] = collapsed


def flush_pending() -> bool:
    """Send queued invalidations in one round trip; return whether none are left."""
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
    calls: list[tuple[Any, ...]] = []
    token = tokens.next()
    for alias, keys in snapshot.items():
        ordered = sorted(keys)
        calls.append(
            (
                "EVALSHA",
                BUMP.sha,
                len(ordered),
                *ordered,
                token,
                format_lsn_hex(lsns.get(alias, 0)),
                opts.version_timeout,
            )
        )
    extra = stats.drain_commands(opts.prefix) if stats.due() else []
    try:
        gw.pipeline(calls + extra)
    except RedisUnavailable:
        stats.restore(extra)
        for alias in snapshot:
            stats.incr(f"db:{alias}", "error")
        return False
    with _lock:
        for alias, keys in snapshot.items():
            queued = _pending_keys.get(alias, {})
            for key, seq in keys.items():
                if queued.get(key) == seq:
                    del queued[key]
            if not queued:
                _pending_keys.pop(alias, None)
                _pending_lsn.pop(alias, None)
                _pending_tables.pop(alias, None)
    for alias, keys in snapshot.items():
        for table in tables.get(alias, ()):
            stats.incr(f"table:{table}", "invalidation")
        if cache_invalidated.receivers:
            cache_invalidated.send(
                sender=None,
                alias=alias,
                tables=frozenset(tables.get(alias, ())),
                keys=tuple(sorted(keys)),
                lsn=lsns.get(alias, 0),
            )
    return not _pending_keys


def forget_pending() -> None:
    """Drop undelivered invalidations (tests that reset Redis wholesale)."""
    with _lock:
        _pending_keys.clear()
        _pending_lsn.clear()
        _pending_tables.clear()


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
