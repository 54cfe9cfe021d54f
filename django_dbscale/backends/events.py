"""What the dbscale backend tells the rest of the library: writes, commits, rollbacks, reads.

The backend sees every statement, but it does not know who cares: it publishes what
happened here, and subscribers (the queryset cache, connected in its ``ready()`` only when
it is configured) connect to it. The backend never imports a subscriber, and a project
without subscribers pays one empty-list check per write statement and per COMMIT.

Signals (Django signals; ``sender`` is the connection's class, ``connection`` the
``DatabaseWrapper``). Receivers run synchronously in the thread of the statement, must be
quick, and must not raise: the statement or COMMIT has already happened.

``statement_wrote``
    A write statement succeeded: an ORM write (from a compiler), or raw SQL through a
    dbscale cursor (``cursor.execute()``, ``executemany()``, ``COPY ... FROM``,
    ``RunSQL``), whose tables are read with PostgreSQL's parser
    (:mod:`~django_dbscale.backends.written_tables`). Arguments: ``connection``, ``table``
    (the table written, sent once per table; ``None`` when the statement may have written
    tables that cannot be named, such as ``TRUNCATE ... CASCADE`` or a function call:
    anything on that database may have changed), ``dims`` (the canonical values of the
    written rows' invalidation dimensions, as strings, or ``None`` when they are unknown or
    the table declares none), ``position`` (the primary's WAL position right after the
    statement committed, when the compiler read it in the statement's own round trip, else
    ``None``). Inside a transaction it has not committed yet: wait for
    ``transaction_committed``.
``transaction_committing``
    Just before COMMIT of a transaction on ``connection``, inside it (a subscriber may write
    in the same transaction).
``transaction_committed``
    Right after COMMIT, before Django's ``on_commit()`` callbacks run.
``transaction_rolled_back``
    Right after a full ROLLBACK.

Two hooks that are not signals, because they sit on the read path of every query:

:data:`read_observer`
    A context variable holding the observer of the running cache fill (or ``None``): the
    compiler reports each compiled query's SQL and tables to it.
:func:`describe_writes_with`
    Registers the :class:`WriteAnalysis` that tells the write compilers which columns'
    old and new values a write must report in ``dims`` (the cache's dimensions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

from django.dispatch import Signal

__all__ = [
    "ReadObserver",
    "WriteAnalysis",
    "at_operation_end",
    "describe_writes_with",
    "operation",
    "read_observer",
    "self_described",
    "statement_wrote",
    "transaction_committed",
    "transaction_committing",
    "transaction_rolled_back",
    "write_analysis",
]

statement_wrote = Signal()
transaction_committing = Signal()
transaction_committed = Signal()
transaction_rolled_back = Signal()


class ReadObserver(Protocol):
    """What a cache fill learns from the compiler about the queries it runs."""

    def record(self, query: Any, alias: str | None, sql: str) -> None:
        """Note one compiled query's SQL (and whether it can be cached)."""

    def add_tables(self, query: Any, alias: str, tables: list[str]) -> None:
        """Note the tables in one compiled query's FROM clause."""


#: The observer of the cache fill (or discovery compile) running in this context, if any.
read_observer: ContextVar[ReadObserver | None] = ContextVar("dbscale_read_observer", default=None)


class WriteAnalysis(Protocol):
    """How the write compilers turn written rows into ``dims`` for ``statement_wrote``."""

    #: More distinct values than this per field make ``dims`` ``None`` (the whole table).
    max_values: int

    def fields(self, model: Any) -> tuple[Any, ...]:
        """Return the fields whose old and new values a write of *model*'s table reports."""

    def canonical(self, field: Any, value: Any) -> str | None:
        """Return *value* of *field* as a dimension string, or ``None`` if it has none."""

    def pinned(self, query: Any, fields: tuple[Any, ...]) -> dict[Any, frozenset[str]]:
        """Return the dimension values a resolved query's WHERE clause pins, per field."""


_analysis: list[WriteAnalysis] = []


def describe_writes_with(analysis: WriteAnalysis | None) -> None:
    """Make the write compilers report dimension values as *analysis* defines them."""
    _analysis[:] = [] if analysis is None else [analysis]


def write_analysis() -> WriteAnalysis | None:
    """Return the registered :class:`WriteAnalysis`, if a subscriber registered one."""
    return _analysis[0] if _analysis else None


#: True while code that publishes its own writes runs its statements (the write compilers,
#: which know the dimension values; the cache's outbox): the backend does not publish
#: those statements again from their SQL text.
self_described: ContextVar[bool] = ContextVar("dbscale_self_described", default=False)


#: Callbacks to run when the ORM operation running in this context ends.
_operation: ContextVar[list[Callable[[], None]] | None] = ContextVar(
    "dbscale_operation", default=None
)


@contextmanager
def operation() -> Iterator[None]:
    """Group the write statements of one ORM call that runs several of them.

    An ``update()`` of a multi-table child updates each parent table in a statement of its
    own, each autocommitted: a subscriber can defer its work to the end of the call with
    :func:`at_operation_end` (the cache then invalidates them in one round trip). The
    callbacks run even if a later statement fails: the earlier ones have committed.
    """
    if _operation.get() is not None:
        yield
        return
    callbacks: list[Callable[[], None]] = []
    token = _operation.set(callbacks)
    try:
        yield
    finally:
        _operation.reset(token)
        for callback in callbacks:
            callback()


def at_operation_end(callback: Callable[[], None]) -> bool:
    """Run *callback* when the current :func:`operation` ends; ``False`` if none is open."""
    callbacks = _operation.get()
    if callbacks is None:
        return False
    callbacks.append(callback)
    return True
