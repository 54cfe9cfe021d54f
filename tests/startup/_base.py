"""What every startup project shares: the suite's servers, attached as external ones."""

from __future__ import annotations

from typing import Any

from django_dbscale.testing.harness import get_services

_services = get_services()
SERVERS: dict[str, dict[str, Any]] = _services.databases()
REDIS_URL = _services.redis_url(0)

SECRET_KEY = "startup-tests-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "django_dbscale"]
MIDDLEWARE = ["django_dbscale.middleware.ConsistencyMiddleware"]
CACHES: dict[str, dict[str, Any]] = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
}
