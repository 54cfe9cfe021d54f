"""Django app configuration: registers system checks and write hooks at start-up."""

from __future__ import annotations

from django.apps import AppConfig


class DBScaleConfig(AppConfig):
    name = "django_dbscale"
    verbose_name = "dbscale"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported for their side effects: @register of system checks.
        from django_dbscale import checks  # noqa: F401
