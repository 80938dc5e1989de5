"""The hub of the local IPC bus: it lives in the supervisor, and every worker connects to it
over a Unix socket.

It carries the control plane: a worker's ``hello`` and ``ready`` (the supervisor waits for every
worker's before it reports ready), its heartbeats (the supervisor kills a worker whose heartbeat
stops), and the supervisor's requests to every worker (statistics, disconnects ordered through
the HTTP API: :meth:`Hub.ask_all`). When a worker's link goes, its watches and its connections'
presence are dropped at once and nothing else ends.

With ``[server] topic_owner = "hub"`` (the default) the hub is also the one place where a
machine's topics are ordered: it is a :class:`~broker.owner.TopicOwner` (offsets, history on
disk with ``[store] path``, presence, forwarding each publication to the workers that watch it;
see :mod:`broker.owner`), and a worker's crash loses nothing, since no worker holds history.
With ``"workers"`` the workers own the topics (:mod:`broker.bus.sharded`) and the hub carries
the control plane only.
"""

from __future__ import annotations

from typing import Any

import structlog
import trio

from broker.ipc import Link
from broker.owner import Peer, TopicOwner, history_reply

__all__ = ["Hub", "history_reply"]

log = structlog.get_logger()


class Hub(TopicOwner):
    """The supervisor's :class:`~broker.owner.TopicOwner`, with the workers' control plane:
    ``hello`` names a worker, ``ready`` says it listens (on a port), ``hb`` its heartbeat."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker_ready = trio.Event()  # set (and replaced) whenever a worker reports ready

    @property
    def workers(self) -> dict[int, Peer]:
        """The connected workers by index."""
        return self.peers

    def _control(self, peer: Peer, link: Link, rid: int, method: str, args: list[Any]) -> bool:
        if method != "ready":
            return False
        peer.ready = True
        peer.port = args[0]
        self.worker_ready.set()
        self.worker_ready = trio.Event()
        link.reply(rid, True, None)
        return True

    async def ask_all(self, method: str, *args: Any) -> list[Any]:
        """Send a request to every connected worker; the answers of those that answered."""
        results: list[Any] = []

        async def ask(wl: Peer) -> None:
            assert wl.link is not None
            try:
                results.append(await wl.link.call(method, *args))
            except Exception as exc:
                log.warning("worker_request_failed", worker=wl.index, method=method, error=str(exc))

        async with trio.open_nursery() as nursery:
            for wl in list(self.workers.values()):
                nursery.start_soon(ask, wl)
        return results
