"""``manage.py dbscale advise`` names seq-scanned filtered columns and the index to add.

Against the harness's real primary: a table without an index on the column its queries
filter on is scanned sequentially, ``pg_stat_statements`` records the queries, and the
command must name exactly that table and column; once the advised index exists, it must
not. Where the server does not ship ``pg_stat_statements`` (pgserver's embedded
PostgreSQL 16) that test is skipped, but the one-line "how to enable it" message is not.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from django_dbscale.testing.harness import Services

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

TABLE = "advise_order"
EXTENSION = "pg_stat_statements"
ENABLE = (
    "To enable it, add shared_preload_libraries = 'pg_stat_statements' to postgresql.conf, "
    "restart PostgreSQL, then run CREATE EXTENSION pg_stat_statements; in that database."
)


def ships_stat_statements(services: Services) -> bool:
    """Return whether the server behind ``default`` ships and preloads the extension."""
    ((available, preload),) = services.pg1.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = %s), "
        "current_setting('shared_preload_libraries')",
        (EXTENSION,),
    )
    return bool(available) and EXTENSION in preload


@pytest.fixture
def order_table(services: Services) -> Iterator[str]:
    """Create ``advise_order`` (2,000 rows, only its primary key indexed) on ``default``."""
    if not ships_stat_statements(services):
        pytest.skip(
            f"this PostgreSQL ({services.pg1.execute('SHOW server_version')[0][0]}) does not "
            f"ship or preload {EXTENSION} (pgserver's embedded build lacks it)"
        )
    dbname = services.alias_dbname("default")
    with services.pg1.connect(dbname) as conn:
        conn.execute(f"CREATE EXTENSION IF NOT EXISTS {EXTENSION}")
        conn.execute(
            f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, customer_id int, status text)"
        )
        conn.execute(
            f"INSERT INTO {TABLE} (customer_id, status) "
            "SELECT i % 100, CASE WHEN i % 2 = 0 THEN 'open' ELSE 'paid' END "
            "FROM generate_series(1, 2000) AS i"
        )
        conn.execute("SELECT pg_stat_statements_reset()")
    try:
        yield dbname
    finally:
        services.pg1.execute(f"DROP TABLE IF EXISTS {TABLE}", dbname=dbname)


def table_stats(services: Services, dbname: str) -> tuple[int, int]:
    """Return (seq_scan, n_live_tup) of the table as the statistics system has them now."""
    rows = services.pg1.execute(
        "SELECT seq_scan, n_live_tup FROM pg_stat_user_tables WHERE relname = %s",
        (TABLE,),
        dbname=dbname,
    )
    return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)


def run_queries(services: Services, dbname: str) -> int:
    """Filter the table 60 times on customer_id, 10 on status, 20 on id; return seq scans."""
    with services.pg1.connect(dbname) as conn:
        for i in range(60):
            conn.execute(f"SELECT id FROM {TABLE} WHERE customer_id = %s", (i,)).fetchall()
        for status in ["open", "paid"] * 5:
            conn.execute(f"SELECT count(*) FROM {TABLE} WHERE status = %s", (status,)).fetchall()
        for i in range(1, 21):
            conn.execute(f"SELECT status FROM {TABLE} WHERE id = %s", (i,)).fetchall()
    # A backend reports its table statistics when it exits (or at most once a second).
    deadline = time.monotonic() + 15
    while (stats := table_stats(services, dbname)) < (70, 2000):
        assert time.monotonic() < deadline, f"statistics never arrived: {stats}"
        time.sleep(0.1)
    return stats[0]


def advise(*args: str) -> str:
    out = StringIO()
    call_command("dbscale", "advise", *args, stdout=out)
    return out.getvalue()


def advice_for(*args: str) -> list[dict[str, Any]]:
    return [a for a in json.loads(advise("--json", *args)) if a["table"] == TABLE]


def test_seq_scans_on_an_unindexed_filter_are_advised_until_indexed(
    services: Services, order_table: str
) -> None:
    seq_scans = run_queries(services, order_table)
    options = ("--database", "default", "--min-seq-scans", "50")

    found = advice_for(*options)

    assert [
        (a["alias"], a["column"], a["seq_scans"], a["live_rows"], a["calls"]) for a in found
    ] == [
        ("default", "customer_id", seq_scans, 2000, 60),
        ("default", "status", seq_scans, 2000, 10),
    ]
    assert found[0]["create_index"] == (
        "CREATE INDEX CONCURRENTLY advise_order_customer_id_idx ON advise_order (customer_id);"
    )
    assert found[0]["statements"] == [f"SELECT id FROM {TABLE} WHERE customer_id = $1"]
    assert found[1]["create_index"] == (
        "CREATE INDEX CONCURRENTLY advise_order_status_idx ON advise_order (status);"
    )
    text = advise(*options).splitlines()
    assert (
        f"{TABLE}: {seq_scans:,} seq scans filtering on customer_id (60 calls) \N{EM DASH} "
        "CREATE INDEX CONCURRENTLY advise_order_customer_id_idx ON advise_order (customer_id);"
    ) in text
    # Below the thresholds, nothing.
    assert advice_for("--database", "default", "--min-seq-scans", str(seq_scans + 1)) == []
    assert advice_for(*options, "--min-rows", "2001") == []

    # Run the advised statement itself; the column is then no longer advised.
    services.pg1.execute(found[0]["create_index"], dbname=order_table)
    assert [a["column"] for a in advice_for(*options)] == ["status"]


def test_without_the_extension_the_command_says_how_to_enable_it(services: Services) -> None:
    dbname = services.alias_dbname("shard0")
    if ships_stat_statements(services):
        services.pg1.execute(f"DROP EXTENSION IF EXISTS {EXTENSION}", dbname=dbname)
        what = "the extension is not created in this database"
    else:
        ((available,),) = services.pg1.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = %s)", (EXTENSION,)
        )
        what = (
            "the server does not preload it"
            if available
            else "this PostgreSQL install does not ship it (install its contrib package)"
        )

    with pytest.raises(CommandError) as caught:
        advise("--database", "shard0")

    assert str(caught.value) == (
        f"pg_stat_statements is not enabled for database alias 'shard0' (database "
        f"'{dbname}'): {what}. {ENABLE}"
    )


def test_an_unknown_alias_is_named() -> None:
    with pytest.raises(CommandError, match=r"--database 'nope': no such alias in DATABASES"):
        advise("--database", "nope")
