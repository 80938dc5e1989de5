"""One client connection, from the accepted upgrade to the close.

Theory of operation
-------------------
A session is one task, the *reader*: it takes the client's messages from
:class:`~broker.wsserver.ServerWebSocket`, parses them with :mod:`broker.protocol` and
executes them. The hot path, a publication the bus takes without waiting, is served in plain
calls from the bytes already read (:meth:`Session._serve_now`): no coroutine, and no closure
when it has no ``id``; everything else is awaited. Its deadlines (the idle timeout, the next server ping, the in-band
authentication deadline and the token's expiry) are kept by the worker's one
:class:`~broker.timers.Deadlines` task, which calls :meth:`Session.on_deadline`. Replies and
pushes are framed here and appended to the connection's :class:`~broker.sendqueue.SendQueue`;
nothing in a session waits for the client to read, except a replay (a ``since`` or a
``history`` reply larger than the queue may hold), which :mod:`broker.replay` paces by what
the client reads. A session reaches its worker only through
:class:`~broker.sessionhost.SessionHost` (the worker imports this module, never the reverse).

No connection holds the worker: the reader serves its client in turns (``TURN_MESSAGES``
requests, or ``TURN_BYTES`` of replies queued) and yields between them, and waits for a turn's
replies to be written before the next when they are large, so a pipelining client is served as
fast as it reads. A connection that is closing, or whose queue overflowed, is served nothing
more of what it sent. ``history`` replies and ``since`` replays are charged, by the bytes they
send, to the connection's read budget (a :class:`~broker.budget.TokenBucket`); past it they
are refused with ``rate_limited``. A replay is charged page by page as it goes out, and one
under way is never refused halfway.

A session ends for exactly one reason, recorded once by :meth:`Session.close`: the client
closed, the timer fired (4009, 4001, 4003), the client was too slow (4008), too abusive (4029),
its client id holds too many connections (4029), it had not authenticated when room was needed
or the worker is full (1013), its permissions were revoked (1008), or the worker is shutting
down (1001). Whatever happens, its subscriptions and presence are removed before the task
returns.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
import trio
import trio.lowlevel

from broker import protocol as p
from broker.auth import Identity
from broker.budget import TokenBucket
from broker.bus.base import ConnKey, HistoryResult, Publication, StreamPosition
from broker.errors import AuthError, BusUnavailable, FrameError, WebSocketViolation
from broker.frames import ABNORMAL_CLOSURE
from broker.replay import (
    HistoryPager,
    history_reply,
    position_fields,
    reply_budget,
    stitch,
)
from broker.router import Subscription
from broker.sessionhost import SessionHost
from broker.timers import Timer
from broker.topics import is_wildcard, validate_pattern, validate_topic
from broker.wsserver import ServerWebSocket

__all__ = ["Session"]

log = structlog.get_logger()
VIOLATION_WINDOW = 10.0
CLOSE_GRACE = 2.0  # how long a close frame may take to go out before the socket is dropped
CLEANUP_TIMEOUT = 5.0  # how long a closing connection may wait on the bus to tidy up
ABORTED = ABNORMAL_CLOSURE  # the socket failed: no close frame can be sent, only released

# A reader's turn: after this many messages, or once it has queued this many bytes for its
# client, it yields so that the worker's other connections run. One read (RECEIVE_SIZE,
# 64 KiB) can hold a thousand pipelined requests; served in one go, expensive ones (history)
# would hold every other connection of the worker for as long as they take: TURN_BYTES ends
# those turns early. Cheap ones are bounded by the count, kept high because a yield in the
# middle of a publisher's burst lets the flusher write it in pieces (64 took the many-topics
# bench from 35 deliveries per write to 10); publishes are bounded by publish_burst anyway.
TURN_MESSAGES = 1024
TURN_BYTES = 256 * 1024


class Session:
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
        worker: SessionHost[Session],
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

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes; never raises (except Cancelled)."""
        cfg = self.worker.config
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                if self.close_code is not None:  # closed before we started (slow already?)
                    scope.cancel()
                if self.identity is not None:
                    self._welcome()
                self._reschedule()
                ws = self.ws
                queue = self.queue
                served = 0  # messages served in this turn
                turn_start = queue.appended
                while True:
                    if self.close_code is not None or queue.overflowed:
                        # Condemned: nothing more it sent (however much is buffered) is
                        # parsed or served.
                        await self._await_close()
                        break
                    try:
                        # What the last read holds is taken without a coroutine: a burst of
                        # publications costs no await per message.
                        message = ws.buffered_message()
                        if message is None:
                            message = await ws.next_message()
                    except WebSocketViolation as exc:
                        self.close(exc.code, exc.reason)
                        break
                    if message is None:  # the client closed, or went away
                        break
                    left = self._serve_now(message)
                    if left is not None:
                        await left
                    # Not kept while the connection waits, idle, for its next message.
                    del message, left
                    served += 1
                    if served >= TURN_MESSAGES or queue.appended - turn_start >= TURN_BYTES:
                        # The turn ends: others run (and a session closed meanwhile stops).
                        if queue.queued >= TURN_BYTES:
                            # Its replies are not out yet: serve it more only once they are.
                            # A client that keeps asking and does not read what it asked for
                            # is then held back by TCP, then a slow consumer (write_timeout).
                            await queue.wait_drained()
                        else:
                            await trio.lowlevel.checkpoint()
                        served = 0
                        turn_start = queue.appended
        finally:
            self.worker.deadlines.cancel(self)
            with trio.CancelScope(shield=True):
                await self._cleanup()
                await self._finish_close(cfg.timeouts.write_timeout)

    async def _await_close(self) -> None:
        """Serve nothing until the close decided for this connection takes effect.

        A slow consumer is closed by the worker's closer, paced with the others
        (:meth:`~broker.worker.Worker.slow_consumer`): its :meth:`close` cancels this wait.
        Should that never come, the idle timer ends the connection, as nothing is read now."""
        if self.close_code is None:
            await trio.sleep_forever()

    # --- what the send queue reports (see Worker._connection) -----------------------------

    def on_slow(self, reason: str) -> None:
        self.worker.slow_consumer(self, reason)

    def on_broken(self, reason: str) -> None:
        self.close(ABORTED, reason)

    def make_room(self) -> None:
        """Dropped, still unauthenticated, to make room for newer connections (see
        :mod:`broker.slots`): 1013, try again later (not 4001, which clients take as fatal)."""
        self.close(
            p.CloseCode.TRY_AGAIN_LATER,
            "too many connections waiting to authenticate; try again later",
        )

    def close(self, code: int, reason: str) -> None:
        """Ask the session to close with ``code``; the first reason given wins."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        if self._scope is not None:
            self._scope.cancel()

    async def _finish_close(self, grace: float) -> None:
        ws = self.ws
        code = self.close_code
        if code is None:
            remote = ws.remote_close
            log.info(
                "disconnect",
                code=ws.remote_code,
                reason=remote[1] if remote else "",
                initiator="client",
            )
            if self.queue.queued:  # (no cancel scope for a client that is simply gone)
                with trio.move_on_after(min(grace, CLOSE_GRACE)):
                    await self.queue.wait_drained()  # our answer to its close frame
        else:
            log.info("disconnect", code=code, reason=self.close_reason, initiator="server")
            self.worker.count_close(code)
            if code != ABORTED and ws.send_close(code, self.close_reason):
                with trio.move_on_after(min(grace, CLOSE_GRACE)):
                    await ws.finish_close()
        # However the close handshake went, release the socket now.
        await ws.aclose()

    async def _cleanup(self) -> None:
        subs = list(self.subs.values())
        self.subs.clear()
        # Out of the router at once, whatever the bus does: no publication is framed for
        # this connection from now on, and nothing of it stays in the index.
        for sub in subs:
            self.worker.router.detach(sub)
        if not subs:
            return
        with trio.move_on_after(CLEANUP_TIMEOUT):
            for sub in subs:
                await self._release(sub)

    async def _drop_subscription(self, sub: Subscription) -> None:
        self.worker.router.detach(sub)
        with trio.move_on_after(CLEANUP_TIMEOUT):
            await self._release(sub)

    async def _release(self, sub: Subscription) -> None:
        """Tell the bus what a detached subscription no longer needs."""
        worker = self.worker
        try:
            await worker.router.unwatch_if_unused(sub.pattern)
            if sub.tracked and self.identity is not None:
                await worker.bus.presence_leave(sub.pattern, self.identity.client, self.key)
        except BusUnavailable:
            pass  # a bus that comes back forgets or expires this connection's presence

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

    # --- input --------------------------------------------------------------------------

    def _serve_now(self, message: str | bytes) -> Coroutine[Any, Any, None] | None:
        """Parse and carry out one client frame as far as that needs no waiting; every failure
        becomes an error reply. Returns what is left, to be awaited at once (None when
        nothing is): a publication the bus takes without waiting, the hot path, is served
        here whole, without a coroutine."""
        try:
            command = p.parse_command(message)
        except FrameError as exc:
            return self._fail(exc.frame_id, exc, "parse")
        if type(command) is not p.Publish or self.identity is None:
            return self._serve(command)
        try:
            if self._publish(command):
                return None
        except Exception as exc:
            return self._fail(command.id, exc, "publish")
        return self._serve(command)

    async def _serve(self, command: p.Command) -> None:
        """Carry out ``command`` (a publication here only when the bus must be awaited)."""
        try:
            await self._execute(command)
        except Exception as exc:
            left = self._fail(command.id, exc, type(command).__name__.lower())
            if left is not None:
                await left

    def _fail(
        self, frame_id: p.FrameId, exc: BaseException, op: str
    ) -> Coroutine[Any, Any, None] | None:
        """Answer a request that failed with ``exc`` (:meth:`_answer_failure`) once every
        pipelined publication is answered, so that replies stay in request order: returns the
        wait for those, to be awaited at once, when some are unanswered."""
        if self.publishing:
            return self._fail_in_order(frame_id, exc, op)
        self._answer_failure(frame_id, exc, op)
        return None

    async def _fail_in_order(self, frame_id: p.FrameId, exc: BaseException, op: str) -> None:
        await self._settle_publishes()
        self._answer_failure(frame_id, exc, op)

    def _answer_failure(self, frame_id: p.FrameId, exc: BaseException, op: str) -> None:
        """The error reply to a request that failed with ``exc``: :class:`FrameError` with its
        code, :class:`BusUnavailable` with ``unavailable``, anything else (logged once) with
        ``internal``."""
        if isinstance(exc, FrameError):
            self.error(frame_id, exc.code, exc.message)
        elif isinstance(exc, BusUnavailable):
            self.error(frame_id, "unavailable", "the message bus is unavailable; try again")
        else:
            log.error("internal_error", op=op, exc_info=exc)
            self.error(frame_id, "internal", "internal error; the request was not carried out")

    async def _settle_publishes(self) -> None:
        """Wait until every pipelined publication has been answered (replies stay in order)."""
        while self.publishing:
            self._published = trio.Event()
            await self._published.wait()

    async def _execute(self, command: p.Command) -> None:
        if isinstance(command, p.Publish) and self.identity is not None:
            # The bus must be awaited (_serve_now did the rest): one publication at a time.
            self.publishing += 1
            try:
                pub = await self.worker.bus.publish(
                    command.topic, command.data, self.identity.client
                )
            finally:
                # Answered here or by _fail, never by _on_published.
                self._settle()
            self._on_published(command.id, pub)
            return
        await self._settle_publishes()
        if isinstance(command, p.Auth):
            await self._auth(command)
            return
        if self.identity is None:
            raise FrameError("unauthorized", 'authenticate first: send {"op":"auth","token":...}')
        if isinstance(command, p.Subscribe):
            await self._subscribe(command)
        elif isinstance(command, p.Unsubscribe):
            await self._unsubscribe(command)
        elif isinstance(command, p.Ping):
            self.reply(command.id)
        elif isinstance(command, p.History):
            await self._history(command)
        elif isinstance(command, p.Presence):
            await self._presence(command)

    async def _auth(self, cmd: p.Auth) -> None:
        worker = self.worker
        try:
            identity = worker.verifier.verify(cmd.token)
        except AuthError as exc:
            worker.count_auth_failure(exc.reason)
            log.info("auth_failed", reason=exc.reason, source="inband")
            self.error(cmd.id, "unauthorized", str(exc))
            if self.identity is None:
                self.close(p.CloseCode.NOT_AUTHENTICATED, "authentication failed")
            return
        if self.identity is None:
            refused = worker.slots.admit(self.conn_id, identity.client)
            if refused is not None:
                code, error_code, message = worker.refusal(refused)
                log.info("refused", reason=refused, client=identity.client, source="inband")
                self.error(cmd.id, error_code, message)
                self.close(code, message)
                return
            self.identity = identity
            self._set_expiry(identity)
            self._reschedule()
            structlog.contextvars.bind_contextvars(client=identity.client)
            log.info("authenticated", source="inband")
            self._welcome()
        else:
            if identity.client != self.identity.client:
                raise FrameError(
                    "unauthorized", "a refreshed token must name the same client (sub)"
                )
            self.identity = identity
            self._set_expiry(identity)
            self._reschedule()
            for pattern, sub in self.subs.items():
                if not identity.subscribe.allows_pattern(pattern):
                    self.close(
                        p.CloseCode.POLICY_VIOLATION, f"no longer allowed to subscribe to {pattern}"
                    )
                    return
                if sub.presence and not identity.presence.allows_topic(pattern):
                    self.close(
                        p.CloseCode.POLICY_VIOLATION,
                        f"no longer allowed to read the presence of {pattern}",
                    )
                    return
        self.reply(cmd.id, client=identity.client, expires_at=identity.expires_at)

    def _publish(self, cmd: p.Publish) -> bool:
        """Check ``cmd`` and hand it to the bus without waiting, if the bus can: True then
        (the bus answers through :meth:`_on_published`, in order), False when the caller must
        await the bus instead (:meth:`_execute`). Raises :class:`FrameError` (``bad_topic``,
        ``forbidden``, ``too_large``, ``rate_limited``) when it is refused."""
        identity = self.identity
        assert identity is not None
        topic = validate_topic(cmd.topic)
        if not identity.publish.allows_topic(topic):
            raise FrameError("forbidden", f"not allowed to publish to {topic}")
        limits = self.worker.config.limits
        data = cmd.data
        if len(data) > limits.max_data_size or not data.isascii():  # else it passes
            p.check_data_size(data, limits.max_data_size)
        # Refilled up to when the frame was read, not now: never later than now, so never
        # looser, and without a clock read per publication.
        if not self.bucket.take(self.ws.last_receive):
            raise FrameError(
                "rate_limited", f"publish rate limit is {limits.publish_rate:g}/s; slow down"
            )
        # Pipelined where the bus allows it: the reader goes on with the next frame while the
        # publication travels, so a burst of publications reaches the bus (and then every
        # subscriber) together. The bus answers publications in order, and any other op waits
        # for them first (_execute), so replies still come in request order. Without an id
        # nothing but the count needs answering, and no closure is made.
        frame_id = cmd.id
        self.publishing += 1
        if frame_id is None:
            done: Callable[[Publication | BaseException], None] = self._on_published_anonymous
        else:

            def done(result: Publication | BaseException) -> None:
                self._settle()
                self._on_published(frame_id, result)

        taken = False
        try:
            taken = self.worker.bus.publish_nowait(topic, data, identity.client, done)
        finally:
            if not taken:  # to be awaited (_execute), or failed: not pipelined after all
                self.publishing -= 1
        return taken

    def _settle(self) -> None:
        """One pipelined publication is answered."""
        self.publishing -= 1
        if not self.publishing and self._published is not None:
            self._published.set()

    def _on_published_anonymous(self, result: Publication | BaseException) -> None:
        self._settle()
        if type(result) is not Publication:
            self._on_published(None, result)

    def _on_published(self, frame_id: p.FrameId, result: Publication | BaseException) -> None:
        """Answer a publication the bus has settled with ``result``."""
        if isinstance(result, Publication):
            if frame_id is not None:
                self.send_text(p.encode_published(frame_id, result.offset, result.epoch))
        else:
            # too_many_topics from the bus, or a failure. Its turn is now: the bus answers in
            # order, so every publication before it is answered already.
            self._answer_failure(frame_id, result, "publish")

    async def _subscribe(self, cmd: p.Subscribe) -> None:
        assert self.identity is not None
        pattern = validate_pattern(cmd.topic)
        wildcard = is_wildcard(pattern)
        if wildcard and cmd.since is not None:
            raise FrameError("bad_request", "'since' needs an exact topic; offsets are per topic")
        if wildcard and cmd.presence:
            raise FrameError("bad_request", "'presence' needs an exact topic")
        if not self.identity.subscribe.allows_pattern(pattern):
            raise FrameError("forbidden", f"not allowed to subscribe to {pattern}")
        if cmd.presence:
            self._check_presence(pattern)
        if pattern in self.subs:
            raise FrameError("bad_request", f"already subscribed to {pattern}; unsubscribe first")
        limit = self.worker.config.limits.max_subscriptions
        if len(self.subs) >= limit:
            raise FrameError(
                "too_many_subscriptions", f"at most {limit} subscriptions per connection"
            )
        # A replay is charged like a history reply; over the budget, nothing is subscribed
        # (the client retries later, with the same `since`).
        reads = None if cmd.since is None else self._read_budget("subscribe")
        bus = self.worker.bus
        tracked = not wildcard and self.worker.config.presence.tracks(pattern)
        sub = Subscription(
            self.queue, pattern, cmd.presence, pending=None if wildcard else [], tracked=tracked
        )
        self.subs[pattern] = sub
        try:
            await self.worker.router.add(sub)
            if wildcard:
                self.reply(cmd.id, topic=pattern, offset=None, epoch=None)
                return
            since = None if cmd.since is None else StreamPosition(cmd.since.offset, cmd.since.epoch)
            pager: HistoryPager | None = None
            if since is None:
                result = HistoryResult((), await bus.position(pattern), True, None)
            else:
                pager = HistoryPager(bus, pattern, since)
                result = await pager.first()
        except BaseException:
            self.subs.pop(pattern, None)
            if sub in self.worker.router.index.exact.get(pattern, {}):
                with trio.CancelScope(shield=True), contextlib.suppress(BusUnavailable):
                    await self.worker.router.remove(sub)
            raise
        # Stitch: the reply, the replayed history up to the position the reply announces, then
        # what arrived live meanwhile (held in pending) and is not covered by that position.
        # The replay is paced by what the client reads (broker.replay), so it may take a while;
        # live publications wait in pending, bounded, and go out in order after it.
        self.reply(cmd.id, topic=pattern, **position_fields(result, since))

        def on_page(sent: int) -> None:
            # Charged as it goes; a replay under way is never refused halfway. A client
            # reading it is alive, whatever the time since its last frame.
            if reads is not None:
                reads.charge(sent)
            self.ws.last_receive = trio.current_time()

        worker = self.worker
        queue = self.queue
        try:
            complete = await stitch(
                queue, sub, bus, result, pager, on_page, worker.count_replay_refill, worker.router
            )
        except Exception:  # the bus failed (or worse) mid-replay, after the reply went out
            log.exception("replay_failed", topic=pattern)
            worker.count_replay("failed")
            self.close(p.CloseCode.INTERNAL_ERROR, "the replay failed; resubscribe with since")
            return
        if not complete:
            # The history moved on past the replay (the client read slower than the window
            # moves): it cannot go on exactly. What was queued goes out first, so that the
            # client resumes after it (and learns exactly what is gone).
            worker.count_replay("overtaken")
            await queue.wait_drained()
            queue.overflow("history_overtaken")
        elif since is not None:
            worker.count_replay("cut_off" if queue.overflowed or queue.closed else "complete")
        # Join after the reply, so that the client's own join event (and everyone else's from
        # now on) reaches it after it knows it is subscribed.
        if not tracked:
            return
        try:
            await bus.presence_join(pattern, self.identity.client, self.key)
        except BusUnavailable:
            log.warning("presence_join_failed", topic=pattern)

    async def _unsubscribe(self, cmd: p.Unsubscribe) -> None:
        pattern = validate_pattern(cmd.topic)
        sub = self.subs.pop(pattern, None)
        if sub is None:
            raise FrameError("not_subscribed", f"not subscribed to {pattern}")
        await self._drop_subscription(sub)
        self.reply(cmd.id)

    def _readable_topic(self, topic: str) -> str:
        assert self.identity is not None
        topic = validate_topic(topic)
        if not self.identity.subscribe.allows_topic(topic):
            raise FrameError("forbidden", f"not allowed to read {topic}")
        return topic

    def _read_budget(self, op: str) -> TokenBucket:
        """The connection's budget for history replies and replays, which the caller charges
        with what it sends. Raises :class:`FrameError` (``rate_limited``, counted per ``op``)
        while the budget is spent."""
        limits = self.worker.config.limits
        now = trio.current_time()
        reads = self.reads
        if reads is None:
            reads = self.reads = TokenBucket(limits.read_rate_bytes, limits.read_burst_bytes, now)
        if not reads.has_credit(now):
            self.worker.count_read_refusal(op)
            raise FrameError(
                "rate_limited",
                f"history and replays are limited to {limits.read_rate_bytes} bytes/s; slow down",
            )
        return reads

    async def _history(self, cmd: p.History) -> None:
        topic = self._readable_topic(cmd.topic)
        if cmd.id is None:
            return  # its one effect would be the reply, which nobody asked for
        reads = self._read_budget("history")
        since = None if cmd.since is None else StreamPosition(cmd.since.offset, cmd.since.epoch)
        # One reply frame, at most half the queue's bound, so that a client that reads its
        # replies is never a slow consumer for asking; it reads on with `since`. Pipelined
        # requests are paced by the turns (run), which wait for a large reply to be written.
        queue = self.queue
        pager = HistoryPager(self.worker.bus, topic, since, cmd.limit, newest=cmd.newest)
        frame = await history_reply(pager, cmd.id, reply_budget(queue.max_bytes))
        reads.charge(len(frame))
        queue.send(frame)

    def _check_presence(self, topic: str) -> None:
        """Raise ``forbidden`` unless this client may read the presence of ``topic``, then
        ``not_tracked`` unless the topic tracks it; either is counted as a refusal."""
        assert self.identity is not None
        worker = self.worker
        try:
            if not self.identity.presence.allows_topic(topic):
                raise FrameError("forbidden", f"not allowed to read the presence of {topic}")
            worker.config.presence.check(topic)
        except FrameError as exc:
            worker.count_presence_refused(exc.code)
            raise

    async def _presence(self, cmd: p.Presence) -> None:
        topic = self._readable_topic(cmd.topic)
        self._check_presence(topic)
        clients = await self.worker.bus.presence(topic)
        self.reply(cmd.id, clients=clients)
