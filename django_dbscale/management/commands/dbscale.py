"""``manage.py dbscale <subcommand>``: status, shards, migrate, drift, cache."""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from django_dbscale.management.subcommands import SUBCOMMANDS


def _load(name: str) -> ModuleType:
    return importlib.import_module(SUBCOMMANDS[name])


class Command(BaseCommand):
    help = "Inspect and operate django_dbscale: replicas, shards, migrations, cache."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", required=True, metavar="subcommand")
        for name in SUBCOMMANDS:
            try:
                module = _load(name)
            except ModuleNotFoundError:
                continue
            subparser = sub.add_parser(
                name, help=module.HELP, formatter_class=argparse.RawDescriptionHelpFormatter
            )
            module.add_arguments(subparser)

    def handle(self, *args: Any, **options: Any) -> None:
        _load(options.pop("subcommand")).handle(self, **options)
