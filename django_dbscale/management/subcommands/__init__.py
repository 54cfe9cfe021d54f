"""Subcommands of ``manage.py dbscale``: one module per subcommand.

Each module defines ``HELP: str``, ``add_arguments(parser) -> None`` and
``handle(command: BaseCommand, **options) -> None``; :data:`SUBCOMMANDS` lists them.
"""

from __future__ import annotations

SUBCOMMANDS: dict[str, str] = {
    "status": "django_dbscale.management.subcommands.status",
    "shards": "django_dbscale.management.subcommands.shards",
    "migrate": "django_dbscale.management.subcommands.migrate",
    "drift": "django_dbscale.management.subcommands.drift",
    "cache": "django_dbscale.management.subcommands.cache",
    "reshard": "django_dbscale.management.subcommands.reshard",
    "advise": "django_dbscale.management.subcommands.advise",
}
