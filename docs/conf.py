"""Sphinx configuration for django_dbscale's docs (MyST markdown, furo theme)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The API reference is built from the docstrings (autodoc), which imports the package and
# so needs Django set up: the service-free test settings are enough.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings_static")
import django

django.setup()

project = "django_dbscale"
author = "django_dbscale founders"
extensions = ["myst_parser", "sphinx.ext.autodoc"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
myst_enable_extensions = ["deflist", "colon_fence"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown"}
html_theme = "furo"
exclude_patterns = ["_build"]
suppress_warnings = ["myst.header"]
