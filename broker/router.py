"""One worker's fan-out: which sessions get a publication, and the bytes they get.

The router is the bus's handler. For each publication it builds the frame once and appends
those same bytes to the send queue of every matching subscription, deduplicating sessions
subscribed through several patterns. A subscription that is being set up (its reply not sent
yet) collects publications in ``pending`` instead, so that the session can stitch history and
live publications together without a gap or a duplicate at the seam. A replay is paced by
what its client reads (:mod:`broker.replay`), so ``pending`` may fill for a while: it holds at
most the connection's ``send_queue_max_bytes`` (counted as the frames would be). Past that it
drops what it holds and holds nothing more (``dropped``): those publications are in history,
and the session reads them from there once the replay is sent.

A topic delivered ``latest`` (its ``[[delivery]]`` rule, looked up once per publication through
``latest``, which is None while no rule says ``latest``) goes through the same fan-out loop,
each queue's :meth:`~broker.sendqueue.SendQueue.send` given the publication as well, which the
queue needs only once it is past its limit; for every other topic that argument is None. The router also tells each
queue that it receives such topics (``receives_latest``, which spares it ``write_timeout``):
when an exact subscription is added or a reload makes its topic ``latest``, and for a
wildcard subscription when a publication reaches it, so that the per-delivery path of an
exact subscription carries nothing but the append.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Final

from broker.bus.base import Bus, PresenceEvent, Publication
from broker.protocol import encode_message, encode_presence_event, frame_text
from broker.sendqueue import SendQueue  # at run time: see broker/native.py
from broker.topics import SubscriptionIndex, is_wildcard

if TYPE_CHECKING:
    from broker.config import Config

__all__ = [
    "FRAME_OVERHEAD",
    "LatestTopics",
    "Router",
    "Subscription",
    "latest_topics",
    "message_frame",
]

# Topics whose policy LatestTopics remembers; past it, it forgets them all and starts over.
POLICY_CACHE: Final = 10_000

#: Bytes a held publication counts for besides its data and topic: the rest of its frame
#: (op, offset, epoch, sender, the WebSocket header), generously.
FRAME_OVERHEAD: Final = 128


class Subscription:
    """One session's subscription to one topic or pattern. ``presence``: it receives join and
    leave events; ``tracked``: its client was (or is being) joined to the topic's presence, so
    it must leave when the subscription goes (whatever a reload says about the topic since).

    A plain class, not attrs: compiled, it is a native class, whose attributes the per-delivery
    loop reads as fields of a struct (an attrs class stays a Python class, read by name).
    Compared by identity, as ``attrs.define(eq=False)`` did."""

    __slots__ = ("dropped", "held", "pattern", "pending", "presence", "queue", "tracked")

    def __init__(
        self,
        queue: SendQueue,
        pattern: str,
        presence: bool = False,
        pending: list[Publication] | None = None,
        tracked: bool = False,
    ) -> None:
        self.queue = queue
        self.pattern = pattern
        self.presence = presence
        self.pending = pending
        self.tracked = tracked
        self.held = 0  # bytes put in pending since it was (re)started
        self.dropped = False  # pending went over its bound: what it held was dropped

    def hold(self, pub: Publication) -> None:
        """Keep ``pub`` in ``pending`` until the subscription's replay is sent. Past the
        queue's ``max_bytes`` held, drop what is held and hold nothing more: memory stays
        bounded, and the session reads what was dropped from history."""
        if self.dropped:
            return
        pending = self.pending
        assert pending is not None
        self.held += len(pub.data) + len(pub.topic) + FRAME_OVERHEAD
        if self.held > self.queue.max_bytes:
            pending.clear()
            self.dropped = True
            return
        pending.append(pub)

    def restart_pending(self) -> None:
        """Hold publications again, from none (after :meth:`hold` dropped them)."""
        self.pending = []
        self.held = 0
        self.dropped = False


def message_frame(pub: Publication) -> bytes:
    """The WebSocket frame of a publication, as every subscriber receives it."""
    return frame_text(
        encode_message(pub.topic, pub.offset, pub.epoch, pub.sender, pub.data).encode()
    )


class LatestTopics:
    """Whether a topic's delivery policy is ``latest``: the first matching ``[[delivery]]``
    rule, remembered per topic (a publication asks once, not once per subscriber)."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._known: dict[str, bool] = {}

    def __call__(self, topic: str) -> bool:
        known = self._known.get(topic)
        if known is None:
            if len(self._known) >= POLICY_CACHE:
                self._known.clear()
            known = self._known[topic] = self._config.delivery_policy(topic) == "latest"
        return known


def latest_topics(config: Config) -> LatestTopics | None:
    """The router's ``latest`` for ``config``: None when no rule says ``latest``."""
    if any(rule.policy == "latest" for rule in config.delivery):
        return LatestTopics(config)
    return None


class Router:
    def __init__(self) -> None:
        self.index: SubscriptionIndex[Subscription] = SubscriptionIndex()
        self.bus: Bus | None = None
        self.publications_in = 0
        self.deliveries = 0
        self._latest: LatestTopics | None = None

    @property
    def latest(self) -> LatestTopics | None:
        """Which topics are delivered ``latest`` (None: none are)."""
        return self._latest

    @latest.setter
    def latest(self, latest: LatestTopics | None) -> None:
        # A reload may make a subscribed topic `latest`: its subscribers' queues learn it now.
        self._latest = latest
        if latest is not None:
            for topic, subs in self.index.exact.items():
                if latest(topic):
                    for sub in subs:
                        sub.queue.receives_latest = True

    async def add(self, sub: Subscription) -> None:
        """Index ``sub``; the first subscription to a pattern starts the bus watching it.
        May raise :class:`~broker.errors.BusUnavailable` (``sub`` is then not indexed)."""
        if self.index.add(sub.pattern, sub):
            assert self.bus is not None
            try:
                await self.bus.watch(sub.pattern)
            except BaseException:
                self.index.remove(sub.pattern, sub)
                raise
        if not is_wildcard(sub.pattern) and self.is_latest(sub.pattern):
            sub.queue.receives_latest = True

    def detach(self, sub: Subscription) -> None:
        """Take ``sub`` out of the index (synchronously: nothing is delivered to it after)."""
        self.index.remove(sub.pattern, sub)

    async def unwatch_if_unused(self, pattern: str) -> None:
        """Stop the bus delivering ``pattern`` here if no subscription uses it any more."""
        if not self.index.has(pattern):
            assert self.bus is not None
            await self.bus.unwatch(pattern)

    async def remove(self, sub: Subscription) -> None:
        self.detach(sub)
        await self.unwatch_if_unused(sub.pattern)

    def on_publication(self, pub: Publication) -> None:
        self.publications_in += 1
        index = self.index
        latest = self.is_latest(pub.topic)
        subs: Collection[Subscription]
        if index.wildcards:
            subs = self._targets(pub.topic)
            if latest:
                for sub in subs:  # a wildcard subscription learns only now what it receives
                    sub.queue.receives_latest = True
        else:
            subs = index.exact.get(pub.topic) or ()
        if not subs:
            return
        frame = message_frame(pub)
        # The queue needs the publication itself only for a `latest` topic, past its limit.
        policy_pub = pub if latest else None
        waiting = 0
        for sub in subs:  # the per-delivery loop: keep it to the one call
            if sub.pending is None:
                sub.queue.send(frame, policy_pub)
            else:
                sub.hold(pub)
                waiting += 1
        self.deliveries += len(subs) - waiting

    def _targets(self, topic: str) -> Collection[Subscription]:
        """The subscriptions ``topic`` reaches through the whole index, each session once."""
        # A session whose exact subscription is being set up (pending) but which also
        # matches through a live wildcard gets it live now: held back in pending, the seam
        # would drop it as covered by the announced position.
        buckets = self.index.buckets(topic)
        if len(buckets) < 2:  # one pattern at most: each session is in it once
            return buckets[0] if buckets else ()
        targets = {id(sub.queue): sub for sub in buckets[0]}
        for bucket in buckets[1:]:
            for sub in bucket:
                qid = id(sub.queue)
                held = targets.get(qid)
                if held is None or (held.pending is not None and sub.pending is None):
                    targets[qid] = sub
        return targets.values()

    def is_latest(self, topic: str) -> bool:
        """Whether ``topic`` is delivered under the ``latest`` policy."""
        latest = self._latest
        return latest is not None and latest(topic)

    def send_one(self, queue: SendQueue, pub: Publication) -> None:
        """Queue ``pub`` for one connection under its topic's delivery policy (the live
        publications a subscription collected while it was being set up)."""
        if self.is_latest(pub.topic):
            queue.receives_latest = True
            queue.send(message_frame(pub), pub)
        else:
            queue.send(message_frame(pub))

    def on_presence(self, event: PresenceEvent) -> None:
        subs = self.index.exact.get(event.topic)
        if not subs:
            return
        frame = frame_text(encode_presence_event(event.kind, event.topic, event.client).encode())
        for sub in subs:
            if sub.presence and sub.pending is None:
                sub.queue.send(frame)
