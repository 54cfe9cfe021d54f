"""System checks and the ``manage.py dbscale cache`` subcommand."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError, SystemCheckError
from django.test import override_settings

from django_dbscale.cache import checks as cache_checks
from tests.test_cache_support import (
    cache_env,
    cache_keys,
    fresh_context,
    observe,
)
from tests.testapp.models_cache import CBook


def with_cache(**change: Any) -> Any:
    return override_settings(
        DBSCALE={**settings.DBSCALE, "CACHE": {**settings.DBSCALE["CACHE"], **change}}
    )


def test_check_ids_are_unique_and_in_the_cache_range() -> None:
    ids = cache_checks.ALL_IDS
    assert len(set(ids)) == len(ids)
    for check_id in ids:
        match = re.fullmatch(r"dbscale\.([EW])(\d{3})", check_id)
        assert match is not None
        number = int(match.group(2))
        assert (200 <= number <= 249) if match.group(1) == "E" else number >= 200


def test_the_test_settings_pass_the_cache_checks() -> None:
    messages = cache_checks.check_cache_settings()
    # The suite's plain-backend twin of "default" (for routing baselines) is the one warning.
    assert {m.id for m in messages} <= {"dbscale.W200"}
    assert all(m.level < 40 for m in messages)


@pytest.mark.parametrize(
    ("change", "check_id", "text"),
    [
        ({"TIMEOUT": -1}, "dbscale.E200", "TIMEOUT"),
        ({"MODELS": ["testapp.Nope"]}, "dbscale.E201", "testapp.nope"),
        ({"DIMENSIONS": {"testapp.CBook": ["tags"]}}, "dbscale.E202", "not a concrete column"),
        ({"DIMENSIONS": {"testapp.Gone": ["x"]}}, "dbscale.E203", "testapp.gone"),
    ],
)
def test_manage_py_check_fails_on_a_bad_cache_setting(
    change: dict[str, Any], check_id: str, text: str
) -> None:
    with with_cache(**change), pytest.raises(SystemCheckError) as info:
        call_command("check")
    assert check_id in str(info.value) and text in str(info.value)


def test_a_client_the_cache_cannot_drive_is_e204() -> None:
    caches = {**settings.CACHES}
    caches["dbscale"] = {
        **caches["dbscale"],
        "OPTIONS": {"CLIENT_CLASS": "django_redis.client.ShardClient"},
    }
    with override_settings(CACHES=caches):
        ids = [m.id for m in cache_checks.check_cache_settings() if m.id != "dbscale.W200"]
    assert ids == ["dbscale.E204"]


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES:UserWarning")
def test_a_plain_alias_writing_to_a_cached_database_is_w200() -> None:
    twin = {**settings.DATABASES["default"], "ENGINE": "django.db.backends.postgresql"}
    other = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}
    plain = {k: v for k, v in settings.DATABASES.items() if k == "default" or "plain" not in k}
    with override_settings(DATABASES={**plain, "twin": twin, "other": other}):
        messages = cache_checks.check_cache_settings()
    assert [(m.id, "'twin'" in m.msg, "'default'" in m.msg) for m in messages] == [
        ("dbscale.W200", True, True)
    ]


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.usefixtures(cache_env.__name__)
def test_the_cache_subcommand_shows_counters_invalidates_and_clears() -> None:
    CBook.objects.create(title="x")
    for _ in range(3):
        with fresh_context():
            assert CBook.objects.cache().count() == 1
    out = io.StringIO()
    call_command("dbscale", "cache", "--json", stdout=out)
    counters = json.loads(out.getvalue())["counters"]
    assert counters["testapp.CBook"]["hit"] == 2 and counters["testapp.CBook"]["store"] == 1
    out = io.StringIO()
    call_command("dbscale", "cache", stdout=out)
    assert re.search(r"testapp\.CBook\s+2\s+1\s+1", out.getvalue()), out.getvalue()
    call_command("dbscale", "cache", "invalidate", "testapp.CBook", stdout=io.StringIO())
    with fresh_context(), observe() as seen:
        assert CBook.objects.cache().count() == 1
    assert seen.reasons == ["miss"]
    with pytest.raises(CommandError, match="not an installed model"):
        call_command("dbscale", "cache", "invalidate", "testapp.Nope")
    out = io.StringIO()
    call_command("dbscale", "cache", "clear", stdout=out)
    assert "deleted" in out.getvalue() and cache_keys() == []
