"""Models of the queryset cache tests (imported by ``tests.testapp.models``).

Names start with ``C`` so they never collide with the other pillars' test models.
"""

from __future__ import annotations

from django.db import models

from django_dbscale.cache import CachedManager, CachedModel

__all__ = [
    "CAuthor",
    "CBook",
    "CClub",
    "CCounter",
    "CMembership",
    "CPerson",
    "CPlace",
    "CPublisher",
    "CRestaurant",
    "CReview",
    "CShelf",
    "CTag",
]


class CShelf(models.Model):
    """A plain model (no cache manager) that cached queries join."""

    label = models.CharField(max_length=50)

    class Meta:
        app_label = "testapp"

    def __str__(self) -> str:
        return self.label


class CAuthor(CachedModel):
    name = models.CharField(max_length=100)

    class Meta:
        app_label = "testapp"
        ordering = ["id"]


class CPublisher(CachedModel):
    name = models.CharField(max_length=100)

    class Meta:
        app_label = "testapp"


class CTag(CachedModel):
    name = models.CharField(max_length=50)

    class Meta:
        app_label = "testapp"
        ordering = ["name"]


class CBook(CachedModel):
    """Invalidation dimension: the author."""

    cache_dimensions = ("author",)

    title = models.CharField(max_length=100)
    price = models.IntegerField(default=0)
    author = models.ForeignKey(CAuthor, null=True, on_delete=models.SET_NULL, related_name="books")
    publisher = models.ForeignKey(
        CPublisher, null=True, blank=True, on_delete=models.CASCADE, related_name="books"
    )
    shelf = models.ForeignKey(CShelf, null=True, blank=True, on_delete=models.SET_NULL)
    tags = models.ManyToManyField(CTag, related_name="books", blank=True)

    class Meta:
        app_label = "testapp"
        ordering = ["id"]


class CReview(CachedModel):
    book = models.ForeignKey(CBook, on_delete=models.CASCADE, related_name="reviews")
    stars = models.IntegerField(default=3)

    class Meta:
        app_label = "testapp"


class CPerson(CachedModel):
    name = models.CharField(max_length=50)

    class Meta:
        app_label = "testapp"


class CClub(CachedModel):
    name = models.CharField(max_length=50)
    members = models.ManyToManyField(CPerson, through="CMembership", related_name="clubs")

    class Meta:
        app_label = "testapp"


class CMembership(models.Model):
    person = models.ForeignKey(CPerson, on_delete=models.CASCADE)
    club = models.ForeignKey(CClub, on_delete=models.CASCADE)
    role = models.CharField(max_length=20, default="member")

    objects = CachedManager()

    class Meta:
        app_label = "testapp"

    def __str__(self) -> str:
        return f"{self.person_id} in {self.club_id}"


class CPlace(CachedModel):
    name = models.CharField(max_length=50)

    class Meta:
        app_label = "testapp"


class CRestaurant(CPlace):
    """Multi-table inheritance: a child table joined to ``CPlace``'s."""

    serves_pizza = models.BooleanField(default=False)

    class Meta:
        app_label = "testapp"


class CCounter(CachedModel):
    name = models.CharField(max_length=50, unique=True)
    value = models.IntegerField(default=0)

    class Meta:
        app_label = "testapp"


class CEvent(CachedModel):
    """A timestamp: ``__date`` lookups compile ``AT TIME ZONE`` the active zone."""

    at = models.DateTimeField()

    class Meta:
        app_label = "testapp"


class CStore(CachedModel):
    """A multi-table parent with a dimension of its own table."""

    city = models.CharField(max_length=50)

    cache_dimensions = ("city",)

    class Meta:
        app_label = "testapp"


class CKiosk(CStore):
    """Its multi-table child: does not inherit the parent's dimensions."""

    open_late = models.BooleanField(default=False)

    class Meta:
        app_label = "testapp"
