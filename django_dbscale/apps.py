"""Django app configuration: registers system checks and starts the configured pillars."""

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
        from django_dbscale.conf import dbscale_settings

        connection_created.connect(track_writes, dispatch_uid="dbscale_track_writes")
        # Each pillar alone: without DBSCALE["CACHE"] no cache code is imported or run.
        if dbscale_settings.cache_declared:
            from django_dbscale.cache import hooks

            hooks.connect()
