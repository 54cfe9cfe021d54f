"""A half-configured cache: DBSCALE["CACHE"] without its CACHES alias."""

from __future__ import annotations

from tests.startup._base import *  # noqa: F403
from tests.startup._base import SERVERS

DATABASES = {"default": SERVERS["default"]}
DBSCALE = {"CACHE": {"MODELS": ["auth.Group"]}}
