"""Sphinx configuration for django_dbscale's docs (MyST markdown, furo theme)."""

from __future__ import annotations

project = "django_dbscale"
author = "django_dbscale founders"
extensions = ["myst_parser"]
myst_enable_extensions = ["deflist", "colon_fence"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown"}
html_theme = "furo"
exclude_patterns = ["_build"]
suppress_warnings = ["myst.header"]
