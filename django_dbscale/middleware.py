"""Carry a user's read-your-writes position across requests.

:class:`ConsistencyMiddleware` opens one consistency context per request, seeded from the
position the client sent back (the ``X-DBScale-Position`` header for API clients, and the
``dbscale_pos`` cookie). When the request wrote, the response carries the new position as a
signed, timestamped token in both places, so the next request, served by any process, reads
at least what this one wrote. Tokens live ``CONSISTENCY_MAX_AGE`` seconds; a forged, expired
or malformed token is ignored (logged at debug level), never an error page. The header and
the cookie are checked separately and every valid token found in either counts (see
:func:`state_from_request`), so a bad header never hides a good cookie.

Put it near the top of ``MIDDLEWARE`` so that every database access of the request runs
inside its context.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponseBase

from django_dbscale import consistency
from django_dbscale.conf import dbscale_settings

logger = logging.getLogger("django_dbscale.middleware")


def _meta_key(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


#: A header or cookie value longer than this (in characters) is ignored whole, before it is
#: split or decoded. A token for four primaries is about 190 characters.
MAX_POSITION_LENGTH = 4096
#: A header or cookie value holding more comma-separated values than this is ignored whole.
#: Each value costs one signature check; a proxy joining a repeated header makes a few.
MAX_POSITION_VALUES = 16


def _tokens_in(source: str, raw: object) -> list[str]:
    """Return the candidate tokens of one header or cookie value (nothing if it is unusable)."""
    if not isinstance(raw, str) or not raw:
        return []
    if len(raw) > MAX_POSITION_LENGTH:
        logger.debug(
            "Ignoring consistency %s: %d characters (at most %d).",
            source,
            len(raw),
            MAX_POSITION_LENGTH,
        )
        return []
    if raw.count(",") >= MAX_POSITION_VALUES:
        logger.debug(
            "Ignoring consistency %s: more than %d comma-separated values.",
            source,
            MAX_POSITION_VALUES,
        )
        return []
    # Tokens are ASCII without commas or whitespace; drop blanks and repeats.
    candidates = list(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    if not all(candidate.isascii() for candidate in candidates):
        logger.debug("Ignoring non-ASCII consistency token(s) in the %s.", source)
    return [candidate for candidate in candidates if candidate.isascii()]


def state_from_request(request: HttpRequest) -> consistency.ConsistencyState:
    """Build the request's starting state from the tokens in its header and cookie.

    The ``X-DBScale-Position`` header and the ``dbscale_pos`` cookie (their configured names)
    are read independently. Each is a comma-separated list of tokens (proxies join a repeated
    header with ``", "``); surrounding whitespace, blank entries and non-ASCII entries (a
    token is ASCII) are ignored. A value longer than :data:`MAX_POSITION_LENGTH` (4096)
    characters or with more than :data:`MAX_POSITION_VALUES` (16) entries is ignored whole,
    before anything is split or decoded.
    Every token is verified on its own with :func:`~django_dbscale.consistency.decode_token`;
    a forged, expired or malformed one is skipped (logged at debug level) and never hides a
    valid one. The valid tokens are merged: the highest position per primary and the latest
    write time per primary.
    """
    state = consistency.ConsistencyState()
    sources = (
        ("header", request.META.get(_meta_key(dbscale_settings.consistency_header))),
        ("cookie", request.COOKIES.get(dbscale_settings.consistency_cookie)),
    )
    for source, raw in sources:
        for candidate in _tokens_in(source, raw):
            try:
                decoded = consistency.decode_token(candidate)
            except consistency.InvalidConsistencyToken as exc:
                logger.debug("Ignoring consistency token from the %s: %s", source, exc)
                continue
            state.merge_positions(decoded.positions)
            for alias, written in decoded.write_times.items():
                if written > state.write_times.get(alias, float("-inf")):
                    state.write_times[alias] = written
    return state


def attach_token(request: HttpRequest, response: HttpResponseBase, token: str) -> None:
    """Send *token* back as a cookie and as a response header."""
    response[dbscale_settings.consistency_header] = token
    response.set_cookie(
        dbscale_settings.consistency_cookie,
        token,
        max_age=dbscale_settings.consistency_max_age,
        httponly=True,
        samesite="Lax",
        secure=request.is_secure(),
    )


class ConsistencyMiddleware:
    """Open a consistency context per request and hand the client its position."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        state = state_from_request(request)
        token = consistency.open_context(state)
        try:
            response: HttpResponseBase = self.get_response(request)
            if state.wrote:
                attach_token(request, response, consistency.consistency_token())
            return response
        finally:
            consistency.close_context(token)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        state = state_from_request(request)
        token = consistency.open_context(state)
        try:
            get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]] = self.get_response
            response = await get_response(request)
            if state.wrote:
                position = await sync_to_async(consistency.consistency_token)()
                attach_token(request, response, position)
            return response
        finally:
            consistency.close_context(token)
