"""The ``DBSCALE`` setting: defaults, validation and the derived, process-wide view of it.

Everything the library knows about the project's databases comes from one dict in the
Django settings, ``DBSCALE``. :data:`dbscale_settings` reads it lazily and keeps parsed
copies (replica lists, shard groups, cache options); the copies are dropped whenever
``DBSCALE``, ``DATABASES`` or ``CACHES`` change (Django's ``setting_changed`` signal), so
``override_settings`` in tests takes effect at once. Code that keeps its own derived state
(hash rings, lag monitors) registers a callback with :func:`on_settings_changed`.

Parsing never touches a database: validation errors here are about the shape of the
setting and raise :class:`~django.core.exceptions.ImproperlyConfigured` naming the key;
cross-checks against ``DATABASES``/``CACHES``/``DATABASE_ROUTERS`` live in
:mod:`django_dbscale.checks`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

#: Every key of ``DBSCALE`` with its default. ``docs/settings.md`` documents each one.
DEFAULTS: dict[str, Any] = {
    # Read/write splitting.
    "REPLICAS": {},
    "MAX_REPLICA_LAG": 5.0,
    "MAX_REPLICA_LAG_BYTES": 16 * 1024 * 1024,
    "REPLICA_CHECK_INTERVAL": 1.0,
    "REPLICA_PROBE_TIMEOUT": 0.5,
    "REPLICA_QUARANTINE": (1.0, 60.0),
    "REPLICA_SELECTION": "random",
    "REPLICA_WAIT": 0.0,
    "READ_YOUR_WRITES": "lsn",
    "STICKY_SECONDS": 5.0,
    "CONSISTENCY_COOKIE": "dbscale_pos",
    "CONSISTENCY_HEADER": "X-DBScale-Position",
    "CONSISTENCY_MAX_AGE": 300,
    "SAME_DATABASE": {},
    # Sharding.
    "SHARD_GROUPS": {},
    "SHARD_VNODES": 8,
    "SHARD_MAP_CHECK_INTERVAL": 1.0,
    # Queryset cache.
    "CACHE": {},
}

CACHE_DEFAULTS: dict[str, Any] = {
    "ALIAS": "dbscale",
    "TIMEOUT": 15 * 60,
    "PREFIX": "dbscale",
    "MODELS": [],
    "MAX_RESULT_BYTES": 1024 * 1024,
    "SOCKET_TIMEOUT": 0.1,
    "CIRCUIT_BREAKER": (5, 5.0),
    "LOCK_TIMEOUT": 0.5,
    "ENABLED": True,
    "DIMENSIONS": {},
    "VERSION_TIMEOUT": 7 * 24 * 60 * 60,
    "OUTBOX_POLL_INTERVAL": None,
    "CAPTURE": False,
    "CLUSTER": False,
}

SELECTIONS = ("random", "round_robin")
READ_YOUR_WRITES_MODES = ("lsn", "time", "off")


@dataclass(frozen=True)
class ReplicaSpec:
    """One replica alias of a primary, with its share of the reads."""

    alias: str
    weight: float = 1.0


@dataclass(frozen=True)
class ShardGroupSpec:
    """A named group of shard databases and the options that fix its key mapping."""

    name: str
    shards: tuple[str, ...]
    weights: Mapping[str, int] = field(default_factory=dict)
    vnodes: int = 8


def _setting_error(key: str, problem: str, fix: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"DBSCALE[{key!r}] {problem}. {fix}")


def _as_positive_number(
    raw: dict[str, Any], key: str, *, allow_none: bool = False, minimum: float = 0.0
) -> Any:
    """Return ``raw[key]`` if it is a number >= *minimum* (or ``None`` when allowed)."""
    value = raw[key]
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        bound = f"> 0 (at least {minimum})" if minimum > 0 else ">= 0"
        none = " or None" if allow_none else ""
        raise _setting_error(
            key,
            f"must be a number {bound}{none}, not {value!r}",
            f"Set it to a number {bound}, or remove it to use the default {DEFAULTS[key]!r}.",
        )
    return value


def _token_name(raw: dict[str, Any], key: str) -> str:
    """Return ``raw[key]`` if it is usable as a cookie or header name."""
    value = raw[key]
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise _setting_error(
            key,
            f"must be a non-empty name of letters, digits, '-' and '_', not {value!r}",
            f"Use e.g. the default {DEFAULTS[key]!r}.",
        )
    return value


def _parse_replicas(value: Any) -> dict[str, tuple[ReplicaSpec, ...]]:
    if not isinstance(value, Mapping):
        raise _setting_error(
            "REPLICAS",
            f"must map a primary alias to a list of replica aliases, not {value!r}",
            'Example: {"default": ["default_replica"]}.',
        )
    parsed: dict[str, tuple[ReplicaSpec, ...]] = {}
    for primary, replicas in value.items():
        if isinstance(replicas, str) or not isinstance(replicas, list | tuple):
            raise _setting_error(
                "REPLICAS",
                f"[{primary!r}] must be a list of aliases, not {replicas!r}",
                f'Write {{"{primary}": ["{replicas}"]}}.',
            )
        specs: list[ReplicaSpec] = []
        for item in replicas:
            if isinstance(item, str):
                specs.append(ReplicaSpec(item))
            elif isinstance(item, Mapping) and isinstance(item.get("ALIAS"), str):
                weight = item.get("WEIGHT", 1)
                if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
                    raise _setting_error(
                        "REPLICAS",
                        f"[{primary!r}] weight of {item['ALIAS']!r} must be > 0, not {weight!r}",
                        "Use a positive number.",
                    )
                specs.append(ReplicaSpec(item["ALIAS"], float(weight)))
            else:
                raise _setting_error(
                    "REPLICAS",
                    f"[{primary!r}] has an entry {item!r} that is neither an alias nor "
                    '{"ALIAS": ..., "WEIGHT": ...}',
                    "Fix the entry.",
                )
        parsed[str(primary)] = tuple(specs)
    return parsed


def _parse_shard_groups(value: Any, default_vnodes: int) -> dict[str, ShardGroupSpec]:
    if not isinstance(value, Mapping):
        raise _setting_error(
            "SHARD_GROUPS",
            f"must map a group name to its shards, not {value!r}",
            'Example: {"customers": {"SHARDS": ["shard0", "shard1"]}}.',
        )
    groups: dict[str, ShardGroupSpec] = {}
    for name, spec in value.items():
        if isinstance(spec, list | tuple):
            spec = {"SHARDS": spec}
        if not isinstance(spec, Mapping) or "SHARDS" not in spec:
            raise _setting_error(
                "SHARD_GROUPS",
                f"[{name!r}] must be a list of aliases or a dict with a 'SHARDS' key",
                "Fix the group.",
            )
        shards_raw = spec["SHARDS"]
        weights: dict[str, int] = {}
        if isinstance(shards_raw, Mapping):
            shards = tuple(str(alias) for alias in shards_raw)
            for alias, weight in shards_raw.items():
                if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                    raise _setting_error(
                        "SHARD_GROUPS",
                        f"[{name!r}] weight of {alias!r} must be an int >= 0, not {weight!r}",
                        "Use a positive integer weight (0 retires a shard: it owns no keys "
                        "but keeps its shard number).",
                    )
                weights[str(alias)] = weight
            if shards and not any(weights.values()):
                raise _setting_error(
                    "SHARD_GROUPS",
                    f"[{name!r}] gives every shard weight 0",
                    "Give at least one shard a positive weight.",
                )
        elif isinstance(shards_raw, list | tuple):
            shards = tuple(str(alias) for alias in shards_raw)
        else:
            raise _setting_error(
                "SHARD_GROUPS",
                f"[{name!r}]['SHARDS'] must be a list of aliases or an alias->weight dict",
                "Fix the group.",
            )
        if len(set(shards)) != len(shards):
            raise _setting_error(
                "SHARD_GROUPS", f"[{name!r}] lists an alias twice", "Remove the duplicate."
            )
        vnodes = spec.get("VNODES", default_vnodes)
        if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
            raise _setting_error(
                "SHARD_GROUPS",
                f"[{name!r}]['VNODES'] must be an int >= 1, not {vnodes!r}",
                "Fix the value (and never change it on a populated group outside resharding).",
            )
        groups[str(name)] = ShardGroupSpec(str(name), shards, weights, vnodes)
    return groups


class DBScaleSettings:
    """Typed, cached access to ``settings.DBSCALE``.

    Attribute reads are cheap after the first (they sit on the routing hot path); the
    cache is cleared by :func:`reload` on ``setting_changed``.
    """

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def _raw(self) -> dict[str, Any]:
        raw = self._cache.get("_raw")
        if raw is None:
            user = getattr(settings, "DBSCALE", {})
            if not isinstance(user, Mapping):
                raise ImproperlyConfigured(f"DBSCALE must be a dict, not {type(user).__name__}.")
            unknown = sorted(set(user) - set(DEFAULTS))
            if unknown:
                raise ImproperlyConfigured(
                    f"DBSCALE has unknown key(s) {unknown}. Known keys: {sorted(DEFAULTS)}."
                )
            raw = {**DEFAULTS, **user}
            self._cache["_raw"] = raw
        return raw

    def _derived(self, name: str, build: Callable[[dict[str, Any]], Any]) -> Any:
        try:
            return self._cache[name]
        except KeyError:
            value = self._cache[name] = build(self._raw())
            return value

    # -- read/write splitting ---------------------------------------------------------
    @property
    def replicas(self) -> dict[str, tuple[ReplicaSpec, ...]]:
        """Primary alias -> its replicas, in the order given."""
        return self._derived("replicas", lambda raw: _parse_replicas(raw["REPLICAS"]))  # type: ignore[no-any-return]

    @property
    def primary_of(self) -> dict[str, str]:
        """Replica alias -> its primary alias."""

        def build(_raw: dict[str, Any]) -> dict[str, str]:
            return {spec.alias: p for p, specs in self.replicas.items() for spec in specs}

        return self._derived("primary_of", build)  # type: ignore[no-any-return]

    @property
    def max_replica_lag(self) -> float:
        return float(self._derived("lag", lambda raw: _as_positive_number(raw, "MAX_REPLICA_LAG")))

    @property
    def max_replica_lag_bytes(self) -> int | None:
        value = self._derived(
            "lag_bytes",
            lambda raw: _as_positive_number(raw, "MAX_REPLICA_LAG_BYTES", allow_none=True),
        )
        return None if value is None else int(value)

    @property
    def replica_check_interval(self) -> float:
        return float(
            self._derived(
                "interval",
                lambda raw: _as_positive_number(raw, "REPLICA_CHECK_INTERVAL", minimum=0.01),
            )
        )

    @property
    def replica_probe_timeout(self) -> float:
        return float(
            self._derived(
                "probe", lambda raw: _as_positive_number(raw, "REPLICA_PROBE_TIMEOUT", minimum=0.01)
            )
        )

    @property
    def replica_quarantine(self) -> tuple[float, float]:
        def build(raw: dict[str, Any]) -> tuple[float, float]:
            value = raw["REPLICA_QUARANTINE"]
            ok = (
                isinstance(value, list | tuple)
                and len(value) == 2
                and all(
                    isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in value
                )
                and value[0] <= value[1]
            )
            if not ok:
                raise _setting_error(
                    "REPLICA_QUARANTINE",
                    f"must be (first_backoff_seconds, max_backoff_seconds), not {value!r}",
                    "Example: (1.0, 60.0).",
                )
            return float(value[0]), float(value[1])

        return self._derived("quarantine", build)  # type: ignore[no-any-return]

    @property
    def replica_selection(self) -> str:
        def build(raw: dict[str, Any]) -> str:
            value = raw["REPLICA_SELECTION"]
            if value not in SELECTIONS:
                raise _setting_error(
                    "REPLICA_SELECTION", f"is {value!r}", f"Use one of {list(SELECTIONS)}."
                )
            return str(value)

        return self._derived("selection", build)  # type: ignore[no-any-return]

    @property
    def replica_wait(self) -> float:
        return float(self._derived("wait", lambda raw: _as_positive_number(raw, "REPLICA_WAIT")))

    @property
    def read_your_writes(self) -> str:
        def build(raw: dict[str, Any]) -> str:
            value = raw["READ_YOUR_WRITES"]
            if value not in READ_YOUR_WRITES_MODES:
                raise _setting_error(
                    "READ_YOUR_WRITES",
                    f"is {value!r}",
                    f"Use one of {list(READ_YOUR_WRITES_MODES)}.",
                )
            return str(value)

        return self._derived("ryw", build)  # type: ignore[no-any-return]

    @property
    def sticky_seconds(self) -> float:
        return float(
            self._derived("sticky", lambda raw: _as_positive_number(raw, "STICKY_SECONDS"))
        )

    @property
    def consistency_cookie(self) -> str:
        return self._derived("cookie", lambda raw: _token_name(raw, "CONSISTENCY_COOKIE"))  # type: ignore[no-any-return]

    @property
    def consistency_header(self) -> str:
        return self._derived("header", lambda raw: _token_name(raw, "CONSISTENCY_HEADER"))  # type: ignore[no-any-return]

    @property
    def consistency_max_age(self) -> int:
        return int(
            self._derived(
                "max_age", lambda raw: _as_positive_number(raw, "CONSISTENCY_MAX_AGE", minimum=1)
            )
        )

    @property
    def same_database(self) -> dict[str, str]:
        """Alias -> the alias it declares itself a second connection of (``SAME_DATABASE``)."""

        def build(raw: dict[str, Any]) -> dict[str, str]:
            value = raw["SAME_DATABASE"]
            ok = isinstance(value, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) and k != v for k, v in value.items()
            )
            if not ok:
                raise _setting_error(
                    "SAME_DATABASE",
                    f"must map an alias to the alias of the same database, not {value!r}",
                    'Example: {"default_serializable": "default"}.',
                )
            chained = sorted(k for k, v in value.items() if v in value)
            if chained:
                raise _setting_error(
                    "SAME_DATABASE",
                    f"maps {chained} to aliases that are themselves mapped",
                    "Map every twin to the one alias that names the database.",
                )
            return dict(value)

        return self._derived("same_database", build)  # type: ignore[no-any-return]

    @property
    def database_of(self) -> dict[str, str]:
        """Alias -> the alias that names its database's data: one name per database.

        A replica names its primary's; an alias declared in ``SAME_DATABASE`` names its
        target's; aliases that reach the same ``HOST``, ``PORT`` and ``NAME`` (one used for
        another isolation level, a ``TEST["MIRROR"]`` twin) name the first of them in
        ``DATABASES``. The cache keys its versions by this name, so a write through any
        alias of a database invalidates what was cached through the others.
        """

        def build(_raw: dict[str, Any]) -> dict[str, str]:
            declared = self.same_database
            primary_of = self.primary_of
            first_at: dict[tuple[str, str, str], str] = {}
            result: dict[str, str] = {}
            for alias, conf in settings.DATABASES.items():
                if alias in primary_of or alias in declared:
                    continue
                where = (
                    str(conf.get("HOST") or ""),
                    str(conf.get("PORT") or ""),
                    str(conf.get("NAME") or ""),
                )
                result[alias] = first_at.setdefault(where, alias)
            for alias, target in declared.items():
                result[alias] = result.get(target, target)
            for replica, primary in primary_of.items():
                result[replica] = result.get(primary, primary)
            return result

        return self._derived("database_of", build)  # type: ignore[no-any-return]

    # -- sharding ----------------------------------------------------------------------
    @property
    def shard_groups(self) -> dict[str, ShardGroupSpec]:
        """Group name -> its shard aliases, weights and virtual-node count."""

        def build(raw: dict[str, Any]) -> dict[str, ShardGroupSpec]:
            vnodes = raw["SHARD_VNODES"]
            if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
                raise _setting_error(
                    "SHARD_VNODES",
                    f"must be an int >= 1, not {vnodes!r}",
                    "Use a positive int (default 8); never change it on a populated group.",
                )
            return _parse_shard_groups(raw["SHARD_GROUPS"], vnodes)

        return self._derived("shard_groups", build)  # type: ignore[no-any-return]

    @property
    def shard_map_check_interval(self) -> float:
        """Seconds a process trusts its copy of the shard map before re-reading its version."""
        return float(
            self._derived(
                "shard_map_interval",
                lambda raw: _as_positive_number(raw, "SHARD_MAP_CHECK_INTERVAL", minimum=0.01),
            )
        )

    @property
    def groups_of_shard(self) -> dict[str, tuple[str, ...]]:
        """Shard alias -> the groups listing it, in ``SHARD_GROUPS`` order.

        A database may be a shard of several groups (``customers`` and ``tenants`` on the
        same servers): each group's tables live on its own shards only, and the database
        numbers its IDs and keeps its ring stamp per group.
        """

        def build(_raw: dict[str, Any]) -> dict[str, tuple[str, ...]]:
            groups: dict[str, tuple[str, ...]] = {}
            for spec in self.shard_groups.values():
                for alias in spec.shards:
                    groups[alias] = (*groups.get(alias, ()), spec.name)
            return groups

        return self._derived("groups_of_shard", build)  # type: ignore[no-any-return]

    # -- queryset cache ----------------------------------------------------------------
    @property
    def cache_declared(self) -> bool:
        """Whether ``DBSCALE`` has a ``CACHE`` key: the queryset cache is opt-in.

        A project that uses only replicas or only sharding leaves it out and needs no Redis;
        ``"CACHE": {}`` turns the cache on with every default.
        """
        return self._derived(  # type: ignore[no-any-return]
            "cache_declared",
            lambda _raw: getattr(settings, "DBSCALE", {}).get("CACHE") is not None,
        )

    @property
    def cache(self) -> dict[str, Any]:
        """The ``CACHE`` sub-dict merged over :data:`CACHE_DEFAULTS`."""

        def build(raw: dict[str, Any]) -> dict[str, Any]:
            user = raw["CACHE"]
            if user is None:
                user = {}
            if not isinstance(user, Mapping):
                raise _setting_error(
                    "CACHE", f"must be a dict, not {user!r}", 'Example: {"ALIAS": "dbscale"}.'
                )
            unknown = sorted(set(user) - set(CACHE_DEFAULTS))
            if unknown:
                raise _setting_error(
                    "CACHE", f"has unknown key(s) {unknown}", f"Known: {sorted(CACHE_DEFAULTS)}."
                )
            return {**CACHE_DEFAULTS, **user}

        return self._derived("cache", build)  # type: ignore[no-any-return]

    def validate(self) -> None:
        """Parse every key now; raise ``ImproperlyConfigured`` naming the first bad one."""
        for name in dir(type(self)):
            if isinstance(getattr(type(self), name), property):
                getattr(self, name)

    def reload(self) -> None:
        """Drop every parsed value; the next access re-reads ``settings.DBSCALE``."""
        self._cache.clear()


dbscale_settings = DBScaleSettings()

_listeners: list[Callable[[], None]] = []


def on_settings_changed(callback: Callable[[], None]) -> Callable[[], None]:
    """Register *callback* to run whenever ``DBSCALE``, ``DATABASES`` or ``CACHES`` change.

    Modules that derive process-wide state from the settings (rings, monitors) use this so
    that ``override_settings`` never leaves them stale. Returns *callback* (decorator use).
    """
    if callback not in _listeners:
        _listeners.append(callback)
    return callback


WATCHED_SETTINGS = frozenset({"DBSCALE", "DATABASES", "CACHES"})


@receiver(setting_changed)
def _reload_on_change(*, setting: str, **kwargs: Any) -> None:
    if setting in WATCHED_SETTINGS:
        dbscale_settings.reload()
        for callback in _listeners:
            callback()
