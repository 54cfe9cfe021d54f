"""``{% cachedas %}``: a template fragment cached until the data it shows changes.

::

    {% load dbscale_cache %}
    {% cachedas 600 "author-books" books author request.LANGUAGE_CODE %}
      {% for book in books %}<li>{{ book.title }}</li>{% endfor %}
    {% endcachedas %}

Arguments: the timeout in seconds (or ``None`` for ``CACHE["TIMEOUT"]``), the fragment's
name, then any number of values. Querysets, model classes and model instances among them
are dependencies (the fragment is re-rendered after a write to what they read); every
other value varies the key, like ``{% cache %}``'s ``vary_on``. See
:mod:`django_dbscale.cache.fragments`.
"""

from __future__ import annotations

from django import template
from django.db.models import Model, QuerySet
from django.template.base import FilterExpression, NodeList, Parser, Token

register = template.Library()


class CachedAsNode(template.Node):
    def __init__(
        self, nodelist: NodeList, timeout: FilterExpression, name: FilterExpression,
        args: list[FilterExpression],
    ) -> None:  # fmt: skip
        self.nodelist = nodelist
        self.timeout = timeout
        self.name = name
        self.args = args

    def render(self, context: template.Context) -> str:
        from django_dbscale.cache import stats
        from django_dbscale.cache.fragments import read_through_dependencies, resolve_dependencies
        from django_dbscale.cache.keys import Unkeyable

        timeout = self.timeout.resolve(context)
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0
        ):
            raise template.TemplateSyntaxError(
                f"{{% cachedas %}}: the timeout must be a positive int (seconds) or None, "
                f"not {timeout!r}."
            )
        name = self.name.resolve(context)
        values = [arg.resolve(context) for arg in self.args]
        deps = [
            v for v in values
            if isinstance(v, QuerySet | Model) or (isinstance(v, type) and issubclass(v, Model))
        ]  # fmt: skip
        vary = [v for v in values if not any(v is d for d in deps)]
        label = f"fragment:{name}"
        try:
            resolved = resolve_dependencies(deps, f"{{% cachedas {name!r} %}}")
        except Unkeyable:
            stats.incr(label, "bypass")
            return self.nodelist.render(context)
        rendered: str = read_through_dependencies(
            label, resolved, (name, vary), lambda: str(self.nodelist.render(context)), timeout
        )
        return rendered


@register.tag("cachedas")
def do_cachedas(parser: Parser, token: Token) -> CachedAsNode:
    """Parse ``{% cachedas timeout name [value ...] %}...{% endcachedas %}``."""
    bits = token.split_contents()
    if len(bits) < 3:
        raise template.TemplateSyntaxError(
            f"{bits[0]!r} takes a timeout and a fragment name, then dependencies and values: "
            '{% cachedas 600 "sidebar" books %}.'
        )
    nodelist = parser.parse(("endcachedas",))
    parser.delete_first_token()
    return CachedAsNode(
        nodelist,
        parser.compile_filter(bits[1]),
        parser.compile_filter(bits[2]),
        [parser.compile_filter(bit) for bit in bits[3:]],
    )
