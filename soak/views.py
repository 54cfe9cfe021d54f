"""The soak's views: each response carries what :mod:`soak.checker` needs.

``POST /soak/write`` (``user``, ``kind`` = ``counter`` | ``note``, ``value``)
    In one transaction on the row's database: raise the row's value to ``value`` (never
    lower it: a write the client gave up on may commit after a later one) and append the
    ledger row ``(user, value)``. Answers ``{"value", "db", "lsn"}``: the database written
    and its WAL position from the request's consistency token (the middleware sends the
    token itself back in the ``X-DBScale-Position`` header and the ``dbscale_pos`` cookie).
``GET /soak/read`` (``target``, ``kind``, ``seq``)
    Reads ``target``'s row once per letter of ``seq`` inside the request's one consistency
    context: ``u`` uncached (``.nocache()``), ``c`` through the queryset cache. Answers
    ``{"reads": [{"value", "db", "cached", "hit", "reason"}, ...]}`` in order, so that the
    checker can hold cached and uncached reads of one context to monotonic reads.

Any exception becomes a 503 with ``{"error": "<type>: <message>"}``: the soak logs it, and
an error is never mistaken for a value.
"""

from __future__ import annotations

import traceback
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from django.db import transaction
from django.db.models import Value
from django.db.models.functions import Greatest
from django.http import HttpRequest, JsonResponse

from django_dbscale import consistency_token
from django_dbscale.cache import cache_read
from django_dbscale.consistency import decode_token
from django_dbscale.sharding import shard_for_key
from soak.models import GROUP, Counter, CounterEntry, Note, NoteEntry

KINDS: dict[str, tuple[Any, Any]] = {"counter": (Counter, CounterEntry), "note": (Note, NoteEntry)}

_cache_events: ContextVar[list[dict[str, Any]] | None] = ContextVar(
    "soak_cache_events", default=None
)


def _on_cache_read(sender: Any, **kwargs: Any) -> None:
    events = _cache_events.get()
    if events is not None:
        events.append({"hit": bool(kwargs.get("hit")), "reason": kwargs.get("reason")})


cache_read.connect(_on_cache_read, weak=False, dispatch_uid="soak.views")


def _error(exc: BaseException, **extra: Any) -> JsonResponse:
    """Answer 503 with the error and where in the library it was raised (for diagnosis)."""
    frames = [
        f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
        for frame in traceback.extract_tb(exc.__traceback__)
        if "django_dbscale" in frame.filename or "soak" in frame.filename
    ]
    return JsonResponse(
        {"error": f"{type(exc).__name__}: {exc}"[:500], "where": frames[-6:], **extra},
        status=503,
    )


def health(request: HttpRequest) -> JsonResponse:
    """Answer 200 once the worker is up (no database access)."""
    return JsonResponse({"ok": True})


def write(request: HttpRequest) -> JsonResponse:
    """Raise the user's row to ``value`` and append its ledger row, in one transaction."""
    try:
        user = int(request.POST["user"])
        kind = request.POST["kind"]
        value = int(request.POST["value"])
        model, entry = KINDS[kind]
    except (KeyError, ValueError) as exc:
        return JsonResponse({"error": f"bad request: {exc!r}"}, status=400)
    try:
        alias = shard_for_key(GROUP, user) if kind == "counter" else "default"
        with transaction.atomic(using=alias):
            updated = model.objects.filter(user=user).update(value=Greatest("value", Value(value)))
            if not updated:
                model.objects.create(user=user, value=value)
            entry.objects.create(user=user, seq=value)
        positions = decode_token(consistency_token()).positions
    except Exception as exc:
        return _error(exc)
    return JsonResponse({"value": value, "db": alias, "lsn": positions.get(alias)})


def read(request: HttpRequest) -> JsonResponse:
    """Read ``target``'s row once per letter of ``seq`` (``u`` uncached, ``c`` cached)."""
    try:
        target = int(request.GET["target"])
        model, _ = KINDS[request.GET["kind"]]
        seq = request.GET.get("seq", "u")
        if not seq or set(seq) - {"u", "c"} or len(seq) > 8:
            raise ValueError(f"seq={seq!r}: use up to 8 of 'u' and 'c'")
    except (KeyError, ValueError) as exc:
        return JsonResponse({"error": f"bad request: {exc!r}"}, status=400)
    reads: list[dict[str, Any]] = []
    try:
        read_rows(model, target, seq, reads)
    except Exception as exc:
        return _error(exc, reads=reads)
    return JsonResponse({"reads": reads})


def read_rows(model: Any, target: int, seq: str, reads: list[dict[str, Any]]) -> None:
    """Append one read of ``target``'s row to *reads* per letter of *seq* (``u``/``c``).

    Shared by the view and the background worker (:mod:`soak.worker`), which runs it inside
    ``read_at_least(token)``. Appends as it goes, so a failure keeps the reads before it.
    """
    for step in seq:
        events: list[dict[str, Any]] = []
        token = _cache_events.set(events)
        try:
            queryset = model.objects.filter(user=target)
            queryset = queryset.cache() if step == "c" else queryset.nocache()
            row = queryset.first()
        finally:
            _cache_events.reset(token)
        reads.append(
            {
                "value": None if row is None else row.value,
                "db": None if row is None else row._state.db,
                "cached": step == "c",
                "hit": any(event["hit"] for event in events),
                "reason": events[-1]["reason"] if events else None,
            }
        )
