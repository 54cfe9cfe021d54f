"""Reads never go back in time within a context, whichever pillar serves them.

A cache fill that ran on the primary, and a hit on an entry filled there, show the newest
rows; a plain read after them in the same context must not be routed to a replica that
has not replayed those rows yet. Replay is held back for real on the harness's streaming
replica; what the replica holds is checked with direct SQL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from django_dbscale import consistency, replicas
from django_dbscale.testing.harness import Services
from tests.test_cache_support import QueryCounter, cache_env, fresh_context, observe
from tests.testapp.models_cache import CCounter

pytestmark = [
    pytest.mark.django_db(transaction=True, databases="__all__"),
    pytest.mark.usefixtures(cache_env.__name__),
]


def on_replica(services: Services, pk: int) -> int:
    rows = services.pg1_replica.execute(
        "SELECT value FROM testapp_ccounter WHERE id = %s", (pk,), dbname="dbscale"
    )
    return int(rows[0][0])


def cached(pk: int) -> int:
    return int(CCounter.objects.cache().get(pk=pk).value)


def plain(pk: int) -> tuple[int, str]:
    """Read without the cache; return the value and the alias it came from."""
    with QueryCounter(["default", "default_replica"]) as q:
        value = int(CCounter.objects.nocache().get(pk=pk).value)
    (alias,) = [a for a, n in q.counts.items() if n]
    return value, alias


@pytest.fixture
def lagging(services: Services, paused: Callable[[Any], Any]) -> Callable[[int, int], None]:
    """Return ``write(pk, value)``: a write the paused replica does not replay."""
    services.pg1_replica.wait_for_replay()
    replicas.monitor.refresh()
    paused(services.pg1_replica)

    def write(pk: int, value: int) -> None:
        with fresh_context():
            CCounter.objects.filter(pk=pk).update(value=value)
        replicas.monitor.refresh()  # the replica is still within the lag budget

    return write


@pytest.fixture
def row(services: Services) -> CCounter:
    created: CCounter = CCounter.objects.create(name="c", value=5)
    services.pg1_replica.wait_for_replay()
    return created


def test_a_plain_read_after_a_fill_moved_to_the_primary_is_not_older(
    row: CCounter, services: Services, lagging: Callable[[int, int], None]
) -> None:
    lagging(row.pk, 6)
    assert on_replica(services, row.pk) == 5  # the replica really is behind
    with fresh_context(), observe() as seen:
        assert replicas.read_alias("default") == "default_replica"  # an ordinary context
        assert cached(row.pk) == 6  # the fill could not use the replica: primary
        assert plain(row.pk) == (6, "default")
    assert seen.reasons == ["miss"]
    assert replicas.route_counts[("default", "cache_fill")] == 1


def test_a_plain_read_after_a_hit_on_an_entry_filled_from_the_primary_is_not_older(
    row: CCounter, services: Services, lagging: Callable[[int, int], None]
) -> None:
    lagging(row.pk, 6)
    with fresh_context():
        assert cached(row.pk) == 6  # filled from the primary
    assert on_replica(services, row.pk) == 5
    with fresh_context(), observe() as seen:
        assert cached(row.pk) == 6
        assert plain(row.pk) == (6, "default")
        assert consistency.current_state().positions["default"] > 0  # the entry's floor
    assert seen.reasons == ["hit"]


def test_a_hit_on_an_entry_filled_from_a_caught_up_replica_keeps_reads_on_replicas(
    row: CCounter, services: Services
) -> None:
    replicas.monitor.refresh()
    with fresh_context(), QueryCounter(["default", "default_replica"]) as q:
        assert cached(row.pk) == 5
    assert q.counts == {"default": 0, "default_replica": 1}  # a replica fill: no LSN query
    with fresh_context(), observe() as seen:
        assert cached(row.pk) == 5
        assert plain(row.pk) == (5, "default_replica")
    assert seen.reasons == ["hit"]


def test_cached_and_plain_reads_interleaved_under_held_back_replay_never_go_back(
    row: CCounter, services: Services, lagging: Callable[[int, int], None]
) -> None:
    # Several readers, each its own context, alternate cached and plain reads while a
    # writer commits newer values the replica does not replay.
    contexts = [consistency.ConsistencyState() for _ in range(4)]
    seen: list[list[int]] = [[] for _ in contexts]
    for value in range(6, 12):
        lagging(row.pk, value)
        for index, state in enumerate(contexts):
            token = consistency.open_context(state)
            try:
                reads = (cached, plain) if (index + value) % 2 else (plain, cached)
                for read in reads:
                    result = read(row.pk)
                    seen[index].append(result if isinstance(result, int) else result[0])
            finally:
                consistency.close_context(token)
    assert on_replica(services, row.pk) == 5  # replay was held back throughout
    for values in seen:
        assert values == sorted(values), values  # monotonic within each context
        assert values[-1] == 11  # and each ended on the newest value
    # The readers that started on the replica saw 5 there; once any of them saw a newer
    # value (from the cache or the primary) it never saw 5 again.
    assert any(values[0] == 5 for values in seen)
