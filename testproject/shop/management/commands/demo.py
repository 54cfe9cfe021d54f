"""``manage.py demo``: the library end to end against real services.

Boots (through the settings) a PostgreSQL primary with a streaming replica, a second
server with shards and its own replica, and Redis; migrates every database; writes and
reads data; and prints where each statement went, replica lag, shard distribution and
cache hits.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import connections

from django_dbscale import consistency_context, consistency_token, read_at_least, replicas
from django_dbscale.conf import dbscale_settings
from django_dbscale.testing.harness import get_services
from shop.models import Article


@contextmanager
def statement_log(out: Callable[[str], None]) -> Iterator[None]:
    """Print every statement with the alias of the database that ran it."""

    def make_logger(alias: str) -> Callable[..., Any]:
        def log(
            execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
        ) -> Any:
            short = " ".join(sql.split())[:90]
            out(f"    [{alias:>15}] {short}")
            return execute(sql, params, many, context)

        return log

    with ExitStack() as stack:
        for alias in settings.DATABASES:
            stack.enter_context(connections[alias].execute_wrapper(make_logger(alias)))
        yield


class Command(BaseCommand):
    help = "Run the django_dbscale demo against the harness's real services."

    def handle(self, *args: Any, **options: Any) -> None:
        out = self.stdout.write
        services = get_services()

        out("== Services (booted by django_dbscale.testing.harness)")
        for server in (services.pg1, services.pg1_replica, services.pg2, services.pg2_replica):
            role = f"replica of {server.primary.name}" if server.primary else "primary"
            out(f"  {server.name:<12} 127.0.0.1:{server.port:<6} {role}")
        out(f"  redis        {services.redis.host}:{services.redis.port}")
        out(
            "  aliases: "
            + ", ".join(f"{a}->{services.alias_server(a).name}" for a in settings.DATABASES)
        )

        out("\n== Migrating every primary (replicas receive the schema by streaming)")
        for alias in settings.DATABASES:
            if alias in dbscale_settings.primary_of:
                continue
            call_command("migrate", database=alias, run_syncdb=True, verbosity=0, interactive=False)
            out(f"  migrated {alias}")

        out("\n== Replication: a row written on the primary appears on the replica")
        with consistency_context():
            article = Article.objects.create(title="Hello, replicas")
        services.pg1_replica.wait_for_replay()
        rows = services.pg1_replica.execute(
            "SELECT id, title FROM shop_article WHERE id = %s", (article.pk,), dbname="dbscale"
        )
        out(f"  direct SQL on pg1_replica: {rows}")

        replicas.monitor.refresh()
        out("\n== Replica status (manage.py dbscale status)")
        call_command("dbscale", "status", stdout=self.stdout)

        out("\n== Routing: statements and the database that ran them")
        with consistency_context(), statement_log(out):
            out("  a fresh request reads from the replica:")
            Article.objects.filter(pk=article.pk).first()
            out("  it writes; the write goes to the primary:")
            Article.objects.filter(pk=article.pk).update(views=1)
            out("  and its next read must see that write (LSN checked, replica caught up?):")
            Article.objects.filter(pk=article.pk).first()

        out("\n== Read-your-writes while the replica lags (replay paused)")
        services.pg1_replica.pause_replay()
        try:
            with consistency_context():
                Article.objects.filter(pk=article.pk).update(views=2)
                mine = Article.objects.get(pk=article.pk)
                token = consistency_token()
            out(f"  the writer reads views={mine.views} from {mine._state.db!r}")
            with consistency_context():
                other = Article.objects.get(pk=article.pk)
            out(
                f"  another user reads views={other.views} from {other._state.db!r} (within budget)"
            )
            with read_at_least(token):
                task = Article.objects.get(pk=article.pk)
            out(f"  a task given the token reads views={task.views} from {task._state.db!r}")
        finally:
            services.pg1_replica.resume_replay()
            services.pg1_replica.wait_for_replay()

        out("\n== Replica stopped mid-traffic: no errors, reads move to the primary")
        services.pg1_replica.stop()
        try:
            for _ in range(3):
                with consistency_context():
                    got = Article.objects.filter(pk=article.pk).first()
                assert got is not None
            error = replicas.monitor.status("default_replica").last_error[:60]
            out(f"  3 reads served without an error; replica marked down: {error}")
        finally:
            services.pg1_replica.start()
        services.pg1_replica.wait_for_replay()
        time.sleep(dbscale_settings.replica_quarantine[0])
        replicas.monitor.refresh()
        with consistency_context():
            back = Article.objects.filter(pk=article.pk).first()
        where = back._state.db if back else None
        out(f"  after restart the replica is re-admitted: read from {where!r}")

        out("\n== Reads routed, by database and reason (this process)")
        for (alias, reason), count in sorted(replicas.route_counts.items()):
            out(f"  {alias:<16} {reason:<18} {count}")

        for section in ("demo_sharding", "demo_reshard", "demo_cache"):
            try:
                module = importlib.import_module(section)
            except ModuleNotFoundError as exc:
                if exc.name != section:
                    raise
                continue
            out(f"\n== {section.removeprefix('demo_').title()}")
            module.run(out)
        out("\nDemo finished.")
