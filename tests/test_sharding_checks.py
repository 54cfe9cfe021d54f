"""System checks of sharded models (dbscale.E100-E149, W100-W149) and the router contract."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.apps import apps as live_apps
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import models
from django.test import override_settings
from django.test.utils import isolate_apps

from django_dbscale.conf import dbscale_settings
from django_dbscale.sharding import ShardDeclarationError, ShardedIDField, ShardKeyRequired
from django_dbscale.sharding.checks import ALL_IDS, check_sharded_models
from django_dbscale.sharding.models import ShardedModel
from django_dbscale.sharding.routing import (
    allow_migrate,
    allow_relation,
    primary_for_write,
    shard_spec,
)
from tests.testapp.models import Note, ShardCustomer, ShardOrder, ShardProduct


def ids_of(messages: list[checks.CheckMessage]) -> list[str]:
    return sorted(m.id or "" for m in messages)


def run_checks(apps: Any) -> list[checks.CheckMessage]:
    return check_sharded_models(app_configs=apps.get_app_configs())


def test_check_ids_are_unique_in_range_and_documented() -> None:
    assert len(ALL_IDS) == len(set(ALL_IDS))
    for check_id in ALL_IDS:
        assert re.fullmatch(r"dbscale\.[EW]1[0-4][0-9]", check_id)
    docs = (Path(__file__).parents[1] / "docs" / "sharding.md").read_text()
    for check_id in ALL_IDS:
        assert check_id in docs


def test_the_test_project_has_no_sharding_errors() -> None:
    assert run_checks(live_apps) == []


@pytest.fixture
def isolated() -> Iterator[Any]:
    """An app registry of its own, so test models never reach the project's."""
    with isolate_apps("tests.testapp") as apps:
        yield apps


class TestModelChecks:
    def test_unknown_group_and_missing_key_field(self, isolated: Any) -> None:
        class Lost(ShardedModel):
            shard_group = "nope"
            shard_key = "customer_id"
            id = ShardedIDField(primary_key=True)
            customer_id = models.BigIntegerField()

            class Meta:
                app_label = "testapp"

        class NoKey(ShardedModel):
            shard_group = "customers"
            shard_key = "missing"
            id = ShardedIDField(primary_key=True)

            class Meta:
                app_label = "testapp"

        class Undeclared(ShardedModel):
            id = ShardedIDField(primary_key=True)

            class Meta:
                app_label = "testapp"

        messages = run_checks(isolated)
        assert ids_of(messages) == ["dbscale.E100", "dbscale.E101", "dbscale.E106"]
        text = " ".join(m.msg for m in messages)
        assert "'nope' is not a group" in text and "(configured: ['customers', " in text
        assert "'missing' is not a field" in text

    def test_auto_increment_primary_keys_are_refused(self, isolated: Any) -> None:
        class Counted(ShardedModel):
            shard_group = "customers"
            shard_key = "customer_id"
            customer_id = models.BigIntegerField()

            class Meta:
                app_label = "testapp"

        class Small(ShardedModel):
            shard_group = "customers"
            shard_key = "customer_id"
            id = models.SmallAutoField(primary_key=True)
            customer_id = models.BigIntegerField()

            class Meta:
                app_label = "testapp"

        class Uuid(ShardedModel):
            shard_group = "customers"
            shard_key = "customer_id"
            id = models.UUIDField(primary_key=True, default=uuid.uuid4)
            customer_id = models.BigIntegerField()

            class Meta:
                app_label = "testapp"

        messages = run_checks(isolated)
        assert ids_of(messages) == ["dbscale.E102", "dbscale.E102"]
        assert {m.obj for m in messages} == {Counted, Small}
        assert "BigAutoField" in messages[0].msg or "BigAutoField" in messages[1].msg
        assert all("ShardedIDField(primary_key=True)" in (m.hint or "") for m in messages)

    def test_relations_that_cannot_be_routed(self, isolated: Any) -> None:
        class Ref(models.Model):
            class Meta:
                app_label = "testapp"

            def __str__(self) -> str:
                return "ref"

        class Root(ShardedModel):
            shard_group = "customers"
            shard_key = "id"
            id = models.BigIntegerField(primary_key=True)

            class Meta:
                app_label = "testapp"

        class Elsewhere(ShardedModel):
            shard_group = "regions"
            shard_key = "id"
            id = models.BigIntegerField(primary_key=True)

            class Meta:
                app_label = "testapp"

        class Child(ShardedModel):
            shard_group = "customers"
            shard_key = "root"
            id = ShardedIDField(primary_key=True)
            root = models.ForeignKey(Root, models.CASCADE)
            ok_ref = models.ForeignKey(Ref, models.DO_NOTHING, db_constraint=False)
            bad_ref = models.ForeignKey(Ref, models.CASCADE, db_constraint=False, related_name="+")
            region = models.ForeignKey(Elsewhere, models.CASCADE)
            refs = models.ManyToManyField(Ref, related_name="+")

            class Meta:
                app_label = "testapp"

        class Backwards(models.Model):
            root = models.ForeignKey(Root, models.CASCADE)
            wrong_id = ShardedIDField()

            class Meta:
                app_label = "testapp"

            def __str__(self) -> str:
                return "backwards"

        groups = {"customers": ["shard0", "shard1", "shard2"], "regions": ["shard0"]}
        with override_settings(DBSCALE={"SHARD_GROUPS": groups}):
            messages = run_checks(isolated)
        assert ids_of(messages) == [
            "dbscale.E103",
            "dbscale.E104",
            "dbscale.E104",
            "dbscale.E105",
            "dbscale.E108",
        ]
        by_id = {m.id: m.msg for m in messages}
        e104 = " ".join(m.msg for m in messages if m.id == "dbscale.E104")
        assert "Child.bad_ref" in e104 and "Child.refs" in e104 and "ok_ref" not in e104
        assert "group 'customers' to" in by_id["dbscale.E103"]
        assert "Backwards.root" in by_id["dbscale.E105"]
        assert "wrong_id" in by_id["dbscale.E108"]

    def test_js_safe_ids_cannot_number_a_large_group_and_default_is_no_shard(
        self, isolated: Any
    ) -> None:
        class Small(ShardedModel):
            shard_group = "big"
            shard_key = "customer_id"
            id = ShardedIDField(primary_key=True, js_safe=True)
            customer_id = models.BigIntegerField()

            class Meta:
                app_label = "testapp"

        groups = {"big": [f"s{i}" for i in range(33)], "bad": ["default"]}
        with override_settings(DBSCALE={"SHARD_GROUPS": groups}):
            messages = run_checks(isolated)
        assert ids_of(messages) == ["dbscale.E107", "dbscale.E109"]
        assert "can number 32 shards" in messages[1].msg or "can number 32" in messages[0].msg

    def test_colocated_models_with_different_key_types_warn(self, isolated: Any) -> None:
        class ByInt(ShardedModel):
            shard_group = "customers"
            shard_key = "key"
            id = ShardedIDField(primary_key=True)
            key = models.BigIntegerField()

            class Meta:
                app_label = "testapp"

        class ByUuid(ShardedModel):
            shard_group = "customers"
            shard_key = "key"
            id = ShardedIDField(primary_key=True)
            key = models.UUIDField()

            class Meta:
                app_label = "testapp"

        class Plain(ShardedModel):
            shard_group = "customers"
            shard_key = "key"
            id = ShardedIDField(primary_key=True)
            key = models.BigIntegerField()
            objects = models.Manager()  # type: ignore[assignment]

            class Meta:
                app_label = "testapp"

        messages = run_checks(isolated)
        assert ids_of(messages) == ["dbscale.W101", "dbscale.W102"]
        assert all(isinstance(m, checks.Warning) for m in messages)
        by_id = {m.id: m.msg for m in messages}
        assert "Plain's default manager 'objects'" in by_id["dbscale.W102"]
        assert "UUIDField: ['testapp.ByUuid']" in by_id["dbscale.W101"]


def test_manage_py_check_runs_the_sharding_checks() -> None:
    registered = checks.registry.registry.get_checks(include_deployment_checks=False)
    assert check_sharded_models in registered
    with (
        override_settings(DBSCALE={"SHARD_GROUPS": {"other": ["shard0"]}}),
        pytest.raises(SystemCheckError, match=r"dbscale\.E100"),
    ):
        call_command("check")


# -- the router contract ------------------------------------------------------------------------


def test_allow_migrate_places_sharded_tables_only_on_their_group() -> None:
    for db in ("shard0", "shard1", "shard2"):
        assert allow_migrate(db, "testapp", "shardorder", None) is True
        # Historical models lose the ShardedModel base: the live model decides.
        assert allow_migrate(db, "testapp", "shardorder", object) is True  # type: ignore[arg-type]
        assert allow_migrate(db, "testapp", "shardproduct", None) is False
        assert allow_migrate(db, "auth", "user", None) is False
        assert allow_migrate(db, "auth", None, None) is False  # RunPython of an unsharded app
        assert allow_migrate(db, "testapp", None, None) is None  # mixed app: no opinion
    for db in ("default", "shard0_replica"):
        assert allow_migrate(db, "testapp", "shardorder", None) is False
        assert allow_migrate(db, "testapp", "shardproduct", None) is None
    through = ShardOrder._meta.get_field("customer").related_model
    assert through is ShardCustomer


def test_router_has_no_opinion_on_unsharded_models_and_refuses_keyless_writes() -> None:
    assert primary_for_write(Note, {}) is None
    assert primary_for_write(Note, {"instance": Note(title="x")}) is None
    with pytest.raises(ShardKeyRequired, match="Cannot write testapp.ShardOrder"):
        primary_for_write(ShardOrder, {})
    assert allow_relation(Note(), ShardProduct()) is None
    assert allow_relation(ShardOrder(customer_id=1), ShardProduct()) is True
    assert dbscale_settings.groups_of_shard["shard1"] == ("customers", "tenants", "ledgers")


def test_allow_migrate_recognises_deleted_sharded_models_by_their_history(isolated: Any) -> None:
    # A historical model as migrations build it: the fields, without ShardedModel's class
    # attributes, and no live model of that name any more (deleted or renamed since).
    class OldOrder(models.Model):
        id = ShardedIDField(primary_key=True)
        customer_id = models.BigIntegerField()

        class Meta:
            app_label = "testapp"

        def __str__(self) -> str:
            return "old"

    class OldNote(models.Model):
        class Meta:
            app_label = "testapp"

        def __str__(self) -> str:
            return "note"

    one = {"customers": ["shard0", "shard1", "shard2"]}
    with override_settings(DBSCALE={"SHARD_GROUPS": one}):
        for db in ("shard0", "shard1", "shard2"):
            assert allow_migrate(db, "testapp", "oldorder", OldOrder) is True
            assert allow_migrate(db, "testapp", "oldnote", OldNote) is False
        assert allow_migrate("default", "testapp", "oldorder", OldOrder) is False
        assert allow_migrate("default", "testapp", "oldnote", OldNote) is None
    two = {"customers": ["shard0", "shard1"], "regions": ["shard2"]}
    with override_settings(DBSCALE={"SHARD_GROUPS": two}):
        # Which group it was in is unknown: no opinion on shards, never on default.
        assert allow_migrate("shard0", "testapp", "oldorder", OldOrder) is None
        assert allow_migrate("default", "testapp", "oldorder", OldOrder) is False


def test_a_wrong_declaration_raises_a_declaration_error_when_routed(isolated: Any) -> None:
    class Undeclared(ShardedModel):
        id = ShardedIDField(primary_key=True)

        class Meta:
            app_label = "testapp"

    class BadKey(ShardedModel):
        shard_group = "customers"
        shard_key = "nope"
        id = ShardedIDField(primary_key=True)

        class Meta:
            app_label = "testapp"

    for model, match in ((Undeclared, "shard_group"), (BadKey, "'nope' is not a field")):
        with pytest.raises(ShardDeclarationError, match=match) as caught:
            shard_spec(model)
        assert isinstance(caught.value, ImproperlyConfigured)
        assert not isinstance(caught.value, ShardKeyRequired)
