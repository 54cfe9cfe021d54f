"""Carry a user's read-your-writes position across requests.

:class:`ConsistencyMiddleware` opens one consistency context per request, seeded from the
position the client sent back (the ``X-DBScale-Position`` header for API clients, else the
``dbscale_pos`` cookie). When the request wrote, the response carries the new position as a
signed, timestamped token in both places, so the next request, served by any process, reads
at least what this one wrote. Tokens live ``CONSISTENCY_MAX_AGE`` seconds; a forged, expired
or malformed token is ignored (logged at debug level), never an error page.

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


def state_from_request(request: HttpRequest) -> consistency.ConsistencyState:
    """Build the request's starting state from its header or cookie token (if valid)."""
    state = consistency.ConsistencyState()
    raw = request.META.get(_meta_key(dbscale_settings.consistency_header)) or request.COOKIES.get(
        dbscale_settings.consistency_cookie
    )
    if raw:
        try:
            decoded = consistency.decode_token(raw)
        except consistency.InvalidConsistencyToken as exc:
            logger.debug("Ignoring consistency token: %s", exc)
        else:
            state.merge_positions(decoded.positions)
            state.write_times.update(decoded.write_times)
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
