"""Simulated users: HTTP clients with their own cookie jars, writing, reading, passing tokens.

A user process (:func:`run_users`) runs one thread per user until a deadline. Each user
owns a counter (sharded) and a note (``default``) and picks, at random, one of:

* ``write``: set its row of one kind to its next sequence number (``POST /soak/write``);
  its cookie jar keeps the consistency cookie the middleware returns;
* ``own`` read: read its own row (``GET /soak/read``), a random mix of uncached and cached
  reads in one request; it must see at least its last acknowledged write;
* ``token`` read: read a peer's row sending the token the peer published after its last
  acknowledged write (``X-DBScale-Position``); it must see at least that write;
* ``peer`` read: a cached read of a peer's row with no token (only checked for stale hits);
* after a write, sometimes hand the token to the background worker (:mod:`soak.worker`).

Every operation is logged (:class:`~soak.oplog.OpLog`), failures included.
"""

from __future__ import annotations

import http.cookiejar
import json
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

TOKEN_HEADER = "X-DBScale-Position"
KINDS = ("counter", "note")
READ_SEQS = ("u", "c", "uc", "cu", "ucu", "cuc")
#: (operation, weight)
MIX = (("write", 34), ("own", 36), ("token", 16), ("peer", 6), ("handoff", 8))
TIMEOUT = 20.0


class Mailbox:
    """The latest token each user published, with the values it guarantees (per process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[int, tuple[str, dict[str, int]]] = {}

    def publish(self, user: int, token: str, values: dict[str, int]) -> None:
        with self._lock:
            self._latest[user] = (token, dict(values))

    def pick(self, rng: random.Random, exclude: int) -> tuple[int, str, dict[str, int]] | None:
        with self._lock:
            peers = [u for u in self._latest if u != exclude]
            if not peers:
                return None
            peer = rng.choice(peers)
            token, values = self._latest[peer]
            return peer, token, values


def _request(
    opener: urllib.request.OpenerDirector,
    url: str,
    data: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], str | None]:
    """Return ``(status, json body, token header)``; status 0 for a transport error."""
    body = None if data is None else urllib.parse.urlencode(data).encode()
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with opener.open(req, timeout=TIMEOUT) as resp:
            return resp.status, json.loads(resp.read()), resp.headers.get(TOKEN_HEADER)
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read())
        except ValueError:
            payload = {"error": f"HTTP {exc.code}"}
        return exc.code, payload, None
    except (OSError, ValueError) as exc:
        return 0, {"error": f"{type(exc).__name__}: {exc}"}, None


class User:
    """One simulated user: its own cookie jar, sequence numbers and log."""

    def __init__(
        self,
        user: int,
        base_url: str,
        log: Any,
        mailbox: Mailbox,
        handoff: Any,
        users: list[int],
        seed: int,
    ) -> None:
        self.user = user
        self.base_url = base_url
        self.log = log
        self.mailbox = mailbox
        self.handoff = handoff
        self.users = users
        self.rng = random.Random(seed)
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )
        self.next_value = dict.fromkeys(KINDS, 1)
        self.acked = dict.fromkeys(KINDS, 0)
        self.last_token: str | None = None

    def run(self, deadline: float) -> None:
        ops = [op for op, _ in MIX]
        weights = [weight for _, weight in MIX]
        while time.monotonic() < deadline:
            op = self.rng.choices(ops, weights)[0]
            if op == "write":
                self.write(self.rng.choice(KINDS))
            elif op == "own":
                self.read("own", self.user, self.rng.choice(KINDS), None, None)
            elif op == "token":
                picked = self.mailbox.pick(self.rng, self.user)
                if picked is None:
                    continue
                peer, token, values = picked
                kind = self.rng.choice(KINDS)
                self.read("token", peer, kind, token, values[kind])
            elif op == "peer":
                peer = self.rng.choice(self.users)
                self.read("peer", peer, self.rng.choice(KINDS), None, None, seq="c")
            elif self.last_token is not None and self.handoff is not None:
                kind = self.rng.choice(KINDS)
                item = (self.user, self.last_token, kind, self.acked[kind])
                try:
                    self.handoff.put_nowait(item)
                except Exception:  # a full queue: the worker is behind; skip
                    continue

    def write(self, kind: str) -> None:
        value = self.next_value[kind]
        self.next_value[kind] += 1
        t0 = time.monotonic()
        status, body, token = _request(
            self.opener,
            f"{self.base_url}/soak/write",
            {"user": self.user, "kind": kind, "value": value},
        )
        t1 = time.monotonic()
        ok = status == 200
        self.log.write(
            {
                "op": "write",
                "user": self.user,
                "kind": kind,
                "target": self.user,
                "value": value,
                "t0": t0,
                "t1": t1,
                "ok": ok,
                "status": status,
                "db": body.get("db"),
                "lsn": body.get("lsn"),
                "error": body.get("error"),
                "where": body.get("where"),
            }
        )
        if ok:
            self.acked[kind] = value
            if token:
                self.last_token = token
                self.mailbox.publish(self.user, token, self.acked)

    def read(
        self,
        mode: str,
        target: int,
        kind: str,
        token: str | None,
        floor: int | None,
        seq: str | None = None,
    ) -> None:
        seq = seq or self.rng.choice(READ_SEQS)
        query = urllib.parse.urlencode({"target": target, "kind": kind, "seq": seq})
        headers = {TOKEN_HEADER: token} if token else None
        t0 = time.monotonic()
        status, body, _ = _request(self.opener, f"{self.base_url}/soak/read?{query}", None, headers)
        t1 = time.monotonic()
        self.log.write(
            {
                "op": "read",
                "user": self.user,
                "mode": mode,
                "kind": kind,
                "target": target,
                "seq": seq,
                "floor": floor,
                "t0": t0,
                "t1": t1,
                "ok": status == 200,
                "status": status,
                "reads": body.get("reads", []),
                "error": body.get("error"),
                "where": body.get("where"),
            }
        )


def run_users(
    user_ids: list[int],
    all_users: list[int],
    base_url: str,
    log_dir: str,
    deadline: float,
    handoff: Any,
    seed: int,
) -> None:
    """Run *user_ids* as threads until *deadline* (``time.monotonic()``); one log each."""
    from soak.oplog import OpLog

    mailbox = Mailbox()
    logs = [OpLog(Path(log_dir) / f"user-{user}.jsonl") for user in user_ids]
    threads = [
        threading.Thread(
            target=User(user, base_url, log, mailbox, handoff, all_users, seed * 1000 + user).run,
            args=(deadline,),
            name=f"soak-user-{user}",
        )
        for user, log in zip(user_ids, logs, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for log in logs:
        log.close()
