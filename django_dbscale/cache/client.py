"""The one door to Redis: short timeouts, no retries, a circuit breaker, Lua by SHA.

The connection settings (host, port, db, password, TLS) come from the django-redis alias
named by ``CACHE["ALIAS"]``; the cache opens its own small pool from them with socket
timeouts of ``CACHE["SOCKET_TIMEOUT"]`` and no automatic retries, because a request must
never wait on a sick Redis longer than one short timeout (and, once the breaker is open,
not at all). Every call goes through :class:`Gateway`, which reports to the breaker and
turns every Redis error into :class:`RedisUnavailable`.

Scripts are sent with ``EVALSHA``; after a Redis restart (``NOSCRIPT``) they are loaded
once and the call repeated.

Two calls do not wait for their reply, because nothing the caller does next depends on it
(measured: a round trip is most of what a miss or a write adds, see docs/cache.md):

* a fill (:meth:`Gateway.send_deferred`): the connection goes back to the free list owing
  the reply, and whoever takes it next reads that reply first (it has arrived by then), for
  the counters; a thread's next call takes the same connection, so Redis runs its commands
  in the order they were sent;
* an invalidation (:meth:`Gateway.send_held` / :meth:`Gateway.finish_held`): the connection
  is held aside until the invalidation layer reads the reply, which it does before any
  cached read, before a consistency token is issued, and within a bound (see
  :mod:`~django_dbscale.cache.invalidation`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import Any

import redis
from django.core.cache import caches
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, RedisError, ResponseError
from redis.retry import Retry
from redis.sentinel import SentinelManagedConnection

from django_dbscale.cache import continuity
from django_dbscale.cache.breaker import CircuitBreaker
from django_dbscale.cache.keys import format_lsn_hex, tokens
from django_dbscale.cache.options import min_version_ttl, options
from django_dbscale.conf import on_settings_changed

__all__ = ["Gateway", "RedisUnavailable", "Script", "bulk", "gateway", "pack"]

logger = logging.getLogger("django_dbscale.cache")


class RedisUnavailable(Exception):
    """Redis could not be used (breaker open, connection refused, timeout, error reply)."""


class Script:
    """A Lua script shipped in ``django_dbscale/cache/lua/``, called by its SHA1."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = (
            resources.files("django_dbscale.cache").joinpath(f"lua/{name}.lua").read_text()
        )
        import hashlib

        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


def bulk(value: bytes) -> bytes:
    """Return *value* as a RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def pack(*args: str | bytes | int) -> bytes:
    """Return a RESP command array (what redis-py sends, built without its machinery)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(bulk(raw))
    return b"".join(parts)


READ = Script("read")
FILL = Script("fill")
BUMP = Script("bump")
RELEASE = Script("release")


def bump_call(keys: list[str], lsn: int) -> tuple[Any, ...]:
    """Return the ``EVALSHA`` of ``bump.lua`` giving *keys* fresh tokens at position *lsn*."""
    opts = options()
    return (
        "EVALSHA",
        BUMP.sha,
        len(keys),
        *keys,
        tokens.next(),  # one per call: bump.lua only appends the key's index
        format_lsn_hex(lsn),
        opts.version_timeout,
        min_version_ttl(opts),
    )


class Gateway:
    """Run commands and scripts on the cache's Redis, guarded by a circuit breaker."""

    def __init__(self) -> None:
        opts = options()
        self.breaker = CircuitBreaker(opts.breaker_failures, opts.breaker_cooldown)
        self._client: redis.Redis[bytes] | None = None
        self._lock = threading.Lock()
        #: Idle connections of the hit path (see :meth:`run_packed`).
        self._free: deque[Any] = deque()
        #: Connection -> callbacks for the replies it owes (fills sent without waiting).
        self._owed: dict[Any, list[Callable[[Any], None]]] = {}
        #: Set when a deferred reply said NOSCRIPT: load the scripts before the next send.
        self._reload_scripts = False

    @property
    def client(self) -> redis.Redis[bytes]:
        """Return the raw redis-py client (built on first use from the django-redis alias)."""
        client = self._client
        if client is None:
            with self._lock:
                client = self._client
                if client is None:
                    client = self._client = self._build()
        return client

    def _build(self) -> redis.Redis[bytes]:
        opts = options()
        backend = caches[opts.alias]
        get_client = getattr(getattr(backend, "client", None), "get_client", None)
        if get_client is None:
            raise RedisUnavailable(
                f"CACHES[{opts.alias!r}] is not a django-redis cache; set its BACKEND to "
                "'django_redis.cache.RedisCache' (system check dbscale.E006)."
            )
        base = get_client(write=True)
        pool = base.connection_pool
        kwargs = dict(pool.connection_kwargs)
        for key in ("retry_on_timeout", "retry_on_error"):
            kwargs.pop(key, None)
        kwargs.update(
            socket_timeout=opts.socket_timeout,
            socket_connect_timeout=opts.socket_timeout,
            retry=Retry(NoBackoff(), 0),
            # Every new connection verifies the server before its first command.
            redis_connect_func=continuity.on_connect,
        )
        connection_class = pool.connection_class
        if issubclass(connection_class, SentinelManagedConnection):
            connection_class = _sentinel_dialing(connection_class)
        own_pool = redis.ConnectionPool(connection_class=connection_class, **kwargs)
        return redis.Redis(connection_pool=own_pool)

    def close(self) -> None:
        """Disconnect the pool (settings changed, or tests restarting Redis)."""
        client, self._client = self._client, None
        _disconnect_all(self._take_free())
        if client is not None:
            client.connection_pool.disconnect()

    def connections_lost(self) -> None:
        """After a Redis error: drop every connection and forget the verification.

        Nothing is served from Redis until the server is verified again and the outboxes
        are drained (:mod:`~django_dbscale.cache.continuity`): what happened while this
        process could not reach Redis is settled before it reads. Connections in use by
        other threads go back to the dropped pool and are not reused.
        """
        continuity.distrust()
        _disconnect_all(self._take_free())
        client, self._client = self._client, None
        if client is not None:
            client.connection_pool.disconnect(inuse_connections=False)

    def _take_free(self) -> deque[Any]:
        """Swap in an empty deque of idle connections and return the old one.

        A thread still using a connection taken from the old deque may append it back
        there meanwhile: it is then dropped with the old deque, never reused.
        """
        free, self._free = self._free, deque()
        self._owed = {}  # replies those connections owe are lost with them (counters only)
        return free

    def open_connection(self) -> Any:
        """Open and return a new connection of the caller's own (the verifying thread's)."""
        connection = self._connect()
        try:
            connection.connect()
        except (RedisError, OSError) as exc:
            connection.disconnect()
            self.failed(exc, "connect")
            raise RedisUnavailable(str(exc)) from exc
        self.breaker.success()
        return connection

    def failed(self, exc: BaseException, what: str) -> None:
        """Record a failed Redis call: count it for the breaker; if connectivity or the
        server's state is in doubt, drop every connection (and so trust, until verified).

        Error replies that say nothing of either (out of memory, a busy script, a script
        error) only count for the breaker: re-verifying would not change them.
        """
        self.breaker.failure()
        if _lost_contact(exc):
            self.connections_lost()
        log = logger.debug if continuity.exiting() else logger.warning
        log("Redis call %s failed: %s", what, exc)

    def forget_after_fork(self) -> None:
        """Drop (without closing) the parent's sockets: the child must open its own."""
        self._client = None
        self._free = deque()
        self._owed = {}

    # -- calls --------------------------------------------------------------------------
    def available(self) -> bool:
        """Return whether the breaker lets a call through now (claims the probe if due)."""
        return self.breaker.allow()

    def run_packed(self, packed: bytes, script: Script) -> Any:
        """Send a command packed by :func:`pack` (an ``EVALSHA`` of *script*) and read the reply.

        The hot path of every cached read: it skips redis-py's per-command machinery
        (argument encoding, retries, observability hooks, and the pool's locking and
        metrics) and costs a deque pop and push, one ``send`` and one parsed reply, like
        the floor's ``GET``. Connections come from the gateway's own free list; one that
        failed, or was interrupted mid-reply, is disconnected and never reused.
        """
        free = self._free
        try:
            connection = free.pop()
            reused = True
        except IndexError:
            connection = self._connect()
            reused = False
        owed = self._owed.pop(connection, None) if self._owed else None
        try:
            try:
                result = self._send(connection, packed, script, owed)
            except RedisConnectionError:
                if not reused:
                    raise
                # An idle connection the server (or a network cut) closed meanwhile: the
                # others are suspect too, and whatever happened while it was down must be
                # settled (continuity) before a fresh connection serves anything.
                connection.disconnect()
                self.connections_lost()
                connection = self._connect()
                result = self._send(connection, packed, script)
        except BaseException as exc:
            connection.disconnect()
            if not isinstance(exc, RedisError | OSError):
                raise
            self.failed(exc, script.name)
            raise RedisUnavailable(str(exc)) from exc
        free.append(connection)
        self.breaker.success()
        return result

    def _connect(self) -> Any:
        pool = self.client.connection_pool
        return pool.connection_class(**pool.connection_kwargs)

    def _send(
        self,
        connection: Any,
        packed: bytes,
        script: Script,
        owed: list[Callable[[Any], None]] | None = None,
    ) -> Any:
        try:
            connection.send_packed_command([packed], check_health=False)
            if owed:
                self._read_owed(connection, owed)
            return connection.read_response()
        except NoScriptError:
            # Redis lost its scripts (a restart, SCRIPT FLUSH): load them all, not only
            # this one, so a fill sent without waiting (send_deferred) finds its script.
            connection.send_packed_command(
                [pack("SCRIPT", "LOAD", s.source) for s in (READ, FILL, BUMP, RELEASE)]
            )
            for _ in range(4):
                connection.read_response()
            connection.send_packed_command([packed], check_health=False)
            return connection.read_response()

    def _read_owed(self, connection: Any, owed: list[Callable[[Any], None]]) -> None:
        """Read the replies *connection* owes (in the order sent) and hand them over."""
        for callback in owed:
            try:
                reply = connection.read_response()
            except ResponseError as exc:  # an error reply: the connection is still in sync
                reply = exc
                if isinstance(exc, NoScriptError):
                    self._reload_scripts = True
            try:
                callback(reply)
            except Exception:  # a counter must never break the read that drained it
                logger.exception("A deferred Redis reply's callback failed.")

    def send_deferred(self, packed: bytes, on_reply: Callable[[Any], None]) -> None:
        """Send one packed command without waiting; *on_reply* gets its reply later.

        The reply (or the error reply, as an exception object) is read by whichever call
        takes the connection next, or by :meth:`drain_owed`. A reply lost with its
        connection is never delivered: use this only where the reply is informational.
        """
        if self._reload_scripts:
            self.load_scripts()
        free = self._free
        try:
            connection = free.pop()
        except IndexError:
            connection = self._connect()
        owed = self._owed.pop(connection, None) if self._owed else None
        try:
            connection.send_packed_command([packed], check_health=False)
        except BaseException as exc:
            connection.disconnect()
            if not isinstance(exc, RedisError | OSError):
                raise
            self.failed(exc, "deferred send")
            raise RedisUnavailable(str(exc)) from exc
        if owed is None:
            owed = []
        owed.append(on_reply)
        self._owed[connection] = owed
        free.append(connection)

    def drain_owed(self) -> None:
        """Read every reply owed by idle connections now (counters are then current)."""
        free = self._free
        for connection in list(self._owed):
            try:
                free.remove(connection)
            except ValueError:
                continue  # in use by another thread, which reads what it owes
            owed = self._owed.pop(connection, None)
            try:
                if owed:
                    self._read_owed(connection, owed)
            except (RedisError, OSError) as exc:
                connection.disconnect()
                self.failed(exc, "deferred reply")
                continue
            free.append(connection)

    def send_held(self, packed: bytes) -> Any:
        """Send packed commands on a connection of the caller's; return it.

        The caller must pass it to :meth:`finish_held`, which reads the replies and frees
        it (a child process after a fork just forgets it: the socket is the parent's).
        """
        if self._reload_scripts:
            self.load_scripts()
        free = self._free
        try:
            connection = free.pop()
        except IndexError:
            connection = self._connect()
        owed = self._owed.pop(connection, None) if self._owed else None
        try:
            if owed:  # settle what it owes first: its replies come before ours
                self._read_owed(connection, owed)
            connection.send_packed_command([packed], check_health=False)
        except BaseException as exc:
            connection.disconnect()
            if not isinstance(exc, RedisError | OSError):
                raise
            self.failed(exc, "send")
            raise RedisUnavailable(str(exc)) from exc
        return connection

    def finish_held(self, connection: Any, count: int) -> list[Any]:
        """Read *count* replies of a :meth:`send_held` connection and free it.

        Error replies are returned as exception objects (``NOSCRIPT`` included); a lost
        connection raises :class:`RedisUnavailable`.
        """
        replies: list[Any] = []
        try:
            for _ in range(count):
                try:
                    replies.append(connection.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        except BaseException as exc:
            connection.disconnect()
            if not isinstance(exc, RedisError | OSError):
                raise
            self.failed(exc, "deferred reply")
            raise RedisUnavailable(str(exc)) from exc
        self._free.append(connection)
        self.breaker.success()
        return replies

    def load_scripts(self) -> None:
        """Load every script (after a ``NOSCRIPT`` reply to a call that did not wait)."""
        self._reload_scripts = False
        try:
            for script in (READ, FILL, BUMP, RELEASE):
                self.client.execute_command("SCRIPT", "LOAD", script.source)
        except (RedisError, OSError) as exc:
            self._reload_scripts = True
            self.failed(exc, "script load")
            raise RedisUnavailable(str(exc)) from exc

    def evalsha(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """Run *script*; the caller must have checked :meth:`available`."""
        try:
            try:
                result = self.client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            except NoScriptError:
                self.client.execute_command("SCRIPT", "LOAD", script.source)
                result = self.client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except (RedisError, OSError) as exc:
            self.failed(exc, script.name)
            raise RedisUnavailable(str(exc)) from exc
        self.breaker.success()
        return result

    def pipeline(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        """Run raw commands (``("EVALSHA", sha, ...)``, ``("HINCRBY", ...)``) in one round trip.

        ``EVALSHA`` calls whose script is missing are loaded and the whole batch repeated
        once (scripts are idempotent invalidations or counters; counters may double count
        after a Redis restart, which is harmless).
        """
        client = self.client
        try:
            for attempt in (0, 1):
                pipe = client.pipeline(transaction=False)
                for call in calls:
                    pipe.execute_command(*call)  # type: ignore[no-untyped-call]
                results = pipe.execute(raise_on_error=False)
                missing = [r for r in results if isinstance(r, NoScriptError)]
                if not missing or attempt:
                    break
                for script in (READ, FILL, BUMP, RELEASE):
                    client.execute_command("SCRIPT", "LOAD", script.source)
            errors = [r for r in results if isinstance(r, Exception)]
            if errors:
                raise errors[0]
        except (RedisError, OSError) as exc:
            self.failed(exc, "pipeline")
            raise RedisUnavailable(str(exc)) from exc
        self.breaker.success()
        return list(results)

    def command(self, *args: Any) -> Any:
        """Run one raw command (tools and tests; not on hot paths)."""
        try:
            result = self.client.execute_command(*args)
        except (RedisError, OSError) as exc:
            self.failed(exc, args[0] if args else "command")
            raise RedisUnavailable(str(exc)) from exc
        self.breaker.success()
        return result


def _lost_contact(exc: BaseException) -> bool:
    """Return whether *exc* means the connection or the server itself may have changed."""
    # An error reply means the server answered: still connected (unless it now refuses
    # writes, as a demoted primary does).
    return not isinstance(exc, ResponseError) or isinstance(exc, ReadOnlyError)


class _DialThroughSentinel:
    """Ask the sentinels for the master's address on every connect, implicit ones too.

    redis-py's ``send_packed_command()`` connects an unconnected connection through
    ``connect_check_health()``, which ``SentinelManagedConnection`` does not override (it
    resolves the master in ``connect()`` only): the gateway's own connections, sent to
    before anything calls ``connect()``, would dial the ``LOCATION``'s service name as a
    host. With django-redis's ``SentinelClient`` the gateway's connections get this mixin.
    """

    _sock: Any
    _dialing = False
    connect: Callable[[], None]  # SentinelManagedConnection's, by the MRO

    def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        if self._sock is None and not self._dialing:
            self._dialing = True
            try:
                # Resolves the master, then comes back here (dialing) to connect to it.
                self.connect()
            finally:
                self._dialing = False
            return
        super().connect_check_health(*args, **kwargs)  # type: ignore[misc]


_sentinel_classes: dict[type[Any], type[Any]] = {}


def _sentinel_dialing(connection_class: type[Any]) -> type[Any]:
    """Return *connection_class* (a Sentinel-managed one) with :class:`_DialThroughSentinel`."""
    made = _sentinel_classes.get(connection_class)
    if made is None:
        made = type(
            f"Dbscale{connection_class.__name__}", (_DialThroughSentinel, connection_class), {}
        )
        _sentinel_classes[connection_class] = made
    return made


_gateway: list[Gateway] = []
_gateway_lock = threading.Lock()


def gateway() -> Gateway:
    """Return the process-wide gateway (rebuilt after a settings change)."""
    if _gateway:
        return _gateway[0]
    with _gateway_lock:
        if not _gateway:
            _gateway.append(Gateway())
    return _gateway[0]


@on_settings_changed
def _reset() -> None:
    with _gateway_lock:
        while _gateway:
            _gateway.pop().close()


def _after_fork_in_child() -> None:
    # The parent's sockets are shared with the child: never write to them from here.
    while _gateway:
        _gateway.pop().forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _disconnect_all(free: deque[Any]) -> None:
    """Disconnect every connection of *free*, popping them (another thread may append to
    it meanwhile: iterating would raise "deque mutated during iteration")."""
    while True:
        try:
            connection = free.popleft()
        except IndexError:
            return
        connection.disconnect()
