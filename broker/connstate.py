"""What a connection holds, and how it answers: its state, its replies, its deadlines, its close.

Theory of operation
-------------------
:class:`SessionState` is the base of :class:`~broker.session.Session`: it declares every slot a
session has (a worker holds tens of thousands of them) and the few operations every part of a
session uses. The classes built on it add behaviour only, no state: :mod:`broker.reads`
(subscriptions, history, presence), :mod:`broker.dispatch` (the request dispatcher and
the publish path) and :mod:`broker.session` (the serving loop and the close). Each layer
imports only the one below it, so the imports go one way; a method of a lower layer is found
on the session's class directly, with no call layer added.

Replies and pushes are framed here and appended to the connection's
:class:`~broker.sendqueue.SendQueue`; nothing here waits for the client to read. Every error
reply counts as a violation; past ``max_violations`` within ``VIOLATION_WINDOW`` seconds the
connection is closed with 4029. The session's deadlines (the idle timeout, the next server
ping, the in-band authentication deadline and the token's expiry) are kept by the worker's one
:class:`~broker.timers.Deadlines` task, which calls :meth:`SessionState.on_deadline`.
:meth:`SessionState.close` records the one reason a session ends for (the first given wins)
and cancels its serving loop. A session reaches its worker only through
:class:`~broker.sessionhost.SessionHost`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

import trio

from broker import protocol as p
from broker.auth import Identity
from broker.budget import TokenBucket
from broker.bus.base import ConnKey
from broker.router import Subscription
from broker.sessionhost import SessionHost
from broker.timers import Timer
from broker.wsserver import ServerWebSocket

__all__ = ["SessionState"]

VIOLATION_WINDOW = 10.0


class SessionState:
    """A connection's state and its answers (see the module docstring); the worker makes a
    :class:`~broker.session.Session`, never this class alone."""

    # Slots: a worker holds tens of thousands of sessions; a __dict__ each costs ~1 KiB.
    __slots__ = (
        "_published",
        "_scope",
        "bucket",
        "close_code",
        "close_reason",
        "conn_id",
        "expires_deadline",
        "identity",
        "key",
        "next_ping",
        "publishing",
        "queue",
        "reads",
        "started",
        "subs",
        "timer",
        "violations",
        "worker",
        "ws",
    )

    def __init__(
        self,
        # Any: the worker closes the Session it made (slow_consumer), a class this module
        # cannot name without importing it back.
        worker: SessionHost[Any],
        conn_id: int,
        ws: ServerWebSocket,
        identity: Identity | None,
    ) -> None:
        self.worker = worker
        self.conn_id = conn_id
        self.ws = ws
        self.queue = ws.queue
        self.identity = identity
        self.key = ConnKey(worker.node, worker.index, conn_id)
        cfg = worker.config
        now = trio.current_time()
        self.started = now
        self.subs: dict[str, Subscription] = {}
        # Refilled to when each publication's frame was read (_publish): full from the last
        # read before the session, so that its clock never runs backwards.
        self.bucket = TokenBucket(
            cfg.limits.publish_rate, cfg.limits.publish_burst, ws.last_receive
        )
        # The budget of history replies and `since` replays, in bytes: made on first use,
        # since most connections never ask for either.
        self.reads: TokenBucket | None = None
        self.violations: deque[float] | None = None  # made on the first error
        self.close_code: int | None = None
        self.close_reason = ""
        self._scope: trio.CancelScope | None = None
        self.timer: Timer | None = None
        self.publishing = 0  # publications handed to the bus, not answered yet
        self._published: trio.Event | None = None
        self.next_ping = now + cfg.timeouts.ping_interval
        self.expires_deadline = math.inf
        if identity is not None:
            self._set_expiry(identity)

    # --- the close ----------------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Ask the session to close with ``code``; the first reason given wins."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        if self._scope is not None:
            self._scope.cancel()

    # --- output -------------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        self.queue.send(p.frame_text(text.encode()))

    def reply(self, frame_id: p.FrameId, **fields: Any) -> None:
        if frame_id is not None:
            self.send_text(p.encode_reply(frame_id, **fields))

    def error(self, frame_id: p.FrameId, code: str, message: str) -> None:
        self.send_text(p.encode_error(frame_id, code, message))
        self.worker.count_error(code)
        now = trio.current_time()
        v = self.violations
        if v is None:
            v = self.violations = deque()
        v.append(now)
        while v and v[0] < now - VIOLATION_WINDOW:
            v.popleft()
        if len(v) > self.worker.config.limits.max_violations:
            self.close(p.CloseCode.TOO_MANY_VIOLATIONS, "too many protocol violations")

    def _welcome(self) -> None:
        assert self.identity is not None
        cfg = self.worker.config.timeouts
        self.send_text(
            p.encode_welcome(
                self.identity.client,
                self.identity.expires_at,
                self.worker.node,
                self.worker.index,
                cfg.ping_interval,
                cfg.idle_timeout,
            )
        )

    # --- timers -------------------------------------------------------------------------

    def _set_expiry(self, identity: Identity) -> None:
        if identity.expires_at is None:
            self.expires_deadline = math.inf
        else:
            self.expires_deadline = trio.current_time() + (identity.expires_at - time.time())

    def _reschedule(self) -> None:
        """(Re)compute when :meth:`on_deadline` is next due and tell the worker's deadlines."""
        if self.close_code is None:
            when = self.on_deadline(trio.current_time())
            if when is not None:
                self.worker.deadlines.schedule(self, when)

    def on_deadline(self, now: float) -> float | None:
        """Called by the worker's :class:`~broker.timers.Deadlines`: close the connection if
        it has been idle, unauthenticated or expired too long, send a ping when one is due;
        return when to be called next (None once closing)."""
        if self.close_code is not None:
            return None
        cfg = self.worker.config.timeouts
        idle_deadline = self.ws.last_receive + cfg.idle_timeout
        if now >= idle_deadline:
            self.close(p.CloseCode.IDLE_TIMEOUT, "idle timeout")
            return None
        auth_deadline = math.inf
        if self.identity is None:
            auth_deadline = self.started + cfg.auth_timeout
            if now >= auth_deadline:
                self.close(p.CloseCode.NOT_AUTHENTICATED, "not authenticated in time")
                return None
        if now >= self.expires_deadline:
            self.close(p.CloseCode.TOKEN_EXPIRED, "token expired")
            return None
        if now >= self.next_ping:
            self.queue.send(p.PING_FRAME)
            self.next_ping = now + cfg.ping_interval
        return min(idle_deadline, auth_deadline, self.expires_deadline, self.next_ping)
