"""System checks of the queryset cache (ids ``dbscale.E200``-``E249``, ``dbscale.W200``+).

Registered when :mod:`django_dbscale.checks` imports this module. They read settings and
model metadata only (no Redis, no database), so they run on every ``manage.py check``. The
cache alias itself (missing, or not django-redis) is ``dbscale.E006`` in the main checks.
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

__all__ = ["ALL_IDS"]

E200 = "dbscale.E200"  # DBSCALE["CACHE"] has a value that does not parse
E201 = "dbscale.E201"  # CACHE["MODELS"] names a model that is not installed
E202 = "dbscale.E202"  # a declared dimension is not a concrete column of the model's table
E203 = "dbscale.E203"  # CACHE["DIMENSIONS"] names a model that is not installed
E204 = "dbscale.E204"  # the django-redis alias uses a client the cache cannot drive
W200 = "dbscale.W200"  # a non-dbscale alias writes to a database the cache serves

ALL_IDS = (E200, E201, E202, E203, E204, W200)

ENGINE = "django_dbscale.backends.postgresql"
SUPPORTED_CLIENTS = (
    "django_redis.client.DefaultClient",
    "django_redis.client.default.DefaultClient",
)


def _location(conf: dict[str, Any]) -> tuple[str, str, str]:
    return (str(conf.get("HOST") or ""), str(conf.get("PORT") or ""), str(conf.get("NAME") or ""))


@checks.register()
def check_cache_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Check ``DBSCALE["CACHE"]`` against installed models, ``DATABASES`` and ``CACHES``."""
    from django_dbscale.conf import dbscale_settings

    if not dbscale_settings.cache_declared:
        return []  # the cache is opt-in: nothing to check, nothing of it loaded
    from django_dbscale.cache.dimensions import declared_dimensions, resolve
    from django_dbscale.cache.options import options

    try:
        opts = options()
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), hint="Fix DBSCALE['CACHE'] (docs/cache.md).", id=E200)]
    errors: list[checks.CheckMessage] = []
    if not opts.enabled:
        return errors
    for label in sorted(opts.models):
        try:
            apps.get_model(label)
        except LookupError:
            errors.append(
                checks.Error(
                    f"DBSCALE['CACHE']['MODELS'] names {label!r}, which is not an installed model.",
                    hint="Use 'app_label.ModelName' of a model in INSTALLED_APPS, or remove it.",
                    id=E201,
                )
            )
    for label, names in sorted(opts.dimensions.items()):
        try:
            model = apps.get_model(label)
        except LookupError:
            errors.append(
                checks.Error(
                    f"DBSCALE['CACHE']['DIMENSIONS'] names {label!r}, which is not an "
                    "installed model.",
                    hint="Use 'app_label.ModelName' of a model in INSTALLED_APPS, or remove it.",
                    id=E203,
                )
            )
            continue
        try:
            resolve(model, names, f"DBSCALE['CACHE']['DIMENSIONS'][{label!r}]")
        except ImproperlyConfigured as exc:
            errors.append(checks.Error(str(exc), id=E202))
    for model in apps.get_models():
        declared = declared_dimensions(model)
        if declared is None or model._meta.label_lower in opts.dimensions:
            continue
        names = (declared,) if isinstance(declared, str) else tuple(declared)
        try:
            resolve(model, names, f"{model._meta.label}.cache_dimensions")
        except ImproperlyConfigured as exc:
            errors.append(checks.Error(str(exc), obj=model, id=E202))
    cache_conf = settings.CACHES.get(opts.alias, {})
    client = cache_conf.get("OPTIONS", {}).get("CLIENT_CLASS")
    if client is not None and client not in SUPPORTED_CLIENTS:
        errors.append(
            checks.Error(
                f"CACHES[{opts.alias!r}] uses django-redis client {client!r}; the queryset "
                "cache needs one Redis server it can run Lua scripts on.",
                hint="Drop CLIENT_CLASS (DefaultClient) or point CACHE['ALIAS'] at another alias.",
                id=E204,
            )
        )
    cached_dbs: dict[tuple[str, str, str], str] = {}
    for alias, conf in settings.DATABASES.items():
        if conf.get("ENGINE") == ENGINE:
            cached_dbs.setdefault(_location(conf), alias)  # the first names the database
    for alias, conf in sorted(settings.DATABASES.items()):
        twin = cached_dbs.get(_location(conf))
        if conf.get("ENGINE") != ENGINE and twin is not None:
            errors.append(
                checks.Warning(
                    f"DATABASES[{alias!r}] reaches the same database as {twin!r} without the "
                    f"dbscale ENGINE: writes through {alias!r} do not invalidate queries "
                    f"cached for {twin!r}.",
                    hint=f"Use ENGINE {ENGINE!r} for {alias!r}, or call "
                    "django_dbscale.cache.invalidate_model() after writing through it.",
                    id=W200,
                )
            )
    return errors
