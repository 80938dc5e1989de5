"""The requests that read: subscriptions (with their replay), history and presence.

Theory of operation
-------------------
:class:`SessionReads` adds to :class:`~broker.connstate.SessionState` what a connection
subscribes to and reads, and nothing else; :mod:`broker.dispatch` dispatches to it.

A subscription is put in the worker's router first and in ``subs`` (its bookkeeping), then
answered; with ``since`` its replay is stitched to the live stream by :mod:`broker.replay`
(the reply, the history up to the position the reply announces, then what arrived live
meanwhile), paced by what the client reads. ``history`` replies and ``since`` replays are
charged, by the bytes they send, to the connection's read budget (a
:class:`~broker.budget.TokenBucket`, made on first use); past it they are refused with
``rate_limited``. A replay is charged page by page as it goes out, and one under way is never
refused halfway. Presence is joined after the subscription's reply, and left when it goes.

Whatever ends a connection, :meth:`SessionReads._cleanup` takes its subscriptions out of the
router at once (no publication is framed for it from then on), then tells the bus, within
``CLEANUP_TIMEOUT``, what they no longer need.
"""

from __future__ import annotations

import contextlib

import structlog
import trio

from broker import protocol as p
from broker.budget import TokenBucket
from broker.bus.base import HistoryResult, StreamPosition
from broker.connstate import SessionState
from broker.errors import BusUnavailable, FrameError
from broker.replay import (
    HistoryPager,
    history_reply,
    position_fields,
    reply_budget,
    stitch,
)
from broker.router import Subscription
from broker.topics import is_wildcard, validate_pattern, validate_topic

__all__ = ["SessionReads"]

log = structlog.get_logger()
CLEANUP_TIMEOUT = 5.0  # how long a closing connection may wait on the bus to tidy up


class SessionReads(SessionState):
    """Subscribe, unsubscribe, history and presence, and the subscriptions' teardown."""

    __slots__ = ()  # the state is SessionState's

    # --- teardown -----------------------------------------------------------------------

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

    # --- requests -----------------------------------------------------------------------

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
