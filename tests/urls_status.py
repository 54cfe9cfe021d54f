"""URLconf of tests/test_status_page.py: the status page as a project includes it, plus the
admin's login URL (``admin:login``, where the page sends anonymous visitors), from a site
of its own since the suite does not install ``django.contrib.admin``."""

from __future__ import annotations

from django.contrib.admin.sites import AdminSite
from django.urls import include, path

urlpatterns = [
    path("admin/", AdminSite().urls),
    path("dbscale/", include("django_dbscale.contrib.status.urls")),
]
