"""URLs of the soak's app."""

from __future__ import annotations

from django.urls import path

from soak import views

urlpatterns = [
    path("soak/health", views.health),
    path("soak/write", views.write),
    path("soak/read", views.read),
]
