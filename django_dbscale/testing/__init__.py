"""Real-services test harness for django_dbscale.

:mod:`django_dbscale.testing.harness` boots throwaway PostgreSQL primaries with streaming
replicas and a Redis server (or attaches to external ones), and
:mod:`django_dbscale.testing.proxy` puts fault-injecting TCP proxies in front of them.
Run ``python -m django_dbscale.testing up`` to keep a set of services running for a shell.

Nothing is imported here eagerly, so importing the package costs nothing.
"""

from __future__ import annotations
