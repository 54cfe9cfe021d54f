from __future__ import annotations


class NeverConsulted:
    """A router that ReplicaRouter shadows (for the W002 check test)."""


class Recording:
    """A router listed first that answers nothing and records every read it is asked about."""

    reads: list[tuple[str, dict[str, object]]] = []

    def db_for_read(self, model: type, **hints: object) -> None:
        self.reads.append((model._meta.label, dict(hints)))  # type: ignore[attr-defined]
        return None
