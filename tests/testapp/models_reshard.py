"""Models of the ``ledgers`` shard group, which tests/test_reshard.py grows online."""

from __future__ import annotations

from django.db import models

from django_dbscale.sharding.ids import ShardedIDField
from django_dbscale.sharding.models import ShardedModel

__all__ = ["LedgerAccount", "LedgerEntry", "LedgerLabel"]


class LedgerAccount(ShardedModel):
    """An account, keyed by its number; its entries live on the same shard."""

    id = ShardedIDField(primary_key=True)
    number = models.BigIntegerField(unique=True)
    balance = models.IntegerField(default=0)

    shard_group = "ledgers"
    shard_key = "number"

    class Meta:
        app_label = "testapp"

    def __str__(self) -> str:
        return f"account {self.number}"


class LedgerLabel(ShardedModel):
    """A label of an account, keyed by the account number without a foreign key."""

    id = ShardedIDField(primary_key=True)
    account_number = models.BigIntegerField()
    name = models.CharField(max_length=80, default="")

    shard_group = "ledgers"
    shard_key = "account_number"

    class Meta:
        app_label = "testapp"

    def __str__(self) -> str:
        return self.name


class LedgerEntry(ShardedModel):
    """An entry of an account: a foreign key to the account's number is the shard key."""

    id = ShardedIDField(primary_key=True)
    account = models.ForeignKey(
        LedgerAccount,
        models.CASCADE,
        to_field="number",
        db_column="account_number",
        related_name="entries",
    )
    amount = models.IntegerField()
    writer_seq = models.BigIntegerField(default=0)
    #: An auto-created link table: its rows carry no key and move with their entry.
    labels = models.ManyToManyField(LedgerLabel, related_name="entries", blank=True)

    shard_group = "ledgers"
    shard_key = "account"

    class Meta:
        app_label = "testapp"

    def __str__(self) -> str:
        return f"entry {self.id} of {self.account_id}"
