from __future__ import annotations


class NeverConsulted:
    """A router that ReplicaRouter shadows (for the W002 check test)."""
