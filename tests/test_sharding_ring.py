"""The key -> shard mapping: canonical keys, the ketama ring, balance and movement.

No database is touched here; these pin down the mapping itself, which every other sharding
test relies on.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import uuid
from collections import Counter
from decimal import Decimal

import pytest
from django.db import models
from django.test import override_settings
from hashring import HashRing

from django_dbscale.sharding import (
    InvalidShardKey,
    KetamaRing,
    ShardRing,
    UnknownShard,
    UnknownShardGroup,
    current_shard,
    get_ring,
    ring_key,
    shard_for_key,
    using_shard,
)
from django_dbscale.sharding.ring import MEMO_SIZE, set_ring_factory, vnode_name

THREE = ("shard0", "shard1", "shard2")
FOUR = (*THREE, "shard3")


def spread(ring: ShardRing, n: int) -> Counter[str]:
    return Counter(ring.node_for(ring_key(i)) for i in range(n))


# -- canonical keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (42, "42"),
        ("42", "42"),
        ("042", "42"),
        ("+42", "42"),
        (-7, "-7"),
        ("-7", "-7"),
        (2**70, str(2**70)),
        (uuid.UUID("1F0E8A9C-0000-4000-8000-00000000002A"), "1f0e8a9c-0000-4000-8000-00000000002a"),
        ("1F0E8A9C-0000-4000-8000-00000000002A", "1f0e8a9c-0000-4000-8000-00000000002a"),
        (
            "1f0e8a9c000040008000 00000000002a".replace(" ", ""),
            "1f0e8a9c-0000-4000-8000-00000000002a",
        ),
        ("{1f0e8a9c-0000-4000-8000-00000000002a}", "1f0e8a9c-0000-4000-8000-00000000002a"),
        ("urn:uuid:1f0e8a9c-0000-4000-8000-00000000002a", "1f0e8a9c-0000-4000-8000-00000000002a"),
        ("alice", "alice"),
        ("Alice ", "Alice "),
        ("42 ", "42 "),
        ("ü", "ü"),
    ],
)
def test_key_values_have_one_canonical_ring_string(value: object, expected: str) -> None:
    assert ring_key(value) == expected


@pytest.mark.parametrize("value", [None, True, False, 4.2, 42.0, Decimal("42"), b"42", [42]])
def test_keys_without_a_canonical_form_are_refused(value: object) -> None:
    with pytest.raises(InvalidShardKey, match="shard key|canonical"):
        ring_key(value)


def test_overlong_string_key_is_refused_not_truncated() -> None:
    with pytest.raises(InvalidShardKey, match="longer than 1024"):
        ring_key("x" * 1025)


def test_int_and_string_spellings_land_on_the_same_shard() -> None:
    for i in range(500):
        assert shard_for_key("customers", i) == shard_for_key("customers", str(i))
    u = uuid.uuid4()
    assert shard_for_key("customers", u) == shard_for_key("customers", str(u).upper())
    assert shard_for_key("customers", u) == shard_for_key("customers", u.hex)


# -- the ring ---------------------------------------------------------------------------------


def test_mapping_is_pinned_across_processes_and_versions() -> None:
    # Golden values: if any of these change, every stored row would be on the wrong shard.
    ring = KetamaRing(THREE, {}, 8)
    assert ring.fingerprint == "9de318a659916ef4"
    got = {k: ring.node_for(ring_key(k)) for k in (1, 2, 3, 42, "alice", uuid.UUID(int=7))}
    assert got == {
        1: "shard2",
        2: "shard0",
        3: "shard2",
        42: "shard2",
        "alice": "shard0",
        uuid.UUID(int=7): "shard2",
    }


def test_fast_lookup_equals_hashring_get_node() -> None:
    ring = KetamaRing(THREE, {"shard1": 3}, 4)
    reference = HashRing([vnode_name(a, i) for a in THREE for i in range(4)], ring.hashring.weights)
    for i in range(10_000):
        key = ring_key(i * 7919)
        assert ring.node_for(key) == reference.get_node(key).split("#")[0]


def test_hashring_point_counts_follow_len_nodes_and_weights() -> None:
    # floor(40 * len(nodes) * weight / total_weight) factors, three points each.
    equal = KetamaRing(THREE, {}, 8)
    assert {a: equal.points_of(a) for a in THREE} == dict.fromkeys(THREE, 8 * 40 * 3)
    weighted = KetamaRing(THREE, {"shard0": 2}, 8)
    # 24 vnodes, total weight 32: weight 2 -> floor(40*24*2/32)=60 factors, weight 1 -> 30.
    assert weighted.points_of("shard0") == 8 * 60 * 3
    assert weighted.points_of("shard1") == 8 * 30 * 3


def test_10k_keys_over_three_equal_shards_are_within_15_percent_of_the_mean() -> None:
    counts = spread(KetamaRing(THREE, {}, 8), 10_000)
    mean = 10_000 / 3
    deviations = {alias: abs(n - mean) / mean for alias, n in counts.items()}
    assert set(counts) == set(THREE)
    assert max(deviations.values()) <= 0.15, counts


def test_adding_a_fourth_shard_moves_about_a_quarter_of_keys_all_to_it() -> None:
    before, after = KetamaRing(THREE, {}, 8), KetamaRing(FOUR, {}, 8)
    n = 10_000
    moved = [i for i in range(n) if before.node_for(ring_key(i)) != after.node_for(ring_key(i))]
    fraction = len(moved) / n
    print(f"adding shard3 to 3 shards moved {fraction:.2%} of {n} keys")
    # Ideal is 1/4; with 8 vnodes the new shard's share is within a few points of it.
    assert 0.18 <= fraction <= 0.32
    assert {after.node_for(ring_key(i)) for i in moved} == {"shard3"}


def test_changing_one_weight_moves_keys_between_the_other_shards_too() -> None:
    before, after = KetamaRing(THREE, {}, 8), KetamaRing(THREE, {"shard0": 2}, 8)
    moves = Counter(
        (before.node_for(ring_key(i)), after.node_for(ring_key(i)))
        for i in range(10_000)
        if before.node_for(ring_key(i)) != after.node_for(ring_key(i))
    )
    # Keys move to shard0 (its weight grew) but also between shard1 and shard2.
    assert moves[("shard1", "shard2")] + moves[("shard2", "shard1")] > 0
    assert moves[("shard1", "shard0")] > 0 and moves[("shard2", "shard0")] > 0


def test_changing_vnodes_moves_most_keys_and_the_fingerprint() -> None:
    eight, sixteen = KetamaRing(THREE, {}, 8), KetamaRing(THREE, {}, 16)
    moved = sum(eight.node_for(str(i)) != sixteen.node_for(str(i)) for i in range(3000))
    assert moved > 3000 * 0.3
    assert eight.fingerprint != sixteen.fingerprint
    assert eight.fingerprint == KetamaRing(THREE, {}, 8).fingerprint
    assert KetamaRing(THREE, {"shard0": 2}, 8).fingerprint != eight.fingerprint


def test_group_ring_comes_from_settings_and_follows_changes(no_shard_map: None) -> None:
    ring = get_ring("customers")
    assert ring.nodes == THREE and ring.vnodes == 8
    groups = {"customers": {"SHARDS": {"shard0": 1, "shard1": 1, "shard2": 2}, "VNODES": 4}}
    with override_settings(DBSCALE={"SHARD_GROUPS": groups}):
        changed = get_ring("customers")
        assert changed.vnodes == 4 and changed.weights["shard2"] == 2
        assert changed.fingerprint != ring.fingerprint
    assert get_ring("customers").fingerprint == ring.fingerprint


def test_unknown_group_names_the_configured_ones() -> None:
    with pytest.raises(
        UnknownShardGroup, match=r"'nope' is not in .*\['customers', 'ledgers', 'tenants'\]"
    ):
        get_ring("nope")


def test_another_ring_implementation_can_be_plugged_in() -> None:
    class FirstNode:
        def __init__(self, nodes: tuple[str, ...]) -> None:
            self.nodes = nodes
            self.weights = dict.fromkeys(nodes, 1)
            self.vnodes = 1
            self.fingerprint = "first"

        def node_for(self, ring_key: str) -> str:
            return self.nodes[0]

    set_ring_factory(lambda spec: FirstNode(spec.shards))
    try:
        assert isinstance(get_ring("customers"), ShardRing)
        assert {shard_for_key("customers", i) for i in range(50)} == {"shard0"}
    finally:
        set_ring_factory(None)
    assert len({shard_for_key("customers", i) for i in range(50)}) == 3


# -- using_shard ------------------------------------------------------------------------------


def test_using_shard_nests_and_restores() -> None:
    assert current_shard("customers") is None
    with using_shard("customers", 1) as outer:
        assert outer == shard_for_key("customers", 1) == current_shard("customers")
        with using_shard("customers", shard="shard1"):
            assert current_shard("customers") == "shard1"
        assert current_shard("customers") == outer
    assert current_shard("customers") is None


def test_using_shard_decorates_sync_and_async_functions() -> None:
    @using_shard("customers", shard="shard2")
    def sync() -> str | None:
        return current_shard("customers")

    @using_shard("customers", shard="shard0")
    async def coro() -> str | None:
        await asyncio.sleep(0)
        return current_shard("customers")

    assert sync() == "shard2" and sync() == "shard2"
    assert asyncio.run(coro()) == "shard0"
    assert current_shard("customers") is None


def test_using_shard_does_not_leak_into_other_threads_or_tasks() -> None:
    seen: list[str | None] = []
    with using_shard("customers", shard="shard1"):
        thread = threading.Thread(target=lambda: seen.append(current_shard("customers")))
        thread.start()
        thread.join()
        seen.append(contextvars.copy_context().run(current_shard, "customers"))

    async def main() -> list[str | None]:
        async def pinned() -> str | None:
            with using_shard("customers", shard="shard2"):
                await asyncio.sleep(0.01)
                return current_shard("customers")

        async def other() -> str | None:
            await asyncio.sleep(0.005)
            return current_shard("customers")

        return list(await asyncio.gather(pinned(), other()))

    assert seen == [None, "shard1"]
    assert asyncio.run(main()) == ["shard2", None]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("nope", 1), {}, UnknownShardGroup, "'nope' is not in"),
        (("customers",), {}, TypeError, "exactly one of a key"),
        (("customers", 1), {"shard": "shard0"}, TypeError, "exactly one of a key"),
        (("customers",), {"shard": "default"}, UnknownShard, "not a shard of 'customers'"),
        (("customers", 4.5), {}, InvalidShardKey, "float"),
        ((42, 1), {}, TypeError, "group must be a str"),
    ],
)
def test_using_shard_validates_its_arguments(
    args: tuple[object, ...], kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        using_shard(*args, **kwargs)  # type: ignore[arg-type]


def test_one_using_shard_object_can_be_entered_by_concurrent_tasks_and_threads() -> None:
    pin = using_shard("customers", shard="shard1")  # shared, as a module-level constant

    async def task(delay: float) -> str | None:
        with pin:
            await asyncio.sleep(delay)
            inside = current_shard("customers")
        assert current_shard("customers") is None
        return inside

    async def main() -> list[str | None]:
        # The first task leaves while the second is still inside, and the other way round.
        return list(await asyncio.gather(task(0.01), task(0.03), task(0.02)))

    assert asyncio.run(main()) == ["shard1"] * 3
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def thread() -> None:
        try:
            barrier.wait()
            with pin:
                time.sleep(0.005)
                assert current_shard("customers") == "shard1"
            assert current_shard("customers") is None
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=thread) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with pytest.raises(RuntimeError, match="did not enter it"):
        pin.__exit__(None, None, None)


# -- key values that must not be rounded or misread -----------------------------------------------


@pytest.mark.parametrize("value", [4.5, 42.0, Decimal("42"), Decimal("4.5"), True, False])
def test_floats_decimals_and_bools_are_refused_even_by_an_integer_key_field(value: object) -> None:
    # BigIntegerField.to_python(4.5) is 4 and True is 1: a key is never rounded.
    with pytest.raises(InvalidShardKey, match="never rounded"):
        ring_key(value, field=models.BigIntegerField(name="customer_id"))


def test_an_all_digit_uuid_hex_string_is_an_int_unless_a_uuid_field_converts_it() -> None:
    value = uuid.UUID("12345678123456781234567812345678")
    # Documented: 32 decimal digits are an int; the UUID object and a UUIDField disagree.
    assert ring_key(value.hex) == "12345678123456781234567812345678"
    assert ring_key(value) == ring_key(str(value)) == "12345678-1234-5678-1234-567812345678"
    assert ring_key(value.hex, field=models.UUIDField(name="account")) == ring_key(value)


def test_node_for_remembers_keys_in_a_bounded_memo() -> None:
    ring = KetamaRing(THREE, {}, 8)
    reference = KetamaRing(THREE, {}, 8)
    for i in range(MEMO_SIZE * 2 + 10):
        key = ring_key(i)
        assert ring.node_for(key) == reference.node_for(key)
        assert len(ring._memo) <= MEMO_SIZE
    assert ring.node_for("42") == ring.node_for("42") == reference.node_for("42")
