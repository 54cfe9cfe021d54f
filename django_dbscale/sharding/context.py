"""``using_shard``: pin the queries of a block (or a function) to one shard of a group.

The pin lives in a :class:`~contextvars.ContextVar` holding an immutable mapping
``group -> shard primary alias``; entering sets a new mapping, leaving resets it with the
token of that entry. So blocks nest (the innermost pin of a group wins, outer pins of other
groups stay), and a pin never leaks into another request, thread, task or coroutine:
threads started inside do not inherit it unless run with :func:`contextvars.copy_context`,
and asyncio tasks get a copy at creation. The tokens themselves are kept per context too
(in a second ``ContextVar``), so one ``using_shard`` object may be entered by concurrent
threads and tasks (a module-level ``PIN = using_shard(...)``), as in
:mod:`django_dbscale.consistency`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from types import MappingProxyType
from typing import Any, TypeVar, cast

from django_dbscale.sharding import keys
from django_dbscale.sharding.exceptions import UnknownShard
from django_dbscale.sharding.ring import get_ring

__all__ = ["current_shard", "shard_for_key", "using_shard"]

F = TypeVar("F", bound=Callable[..., Any])

_EMPTY: Mapping[str, str] = MappingProxyType({})
_pins: ContextVar[Mapping[str, str]] = ContextVar("dbscale_shard_pins", default=_EMPTY)
# (id of the using_shard object, token of its entry), innermost last, per context. One
# module-level variable: a ContextVar per object would be kept alive by every context.
_entries: ContextVar[tuple[tuple[int, Token[Mapping[str, str]]], ...]] = ContextVar(
    "dbscale_shard_pin_entries", default=()
)


def shard_for_key(group: str, key: Any) -> str:
    """Return the primary alias of the shard of *group* that owns *key*.

    *key* is converted to its canonical ring string (:func:`~.keys.ring_key`), so ``42``
    and ``"42"`` give the same shard. Raises :class:`~.exceptions.UnknownShardGroup` or
    :class:`~.exceptions.InvalidShardKey`.
    """
    return get_ring(group).node_for(keys.ring_key(key))


def current_shard(group: str) -> str | None:
    """Return the shard alias *group* is pinned to by :func:`using_shard`, or ``None``."""
    return _pins.get().get(group)


class using_shard:
    """Route every query of *group*'s models in the block to the shard owning *key*.

    ``with using_shard("customers", 42): Order.objects.filter(status="open")`` reads the
    shard of customer 42 (through its replicas, honouring read-your-writes) and writes to
    its primary. Also a decorator of sync and async functions. Pass ``shard="shard1"``
    instead of a key to pin a shard alias directly (maintenance scripts, per-shard jobs).

    An explicit key in the query itself (``for_key()`` or a shard-key equality filter) wins
    over the pin. Raises at construction for an unknown group, an invalid key, or a
    ``shard`` that is not in the group.
    """

    def __init__(self, group: str, key: Any = None, *, shard: str | None = None) -> None:
        if not isinstance(group, str):
            raise TypeError(f"using_shard(group={group!r}): the group must be a str name.")
        ring = get_ring(group)
        if (key is None) == (shard is None):
            raise TypeError(
                f"using_shard({group!r}, ...): pass exactly one of a key (a shard-key value) "
                "or shard= (a shard alias of the group)."
            )
        if shard is not None:
            if shard not in ring.nodes:
                raise UnknownShard(
                    f"using_shard({group!r}, shard={shard!r}): {shard!r} is not a shard of "
                    f"{group!r} (its shards: {list(ring.nodes)})."
                )
            self.alias = shard
        else:
            self.alias = ring.node_for(keys.ring_key(key))
        self.group = group
        self.key = key
        self.shard = shard

    def __enter__(self) -> str:
        pins = dict(_pins.get())
        pins[self.group] = self.alias
        token = _pins.set(MappingProxyType(pins))
        _entries.set((*_entries.get(), (id(self), token)))
        return self.alias

    def __exit__(self, *exc: object) -> None:
        entries = _entries.get()
        me = id(self)
        for index in range(len(entries) - 1, -1, -1):
            if entries[index][0] == me:
                break
        else:
            raise RuntimeError(
                f"using_shard({self.group!r}, ...) exited in a context that did not enter it."
            )
        _entries.set(entries[:index] + entries[index + 1 :])
        _pins.reset(entries[index][1])

    def __call__(self, func: F) -> F:
        group, key, shard = self.group, self.key, self.shard
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_inner(*args: Any, **kwargs: Any) -> Any:
                with using_shard(group, key, shard=shard):
                    return await func(*args, **kwargs)

            return cast(F, async_inner)

        @functools.wraps(func)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with using_shard(group, key, shard=shard):
                return func(*args, **kwargs)

        return cast(F, inner)
