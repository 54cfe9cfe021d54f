from __future__ import annotations

import django.db.models.functions.datetime
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="CacheOutbox",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                (
                    "created_at",
                    models.DateTimeField(db_default=django.db.models.functions.datetime.Now()),
                ),
                ("keys", models.TextField()),
            ],
            options={
                "verbose_name": "cache outbox entry",
                "verbose_name_plural": "cache outbox entries",
                "db_table": "dbscale_cache_outbox",
            },
        ),
    ]
