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
``read_routed``
    A read was routed: sent once per routing decision, from the one place reads are
    counted (:func:`django_dbscale.consistency.count_route`), in the thread that routes it
    (a fan-out worker's own thread for its shard). ``sender`` is ``None``; arguments:
    ``alias`` (the database the read goes to) and ``reason`` (why: ``"replica"``,
    ``"read_your_writes"``, ``"lagging"``, ... as in ``dbscale_route_total``). Sent only
    when a receiver is connected; the debug-toolbar panel uses it.
"""

from __future__ import annotations

from django.dispatch import Signal

replica_quarantined = Signal()
replica_readmitted = Signal()
read_failed_over = Signal()
read_routed = Signal()
