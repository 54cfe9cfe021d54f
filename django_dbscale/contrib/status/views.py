"""The staff-only status page and its JSON endpoint.

Both views render :func:`~django_dbscale.management.subcommands.status.report` (what
``manage.py dbscale status`` prints), take a chart sample into
:data:`~django_dbscale.contrib.status.history.history`, and are for staff only: an
anonymous visitor is sent to the login page (the admin's when the admin's URLs are
installed, else ``LOGIN_URL``), a logged-in user who is not active staff gets 403. The JSON
endpoint answers 403 with a JSON body to both, since a script cannot follow a login form.

Templates are rendered by an engine of this package's own (its ``templates`` directory),
so the page works whatever the project's ``TEMPLATES`` setting holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from functools import wraps
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.shortcuts import resolve_url
from django.template import Context, Engine
from django.urls import NoReverseMatch, reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from django_dbscale.conf import dbscale_settings
from django_dbscale.contrib.status.charts import sparkline
from django_dbscale.contrib.status.history import history
from django_dbscale.management.subcommands import status

__all__ = ["DEFAULT_REFRESH", "MAX_REFRESH", "FRAGMENTS", "status_json", "status_page"]

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
_engine = Engine(dirs=[str(TEMPLATES_DIR)], autoescape=True)

#: Seconds between the page's refreshes unless ``?refresh=N`` says otherwise (0: never).
DEFAULT_REFRESH = 5
MAX_REFRESH = 300
#: Element id -> template of each section the page's script replaces on refresh.
FRAGMENTS = {
    "dbscale-replicas": "django_dbscale/status/_replicas.html",
    "dbscale-shards": "django_dbscale/status/_shards.html",
    "dbscale-cache": "django_dbscale/status/_cache.html",
    "dbscale-routes": "django_dbscale/status/_routes.html",
}

#: Cache counter labels that count no lookups: invalidated tables, per-database delivery
#: counters; the label ``redis`` (``generation_bump``: a restart or failover was detected)
#: is one too.
COUNTER_ONLY_PREFIXES = ("table:", "db:")

View = Callable[..., HttpResponseBase]


def _login_url() -> str:
    try:
        return reverse("admin:login")
    except NoReverseMatch:
        return str(resolve_url(settings.LOGIN_URL))


def _staff_only(*, json: bool) -> Callable[[View], View]:
    """Let active staff through, like ``staff_member_required``; see the module docstring."""

    def decorate(view: View) -> View:
        @wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            user = getattr(request, "user", None)
            if user is None:
                raise ImproperlyConfigured(
                    "django_dbscale.contrib.status needs request.user: add "
                    "'django.contrib.sessions.middleware.SessionMiddleware' and "
                    "'django.contrib.auth.middleware.AuthenticationMiddleware' to MIDDLEWARE."
                )
            if user.is_active and user.is_staff:
                return view(request, *args, **kwargs)
            if json:
                return JsonResponse(
                    {"error": "staff only: log in as an active staff user"}, status=403
                )
            if user.is_authenticated:
                return HttpResponse(
                    "403 Forbidden: the dbscale status page is for staff users only.",
                    status=403,
                    content_type="text/plain; charset=utf-8",
                )
            return redirect_to_login(request.get_full_path(), _login_url())

        return wrapped

    return decorate


def pillars() -> dict[str, bool]:
    """Return which of the three pillars this project configures."""
    return {
        "replicas": bool(dbscale_settings.replicas),
        "sharding": bool(dbscale_settings.shard_groups),
        "cache": status.cache_configured(),
    }


def hit_rate(events: Mapping[str, int]) -> float | None:
    """Return the percentage of lookups that hit (``None`` before the first lookup)."""
    hits, misses = int(events.get("hit", 0)), int(events.get("miss", 0))
    return None if hits + misses == 0 else round(100.0 * hits / (hits + misses), 2)


def snapshot() -> tuple[dict[str, Any], dict[str, Any]]:
    """Probe now, take a chart sample, and return ``(report, chart series)``."""
    report = status.report()
    history.record(report)
    return report, history.series()


def _context(report: dict[str, Any], series: dict[str, Any]) -> dict[str, Any]:
    """Shape the report for the templates (states, percentages, sparklines)."""
    start, end = series["since"], series["until"]
    budget = report["budget"]
    primaries = []
    for entry in report["primaries"]:
        rows = []
        for replica in entry["replicas"]:
            alias = replica["alias"]
            state = (
                "eligible"
                if replica["eligible"]
                else ("down" if not replica["healthy"] else "lagging")
            )
            rows.append(
                {
                    **replica,
                    "state": state,
                    "chart_seconds": sparkline(
                        series["replica_lag_seconds"].get(alias, []),
                        start=start,
                        end=end,
                        title=f"{alias} replay lag (seconds)",
                        threshold=budget["max_replica_lag"],
                    ),
                    "chart_bytes": sparkline(
                        series["replica_lag_bytes"].get(alias, []),
                        start=start,
                        end=end,
                        title=f"{alias} replay lag (bytes)",
                        threshold=budget["max_replica_lag_bytes"],
                    ),
                }
            )
        primaries.append({**entry, "replicas": rows})
    groups = []
    for group in report["shard_groups"]:
        nodes = [
            {**node, "share_percent": None if "share" not in node else 100.0 * node["share"]}
            for node in group.get("nodes", [])
        ]
        groups.append({**group, "nodes": nodes})
    rates = series["cache_hit_rate"]
    models, others = [], []
    for label, events in sorted(report["cache"].items()):
        if label.startswith(COUNTER_ONLY_PREFIXES) or label == "redis":
            counted = {event: n for event, n in sorted(events.items()) if n}
            others.append({"label": label, "counted": counted})
            continue
        models.append(
            {
                "label": label,
                "events": events,
                "hit_rate": hit_rate(events),
                "chart": sparkline(
                    rates.get(label, []),
                    start=start,
                    end=end,
                    ceiling=100.0,
                    title=f"{label} cache hit rate (%)",
                ),
            }
        )
    continuity = report["cache_continuity"]
    return {
        "pillars": pillars(),
        "budget": budget,
        "primaries": primaries,
        "groups": groups,
        "models": models,
        "others": others,
        "overall_chart": sparkline(
            rates.get("*", []),
            start=start,
            end=end,
            ceiling=100.0,
            title="cache hit rate, every model (%)",
        ),
        "outbox": sorted(continuity.get("outbox_rows", {}).items()),
        "untrusted": continuity.get("untrusted", []),
        "routes": sorted(report["routes"].items()),
        "series": series,
        "window_minutes": round(series["window_seconds"] / 60),
        "span_seconds": 0 if start is None else round(end - start),
    }


def _refresh_seconds(request: HttpRequest) -> int | HttpResponse:
    raw = request.GET.get("refresh")
    if raw is None:
        return DEFAULT_REFRESH
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_REFRESH:
        return HttpResponse(
            f"?refresh= must be a whole number of seconds from 0 (never) to {MAX_REFRESH}, "
            f"not {raw!r}.",
            status=400,
            content_type="text/plain; charset=utf-8",
        )
    return value


@never_cache
@require_GET
@_staff_only(json=False)
def status_page(request: HttpRequest) -> HttpResponse:
    """Render the status page; its script refreshes the sections from :func:`status_json`."""
    refresh = _refresh_seconds(request)
    if isinstance(refresh, HttpResponse):
        return refresh
    report, series = snapshot()
    context = _context(report, series)
    context.update(
        {
            "fragments": FRAGMENTS,
            "json_url": reverse(f"{request.resolver_match.namespace}:json")
            if request.resolver_match and request.resolver_match.namespace
            else "status.json",
            "refresh_ms": refresh * 1000,
            "generated_at": time.time(),
        }
    )
    html = _engine.get_template("django_dbscale/status/page.html").render(Context(context))
    return HttpResponse(html)


@never_cache
@require_GET
@_staff_only(json=True)
def status_json(request: HttpRequest) -> JsonResponse:
    """Return the report, hit rates and chart series as JSON.

    With ``?fragments=1`` also the page's sections rendered as HTML (``fragments``: element
    id -> markup), which the page's script swaps in.
    """
    report, series = snapshot()
    payload: dict[str, Any] = {
        "generated_at": time.time(),
        "pillars": pillars(),
        **report,
        "hit_rates": {label: hit_rate(events) for label, events in report["cache"].items()},
        "history": series,
    }
    if request.GET.get("fragments") == "1":
        context = Context(_context(report, series))
        payload["fragments"] = {
            element: _engine.get_template(name).render(context)
            for element, name in FRAGMENTS.items()
        }
    return JsonResponse(payload)
