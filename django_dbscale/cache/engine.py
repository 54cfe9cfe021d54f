"""The read path: serve a hit, or fill a miss without ever storing stale rows.

:func:`read_through` is shared by querysets and :func:`~django_dbscale.cache.cached_queryset`:

1. **One round trip** (``read.lua``): read the current versions of everything the query
   depends on, and the entry; serve the entry if it was stored under exactly these
   versions. On a miss the script returns the versions (the *header*) and maybe a *lease*.
2. **Dogpile**: without the lease, wait briefly (up to ``LOCK_TIMEOUT``) for the lease
   holder's fill, polling with the same script; then fall through to the database.
3. **Fill**: run the query with a :class:`~django_dbscale.cache.analysis.Collector`
   active. The dbscale compiler sends each statement to a replica only if that replica has
   replayed the WAL position recorded with the last invalidation of every version in the
   header, else to its primary.
4. **Check-and-set** (``fill.lua``): store only if every version is still the one in the
   header (a write that committed meanwhile has bumped one), and only if the fill read
   nothing outside them and nothing non-deterministic. The fill is sent without waiting
   for its reply (unless a ``cache_read`` receiver wants to know whether it was stored):
   the caller's next Redis call uses the same connection, so it runs after the fill.

Inside a transaction, reads of tables the transaction wrote bypass the cache; a miss under
``REPEATABLE READ``/``SERIALIZABLE`` is never stored (its snapshot may predate a commit
whose invalidation the header already includes). Any Redis failure turns into a plain
database read.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

from django.db import DatabaseError, connections

from django_dbscale import consistency, replicas
from django_dbscale.cache import continuity, invalidation, stats
from django_dbscale.cache.analysis import Collector, collector
from django_dbscale.cache.client import (
    FILL,
    READ,
    RELEASE,
    RedisUnavailable,
    bulk,
    gateway,
    pack,
)
from django_dbscale.cache.keys import tokens
from django_dbscale.cache.options import min_version_ttl, options, primary_alias
from django_dbscale.cache.signals import cache_read
from django_dbscale.conf import dbscale_settings

__all__ = ["Plan", "bypass", "read_through"]

logger = logging.getLogger("django_dbscale.cache")

T = TypeVar("T")

#: Set (to a reason) while reads must not use the cache, e.g. inside ``get_or_create()``.
bypass: ContextVar[str | None] = ContextVar("dbscale_cache_bypass", default=None)

_STORE_ISOLATIONS = frozenset({"read committed", "read uncommitted"})


def lease_ttl_ms(opts: Any) -> int:
    """Return how long a fill's lease lives, in milliseconds.

    Independent of ``LOCK_TIMEOUT`` (how long waiters wait): a query slower than the wait
    must still keep the lease, or the next waiters would all query the database too.
    """
    return int(max(opts.lock_timeout * 10, 5.0) * 1000)


@dataclass(eq=False)
class Plan:
    """Everything needed to read one query through the cache, derived once per key."""

    label: str
    model: Any
    alias: str
    entry_key: str
    header_key: str
    lease_key: str
    version_keys: tuple[str, ...]
    #: The primary alias each version key belongs to (parallel to ``version_keys``).
    version_aliases: tuple[str, ...]
    tables: frozenset[tuple[str, str]]
    base_table: str | None
    uses_dimensions: bool
    description: tuple[str, ...]
    shape: Any = None
    reason: str | None = None
    #: The time zone in the key when the SQL converts to the active zone, else ``None``.
    zone: str | None = None
    #: The ``EVALSHA read.lua`` command up to its keys, and the constant arguments after
    #: the caller's nonce: a hit costs two byte concatenations to pack.
    read_head: bytes = field(init=False, repr=False)
    read_tail: bytes = field(init=False, repr=False)
    aliases: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        opts = options()
        keys = self.keys
        head = pack("EVALSHA", READ.sha, len(keys), *keys)
        # The array length must count the 4 ARGV too: rewrite the "*N" header.
        self.read_head = b"*%d\r\n" % (3 + len(keys) + 4) + head.split(b"\r\n", 1)[1]
        self.read_tail = bulk(str(lease_ttl_ms(opts)).encode()) + bulk(
            str(min_version_ttl(opts)).encode()
        )
        self.aliases = tuple(sorted({a for a, _ in self.tables} or {self.alias}))

    @property
    def keys(self) -> list[str]:
        """Return KEYS for the Lua scripts: payload, header, lease, then the versions."""
        return [self.entry_key, self.header_key, self.lease_key, *self.version_keys]


_NO_FLAG = bulk(b"")
_IGNORE_ENTRY = bulk(b"1")


def _nonce() -> bytes:
    """Return this thread's lease owner id (one fill at a time per thread: fills never nest)."""
    return b"%s%x-" % (tokens.owner(), threading.get_ident())


def _read(plan: Plan, nonce: bytes, ignore_entry: bool = False) -> Any:
    packed = (
        plan.read_head
        + bulk(nonce)
        + plan.read_tail
        + (_IGNORE_ENTRY if ignore_entry else _NO_FLAG)
    )
    return gateway().run_packed(packed, READ)


def _required_positions(plan: Plan, header: str) -> dict[str, int]:
    required: dict[str, int] = {}
    for alias, value in zip(plan.version_aliases, header.split("|"), strict=False):
        _, _, lsn_text = value.rpartition(":")
        lsn = consistency.UNKNOWN_POSITION if lsn_text == "P" else int(lsn_text, 16)
        if lsn > required.get(alias, 0):
            required[alias] = lsn
    return required


def _isolation_allows_store(alias: str) -> bool:
    """Return whether a fill read inside the open transaction on *alias* may be stored."""
    connection = connections[alias]
    configured = getattr(connection, "isolation_level", None)
    if configured is not None and int(configured) >= 3:  # REPEATABLE READ, SERIALIZABLE
        return False
    with connection.cursor() as cursor:
        cursor.execute("SHOW transaction_isolation")
        row = cursor.fetchone()
    return row is not None and str(row[0]).lower() in _STORE_ISOLATIONS


#: Why a read bypasses the cache while Redis or an outbox is not verified yet.
UNTRUSTED = "unverified"


def _untrusted(plan: Plan, epoch: int | None = None) -> bool:
    """Return whether *plan* reads a database this process does not trust Redis about.

    With *epoch* (:func:`~django_dbscale.cache.continuity.epoch` when the read began),
    also whether trust was lost since, even if it is back: what Redis returned meanwhile
    may come from before the verification.
    """
    if epoch is not None and continuity.epoch() != epoch:
        return True
    bad = continuity.untrusted
    return bool(bad) and (continuity.ALL in bad or not bad.isdisjoint(plan.aliases))


def _notify(plan: Plan, hit: bool, stored: bool, reason: str) -> None:
    if cache_read.receivers:
        cache_read.send(
            sender=plan.model,
            key=plan.entry_key,
            hit=hit,
            stored=stored,
            reason=reason,
            alias=plan.alias,
        )


def _bypass(plan: Plan, run: Callable[[], T], why: str) -> T:
    stats.incr(plan.label, "bypass")
    value = run()
    _notify(plan, False, False, f"bypass:{why}")
    return value


def read_through(plan: Plan, run: Callable[[], T], timeout: int) -> T:
    """Return *run()*'s value through the cache (see the module docstring)."""
    if plan.reason is not None:
        return _bypass(plan, run, plan.reason)
    if collector.get() is not None:
        # Inside another fill (a prefetch, a @cached_queryset function): that fill must see
        # this read's queries to know what it depends on, so neither serve nor store here.
        return run()
    if invalidation.has_pending() and not invalidation.flush_pending():
        return _bypass(plan, run, "undelivered invalidations")
    epoch = continuity.epoch()
    if _untrusted(plan):
        continuity.kick()
        return _bypass(plan, run, UNTRUSTED)
    in_transaction: list[str] = []
    open_aliases = consistency.open_transactions.get()
    if open_aliases:
        for alias in open_aliases:  # connections in a transaction, by any alias
            name = primary_alias(alias)
            if name not in plan.aliases:
                continue
            # atomic() and set_autocommit(False) alike: never serve or store this
            # transaction's uncommitted rows, nor a snapshot older than the header.
            in_transaction.append(alias)
            dirty = invalidation.dirty_tables(alias)
            if dirty and any(t in dirty for a, t in plan.tables if a == name):
                return _bypass(plan, run, "table written in this transaction")
            configured = getattr(connections[alias], "isolation_level", None)
            if configured is not None and int(configured) >= 3:
                return _bypass(plan, run, "repeatable read transaction")
    gw = gateway()
    if not gw.available():
        return _bypass(plan, run, "circuit open")
    opts = options()
    nonce = _nonce()
    try:
        reply = _read(plan, nonce)
    except RedisUnavailable:
        stats.incr(plan.label, "error")
        return _bypass(plan, run, "redis error")
    if reply[0] == 1:
        value: T
        try:
            floor, value = pickle.loads(reply[1])
        except Exception:
            logger.warning("Unreadable cache entry %s; refilling it.", plan.entry_key)
            stats.incr(plan.label, "error")
            try:
                reply = _read(plan, nonce, ignore_entry=True)
            except RedisUnavailable:
                return _bypass(plan, run, "redis error")
        else:
            if _untrusted(plan, epoch):  # e.g. this read met a dead connection
                return _bypass(plan, run, UNTRUSTED)
            if floor:
                consistency.raise_floor(floor)  # later reads never show older rows
            stats.incr(plan.label, "hit")
            if cache_read.receivers:
                _notify(plan, True, False, "hit")
            return value
    header: str = reply[1].decode()
    leased = reply[2] == 1
    if not leased and opts.lock_timeout > 0:
        deadline = time.monotonic() + opts.lock_timeout
        delay = 0.002
        while not leased and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
            try:
                reply = _read(plan, nonce)
            except RedisUnavailable:
                return _bypass(plan, run, "redis error")
            if reply[0] == 1:
                try:
                    floor, value = pickle.loads(reply[1])
                except Exception:
                    break
                if _untrusted(plan, epoch):
                    return _bypass(plan, run, UNTRUSTED)
                if floor:
                    consistency.raise_floor(floor)
                stats.incr(plan.label, "hit")
                _notify(plan, True, False, "hit")
                return value
            header = reply[1].decode()
            leased = reply[2] == 1
    owner = nonce.decode() if leased else ""
    return _fill(plan, run, timeout, header, owner, in_transaction, epoch)


def _fill(
    plan: Plan,
    run: Callable[[], T],
    timeout: int,
    header: str,
    nonce: str,
    in_transaction: list[str],
    epoch: int,
) -> T:
    stats.incr(plan.label, "miss")
    col = Collector(base_table=plan.base_table, required=_required_positions(plan, header))
    token = collector.set(col)
    try:
        # Routed once, like any read: the replica policy sends the fill's statements to a
        # source that has replayed the header, else to the primary (raising the floor).
        with consistency.at_least(col.required), _watch_sources(plan, col):
            value = run()
    except BaseException:
        collector.reset(token)
        _release(nonce, plan)
        raise
    collector.reset(token)
    reason = _verdict(plan, col, epoch)
    if reason is None and not all(_isolation_allows_store(a) for a in in_transaction):
        reason = "snapshot isolation: the snapshot may predate the header"
    floor: dict[str, int] | None = None
    if reason is None:
        try:
            floor = _entry_floor(plan, col)
        except DatabaseError:
            reason = "the primary's WAL position could not be read"
        else:
            if floor:
                consistency.raise_floor(floor)
    if reason is not None:
        _release(nonce, plan)
        stats.incr(plan.label, "bypass")
        _notify(plan, False, False, f"bypass:{reason}")
        return value
    opts = options()
    payload = pickle.dumps((floor, value), protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) > opts.max_result_bytes:
        _release(nonce, plan)
        stats.incr(plan.label, "too_big")
        _notify(plan, False, False, "bypass:too big")
        return value
    args: list[str | bytes | int] = [header, payload, timeout, nonce, opts.version_timeout]
    gw = gateway()
    if not cache_read.receivers:
        # Nothing here depends on whether it was stored: do not wait for the reply (the
        # connection's next user reads it, for the counters). See client.send_deferred.
        try:
            gw.send_deferred(
                pack("EVALSHA", FILL.sha, len(plan.keys), *plan.keys, *args),
                functools.partial(_counted_fill, plan.label),
            )
        except RedisUnavailable:
            stats.incr(plan.label, "error")
        return value
    try:
        stored = gw.evalsha(FILL, plan.keys, args)
    except RedisUnavailable:
        stats.incr(plan.label, "error")
        _notify(plan, False, False, "error")
        return value
    _counted_fill(plan.label, stored)
    _notify(plan, False, stored == 1, "miss" if stored == 1 else "rejected")
    return value


def _counted_fill(label: str, reply: Any) -> None:
    """Count a fill's reply from ``fill.lua``: stored, rejected (a version moved) or error."""
    if reply == 1:
        stats.incr(label, "store")
    elif isinstance(reply, Exception):
        stats.incr(label, "error")
    else:
        stats.incr(label, "rejected")


@contextlib.contextmanager
def _watch_sources(plan: Plan, col: Collector) -> Iterator[None]:
    """Record where each statement of the fill ran; refuse to store reads of a lagging replica.

    The replica policy routes the fill's reads (querysets, ``raw()``) to a source that
    has replayed the header; a statement on a replica behind it (an explicit ``using()``
    of a replica, a cursor opened on a replica's connection) makes the fill unstorable.
    """
    primaries = plan.aliases
    watched = [
        *primaries,
        *(r.alias for a in primaries for r in dbscale_settings.replicas.get(a, ())),
    ]
    sources = col.sources

    def check(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        alias = context["connection"].alias
        sources.add(alias)
        primary = dbscale_settings.primary_of.get(alias)
        need = col.required.get(primary, 0) if primary is not None else 0
        if need and col.reason is None:
            got = replicas.replayed_lsn(alias)
            if got is None or got < need:
                col.reason = f"read from replica {alias!r}, behind the last invalidation"
        return execute(sql, params, many, context)

    with contextlib.ExitStack() as stack:
        for alias in watched:
            stack.enter_context(connections[alias].execute_wrapper(check))
        yield


def _entry_floor(plan: Plan, col: Collector) -> dict[str, int] | None:
    """Return the WAL position per primary that the fill's result reflects, for its hits.

    A fill that read a primary reflects that primary's state now: its current position
    (one query, only for primaries with replicas). A fill served by replicas reflects the
    state as of the last invalidation of what it read, which its source had replayed: the
    header's position. A hit raises its context's floor to these, exactly as a read of
    that source would (see docs/consistency.md).
    """
    floor: dict[str, int] = {}
    for alias in plan.aliases:
        if not dbscale_settings.replicas.get(alias):
            continue  # read from the primary only: nothing can be older
        if alias in col.sources:
            floor[alias] = consistency.fetch_primary_lsn(alias)
            continue
        need = col.required.get(alias, 0)
        if 0 < need < consistency.UNKNOWN_POSITION:
            floor[alias] = need
    return floor or None


def _verdict(plan: Plan, col: Collector, epoch: int) -> str | None:
    """Return why the fill must not be stored, or ``None`` to store it."""
    if col.reason is not None:
        return col.reason
    if _untrusted(plan, epoch):
        return UNTRUSTED
    read = col.read_tables()
    extra = read - plan.tables
    if extra:
        if plan.shape is not None:
            _widen(plan, read, col)
        return f"read tables outside its versions: {sorted(t for _, t in extra)}"
    if col.zoned and plan.zone is None:
        if plan.shape is not None:
            _widen(plan, read, col)
        return "its SQL converts to the active time zone, which is not in its key"
    if plan.uses_dimensions and col.base_count(plan.alias) > 1:
        if plan.shape is not None:
            _widen(plan, read, col)
        return "the dimension table is read more than once"
    return None


def _widen(plan: Plan, read: frozenset[tuple[str, str]], col: Collector) -> None:
    """Teach the plan's shape what its fills really read; rebuilt plans then store."""
    from django_dbscale.cache import planning

    planning.widen(plan, read, col.base_count(plan.alias), col.zoned)


def _release(nonce: str, plan: Plan) -> None:
    if not nonce:
        return
    gw = gateway()
    if not gw.available():
        return
    with contextlib.suppress(RedisUnavailable):
        gw.evalsha(RELEASE, [plan.lease_key], [nonce])
