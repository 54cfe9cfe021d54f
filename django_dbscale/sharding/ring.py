"""The key -> shard mapping: a small ring interface and its ``hashring`` implementation.

:class:`ShardRing` is the interface the rest of the library uses (``node_for``, ``nodes``,
``weights``, ``vnodes``, ``fingerprint``); :class:`KetamaRing` implements it on
``hashring.HashRing`` (ketama-style, md5). Another ring (jump hash, rendezvous) can be
plugged in by implementing the protocol and registering a factory with
:func:`set_ring_factory`.

How ``hashring`` 1.5 places keys, and what follows from it
----------------------------------------------------------
* Each node ``n`` gets ``floor(40 * len(nodes) * weight(n) / total_weight)`` *factors*; each
  factor ``j`` hashes ``"n-j"`` with md5 and takes three 32-bit little-endian points from the
  digest. With equal weights that is 40 factors = 120 points per node, whatever the number
  of nodes. A key's point is the first 4 bytes of ``md5(key)`` (little-endian); its node is
  the owner of the first ring point strictly greater than it (wrapping to the first point).
* We give each shard alias ``VNODES`` virtual nodes named ``alias#0 .. alias#{VNODES-1}``,
  each with the alias's weight, so an alias owns ``VNODES * 120`` points with equal weights.
  Virtual node names are part of the hash input: changing ``VNODES`` moves most keys.
* With equal weights, adding a shard only adds points, so only keys that now fall before
  one of the new shard's points move (about ``1/(n+1)`` of them), all to the new shard.
* With unequal weights the number of points of *every* node depends on ``total_weight``
  and ``len(nodes)``: changing one weight, or adding a node, changes the point count of the
  other nodes too (and ``floor`` quantises the ratios), so keys move between old nodes as
  well. Treat any weight change as a resharding.

The :attr:`~ShardRing.fingerprint` is a hash of the actual ring points and their owners,
so it changes exactly when the mapping can change (nodes, weights, vnodes, or a ``hashring``
release that places points differently).
"""

from __future__ import annotations

import hashlib
import threading
import time
from bisect import bisect
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

from hashring import HashRing

from django_dbscale.conf import ShardGroupSpec, dbscale_settings, on_settings_changed
from django_dbscale.sharding import shardmap
from django_dbscale.sharding.exceptions import UnknownShardGroup

__all__ = [
    "KetamaRing",
    "ShardRing",
    "build_ring",
    "configured_ring",
    "get_ring",
    "set_ring_factory",
    "vnode_name",
]

#: Keys remembered per ring by :meth:`KetamaRing.node_for` (the memo is dropped when full).
MEMO_SIZE = 4096


@runtime_checkable
class ShardRing(Protocol):
    """A deterministic mapping from ring strings to shard aliases."""

    @property
    def nodes(self) -> tuple[str, ...]:
        """The shard aliases, in the group's configured order."""

    @property
    def weights(self) -> Mapping[str, int]:
        """Alias -> weight (1 for aliases without an explicit weight)."""

    @property
    def vnodes(self) -> int:
        """Virtual nodes per alias."""

    @property
    def fingerprint(self) -> str:
        """A short hex digest that changes whenever the key -> alias mapping may change."""

    def node_for(self, ring_key: str) -> str:
        """Return the alias owning *ring_key* (a canonical key string)."""


def vnode_name(alias: str, index: int) -> str:
    """Return the ring node name of virtual node *index* of *alias* (hashed; never change)."""
    return f"{alias}#{index}"


class KetamaRing:
    """A :class:`ShardRing` on ``hashring.HashRing`` with ``vnodes`` virtual nodes per alias.

    ``hashring`` builds the ring points; lookups read its sorted point list directly
    (md5 of the key, then a binary search), which gives exactly ``HashRing.get_node``'s
    answer without its per-call overhead (the test suite checks the equivalence).
    """

    implementation = "hashring-ketama-md5"

    def __init__(self, nodes: tuple[str, ...], weights: Mapping[str, int], vnodes: int) -> None:
        if not nodes:
            raise ValueError("A ring needs at least one node.")
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, not {vnodes!r}.")
        self._nodes = tuple(nodes)
        self._weights = {alias: int(weights.get(alias, 1)) for alias in nodes}
        self._vnodes = vnodes
        owner = {vnode_name(a, i): a for a in nodes for i in range(vnodes)}
        vweights = {vnode_name(a, i): self._weights[a] for a in nodes for i in range(vnodes)}
        self._hashring = HashRing(list(owner), vweights)
        self._points: list[int] = self._hashring._sorted_keys
        self._owners: list[str] = [owner[self._hashring.ring[p]] for p in self._points]
        self._count = len(self._points)
        # Recently looked-up keys: a dict hit is ~15x cheaper than md5 + bisect, and a few
        # hot keys (a tenant, a customer) make most of a process's queries.
        self._memo: dict[str, str] = {}

    @property
    def nodes(self) -> tuple[str, ...]:
        return self._nodes

    @property
    def weights(self) -> Mapping[str, int]:
        return dict(self._weights)

    @property
    def vnodes(self) -> int:
        return self._vnodes

    @property
    def hashring(self) -> HashRing:
        """The underlying ``hashring.HashRing`` (nodes are virtual-node names)."""
        return self._hashring

    @cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.implementation.encode())
        digest.update(b"".join(p.to_bytes(4, "little") for p in self._points))
        digest.update("\0".join(self._owners).encode())
        return digest.hexdigest()[:16]

    def node_for(self, ring_key: str) -> str:
        memo = self._memo
        alias = memo.get(ring_key)  # not try/except: a raised KeyError costs more than md5
        if alias is not None:
            return alias
        point = int.from_bytes(hashlib.md5(ring_key.encode()).digest()[:4], "little")
        pos = bisect(self._points, point)
        alias = self._owners[pos if pos < self._count else 0]
        if len(memo) >= MEMO_SIZE:
            memo.clear()  # bounded: a scan over many keys must not grow it without end
        memo[ring_key] = alias
        return alias

    def segments(self) -> list[tuple[int, str]]:
        """Return the ring as ``(point, owner)`` pairs in point order.

        A key whose point ``p`` satisfies ``points[i-1] <= p < points[i]`` belongs to
        ``owners[i]`` (and ``p >= points[-1]`` wraps to ``owners[0]``), exactly as
        :meth:`node_for` decides.
        """
        return list(zip(self._points, self._owners, strict=True))

    def owner_of_point(self, point: int) -> str:
        """Return the alias owning ring point *point* (``0 <= point < 2**32``)."""
        pos = bisect(self._points, point)
        return self._owners[pos if pos < self._count else 0]

    def points_of(self, alias: str) -> int:
        """Return how many ring points *alias* owns."""
        return self._owners.count(alias)

    def share_of(self, alias: str) -> float:
        """Return the fraction of the 32-bit key space that maps to *alias*."""
        if self._count == 0:
            return 0.0
        owned = 0
        previous = self._points[-1] - 2**32
        for point, owner in zip(self._points, self._owners, strict=True):
            if owner == alias:
                owned += point - previous
            previous = point
        return owned / 2**32

    def __repr__(self) -> str:
        return f"<KetamaRing nodes={list(self._nodes)} vnodes={self._vnodes} {self.fingerprint}>"


RingFactory = Callable[[ShardGroupSpec], ShardRing]


def _ketama(spec: ShardGroupSpec) -> ShardRing:
    # A shard of weight 0 is retired: it owns no keys (and is not a node of the ring) but
    # keeps its position in SHARDS, which numbers the shards in IDs.
    nodes = tuple(alias for alias in spec.shards if spec.weights.get(alias, 1) > 0)
    return KetamaRing(nodes, {a: w for a, w in spec.weights.items() if w > 0}, spec.vnodes)


_factory: RingFactory = _ketama
_rings: dict[str, ShardRing] = {}
_lock = threading.Lock()


#: Rings built per (factory, shards, weights, vnodes): building one costs ~10 ms (hashring
#: hashes every point), and the shard map, the resharding and ``migrate`` ask for the same
#: few rings repeatedly. Rings are immutable, so sharing them is safe.
_built: dict[tuple[Any, ...], ShardRing] = {}


def build_ring(spec: ShardGroupSpec) -> ShardRing:
    """Build (or reuse) the ring of one group spec with the current factory."""
    key = (_factory, spec.shards, tuple(sorted(spec.weights.items())), spec.vnodes)
    ring = _built.get(key)
    if ring is None:
        if len(_built) >= 64:
            _built.clear()
        ring = _built[key] = _factory(spec)
    return ring


def get_ring(group: str) -> ShardRing:
    """Return the (cached) active ring of shard group *group*.

    The active ring is the group's row of the shard map when it has one
    (:mod:`~django_dbscale.sharding.shardmap`, re-read at most every
    ``SHARD_MAP_CHECK_INTERVAL``), else the group's ``SHARD_GROUPS`` entry. Raises
    :class:`UnknownShardGroup` naming the configured groups. The cache is dropped when the
    map changes and when ``DBSCALE`` or ``DATABASES`` change.
    """
    if time.monotonic() >= shardmap._cache.next_check:
        shardmap.refresh(wait=False)
    ring = _rings.get(group)
    if ring is not None:
        return ring
    return _build_active(group)


def _build_active(group: str) -> ShardRing:
    mapped = shardmap._cache.rings.get(group)
    spec = mapped.spec if mapped is not None else dbscale_settings.shard_groups.get(group)
    if spec is None:
        raise UnknownShardGroup(
            f"Shard group {group!r} is not in DBSCALE['SHARD_GROUPS'] "
            f"(configured: {sorted(dbscale_settings.shard_groups)}). Add it there or fix "
            "the name."
        )
    if not spec.shards:
        raise UnknownShardGroup(f"Shard group {group!r} has no shards. List its aliases.")
    with _lock:
        ring = _rings.get(group)
        if ring is None:
            ring = _rings[group] = build_ring(spec)
    return ring


def configured_ring(group: str) -> ShardRing:
    """Return the ring ``SHARD_GROUPS`` declares for *group* (the target of a resharding)."""
    spec = dbscale_settings.shard_groups.get(group)
    if spec is None or not spec.shards:
        return get_ring(group)  # raises the same error for an unknown or empty group
    return build_ring(spec)


def set_ring_factory(factory: RingFactory | None) -> None:
    """Use *factory* (spec -> :class:`ShardRing`) for every group; ``None`` restores ketama.

    Changing the ring implementation of a populated group moves keys: it is a resharding.
    """
    global _factory
    _factory = factory if factory is not None else _ketama
    _built.clear()
    clear_rings()


@on_settings_changed
@shardmap.on_change
def clear_rings() -> None:
    """Drop every cached ring (called when the settings or the shard map change)."""
    _rings.clear()
