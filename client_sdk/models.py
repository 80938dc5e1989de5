"""The values the SDK hands to applications: small frozen attrs classes.

A subscription yields :data:`Event` items: a :class:`Message` for each publication, a
:class:`PresenceEvent` for joins and leaves (only on subscriptions made with ``presence=True``),
and a :class:`Gap` where publications are known or suspected to be missing.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar, Literal, TypeAlias

import attrs

__all__ = [
    "ConnectionState",
    "Event",
    "Gap",
    "GapReason",
    "History",
    "Message",
    "Position",
    "PresenceEvent",
    "Welcome",
]


class ConnectionState(enum.Enum):
    """Where a client's connection stands.

    ``CONNECTING`` until the first connection is authenticated, ``CONNECTED`` while one is up
    and every subscription is (re)established, ``RECONNECTING`` between a lost connection and
    the next one, ``CLOSED`` once the client is closed (by the application or a fatal error).
    """

    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


@attrs.frozen
class Position:
    """A place in one topic's stream: the last ``offset`` seen within ``epoch``.

    Persist ``sub.position`` and pass it back as ``subscribe(topic, since=...)`` to resume
    after a restart of the application. ``epoch=None`` means "the topic's current epoch".
    """

    offset: int
    epoch: str | None = None


@attrs.frozen
class Message:
    """One publication: ``data`` is any JSON value; ``sender`` is the publisher's client id
    (``None`` for publications made through the broker's HTTP API)."""

    kind: ClassVar[str] = "message"

    topic: str
    offset: int
    epoch: str
    data: Any
    sender: str | None

    @property
    def position(self) -> Position:
        """This message's place in its topic's stream."""
        return Position(self.offset, self.epoch)


@attrs.frozen
class PresenceEvent:
    """A client id joined (its first connection subscribed) or left (its last one went)."""

    kind: Literal["join", "leave"]
    topic: str
    client: str


GapReason: TypeAlias = Literal[
    "not_recovered",  # the broker no longer holds them (history size or ttl exceeded)
    "epoch_changed",  # the broker lost the topic's history (for example it restarted)
    "wildcard_reconnect",  # a wildcard subscription reconnected: offsets cannot be recovered
    "overflow",  # the application did not keep up and the subscription's buffer was full
    "offset_jump",  # the stream skipped offsets (defensive; a correct broker never does)
    "skipped",  # a `latest` topic: the broker sent only the newest while this client was behind
]


@attrs.frozen
class Gap:
    """Publications on ``topic`` that this subscription will never deliver.

    ``from_offset``..``to_offset`` (inclusive, within ``epoch``) are the offsets known to be
    lost; both are ``None`` when none are known. ``epoch_changed`` means the topic's history was
    lost, so publications after ``previous`` (the last position delivered, in the old epoch)
    may be lost as well, in any number. For a wildcard subscription that reconnected, ``topic``
    is the pattern and nothing is known: publications may or may not have been missed.
    """

    kind: ClassVar[str] = "gap"

    topic: str
    from_offset: int | None
    to_offset: int | None
    epoch: str | None
    epoch_changed: bool
    reason: GapReason
    previous: Position | None = None

    @property
    def count(self) -> int | None:
        """How many publications are known lost (``None`` if unknown, as for epoch changes)."""
        if self.from_offset is None or self.to_offset is None:
            return None
        return self.to_offset - self.from_offset + 1

    def describe(self) -> str:
        """A short human description, as used in logs and ``GapError``."""
        parts = []
        if self.from_offset is not None:
            parts.append(f"offsets {self.from_offset}..{self.to_offset} of epoch {self.epoch}")
        if self.epoch_changed:
            was = f" after {self.previous.offset}" if self.previous is not None else ""
            parts.append(f"history lost (epoch changed): an unknown number{was}")
        if not parts:
            parts.append("possibly some (offsets unknown)")
        return f"{'; '.join(parts)} [{self.reason}]"


Event: TypeAlias = Message | PresenceEvent | Gap
"""What a subscription yields."""


@attrs.frozen
class Welcome:
    """What the broker said about this connection when it accepted the token."""

    client: str
    expires_at: float | None
    node: str | None = None
    worker: int | None = None
    ping_interval: float | None = None
    idle_timeout: float | None = None


@attrs.frozen
class History:
    """The reply to ``history()``: the messages still held, oldest first.

    ``offset``/``epoch`` are the topic's latest; with ``since``, ``recovered`` says whether
    every publication after it is in ``messages``, and ``missed`` names the lost offsets.
    """

    topic: str
    messages: tuple[Message, ...]
    offset: int
    epoch: str
    recovered: bool | None = None
    missed: tuple[int, int] | None = None
