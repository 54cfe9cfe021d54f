"""Public invalidation entry points and the start-up hooks of the cache.

Writes through the ORM invalidate by themselves (see
:mod:`django_dbscale.backends.postgresql.compiler`). Code that writes with raw SQL, or
outside Django altogether, tells the cache with :func:`invalidate_model` or
:func:`invalidate`; both follow the caller's transaction (bumped at commit inside
``atomic()``, at once otherwise).

``migrate`` and ``flush`` change or empty tables behind the ORM; the ``post_migrate``
receiver (Django sends it after both, once per app) invalidates each app's tables on the
database they ran on, so every table is invalidated once per command.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.apps import AppConfig, apps
from django.db import DEFAULT_DB_ALIAS, router
from django.db.models import Model
from django.db.models.signals import post_migrate

from django_dbscale.cache import invalidation
from django_dbscale.cache.options import options
from django_dbscale.conf import on_settings_changed

__all__ = ["connect", "install", "invalidate", "invalidate_all", "invalidate_model"]


def _write_alias(model: type[Model], using: str | None, hints: dict[str, Any]) -> str:
    from django_dbscale.cache.options import primary_alias

    if using is not None:
        return primary_alias(using)
    return primary_alias(router.db_for_write(model, **hints) or DEFAULT_DB_ALIAS)


def invalidate_model(model: type[Model] | str, *, using: str | None = None) -> None:
    """Invalidate every cached query that reads *model*'s tables (on its write database).

    *model* is a model class or an ``"app_label.ModelName"`` label; *using* picks the
    database (default: where the router sends the model's writes; for a sharded model pass
    each shard).
    """
    if isinstance(model, str):
        try:
            model = apps.get_model(model)
        except (LookupError, ValueError) as exc:
            raise ValueError(
                f"invalidate_model({model!r}): not an installed model. Use a model class or "
                '"app_label.ModelName".'
            ) from exc
    if not (isinstance(model, type) and issubclass(model, Model)):
        raise TypeError(f"invalidate_model() takes a model class or label, not {model!r}.")
    alias = _write_alias(model, using, {})
    invalidation.invalidate_tables(
        alias, [(table, None) for table in invalidation.model_tables(model)]
    )


def invalidate(obj: Model, *, using: str | None = None) -> None:
    """Invalidate cached queries that could contain *obj*'s row.

    For a model with invalidation dimensions only the dimension values of *obj* (and the
    table version) are bumped; pass the object as it was *before* a raw-SQL change of a
    dimension field and call :func:`invalidate_model` too, or just the latter.
    """
    if not isinstance(obj, Model):
        raise TypeError(
            f"invalidate() takes a model instance, not {obj!r}; use invalidate_model()."
        )
    model = type(obj)
    alias = _write_alias(model, using or obj._state.db, {"instance": obj})
    meta = (model._meta.concrete_model or model)._meta
    pairs: list[tuple[str, Any]] = [(meta.db_table, invalidation.dims_for_instance(obj))]
    pairs.extend((parent._meta.db_table, None) for parent in meta.get_parent_list())
    invalidation.invalidate_tables(alias, pairs)


def invalidate_all(using: str = DEFAULT_DB_ALIAS) -> None:
    """Invalidate every cached query on database *using* (every installed model's tables)."""
    _invalidate_whole_tables(apps.get_models(include_auto_created=True), using)


def _invalidate_whole_tables(models: Iterable[type[Model]], using: str) -> None:
    from django_dbscale.cache.options import primary_alias

    tables = sorted({model._meta.db_table for model in models})
    invalidation.invalidate_tables(primary_alias(using), [(t, None) for t in tables])


def _after_migrate(*, app_config: AppConfig, using: str = DEFAULT_DB_ALIAS, **kwargs: Any) -> None:
    # Django sends post_migrate once per app with models after every migrate and flush:
    # each send invalidates its app's tables, so together they cover every table once.
    if not options().enabled:
        return
    _invalidate_whole_tables(app_config.get_models(include_auto_created=True), using)


# -- CACHE["MODELS"] ------------------------------------------------------------------------

_installed: dict[type[Any], type[Any]] = {}


def _cached_manager_class(manager_class: type[Any]) -> type[Any]:
    from django_dbscale.cache.queryset import CachedQuerySet, CacheManagerMixin

    cls = _installed.get(manager_class)
    if cls is None:
        queryset_class = getattr(manager_class, "_queryset_class", None)
        if queryset_class is None or issubclass(queryset_class, CachedQuerySet):
            qs_class = queryset_class or CachedQuerySet
        else:
            qs_class = type(
                f"Cached{queryset_class.__name__}", (CachedQuerySet, queryset_class), {}
            )
        cls = type(
            f"Cached{manager_class.__name__}",
            (CacheManagerMixin, manager_class),
            {"_queryset_class": qs_class, "__module__": manager_class.__module__},
        )
        _installed[manager_class] = cls
    return cls


def connect() -> None:
    """Start the cache in this process: the app's ``ready()`` calls it when it is configured.

    Subscribes to the backend's write and transaction events and to ``post_migrate``, and
    gives the models in ``CACHE["MODELS"]`` the cache's manager. Idempotent.
    """
    invalidation.connect_receivers()
    post_migrate.connect(_after_migrate, dispatch_uid="django_dbscale.cache.post_migrate")
    install()
    on_settings_changed(_reinstall)


def install() -> None:
    """Give the managers of every model in ``CACHE["MODELS"]`` the cache's queryset class.

    Models that already use :class:`~django_dbscale.cache.CachedManager` are left alone;
    others (third-party models such as ``auth.User``) get their manager class swapped for a
    subclass that adds the cache mixin, keeping their own methods. Idempotent; also run
    when the settings change.
    """
    from django.core.exceptions import ImproperlyConfigured

    from django_dbscale.cache.queryset import CacheManagerMixin

    # AppConfig.ready() runs once every model is imported but before apps.ready is set.
    if not apps.models_ready:
        return
    try:
        labels = options().models
    except ImproperlyConfigured:
        return  # reported by system check dbscale.E200
    for label in labels:
        try:
            model = apps.get_model(label)
        except LookupError:
            continue  # reported by system check dbscale.E201
        for manager in model._meta.managers:
            if not isinstance(manager, CacheManagerMixin):
                manager.__class__ = _cached_manager_class(type(manager))


def _reinstall() -> None:
    install()
