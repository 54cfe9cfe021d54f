"""How ConsistencyMiddleware seeds a request's consistency context from its header and cookie.

The header and the cookie are checked one by one: a bad token in one never hides a good
token in the other, and every valid token counts (highest position per primary, latest
write time per primary). The unit tests drive ``state_from_request`` with RequestFactory
requests and tokens made by ``consistency_token()`` (no database query); the last test
checks the same thing end to end against the real primary and its paused replica.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from unittest import mock

import pytest
from django.core import signing
from django.test import Client, RequestFactory
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from django_dbscale import consistency, replicas
from django_dbscale.middleware import (
    MAX_POSITION_LENGTH,
    MAX_POSITION_VALUES,
    state_from_request,
)
from django_dbscale.testing.harness import Services

HEADER = "HTTP_X_DBSCALE_POSITION"
COOKIE = "dbscale_pos"
PRIMARIES = ["default", "shard0", "shard1", "shard2"]
MAX_LSN = (1 << 64) - 1


def make_token(positions: dict[str, int], write_times: dict[str, float] | None = None) -> str:
    """Return a real token for *positions* (merged directly: no query to fetch an LSN)."""
    with consistency.consistency_context() as state:
        state.merge_positions(positions)
        state.write_times.update(write_times or {})
        return consistency.consistency_token()


def expired_token(positions: dict[str, int]) -> str:
    """Return a token signed long before CONSISTENCY_MAX_AGE (300 s) ago."""
    long_ago = signing.b62_encode(int(time.time()) - 3600)
    with mock.patch.object(signing.TimestampSigner, "timestamp", return_value=long_ago):
        return make_token(positions)


def forged_token(positions: dict[str, int]) -> str:
    """Return a well-formed token signed with another key."""
    payload = {"p": {a: consistency.format_lsn(v) for a, v in positions.items()}, "t": {}}
    return signing.dumps(
        payload, key="someone-elses-secret", salt=consistency.TOKEN_SALT, compress=True
    )


def flipped(token: str, index: int = -5) -> str:
    """Return *token* with one character changed."""
    char = token[index]
    return token[:index] + ("A" if char != "A" else "B") + token[index:][1:]


def request_with(header: str | None = None, cookie: str | None = None) -> Any:
    """A GET request carrying *header* and *cookie* the way a browser sends them."""
    factory = RequestFactory()
    if cookie is not None:
        factory.cookies[COOKIE] = cookie
    headers = {"X-DBScale-Position": header} if header is not None else {}
    return factory.get("/notes/1/", headers=headers)


def positions_of(header: str | None = None, cookie: str | None = None) -> dict[str, int]:
    return state_from_request(request_with(header, cookie)).positions


COOKIE_POSITIONS = {"default": 0x1_0000_0A00, "shard1": 4242}
HIGHER = {"default": MAX_LSN, "shard1": MAX_LSN, "shard2": MAX_LSN}


@pytest.mark.parametrize(
    "bad_header",
    [
        pytest.param(lambda: "garbage", id="garbage"),
        pytest.param(lambda: "FFFFFFFF/FFFFFFFF", id="raw-lsn"),
        pytest.param(lambda: expired_token(HIGHER), id="expired"),
        pytest.param(lambda: forged_token(HIGHER), id="forged"),
        pytest.param(lambda: flipped(make_token(HIGHER)), id="tampered"),
        pytest.param(lambda: make_token(HIGHER)[:-10], id="truncated"),
        pytest.param(lambda: "   ", id="whitespace"),
        pytest.param(lambda: "a:b:c", id="three-parts"),
    ],
)
def test_bad_header_does_not_erase_a_valid_cookie(bad_header: Any) -> None:
    cookie = make_token(COOKIE_POSITIONS)
    assert positions_of(header=bad_header(), cookie=cookie) == {
        "default": 0x1_0000_0A00,
        "shard1": 4242,
    }


def test_garbage_cookie_does_not_erase_a_valid_header() -> None:
    header = make_token({"shard0": 77, "default": 5})
    for bad in ["garbage", "FFFFFFFF/FFFFFFFF", expired_token(HIGHER), forged_token(HIGHER)]:
        assert positions_of(header=header, cookie=bad) == {"shard0": 77, "default": 5}


def test_header_and_cookie_are_merged_to_the_highest_position_per_primary() -> None:
    header = make_token({"default": 900, "shard0": 10}, {"default": 1000.5, "shard0": 2000.0})
    cookie = make_token({"default": 1200, "shard2": 7}, {"default": 1500.25, "shard2": 30.0})
    state = state_from_request(request_with(header=header, cookie=cookie))
    assert state.positions == {"default": 1200, "shard0": 10, "shard2": 7}
    assert state.write_times == {"default": 1500.25, "shard0": 2000.0, "shard2": 30.0}
    # The order of the sources does not matter.
    state = state_from_request(request_with(header=cookie, cookie=header))
    assert state.positions == {"default": 1200, "shard0": 10, "shard2": 7}
    assert state.write_times == {"default": 1500.25, "shard0": 2000.0, "shard2": 30.0}


def test_each_value_of_a_proxy_joined_header_counts_on_its_own() -> None:
    one = make_token({"default": 300})
    two = make_token({"default": 100, "shard1": 9})
    header = f"garbage, {one} ,, {forged_token(HIGHER)},{two}, FFFFFFFF/FFFFFFFF"
    assert positions_of(header=header) == {"default": 300, "shard1": 9}


def test_whitespace_only_values_give_an_empty_state() -> None:
    state = state_from_request(request_with(header=" \t ", cookie=" "))
    assert state.positions == {} and state.write_times == {} and not state.wrote


def test_token_naming_a_replica_is_ignored() -> None:
    replica = signing.dumps(
        {"p": {"default_replica": "FF/0"}, "t": {}}, salt=consistency.TOKEN_SALT, compress=True
    )
    assert positions_of(header=replica, cookie=make_token({"default": 1})) == {"default": 1}


def test_overlong_or_overcrowded_values_are_ignored_before_any_decoding() -> None:
    valid = make_token({"default": 11})
    too_long = valid + "," + "x" * MAX_POSITION_LENGTH
    too_many = ",".join([valid] * (MAX_POSITION_VALUES + 1))
    with mock.patch.object(consistency, "decode_token", wraps=consistency.decode_token) as decode:
        assert positions_of(header=too_long) == {}
        assert positions_of(header=too_many, cookie=too_long) == {}
        assert decode.call_count == 0
        # Just within the limits, the valid token counts.
        within = ",".join([valid] + ["x"] * (MAX_POSITION_VALUES - 1))
        assert positions_of(header=within) == {"default": 11}
        padded = valid + "," + " " * (MAX_POSITION_LENGTH - len(valid) - 1)
        assert positions_of(cookie=padded) == {"default": 11}


def test_rejected_tokens_are_logged_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="django_dbscale.middleware"):
        positions_of(header="garbage", cookie=make_token({"default": 3}))
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("from the header" in m and "signature" in m for m in messages), messages


# -- the parser against arbitrary input ---------------------------------------------------

lsns = st.integers(min_value=0, max_value=MAX_LSN)
write_times = st.floats(min_value=0, max_value=4e9, allow_nan=False).map(lambda t: round(t, 3))
real_tokens = st.builds(
    make_token,
    st.dictionaries(st.sampled_from(PRIMARIES), lsns, min_size=1),
    st.dictionaries(st.sampled_from(PRIMARIES), write_times),
)


@st.composite
def mutilated_tokens(draw: st.DrawFn) -> str:
    token = draw(real_tokens)
    index = draw(st.integers(min_value=0, max_value=len(token) - 1))
    how = draw(st.sampled_from(["truncate", "flip", "pad", "prefix"]))
    if how == "truncate":
        return token[:index]
    if how == "flip":
        return flipped(token, index)
    if how == "pad":  # surrounding whitespace is not part of a token: still valid
        return " " * draw(st.integers(0, 3)) + token + "\t" * draw(st.integers(0, 2))
    return draw(st.text(max_size=5)) + token


candidates = st.one_of(
    st.text(),
    st.text(st.characters(categories=["Cs"]) | st.characters(), max_size=8),
    st.text(alphabet="0123456789ABCDEFabcdef/:.-_ ,=", max_size=40),
    real_tokens,
    mutilated_tokens(),
    st.sampled_from(["", " ", "FFFFFFFF/FFFFFFFF", "a:b:c", "x" * (MAX_POSITION_LENGTH + 1)]),
    st.builds(forged_token, st.dictionaries(st.sampled_from(PRIMARIES), lsns, min_size=1)),
)
sources = st.one_of(
    st.none(),
    candidates.map(lambda c: [c]),
    st.lists(candidates, min_size=1, max_size=MAX_POSITION_VALUES + 2),
)
separators = st.sampled_from([",", ", ", " , "])


def expected_state(parts_by_source: list[list[str] | None], joined: list[str | None]) -> Any:
    """Max-merge the candidates that decode_token accepts, source limits applied."""
    positions: dict[str, int] = {}
    times: dict[str, float] = {}
    for parts, raw in zip(parts_by_source, joined, strict=True):
        if parts is None or raw is None:
            continue
        if len(raw) > MAX_POSITION_LENGTH or raw.count(",") + 1 > MAX_POSITION_VALUES:
            event("a source over the limits")
            continue
        # A candidate may hold commas itself (random text): each piece is a value of its own.
        for entry in [piece.strip() for part in parts for piece in part.split(",")]:
            try:
                decoded = consistency.decode_token(entry)
            except ValueError:  # InvalidConsistencyToken, or a lone surrogate it cannot sign
                continue
            for alias, lsn in decoded.positions.items():
                positions[alias] = max(lsn, positions.get(alias, -1))
            for alias, written in decoded.write_times.items():
                times[alias] = max(written, times.get(alias, float("-inf")))
    event("some valid token" if positions else "no valid token")
    return positions, times


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(header=sources, cookie=sources, sep=separators)
def test_state_is_the_per_primary_max_over_the_valid_tokens(
    header: list[str] | None, cookie: list[str] | None, sep: str
) -> None:
    raw_header = None if header is None else sep.join(header)
    raw_cookie = None if cookie is None else sep.join(cookie)
    request = RequestFactory().get("/")
    if raw_header is not None:
        request.META[HEADER] = raw_header
    # Set the parsed cookies directly: any text, whatever a Cookie header could carry.
    request.COOKIES = {} if raw_cookie is None else {COOKIE: raw_cookie}

    state = state_from_request(request)

    positions, times = expected_state([header, cookie], [raw_header, raw_cookie])
    assert state.positions == positions
    assert state.write_times == times
    assert not state.pending and not state.pinned and not state.wrote


# -- end to end: a real replica that has not replayed the write ---------------------------


def on_server(services: Services, alias: str, pk: int) -> list[tuple[Any, ...]]:
    return services.alias_server(alias).execute(
        "SELECT id, title FROM testapp_note WHERE id = %s",
        (pk,),
        dbname=services.alias_dbname(alias),
    )


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_garbage_header_does_not_hide_the_cookie_from_a_lagging_replica(
    services: Services, paused: Any
) -> None:
    replicas.monitor.refresh()
    assert replicas.monitor.status("default_replica").usable(time.monotonic())
    paused(services.pg1_replica)

    response = Client().post("/notes/", {"title": "my own write"})
    assert response.status_code == 200
    pk = response.json()["id"]
    cookie = response.cookies[COOKIE].value
    assert on_server(services, "default", pk) == [(pk, "my own write")]
    assert on_server(services, "default_replica", pk) == []  # not replayed yet

    browser = Client()
    browser.cookies[COOKIE] = cookie
    got = browser.get(f"/notes/{pk}/", HTTP_X_DBSCALE_POSITION="garbage")
    assert got.status_code == 200
    assert got.json() == {"title": "my own write", "db": "default"}
    # A proxy-joined header with a valid token behind garbage, and a garbage cookie.
    api = Client()
    api.cookies[COOKIE] = "garbage"
    got = api.get(f"/notes/{pk}/", HTTP_X_DBSCALE_POSITION=f"FFFFFFFF/FFFFFFFF, {cookie}")
    assert got.json() == {"title": "my own write", "db": "default"}
    # Without a valid position the read goes to the replica, which still lacks the row.
    got = Client().get(f"/notes/{pk}/", HTTP_X_DBSCALE_POSITION="garbage")
    assert got.json() == {"title": None, "db": None}
    assert on_server(services, "default_replica", pk) == []
