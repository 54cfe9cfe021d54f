"""The Prometheus collector reports real routing counters and replica measurements."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from django_dbscale import consistency_context, replicas
from django_dbscale.contrib.prometheus import DBScaleCollector
from django_dbscale.testing.harness import Services
from tests.testapp.models import Note

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")


def test_collector_exposes_routes_and_lag(services: Services) -> None:
    replicas.monitor.refresh()
    with consistency_context():
        list(Note.objects.all())
    registry = CollectorRegistry()
    registry.register(DBScaleCollector())
    text = generate_latest(registry).decode()
    assert 'dbscale_route_total{alias="default_replica",reason="replica"} 1.0' in text
    assert 'dbscale_replica_eligible{alias="default_replica"} 1.0' in text
    assert 'dbscale_replica_lag_bytes{alias="default_replica"}' in text
    with services.proxies["pg1_replica"].cut_off():
        replicas.monitor.refresh()
        text = generate_latest(registry).decode()
    assert 'dbscale_replica_eligible{alias="default_replica"} 0.0' in text
