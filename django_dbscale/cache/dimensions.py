"""Invalidation dimensions: fields whose values split a table's invalidation state.

A model with dimension ``author_id`` gets one version per author value besides its table
version. A write touching only rows of author 5 bumps the version of ``author_id=5`` and
leaves cached queries filtering on ``author_id=7`` valid. Queries that filter on no
dimension depend on the table version, which every write bumps.

Dimensions are declared on the model (``cache_dimensions = ("author",)``) or in
``DBSCALE["CACHE"]["DIMENSIONS"]`` (which wins, so third-party models can have them too).
For a sharded model without either, its shard key is the dimension.

Only local concrete columns of the model's own table qualify: the invalidation state is
per table, and a write to a parent table of multi-table inheritance is a write to that
table, not the child's.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import FieldDoesNotExist, ImproperlyConfigured
from django.db.models import Field, Model

from django_dbscale.cache.options import options
from django_dbscale.conf import on_settings_changed

__all__ = ["dimension_fields", "dimension_fields_for_table"]

_by_model: dict[type[Model], tuple[Field[Any, Any], ...]] = {}


def _shard_key_field(model: type[Model]) -> str | None:
    """Return the shard key field name of a sharded model (``None`` if unsharded)."""
    try:
        from django_dbscale.sharding.routing import shard_spec
    except ImportError:
        return None
    try:
        spec = shard_spec(model)
    except Exception:
        return None
    key_field = getattr(spec, "key_field", None)
    if key_field is None or key_field not in model._meta.local_concrete_fields:
        return None
    return str(key_field.name)


def resolve(model: type[Model], names: tuple[str, ...], source: str) -> tuple[Field[Any, Any], ...]:
    """Turn declared names into fields; raise ``ImproperlyConfigured`` naming the fix."""
    meta = model._meta
    fields: list[Field[Any, Any]] = []
    for name in names:
        try:
            field = meta.get_field(name)
        except FieldDoesNotExist:
            field = next((f for f in meta.concrete_fields if f.attname == name), None)  # type: ignore[assignment]
            if field is None:
                raise ImproperlyConfigured(
                    f"{source} names {name!r}, which is not a field of {meta.label}. "
                    f"Use one of {sorted(f.name for f in meta.local_concrete_fields)}."
                ) from None
        if field not in meta.local_concrete_fields:
            raise ImproperlyConfigured(
                f"{source} names {name!r}, which is not a concrete column of "
                f"{meta.label}'s own table {meta.db_table!r} (many-to-many, reverse and "
                "inherited fields cannot be dimensions). Declare it on the model that owns "
                "the column."
            )
        if field not in fields:
            fields.append(field)  # type: ignore[arg-type]
    return tuple(fields)


def declared_dimensions(model: type[Model]) -> Any:
    """Return ``cache_dimensions`` as declared by *model* itself or an abstract base.

    A concrete parent's declaration names the parent's columns, not the multi-table child's:
    the child does not inherit it.
    """
    for klass in model.__mro__:
        if "cache_dimensions" in vars(klass):
            meta = getattr(klass, "_meta", None)
            if klass is model or meta is None or meta.abstract:
                return vars(klass)["cache_dimensions"]
            return None
    return None


def dimension_fields(model: type[Model]) -> tuple[Field[Any, Any], ...]:
    """Return the dimension fields of *model* (empty for none); proxies share their table's."""
    model = model._meta.concrete_model or model
    try:
        return _by_model[model]
    except KeyError:
        pass
    meta = model._meta
    configured = options().dimensions.get(meta.label_lower)
    if configured is not None:
        fields = resolve(model, configured, f"DBSCALE['CACHE']['DIMENSIONS'][{meta.label!r}]")
    else:
        declared = declared_dimensions(model)
        if declared is not None:
            if isinstance(declared, str):
                declared = (declared,)
            fields = resolve(model, tuple(declared), f"{meta.label}.cache_dimensions")
        else:
            shard_key = _shard_key_field(model)
            fields = resolve(model, (shard_key,), f"{meta.label}'s shard key") if shard_key else ()
    _by_model[model] = fields
    return fields


def dimension_fields_for_table(model: type[Model] | None) -> tuple[Field[Any, Any], ...]:
    """Like :func:`dimension_fields` for the model of a written table (``None``: none)."""
    if model is None or model._meta.auto_created:
        return ()
    return dimension_fields(model)


@on_settings_changed
def _reset() -> None:
    _by_model.clear()
