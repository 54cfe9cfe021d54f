"""``explain_cache()``: whether a queryset is cacheable, its key, its versions, why it missed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django_dbscale.cache import continuity, engine, invalidation
from django_dbscale.cache.client import RedisUnavailable, gateway
from django_dbscale.cache.options import options

__all__ = ["Explanation", "explain_queryset"]


@dataclass(frozen=True)
class Explanation:
    """The cache's view of one queryset evaluation.

    ``state`` is ``"hit"``, ``"miss"``, ``"uncacheable"``, ``"bypass"`` (cacheable, but this
    process reads the database until it has verified Redis) or ``"unknown"`` (Redis could
    not be asked); ``reason`` says why in words; ``changed`` lists the dependencies whose
    version changed since the stored entry was filled (why an entry no longer matches).
    """

    cacheable: bool
    state: str
    reason: str
    key: str | None = None
    alias: str | None = None
    depends_on: tuple[str, ...] = ()
    version_keys: tuple[str, ...] = ()
    changed: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        lines = [f"{self.state}: {self.reason}"]
        if self.key:
            lines.append(f"key: {self.key}")
        lines.extend(f"depends on: {dep}" for dep in self.depends_on)
        lines.extend(f"changed: {dep}" for dep in self.changed)
        return "\n".join(lines)


def _uncacheable(reason: str) -> Explanation:
    return Explanation(cacheable=False, state="uncacheable", reason=reason)


def explain_queryset(queryset: Any, kind: str = "rows") -> Explanation:
    """Return the :class:`Explanation` for evaluating *queryset* as *kind*."""
    if kind not in ("rows", "count", "exists"):
        raise ValueError(f"explain_cache(kind={kind!r}): use 'rows', 'count' or 'exists'.")
    opts = options()
    if not opts.enabled:
        return _uncacheable("DBSCALE['CACHE']['ENABLED'] is False")
    if queryset.__dict__.get("_dbscale_timeout") is None:
        return _uncacheable(
            "not opted in: call .cache() or list the model in DBSCALE['CACHE']['MODELS']"
        )
    if queryset._for_write:
        return _uncacheable("a queryset made for writing")
    if engine.bypass.get() is not None:
        return _uncacheable(f"reads bypass the cache here ({engine.bypass.get()})")
    plan = queryset._dbscale_plan(kind)
    if plan is None:
        return _uncacheable("no safe key: select_for_update() or a value without a stable key")
    common: dict[str, Any] = {
        "key": plan.entry_key,
        "alias": plan.alias,
        "depends_on": plan.description,
        "version_keys": plan.version_keys,
    }
    if plan.reason is not None:
        return Explanation(cacheable=False, state="uncacheable", reason=plan.reason, **common)
    if invalidation.has_pending() and not invalidation.flush_pending():
        return Explanation(
            cacheable=True,
            state="miss",
            reason="invalidations are waiting for Redis; reads go to the database",
            **common,
        )
    if engine._untrusted(plan):
        continuity.kick()
        return Explanation(
            cacheable=True,
            state="bypass",
            reason=(
                "this process has not verified Redis yet (a fresh process, or after a Redis "
                "error): reads go to the database until it has; "
                "django_dbscale.cache.wait_until_verified() waits for it"
            ),
            **common,
        )
    gw = gateway()
    if not gw.available():
        return Explanation(
            cacheable=True,
            state="unknown",
            reason="circuit breaker open: Redis is skipped",
            **common,
        )
    gw.drain_owed()  # this thread's last fill went out without waiting: let it land first
    try:
        values, entry, header = gw.pipeline(
            [("MGET", *plan.version_keys), ("EXISTS", plan.entry_key), ("GET", plan.header_key)]
        )
    except RedisUnavailable as exc:
        return Explanation(cacheable=True, state="unknown", reason=f"Redis error: {exc}", **common)
    if not entry or header is None:
        return Explanation(
            cacheable=True,
            state="miss",
            reason="no entry: never filled, expired, evicted, or its fill was rejected",
            **common,
        )
    stored = header.decode().split("|")
    current = [v.decode() if v is not None else "" for v in values]
    if stored == current:
        return Explanation(
            cacheable=True, state="hit", reason="stored under the current versions", **common
        )
    changed = []
    for i, key in enumerate(plan.version_keys):
        before = stored[i] if i < len(stored) else "?"
        if before != current[i]:
            changed.append(key if current[i] else f"{key} (lost: evicted or expired)")
    return Explanation(
        cacheable=True,
        state="miss",
        reason="invalidated: a write changed what it depends on since it was stored",
        changed=tuple(changed),
        **common,
    )
