"""Loopback TCP forwarder with fault injection, used in front of replicas and Redis.

A :class:`TcpProxy` listens on a local port and forwards every accepted connection to one
target address. It has three modes:

* forwarding (the default, restored by :meth:`TcpProxy.heal`): bytes are copied both ways;
* cut (:meth:`TcpProxy.cut`): every live connection is closed at once and every new one is
  accepted and immediately reset, so clients fail fast instead of hanging;
* blackhole (:meth:`TcpProxy.blackhole`): connections are accepted (and live ones kept open)
  but no byte is forwarded in either direction, so clients run into their own timeouts.
  Data sent meanwhile stays buffered and flows again after :meth:`TcpProxy.heal`.

Only the standard library is used. One daemon thread accepts; one daemon thread per
connection pumps both directions.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Literal

__all__ = ["TcpProxy"]

Mode = Literal["forward", "cut", "blackhole"]

_CHUNK = 65536
_POLL_INTERVAL = 0.05
_CONNECT_TIMEOUT = 5.0


def _reset_close(sock: socket.socket) -> None:
    """Close ``sock`` with SO_LINGER 0 so the peer sees a reset, ignoring every error."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Connection:
    """One proxied client connection and its upstream socket."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.aborted = threading.Event()

    def abort(self) -> None:
        """Shut both sockets down so the pump thread wakes up, closes them and exits."""
        self.aborted.set()
        for sock in (self.client, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class TcpProxy:
    """Forward a loopback port to ``target_host:target_port`` with cut/blackhole faults.

    The listening socket is bound in the constructor (``listen_port=0`` picks a free port,
    readable afterwards as :attr:`listen_port`) and forwarding starts immediately. Call
    :meth:`close` to stop listening and drop every connection; a closed proxy cannot be
    reopened.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        name: str = "",
    ) -> None:
        """Bind the listening socket and start the accept thread."""
        self.target_host = target_host
        self.target_port = target_port
        self.name = name or f"{target_host}:{target_port}"
        self._mode: Mode = "forward"
        self._closed = False
        self._cond = threading.Condition()
        self._conns: set[_Connection] = set()
        self._threads: set[threading.Thread] = set()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((listen_host, listen_port))
            self._listener.listen(128)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self.listen_host: str = self._listener.getsockname()[0]
        self.listen_port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"TcpProxy[{self.name}]", daemon=True
        )
        self._accept_thread.start()

    def __repr__(self) -> str:
        """Describe the proxy's addresses and mode."""
        return (
            f"<TcpProxy {self.name} {self.listen_host}:{self.listen_port} -> "
            f"{self.target_host}:{self.target_port} mode={self._mode}>"
        )

    # -- public API ---------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        """Return the current mode: ``"forward"``, ``"cut"`` or ``"blackhole"``."""
        return self._mode

    @property
    def active_connections(self) -> int:
        """Return the number of client connections currently held open by the proxy."""
        with self._cond:
            return len(self._conns)

    def cut(self) -> None:
        """Close every live connection now and reset every new one until :meth:`heal`."""
        with self._cond:
            self._mode = "cut"
            conns = list(self._conns)
            self._cond.notify_all()
        for conn in conns:
            conn.abort()

    def blackhole(self) -> None:
        """Stop forwarding in both directions (connections stay open) until :meth:`heal`."""
        with self._cond:
            self._mode = "blackhole"
            self._cond.notify_all()

    def heal(self) -> None:
        """Resume normal forwarding for new connections and blackholed live ones."""
        with self._cond:
            self._mode = "forward"
            self._cond.notify_all()

    def retarget(self, target_host: str, target_port: int) -> None:
        """Fail over: drop every live connection and send new ones to another server."""
        with self._cond:
            self.target_host = target_host
            self.target_port = target_port
            conns = list(self._conns)
        for conn in conns:
            conn.abort()

    @contextlib.contextmanager
    def cut_off(self) -> Iterator[TcpProxy]:
        """Cut the proxy for the duration of the ``with`` block, then heal it."""
        self.cut()
        try:
            yield self
        finally:
            self.heal()

    @contextlib.contextmanager
    def blackholed(self) -> Iterator[TcpProxy]:
        """Blackhole the proxy for the duration of the ``with`` block, then heal it."""
        self.blackhole()
        try:
            yield self
        finally:
            self.heal()

    def close(self) -> None:
        """Stop listening, drop every connection and join the threads; idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
            self._cond.notify_all()
        for conn in conns:
            conn.abort()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._accept_thread.join(timeout=5)
        with self._cond:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)
        for sock in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()

    # -- internals ----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r or self._closed:
                        return
                    try:
                        client, _addr = self._listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        if self._closed:
                            return
                        continue
                    self._on_accept(client)
        except Exception:  # a proxy thread must never raise into the runtime
            return
        finally:
            sel.close()

    def _on_accept(self, client: socket.socket) -> None:
        client.setblocking(True)
        with self._cond:
            if self._mode == "cut" or self._closed:
                _reset_close(client)
                return
            conn = _Connection(client)
            self._conns.add(conn)
            thread = threading.Thread(
                target=self._serve, args=(conn,), name=f"TcpProxy[{self.name}]-conn", daemon=True
            )
            self._threads.add(thread)
        thread.start()

    def _wait_while_blackholed(self, conn: _Connection) -> bool:
        """Block while in blackhole mode; return False when the connection must end."""
        with self._cond:
            while self._mode == "blackhole" and not self._closed and not conn.aborted.is_set():
                self._cond.wait()
            return self._mode == "forward" and not self._closed and not conn.aborted.is_set()

    def _serve(self, conn: _Connection) -> None:
        try:
            self._pump(conn)
        except Exception:  # a proxy thread must never raise
            pass
        finally:
            _reset_close(conn.client)
            if conn.upstream is not None:
                _reset_close(conn.upstream)
            with self._cond:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())

    def _pump(self, conn: _Connection) -> None:
        if not self._wait_while_blackholed(conn):
            return
        try:
            upstream = socket.create_connection(
                (self.target_host, self.target_port), timeout=_CONNECT_TIMEOUT
            )
        except OSError:
            return
        upstream.settimeout(None)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError):
            conn.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._cond:
            conn.upstream = upstream
            if conn.aborted.is_set() or self._mode == "cut" or self._closed:
                return
        peer = {conn.client: upstream, upstream: conn.client}
        with selectors.DefaultSelector() as sel:
            sel.register(conn.client, selectors.EVENT_READ)
            sel.register(upstream, selectors.EVENT_READ)
            while True:
                if not self._wait_while_blackholed(conn):
                    return
                events = sel.select(timeout=_POLL_INTERVAL)
                if self._mode != "forward" or conn.aborted.is_set():
                    # Re-check before reading so a blackhole takes effect immediately.
                    continue
                for key, _ in events:
                    src = key.fileobj
                    assert isinstance(src, socket.socket)
                    try:
                        data = src.recv(_CHUNK)
                    except OSError as exc:
                        if exc.errno in (errno.EAGAIN, errno.EINTR):
                            continue
                        return
                    if not data:
                        return
                    peer[src].sendall(data)
