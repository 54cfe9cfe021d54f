"""Cache keys: how a query, its parameters and its database become a Redis key, cheaply.

Compiling a queryset's SQL costs more than the Redis round trip of a hit, so keys of lazy
querysets are derived from their *recipe* instead: the chain of calls that built them
(``filter(author_id=5)``, ``order_by("-id")``, ``[:10]``), frozen by :func:`freeze` into a
structure whose ``repr`` is deterministic and differs for any two recipes that could build
different SQL. Only a whitelist of value types is accepted (``str``, numbers, dates, UUIDs,
model instances by primary key, ``Q``, expressions by their constructor arguments, lazy
querysets by their own recipe); anything else raises :class:`Unkeyable` and the caller
falls back to a key made from the compiled SQL.

Key layout (``P`` is ``CACHE["PREFIX"]``)::

    P:e:<schema>:<alias>:<digest>        an entry's pickled result
    P:e:<schema>:<alias>:<digest>:h      its header: the versions it was filled under
    P:e:<schema>:<alias>:<digest>:l      its lease (dogpile protection)
    P:v:<alias>:<table>:a                version of a whole table
    P:v:<alias>:<table>:w                version of a table for writes with unknown dimensions
    P:v:<alias>:<table>:d:<field>=<val>  version of one dimension value of a table
    P:v:<alias>:~generation              generation of everything cached from <alias>
    P:run                                run id of the Redis server last verified
    P:f:<schema>:<digest>                a @cached_queryset result
    P:stats                              counters (hash)

With ``CACHE["CLUSTER"]`` (Redis Cluster) every ``<alias>`` above is written ``{<alias>}``, a
hash tag (:func:`alias_segment`): all keys of one database hash to one slot, so the read
script, a fill and a database's bumps stay single-slot, single-node calls, and each
database's cache lives on the node owning its slot. ``@cached_queryset`` keys are then
``P:f:{<alias>}:<schema>:<digest>`` (tagged with their first database).

``<schema>`` (:func:`schema_fingerprint`) hashes the format version, Django's version and
every installed model's table and columns, so entries pickled by older code are
unreachable after a deploy that changes them.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import itertools
import os
import uuid
from collections.abc import Iterable
from typing import Any

import django
from django.apps import apps
from django.db.models import Field, Model, Prefetch, Q

from django_dbscale.cache.options import options
from django_dbscale.conf import on_settings_changed

__all__ = [
    "UNKNOWN_LSN",
    "alias_segment",
    "cluster_reason",
    "entry_key_for",
    "function_key",
    "format_lsn_hex",
    "FORMAT_VERSION",
    "Unkeyable",
    "canonical_dimension",
    "digest",
    "freeze",
    "generation_key",
    "wide_version_key",
    "schema_fingerprint",
    "version_key",
]

#: Bump when the entry format or the recipe encoding changes.
FORMAT_VERSION = 2

_ATOMS: frozenset[type] = frozenset(
    {
        str,
        int,
        float,
        bool,
        type(None),
        bytes,
        decimal.Decimal,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
        uuid.UUID,
    }
)


class Unkeyable(Exception):
    """A recipe holds a value whose identity cannot be captured cheaply and safely."""


def freeze(value: Any, shape: bool = False) -> Any:
    """Return a deterministic, ``repr``-able stand-in for *value*.

    With ``shape=True`` literal values (and lists of them, and model instances) are replaced
    by their type: the result then identifies the *shape* of a query (which tables it
    reads), not its parameters. Expressions are always frozen literally, since their
    arguments name fields and so joins.
    """
    kind = type(value)
    if kind in _ATOMS:
        return kind.__name__ if shape else value
    if kind is tuple or kind is list:
        if shape and all(type(item) in _ATOMS for item in value):
            return (kind.__name__, "*")
        return (kind.__name__, tuple([freeze(item, shape) for item in value]))
    if kind is set or kind is frozenset:
        if shape:
            return ("set", "*")
        try:
            items = sorted(value)
        except TypeError as exc:
            raise Unkeyable(f"unsortable set {value!r}") from exc
        return ("set", tuple([freeze(item, shape) for item in items]))
    if kind is dict:
        return ("dict", tuple([(k, freeze(v, shape)) for k, v in sorted(value.items())]))
    if isinstance(value, Model):
        pk = value.pk
        if type(pk) not in _ATOMS or pk is None:
            raise Unkeyable(f"model instance without a simple primary key: {value!r}")
        return ("M", value._meta.label, "pk" if shape else pk)
    if isinstance(value, Q):
        return (
            "Q",
            value.connector,
            value.negated,
            tuple(
                [
                    freeze(child, shape)
                    if isinstance(child, Q)
                    else ("kv", child[0], freeze(child[1], shape))
                    if type(child) is tuple and len(child) == 2
                    else freeze(child, shape)
                    for child in value.children
                ]
            ),
        )
    if isinstance(value, Prefetch):
        # The lookup, where it stores its rows, and its queryset's own key: two Prefetch
        # objects that could fetch different rows never freeze alike.
        return (
            "Pf",
            value.prefetch_through,
            value.prefetch_to,
            value.to_attr,
            None if value.queryset is None else _freeze_queryset(value.queryset, shape),
        )
    recipe = getattr(value, "_dbscale_recipe", None)
    if recipe is not None:
        return recipe(shape)
    constructor = getattr(value, "_constructor_args", None)
    if constructor is not None and hasattr(value, "resolve_expression"):
        # Expression arguments are structural (F("author__name") joins a table): never
        # abstracted, even in a shape.
        args, kwargs = constructor
        return (
            f"{kind.__module__}.{kind.__qualname__}",
            freeze(tuple(args)),
            freeze(dict(kwargs)),
        )
    if isinstance(value, Field):
        if getattr(value, "model", None) is not None:
            return ("Fd", value.model._meta.label, value.name)
        _, path, args, kwargs = value.deconstruct()
        return ("Fd", path, freeze(tuple(args), shape), freeze(dict(kwargs), shape))
    # Subclasses of atoms (enum members of TextChoices/IntegerChoices, SafeString, ...):
    # the database sees the plain value.
    for base in (str, int, float, decimal.Decimal):
        if isinstance(value, base):
            plain = base(value)
            return type(plain).__name__ if shape else plain
    raise Unkeyable(f"cannot derive a cache key from {kind.__qualname__} value {value!r}")


def _freeze_queryset(queryset: Any, shape: bool) -> Any:
    """Freeze a ``Prefetch`` queryset: its recipe if it keeps one, else its compiled SQL.

    A plain ``QuerySet`` is compiled for PostgreSQL without choosing a database (the SQL is
    the same on every alias); with *shape* its parameters are left out.
    """
    recipe = getattr(queryset, "_dbscale_recipe", None)
    if recipe is not None and queryset.__dict__.get("_dbscale_q") is None:
        return recipe(shape)
    query = queryset.query
    if query.select_for_update:
        raise Unkeyable("a Prefetch queryset with select_for_update()")
    try:
        sql, params = query.sql_with_params()
    except Exception as exc:  # EmptyResultSet (.none()) and friends: key by the query
        raise Unkeyable(f"a Prefetch queryset that does not compile: {exc!r}") from exc
    iterable = queryset._iterable_class
    return (
        "QSsql",
        queryset.model._meta.label,
        queryset._db,
        f"{iterable.__module__}.{iterable.__qualname__}",
        sql,
        "*" if shape else freeze(tuple(params)),
        freeze(tuple(queryset._prefetch_related_lookups), shape),
    )


def digest(text: str) -> str:
    """Return a 128-bit hex digest of *text* (collisions are not a practical concern)."""
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


_fingerprint: list[str] = []


def schema_fingerprint() -> str:
    """Return a short hash of the entry format, Django's version and every model's columns."""
    if _fingerprint:
        return _fingerprint[0]
    parts: list[Any] = [FORMAT_VERSION, django.VERSION[:3]]
    for model in sorted(apps.get_models(include_auto_created=True), key=lambda m: m._meta.label):
        meta = model._meta
        parts.append(
            (
                meta.label,
                meta.db_table,
                tuple((f.attname, f.column, f.get_internal_type()) for f in meta.concrete_fields),
            )
        )
    value = digest(repr(parts))[:10]
    _fingerprint[:] = [value]
    return value


@on_settings_changed
def _reset_fingerprint() -> None:
    _fingerprint.clear()


def alias_segment(alias: str) -> str:
    """Return how *alias* is written in keys: itself, or its hash tag in cluster mode.

    With ``CACHE["CLUSTER"]`` the segment is ``{<alias>}``: Redis Cluster hashes only what is
    between the first ``{`` and ``}``, so every key of one database lands on one slot (a
    Lua script may only touch keys of one slot). An alias containing a brace (legal in
    Django, never seen in practice) is tagged by a digest of its name instead, so its tag
    is still one well-formed ``{...}``. Without cluster mode keys keep the plain alias:
    the format of a single Redis does not change.
    """
    if not options().cluster:
        return alias
    if "{" in alias or "}" in alias:
        return "{h" + digest(alias)[:16] + "}"
    return "{" + alias + "}"


def cluster_reason(aliases: Iterable[str]) -> str | None:
    """Return why a plan over *aliases* cannot be cached in cluster mode, else ``None``.

    A read checks all its version keys in one script, which Redis Cluster runs only if they
    share a slot: a plan over several databases (a ``@cached_queryset`` function reading
    two shards) would fail with ``CROSSSLOT`` on every call, so it bypasses the cache.
    """
    if not options().cluster:
        return None
    distinct = set(aliases)
    if len(distinct) <= 1:
        return None
    return (
        f"Redis Cluster: reads {len(distinct)} databases ({', '.join(sorted(distinct))}), "
        "whose versions live in different hash slots"
    )


def entry_key_for(prefix: str, alias: str, key_digest: str) -> str:
    """Return the key of a queryset entry of *alias* (its header and lease add ``:h``/``:l``)."""
    return f"{prefix}:e:{schema_fingerprint()}:{alias_segment(alias)}:{key_digest}"


def function_key(prefix: str, alias: str, key_digest: str) -> str:
    """Return the key of a ``@cached_queryset`` result tagged with its (first) database."""
    if options().cluster:
        return f"{prefix}:f:{alias_segment(alias)}:{schema_fingerprint()}:{key_digest}"
    return f"{prefix}:f:{schema_fingerprint()}:{key_digest}"


def version_key(prefix: str, alias: str, table: str, kind: str, dimension: str = "") -> str:
    """Return the Redis key of a version: *kind* is ``"a"`` (table), ``"w"`` or ``"d"``."""
    segment = alias_segment(alias)
    if kind == "d":
        return f"{prefix}:v:{segment}:{table}:d:{dimension}"
    return f"{prefix}:v:{segment}:{table}:{kind}"


#: The WAL position recorded when the primary's could not be read: fill from the primary.
UNKNOWN_LSN = (1 << 64) - 1


def format_lsn_hex(lsn: int) -> str:
    """Return *lsn* as the 16 hex digits ending a version value (the Lua scripts compare
    them as strings)."""
    return f"{lsn:016x}"


def wide_version_key(key: str) -> str:
    """Return the table's wide version key for a dimension version *key*; others unchanged.

    Bumping the wide key instead of many dimension keys costs one key per table and only
    misses: every dimension-filtered read of the table depends on it too.
    """
    head, sep, _ = key.partition(":d:")
    return f"{head}:w" if sep else key


def generation_key(prefix: str, alias: str) -> str:
    """Return the Redis key of *alias*'s generation, a version every entry of it depends on.

    Bumped only when Redis may have lost invalidations wholesale (a restart from a snapshot,
    a failover to a lagging replica): see :mod:`django_dbscale.cache.continuity`.
    """
    return f"{prefix}:v:{alias_segment(alias)}:~generation"


def canonical_dimension(field: Field[Any, Any], value: Any) -> str | None:
    """Return ``"<column>=<value>"`` for a dimension value, the same on reads and writes.

    Readers see values from filters (``"5"``, ``5``, an ``Author``), writers see Python
    values of instances or raw database values; both go through the target field's
    ``to_python`` so they meet. Returns ``None`` for values that cannot be canonicalised
    (expressions, ``None``): the caller then falls back to table-wide versions.
    """
    if value is None or hasattr(value, "resolve_expression"):
        return None
    target: Field[Any, Any] = field.target_field if field.remote_field else field  # type: ignore[attr-defined]
    if isinstance(value, Model):
        value = getattr(value, target.attname)
        if value is None:
            return None
    try:
        value = target.to_python(value)
    except Exception:
        return None
    if type(value) not in (int, str, uuid.UUID):
        return None
    text = str(value)
    if len(text) > 64 or "\n" in text or "|" in text:
        text = "h" + digest(text)
    return f"{field.column}={text}"


class TokenSource:
    """Unique tokens for version values: a random process prefix and a counter.

    A version token must never repeat for the same key, or an entry filled under an old
    version could match again; 48 random bits per process plus a counter make that so
    without a system call per token.
    """

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        """Pick a new random prefix (after ``fork()``, children must not share one)."""
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def owner(self) -> bytes:
        """Return this process's random prefix (lease owners add their thread id)."""
        return self._prefix.encode()

    def next(self) -> str:
        """Return a fresh token (no ':' or '|' in it)."""
        return f"{self._prefix}{next(self._counter):x}."


tokens = TokenSource()
os.register_at_fork(after_in_child=tokens.reseed)


def join_keys(parts: Iterable[str]) -> str:
    """Join key parts with ':' (helper for tests and tools)."""
    return ":".join(parts)
