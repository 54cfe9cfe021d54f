"""Sharded test models: group ``customers`` (shard0 on pg1; shard1, shard2 on pg2).

``ShardCustomer``, ``ShardOrder``, ``ShardOrderLine``, ``ShardTicket`` and ``ShardCoupon`` are
colocated by customer id; ``ShardProduct`` is an unsharded reference table on ``default``.
``TenantDocument`` and ``TenantEvent`` are in group ``tenants``, whose shards (shard2,
shard1) are also shards of ``customers``.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.db.models.functions import Lower
from django.utils import timezone

from django_dbscale.sharding.ids import ShardedIDField
from django_dbscale.sharding.models import ShardedModel

__all__ = [
    "ShardCoupon",
    "ShardCustomer",
    "ShardOrder",
    "ShardOrderLine",
    "ShardProduct",
    "ShardTag",
    "ShardTicket",
    "TenantDocument",
    "TenantEvent",
]


class ShardProduct(models.Model):
    """An unsharded reference table: lives on ``default``, read from its replica."""

    name = models.CharField(max_length=100)

    class Meta:
        app_label = "testapp"

    def __str__(self) -> str:
        return self.name


class ShardCustomer(ShardedModel):
    """Keyed by its own id, assigned by the application (the key must exist before insert)."""

    shard_group = "customers"
    shard_key = "id"

    id = models.BigIntegerField(primary_key=True)
    name = models.CharField(max_length=100, db_collation="C")

    class Meta:
        app_label = "testapp"


class ShardTag(ShardedModel):
    """A per-customer label, linked to orders many-to-many (the link table is sharded too)."""

    shard_group = "customers"
    shard_key = "customer_id"

    id = ShardedIDField(primary_key=True)
    customer_id = models.BigIntegerField()
    label = models.CharField(max_length=20, db_collation="C")

    class Meta:
        app_label = "testapp"


class ShardOrder(ShardedModel):
    shard_group = "customers"
    shard_key = "customer"

    id = ShardedIDField(primary_key=True)
    customer = models.ForeignKey(ShardCustomer, models.CASCADE, related_name="orders")
    product = models.ForeignKey(
        ShardProduct,
        models.DO_NOTHING,
        db_constraint=False,
        null=True,
        blank=True,
        related_name="shard_orders",
    )
    status = models.CharField(max_length=20, default="open", db_collation="C")
    total = models.DecimalField(max_digits=12, decimal_places=2, default=0)
    rank = models.IntegerField(null=True)
    created = models.DateTimeField(default=timezone.now)
    tags = models.ManyToManyField(ShardTag, related_name="orders", blank=True)

    class Meta:
        app_label = "testapp"


class ShardOrderLine(ShardedModel):
    """Colocated with its order through a denormalised integer key."""

    shard_group = "customers"
    shard_key = "customer_id"

    id = ShardedIDField(primary_key=True)
    order = models.ForeignKey(ShardOrder, models.CASCADE, related_name="lines")
    customer_id = models.BigIntegerField()
    sku = models.CharField(max_length=20, db_collation="C")
    qty = models.IntegerField(default=1)

    class Meta:
        app_label = "testapp"


class ShardTicket(ShardedModel):
    """53-bit IDs (safe as JavaScript numbers)."""

    shard_group = "customers"
    shard_key = "customer_id"

    id = ShardedIDField(primary_key=True, js_safe=True)
    customer_id = models.BigIntegerField()
    subject = models.CharField(max_length=100, default="")

    class Meta:
        app_label = "testapp"


class ShardCoupon(ShardedModel):
    """Unique fields and constraints that do not include the shard key (unique per shard).

    ``code`` has no ``db_collation``: it sorts by the database's default collation.
    """

    shard_group = "customers"
    shard_key = "customer_id"

    id = ShardedIDField(primary_key=True)
    customer_id = models.BigIntegerField()
    code = models.CharField(max_length=20, unique=True)
    label = models.CharField(max_length=20, blank=True, default="")

    class Meta:
        app_label = "testapp"
        constraints = [
            models.UniqueConstraint(
                Lower("label"), name="testapp_shardcoupon_label_ci", condition=~Q(label="")
            ),
        ]


class TenantDocument(ShardedModel):
    """Group ``tenants``: lives on shard2 and shard1 only (shard numbers 0 and 1)."""

    shard_group = "tenants"
    shard_key = "tenant_id"

    id = ShardedIDField(primary_key=True)
    tenant_id = models.BigIntegerField()
    title = models.CharField(max_length=100, db_collation="C")

    class Meta:
        app_label = "testapp"


class TenantEvent(ShardedModel):
    """Group ``tenants`` with 53-bit IDs."""

    shard_group = "tenants"
    shard_key = "tenant_id"

    id = ShardedIDField(primary_key=True, js_safe=True)
    tenant_id = models.BigIntegerField()
    kind = models.CharField(max_length=20, db_collation="C")

    class Meta:
        app_label = "testapp"
