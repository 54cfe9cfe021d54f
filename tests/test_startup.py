"""Each pillar alone, in a project started the way a real one starts.

Every test runs ``tests/startup/probe.py`` in a subprocess with one of the README's minimal
settings blocks (``tests/startup/settings_*.py``): ``django.setup()``, ``manage.py check``,
``migrate``, then the pillar's reads and writes. What reached the databases is checked
here with direct SQL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from django_dbscale.sharding import shard_for_key
from django_dbscale.testing.harness import Services

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

#: Modules a project that does not use the cache must never load.
CACHE_MACHINERY = ("redis", "django_redis", "django_dbscale.cache.engine")


def probe(services: Services, settings_module: str) -> dict[str, Any]:
    env = {
        **os.environ,
        **services.env(),
        "DJANGO_SETTINGS_MODULE": f"tests.startup.{settings_module}",
    }
    result = subprocess.run(
        [sys.executable, "-m", "tests.startup.probe"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(lines[-1].removeprefix("REPORT "))
    report["stderr"] = result.stderr
    return report


def group_names(services: Services, prefix: str) -> list[str]:
    rows = services.pg1.execute(
        "SELECT name FROM auth_group WHERE name LIKE %s ORDER BY name",
        (prefix + "%",),
        dbname=services.alias_dbname("default"),
    )
    return [str(row[0]) for row in rows]


def test_a_replica_only_project_migrates_and_writes_without_redis(services: Services) -> None:
    report = probe(services, "settings_replicas")
    assert report["check"] == "ok"
    assert report["migrate"] == {"default": "ok"}
    assert report["write"] == "ok"
    (name,) = report["read_own_write"]
    assert group_names(services, name) == [name]  # on the primary, by direct SQL
    # One routed read: a replica that has replayed the write, or the primary.
    assert sum(report["routes"].values()) == 1
    assert set(report["routes"]) <= {"default_replica replica", "default read_your_writes"}
    assert not [m for m in report["modules"] if m.startswith(CACHE_MACHINERY)]
    assert report["has_cache_method"] is False


def test_a_shard_only_project_places_each_key_on_its_ring_shard(services: Services) -> None:
    report = probe(services, "settings_shards")
    assert report["check"] == "ok"
    assert report["migrate"] == dict.fromkeys(["default", "shard0", "shard1", "shard2"], "ok")
    assert not [m for m in report["modules"] if m.startswith(CACHE_MACHINERY)]
    for key, (name, alias) in report["accounts"].items():
        assert alias == shard_for_key("customers", int(key))
        for shard in ("shard0", "shard1", "shard2"):
            rows = services.alias_server(shard).execute(
                "SELECT name FROM shardapp_startupaccount WHERE id = %s",
                (int(key),),
                dbname=services.alias_dbname(shard),
            )
            assert rows == ([(name,)] if shard == alias else [])


def test_cache_models_setting_gives_a_third_party_model_the_cache_at_startup(
    services: Services,
) -> None:
    report = probe(services, "settings_cache")
    assert report["check"] == "ok"
    assert report["has_cache_method"] is True  # auth.Group from CACHE["MODELS"]
    assert report["verified"] is True
    (name,) = report["read_own_write"]
    renamed = name + "-renamed"
    assert report["cached_reads"] == [[name], [name], [renamed], []]
    assert report["cache_reasons"] == ["miss", "hit", "miss", "miss"]
    assert group_names(services, name) == [renamed]


def test_a_half_configured_cache_is_a_check_error_and_never_breaks_a_write(
    services: Services,
) -> None:
    report = probe(services, "settings_halfcache")
    assert "dbscale.E006" in report["check"]
    assert "CACHES['dbscale']" in report["check"]
    assert report["migrate"] == {"default": "ok"}  # migrate --skip-checks: nothing crashes
    assert report["write"] == "ok"
    (name,) = report["read_own_write"]
    assert group_names(services, name) == [name]
    assert "the queryset cache is off in this process" in report["stderr"]
