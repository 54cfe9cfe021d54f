"""Write tracking for primaries that do not use the dbscale backend.

A primary on another ENGINE (another vendor, or a proxy or pooler without WAL positions)
cannot report LSNs, but ``READ_YOUR_WRITES = "time"`` still needs to know when a context
wrote. :func:`track_writes` installs a Django ``execute_wrapper`` on such connections when
they are created (``connection_created``); it records the time of every write statement,
so reads of that primary go to the primary for ``STICKY_SECONDS`` after it. The window
starts at the statement, not at COMMIT: a transaction longer than ``STICKY_SECONDS``
should raise the setting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper

from django_dbscale import consistency
from django_dbscale.backends.statements import is_write
from django_dbscale.conf import dbscale_settings

_INSTALLED = "_dbscale_write_tracking"


def track_writes(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    """Receiver of ``connection_created``: track writes on a foreign-ENGINE primary."""
    from django_dbscale.backends.postgresql.base import DatabaseWrapper

    if isinstance(connection, DatabaseWrapper) or getattr(connection, _INSTALLED, False):
        return
    if connection.alias not in dbscale_settings.replicas:
        return  # only primaries with replicas route reads anywhere else
    alias = connection.alias

    def wrapper(
        execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any
    ) -> Any:
        result = execute(sql, params, many, context)
        if is_write(sql):
            consistency.record_write(alias, has_lsn=False)
        return result

    connection.execute_wrappers.append(wrapper)
    setattr(connection, _INSTALLED, True)
