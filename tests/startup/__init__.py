"""Projects started the way a real one starts: settings, ``django.setup()``, ``migrate``.

Each ``settings_*`` module is one pillar alone, as the README shows it; :mod:`probe` runs in
a subprocess against the suite's servers (``Services.env()``) and reports what happened.
"""
