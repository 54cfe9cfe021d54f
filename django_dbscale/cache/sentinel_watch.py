"""Hear Redis Sentinel's ``+switch-master`` and drop the old master at once.

After a failover the sentinels name a new master at once, but the old one stays a
writable master until they demote it, seconds later. A process that keeps its idle
connections to the old master meanwhile reads entries there that other processes (already
on the new master) invalidate on the new one: stale hits, for as long as the demotion
takes (the soak measured 1 to 10 s). So, when the cache's alias uses Sentinel, the gateway
owns one :class:`SentinelWatch` thread subscribed to ``+switch-master`` on the sentinels;
on a switch of its service it calls the gateway's ``connections_lost()``: every connection
is dropped, nothing is served until the new master is verified, and verifying a server
other than the last one verified invalidates every entry
(:mod:`~django_dbscale.cache.continuity`). The window shrinks to the time the sentinels
take to publish the switch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

__all__ = ["SentinelWatch"]

logger = logging.getLogger("django_dbscale.cache")

#: Seconds between attempts to (re)subscribe when no sentinel answers.
RETRY = 1.0


class SentinelWatch:
    """One daemon thread listening to the sentinels for a master switch of one service."""

    def __init__(self, sentinels: list[Any], service_name: str, on_switch: Callable[[], None]):
        self.sentinels = sentinels  # redis.Redis clients of the sentinels
        self.service_name = service_name
        self.on_switch = on_switch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start listening (once)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name="dbscale-cache-sentinel", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening; the thread ends within about a second."""
        self._stop.set()

    def forget_after_fork(self) -> None:
        """In a child process: the thread does not exist there; never use its sockets."""
        self._thread = None
        self._stop.set()

    def _run(self) -> None:
        index = 0
        while not self._stop.is_set():
            sentinel = self.sentinels[index % len(self.sentinels)]
            index += 1
            try:
                self._listen(sentinel)
            except (RedisError, OSError) as exc:
                logger.debug("Listening to sentinel %r failed: %s", sentinel, exc)
                self._stop.wait(RETRY)

    def _listen(self, sentinel: Any) -> None:
        pubsub = sentinel.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe("+switch-master")
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                data = message.get("data")
                text = data.decode() if isinstance(data, bytes) else str(data)
                # "<name> <old-ip> <old-port> <new-ip> <new-port>"
                if text.split(" ", 1)[0] != self.service_name:
                    continue
                logger.warning(
                    "Sentinel switched %s's master (%s): dropping the cache's connections "
                    "to the old one.",
                    self.service_name,
                    text,
                )
                self.on_switch()
        finally:
            pubsub.close()
