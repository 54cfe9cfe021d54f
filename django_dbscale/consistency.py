"""The consistency model shared by replicas, shards and the cache.

One *consistency context* (a request, a task, a block of code) promises three things:

1. **It reads its own writes.** When a transaction that wrote to a primary commits, the
   context records that primary as *pending*; the primary's WAL position (an LSN) is fetched
   at most once, lazily, the first time the context needs it (to route a read, or to hand
   out a token). From then on a read of that primary goes to a replica only if the replica
   has replayed at least that LSN.
2. **Its reads never go backwards in time.** A context keeps reading from the replica it
   started on (*pinning*); it moves only to the primary, which is never behind.
3. **A cached result is never older than the last committed write it depends on.** The
   cache records the primary's LSN with every invalidation and only fills from a source
   that has replayed it (see :mod:`django_dbscale.cache`).

The state lives in :mod:`contextvars`, so it is correct under threads, ASGI and
``sync_to_async`` (asgiref copies context changes back). A context is opened by
:class:`~django_dbscale.middleware.ConsistencyMiddleware` for each request, and by
:func:`consistency_context` / :func:`read_at_least` anywhere else. Code running outside any
opened context shares its thread's implicit one.

WAL positions cross process boundaries as *tokens*: signed, timestamped strings made by
:func:`consistency_token` and accepted by :func:`read_at_least`.

This module knows nothing about replicas, shards or the cache; they all trade in the
positions kept here.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, TypeVar, cast, overload

from django.core import signing
from django.db import connections
from django.dispatch import Signal

from django_dbscale.conf import dbscale_settings
from django_dbscale.signals import read_routed

__all__ = [
    "ConsistencyState",
    "InvalidConsistencyToken",
    "ReadMode",
    "consistency_context",
    "consistency_token",
    "current_state",
    "format_lsn",
    "count_route",
    "parse_lsn",
    "UNKNOWN_POSITION",
    "at_least",
    "block_floor",
    "naming_database",
    "placement_floor",
    "raise_floor",
    "set_placement_floors",
    "read_at_least",
    "read_from_primary",
    "route_counts",
    "record_write",
    "required_position",
    "use_database",
    "use_primary",
    "use_replica",
]

F = TypeVar("F", bound=Callable[..., Any])

ReadMode = Literal["sticky", "wait", "primary"]
READ_MODES: tuple[ReadMode, ...] = ("sticky", "wait", "primary")
TOKEN_SALT = "django_dbscale.consistency"


class InvalidConsistencyToken(ValueError):
    """A consistency token is forged, expired, malformed, or names an unknown database."""


def parse_lsn(text: str) -> int:
    """Turn PostgreSQL's ``'16/B374D848'`` form of an LSN into an int."""
    high, _, low = text.partition("/")
    if not low:
        raise ValueError(f"{text!r} is not an LSN (expected 'X/Y' in hex)")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(value: int) -> str:
    """Turn an int LSN back into PostgreSQL's ``'X/Y'`` form."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


@dataclass
class ConsistencyState:
    """What one consistency context has written and where it reads.

    ``positions``: primary alias -> the LSN this context must read at least.
    ``pending``: primaries written since their position was last fetched.
    ``write_times``: primary alias -> ``time.time()`` of the last committed write (used by
    the time-based fallback for backends without LSNs).
    ``pinned``: primary alias -> the replica this context reads from (monotonic reads), or
    the primary itself; ``pinned_at`` records when a context was pinned to a primary.
    ``wait``: seconds a read may wait for a replica to catch up before using the primary.
    ``wrote``: whether this context committed a write itself (the middleware then re-issues
    the token).
    """

    positions: dict[str, int] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    write_times: dict[str, float] = field(default_factory=dict)
    pinned: dict[str, str] = field(default_factory=dict)
    pinned_at: dict[str, float] = field(default_factory=dict)
    wait: float | None = None
    wrote: bool = False

    def merge_positions(self, positions: Mapping[str, int]) -> None:
        """Raise this context's required positions to at least *positions*."""
        for alias, lsn in positions.items():
            if lsn > self.positions.get(alias, -1):
                self.positions[alias] = lsn


_state: ContextVar[ConsistencyState | None] = ContextVar("dbscale_consistency", default=None)
#: Forced read target for a block: "primary", "replica", or a database alias.
forced_target: ContextVar[str | None] = ContextVar("dbscale_forced_target", default=None)
#: Aliases whose connection is inside ``transaction.atomic()`` in this context, as reported
#: by the dbscale backend (cheaper to read on every query than ``connections[alias]``).
open_transactions: ContextVar[frozenset[str]] = ContextVar(
    "dbscale_open_transactions", default=frozenset()
)


def note_transaction(alias: str, is_open: bool) -> None:
    """Record that *alias*'s connection entered or left an atomic block (backend hook)."""
    current = open_transactions.get()
    if is_open and alias not in current:
        open_transactions.set(current | {alias})
    elif not is_open and alias in current:
        open_transactions.set(current - {alias})


def current_state() -> ConsistencyState:
    """Return the state of the current consistency context, opening an implicit one."""
    state = _state.get()
    if state is None:
        state = ConsistencyState()
        _state.set(state)
    return state


def open_context(state: ConsistencyState | None = None) -> Token[ConsistencyState | None]:
    """Start a fresh consistency context; pass the token to :func:`close_context`."""
    return _state.set(state if state is not None else ConsistencyState())


def close_context(token: Token[ConsistencyState | None]) -> None:
    """End a context started by :func:`open_context`, restoring the enclosing one."""
    _state.reset(token)


@contextmanager
def consistency_context() -> Iterator[ConsistencyState]:
    """Run a block as its own consistency context (a job, a test, a script step).

    Writes inside are not seen as "own writes" by code after the block, and pinning
    starts afresh. Use :func:`consistency_token` inside to carry the position further.
    """
    state = ConsistencyState()
    token = open_context(state)
    try:
        yield state
    finally:
        close_context(token)


def record_write(primary: str, *, has_lsn: bool = True) -> None:
    """Note that a transaction that wrote to *primary* has just committed.

    Called by the database backend after COMMIT (or after a write in autocommit mode). No
    query is made here: the primary's LSN is fetched lazily by :func:`required_position`.
    *has_lsn* is false for databases without WAL positions (other backends): only the time
    of the write is kept, for ``READ_YOUR_WRITES = "time"``.
    """
    state = current_state()
    # A primary without replicas is always read from itself: its position is never needed.
    if has_lsn and dbscale_settings.replicas.get(primary):
        state.pending.add(primary)
    state.write_times[primary] = time.time()
    state.wrote = True


#: WAL page size, and the sizes of a page's header and of a segment's first page header.
_WAL_PAGE = 8192
_PAGE_HEADERS = (24, 40)


def insert_position(text: str) -> int:
    """Parse ``pg_current_wal_insert_lsn()``, stepping back over a page header it points past.

    When the last record ended exactly at a page boundary, the insert position points past
    the next page's header; a replica's replay position stops at the boundary until more
    WAL is written, so an idle primary's replicas would never seem to reach it. No record
    ends inside a page header, so the boundary covers everything written.
    """
    value = parse_lsn(text)
    offset = value % _WAL_PAGE
    return value - offset if offset in _PAGE_HEADERS else value


def note_commit_position(primary: str, position: int) -> None:
    """Note *primary*'s WAL position read right after this context's write committed.

    The backend reads it in the write's own round trip where it can; the pending write is
    then resolved without the query :func:`required_position` would make.
    """
    state = current_state()
    state.pending.discard(primary)
    state.merge_positions({primary: position})


def fetch_primary_lsn(primary: str) -> int:
    """Return the primary's current WAL insert position (one cheap query)."""
    with connections[primary].cursor() as cursor:
        cursor.execute("SELECT pg_current_wal_insert_lsn()::text")
        row = cursor.fetchone()
    assert row is not None
    return insert_position(row[0])


def _resolve_pending(state: ConsistencyState, primary: str) -> None:
    # Forget the pending write only once its position is known: if the fetch fails, the
    # next read must still treat it as unseen.
    lsn = fetch_primary_lsn(primary)
    state.pending.discard(primary)
    state.merge_positions({primary: lsn})


def required_position(primary: str) -> int | None:
    """Return the LSN a read of *primary* (or of its replicas) must see, or ``None``.

    A pending write is resolved here with one query to the primary, once.
    """
    state = _state.get()
    if state is None:
        return None
    if primary in state.pending:
        _resolve_pending(state, primary)
    return state.positions.get(primary)


def wrote_recently(primary: str, seconds: float) -> bool:
    """Return whether this context committed a write to *primary* in the last *seconds*."""
    state = _state.get()
    if state is None:
        return False
    written = state.write_times.get(primary)
    return written is not None and time.time() - written < seconds


# -- where reads went: the one record of floors and reasons ------------------------------

#: (alias read from, reason) -> number of reads routed so, in this process. Every place
#: that decides or changes where a read runs (the replica policy, a cache fill moved to a
#: primary, a failover) counts here, once per read.
route_counts: Counter[tuple[str, str]] = Counter()
_count_lock = threading.Lock()


def _new_count_lock_in_child() -> None:
    global _count_lock
    _count_lock = threading.Lock()  # a fork while another thread counted must not deadlock


os.register_at_fork(after_in_child=_new_count_lock_in_child)


def count_route(alias: str, reason: str) -> None:
    """Count one read of *alias* for *reason* (``route_counts``); send ``read_routed``.

    The signal is sent only when someone listens: without receivers this costs one list
    check and allocates nothing.
    """
    with _count_lock:
        route_counts[(alias, reason)] += 1
    if read_routed.receivers:
        read_routed.send(sender=None, alias=alias, reason=reason)


def read_from_primary(primary: str, reason: str, state: ConsistencyState | None = None) -> None:
    """Record that this context is reading *primary* itself, now: its newest state.

    The context is pinned to *primary*: a later read of its data goes to a replica only
    once a probe shows a replica that had replayed everything *primary* had at this moment
    (monotonic reads). *reason* is counted in ``route_counts``. Call it for
    every read that ends up on a primary for whatever cause (routing, a cache fill moved
    off a lagging replica, a failover), so the floor is raised in one way only.
    """
    if state is None:
        state = current_state()
    state.pinned[primary] = primary
    state.pinned_at[primary] = time.monotonic()
    count_route(primary, reason)


def raise_floor(positions: Mapping[str, int]) -> None:
    """Record that this context has seen data as of *positions* (primary alias -> LSN).

    Later reads of those primaries' data go to a replica only if it has replayed at least
    that position, exactly as after the context's own write: a cache hit calls this with
    the position its entry reflects, so a plain read after it never shows older rows.
    """
    if positions:
        current_state().merge_positions(positions)


#: Primary alias -> the WAL position every read of it must see, in every context: the
#: position at which a resharding placed rows on it (its cutover). Process-wide, not
#: per-context: it is derived from the shared shard map, and a replica that has not
#: replayed a cutover lacks the moved rows altogether. Replaced whole by the shard map.
_placement_floors: Mapping[str, int] = {}


def set_placement_floors(floors: Mapping[str, int]) -> None:
    """Replace the process-wide placement floors (called by the shard map on refresh)."""
    global _placement_floors
    _placement_floors = dict(floors)


def placement_floor(primary: str) -> int | None:
    """Return the position every read of *primary* must see (a cutover), or ``None``."""
    return _placement_floors.get(primary)


#: A position no replica can have replayed: only the primary serves a read that needs it.
UNKNOWN_POSITION = 1 << 64

#: Positions the reads of the running block must see on top of the context's own (a
#: cache fill's: the WAL positions of the last invalidations of what it reads). The
#: replica policy applies it to every read it routes, so a fill is routed once, like any
#: read, and moving it to a primary raises the context's floor the same way.
block_floor: ContextVar[Mapping[str, int] | None] = ContextVar("dbscale_block_floor", default=None)


@contextmanager
def at_least(positions: Mapping[str, int]) -> Iterator[None]:
    """Route every read of the block to a source that has replayed *positions*.

    Nested blocks see the highest position per primary. :data:`UNKNOWN_POSITION` sends the
    block's reads of that primary to the primary itself.
    """
    outer = block_floor.get()
    merged = dict(outer) if outer else {}
    for alias, lsn in positions.items():
        if lsn > merged.get(alias, -1):
            merged[alias] = lsn
    token = block_floor.set(merged)
    try:
        yield
    finally:
        block_floor.reset(token)


#: True while code asks the routers which database *holds* a model's rows rather than where
#: to read them now (the cache naming the database in a key before it knows whether it
#: will read at all): the dbscale routers then answer with the primary and choose no
#: replica, pin nothing and count nothing.
naming_database: ContextVar[bool] = ContextVar("dbscale_naming_database", default=False)


# -- tokens -------------------------------------------------------------------------------


#: Sent (``sender=None``, no arguments) before a token is issued. A pillar that sent work
#: without waiting for it (the cache's invalidations) finishes it here, so that whoever
#: holds the token never reads ahead of it.
token_issuing = Signal()


def consistency_token() -> str:
    """Return a signed token for everything this context must read at least.

    Hand it to another process or thread (a Celery task argument, a response header) and
    open :func:`read_at_least` with it there. Fetches pending LSNs (one query per primary
    written since the last fetch).
    """
    if token_issuing.receivers:
        token_issuing.send(sender=None)
    state = current_state()
    if dbscale_settings.read_your_writes == "lsn":
        for primary in list(state.pending):
            _resolve_pending(state, primary)
    payload = {
        "p": {alias: format_lsn(lsn) for alias, lsn in state.positions.items()},
        "t": {alias: round(ts, 3) for alias, ts in state.write_times.items()},
    }
    return signing.dumps(payload, salt=TOKEN_SALT, compress=True)


@dataclass(frozen=True)
class DecodedToken:
    """The contents of a consistency token."""

    positions: dict[str, int]
    write_times: dict[str, float]


def decode_token(token: str, *, max_age: float | None = None) -> DecodedToken:
    """Verify and decode *token*; raise :class:`InvalidConsistencyToken` if it is bad.

    Every alias it names must be a database in ``DATABASES``.
    """
    from django.conf import settings

    if not isinstance(token, str) or not token:
        raise InvalidConsistencyToken(
            f"A consistency token must be a non-empty str, not {token!r}."
        )
    age = dbscale_settings.consistency_max_age if max_age is None else max_age
    try:
        payload = signing.loads(token, salt=TOKEN_SALT, max_age=timedelta(seconds=age))
    except signing.SignatureExpired as exc:
        raise InvalidConsistencyToken(
            f"The consistency token expired (older than {age}s)."
        ) from exc
    except signing.BadSignature as exc:
        raise InvalidConsistencyToken(
            "The consistency token's signature does not match: it was forged, truncated, or "
            "signed with another SECRET_KEY."
        ) from exc
    try:
        positions = {str(a): parse_lsn(v) for a, v in payload["p"].items()}
        write_times = {str(a): float(v) for a, v in payload["t"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidConsistencyToken("The consistency token is malformed.") from exc
    named = set(positions) | set(write_times)
    unknown = sorted(named - set(settings.DATABASES))
    if unknown:
        raise InvalidConsistencyToken(
            f"The consistency token names database(s) {unknown} that are not in DATABASES "
            f"(known: {sorted(settings.DATABASES)}). Tokens only travel between processes "
            "that share the same DATABASES aliases."
        )
    replica_aliases = sorted(named & set(dbscale_settings.primary_of))
    if replica_aliases:
        raise InvalidConsistencyToken(
            f"The consistency token names replica(s) {replica_aliases}; tokens carry the WAL "
            "positions of primaries only. It was not made by consistency_token()."
        )
    return DecodedToken(positions, write_times)


#: (owner, token) pairs of every entered context manager, per context: one ContextVar for
#: all of them (a ContextVar per object would be kept alive by every context that saw it).
_entered: ContextVar[tuple[tuple[object, Any], ...]] = ContextVar("dbscale_entered", default=())


class _TokenStack:
    """Tokens of nested ``__enter__`` calls of one context manager object, per context.

    A context manager object may be shared (a module-level ``P = use_primary()`` used by
    concurrent requests); keeping its tokens in a ``ContextVar`` makes each context unwind
    its own entries.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def push(self, item: Any) -> None:
        _entered.set((*_entered.get(), (self, item)))

    def pop(self) -> Any:
        stack = _entered.get()
        for index in range(len(stack) - 1, -1, -1):
            if stack[index][0] is self:
                _entered.set(stack[:index] + stack[index + 1 :])
                return stack[index][1]
        raise RuntimeError(f"{self.name}: __exit__ without a matching __enter__ in this context")


class _ContextDecorator:
    """Base for context managers that also decorate sync and async functions."""

    def __enter__(self) -> Any:
        raise NotImplementedError

    def __exit__(self, *exc: object) -> None:
        raise NotImplementedError

    def _recreate(self) -> _ContextDecorator:
        return self

    def __call__(self, func: F) -> F:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_inner(*args: Any, **kwargs: Any) -> Any:
                with self._recreate():
                    return await func(*args, **kwargs)

            return cast(F, async_inner)

        @functools.wraps(func)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with self._recreate():
                return func(*args, **kwargs)

        return cast(F, inner)


class read_at_least(_ContextDecorator):
    """Read, inside the block, at least what the token's writer wrote.

    *mode* picks how (per task, like GitLab's load balancer options):

    ``"sticky"`` (default)
        read from a replica that has replayed the token's positions, else the primary;
    ``"wait"``
        as ``"sticky"``, but wait up to *timeout* seconds (default ``REPLICA_WAIT``, at
        least 1s) for a replica to catch up before using the primary;
    ``"primary"``
        read from the primaries for the whole block.

    The block is its own consistency context that starts from the token's positions. A bad
    token raises :class:`InvalidConsistencyToken` at construction, before anything runs.
    """

    def __init__(
        self, token: str | None, mode: ReadMode = "sticky", timeout: float | None = None
    ) -> None:
        if mode not in READ_MODES:
            raise ValueError(f"read_at_least(mode={mode!r}): use one of {list(READ_MODES)}.")
        if timeout is not None and (isinstance(timeout, bool) or timeout < 0):
            raise ValueError(f"read_at_least(timeout={timeout!r}): use seconds >= 0.")
        self.token = token
        self.mode = mode
        self.timeout = timeout
        # Tokens travel in task arguments: an absent token means "nothing to wait for".
        self.decoded = decode_token(token) if token else DecodedToken({}, {})
        self._tokens = _TokenStack("dbscale_read_at_least")

    def _recreate(self) -> read_at_least:
        return read_at_least(self.token, self.mode, self.timeout)

    def __enter__(self) -> ConsistencyState:
        state = ConsistencyState(write_times=dict(self.decoded.write_times))
        state.merge_positions(self.decoded.positions)
        if self.mode == "wait":
            state.wait = (
                self.timeout
                if self.timeout is not None
                else max(dbscale_settings.replica_wait, 1.0)
            )
        forced = forced_target.set("primary") if self.mode == "primary" else None
        self._tokens.push((open_context(state), forced))
        return state

    def __exit__(self, *exc: object) -> None:
        ctx_token, forced = self._tokens.pop()
        if forced is not None:
            forced_target.reset(forced)
        close_context(ctx_token)


class _ForceTarget(_ContextDecorator):
    def __init__(self, target: str) -> None:
        self.target = target
        self._tokens = _TokenStack("dbscale_force_target")

    def _recreate(self) -> _ForceTarget:
        return type(self)(self.target)

    def __enter__(self) -> None:
        self._tokens.push(forced_target.set(self.target))

    def __exit__(self, *exc: object) -> None:
        forced_target.reset(self._tokens.pop())


@overload
def use_primary(func: F) -> F: ...
@overload
def use_primary(func: None = None) -> _ContextDecorator: ...
def use_primary(func: F | None = None) -> F | _ContextDecorator:
    """Send every read in the block (or decorated function) to the primaries.

    Works as ``with use_primary():``, ``@use_primary()`` and ``@use_primary``, on sync and
    async functions. Nests with :func:`use_replica` and :func:`use_database`: the innermost
    wins.
    """
    manager = _ForceTarget("primary")
    return manager if func is None else manager(func)


@overload
def use_replica(func: F) -> F: ...
@overload
def use_replica(func: None = None) -> _ContextDecorator: ...
def use_replica(func: F | None = None) -> F | _ContextDecorator:
    """Read from a replica in the block even if this context wrote (never for writes).

    Replicas that are down or beyond the lag budget are still skipped: a block that demands
    a replica when none is usable reads from the primary, counted with reason ``"forced"``.
    Reads inside a transaction still go to its primary. Use it for reports that tolerate
    lag and must keep load off the primary; it relaxes read-your-writes and monotonic reads
    for the block.
    """
    manager = _ForceTarget("replica")
    return manager if func is None else manager(func)


def use_database(alias: str) -> _ContextDecorator:
    """Send reads in the block to *alias* (a primary or a replica) where it serves them.

    It applies to reads of *alias*'s own primary (the alias itself if it is a primary);
    reads of other primaries' data (another shard, say) are routed as usual, and reads
    inside a transaction still go to its primary.
    """
    from django.conf import settings

    if not isinstance(alias, str) or alias not in settings.DATABASES:
        raise ValueError(
            f"use_database({alias!r}): no such alias in DATABASES "
            f"(known: {sorted(settings.DATABASES)})."
        )
    return _ForceTarget(alias)
