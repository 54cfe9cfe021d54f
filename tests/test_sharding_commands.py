"""``manage.py dbscale shards|migrate|drift`` and the ring stamp kept on every shard."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.core import checks
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections
from django.test import override_settings

from django_dbscale.sharding import RingChangeRefused, get_ring, shard_for_key
from django_dbscale.sharding.ids import install_shard_functions, read_stamp
from django_dbscale.testing.harness import Services
from tests.testapp.models import ShardCustomer

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

SHARDS = ("shard0", "shard1", "shard2")
GROUP_8 = {"customers": {"SHARDS": list(SHARDS)}}


def sql(services: Services, alias: str, query: str, params: Any = ()) -> list[Any]:
    return services.alias_server(alias).execute(query, params, dbname=services.alias_dbname(alias))


def dbscale(*args: str) -> str:
    out = io.StringIO()
    call_command("dbscale", *args, stdout=out, stderr=out)
    return out.getvalue()


def dbscale_fails(*args: str) -> tuple[str, str]:
    out = io.StringIO()
    with pytest.raises(CommandError) as caught:
        call_command("dbscale", *args, stdout=out, stderr=out)
    return out.getvalue(), str(caught.value)


@pytest.fixture
def restamp() -> Iterator[None]:
    """Put every shard's stamp back to the configured ring after the test."""
    yield
    for shard in SHARDS:
        install_shard_functions(shard, force=True)


def test_shards_prints_group_fingerprint_nodes_weights_and_keys(no_shard_map: None) -> None:
    out = dbscale("shards", "--key", "42", "--key", "alice", "--verify")
    ring = get_ring("customers")
    assert (
        f"group customers: ring {ring.fingerprint} (hashring-ketama-md5, vnodes=8, 3 shards)" in out
    )
    for number, shard in enumerate(SHARDS):
        line = next(line for line in out.splitlines() if f" {shard} " in line)
        assert f"#{number}" in line and "weight=1" in line and "points=960" in line
        assert f"replicas={shard}_replica" in line
        assert f"stamp: ok (stamped {ring.fingerprint}, shard number {number})" in line
    assert f"key '42' -> {shard_for_key('customers', 42)}" in out
    assert f"key 'alice' -> {shard_for_key('customers', 'alice')}" in out
    data = json.loads(dbscale("shards", "--json"))
    assert [n["alias"] for n in data[0]["nodes"]] == list(SHARDS)
    assert abs(sum(n["share"] for n in data[0]["nodes"]) - 1) < 0.001
    weighted = {"customers": {"SHARDS": {"shard0": 1, "shard1": 3, "shard2": 1}}}
    with override_settings(DBSCALE={"SHARD_GROUPS": weighted}):
        out = dbscale("shards")
    assert "weight=3" in out and get_ring("customers").fingerprint not in out
    assert "Unknown shard group(s) ['nope']" in dbscale_fails("shards", "--group", "nope")[1]


def test_migrate_reports_every_primary_database(services: Services) -> None:
    out = dbscale("migrate", "--run-syncdb")
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert set(lines) == {"default", *SHARDS}
    assert all(" ok " in line and "up to date" in line for line in lines.values())
    assert all(" shard " in lines[s] for s in SHARDS) and " db " in lines["default"]
    assert "not primary aliases" in dbscale_fails("migrate", "--database", "shard0_replica")[1]


def test_migrate_repairs_a_shard_and_drift_reports_it_first(services: Services) -> None:
    assert "DRIFT" not in dbscale("drift")
    sql(services, "shard1", "DROP TABLE testapp_shardorderline")
    sql(services, "shard2", "ALTER TABLE testapp_shardcustomer ADD COLUMN extra integer")
    sql(
        services,
        "shard0",
        "INSERT INTO django_migrations (app, name, applied)"
        " VALUES ('testapp', '9999_ghost', now())",
    )
    try:
        out, error = dbscale_fails("drift")
        assert (
            "Drift found on ['customers/shard0', 'customers/shard1', 'customers/shard2', "
            "'ledgers/shard0']" in error
        )
        report = {line.split(":")[0]: line for line in out.splitlines() if not line.startswith(" ")}
        assert "DRIFT" in report["customers/shard1"]
        assert "    missing: column testapp_shardorderline.sku character varying NOT NULL" in out
        assert "    extra: column testapp_shardcustomer.extra integer NULL" in out
        assert "    extra migration: testapp.9999_ghost" in out
        migrated = dbscale("migrate", "--run-syncdb", "--database", "shard1")
        assert migrated.split()[:3] == ["shard1", "shard", "ok"]
        assert sql(
            services, "shard1", "SELECT to_regclass('testapp_shardorderline') IS NOT NULL"
        ) == [(True,)]
    finally:
        sql(services, "shard2", "ALTER TABLE testapp_shardcustomer DROP COLUMN IF EXISTS extra")
        sql(services, "shard0", "DELETE FROM django_migrations WHERE name = '9999_ghost'")
        call_command("migrate", database="shard1", run_syncdb=True, verbosity=0)
    assert "DRIFT" not in dbscale("drift")
    data = json.loads(dbscale("drift", "--json"))
    assert len({r["schema_digest"] for r in data if r["group"] == "customers"}) == 1


def test_changing_vnodes_of_a_populated_shard_is_refused(services: Services, restamp: None) -> None:
    key = next(k for k in range(1, 100) if shard_for_key("customers", k) == "shard1")
    ShardCustomer.objects.create(id=key, name="c")
    changed = {
        **_base_dbscale()["SHARD_GROUPS"],
        "customers": {"SHARDS": list(SHARDS), "VNODES": 16},
    }
    with override_settings(DBSCALE={**_base_dbscale(), "SHARD_GROUPS": changed}):
        with pytest.raises(RingChangeRefused, match="VNODES=8, now 16"):
            install_shard_functions("shard1")
        # The empty shards may be re-stamped freely.
        assert install_shard_functions("shard0") is not None
        messages = checks.run_checks(databases=["shard1"], tags=[checks.Tags.database])
        assert [m.id for m in messages if m.id and m.id.startswith("dbscale.E1")] == [
            "dbscale.E110"
        ]
        out, error = dbscale_fails("migrate", "--database", "shard1")
        assert "shard1  shard  FAILED" in out and "RingChangeRefused" in out
        assert "REFUSED" in dbscale("shards", "--verify")
    stamp = read_stamp(connections["shard1"])
    assert stamp is not None and stamp.vnodes == 8


def test_reordering_populated_shards_is_refused(services: Services, restamp: None) -> None:
    key = next(k for k in range(1, 100) if shard_for_key("customers", k) == "shard2")
    ShardCustomer.objects.create(id=key, name="c")
    reordered = {"customers": ["shard2", "shard0", "shard1"]}
    refused = pytest.raises(RingChangeRefused, match="shard number 2 in its IDs, now at position 0")
    with override_settings(DBSCALE={**_base_dbscale(), "SHARD_GROUPS": reordered}), refused:
        install_shard_functions("shard2")
    assert sql(services, "shard2", "SELECT dbscale_shard_number()") == [(2,)]


def test_a_changed_ring_on_a_populated_shard_warns_until_restamped(
    services: Services, restamp: None, no_shard_map: None
) -> None:
    key = next(k for k in range(1, 100) if shard_for_key("customers", k) == "shard0")
    ShardCustomer.objects.create(id=key, name="c")
    weighted = {"customers": {"SHARDS": {"shard0": 2, "shard1": 1, "shard2": 1}}}
    with override_settings(DBSCALE={**_base_dbscale(), "SHARD_GROUPS": weighted}):
        stamp = install_shard_functions("shard0")  # not re-stamped: rows may be misplaced
        assert stamp is not None and stamp.fingerprint != get_ring("customers").fingerprint
        messages = checks.run_checks(databases=["shard0"], tags=[checks.Tags.database])
        assert "dbscale.W100" in [m.id for m in messages]
        assert "populated" in dbscale("shards", "--verify")
        assert "stamped shard0: group customers, ring " + get_ring("customers").fingerprint in (
            dbscale("shards", "--stamp")
        )
        messages = checks.run_checks(databases=["shard0"], tags=[checks.Tags.database])
        assert "dbscale.W100" not in [m.id for m in messages]


def _base_dbscale() -> dict[str, Any]:
    from django.conf import settings

    return dict(settings.DBSCALE)


def test_routing_refuses_shards_populated_under_another_ring(
    services: Services, restamp: None, no_shard_map: None
) -> None:
    keys = [next(k for k in range(1, 200) if shard_for_key("customers", k) == s) for s in SHARDS]
    ShardCustomer.objects.bulk_create([ShardCustomer(id=k, name="c") for k in keys])
    rings = {
        "VNODES=8, now 16": {"customers": {"SHARDS": list(SHARDS), "VNODES": 16}},
        "weights changed": {"customers": {"SHARDS": {"shard0": 2, "shard1": 1, "shard2": 1}}},
    }
    for match, groups in rings.items():
        with override_settings(DBSCALE={**_base_dbscale(), "SHARD_GROUPS": groups}):
            for key in keys:
                with pytest.raises(RingChangeRefused, match=match):
                    ShardCustomer.objects.filter(id=key).exists()
            with pytest.raises(RingChangeRefused):
                ShardCustomer.objects.create(id=1000, name="new")
            # Fan-out and explicit aliases do not depend on the mapping: they still work,
            # e.g. to move the rows.
            assert ShardCustomer.objects.all_shards().count() == len(keys)
            assert ShardCustomer.objects.using("shard0").filter(name="c").count() == 1
    assert ShardCustomer.objects.filter(id=keys[0]).exists()
    assert sql(services, "shard0", "SELECT count(*) FROM testapp_shardcustomer") == [(1,)]


def test_a_shard_populated_for_another_group_is_refused(services: Services, restamp: None) -> None:
    key = next(k for k in range(1, 100) if shard_for_key("customers", k) == "shard1")
    ShardCustomer.objects.create(id=key, name="c")
    renamed = {"clients": list(SHARDS)}
    with override_settings(DBSCALE={**_base_dbscale(), "SHARD_GROUPS": renamed}):
        with pytest.raises(RingChangeRefused, match="holds rows of group 'customers'"):
            install_shard_functions("shard1")
        assert install_shard_functions("shard0") is not None  # empty: re-stamped freely
    stamp = read_stamp(connections["shard1"])
    assert stamp is not None and stamp.group == "customers"
