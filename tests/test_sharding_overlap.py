"""Several shard groups on the same databases: ``customers`` and ``tenants`` share servers.

Test settings: ``customers`` on shard0, shard1, shard2 and ``tenants`` on shard2, shard1 (so
shard2 is number 2 of customers and number 0 of tenants). Each group's tables live on its
own shards only, each database numbers IDs and keeps its ring stamp per group, and
``migrate`` (even with ``--skip-checks``) refuses an invalid configuration before it
creates any table.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections, models
from django.test import override_settings
from django.test.utils import isolate_apps

from django_dbscale.conf import dbscale_settings
from django_dbscale.sharding import (
    RingChangeRefused,
    decode_id,
    get_ring,
    shard_for_key,
    shard_of_id,
)
from django_dbscale.sharding.checks import check_sharded_models, migrate_blockers
from django_dbscale.sharding.ids import (
    ShardedIDField,
    install_shard_functions,
    read_stamp,
    read_stamps,
    shard_number,
    verify_ring_once,
)
from django_dbscale.sharding.models import ShardedModel
from django_dbscale.sharding.routing import allow_migrate
from django_dbscale.testing.harness import Services
from tests.testapp.models import ShardCustomer, ShardOrder, TenantDocument, TenantEvent

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

ROOT = Path(__file__).resolve().parent.parent
SHARDS = ("shard0", "shard1", "shard2")
TENANT_SHARDS = ("shard2", "shard1")
TENANT_TABLES = ("testapp_tenantdocument", "testapp_tenantevent")
CUSTOMER_TABLES = ("testapp_shardcustomer", "testapp_shardorder", "testapp_shardorder_tags")


def sql(services: Services, alias: str, query: str, params: Any = ()) -> list[Any]:
    return services.alias_server(alias).execute(query, params, dbname=services.alias_dbname(alias))


def has_table(services: Services, alias: str, table: str) -> bool:
    return bool(sql(services, alias, "SELECT to_regclass(%s) IS NOT NULL", (table,))[0][0])


def key_on(group: str, shard: str) -> int:
    return next(k for k in range(1, 1000) if shard_for_key(group, k) == shard)


def io_call(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=out)
    return out.getvalue()


def base_dbscale(**changes: Any) -> dict[str, Any]:
    return {**settings.DBSCALE, **changes}


@pytest.fixture
def restamp() -> Iterator[None]:
    """Put every shard's stamps back to the configured rings after the test."""
    yield
    for shard in SHARDS:
        install_shard_functions(shard, force=True)
        connections[shard].close()


# -- placement of tables ---------------------------------------------------------------------


def test_each_group_has_its_tables_on_its_own_shards_only(services: Services) -> None:
    groups_of_shard = dbscale_settings.groups_of_shard
    assert {alias: groups_of_shard[alias] for alias in SHARDS} == {
        "shard0": ("customers", "ledgers"),
        "shard1": ("customers", "tenants", "ledgers"),
        "shard2": ("customers", "tenants", "ledgers"),
    }
    assert "default" not in groups_of_shard
    for alias in ("default", *SHARDS):
        for table in TENANT_TABLES:
            assert has_table(services, alias, table) is (alias in TENANT_SHARDS), (alias, table)
        for table in CUSTOMER_TABLES:
            assert has_table(services, alias, table) is (alias in SHARDS), (alias, table)
    for alias in SHARDS:
        assert allow_migrate(alias, "testapp", "tenantdocument", None) is (alias in TENANT_SHARDS)
        assert allow_migrate(alias, "testapp", "shardorder", None) is True
    assert allow_migrate("default", "testapp", "tenantdocument", None) is False
    assert allow_migrate("shard1_replica", "testapp", "tenantdocument", None) is False


def test_each_table_names_its_group_in_the_id_default(services: Services) -> None:
    query = (
        "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d JOIN pg_attribute a "
        "ON a.attrelid = d.adrelid AND a.attnum = d.adnum "
        "WHERE d.adrelid = to_regclass(%s) AND a.attname = 'id'"
    )
    for alias in TENANT_SHARDS:
        assert sql(services, alias, query, ("testapp_tenantdocument",)) == [
            ("dbscale_next_id(12, 10, 'tenants'::text)",)
        ]
        assert sql(services, alias, query, ("testapp_tenantevent",)) == [
            ("dbscale_next_id(5, 7, 'tenants'::text)",)
        ]
    for alias in SHARDS:
        assert sql(services, alias, query, ("testapp_shardorder",)) == [
            ("dbscale_next_id(12, 10, 'customers'::text)",)
        ]


# -- IDs and stamps per (database, group) ------------------------------------------------------


def test_ids_made_on_a_shared_shard_carry_its_number_in_each_group(services: Services) -> None:
    tenant = key_on("tenants", "shard2")
    customer = key_on("customers", "shard2")
    doc = TenantDocument.objects.create(tenant_id=tenant, title="t-doc")
    event = TenantEvent.objects.create(tenant_id=key_on("tenants", "shard1"), kind="login")
    ShardCustomer.objects.create(id=customer, name="c")
    order = ShardOrder.objects.create(customer_id=customer)
    assert doc._state.db == "shard2" and order._state.db == "shard2"
    assert shard_number("shard2", "tenants") == 0 and shard_number("shard2", "customers") == 2
    assert decode_id(doc.pk).shard_number == 0
    assert shard_of_id("tenants", doc.pk) == "shard2"
    assert decode_id(order.pk).shard_number == 2
    assert shard_of_id("customers", order.pk) == "shard2"
    assert decode_id(event.pk, js_safe=True).shard_number == 1
    assert shard_of_id("tenants", event.pk, js_safe=True) == "shard1"
    # The rows, by direct SQL, on the database each came from and nowhere else.
    docs = "SELECT id, tenant_id, title FROM testapp_tenantdocument"
    assert sql(services, "shard2", docs) == [(doc.pk, tenant, "t-doc")]
    assert sql(services, "shard1", docs) == []
    events = "SELECT id, tenant_id, kind FROM testapp_tenantevent"
    assert sql(services, "shard1", events) == [(event.pk, event.tenant_id, "login")]
    assert sql(services, "shard2", events) == []
    orders = "SELECT id, customer_id FROM testapp_shardorder"
    assert sql(services, "shard2", orders) == [(order.pk, customer)]
    assert sql(services, "shard0", orders) == sql(services, "shard1", orders) == []
    assert TenantDocument.objects.for_key(tenant).get().pk == doc.pk


def test_the_database_functions_number_ids_per_group(services: Services) -> None:
    numbers = "SELECT dbscale_shard_number('customers'), dbscale_shard_number('tenants')"
    assert sql(services, "shard0", numbers) == [(0, None)]
    assert sql(services, "shard1", numbers) == [(1, 1)]
    assert sql(services, "shard2", numbers) == [(2, 0)]
    (tenant_id,) = sql(services, "shard2", "SELECT dbscale_next_id(12, 10, 'tenants')")[0]
    assert shard_of_id("tenants", tenant_id) == "shard2" and decode_id(tenant_id).shard_number == 0
    # The two-argument form (the default of tables made before groups could share a
    # database) numbers IDs in the database's first stamped group.
    (legacy,) = sql(services, "shard2", "SELECT dbscale_next_id(12, 10)")[0]
    assert shard_of_id("customers", legacy) == "shard2" and decode_id(legacy).shard_number == 2
    assert sql(services, "shard2", "SELECT dbscale_shard_number()") == [(2,)]
    with pytest.raises(psycopg.errors.RaiseException, match="shard of group 'tenants'"):
        sql(services, "shard0", "SELECT dbscale_next_id(12, 10, 'tenants')")
    assert sql(services, "default", "SELECT to_regclass('dbscale_shard_stamp')") == [(None,)]


def test_every_shard_keeps_one_stamp_per_group(services: Services) -> None:
    fingerprints = {g: get_ring(g).fingerprint for g in ("customers", "tenants")}
    query = (
        "SELECT shard_group, alias, shard_number, vnodes, fingerprint FROM dbscale_shard_stamp "
        "WHERE shard_group IN ('customers', 'tenants') ORDER BY seq"
    )
    expected = {
        "shard0": [("customers", "shard0", 0, 8, fingerprints["customers"])],
        "shard1": [
            ("customers", "shard1", 1, 8, fingerprints["customers"]),
            ("tenants", "shard1", 1, 8, fingerprints["tenants"]),
        ],
        "shard2": [
            ("customers", "shard2", 2, 8, fingerprints["customers"]),
            ("tenants", "shard2", 0, 8, fingerprints["tenants"]),
        ],
    }
    for alias, rows in expected.items():
        assert sql(services, alias, query) == rows
        stamps = read_stamps(connections[alias])
        assert [(s.group, s.shard_number) for s in stamps.values() if s.group in fingerprints] == [
            (r[0], r[2]) for r in rows
        ]
    tenants = read_stamp(connections["shard2"], "tenants")
    assert tenants is not None and (tenants.alias, tenants.shard_number) == ("shard2", 0)
    first = read_stamp(connections["shard2"])
    assert first is not None and first.group == "customers"
    assert read_stamp(connections["shard0"], "tenants") is None


def test_a_ring_change_of_one_group_is_refused_for_that_group_only(
    services: Services, restamp: None
) -> None:
    tenant = key_on("tenants", "shard2")
    TenantDocument.objects.create(tenant_id=tenant, title="placed")
    swapped = {**settings.DBSCALE["SHARD_GROUPS"], "tenants": {"SHARDS": ["shard1", "shard2"]}}
    with override_settings(DBSCALE=base_dbscale(SHARD_GROUPS=swapped)):
        refused = "shard number 0 in its IDs, now at position 1"
        with pytest.raises(
            RingChangeRefused, match=f"group 'tenants' is populated and it is {refused}"
        ):
            install_shard_functions("shard2")
        with pytest.raises(RingChangeRefused, match=refused):
            install_shard_functions("shard2", group="tenants")
        assert install_shard_functions("shard2", group="customers") is not None
        # shard1 holds no tenants rows: re-stamped freely.
        assert install_shard_functions("shard1", group="tenants") is not None
        messages = checks.run_checks(databases=["shard2"], tags=[checks.Tags.database])
        errors = [m for m in messages if m.id == "dbscale.E110"]
        assert len(errors) == 1 and "Shard 'shard2' of group 'tenants'" in errors[0].msg
        assert not [m for m in messages if m.id == "dbscale.W100"]
        verify_ring_once("shard2", group="customers")
        with pytest.raises(RingChangeRefused, match="Refusing to route 'tenants' rows"):
            verify_ring_once("shard2", group="tenants")
        out = io_call("dbscale", "shards", "--verify", "--group", "tenants")
        assert "REFUSED" in out
    numbers = "SELECT dbscale_shard_number('customers'), dbscale_shard_number('tenants')"
    assert sql(services, "shard2", numbers) == [(2, 0)]
    assert sql(services, "shard1", numbers) == [(1, 0)]  # the empty shard took the new order


def test_restamping_one_group_after_a_move_leaves_the_other_group_alone(
    services: Services, restamp: None
) -> None:
    doc = TenantDocument.objects.create(tenant_id=key_on("tenants", "shard2"), title="moved")
    swapped = {**settings.DBSCALE["SHARD_GROUPS"], "tenants": {"SHARDS": ["shard1", "shard2"]}}
    with override_settings(DBSCALE=base_dbscale(SHARD_GROUPS=swapped)):
        stamp = install_shard_functions("shard2", group="tenants", restamp=True, force=True)
        assert stamp is not None and (stamp.group, stamp.shard_number) == ("tenants", 1)
        assert install_shard_functions("shard2", group="nope") is None
        assert install_shard_functions("shard0", group="tenants") is None
    numbers = "SELECT dbscale_shard_number('customers'), dbscale_shard_number('tenants')"
    assert sql(services, "shard2", numbers) == [(2, 1)]
    customers = read_stamp(connections["shard2"], "customers")
    assert customers is not None and customers.shard_number == 2
    (new_id,) = sql(services, "shard2", "SELECT dbscale_next_id(12, 10, 'tenants')")[0]
    assert decode_id(new_id).shard_number == 1 and decode_id(doc.pk).shard_number == 0


def test_a_one_row_stamp_table_is_upgraded_in_place_and_old_defaults_keep_working(
    services: Services, restamp: None
) -> None:
    """A shard stamped before groups could share databases: nothing is lost on migrate."""
    fingerprint = read_stamp(connections["shard2"], "customers")
    assert fingerprint is not None
    customer = key_on("customers", "shard2")
    ShardCustomer.objects.create(id=customer, name="kept")
    connections["shard2"].close()
    sql(
        services,
        "shard2",
        f"""
        DROP TABLE dbscale_shard_stamp;
        CREATE TABLE dbscale_shard_stamp (
            id smallint PRIMARY KEY CHECK (id = 1), shard_group text NOT NULL,
            alias text NOT NULL, shard_number integer NOT NULL, vnodes integer NOT NULL,
            fingerprint text NOT NULL, stamped_at timestamptz NOT NULL DEFAULT now());
        INSERT INTO dbscale_shard_stamp (id, shard_group, alias, shard_number, vnodes,
            fingerprint) VALUES (1, 'customers', 'shard2', 2, 8, '{fingerprint.fingerprint}');
        CREATE OR REPLACE FUNCTION dbscale_next_id(shard_bits integer, seq_bits integer)
            RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$ BEGIN RETURN 2 << seq_bits; END $$;
        CREATE TABLE dbscale_test_legacy (
            id bigint PRIMARY KEY DEFAULT dbscale_next_id(12, 10), note text);
        """,
    )
    try:
        old = read_stamp(connections["shard2"])
        assert old == fingerprint  # the old layout is still readable (checks before migrate)
        call_command("migrate", database="shard2", run_syncdb=True, verbosity=0)
        rows = sql(
            services,
            "shard2",
            "SELECT shard_group, alias, shard_number, vnodes, fingerprint "
            "FROM dbscale_shard_stamp ORDER BY seq",
        )
        assert rows == [
            ("customers", "shard2", 2, 8, fingerprint.fingerprint),
            ("tenants", "shard2", 0, 8, get_ring("tenants").fingerprint),
            ("ledgers", "shard2", 2, 8, get_ring("ledgers").fingerprint),
        ]
        (legacy_id,) = sql(
            services, "shard2", "INSERT INTO dbscale_test_legacy (note) VALUES ('x') RETURNING id"
        )[0]
        parts = decode_id(legacy_id)
        assert parts.shard_number == 2 and shard_of_id("customers", legacy_id) == "shard2"
        assert abs(parts.created - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)
        assert sql(services, "shard2", "SELECT id, name FROM testapp_shardcustomer") == [
            (customer, "kept")
        ]
    finally:
        sql(services, "shard2", "DROP TABLE IF EXISTS dbscale_test_legacy")


# -- migrate refuses an invalid configuration ---------------------------------------------------


def public_tables(services: Services, alias: str) -> list[str]:
    rows = sql(
        services,
        alias,
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename",
    )
    return [str(r[0]) for r in rows]


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        # The tenants models' group is not configured: their tables would go nowhere.
        (
            {"customers": ["shard0", "shard1", "shard2"]},
            ["dbscale.E100", "testapp.TenantDocument.shard_group = 'tenants'"],
        ),
        # A shard of the overlapping group is not a database.
        (
            {"customers": ["shard0", "shard1", "shard2"], "tenants": ["shard2", "shard9"]},
            ["dbscale.E005", "Shard 'shard9' of group 'tenants' is not in DATABASES"],
        ),
    ],
)
def test_migrate_without_checks_refuses_an_invalid_sharding_configuration(
    services: Services, groups: dict[str, Any], expected: list[str]
) -> None:
    before = {alias: public_tables(services, alias) for alias in ("default", *SHARDS)}
    with override_settings(DBSCALE=base_dbscale(SHARD_GROUPS=groups)):
        for alias in ("default", "shard0"):
            with pytest.raises(CommandError) as caught:
                call_command("migrate", database=alias, skip_checks=True, verbosity=0)
            message = str(caught.value)
            assert message.startswith(f"Refusing to migrate database {alias!r}")
            assert "Fix them (`manage.py check` lists them too)" in message
            for text in expected:
                assert text in message
    assert {alias: public_tables(services, alias) for alias in before} == before


def test_migrate_without_checks_refuses_a_dbscale_that_does_not_parse(services: Services) -> None:
    before = {alias: public_tables(services, alias) for alias in ("default", *SHARDS)}
    groups = {"customers": ["shard0", "shard1", "shard2"], "tenants": {"SHARDS": "shard2"}}
    with override_settings(DBSCALE=base_dbscale(SHARD_GROUPS=groups)):
        assert [m.id for m in migrate_blockers()] == ["dbscale.E000"]
        for alias in ("default", "shard0"):
            # The first router question (another app's pre_migrate receiver, or the guard)
            # stops migrate with the parse error, naming the key and the fix.
            with pytest.raises(ImproperlyConfigured) as caught:
                call_command("migrate", database=alias, skip_checks=True, verbosity=0)
            assert str(caught.value) == (
                "DBSCALE['SHARD_GROUPS'] ['tenants']['SHARDS'] must be a list of aliases or "
                "an alias->weight dict. Fix the group."
            )
    assert {alias: public_tables(services, alias) for alias in before} == before


def test_two_groups_sharing_a_table_on_a_shared_shard_is_e111() -> None:
    with isolate_apps("tests.testapp") as apps:

        class Left(ShardedModel):
            shard_group = "customers"
            shard_key = "key"
            id = ShardedIDField(primary_key=True)
            key = models.BigIntegerField()

            class Meta:
                app_label = "testapp"
                db_table = "overlap_shared"

        class Right(ShardedModel):
            shard_group = "tenants"
            shard_key = "key"
            id = ShardedIDField(primary_key=True)
            key = models.BigIntegerField()

            class Meta:
                app_label = "testapp"
                db_table = "overlap_shared"

        messages = [m for m in check_sharded_models(app_configs=apps.get_app_configs()) if m.id]
        e111 = [m for m in messages if m.id == "dbscale.E111"]
        assert len(e111) == 1
        assert e111[0].msg == (
            "Table 'overlap_shared' belongs to ['testapp.Left'] of shard group 'customers' and "
            "to ['testapp.Right'] of group 'tenants', whose shards ['shard1', 'shard2'] "
            "overlap: both groups' rows would land in one table on those databases."
        )
        apart = {"customers": ["shard0"], "tenants": ["shard1", "shard2"]}
        with override_settings(DBSCALE=base_dbscale(SHARD_GROUPS=apart)):
            messages = check_sharded_models(app_configs=apps.get_app_configs())
            assert "dbscale.E111" not in [m.id for m in messages]
    assert migrate_blockers() == []


# -- a project started from its settings ------------------------------------------------------

SETTINGS_TEMPLATE = """
from tests.startup._base import *  # noqa: F403
from tests.startup._base import INSTALLED_APPS, SERVERS

INSTALLED_APPS = [*INSTALLED_APPS, "tests.startup.shardapp"]
NAMES = {names!r}
DATABASES = {{alias: {{**SERVERS[alias], "NAME": NAMES[alias]}} for alias in NAMES}}
DATABASE_ROUTERS = ["django_dbscale.routers.ShardRouter"]
DBSCALE = {{"SHARD_GROUPS": {groups!r}}}
"""


def test_a_project_started_with_a_broken_sharding_config_creates_no_table(
    services: Services, tmp_path: Path
) -> None:
    aliases = ("default", *SHARDS)
    names = {alias: f"overlap_{uuid.uuid4().hex[:8]}_{alias}" for alias in aliases}
    for alias in aliases:
        services.alias_server(alias).execute(f'CREATE DATABASE "{names[alias]}"')

    def fresh(alias: str, query: str) -> list[Any]:
        return services.alias_server(alias).execute(query, dbname=names[alias])

    def migrate(groups: dict[str, Any], alias: str) -> subprocess.CompletedProcess[str]:
        module = f"overlap_settings_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{module}.py").write_text(
            textwrap.dedent(SETTINGS_TEMPLATE.format(names=names, groups=groups))
        )
        env = {
            **os.environ,
            **services.env(),
            "DJANGO_SETTINGS_MODULE": module,
            "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        }
        return subprocess.run(
            [sys.executable, "-m", "django", "migrate", "--skip-checks", "--run-syncdb"]
            + ["--database", alias, "--verbosity", "0"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    tables = "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
    try:
        # StartupAccount is in group "customers", which the project renamed to "clients".
        broken = {"clients": ["shard0", "shard1", "shard2"], "tenants": ["shard2", "shard1"]}
        for alias in aliases:
            result = migrate(broken, alias)
            assert result.returncode == 1, result.stdout + result.stderr
            assert f"CommandError: Refusing to migrate database {alias!r}" in result.stderr
            assert (
                "dbscale.E100: shardapp.StartupAccount.shard_group = 'customers' is not a "
                "group of DBSCALE['SHARD_GROUPS'] (configured: ['clients', 'tenants'])."
            ) in result.stderr
            assert "HINT: Add the group to the setting or fix the name." in result.stderr
            assert fresh(alias, tables) == []  # not even django_migrations
            assert fresh(alias, "SELECT to_regproc('dbscale_next_id')") == [(None,)]
        fixed = {"customers": ["shard0", "shard1", "shard2"], "tenants": ["shard2", "shard1"]}
        for alias in aliases:
            result = migrate(fixed, alias)
            assert result.returncode == 0, result.stdout + result.stderr
            names_here = [r[0] for r in fresh(alias, tables)]
            assert ("shardapp_startupaccount" in names_here) is (alias != "default")
            assert "django_migrations" in names_here
        stamps = "SELECT shard_group, shard_number FROM dbscale_shard_stamp ORDER BY seq"
        assert fresh("shard0", stamps) == [("customers", 0)]
        assert fresh("shard2", stamps) == [("customers", 2), ("tenants", 0)]
    finally:
        for alias in aliases:
            services.alias_server(alias).execute(
                f'DROP DATABASE IF EXISTS "{names[alias]}" WITH (FORCE)'
            )
