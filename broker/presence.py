"""Presence held in memory: which client ids are connected to which topics, without I/O.

Theory of operation
-------------------
Presence counts connections per client id: :meth:`PresenceTable.join` reports a new *member*
only for the first connection of a client id, :meth:`PresenceTable.leave` only for the last.
Only topics that track presence are ever joined (the worker decides, see
:class:`~broker.config.PresenceConfig`), so the others hold no presence state here at all.
The in-memory store of the one-process bus and of the hub (:class:`~broker.history.TopicStore`)
is a table; the Redis bus keeps the same state in Redis.
"""

from __future__ import annotations

from broker.bus.base import ConnKey, PresenceEvent

__all__ = ["PresenceTable"]


class PresenceTable:
    """The connections of each client id on each topic that tracks presence."""

    def __init__(self) -> None:
        self._presence: dict[str, dict[str, set[ConnKey]]] = {}
        self.presence_members = 0  # (topic, client id) pairs held, for the metrics

    def join(self, topic: str, client: str, key: ConnKey) -> bool:
        """Record a connection of ``client`` on ``topic``; True if the client is new there."""
        clients = self._presence.setdefault(topic, {})
        keys = clients.setdefault(client, set())
        first = not keys
        keys.add(key)
        self.presence_members += first
        return first

    def leave(self, topic: str, client: str, key: ConnKey) -> bool:
        """Forget a connection; True if it was the client's last one on ``topic``."""
        clients = self._presence.get(topic)
        if not clients or client not in clients:
            return False
        keys = clients[client]
        if key not in keys:
            return False
        keys.discard(key)
        if keys:
            return False
        del clients[client]
        self.presence_members -= 1
        if not clients:
            del self._presence[topic]
        return True

    def leave_worker(self, node: str, worker: int) -> list[PresenceEvent]:
        """Forget every connection of one worker (it died); return the resulting leaves."""
        events = []
        for topic in list(self._presence):
            for client, keys in list(self._presence[topic].items()):
                gone = {k for k in keys if k.node == node and k.worker == worker}
                if gone and self.leave_many(topic, client, gone):
                    events.append(PresenceEvent(topic, "leave", client))
        return events

    def leave_many(self, topic: str, client: str, keys: set[ConnKey]) -> bool:
        last = False
        for key in keys:
            last = self.leave(topic, client, key) or last
        return last

    def members(self, topic: str) -> list[str]:
        return sorted(self._presence.get(topic, {}))
