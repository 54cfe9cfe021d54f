from __future__ import annotations

from django.urls import path

from tests.testapp import views

urlpatterns = [
    path("notes/", views.create_note),
    path("notes/<int:pk>/", views.read_note),
    path("async/notes/", views.async_create_then_read),
    path("async/notes/<int:pk>/", views.async_read),
]
