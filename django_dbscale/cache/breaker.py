"""A circuit breaker in front of Redis, so a dead Redis costs no per-request timeout.

Closed (the normal state), every cache operation goes to Redis. After ``failures``
consecutive errors (refused connections, resets, socket timeouts) it *opens*: for
``cooldown`` seconds no operation is attempted and every cached read goes straight to the
database. Then one caller is let through as a *probe* (half-open); its success closes the
breaker, its failure opens it for another ``cooldown``. Everyone else keeps bypassing Redis
while the probe is in flight, so a slow Redis delays one request per cooldown, not all.

The breaker is process-wide state by nature (Redis is as dead for one request as for the
next), guarded by a lock; the closed path takes no lock.
"""

from __future__ import annotations

import threading
import time

__all__ = ["CircuitBreaker"]


class CircuitBreaker:
    """Count consecutive failures; refuse calls for a while once there are too many."""

    def __init__(self, failures: int, cooldown: float) -> None:
        if failures < 1 or cooldown <= 0:
            raise ValueError(
                f"CircuitBreaker(failures={failures!r}, cooldown={cooldown!r}): use "
                "failures >= 1 and cooldown > 0."
            )
        self.failures = failures
        self.cooldown = cooldown
        self._lock = threading.Lock()
        self._consecutive = 0
        # 0.0 while closed; else the monotonic time until which calls are refused.
        self._open_until = 0.0
        self._probing = False
        self.opened_count = 0

    @property
    def state(self) -> str:
        """Return ``"closed"``, ``"open"`` or ``"half-open"``."""
        if self._open_until == 0.0:
            return "closed"
        if self._probing or time.monotonic() >= self._open_until:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        """Return whether the caller may talk to Redis now (a probe counts as allowed)."""
        if self._open_until == 0.0:
            return True
        with self._lock:
            if self._open_until == 0.0:
                return True
            if self._probing or time.monotonic() < self._open_until:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        """Record a successful operation: close the breaker."""
        if self._consecutive or self._open_until:
            with self._lock:
                self._consecutive = 0
                self._open_until = 0.0
                self._probing = False

    def failure(self) -> None:
        """Record a failed operation; open the breaker if there were too many in a row."""
        with self._lock:
            self._consecutive += 1
            if self._probing or self._consecutive >= self.failures:
                if not self._probing:
                    self.opened_count += 1
                self._open_until = time.monotonic() + self.cooldown
                self._probing = False

    def reset(self) -> None:
        """Close the breaker and forget past failures."""
        with self._lock:
            self._consecutive = 0
            self._open_until = 0.0
            self._probing = False
