"""URLs of the debug-toolbar panel tests: the toolbar's own views and two tour views.

``/tour/`` reads from the replica, fills and hits the queryset cache, writes and reads its
own write, follows a foreign key row by row (N+1) and bypasses the cache in a transaction.
``/shards/`` reads one customer by its shard key and all of them by a fan-out.
"""

from __future__ import annotations

from debug_toolbar.toolbar import debug_toolbar_urls
from django.db import transaction
from django.db.models import F
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path

from tests.testapp.models import Note
from tests.testapp.models_cache import CBook, CCounter
from tests.testapp.models_sharding import ShardCustomer


def always(request: HttpRequest) -> bool:
    """``SHOW_TOOLBAR_CALLBACK``: show the toolbar for every test request."""
    return True


def tour(request: HttpRequest) -> HttpResponse:
    counter_pk = int(request.GET["counter"])
    seeded = list(Note.objects.filter(title__startswith="seed").order_by("id"))
    first = CCounter.objects.cache().get(pk=counter_pk)  # a miss: filled and stored
    again = CCounter.objects.cache().get(pk=counter_pk)  # a hit: no SQL
    mine = Note.objects.create(title="mine")
    own = Note.objects.get(pk=mine.pk)  # read-your-writes: the primary
    authors = [book.author.name for book in CBook.objects.order_by("id")]  # N+1
    with transaction.atomic():
        CCounter.objects.filter(pk=counter_pk).update(value=F("value") + 1)
        bumped = CCounter.objects.cache().get(pk=counter_pk)  # a bypass: written here
    return JsonResponse(
        {
            "seeded": [(n.title, n._state.db) for n in seeded],
            "counter": [first.value, again.value, bumped.value],
            "own": [own.pk == mine.pk, own._state.db],
            "authors": authors,
        }
    )


def shards(request: HttpRequest) -> HttpResponse:
    one = ShardCustomer.objects.get(id=int(request.GET["id"]))
    everyone = sorted(ShardCustomer.objects.all_shards().values_list("name", flat=True))
    return JsonResponse({"one": [one.name, one._state.db], "all": everyone})


urlpatterns = [
    path("tour/", tour),
    path("shards/", shards),
    *debug_toolbar_urls(),
]
