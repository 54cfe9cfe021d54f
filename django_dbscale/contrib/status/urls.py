"""URLs of the status page: ``path("dbscale/", include("django_dbscale.contrib.status.urls"))``.

Names (namespace ``dbscale_status``): ``page`` (the HTML page) and ``json`` (the report and
chart series; ``?fragments=1`` adds the page's sections as HTML).
"""

from __future__ import annotations

from django.urls import path

from django_dbscale.contrib.status import views

app_name = "dbscale_status"

urlpatterns = [
    path("", views.status_page, name="page"),
    path("status.json", views.status_json, name="json"),
]
