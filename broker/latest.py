"""The ``latest`` delivery policy: a connection that is behind keeps only the newest
publication of each topic.

Theory of operation
-------------------
A connection's :class:`~broker.sendqueue.SendQueue` holds bytes in order, up to
``send_queue_max_bytes``. For a topic whose ``[[delivery]]`` rule says ``latest`` the router
calls :meth:`~broker.sendqueue.SendQueue.send` with the publication besides the frame. While
the queue has room and holds nothing (a reader that keeps up) that is the same append of the
same shared frame, and nothing here is looked at. Once the next frame would pass the limit, the
frame is *held* here instead, in one slot per topic: a newer publication on the same topic
replaces the held one, and the offsets replaced are remembered as one skipped range. When the
queue has written everything queued before them, the held frames go out, each preceded by a
``skipped`` push naming the offsets the connection will never be sent, so the client knows
what it missed and whether to ask ``history`` for it.

While a topic has a held frame, its later publications go to the slot as well, even if the
queue has room again: appended, they would overtake the held one.

Memory: the held frames of one connection are bounded by the same ``send_queue_max_bytes``. A
connection that would pass that (a connection behind on very many ``latest`` topics at once) is
a slow consumer after all, closed with 4008. A connection therefore costs at most twice the
limit, whatever its policies.
"""

from __future__ import annotations

from broker.protocol import encode_skipped, frame_text

__all__ = ["LatestSlots"]


class _Held:
    """The newest frame of one topic, and the range of offsets it replaced (``first`` is None
    while it replaced none)."""

    __slots__ = ("epoch", "first", "frame", "last", "offset", "skip_epoch")

    def __init__(self, frame: bytes, offset: int, epoch: str) -> None:
        self.frame = frame
        self.offset = offset
        self.epoch = epoch
        self.first: int | None = None
        self.last = 0
        self.skip_epoch = epoch


class LatestSlots:
    """One connection's held frames, by topic, in the order the topics were first held."""

    __slots__ = ("bytes", "held")

    def __init__(self) -> None:
        self.held: dict[str, _Held] = {}
        self.bytes = 0  # frame bytes held

    def hold(self, topic: str, frame: bytes, offset: int, epoch: str, limit: int) -> int | None:
        """Hold ``frame`` (the publication ``offset`` of ``topic`` in ``epoch``) as the topic's
        newest. Returns how many held publications it replaced (0 or 1), or None, holding
        nothing, when the held frames would pass ``limit`` bytes."""
        old = self.held.get(topic)
        grown = len(frame) - (0 if old is None else len(old.frame))
        if self.bytes + grown > limit:
            return None
        self.bytes += grown
        if old is None:
            self.held[topic] = _Held(frame, offset, epoch)
            return 0
        if old.first is None or old.epoch != old.skip_epoch:
            # A new range; one in an older epoch is superseded (the client sees the epoch
            # change on the next message anyway).
            old.first = old.offset
            old.skip_epoch = old.epoch
        old.last = old.offset
        old.frame, old.offset, old.epoch = frame, offset, epoch
        return 1

    def release(self) -> list[bytes]:
        """Take every held frame out, each after the ``skipped`` push of the offsets it
        replaced (if any), in the order the topics were first held."""
        out: list[bytes] = []
        for topic, held in self.held.items():
            if held.first is not None:
                push = encode_skipped(topic, held.first, held.last, held.skip_epoch)
                out.append(frame_text(push.encode()))
            out.append(held.frame)
        self.held.clear()
        self.bytes = 0
        return out

    def clear(self) -> None:
        """Drop every held frame (the connection is closing)."""
        self.held.clear()
        self.bytes = 0
