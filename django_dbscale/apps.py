"""Django app configuration: registers system checks and write hooks at start-up."""

from __future__ import annotations

from django.apps import AppConfig


class DBScaleConfig(AppConfig):
    name = "django_dbscale"
    verbose_name = "dbscale"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.backends.signals import connection_created

        # Imported for their side effects: @register of system checks.
        from django_dbscale import checks  # noqa: F401
        from django_dbscale.backends.other import track_writes

        connection_created.connect(track_writes, dispatch_uid="dbscale_track_writes")
        from django_dbscale.cache import install as install_cache

        install_cache()  # CACHE["MODELS"]: give those models' managers the cache mixin
