"""Each system check is provoked by the misconfiguration it exists for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from django_dbscale import checks

ROOT = Path(__file__).resolve().parent.parent


def run_checks() -> list[str]:
    return [m.id for m in checks.check_dbscale_settings() if m.id]


def dbscale(**changes: Any) -> dict[str, Any]:
    return {**settings.DBSCALE, **changes}


def test_check_ids_are_unique_and_documented() -> None:
    from django_dbscale.cache import checks as cache_checks
    from django_dbscale.sharding import checks as shard_checks

    all_ids = [*checks.ALL_IDS, *shard_checks.ALL_IDS, *cache_checks.ALL_IDS]
    assert len(set(all_ids)) == len(all_ids)
    doc = (ROOT / "docs" / "checks.md").read_text()
    for check_id in all_ids:
        assert f"`{check_id}`" in doc, f"{check_id} missing from docs/checks.md"


def test_test_settings_pass_every_check() -> None:
    assert run_checks() == []
    call_command("check")


def test_unparseable_setting_is_e000() -> None:
    with override_settings(DBSCALE=dbscale(MAX_REPLICA_LAG="five")):
        messages = checks.check_dbscale_settings()
    assert [m.id for m in messages] == ["dbscale.E000"]
    assert "MAX_REPLICA_LAG" in messages[0].msg


def test_unknown_key_is_e000() -> None:
    with override_settings(DBSCALE=dbscale(MAX_LAG=1)):
        messages = checks.check_dbscale_settings()
    assert [m.id for m in messages] == ["dbscale.E000"]
    assert "MAX_LAG" in messages[0].msg


def test_replica_missing_from_databases_is_e001() -> None:
    replicas = {**settings.DBSCALE["REPLICAS"], "default": ["default_replica", "ghost"]}
    with override_settings(DBSCALE=dbscale(REPLICAS=replicas)):
        messages = checks.check_dbscale_settings()
    assert [m.id for m in messages] == ["dbscale.E001"]
    assert "'ghost'" in messages[0].msg


def test_replicas_of_unknown_primary_is_e002() -> None:
    replicas = {**settings.DBSCALE["REPLICAS"], "nowhere": ["default_replica"]}
    with override_settings(DBSCALE=dbscale(REPLICAS=replicas)):
        ids = run_checks()
    assert "dbscale.E002" in ids
    assert "dbscale.E003" in ids  # default_replica now listed under two primaries


def test_replica_that_is_also_a_primary_is_e003() -> None:
    replicas = {**settings.DBSCALE["REPLICAS"], "default_replica": ["shard0_replica"]}
    with override_settings(DBSCALE=dbscale(REPLICAS=replicas)):
        assert "dbscale.E003" in run_checks()


def test_empty_shard_group_is_e004() -> None:
    groups = {**settings.DBSCALE["SHARD_GROUPS"], "empty": {"SHARDS": []}}
    with override_settings(DBSCALE=dbscale(SHARD_GROUPS=groups)):
        assert "dbscale.E004" in run_checks()


def test_shard_missing_from_databases_is_e005() -> None:
    groups = {"customers": {"SHARDS": ["shard0", "shard1", "shard2", "shard9"]}}
    with override_settings(DBSCALE=dbscale(SHARD_GROUPS=groups)):
        messages = [m for m in checks.check_dbscale_settings() if m.id == "dbscale.E005"]
    assert len(messages) == 1 and "'shard9'" in messages[0].msg


def test_cache_alias_that_is_not_django_redis_is_e008() -> None:
    caches = {
        **settings.CACHES,
        "dbscale": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    }
    with override_settings(CACHES=caches):
        messages = [m for m in checks.check_dbscale_settings() if m.id == "dbscale.E008"]
    assert len(messages) == 1 and "django-redis" in messages[0].msg


def test_same_database_naming_an_unknown_alias_is_e009() -> None:
    with override_settings(DBSCALE=dbscale(SAME_DATABASE={"nope": "default"})):
        messages = [m for m in checks.check_dbscale_settings() if m.id == "dbscale.E009"]
    assert len(messages) == 1 and "'nope'" in messages[0].msg


def test_cache_alias_missing_is_e006() -> None:
    with override_settings(DBSCALE=dbscale(CACHE={"ALIAS": "nope"})):
        messages = [m for m in checks.check_dbscale_settings() if m.id == "dbscale.E006"]
    assert len(messages) == 1 and "'nope'" in messages[0].msg


@pytest.mark.parametrize(
    "routers",
    [
        ["django_dbscale.routers.ShardRouter"],
        ["django_dbscale.routers.ReplicaRouter"],
        ["django_dbscale.routers.ReplicaRouter", "django_dbscale.routers.ShardRouter"],
    ],
)
def test_missing_or_misordered_routers_are_e007(routers: list[str]) -> None:
    with override_settings(DATABASE_ROUTERS=routers):
        assert "dbscale.E007" in run_checks()


def test_router_after_replica_router_is_w002() -> None:
    routers = [*settings.DATABASE_ROUTERS, "tests.routers.NeverConsulted"]
    with override_settings(DATABASE_ROUTERS=routers):
        assert run_checks() == ["dbscale.W002"]


def test_missing_consistency_middleware_is_w003() -> None:
    with override_settings(MIDDLEWARE=[]):
        messages = checks.check_dbscale_settings()
    assert [m.id for m in messages] == ["dbscale.W003"]
    assert "ConsistencyMiddleware" in messages[0].msg


def test_zero_probe_timeout_or_token_age_is_e000() -> None:
    for key, value in [
        ("REPLICA_PROBE_TIMEOUT", 0),
        ("REPLICA_CHECK_INTERVAL", 0),
        ("CONSISTENCY_MAX_AGE", 0.5),
        ("REPLICA_QUARANTINE", (True, 5)),
        ("CONSISTENCY_COOKIE", "bad name;"),
    ]:
        with override_settings(DBSCALE=dbscale(**{key: value})):
            messages = checks.check_dbscale_settings()
        assert [m.id for m in messages] == ["dbscale.E000"], key
        assert key in messages[0].msg


def test_foreign_engine_on_managed_alias_is_w001() -> None:
    databases = {**settings.DATABASES}
    databases["default_replica"] = {
        **databases["default_replica"],
        "ENGINE": "django.db.backends.postgresql",
    }
    with (
        pytest.warns(UserWarning, match="Overriding setting DATABASES"),
        override_settings(DATABASES=databases),
    ):
        messages = checks.check_dbscale_settings()
    assert [m.id for m in messages] == ["dbscale.W001"]
    assert "'default_replica'" in messages[0].msg


def test_call_command_check_fails_on_bad_config() -> None:
    with (
        override_settings(DATABASE_ROUTERS=[]),
        pytest.raises(SystemCheckError, match="dbscale.E007"),
    ):
        call_command("check")


def test_manage_py_check_exits_nonzero_and_prints_ids(services: Any) -> None:
    """``manage.py check`` in a real subprocess, with a broken DBSCALE."""
    env = {**os.environ, **services.env(), "DJANGO_SETTINGS_MODULE": "tests.settings_broken"}
    result = subprocess.run(
        [sys.executable, "-m", "django", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "dbscale.E001" in result.stderr
    assert "dbscale.E004" in result.stderr
    assert "dbscale.E007" in result.stderr
