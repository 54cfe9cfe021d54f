"""Sparklines as inline SVG, drawn on the server: no JavaScript library, no CDN."""

from __future__ import annotations

from collections.abc import Sequence

from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

__all__ = ["sparkline"]

WIDTH = 240
HEIGHT = 40
PAD = 3.0


def sparkline(
    points: Sequence[Sequence[float]],
    *,
    start: float | None,
    end: float | None,
    title: str,
    ceiling: float | None = None,
    threshold: float | None = None,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> SafeString:
    """Return an ``<svg>`` drawing *points* (``[x, y]`` pairs, x ascending) as a line.

    x spans ``start``..``end`` (the history's first and last sample, so every chart on a
    page shares one time axis); y spans 0..*ceiling* (default: the largest value, so a
    small lag still shows its shape). *threshold* (a budget) is drawn dashed when it falls
    inside the scale. The newest point gets a dot, so a single point is visible too.
    """
    label = format_html("<title>{}</title>", title)
    head = format_html(
        '<svg class="spark" xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" '
        'viewBox="0 0 {} {}" role="img" aria-label="{}" data-points="{}">',
        width,
        height,
        width,
        height,
        title,
        len(points),
    )
    baseline = format_html(
        '<line class="base" x1="0" y1="{}" x2="{}" y2="{}"/>',
        f"{height - PAD:.1f}",
        width,
        f"{height - PAD:.1f}",
    )
    if not points or start is None or end is None:
        empty = format_html(
            '<text x="4" y="{}" class="empty">no samples yet</text>', f"{height / 2 + 4:.0f}"
        )
        return mark_safe(head + label + baseline + empty + "</svg>")  # every part is escaped
    top = ceiling if ceiling is not None else max(p[1] for p in points)
    if top <= 0:
        top = 1.0
    span = end - start

    def x_of(x: float) -> float:
        return width - PAD if span <= 0 else PAD + (width - 2 * PAD) * (x - start) / span

    def y_of(y: float) -> float:
        return height - PAD - (height - 2 * PAD) * min(max(y, 0.0), top) / top

    coords = " ".join(f"{x_of(p[0]):.1f},{y_of(p[1]):.1f}" for p in points)
    parts = [head, label, baseline]
    if threshold is not None and 0 < threshold <= top:
        parts.append(
            format_html(
                '<line class="budget" x1="0" y1="{0}" x2="{1}" y2="{0}"/>',
                f"{y_of(threshold):.1f}",
                width,
            )
        )
    parts.append(format_html('<polyline fill="none" points="{}"/>', coords))
    last = points[-1]
    parts.append(
        format_html(
            '<circle cx="{}" cy="{}" r="2.5"/>', f"{x_of(last[0]):.1f}", f"{y_of(last[1]):.1f}"
        )
    )
    return mark_safe("".join(parts) + "</svg>")  # every part is escaped
