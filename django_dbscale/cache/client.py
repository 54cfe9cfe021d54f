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

With ``CACHE["CLUSTER"]`` (Redis Cluster) the gateway holds a :class:`redis.cluster.RedisCluster`
(its slot map, from the django-redis alias's address as the startup node) and one free list
of raw connections per node: each packed command goes to the node owning the slot of its
first key (every key of one script shares its database's hash tag, see
:func:`~django_dbscale.cache.keys.alias_segment`), a ``MOVED`` reply refreshes the slot map
and the call is repeated once, and a batch of invalidations is split per node and its
replies put back in order (:meth:`Gateway.finish_held`).

While a slot migrates between two masters (``CLUSTER SETSLOT ... MIGRATING/IMPORTING``
and ``MIGRATE``), a command whose keys have left the old owner gets ``-ASK <slot>
<host>:<port>``: it is sent once more, to that node, after ``ASKING``, and the slot map is
left as it is (the slot still belongs to the old owner until the migration ends). A script
with several keys is refused with ``-TRYAGAIN`` while some of its keys are missing on the
node asked (moved away, or simply not existing: Redis cannot tell them apart), and that
lasts until the migration ends, so waiting and retrying would not help a request:

* a read (``read.lua``) is retried with its payload key named in the lease key's place
  (the lease key exists only while a fill is due, so it is almost always "missing"); on a
  hit the script never touches that key. What that call returns is served only if it is a
  hit: anything else (a miss, another refusal) bypasses the cache, like a Redis error but
  without counting for the circuit breaker. So entries whose keys are all on one node are
  served during the migration, and nothing is filled until it ends;
* a fill sent without waiting (:meth:`Gateway.send_deferred`) is not redirected: it is
  simply not stored (a later read misses again);
* an invalidation (``bump.lua``) refused with ``TRYAGAIN`` is sent again one key per call
  (a one-key script is never refused: it runs where its key is, following ``ASK``), so a
  bump reaches the key's current owner during the whole migration. One that still fails
  is reported as not delivered: the invalidation layer keeps it pending, writes it to the
  outbox and retries it (:mod:`~django_dbscale.cache.invalidation`). That holds for
  :meth:`Gateway.finish_held`, :meth:`Gateway.pipeline` and the verifying thread's
  :class:`ClusterRoute` alike.

If the node named in ``LOCATION`` is gone (a master killed and replaced by its replica),
the cluster is rediscovered from every node of the last slot map read.

A failover inside the cluster (a replica promoted) changes the cluster's identity, the
run ids of its primaries: :mod:`~django_dbscale.cache.continuity` notices it on the first
connection to the new master and bumps every generation, as for a single Redis.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import Any, NoReturn, cast

import redis
from django.core.cache import caches
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import SSLConnection
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from redis.sentinel import SentinelManagedConnection

from django_dbscale.cache import continuity
from django_dbscale.cache.breaker import CircuitBreaker
from django_dbscale.cache.keys import format_lsn_hex, tokens
from django_dbscale.cache.options import min_version_ttl, options
from django_dbscale.cache.sentinel_watch import SentinelWatch
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
        #: Cluster mode: the cluster client (slot map) and a free list per node name.
        self._cluster: RedisCluster[bytes] | None = None
        self._node_free: dict[str, deque[Any]] = {}
        #: Cluster mode: the address of every node of the last slot map read, to
        #: rediscover the cluster from if the node named in ``LOCATION`` is gone.
        self._known_nodes: list[tuple[str, int]] = []
        #: Sentinel mode: the thread that hears a master switch (sentinel_watch.py).
        self._watch: SentinelWatch | None = None

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
        if opts.cluster:
            # Typed as a Redis: the gateway's callers use the commands both clients share.
            return cast("redis.Redis[bytes]", self._build_cluster(connection_class, kwargs))
        if issubclass(connection_class, SentinelManagedConnection):
            connection_class = _sentinel_dialing(connection_class)
            self._watch_sentinels(kwargs.get("connection_pool"))
        own_pool = redis.ConnectionPool(connection_class=connection_class, **kwargs)
        return redis.Redis(connection_pool=own_pool)

    def _build_cluster(self, connection_class: type[Any], kwargs: dict[str, Any]) -> Any:
        """Return a :class:`~redis.cluster.RedisCluster` started from the alias's address.

        The django-redis alias names one node (``LOCATION``); the slot map is read from it.
        Redis Cluster has only database 0, and a Sentinel-managed alias is not a cluster:
        both are configuration errors, reported with the setting to fix.
        """
        alias = options().alias
        if issubclass(connection_class, SentinelManagedConnection):
            raise RedisUnavailable(
                f"DBSCALE['CACHE']['CLUSTER'] is True but CACHES[{alias!r}] uses Sentinel; "
                "point LOCATION at one node of the cluster with the default client instead."
            )
        if int(kwargs.pop("db", 0) or 0) != 0:
            raise RedisUnavailable(
                f"CACHES[{alias!r}] LOCATION selects a database other than 0, which Redis "
                "Cluster does not have (DBSCALE['CACHE']['CLUSTER'] is True); use /0."
            )
        host = kwargs.pop("host", "localhost")
        port = int(kwargs.pop("port", 6379))
        for key in ("path", "connection_class", "client_name"):
            kwargs.pop(key, None)
        if issubclass(connection_class, SSLConnection):
            kwargs["ssl"] = True
        startup = [ClusterNode(host, port)] + [
            ClusterNode(known_host, known_port)
            for known_host, known_port in self._known_nodes
            if (known_host, known_port) != (host, port)
        ]
        try:
            cluster: RedisCluster[bytes] = RedisCluster(startup_nodes=startup, **kwargs)
        except (RedisError, RedisClusterException, OSError) as exc:
            self.failed(exc, "cluster discovery")
            raise RedisUnavailable(f"Redis Cluster at {host}:{port}: {exc}") from exc
        self._cluster = cluster
        self._node_free = {}
        self._remember_nodes(cluster)
        return cluster

    def _remember_nodes(self, cluster: RedisCluster[bytes]) -> None:
        """Keep the address of every node *cluster*'s slot map names (replicas too)."""
        nodes = [(node.host, node.port) for node in cluster.get_nodes()]
        if nodes:
            self._known_nodes = nodes

    # -- cluster routing ----------------------------------------------------------------
    def _lane(self, packed: bytes) -> tuple[deque[Any], Callable[[], Any]]:
        """Return the free list and connection factory for *packed*'s first command.

        A single Redis has one lane; a cluster one per node, chosen by the slot of the
        command's first key (keyless commands go to any primary).
        """
        if self._cluster is None and not self._clustered():
            return self._free, self._connect
        return self._node_lane(self._node_for(_command_key(_parse_first(packed))))

    def _clustered(self) -> bool:
        """Return whether the gateway talks to a Redis Cluster (builds the client if due)."""
        if self._client is None:
            self.client  # noqa: B018 - builds the client (and learns if it is a cluster)
        return self._cluster is not None

    def _node_for(self, key: bytes | None) -> ClusterNode:
        cluster = self._cluster
        if cluster is None:  # dropped by another thread meanwhile (connections lost)
            raise RedisUnavailable("the Redis Cluster client was just dropped")
        try:
            slot = 0 if key is None else key_slot(key)
            return cluster.nodes_manager.get_node_from_slot(slot)  # type: ignore[arg-type]
        except RedisClusterException as exc:  # slot not covered: the cluster is down
            self.failed(exc, "route")
            raise RedisUnavailable(str(exc)) from exc

    def _node_lane(self, node: ClusterNode) -> tuple[deque[Any], Callable[[], Any]]:
        free = self._node_free.get(node.name)
        if free is None:
            free = self._node_free.setdefault(node.name, deque())
        return free, lambda: self._connect_node(node)

    def _connect_node(self, node: ClusterNode) -> Any:
        redis_connection = node.redis_connection
        if redis_connection is None:  # a node the slot map names but has no client for
            raise RedisUnavailable(f"no connection settings for Redis Cluster node {node.name}")
        pool = redis_connection.connection_pool
        connection = pool.connection_class(**pool.connection_kwargs)
        connection.dbscale_node = node.name
        return connection

    def _free_of(self, connection: Any) -> deque[Any] | None:
        """Return the free list *connection* belongs to (``None``: its node was dropped)."""
        if self._cluster is None:
            return self._free
        return self._node_free.get(getattr(connection, "dbscale_node", ""))

    def refresh_slots(self) -> None:
        """Re-read the cluster's slot map (after a ``MOVED`` reply: a slot changed owner)."""
        cluster = self._cluster
        if cluster is None:
            return
        try:
            cluster.nodes_manager.initialize()
        except (RedisError, OSError) as exc:
            logger.warning("Refreshing the Redis Cluster slot map failed: %s", exc)
            return
        self._remember_nodes(cluster)

    def _redirect_node(self, exc: AskError) -> ClusterNode:
        """Return the node an ``ASK`` reply names (the slot map is not changed: the slot
        still belongs to the node that answered, until its migration ends)."""
        cluster = self._cluster
        if cluster is None:
            raise RedisUnavailable("the Redis Cluster client was just dropped")
        node = cluster.get_node(host=exc.host, port=exc.port)
        if node is None:  # a node the slot map does not name yet (just added)
            self.refresh_slots()
            node = cluster.get_node(host=exc.host, port=exc.port)
        if node is None:
            raise RedisUnavailable(f"ASK redirection to an unknown node {exc.host}:{exc.port}")
        return node

    def _exchange(self, node: ClusterNode, raw: bytes, *, asking: bool) -> Any:
        """Send one packed command to *node* (after ``ASKING`` if *asking*); return its reply.

        An error reply is returned as an exception object; a script the node lacks is
        loaded there and the command sent again. A lost connection raises
        :class:`RedisUnavailable` (counted for the breaker).
        """
        free, connect = self._node_lane(node)
        connection, owed = self._take(free, connect)
        payload = (_ASKING + raw) if asking else raw
        try:
            if owed:
                self._read_owed(connection, owed)
            reply = _send_reading(connection, payload, asking)
            if isinstance(reply, NoScriptError):
                connection.send_packed_command(
                    [pack("SCRIPT", "LOAD", s.source) for s in (READ, FILL, BUMP, RELEASE)]
                )
                for _ in range(4):
                    connection.read_response()
                reply = _send_reading(connection, payload, asking)
        except BaseException as exc:
            self._give_up(exc, "cluster redirection", connection)
        free.append(connection)
        return reply

    def _redirected(self, raw: bytes, reply: Any) -> Any:
        """Return *raw*'s reply after following what its first reply, *reply*, says.

        ``MOVED``: the slot map is refreshed and *raw* sent to the new owner. ``ASK``: sent
        once to the named node after ``ASKING``. ``TRYAGAIN`` to a ``bump.lua`` call of
        several keys: sent again one key per call (each following its own redirection),
        and the replies (key counts) added up. Anything else, or a second redirection, is
        returned as it is: an error the caller reports as not delivered.
        """
        if isinstance(reply, MovedError):  # before AskError: a MovedError is an AskError
            self.refresh_slots()
            node = self._node_for(_command_key(_parse_first(raw)))
            reply = self._exchange(node, raw, asking=False)
        if isinstance(reply, AskError) and not isinstance(reply, MovedError):
            reply = self._exchange(self._redirect_node(reply), raw, asking=True)
        if isinstance(reply, TryAgainError):
            parts = _bump_per_key(raw)
            if parts is None:
                return reply
            total = 0
            for part in parts:
                node = self._node_for(_command_key(_parse_first(part)))
                got = self._exchange(node, part, asking=False)
                if isinstance(got, AskError | TryAgainError):
                    got = self._redirected(part, got)
                if isinstance(got, Exception):
                    return got
                total += int(got)
            return total
        return reply

    def primaries(self) -> list[ClusterNode]:
        """Return the cluster's primary nodes (empty for a single Redis)."""
        if self._cluster is None:
            return []
        return list(self._cluster.get_primaries())

    def slot_groups(self, keys: list[str]) -> list[list[str]]:
        """Return *keys* grouped by hash slot (one group for a single Redis), order kept."""
        if not options().cluster:
            return [keys] if keys else []
        groups: dict[int, list[str]] = {}
        for key in keys:
            groups.setdefault(key_slot(key.encode()), []).append(key)
        return list(groups.values())

    def _watch_sentinels(self, sentinel_pool: Any) -> None:
        """Start hearing the sentinels' master switches (once per gateway)."""
        manager = getattr(sentinel_pool, "sentinel_manager", None)
        if self._watch is not None or manager is None:
            return
        self._watch = SentinelWatch(
            list(manager.sentinels), sentinel_pool.service_name, self.connections_lost
        )
        self._watch.start()

    def close(self) -> None:
        """Disconnect the pool (settings changed, or tests restarting Redis)."""
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.stop()
        client, self._client = self._client, None
        self._cluster = None
        _disconnect_all(self._take_free())
        if isinstance(client, RedisCluster):
            client.close()
        elif client is not None:
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
        self._cluster = None
        if isinstance(client, RedisCluster):
            client.close()
        elif client is not None:
            client.connection_pool.disconnect(inuse_connections=False)

    def _take_free(self) -> deque[Any]:
        """Swap in an empty deque of idle connections and return the old one.

        A thread still using a connection taken from the old deque may append it back
        there meanwhile: it is then dropped with the old deque, never reused.
        """
        free, self._free = self._free, deque()
        nodes, self._node_free = self._node_free, {}
        for node_free in nodes.values():
            free.extend(node_free)
        self._owed = {}  # replies those connections owe are lost with them (counters only)
        return free

    def open_connection(self) -> Any:
        """Open and return a new connection of the caller's own (the verifying thread's).

        In cluster mode: a :class:`ClusterRoute`, connected to every primary, which sends
        each command to the node owning its key.
        """
        self.client  # noqa: B018 - builds the client (and learns if it is a cluster)
        if self._cluster is not None:
            connection: Any = ClusterRoute(self)
        else:
            connection = self._connect()
        try:
            connection.connect()
        except (RedisError, OSError) as exc:
            self._give_up(exc, "connect", connection)
        self.breaker.success()
        return connection

    def _give_up(self, exc: BaseException, what: str, *connections: Any) -> NoReturn:
        """Disconnect *connections* after *exc*; raise it, as :class:`RedisUnavailable` if it
        is a Redis or socket error (counted for the breaker by :meth:`failed`)."""
        for connection in connections:
            connection.disconnect()
        if not isinstance(exc, RedisError | OSError):
            raise exc
        self.failed(exc, what)
        raise RedisUnavailable(str(exc)) from exc

    def _take(self, free: deque[Any], connect: Callable[[], Any]) -> tuple[Any, Any]:
        """Return an idle connection of *free* (or a new one) and the replies it owes."""
        try:
            connection = free.pop()
        except IndexError:
            connection = connect()
        return connection, self._owed.pop(connection, None) if self._owed else None

    def failed(self, exc: BaseException, what: str) -> None:
        """Record a failed Redis call: count it for the breaker; if connectivity or the
        server's state is in doubt, drop every connection (and so trust, until verified).

        Error replies that say nothing of either (out of memory, a busy script, a script
        error) only count for the breaker: re-verifying would not change them.
        """
        if isinstance(exc, MovedError):
            self.refresh_slots()  # a slot moved: the caller's next call goes to its owner
        elif isinstance(exc, AskError | TryAgainError):
            # A slot migration in progress: Redis is fine, the slot map too.
            logger.debug("Redis call %s met a slot migration: %s", what, exc)
            return
        self.breaker.failure()
        if _lost_contact(exc):
            self.connections_lost()
        log = logger.debug if continuity.exiting() else logger.warning
        log("Redis call %s failed: %s", what, exc)

    def forget_after_fork(self) -> None:
        """Drop (without closing) the parent's sockets: the child must open its own."""
        if self._watch is not None:
            self._watch.forget_after_fork()
            self._watch = None
        self._client = None
        self._cluster = None
        self._free = deque()
        self._node_free = {}
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
        failed, or was interrupted mid-reply, is disconnected and never reused. In cluster
        mode the node owning the script's first key runs it; a ``MOVED`` reply refreshes
        the slot map and the call is sent once more, to the new owner; ``ASK`` and
        ``TRYAGAIN`` (a slot migrating) are dealt with by :meth:`_run_migrating`.
        """
        free, connect = self._lane(packed)
        if self._cluster is None:
            return self._run_packed(packed, script, free, connect)
        try:
            return self._run_packed(packed, script, free, connect)
        except RedisUnavailable as exc:
            cause = exc.__cause__
            if not isinstance(cause, AskError | TryAgainError):
                raise
            if not isinstance(cause, MovedError):
                return self._run_migrating(packed, script, cause)
        free, connect = self._lane(packed)  # the slot map was refreshed by failed()
        return self._run_packed(packed, script, free, connect)

    def _run_migrating(self, packed: bytes, script: Script, refusal: ResponseError) -> Any:
        """Run *packed* whose slot is migrating: its first reply was *refusal* (``ASK`` or
        ``TRYAGAIN``). See the module docstring for why each case is handled so.

        A read is sent as :func:`_lease_as_payload` makes it: to the node that answered
        (after ``TRYAGAIN``), then to the node an ``ASK`` names; only a hit is returned.
        Another script is only followed through ``ASK``. Whatever else happens raises
        :class:`RedisUnavailable`, which the breaker does not count (Redis is healthy).
        """
        call = _lease_as_payload(packed) if script is READ else packed
        reply: Any = refusal
        if isinstance(reply, TryAgainError) and call is not packed:
            reply = self._exchange(self._lane_node(packed), call, asking=False)
        if isinstance(reply, AskError) and not isinstance(reply, MovedError):
            reply = self._exchange(self._redirect_node(reply), call, asking=True)
        if isinstance(reply, Exception):
            self.failed(reply, f"{script.name} during a slot migration")
            raise RedisUnavailable(f"slot migrating: {reply}") from reply
        if script is READ and not (isinstance(reply, list) and reply and reply[0] == 1):
            raise RedisUnavailable("slot migrating: only a hit is served until it ends")
        self.breaker.success()
        return reply

    def _lane_node(self, packed: bytes) -> ClusterNode:
        """Return the node owning the slot of *packed*'s first key (cluster mode)."""
        return self._node_for(_command_key(_parse_first(packed)))

    def _run_packed(
        self, packed: bytes, script: Script, free: deque[Any], connect: Callable[[], Any]
    ) -> Any:
        try:
            connection = free.pop()
            reused = True
        except IndexError:
            connection = connect()
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
                connection = connect()
                result = self._send(connection, packed, script)
        except BaseException as exc:
            self._give_up(exc, script.name, connection)
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
        free, connect = self._lane(packed)
        connection, owed = self._take(free, connect)
        try:
            connection.send_packed_command([packed], check_health=False)
        except BaseException as exc:
            self._give_up(exc, "deferred send", connection)
        if owed is None:
            owed = []
        owed.append(on_reply)
        self._owed[connection] = owed
        free.append(connection)

    def drain_owed(self) -> None:
        """Read every reply owed by idle connections now (counters are then current)."""
        for connection in list(self._owed):
            free = self._free_of(connection)
            if free is None:
                continue
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
        In cluster mode the commands are split per node (each node gets its own in their
        order) and a :class:`_HeldOnNodes` is returned in place of the connection.
        """
        if self._reload_scripts:
            self.load_scripts()
        if self._clustered():
            return self._send_held_on_nodes(packed)
        connection, owed = self._take(self._free, self._connect)
        try:
            if owed:  # settle what it owes first: its replies come before ours
                self._read_owed(connection, owed)
            connection.send_packed_command([packed], check_health=False)
        except BaseException as exc:
            self._give_up(exc, "send", connection)
        return connection

    def _send_held_on_nodes(self, packed: bytes) -> _HeldOnNodes:
        """Send each command of *packed* to its key's node; return what to read back."""
        groups: dict[str, tuple[ClusterNode, list[int], list[bytes]]] = {}
        commands = _split_commands(packed)
        for index, (raw, args) in enumerate(commands):
            node = self._node_for(_command_key(args))
            group = groups.setdefault(node.name, (node, [], []))
            group[1].append(index)
            group[2].append(raw)
        held = _HeldOnNodes([], [raw for raw, _ in commands])
        try:
            for node, indices, raws in groups.values():
                free, connect = self._node_lane(node)
                connection, owed = self._take(free, connect)
                held.parts.append((connection, free, indices))
                if owed:  # settle what it owes first: its replies come before ours
                    self._read_owed(connection, owed)
                connection.send_packed_command([b"".join(raws)], check_health=False)
        except BaseException as exc:
            self._give_up(exc, "send", *(connection for connection, _, _ in held.parts))
        return held

    def finish_held(self, connection: Any, count: int) -> list[Any]:
        """Read *count* replies of a :meth:`send_held` connection and free it.

        Error replies are returned as exception objects (``NOSCRIPT`` included); a lost
        connection raises :class:`RedisUnavailable`. Replies of commands split over
        cluster nodes come back in the order the commands were given, after following
        ``MOVED``, ``ASK`` and ``TRYAGAIN`` replies once (:meth:`_redirected`).
        """
        if isinstance(connection, _HeldOnNodes):
            return self._finish_on_nodes(connection, count)
        replies: list[Any] = []
        try:
            for _ in range(count):
                try:
                    replies.append(connection.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        except BaseException as exc:
            self._give_up(exc, "deferred reply", connection)
        self._free.append(connection)
        self.breaker.success()
        return replies

    def _finish_on_nodes(self, held: _HeldOnNodes, count: int) -> list[Any]:
        replies: list[Any] = [None] * count
        done = 0
        try:
            for connection, _, indices in held.parts:
                for index in indices:
                    try:
                        replies[index] = connection.read_response()
                    except ResponseError as exc:
                        replies[index] = exc
                done += 1
        except BaseException as exc:
            for connection, free, _ in held.parts[:done]:
                free.append(connection)
            self._give_up(exc, "deferred reply", *(c for c, _, _ in held.parts[done:]))
        for connection, free, _ in held.parts:
            free.append(connection)
        for index, reply in enumerate(replies):
            if isinstance(reply, AskError | TryAgainError):  # MOVED too (an AskError)
                replies[index] = self._redirected(held.commands[index], reply)
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
        """Run *script*; the caller must have checked :meth:`available`.

        In cluster mode through :meth:`run_packed` (its routing, and its handling of a
        migrating slot): redis-py's own would retry a ``TRYAGAIN`` for a while, then fail
        as if the cluster were unreachable.
        """
        if self._clustered():
            return self.run_packed(pack("EVALSHA", script.sha, len(keys), *keys, *args), script)
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

        In cluster mode the scripts (invalidations) go through :meth:`send_held` and
        :meth:`finish_held`, which follow a migrating slot's redirections (redis-py's
        pipeline retries a ``TRYAGAIN`` for a while, then fails as if the cluster were
        unreachable); the other commands through redis-py's cluster pipeline.
        """
        if self._clustered():
            return self._pipeline_on_cluster(calls)
        return self._pipeline(calls)

    def _pipeline_on_cluster(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        scripted = [i for i, call in enumerate(calls) if _command_name(call) == b"EVALSHA"]
        results: list[Any] = [None] * len(calls)
        if scripted:
            packed = b"".join(pack(*calls[i]) for i in scripted)
            replies = self.finish_held(self.send_held(packed), len(scripted))
            if any(isinstance(reply, NoScriptError) for reply in replies):
                self.load_scripts()
                replies = self.finish_held(self.send_held(packed), len(scripted))
            errors = [reply for reply in replies if isinstance(reply, Exception)]
            if errors:
                self.failed(errors[0], "pipeline")
                raise RedisUnavailable(str(errors[0])) from errors[0]
            for index, reply in zip(scripted, replies, strict=True):
                results[index] = reply
        others = [i for i in range(len(calls)) if i not in set(scripted)]
        if others:
            replies = self._pipeline([calls[i] for i in others])
            for index, reply in zip(others, replies, strict=True):
                results[index] = reply
        return results

    def _pipeline(self, calls: list[tuple[Any, ...]]) -> list[Any]:
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


class _HeldOnNodes:
    """Commands of one :meth:`Gateway.send_held` call split over cluster nodes.

    *parts* holds, per node, the connection, the free list it goes back to and the
    positions of its commands in the original batch; *commands* each command's bytes, in
    that order (to send one again after a redirection).
    """

    __slots__ = ("commands", "parts")

    def __init__(
        self, parts: list[tuple[Any, deque[Any], list[int]]], commands: list[bytes]
    ) -> None:
        self.parts = parts
        self.commands = commands


_ASKING = pack("ASKING")


def _send_reading(connection: Any, payload: bytes, asking: bool) -> Any:
    """Send *payload* on *connection*; return the last reply (an error one as an exception).

    With *asking*, *payload* starts with ``ASKING``, whose ``+OK`` is read first.
    """
    connection.send_packed_command([payload], check_health=False)
    if asking:
        connection.read_response()
    try:
        return connection.read_response()
    except ResponseError as exc:
        return exc


def _command_name(call: list[bytes] | tuple[Any, ...]) -> bytes:
    name = call[0] if call else b""
    return (name if isinstance(name, bytes) else str(name).encode()).upper()


def _lease_as_payload(packed: bytes) -> bytes:
    """Return a ``read.lua`` call with its payload key named in the lease key's place too.

    For a slot migrating: Redis refuses (``TRYAGAIN``) a script of several keys if any is
    missing on the node, and the lease key exists only while a fill is due. ``read.lua``
    touches the lease key only after deciding it is not a hit, and then only with ``SET NX``
    (which fails on the existing payload key) and ``GET``: such a call serves hits and
    grants no lease.
    """
    args = _parse_first(packed)
    args[5] = args[3]  # EVALSHA sha n payload header lease version...
    return pack(*args)


def _bump_per_key(raw: bytes) -> list[bytes] | None:
    """Return a ``bump.lua`` call of several keys as one call per key (else ``None``).

    Each call's token is the original's followed by the key's index and a dot, so every
    key still gets a token never used before (``bump.lua`` appends the index within its
    call, here always 1).
    """
    args = _parse_first(raw)
    if _command_name(args) != b"EVALSHA" or len(args) < 4 or args[1] != BUMP.sha.encode():
        return None
    count = int(args[2])
    if count < 2:
        return None
    keys, argv = args[3 : 3 + count], args[3 + count :]
    return [
        pack(b"EVALSHA", args[1], 1, key, b"%s%d." % (argv[0], index), *argv[1:])
        for index, key in enumerate(keys, 1)
    ]


def _read_line(packed: bytes, at: int) -> tuple[bytes, int]:
    end = packed.index(b"\r\n", at)
    return packed[at:end], end + 2


def _parse_command(packed: bytes, at: int) -> tuple[list[bytes], int]:
    """Parse the RESP array at *at* (a command :func:`pack` made); return it and its end."""
    head, at = _read_line(packed, at)
    if head[:1] != b"*":
        raise ValueError(f"not a RESP command array at byte {at}: {head[:20]!r}")
    args: list[bytes] = []
    for _ in range(int(head[1:])):
        size, at = _read_line(packed, at)
        length = int(size[1:])
        args.append(packed[at : at + length])
        at += length + 2
    return args, at


def _parse_first(packed: bytes) -> list[bytes]:
    """Return the arguments of the first command in *packed*."""
    return _parse_command(packed, 0)[0]


def _split_commands(packed: bytes) -> list[tuple[bytes, list[bytes]]]:
    """Return each command of *packed* as ``(its bytes, its arguments)``."""
    commands: list[tuple[bytes, list[bytes]]] = []
    at = 0
    while at < len(packed):
        args, end = _parse_command(packed, at)
        commands.append((packed[at:end], args))
        at = end
    return commands


def _command_key(args: list[bytes] | tuple[Any, ...]) -> bytes | None:
    """Return the key that decides a command's node: a script's first key, else argument 1.

    Every command the cache sends names its keys there (``EVALSHA sha n key...``, ``GET
    key``, ``HINCRBY key ...``); keyless ones (``INFO``, ``PING``) return ``None``.
    """
    if not args:
        return None
    name = _command_name(args)
    if name in (b"EVALSHA", b"EVAL"):
        if len(args) > 3 and int(args[2]) > 0:
            key = args[3]
        else:
            return None
    elif name in (b"INFO", b"PING", b"SCRIPT", b"CLUSTER", b"ROLE"):
        return None
    elif len(args) > 1:
        key = args[1]
    else:
        return None
    return key if isinstance(key, bytes) else str(key).encode()


class ClusterRoute:
    """The verifying thread's "connection" to a Redis Cluster: one per primary, routed.

    :mod:`~django_dbscale.cache.continuity` speaks to it as to one connection
    (``send_command`` then ``read_response``): each command goes to the node owning its
    key (a keyless one, such as ``SCRIPT LOAD`` after a ``NOSCRIPT``, to the node of the
    command before). :meth:`node_connections` gives the connection of every primary, to
    read each one's run id. As the canary, it is dead if any of its connections is.
    """

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._connections: dict[str, Any] = {}
        self._last: str | None = None
        self._args: tuple[Any, ...] = ()

    def _connection(self, node: ClusterNode) -> Any:
        connection = self._connections.get(node.name)
        if connection is None:
            connection = self._gateway._connect_node(node)
            connection.connect()
            self._connections[node.name] = connection
        return connection

    def connect(self) -> None:
        """Connect to every primary (each connection's hook checks the node's run id)."""
        for node in self._gateway.primaries():
            self._connection(node)

    def node_connections(self) -> list[Any]:
        """Return a connection to every primary, in the order of their names."""
        nodes = sorted(self._gateway.primaries(), key=lambda node: node.name)
        return [self._connection(node) for node in nodes]

    def send_command(self, *args: Any) -> None:
        """Send one command to the node owning its key."""
        key = _command_key(args)
        if key is None and self._last is not None and self._last in self._connections:
            name = self._last
        else:
            node = self._gateway._node_for(key)
            self._connection(node)
            name = node.name
        self._last = name
        self._args = args
        self._connections[name].send_command(*args)

    def read_response(self) -> Any:
        """Read the reply of the command sent last, following a migrating slot's replies.

        ``ASK``: the command is sent once to the named node, after ``ASKING``.
        ``TRYAGAIN`` to a ``bump.lua`` call of several keys: sent again one key per call,
        the replies added up (as :meth:`Gateway.finish_held` does). Other errors raise.
        """
        assert self._last is not None, "read_response() before send_command()"
        args = self._args
        try:
            return self._connections[self._last].read_response()
        except MovedError:
            raise
        except AskError as exc:
            try:
                return self._asking(exc, args)
            except TryAgainError:
                return self._per_key(args)
        except TryAgainError:
            return self._per_key(args)

    def _asking(self, exc: AskError, args: tuple[Any, ...]) -> Any:
        node = self._gateway._redirect_node(exc)
        connection = self._connection(node)
        self._last = node.name
        for attempt in (0, 1):
            connection.send_command("ASKING")
            connection.read_response()
            connection.send_command(*args)
            try:
                return connection.read_response()
            except NoScriptError:
                if attempt:
                    raise
                for script in (READ, FILL, BUMP, RELEASE):
                    connection.send_command("SCRIPT", "LOAD", script.source)
                    connection.read_response()
        raise AssertionError("unreachable")

    def _per_key(self, args: tuple[Any, ...]) -> Any:
        parts = _bump_per_key(pack(*args))
        if parts is None:
            raise TryAgainError(f"TRYAGAIN for {_command_name(args)!r}")
        total = 0
        for part in parts:
            self.send_command(*_parse_first(part))
            total += int(self.read_response())
        return total

    @property
    def _sock(self) -> Any:
        """``None`` if any node's connection is closed (what the canary check looks at)."""
        if not self._connections:
            return None
        for connection in self._connections.values():
            if getattr(connection, "_sock", None) is None:
                return None
        return True

    def can_read(self, timeout: float = 0) -> bool:
        """Return whether any node's idle connection has something to read (a close)."""
        return any(c.can_read(timeout=timeout) for c in self._connections.values())

    def disconnect(self) -> None:
        """Close every node's connection."""
        connections, self._connections = self._connections, {}
        for connection in connections.values():
            with contextlib.suppress(Exception):
                connection.disconnect()


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
