"""A staff-only status page: what ``manage.py dbscale status`` knows, in a browser.

Include it in the project's URLconf (it needs ``SessionMiddleware`` and
``AuthenticationMiddleware``, like the admin)::

    path("dbscale/", include("django_dbscale.contrib.status.urls"))

The page (``dbscale_status:page``) shows primaries and replicas with health and lag, shard
groups with their ring version and key shares, the queryset cache's hit rate per model and
its outbox, and sparklines of replica lag and cache hit rate over the last minutes, drawn as
inline SVG on the server. A few lines of script refresh the sections every few seconds from
the JSON endpoint (``dbscale_status:json``). Samples for the charts live in the serving
process (:mod:`django_dbscale.contrib.status.history`). See ``docs/observability.md``.
"""

from __future__ import annotations
