"""Aliases of one database share its cache versions, whichever alias writes or reads."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from django_dbscale.conf import dbscale_settings
from django_dbscale.testing.harness import Services
from tests.test_cache_support import cache_env, fresh_context, observe
from tests.testapp.models_cache import CCounter

pytestmark = [pytest.mark.django_db(transaction=True, databases="__all__")]


def on_primary(services: Services, pk: int) -> int:
    rows = services.pg1.execute(
        "SELECT value FROM testapp_ccounter WHERE id = %s", (pk,), dbname="dbscale"
    )
    return int(rows[0][0])


@pytest.mark.usefixtures(cache_env.__name__)
@pytest.mark.parametrize(
    ("reader", "writer"),
    [("default", "default_twin"), ("default_twin", "default"), ("default_plain", "default")],
)
def test_a_write_through_one_alias_invalidates_reads_cached_through_another(
    services: Services, reader: str, writer: str
) -> None:
    row = CCounter.objects.create(name="c", value=10)
    with fresh_context():
        assert CCounter.objects.using(reader).cache().get(pk=row.pk).value == 10
    with fresh_context(), observe() as seen:
        assert CCounter.objects.using(reader).cache().get(pk=row.pk).value == 10
    assert seen.reasons == ["hit"]
    CCounter.objects.using(writer).filter(pk=row.pk).update(value=99)
    assert on_primary(services, row.pk) == 99
    with fresh_context(), observe() as seen:
        assert CCounter.objects.using(reader).cache().get(pk=row.pk).value == 99
    assert seen.reasons == ["miss"]


def test_aliases_name_their_database_by_location_replica_and_declaration() -> None:
    names = dbscale_settings.database_of
    assert names["default_twin"] == "default"  # same HOST, PORT and NAME
    assert names["default_plain"] == "default"
    assert names["default_replica"] == "default"  # a replica names its primary
    assert names["shard0"] == "shard0" and names["shard1"] == "shard1"
    with override_settings(DBSCALE={"SAME_DATABASE": {"default_replica_direct": "shard2"}}):
        assert dbscale_settings.database_of["default_replica_direct"] == "shard2"


@pytest.mark.parametrize(
    "value",
    [["default"], {"a": 1}, {"a": "a"}, {"a": "b", "b": "c"}],
)
def test_same_database_must_map_an_alias_to_another_unmapped_alias(value: object) -> None:
    with (
        override_settings(DBSCALE={"SAME_DATABASE": value}),
        pytest.raises(ImproperlyConfigured, match=r"DBSCALE\['SAME_DATABASE'\]"),
    ):
        dbscale_settings.same_database  # noqa: B018
