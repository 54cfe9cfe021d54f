"""Shared benchmark plumbing: Django setup on harness services, paired interleaved timing."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any


def setup_django(settings_module: str = "tests.settings") -> None:
    """Boot services (through the settings), set Django up and migrate every primary."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", settings_module)
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from django_dbscale.conf import dbscale_settings

    for alias in settings.DATABASES:
        if alias not in dbscale_settings.primary_of:
            call_command("migrate", database=alias, run_syncdb=True, verbosity=0, interactive=False)


def per_call(fn: Callable[[], Any], n: int) -> float:
    """Return the mean seconds per call of *fn* over *n* calls."""
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def paired(
    a: Callable[[], Any], b: Callable[[], Any], *, blocks: int, per_block: int
) -> dict[str, float]:
    """Time *a* and *b* in alternating blocks (A B A B ...) and pair them.

    Returns the medians of A and B per call, the median of the paired differences
    (B - A) and the median of the paired ratios B / A, all robust to the machine's drift
    since each pair is measured back to back.
    """
    a_times, b_times = [], []
    for i in range(blocks):
        if i % 2 == 0:
            ta = per_call(a, per_block)
            tb = per_call(b, per_block)
        else:
            tb = per_call(b, per_block)
            ta = per_call(a, per_block)
        a_times.append(ta)
        b_times.append(tb)
    diffs = [tb - ta for ta, tb in zip(a_times, b_times, strict=True)]
    ratios = [tb / ta for ta, tb in zip(a_times, b_times, strict=True)]
    return {
        "a": statistics.median(a_times),
        "b": statistics.median(b_times),
        "diff": statistics.median(diffs),
        "ratio": statistics.median(ratios),
    }


def us(seconds: float) -> str:
    return f"{seconds * 1e6:8.2f} µs"
