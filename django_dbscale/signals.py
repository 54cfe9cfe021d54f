"""Public signals of django_dbscale.

Connect receivers for alerting or logging; they run synchronously in the thread where the
event happened (often the background prober), so keep them quick and never raise.

``replica_quarantined``
    A replica was taken out of rotation. Arguments: ``alias``, ``reason`` (str),
    ``backoff`` (seconds until it is probed again), ``failures`` (consecutive count).
``replica_readmitted``
    A quarantined or failed replica answered a probe again. Arguments: ``alias``.
``read_failed_over``
    A read broke on a replica and was re-run on its primary. Arguments: ``alias`` (the
    replica), ``primary``.
"""

from __future__ import annotations

from django.dispatch import Signal

replica_quarantined = Signal()
replica_readmitted = Signal()
read_failed_over = Signal()
