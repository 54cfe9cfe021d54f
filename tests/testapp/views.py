from __future__ import annotations

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse

from tests.testapp.models import Note


def create_note(request: HttpRequest) -> HttpResponse:
    note = Note.objects.create(title=request.POST.get("title", "untitled"))
    return JsonResponse({"id": note.pk})


def read_note(request: HttpRequest, pk: int) -> HttpResponse:
    note = Note.objects.filter(pk=pk).first()
    return JsonResponse(
        {"title": note.title if note else None, "db": note._state.db if note else None}
    )


async def async_create_then_read(request: HttpRequest) -> HttpResponse:
    note = await Note.objects.acreate(title=request.GET.get("title", "async"))
    again = await Note.objects.filter(pk=note.pk).afirst()
    return JsonResponse(
        {"title": again.title if again else None, "db": again._state.db if again else None}
    )


async def async_read(request: HttpRequest, pk: int) -> HttpResponse:
    note = await sync_to_async(Note.objects.filter(pk=pk).first)()
    return JsonResponse(
        {"title": note.title if note else None, "db": note._state.db if note else None}
    )
