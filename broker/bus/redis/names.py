"""The names the Redis bus uses (keys, channels, globs) and the messages its scripts publish.

Theory of operation
-------------------
A topic's keys and its channel share the hash tag ``{PREFIX:TOPIC}`` (see
:mod:`broker.bus.redis.scripts` for what each key holds), so that in Redis Cluster they sit on
one slot. A node subscribes only to what its clients need. An exact topic is
``SUBSCRIBE {ps:TOPIC}`` (``SSUBSCRIBE`` in a cluster). A wildcard pattern becomes a Redis
glob for ``PSUBSCRIBE``: ``*`` becomes ``*`` and a final ``>`` becomes ``?*``. Redis globs do
not know segments (``*`` also matches dots), so every received publication is checked again
with the exact matcher of :mod:`broker.topics` before it is delivered. Redis Cluster has no
sharded ``PSUBSCRIBE``: there the publish script also ``PUBLISH``-es the publication on
``ps:w:TOPIC``, which Redis Cluster broadcasts to every node, and wildcard patterns are
``PSUBSCRIBE``-d on one node. That costs one cluster-bus broadcast per publication; exact
subscriptions stay sharded.

The scripts publish ``m|OFFSET|EPOCH|TOPIC|SENDERLEN|SENDER DATA`` for a publication and
``j|TOPIC|CLIENT`` or ``l|TOPIC|CLIENT`` for presence; :func:`parse_message` reads them back.
Nothing here does I/O.
"""

from __future__ import annotations

from typing import Any

import attrs

from broker.bus.base import ConnKey, PresenceEvent, Publication

__all__ = ["Names", "decode", "parse_message", "redis_glob"]


def redis_glob(pattern: str) -> str:
    """Translate a topic pattern into a Redis glob that matches at least the same topics.

    ``*`` (one segment) becomes ``*`` and a final ``>`` (one or more segments) ``?*``; Redis
    globs are not segment-aware, so what they match must be filtered again with
    :func:`broker.topics.pattern_matches`.
    """
    out = []
    for seg in pattern.split("."):
        if seg == "*":
            out.append("*")
        elif seg == ">":
            out.append("?*")
        else:
            out.append(_glob_escape(seg))
    return ".".join(out)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@attrs.frozen
class Names:
    """The key and channel names under ``prefix`` (no ``{``, ``}`` or ``|``: the caller
    checks), for one Redis or for a Redis Cluster."""

    prefix: str
    cluster: bool

    @property
    def publish_cmd(self) -> str:
        """The command that publishes on a topic's channel (sharded in a cluster)."""
        return "SPUBLISH" if self.cluster else "PUBLISH"

    def key(self, topic: str, what: str) -> str:
        return f"{{{self.prefix}:{topic}}}:{what}"

    def channel(self, topic: str) -> str:
        return f"{{{self.prefix}:{topic}}}"

    def channel_topic(self, channel: str) -> str | None:
        """The topic whose :meth:`channel` ``channel`` is, or None."""
        topic = channel[len(self.prefix) + 2 : -1]
        return topic if self.channel(topic) == channel else None

    def wild_channel(self, topic: str) -> str:
        """The channel that carries ``topic``'s publications to wildcard subscribers in a
        cluster."""
        return f"{self.prefix}:w:{topic}"

    def glob(self, pattern: str) -> str:
        """The ``PSUBSCRIBE`` glob of a wildcard pattern."""
        escaped = _glob_escape(self.prefix)
        if self.cluster:
            return f"{escaped}:w:{redis_glob(pattern)}"
        return f"\\{{{escaped}:{redis_glob(pattern)}\\}}"

    @staticmethod
    def member(key: ConnKey) -> str:
        """A connection's member in a client's presence zset."""
        return f"{key.node}|{key.worker}|{key.conn}"


def decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_message(raw: bytes) -> Publication | PresenceEvent | None:
    """Decode what the scripts publish: ``m|OFFSET|EPOCH|TOPIC|SENDERLEN|SENDER DATA`` for a
    publication (SENDERLEN -1 = no sender), ``j|TOPIC|CLIENT`` and ``l|TOPIC|CLIENT`` for
    presence."""
    kind = raw[:2]
    if kind == b"m|":
        _, off, epoch, topic, slen, rest = raw.split(b"|", 5)
        n = int(slen)
        sender = rest[:n].decode() if n >= 0 else None
        data = rest[max(n, 0) :].decode()
        return Publication(topic.decode(), int(off), epoch.decode(), sender, data)
    if kind in (b"j|", b"l|"):
        _, topic, client = raw.split(b"|", 2)
        return PresenceEvent(topic.decode(), "join" if kind == b"j|" else "leave", client.decode())
    return None
