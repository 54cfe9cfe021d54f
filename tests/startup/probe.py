"""Start a project from its settings and exercise its pillar; print a JSON report.

Run as ``python -m tests.startup.probe`` with ``DJANGO_SETTINGS_MODULE`` set to one of the
``settings_*`` modules and the suite's ``Services.env()`` in the environment.
"""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any

import django


def _loaded(prefixes: tuple[str, ...]) -> list[str]:
    return sorted(name for name in sys.modules if name.startswith(prefixes))


def main() -> dict[str, Any]:
    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    from django_dbscale import consistency, replicas

    report: dict[str, Any] = {}
    try:
        call_command("check")
        report["check"] = "ok"
    except SystemCheckError as exc:
        report["check"] = str(exc)
    primaries = [a for a in settings.DATABASES if a not in ("default_replica",)]
    report["migrate"] = {}
    for alias in primaries:
        try:
            call_command("migrate", database=alias, run_syncdb=True, verbosity=0, skip_checks=True)
            report["migrate"][alias] = "ok"
        except Exception as exc:  # the report says what broke
            report["migrate"][alias] = f"{type(exc).__name__}: {exc}"
    name = f"probe-{uuid.uuid4().hex[:8]}"
    scenario = settings.SETTINGS_MODULE.rsplit("_", 1)[-1]
    report["scenario"] = scenario
    if scenario in ("replicas", "halfcache", "cache"):
        from django.contrib.auth.models import Group

        with consistency.consistency_context():
            try:
                group = Group.objects.create(name=name)
                report["write"] = "ok"
                found = Group.objects.filter(pk=group.pk).values_list("name", flat=True)
                report["read_own_write"] = list(found)
            except Exception as exc:
                report["write"] = f"{type(exc).__name__}: {exc}"
        report["routes"] = {f"{a} {r}": n for (a, r), n in replicas.route_counts.items()}
        report["has_cache_method"] = hasattr(Group.objects, "cache")
    if scenario == "cache":
        from django.contrib.auth.models import Group

        from django_dbscale.cache import cache_read, wait_until_verified

        report["verified"] = wait_until_verified()
        reasons: list[str] = []

        def seen(sender: Any, reason: str, **kwargs: Any) -> None:
            reasons.append(reason)

        cache_read.connect(seen, weak=False)
        first = list(Group.objects.filter(name=name).values_list("name", flat=True))
        second = list(Group.objects.filter(name=name).values_list("name", flat=True))
        Group.objects.filter(name=name).update(name=name + "-renamed")
        third = list(Group.objects.filter(name=name + "-renamed").values_list("name", flat=True))
        gone = list(Group.objects.filter(name=name).values_list("name", flat=True))
        report["cached_reads"] = [first, second, third, gone]
        report["cache_reasons"] = reasons
    if scenario == "shards":
        from tests.startup.shardapp.models import StartupAccount

        placed = {}
        for key in range(1, 7):
            StartupAccount.objects.create(id=key, name=f"{name}-{key}")
            account = StartupAccount.objects.get(id=key)
            placed[str(key)] = [account.name, account._state.db]
        report["accounts"] = placed
    report["modules"] = _loaded(("redis", "django_redis", "django_dbscale.cache"))
    return report


if __name__ == "__main__":
    result = main()
    print("REPORT " + json.dumps(result, sort_keys=True))
