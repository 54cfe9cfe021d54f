"""The soak under faults: HTTP load through gunicorn while the harness breaks services.

``python3 noxfile.py -s soak -- --duration 60`` (or ``python -m soak --duration 60`` in the
project's environment) boots the harness's services, serves this package's Django app
(``soak.settings``: replicas, shards and the queryset cache, wired like ``testproject``)
with gunicorn, drives it with simulated users and a background worker, injects a fault
schedule, then runs :mod:`soak.checker` over the logs and the databases. See
``docs/reliability.md``.

It lives at the repository root, beside ``bench/``, rather than inside ``testproject/``:
it is a tool with its own Django app (a sharded and a cached model, their views) and its
own settings, which must point at the runner's fault-injecting proxies, and ``testproject``'s
settings boot or attach their own proxies at import.
"""
