"""``manage.py demo``: the library end to end against real services.

Boots (through the settings) a PostgreSQL primary with a streaming replica, a second
server with shards and its own replica, and Redis; migrates every database; writes and
reads data; and prints where each statement went, replica lag, shard distribution and
cache hits, then a summary: one line per section with what it proved.

Warnings the demo provokes on purpose (it stops a replica, cuts Redis off) are printed
marked ``expected``; any other warning or error, and any check that fails, is printed as
``UNEXPECTED`` and makes the command exit with status 1 once everything is cleaned up.

Run it from a clone with ``python3 noxfile.py -s demo``, or in a virtualenv that has the
package installed with ``python3 testproject/manage.py demo``.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import demo_support
from demo_support import expect, problem, progress, statement_log, wait_for, wrap
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from django_dbscale import consistency_context, consistency_token, read_at_least, replicas
from django_dbscale.conf import dbscale_settings
from django_dbscale.testing.harness import get_services
from shop.models import Article

#: The sections in modules next to manage.py, run in this order after the replicas' (each is
#: skipped when its module is absent): module -> heading.
MODULE_SECTIONS = {
    "demo_sharding": "Sharding: keys to shards, rows where the ring says, fan-out",
    "demo_reshard": "Resharding: a shard group grows by one shard while it is written",
    "demo_cache": "Queryset cache: hits, invalidation, a lagging replica, a Redis outage",
}


@dataclass
class _Result:
    name: str
    seconds: float
    summary: str
    failed: bool = False


class _Lines:
    """A file-like ``stdout`` for ``call_command`` that prints each line indented."""

    def __init__(self, out: Callable[[str], None], indent: str = "  ") -> None:
        self.out, self.indent, self.pending = out, indent, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.out(self.indent + line)
        return len(text)

    def flush(self) -> None:
        pass


class Command(BaseCommand):
    help = "Run the django_dbscale demo against the harness's real services."

    def handle(self, *args: Any, **options: Any) -> None:
        lock = threading.Lock()

        def out(text: str) -> None:
            with lock:  # log records arrive from the replica probers' threads too
                self.stdout.write(text)

        self.out = out
        # manage.py notes when it started, before the settings booted the services.
        started = float(os.environ.pop("DBSCALE_DEMO_STARTED", time.time()))
        self.boot_seconds = time.time() - started
        self.services = get_services()

        sections: list[tuple[str, str, Callable[[], str]]] = [
            ("services", "Services (booted by django_dbscale.testing.harness)", self.show_services),
            (
                "migrate",
                "Migrating every primary (replicas receive the schema by streaming)",
                self.migrate,
            ),
            (
                "replication",
                "Replication: a row written on the primary appears on the replica",
                self.replication,
            ),
            ("status", "Replica status (manage.py dbscale status)", self.status),
            ("routing", "Routing: statements and the database that ran them", self.routing),
            (
                "read-your-writes",
                "Read-your-writes while the replica lags (replay paused)",
                self.read_your_writes,
            ),
            (
                "failover",
                "Replica stopped mid-traffic: no errors, reads move to the primary",
                self.failover,
            ),
            (
                "reads routed",
                "Reads routed, by database and reason (this process)",
                self.reads_routed,
            ),
        ]
        for module_name, title in MODULE_SECTIONS.items():
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise
                continue
            name = module_name.removeprefix("demo_")
            sections.append((name, title, lambda module=module: module.run(out)))

        results: list[_Result] = []
        with demo_support.capturing(out) as capture:
            for name, title, run in sections:
                out(f"\n== {title}")
                begun = time.monotonic()
                try:
                    summary = run() or "done"
                except Exception as exc:
                    out(f"  UNEXPECTED error: the {name} section failed:")
                    for chunk in traceback.format_exception(exc):
                        out("\n".join("    " + line for line in chunk.rstrip("\n").splitlines()))
                    results.append(
                        _Result(name, time.monotonic() - begun, f"FAILED: {exc}", failed=True)
                    )
                    break
                seconds = time.monotonic() - begun
                if name == "services":
                    seconds += self.boot_seconds  # booted by the settings, before handle()
                results.append(_Result(name, seconds, summary))

        skipped = [name for name, _, _ in sections[len(results) :]]
        total = time.time() - started
        self._summary(results, skipped, capture, total)
        failed = [r.name for r in results if r.failed]
        if failed or capture.unexpected:
            raise CommandError(
                f"the demo found {len(capture.unexpected)} unexpected warning(s) or problem(s)"
                + (f" and section {failed[0]} failed" if failed else "")
                + ": see the lines marked UNEXPECTED above"
            )

    def _summary(
        self, results: list[_Result], skipped: list[str], capture: Any, total: float
    ) -> None:
        out = self.out
        out("\n== Summary: what each section proved")
        width = max(len(name) for name in [*(r.name for r in results), *skipped, "warnings"]) + 2
        hang = " " * (2 + width + 10)
        for result in results:
            text = f"{result.name:<{width}} {result.seconds:5.1f} s  {result.summary}"
            out(wrap(text, "  ", hang))
        for name in skipped:
            out(f"  {name:<{width}} {'-':>5}    not run (an earlier section failed)")
        unexpected = len(capture.unexpected)
        verdict = f"{capture.expected} expected (provoked on purpose), {unexpected} UNEXPECTED"
        if not unexpected:
            verdict = f"{capture.expected} expected (provoked on purpose), none unexpected"
        out(f"  {'warnings':<{width}}          {verdict}")
        for line in capture.unexpected:
            out(wrap(f"- {line}", hang, hang + "  "))
        ok = not unexpected and not any(r.failed for r in results)
        out(f"\nDemo {'finished' if ok else 'FAILED'} in {total:.1f} s.")
        if ok:
            out(
                wrap(
                    "Next: docs/ (python3 noxfile.py -s docs) has the tutorial and the settings "
                    "reference; manage.py dbscale status shows what this process knows; "
                    "python3 noxfile.py -s tests runs the suite against the same services.",
                    "",
                    "  ",
                )
            )

    # -- the replicas' sections (each returns its summary line) ---------------------------------

    def show_services(self) -> str:
        out, services = self.out, self.services
        verb = "attached to" if services.external else "booted"
        out(f"  {verb} in {self.boot_seconds:.1f} s (before the command's first line):")
        for server in (services.pg1, services.pg1_replica, services.pg2, services.pg2_replica):
            role = f"replica of {server.primary.name}" if server.primary else "primary"
            out(f"  {server.name:<12} 127.0.0.1:{server.port:<6} {role}")
        out(f"  redis        {services.redis.host}:{services.redis.port}")
        out(
            wrap(
                "aliases: "
                + ", ".join(f"{a}->{services.alias_server(a).name}" for a in settings.DATABASES),
                "  ",
                "           ",
            )
        )
        return f"{verb} 4 PostgreSQL servers (2 primaries, 2 streaming replicas) and Redis"

    def migrate(self) -> str:
        out, services = self.out, self.services
        primaries = [a for a in settings.DATABASES if a not in dbscale_settings.primary_of]
        begun = time.monotonic()
        for alias in primaries:
            server = services.alias_server(alias).name
            progress(out, f"migrating {alias} ({services.alias_dbname(alias)} on {server})")
            call_command("migrate", database=alias, run_syncdb=True, verbosity=0, interactive=False)
        seconds = time.monotonic() - begun
        out(f"  migrated {len(primaries)} databases in {seconds:.1f} s: {', '.join(primaries)}")
        return (
            f"{len(primaries)} databases migrated on the primaries; the replicas got the schema "
            "by streaming"
        )

    def replication(self) -> str:
        out, services = self.out, self.services
        with consistency_context():
            self.article = Article.objects.create(title="Hello, replicas")
        begun = time.monotonic()
        services.pg1_replica.wait_for_replay()
        replayed = time.monotonic() - begun
        rows = services.pg1_replica.execute(
            "SELECT id, title FROM shop_article WHERE id = %s", (self.article.pk,), dbname="dbscale"
        )
        out(f"  direct SQL on pg1_replica {replayed:.2f} s later: {rows}")
        if rows != [(self.article.pk, "Hello, replicas")]:
            problem(out, f"pg1_replica returned {rows} for the row written on pg1")
        return f"a row written on pg1 was on pg1_replica {replayed:.2f} s later (direct SQL)"

    def status(self) -> str:
        replicas.monitor.refresh()
        call_command("dbscale", "status", stdout=_Lines(self.out))
        states = [replicas.monitor.status(alias) for alias in dbscale_settings.primary_of]
        eligible = sum(s.eligible for s in states)
        lag = max((s.lag_seconds or 0.0 for s in states), default=0.0)
        return f"{eligible} of {len(states)} replicas eligible for reads, largest lag {lag:.2f} s"

    def routing(self) -> str:
        out, pk = self.out, self.article.pk
        with consistency_context(), statement_log(out, settings.DATABASES) as ran:
            out("  a fresh request reads from the replica:")
            first = Article.objects.filter(pk=pk).first()
            out("  it writes; the write goes to the primary (which then gives its WAL position):")
            mark = len(ran)
            Article.objects.filter(pk=pk).update(views=1)
            wrote = ran[mark][0] if len(ran) > mark else "?"
            out("  and its next read must see that write (LSN checked, replica caught up?):")
            second = Article.objects.filter(pk=pk).first()
        read1 = first._state.db if first else "?"
        read2 = second._state.db if second else "?"
        return f"fresh read -> {read1}, write -> {wrote}, the writer's next read -> {read2}"

    def read_your_writes(self) -> str:
        out, services, pk = self.out, self.services, self.article.pk
        progress(out, "pausing pg1_replica's replay (the replica falls behind the primary)")
        services.pg1_replica.pause_replay()
        try:
            with consistency_context():
                Article.objects.filter(pk=pk).update(views=2)
                mine = Article.objects.get(pk=pk)
                token = consistency_token()
            out(f"  the writer reads views={mine.views} from {mine._state.db!r}")
            with consistency_context():
                other = Article.objects.get(pk=pk)
            out(
                f"  another user reads views={other.views} from {other._state.db!r} (within budget)"
            )
            with read_at_least(token):
                task = Article.objects.get(pk=pk)
            out(f"  a task given the token reads views={task.views} from {task._state.db!r}")
        finally:
            progress(out, "resuming replay; waiting for pg1_replica to catch up")
            services.pg1_replica.resume_replay()
            services.pg1_replica.wait_for_replay()
        if (mine.views, task.views) != (2, 2):
            problem(out, f"the writer read views={mine.views}, the task views={task.views}")
        return (
            f"replay paused: the writer and a task holding its token read views={task.views} "
            f"({task._state.db}); another user views={other.views} ({other._state.db})"
        )

    def failover(self) -> str:
        out, services, pk = self.out, self.services, self.article.pk
        stopped = services.pg1_replica.name
        on_server = [
            a for a in dbscale_settings.primary_of if services.alias_server(a).name == stopped
        ]
        why = f"{stopped} stopped on purpose"
        with expect("django_dbscale", rf"^Replica '({'|'.join(on_server)})'", why):
            progress(out, "stopping pg1_replica (PostgreSQL fast shutdown)")
            services.pg1_replica.stop()
            served, counted = 0, dict(replicas.route_counts)
            try:
                for _ in range(3):
                    with consistency_context():
                        got = Article.objects.filter(pk=pk).first()
                    served += got is not None
                error = replicas.monitor.status("default_replica").last_error
                moved = {
                    reason: replicas.route_counts[("default", reason)]
                    - counted.get(("default", reason), 0)
                    for reason in ("failover", "down")
                }
                out(
                    wrap(
                        f"{served} of 3 reads served without an error: {moved['failover']} sent "
                        f"to default_replica failed over to default, {moved['down']} sent to "
                        "default at once (replica marked down)"
                    )
                )
                out(wrap(f"replica marked down: {error}", "  ", "    "))
            finally:
                progress(out, "restarting pg1_replica")
                services.pg1_replica.start()
            services.pg1_replica.wait_for_replay()
            quarantine = dbscale_settings.replica_quarantine[0]
            progress(out, f"waiting for the replicas to be re-admitted (quarantine {quarantine} s)")

            def readmitted() -> bool:
                replicas.monitor.refresh(on_server)
                now = time.monotonic()
                return all(replicas.monitor.status(a).usable(now) for a in on_server)

            took = wait_for(out, "waiting for re-admission", readmitted, timeout=30)
            with consistency_context():
                back = Article.objects.filter(pk=pk).first()
        back_on = back._state.db if back else None
        if took is None:
            problem(out, f"{', '.join(on_server)} not re-admitted 30 s after the restart")
        out(f"  after restart the replica is re-admitted: read from {back_on!r}")
        if served != 3:
            problem(out, f"only {served} of 3 reads were served while the replica was down")
        return (
            f"pg1_replica stopped: {served} of 3 reads served from the primary, no error raised; "
            f"re-admitted {took or 0:.1f} s after its restart (read from {back_on})"
        )

    def reads_routed(self) -> str:
        counts = sorted(replicas.route_counts.items())
        for (alias, reason), count in counts:
            self.out(f"  {alias:<16} {reason:<18} {count}")
        by_reason = Counter[str]()
        for (_alias, reason), count in counts:
            by_reason[reason] += count
        shown = ", ".join(f"{reason} {n}" for reason, n in by_reason.most_common())
        return f"{sum(by_reason.values())} reads routed and counted by reason: {shown}"
