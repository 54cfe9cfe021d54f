"""The staff-only status page (``django_dbscale.contrib.status``) against real services.

The non-browser tests use Django's test client: who may see the page, what the JSON
endpoint reports compared with direct SQL and with cache traffic the test caused, and each
pillar alone. The browser test serves the app over real HTTP (Django's threaded WSGI server
in this process, so it shares the replica monitor and the chart history), logs a staff
user into headless Chromium through a session cookie, checks what the page shows, lets its
script refresh from the JSON endpoint, and saves ``docs/_static/status-page.png``.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ImproperlyConfigured
from django.test import Client, override_settings
from django.urls import include, path

from django_dbscale.consistency import parse_lsn
from django_dbscale.contrib.status.history import History, history
from django_dbscale.contrib.status.views import FRAGMENTS
from django_dbscale.testing.harness import Services
from tests.test_cache_support import cache_env  # noqa: F401 - a fixture
from tests.testapp.models import Note
from tests.testapp.models_cache import CAuthor

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "_static" / "status-page.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
NO_BROWSER = "chromium/chromedriver not installed: apt-get install chromium chromium-driver"

#: What a project adds to serve the page: sessions and auth middleware, and the URLs.
WEB = {
    "ROOT_URLCONF": "tests.urls_status",
    "MIDDLEWARE": [
        "django_dbscale.middleware.ConsistencyMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
    ],
    # No django_session table in the suite's databases: sessions live in the cookie.
    "SESSION_ENGINE": "django.contrib.sessions.backends.signed_cookies",
}
PAGE = "/dbscale/"
JSON = "/dbscale/status.json"
REPLICAS = ["default_replica", "shard0_replica", "shard1_replica", "shard2_replica"]


@pytest.fixture
def web() -> Iterator[None]:
    with override_settings(**WEB):
        history.clear()
        yield
    history.clear()


@pytest.fixture
def users(services: Services, web: None) -> dict[str, User]:
    """A staff user, a plain user and an inactive staff user, replayed on every replica."""
    made = {  # no passwords (hashing one costs 0.3 s): the tests log in with force_login
        "staff": User.objects.create_user("ops", is_staff=True),
        "member": User.objects.create_user("member"),
        "retired": User.objects.create_user("retired", is_staff=True),
    }
    made["retired"].is_active = False
    made["retired"].save()
    # Requests look users up through the router: on a replica, which must have them.
    services.pg1_replica.wait_for_replay()
    return made


def client_for(user: User | None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def report(client: Client) -> dict[str, Any]:
    response = client.get(JSON)
    assert response.status_code == 200, response.content
    data: dict[str, Any] = response.json()
    return data


def load_cache_scripts() -> None:
    """Load the cache's Lua scripts into Redis, so the first miss of a test is stored.

    The gateway loads every script at the first ``NOSCRIPT`` of a read, before the fill
    (sent without waiting) needs its own; loading them here keeps the counts these tests
    assert independent of that, and of whether an earlier test restarted Redis.
    """
    from django_dbscale.cache.client import gateway

    gateway().load_scripts()


def wait_for_next_sample(since: float) -> None:
    """Sleep until a new request may take a chart sample."""
    time.sleep(max(0.0, history.min_interval + 0.05 - (time.time() - since)))


# -- who may see it ------------------------------------------------------------------------


def test_anonymous_visitor_is_sent_to_the_admin_login(users: dict[str, User]) -> None:
    response = client_for(None).get(PAGE)
    assert response.status_code == 302
    assert response["Location"] == "/admin/login/?next=/dbscale/"
    response = client_for(None).get(JSON)
    assert response.status_code == 403
    assert response.json() == {"error": "staff only: log in as an active staff user"}
    assert history.samples() == []  # nothing was measured for them


def test_without_the_admin_anonymous_visitor_is_sent_to_login_url(
    users: dict[str, User],
) -> None:
    urlconf = types.ModuleType("status_urls_without_admin")
    urlconf.urlpatterns = [  # type: ignore[attr-defined]
        path("ops/", include("django_dbscale.contrib.status.urls")),
    ]
    with override_settings(ROOT_URLCONF=urlconf, LOGIN_URL="/accounts/login/"):
        response = client_for(None).get("/ops/?refresh=2")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/ops/%3Frefresh%3D2"


def test_logged_in_user_who_is_not_staff_gets_403(users: dict[str, User]) -> None:
    client = client_for(users["member"])
    page = client.get(PAGE)
    assert page.status_code == 403
    assert b"for staff users only" in page.content
    assert client.get(JSON).status_code == 403
    # An inactive staff user's session no longer authenticates: back to the login page.
    retired = client_for(users["retired"])
    assert retired.get(PAGE)["Location"] == "/admin/login/?next=/dbscale/"
    assert retired.get(JSON).status_code == 403
    assert client_for(users["staff"]).get(PAGE).status_code == 200


def test_a_project_without_auth_middleware_is_told_which_to_add(
    users: dict[str, User],
) -> None:
    with (
        override_settings(MIDDLEWARE=["django_dbscale.middleware.ConsistencyMiddleware"]),
        pytest.raises(ImproperlyConfigured, match="AuthenticationMiddleware"),
    ):
        Client().get(PAGE)


def test_refresh_parameter_is_validated(users: dict[str, User]) -> None:
    client = client_for(users["staff"])
    bad = client.get(PAGE + "?refresh=soon")
    assert bad.status_code == 400
    assert b"whole number of seconds from 0 (never) to 300, not 'soon'" in bad.content
    assert client.get(PAGE + "?refresh=301").status_code == 400
    assert b'data-refresh-ms="0"' in client.get(PAGE + "?refresh=0").content


# -- what it reports -----------------------------------------------------------------------


def test_json_reports_replica_lag_and_shard_map_as_the_databases_hold_them(
    services: Services, users: dict[str, User], paused: Any
) -> None:
    client = client_for(users["staff"])
    paused(services.pg1_replica)  # default_replica and shard0_replica stop replaying
    Note.objects.create(title="written while the replica is paused", body="x" * 2000)
    written = parse_lsn(services.pg1.execute("SELECT pg_current_wal_lsn()::text")[0][0])
    services.pg1.execute(
        "UPDATE dbscale_shard_map SET version = 7 WHERE \"group\" = 'tenants'",
        dbname=services.alias_dbname("default"),
    )
    try:
        data = report(client)
        current = parse_lsn(services.pg1.execute("SELECT pg_current_wal_lsn()::text")[0][0])
        replayed = parse_lsn(
            services.pg1_replica.execute("SELECT pg_last_wal_replay_lsn()::text")[0][0]
        )
        map_rows = services.pg1.execute(
            'SELECT "group", version FROM dbscale_shard_map',
            dbname=services.alias_dbname("default"),
        )
    finally:
        services.pg1.execute(
            "UPDATE dbscale_shard_map SET version = 1 WHERE \"group\" = 'tenants'",
            dbname=services.alias_dbname("default"),
        )
    assert data["pillars"] == {"replicas": True, "sharding": True, "cache": True}
    by_alias = {r["alias"]: r for p in data["primaries"] for r in p["replicas"]}
    assert sorted(by_alias) == REPLICAS
    paused_replica = by_alias["default_replica"]
    assert paused_replica["healthy"] is True
    assert parse_lsn(paused_replica["replay_lsn"]) == replayed
    # The probe read the primary's position after the write and before ours.
    assert 0 < written - replayed <= paused_replica["lag_bytes"] <= current - replayed
    # Versions exactly as in the shard map table on default (tenants bumped to 7).
    shown = {g["group"]: g["version"] for g in data["shard_groups"]}
    assert shown == {str(group): int(version) for group, version in map_rows}
    assert shown["tenants"] == 7
    from django_dbscale.sharding.ring import get_ring

    for group in data["shard_groups"]:
        ring = get_ring(group["group"])
        assert [n["alias"] for n in group["nodes"]] == list(ring.nodes)
        shares = {n["alias"]: n["share"] for n in group["nodes"]}
        assert shares == {a: round(ring.share_of(a), 4) for a in ring.nodes}  # type: ignore[attr-defined]
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert data["history"]["samples"] == 1
    assert [p[1] for p in data["history"]["replica_lag_bytes"]["default_replica"]] == [
        float(paused_replica["lag_bytes"])
    ]


@pytest.mark.usefixtures("cache_env")
def test_json_reports_cache_hit_rate_and_outbox_rows(
    services: Services, users: dict[str, User]
) -> None:
    from django_dbscale.cache import outbox

    client = client_for(users["staff"])
    load_cache_scripts()
    author = CAuthor.objects.create(name="status page")
    first = report(client)
    assert first["cache"].get("testapp.CAuthor", {}).get("hit", 0) == 0
    for _ in range(4):  # one miss fills, three hits
        assert CAuthor.objects.cache().get(pk=author.pk).name == "status page"
    with outbox.connect("default") as own:
        own.execute(f"INSERT INTO {outbox.TABLE} (keys) VALUES ('dbscale-test:v:nothing')")
    wait_for_next_sample(first["generated_at"])
    data = report(client)
    counts = data["cache"]["testapp.CAuthor"]
    assert (counts["hit"], counts["miss"]) == (3, 1), str(counts)
    assert data["hit_rates"]["testapp.CAuthor"] == 75.0
    # The chart: one interval between two samples, in which 3 of 4 lookups hit.
    assert data["history"]["samples"] == 2
    assert [p[1] for p in data["history"]["cache_hit_rate"]["testapp.CAuthor"]] == [75.0]
    assert [p[1] for p in data["history"]["cache_hit_rate"]["*"]] == [75.0]
    expected = {}
    for alias in data["cache_continuity"]["outbox_rows"]:
        with outbox.connect(alias) as own:
            (expected[alias],) = own.execute(f"SELECT count(*) FROM {outbox.TABLE}").fetchall()[0]
    assert data["cache_continuity"]["outbox_rows"] == expected
    assert expected["default"] == 1
    fragments = client.get(JSON + "?fragments=1").json()["fragments"]
    assert sorted(fragments) == sorted(FRAGMENTS)
    assert re.search(r'data-model="testapp.CAuthor">.*?75\.0%', fragments["dbscale-cache"], re.S)
    page = client.get(PAGE).content.decode()
    assert re.search(r'data-model="testapp.CAuthor">.*?75\.0%', page, re.S)
    assert re.search(r'data-outbox="default">.*?>1</td>', page, re.S)


def test_history_keeps_a_bounded_window_and_skips_counter_resets() -> None:
    kept = History(window=10.0, min_interval=1.0, max_samples=3)

    def sample(hits: int, misses: int, lag: float) -> dict[str, Any]:
        replica = {"alias": "r", "lag_seconds": lag, "lag_bytes": int(lag * 100)}
        return {
            "primaries": [{"replicas": [replica]}],
            "cache": {"m": {"hit": hits, "miss": misses}},
        }

    assert kept.record(sample(0, 0, 0.5), now=100.0)
    assert not kept.record(sample(9, 9, 9.0), now=100.5)  # within min_interval
    assert kept.record(sample(3, 1, 1.0), now=101.0)
    assert kept.record(sample(1, 0, 2.0), now=102.0)  # counters went down: reset
    assert kept.record(sample(2, 2, 3.0), now=103.0)  # maxlen drops the first
    series = kept.series()
    assert series["samples"] == 3
    assert series["replica_lag_seconds"]["r"] == [[101.0, 1.0], [102.0, 2.0], [103.0, 3.0]]
    assert series["cache_hit_rate"]["m"] == [[103.0, pytest.approx(100 / 3)]]
    assert kept.record(sample(2, 2, 4.0), now=120.0)  # the rest fall out of the window
    assert kept.series()["samples"] == 1


# -- each pillar alone ---------------------------------------------------------------------


PILLARS_ALONE = {
    "replicas": {"REPLICAS": {"default": ["default_replica"]}, "MAX_REPLICA_LAG": 2.0},
    "sharding": {
        "SHARD_GROUPS": {"customers": {"SHARDS": ["shard0", "shard1", "shard2"]}},
        "SHARD_MAP_CHECK_INTERVAL": 0.2,
    },
    "cache": {"CACHE": {"ALIAS": "dbscale", "PREFIX": "dbscale-test"}},
}


@pytest.mark.parametrize("pillar", sorted(PILLARS_ALONE))
def test_each_pillar_alone_shows_its_section_and_says_the_others_are_not_configured(
    services: Services, users: dict[str, User], pillar: str
) -> None:
    caches = dict(settings.CACHES)
    if pillar != "cache":
        del caches["dbscale"]  # a project without the cache has no Redis at all
    client = client_for(users["staff"])
    with override_settings(DBSCALE=PILLARS_ALONE[pillar], CACHES=caches):
        if pillar == "cache":
            data, page = report(client), client.get(PAGE)
        else:
            with services.proxies["redis"].cut_off():
                data, page = report(client), client.get(PAGE)
    assert page.status_code == 200
    html = page.content.decode()
    assert data["pillars"] == {name: name == pillar for name in PILLARS_ALONE}
    for name, text in (
        ("replicas", "Read/write splitting: not configured"),
        ("sharding", "Sharding: not configured"),
        ("cache", "Queryset cache: not configured"),
    ):
        assert (text in html) is (name != pillar), name
    if pillar == "replicas":
        assert [(p["primary"], [r["alias"] for r in p["replicas"]]) for p in data["primaries"]] == [
            ("default", ["default_replica"])
        ]
        assert 'data-replica="default_replica"' in html
    else:
        assert data["primaries"] == []
    if pillar == "sharding":
        assert [g["group"] for g in data["shard_groups"]] == ["customers"]
        assert 'data-shard="shard2"' in html
    else:
        assert data["shard_groups"] == []
    if pillar == "cache":
        assert set(data["cache_continuity"]["outbox_rows"]) >= {"default", "shard0"}
        assert "Outbox: invalidations not yet delivered" in html
    else:
        assert data["cache"] == {} and data["cache_continuity"] == {}


# -- in a real browser ---------------------------------------------------------------------


@pytest.fixture
def live_url(web: None) -> Iterator[str]:
    """Serve the project over HTTP from a thread of this process; yield its base URL."""
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
    from django.core.wsgi import get_wsgi_application

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadedWSGIServer(("127.0.0.1", 0), Quiet, allow_reuse_address=False)
    server.set_app(get_wsgi_application())  # middleware as overridden by ``web``
    thread = threading.Thread(target=server.serve_forever, name="status-page-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(NO_BROWSER)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1360,1000",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def polyline_points(element: Any) -> list[tuple[float, float]]:
    """Return the ``(x, y)`` points of the sparkline inside *element*."""
    (line,) = element.find_elements("css selector", "svg polyline")
    raw = line.get_attribute("points") or ""
    return [(float(x), float(y)) for x, y in (pair.split(",") for pair in raw.split())]


@pytest.mark.usefixtures("cache_env")
def test_staff_user_sees_live_status_in_chromium(
    browser: Any, services: Services, users: dict[str, User], live_url: str, paused: Any
) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    load_cache_scripts()
    author = CAuthor.objects.create(name="in the browser")
    # Log in: the signed-cookie session the test client made for the staff user.
    cookie = client_for(users["staff"]).cookies[settings.SESSION_COOKIE_NAME].value
    browser.get(f"{live_url}/dbscale/status.json")  # a page of the domain, to set its cookie
    browser.add_cookie({"name": settings.SESSION_COOKIE_NAME, "value": cookie, "path": "/"})
    browser.get(f"{live_url}{PAGE}?refresh=0")  # the first chart sample
    assert browser.title == "dbscale status"
    first_sample = history.samples()[0].at

    for _ in range(4):  # one miss, three hits
        assert CAuthor.objects.cache().get(pk=author.pk).name == "in the browser"
    paused(services.pg1_replica)
    Note.objects.create(title="lagging", body="y" * 4000)
    written = parse_lsn(services.pg1.execute("SELECT pg_current_wal_lsn()::text")[0][0])
    db = services.alias_dbname("default")
    services.pg1.execute(
        "UPDATE dbscale_shard_map SET version = 3 WHERE \"group\" = 'customers'", dbname=db
    )
    try:
        wait_for_next_sample(first_sample)
        browser.get(f"{live_url}{PAGE}?refresh=0")  # the second sample
        current = parse_lsn(services.pg1.execute("SELECT pg_current_wal_lsn()::text")[0][0])
        replayed = parse_lsn(
            services.pg1_replica.execute("SELECT pg_last_wal_replay_lsn()::text")[0][0]
        )
        versions = dict(
            services.pg1.execute('SELECT "group", version FROM dbscale_shard_map', dbname=db)
        )

        find = browser.find_element
        rows = browser.find_elements("css selector", "tr[data-replica]")
        assert [r.get_attribute("data-replica") for r in rows] == REPLICAS
        assert [r.find_element("css selector", ".alias").text for r in rows] == REPLICAS
        lagging = find("css selector", 'tr[data-replica="default_replica"]')
        shown_bytes = int(lagging.find_element("css selector", ".lag-bytes").text)
        assert written - replayed <= shown_bytes <= current - replayed
        assert written > replayed
        shown_lsn = lagging.find_element("css selector", ".replay-lsn").text
        assert parse_lsn(shown_lsn) == replayed
        float(lagging.find_element("css selector", ".lag-seconds").text)  # a figure, not "–"
        # Two samples: two points in each lag chart, inside the SVG's box.
        for row in rows:
            points = polyline_points(row.find_element("css selector", ".chart-lag-bytes"))
            assert len(points) == 2
            assert all(0 <= x <= 240 and 0 <= y <= 40 for x, y in points)
        assert versions["customers"] == 3
        for group, version in versions.items():
            cell = find("css selector", f'tr[data-group="{group}"] .ring-version')
            assert cell.text.splitlines()[0] == f"v{version}"
        from django_dbscale.sharding.ring import get_ring

        ring = get_ring("customers")
        for alias in ring.nodes:
            share = find("css selector", f'tr[data-group="customers"][data-shard="{alias}"] .share')
            assert share.text == f"{100 * round(ring.share_of(alias), 4):.1f}%"  # type: ignore[attr-defined]
        model = find("css selector", 'tr[data-model="testapp.CAuthor"]')
        assert model.find_element("css selector", ".hit-rate").text == "75.0%"
        assert model.find_element("css selector", ".hits").text == "3"
        assert model.find_element("css selector", ".misses").text == "1"
        (rate_point,) = polyline_points(model.find_element("css selector", ".chart-hit-rate"))
        assert rate_point[1] == pytest.approx(3 + 34 * 0.25, abs=0.1)  # 75% of the height

        # The script: refreshes the sections from the JSON endpoint every second.
        browser.get(f"{live_url}{PAGE}?refresh=1")
        WebDriverWait(browser, 10, poll_frequency=0.1).until(
            lambda b: "updated" in b.find_element("css selector", "#dbscale-state").text
        )
        assert "(3 samples)" in find("css selector", "#dbscale-state").text
        lag_chart = find("css selector", 'tr[data-replica="default_replica"] .chart-lag-bytes')
        assert len(polyline_points(lag_chart)) == 3
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.execute_cdp_cmd(  # the whole page in one viewport
            "Emulation.setDeviceMetricsOverride",
            {"width": 1360, "height": int(height), "deviceScaleFactor": 1, "mobile": False},
        )
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert browser.get_screenshot_as_file(str(SCREENSHOT))
    finally:
        services.pg1.execute(
            "UPDATE dbscale_shard_map SET version = 1 WHERE \"group\" = 'customers'", dbname=db
        )
