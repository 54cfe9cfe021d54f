"""Canonical ring strings for shard key values.

The ring hashes strings, so every key value is first turned into one *canonical* string.
The same logical key must give the same string whatever Python type the caller passes
(``42``, ``"42"``, a ``UUID`` or its text), in every process and Python version:

=================================  ===========================================================
value                              ring string
=================================  ===========================================================
``int`` (not ``bool``)             decimal digits, ``-`` for negatives: ``42`` -> ``"42"``
``str`` of a decimal integer       the same as the int: ``"42"``, ``"042"``, ``"+42"`` -> ``"42"``
``uuid.UUID``                      lowercase hyphenated: ``"1f0e...-...-..."`` (36 characters)
``str`` spelling a UUID            the same as the UUID, whatever the case, hyphens, braces or
                                   ``urn:uuid:`` prefix
any other ``str``                  the string itself, unchanged (hashed as UTF-8)
=================================  ===========================================================

Everything else (``None``, ``bool``, ``float``, ``Decimal``, ``bytes``, dates, model
instances without a usable pk) raises :class:`~.exceptions.InvalidShardKey` rather than
guessing a form: a float ``42.0`` and an int ``42`` must not silently diverge. ``bool``,
``float`` and ``Decimal`` are refused even when a key field would convert them (an
integer field's ``to_python(4.5)`` is ``4``, and ``True`` is ``1``): a key is never rounded.

A string of decimal digits is an int, always: a UUID written as 32 hex digits that
happen to all be decimal digits (about one UUID in three million) is read as an int
when no field says otherwise. Pass ``uuid.UUID`` objects or the hyphenated form for
UUID keys; querysets of a model with a ``UUIDField`` key convert with the field first
(``to_python``), so they are not affected.

Ring strings never change between releases: changing them moves every key.
"""

from __future__ import annotations

import re
import uuid
from decimal import Decimal
from typing import Any

from django.db.models import Field, Model

from django_dbscale.sharding.exceptions import InvalidShardKey

__all__ = ["MAX_KEY_LENGTH", "ring_key"]

#: Longest accepted string key, in characters; longer strings are refused, not truncated.
MAX_KEY_LENGTH = 1024

_INT_RE = re.compile(r"[+-]?[0-9]+\Z", re.ASCII)
_UUID_RE = re.compile(
    r"(?:urn:uuid:)?\{?[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\}?\Z",
    re.ASCII | re.IGNORECASE,
)


def ring_key(value: Any, *, field: Field[Any, Any] | None = None) -> str:
    """Return the canonical ring string of a shard key *value*.

    With *field* (the model's shard-key field), the value is first converted the way the
    field stores it (``to_python``), so ``"42"`` for an integer field and a UUID string for
    a ``UUIDField`` normalise before hashing. A model instance stands for its primary key
    (what a foreign-key shard key stores).
    """
    if isinstance(value, Model):
        pk = value.pk
        if pk is None:
            raise InvalidShardKey(
                f"{type(value).__name__} instance {value!r} has no primary key yet, so it "
                "cannot be a shard key. Save it first or pass its key value."
            )
        value = pk
    if isinstance(value, bool | float | Decimal):
        # Refused before to_python(), which would round 4.5 to 4 and turn True into 1.
        raise InvalidShardKey(
            f"{value!r} ({type(value).__name__}) cannot be a shard key"
            + (f" of {_describe(field)}" if field is not None else "")
            + ": shard keys are ints, strings or UUIDs and are never rounded. Convert it "
            "explicitly (int(...), str(...))."
        )
    if field is not None and value is not None:
        try:
            value = field.to_python(value)
        except Exception as exc:
            raise InvalidShardKey(
                f"{value!r} is not a valid value for the shard key field {_describe(field)}: {exc}"
            ) from exc
    return _canonical(value)


def _describe(field: Field[Any, Any]) -> str:
    model = getattr(field, "model", None)
    return f"{model.__name__}.{field.name}" if model is not None else str(field.name)


def _canonical(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        raise InvalidShardKey(
            f"{value!r} cannot be a shard key. Shard keys are ints, strings or UUIDs; "
            "pass the key value of the row (e.g. its customer id)."
        )
    if isinstance(value, int):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        if len(value) > MAX_KEY_LENGTH:
            raise InvalidShardKey(
                f"A shard key string of {len(value)} characters is longer than "
                f"{MAX_KEY_LENGTH}. Use a shorter natural key (an id, a slug)."
            )
        if _INT_RE.match(value):
            return str(int(value))
        if _UUID_RE.match(value):
            return str(uuid.UUID(value))
        return value
    raise InvalidShardKey(
        f"A {type(value).__name__} ({value!r}) has no canonical shard-key form. Use an int, "
        "a str or a UUID (convert floats and Decimals to int or str explicitly)."
    )
