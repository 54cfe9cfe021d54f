"""SQL compilers of the dbscale backend (placeholder until the cache pillar fills it in)."""

from __future__ import annotations

from django.db.models.sql.compiler import (  # noqa: F401
    SQLAggregateCompiler,
    SQLCompiler,
    SQLDeleteCompiler,
    SQLInsertCompiler,
    SQLUpdateCompiler,
)
