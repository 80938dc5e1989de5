"""Recovery bookkeeping of one subscription, and topic matching; sans-I/O like ``_protocol``.

Theory of operation: every subscription keeps, per exact topic, the
:class:`~client_sdk.models.Position` of the last publication it delivered. A (re)subscribe to an
exact topic sends that position as ``since``; the broker either replays what came after it
(``recovered: true``) or says what is gone (``missed``), and the tracker turns that into a
:class:`~client_sdk.models.Gap`. Every incoming publication is compared with the position too:
an offset already delivered is a duplicate and is dropped (defence in depth: the broker promises
none), a skipped offset or a new epoch is reported as a gap before the publication.

On a topic the broker delivers ``latest``, a client that falls behind is sent only the newest
publication, after a ``skipped`` push naming the offsets it will not be sent. The tracker
reports that range as a gap with reason ``"skipped"`` and moves its position past it: the
subscriber asked for the newest value, so nothing is replayed (the range may still be in the
topic's history, for an application that wants it: ``history`` with ``since``).
"""

from __future__ import annotations

from typing import Any

from client_sdk._protocol import (
    Skipped,
    parse_missed,
    reply_int,
    reply_str,
)
from client_sdk.models import Event, Gap, GapReason, Message, Position


def is_pattern(topic: str) -> bool:
    """True when ``topic`` holds a wildcard segment (``*`` or ``>``)."""
    return any(seg in ("*", ">") for seg in topic.split("."))


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether exact ``topic`` is matched by ``pattern`` (``*`` one segment, ``>`` the rest)."""
    pat = pattern.split(".")
    top = topic.split(".")
    for i, seg in enumerate(pat):
        if seg == ">":
            # '>' needs at least one segment to match
            return len(top) > i
        if i >= len(top):
            return False
        if seg != "*" and seg != top[i]:
            return False
    return len(pat) == len(top)


class Tracker:
    """Recovery and de-duplication state of one subscription (exact topic or pattern).

    The client calls :meth:`since` before each (re)subscribe, :meth:`subscribed` with the reply,
    and :meth:`message` with each publication routed to the subscription; the last two return
    the events to hand to the application, in order.
    """

    def __init__(self, topic: str, since: Position | None = None):
        self.topic = topic
        self.wildcard = is_pattern(topic)
        self._since = since
        # Per exact topic: the last position delivered (or the topic's latest offset when the
        # subscription was made, so a reconnect resumes from the moment of subscribing).
        self.positions: dict[str, Position] = {}
        self._subscribed_once = False

    def covers(self, topic: str) -> bool:
        """Whether a publication on exact ``topic`` belongs to this subscription."""
        return topic == self.topic or (self.wildcard and topic_matches(self.topic, topic))

    def since(self) -> Position | None:
        """The ``since`` to send with the next subscribe (never for a pattern)."""
        if self.wildcard:
            return None
        return self.positions.get(self.topic, self._since)

    def subscribed(self, fields: dict[str, Any], sent: Position | None) -> list[Event]:
        """Digest a successful subscribe reply to a request sent with ``since=sent``.

        Raises ProtocolViolation when the reply lacks ``offset``/``epoch`` for an exact topic.
        """
        again = self._subscribed_once
        self._subscribed_once = True
        if self.wildcard:
            # Offsets are per topic and a pattern has no ``since``: whatever was published while
            # disconnected cannot be replayed, and we do not know whether anything was.
            self.positions.clear()
            if again:
                return [Gap(self.topic, None, None, None, False, "wildcard_reconnect")]
            return []
        offset = reply_int(fields, "offset")
        epoch = reply_str(fields, "epoch")
        if sent is None:
            self.positions[self.topic] = Position(offset, epoch)
            return []
        if fields.get("recovered") is True:
            self.positions[self.topic] = Position(sent.offset, epoch)
            return []
        epoch_changed = sent.epoch != epoch
        missed = parse_missed(fields)
        lost_from: int | None
        lost_to: int | None
        if missed is not None and missed[1] >= missed[0]:
            lost_from = missed[0]
            lost_to = missed[1]
            base = missed[1]
        elif missed is not None:
            lost_from = lost_to = None
            base = missed[0] - 1
        else:
            # A broker that says "not recovered" without naming the offsets: assume the worst
            # we can name, everything up to its latest offset.
            start = 1 if epoch_changed else sent.offset + 1
            lost_from, lost_to = (start, offset) if offset >= start else (None, None)
            base = offset
        self.positions[self.topic] = Position(base, epoch)
        if not epoch_changed and lost_from is None:
            return []
        reason: GapReason = "epoch_changed" if epoch_changed else "not_recovered"
        prev = sent if sent.epoch is not None else None
        return [Gap(self.topic, lost_from, lost_to, epoch, epoch_changed, reason, prev)]

    def skipped(self, push: Skipped) -> list[Event]:
        """Digest a ``skipped`` push: the gap (reason ``"skipped"``), or ``[]`` when the range
        is already behind the position. The position moves to its end, so the next message
        follows on and a reconnect resumes after the range rather than replaying it."""
        pos = self.positions.get(push.topic)
        if pos is not None and pos.epoch == push.epoch and push.to_offset <= pos.offset:
            return []
        self.positions[push.topic] = Position(push.to_offset, push.epoch)
        gap = Gap(push.topic, push.from_offset, push.to_offset, push.epoch, False, "skipped", pos)
        return [gap]

    def message(self, msg: Message) -> list[Event]:
        """Digest one publication: ``[]`` for a duplicate, else the message, after a gap if one
        is evident."""
        pos = self.positions.get(msg.topic)
        self.positions[msg.topic] = msg.position
        if pos is None:
            return [msg]
        if pos.epoch == msg.epoch:
            if msg.offset <= pos.offset:
                self.positions[msg.topic] = pos  # a duplicate does not move us back
                return []
            if msg.offset == pos.offset + 1:
                return [msg]
            jump = Gap(
                msg.topic, pos.offset + 1, msg.offset - 1, msg.epoch, False, "offset_jump", pos
            )
            return [jump, msg]
        if msg.offset > 1:
            lost = Gap(msg.topic, 1, msg.offset - 1, msg.epoch, True, "epoch_changed", pos)
        else:
            lost = Gap(msg.topic, None, None, msg.epoch, True, "epoch_changed", pos)
        return [lost, msg]
