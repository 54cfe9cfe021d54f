"""A django-debug-toolbar panel: where each query of a request ran, and why.

Install the ``debug-toolbar`` extra (``pip install -e '.[debug-toolbar]'``) and list the
panel next to the toolbar's own::

    DEBUG_TOOLBAR_PANELS = [
        ...,
        "debug_toolbar.panels.sql.SQLPanel",
        "django_dbscale.contrib.debug_toolbar.DbscalePanel",
    ]

For every statement of the request the panel shows the database it ran on and the reason
the library sent it there: a replica, the lag fallback (``lagging``/``down``/``stale``),
read-your-writes, a context pinned to the primary, a transaction, a forced target, the
shard its key maps to or a fan-out, and the queryset cache's verdict (hit, miss, bypass and
why). Below, the N+1 advice: a ``SELECT`` shape repeated more than
``DEBUG_TOOLBAR_CONFIG["DBSCALE_MAX_REPEATS"]`` times (default 5) is named with the
``select_related``/``prefetch_related`` that removes the repeats, by the same code as
:func:`django_dbscale.testing.nplusone.assert_no_n_plus_one`.

How it knows: routing decisions come from the public :data:`~django_dbscale.signals.read_routed`
signal, cache verdicts from :data:`~django_dbscale.cache.cache_read`, statements from
``connection.execute_wrapper`` on every connection of the request's thread (and of the
fan-out worker threads it starts). A statement is paired with the last unpaired routing
decision for the same database in the same thread: Django routes a queryset right before
it runs it. Statements no router decided are labelled by what they are (a write, a
transaction command, the WAL position read for read-your-writes, or "not routed": an
explicit ``.using()`` or a raw cursor). Per-request state lives in a ``ContextVar``; the
receivers are connected only while a request is recorded.

Limits: synchronous requests only (the panel is off under ASGI); a cache hit runs no SQL and
is listed on its own line; a cache miss is attached to the statements its fill ran.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections import Counter
from contextlib import AbstractContextManager, ExitStack
from contextvars import ContextVar
from dataclasses import asdict
from pathlib import Path
from time import perf_counter
from types import CodeType
from typing import Any

from debug_toolbar import settings as dt_settings
from debug_toolbar.panels import Panel
from django.db import connections
from django.http import HttpRequest, HttpResponse
from django.template import Context, Engine

from django_dbscale import consistency
from django_dbscale.backends.statements import is_write
from django_dbscale.cache.signals import cache_read
from django_dbscale.conf import dbscale_settings
from django_dbscale.replicas import reasons
from django_dbscale.signals import read_routed
from django_dbscale.testing.nplusone import (
    DEFAULT_MAX_REPEATS,
    check_max_repeats,
    find_repeats,
    is_read,
)

__all__ = ["REASONS", "DbscalePanel"]

#: ``DEBUG_TOOLBAR_CONFIG`` key: how often one SELECT shape may run before it is reported.
MAX_REPEATS_KEY = "DBSCALE_MAX_REPEATS"

# Labels of statements that no routing decision sent where they ran.
WRITE = "write"
TRANSACTION = "transaction"
WAL_POSITION = "wal_position"
UNROUTED = "unrouted"

#: Reason -> the sentence the panel shows for it.
REASONS: dict[str, str] = {
    reasons.REPLICA: "replica: healthy, within the lag budget, has this context's writes",
    reasons.NO_REPLICAS: "primary: it has no replicas",
    reasons.IN_TRANSACTION: "primary: inside a transaction on it",
    reasons.READ_YOUR_WRITES: "primary: read-your-writes (no replica has replayed this "
    "context's write yet)",
    reasons.LAGGING: "primary: lag fallback (every replica is beyond MAX_REPLICA_LAG)",
    reasons.DOWN: "primary: lag fallback (the replicas are down)",
    reasons.QUARANTINED: "primary: the replicas are quarantined after failures",
    reasons.STALE: "primary: the replicas' lag measurements are too old to trust",
    reasons.UNKNOWN: "primary: the replicas' state is unknown",
    reasons.FORCED: "forced by use_primary() / use_replica() / use_database() / "
    "read_at_least(mode='primary')",
    reasons.PINNED_PRIMARY: "primary: pinned (this context already read the primary; "
    "monotonic reads)",
    reasons.FAILOVER: "primary: the read broke on a replica and was re-run here",
    reasons.CACHE_FILL: "primary: a cache fill needs a position no replica has replayed",
    reasons.RESHARDED: "primary: the replicas have not replayed the resharding cutover",
    reasons.PRIMARY_DOWN: "replica: the primary broke under this read; a caught-up replica "
    "re-ran it",
    WRITE: "write: always the primary",
    TRANSACTION: "transaction control",
    WAL_POSITION: "dbscale: reads the primary's WAL position (read-your-writes, cache fence)",
    UNROUTED: "not routed: .using(), a raw cursor, or a query Django ties to a database",
}

_TRANSACTION_PREFIXES = ("SAVEPOINT", "RELEASE", "ROLLBACK", "BEGIN", "COMMIT", "START")

_recorder: ContextVar[_Recorder | None] = ContextVar("dbscale_toolbar_recorder", default=None)

# Receivers are connected while at least one request is recorded: without a recorded
# request the library's signals keep their "nobody listens" fast path.
_listeners = 0
_listeners_lock = threading.Lock()


def _listen() -> None:
    global _listeners
    with _listeners_lock:
        if _listeners == 0:
            read_routed.connect(_on_read_routed, dispatch_uid="dbscale_toolbar")
            cache_read.connect(_on_cache_read, dispatch_uid="dbscale_toolbar")
        _listeners += 1


def _unlisten() -> None:
    global _listeners
    with _listeners_lock:
        _listeners -= 1
        if _listeners == 0:
            read_routed.disconnect(dispatch_uid="dbscale_toolbar")
            cache_read.disconnect(dispatch_uid="dbscale_toolbar")


def _on_read_routed(sender: Any, *, alias: str, reason: str, **kwargs: Any) -> None:
    recorder = _recorder.get()
    if recorder is not None:
        recorder.route(alias, reason)


def _on_cache_read(
    sender: Any, *, key: str, hit: bool, stored: bool, reason: str, alias: str, **kwargs: Any
) -> None:
    recorder = _recorder.get()
    if recorder is not None:
        recorder.cache(sender, key, hit, stored, reason, alias)


_fanout_codes: frozenset[CodeType] | None = None


def _in_fanout() -> bool:
    """Return whether the caller runs under an explicit fan-out (``all_shards()``)."""
    global _fanout_codes
    if _fanout_codes is None:
        from django_dbscale.sharding import fanout

        _fanout_codes = frozenset({fanout.run_on_shards.__code__, fanout._work.__code__})
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _fanout_codes:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _placement(primary: str) -> tuple[str | None, str | None]:
    """Return (shard label, how it was chosen) for a read of *primary*, or (None, None)."""
    groups = dbscale_settings.groups_of_shard.get(primary)
    if not groups:
        return None, None
    shard = f"{primary} ({', '.join(groups)})"
    if _in_fanout():
        return shard, "fan-out"
    from django_dbscale.sharding.context import current_shard

    if any(current_shard(group) == primary for group in groups):
        return shard, "using_shard"
    return shard, "shard key"


def _unrouted_reason(sql: str) -> str:
    head = sql.lstrip().upper()
    if head.startswith(_TRANSACTION_PREFIXES):
        return TRANSACTION
    if "PG_CURRENT_WAL_INSERT_LSN()" in head:
        return WAL_POSITION
    if is_write(sql):
        return WRITE
    return UNROUTED


def _cache_text(hit: bool, stored: bool, reason: str) -> str:
    if hit:
        return "hit"
    if reason == "miss":
        return "miss (stored)" if stored else "miss"
    if reason == "rejected":
        return "miss (not stored: a write invalidated it meanwhile)"
    if reason.startswith("bypass:"):
        return f"bypass: {reason.partition(':')[2]}"
    if reason == "error":
        return "miss (not stored: Redis error)"
    return reason


class _Recorder:
    """What one request's statements, routing decisions and cache reads were.

    Shared (by reference) with the copies of the request's context that fan-out workers
    run in, hence the lock.
    """

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.lock = threading.Lock()
        self.seq = itertools.count()
        self.entries: list[dict[str, Any]] = []
        #: (thread, alias) -> routing decisions not yet paired with a statement
        self.pending: dict[tuple[int, str], list[dict[str, Any]]] = {}
        #: statements run inside a cache fill, waiting for the fill's verdict
        self.fill: list[dict[str, Any]] = []
        #: reads of the request thread since the last cache verdict
        self.since_cache: list[dict[str, Any]] = []
        self.shapes: Counter[str] = Counter()
        self.worker_wrappers: list[AbstractContextManager[None]] = []
        self.wrapped: set[tuple[int, str]] = set()

    def _entry(self, kind: str, alias: str, reason: str, thread: int) -> dict[str, Any]:
        primary = dbscale_settings.primary_of.get(alias, alias)
        return {
            "seq": next(self.seq),
            "kind": kind,
            "alias": alias,
            "primary": primary,
            "reason": reason,
            "why": REASONS.get(reason, reason),
            "shard": None,
            "placement": None,
            "cache": None,
            "model": None,
            "sql": None,
            "ms": None,
            "thread": "request" if thread == self.thread else "fan-out worker",
        }

    def route(self, alias: str, reason: str) -> None:
        thread = threading.get_ident()
        entry = self._entry("route", alias, reason, thread)
        entry["shard"], entry["placement"] = _placement(entry["primary"])
        with self.lock:
            self.entries.append(entry)
            self.pending.setdefault((thread, alias), []).append(entry)
            wrap = thread != self.thread and (thread, alias) not in self.wrapped
            if wrap:
                self.wrapped.add((thread, alias))
        if wrap:
            # A fan-out worker's thread has its own connections: watch this one for the
            # rest of the request (the worker queries it right after routing).
            manager = connections[alias].execute_wrapper(self.wrapper)
            manager.__enter__()
            with self.lock:
                self.worker_wrappers.append(manager)

    def wrapper(self, execute: Any, sql: Any, params: Any, many: bool, context: Any) -> Any:
        """``connection.execute_wrapper`` callback: time the statement and record it."""
        if _recorder.get() is not self:  # a worker connection reused by another request
            return execute(sql, params, many, context)
        in_fill = consistency.block_floor.get() is not None
        start = perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            elapsed = (perf_counter() - start) * 1000
            alias = context["connection"].alias
            # After a failover the cursor points at the primary it re-ran the read on.
            ran_on = getattr(getattr(context["cursor"], "db", None), "alias", alias)
            self.statement(alias, ran_on, str(sql), elapsed, in_fill)

    def statement(self, alias: str, ran_on: str, sql: str, ms: float, in_fill: bool) -> None:
        thread = threading.get_ident()
        read = is_read(sql)
        label = _unrouted_reason(sql)  # what it is if no routing decision sent it
        with self.lock:
            stack = self.pending.get((thread, ran_on)) if label == UNROUTED else None
            if stack:
                entry = stack.pop()  # the decision made right before this statement
                entry["kind"] = "query"
            else:
                entry = self._entry("query", ran_on, label, thread)
                self.entries.append(entry)
            if ran_on != alias:  # failed over: the replica's decision ran nothing there
                self.pending.pop((thread, alias), None)
            entry["sql"] = sql
            entry["ms"] = round(ms, 3)
            if thread == self.thread and read:
                self.shapes[sql] += 1
                if in_fill:
                    self.fill.append(entry)
                else:
                    self.since_cache.append(entry)

    def cache(
        self, sender: Any, key: str, hit: bool, stored: bool, reason: str, alias: str
    ) -> None:
        meta = getattr(sender, "_meta", None)
        model = meta.label if meta is not None else "cached_queryset function"
        text = _cache_text(hit, stored, reason)
        thread = threading.get_ident()
        with self.lock:
            if hit:
                targets: list[dict[str, Any]] = []
            elif self.fill:
                targets = self.fill  # the statements this fill ran
            else:
                targets = self.since_cache[-1:]  # a bypass: the read it let through
            self.fill, self.since_cache = [], []
            if not targets:  # a hit, or a verdict whose read ran no SQL
                entry = self._entry("cache", alias, "cache_hit" if hit else reason, thread)
                entry["why"] = f"queryset cache {text}: no SQL" if hit else f"cache {text}"
                self.entries.append(entry)
                targets = [entry]
            for entry in targets:
                entry["cache"] = text
                entry["model"] = model

    def close(self) -> None:
        for manager in reversed(self.worker_wrappers):
            manager.__exit__(None, None, None)
        self.worker_wrappers.clear()

    def stats(self, max_repeats: int) -> dict[str, Any]:
        with self.lock:
            entries = [dict(e) for e in self.entries]
            shapes = dict(self.shapes)
        for entry in entries:
            if entry["kind"] == "route":  # decided, but no statement followed
                entry["why"] += " (no SQL ran after this decision)"
        queries = [e for e in entries if e["kind"] == "query"]
        by_reason = Counter(f"{e['alias']}: {e['reason']}" for e in queries)
        repeats = [asdict(r) for r in find_repeats(shapes, max_repeats)]
        return {
            "entries": entries,
            "queries": len(queries),
            "by_reason": dict(sorted(by_reason.items())),
            "replica_reads": sum(1 for e in queries if e["alias"] != e["primary"]),
            "cache_hits": sum(1 for e in entries if e["cache"] == "hit"),
            "n_plus_one": repeats,
            "max_repeats": max_repeats,
        }


_engine: Engine | None = None


def _template_engine() -> Engine:
    """A template engine of our own: the panel renders whatever ``TEMPLATES`` says."""
    global _engine
    if _engine is None:
        _engine = Engine(dirs=[str(Path(__file__).parent / "templates")], autoescape=True)
    return _engine


class DbscalePanel(Panel):
    """Where each query of the request ran and why; N+1 shapes with their fix."""

    title = "Database routing"
    template = "django_dbscale/debug_toolbar/panel.html"

    def _stats(self) -> dict[str, Any]:
        return self.get_stats()  # type: ignore[no-untyped-call,no-any-return]

    @property
    def nav_subtitle(self) -> str:
        stats = self._stats()
        if not stats:
            return ""
        text = (
            f"{stats['queries']} queries, {stats['replica_reads']} on replicas, "
            f"{stats['cache_hits']} cache hits"
        )
        if stats["n_plus_one"]:
            text += f", {len(stats['n_plus_one'])} N+1"
        return text

    @property
    def content(self) -> str:
        template = _template_engine().get_template(self.template)
        return template.render(Context(self._stats()))

    def max_repeats(self) -> int:
        """Return ``DEBUG_TOOLBAR_CONFIG["DBSCALE_MAX_REPEATS"]`` (validated; default 5)."""
        value = dt_settings.get_config().get(MAX_REPEATS_KEY, DEFAULT_MAX_REPEATS)
        return check_max_repeats(value, f'DEBUG_TOOLBAR_CONFIG["{MAX_REPEATS_KEY}"]')

    def process_request(self, request: HttpRequest) -> HttpResponse:
        """Record the request: routing decisions, statements and cache reads."""
        recorder = _Recorder()
        self._recorder = recorder
        _listen()
        token = _recorder.set(recorder)
        try:
            with ExitStack() as stack:
                for connection in connections.all():
                    stack.enter_context(connection.execute_wrapper(recorder.wrapper))
                return super().process_request(request)  # type: ignore[no-untyped-call,no-any-return]
        finally:
            _recorder.reset(token)
            recorder.close()
            _unlisten()

    def generate_stats(self, request: HttpRequest, response: HttpResponse) -> None:
        """Store what was recorded (plain data: the toolbar's store serializes it)."""
        recorder = getattr(self, "_recorder", None)
        if recorder is not None:
            self.record_stats(recorder.stats(self.max_repeats()))  # type: ignore[no-untyped-call]
