"""The public API is small, documented on one page, and every name resolves."""

from __future__ import annotations

import re
from pathlib import Path

import django_dbscale

API_PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def documented_top_level_names() -> set[str]:
    text = API_PAGE.read_text()
    section = text.split("## `django_dbscale`", 1)[1].split("## Operator tools", 1)[0]
    names: set[str] = set()
    for row in re.findall(r"^\| (`[^|]+`) \|", section, flags=re.MULTILINE):
        names.update(re.findall(r"`([A-Za-z_]+)`", row))
    return names


def test_all_lists_exactly_the_names_the_api_page_documents() -> None:
    assert set(django_dbscale.__all__) == documented_top_level_names()
    assert len(django_dbscale.__all__) == len(set(django_dbscale.__all__))


def test_every_public_name_resolves() -> None:
    for name in django_dbscale.__all__:
        assert getattr(django_dbscale, name) is not None, name


def test_an_operator_tool_is_not_top_level_and_the_error_says_where_it_lives() -> None:
    try:
        django_dbscale.get_ring  # noqa: B018
    except AttributeError as exc:
        assert "django_dbscale.sharding" in str(exc)
    else:
        raise AssertionError("get_ring is an operator tool: django_dbscale.sharding")
    from django_dbscale.sharding import get_ring

    assert callable(get_ring)
