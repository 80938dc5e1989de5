"""The owner of topics: the one place where a topic's publications are ordered, whoever holds
it (the supervisor's hub for every topic, or, with ``[server] topic_owner = "workers"``, the
worker a topic's name hashes to: :func:`owner_index`).

Theory of operation
-------------------
A :class:`TopicOwner` assigns offsets and keeps history and presence in a
:class:`~broker.history.TopicStore` (on disk too with ``[store] path``: :mod:`broker.store`),
and forwards each publication only to the *peers* that watch a matching pattern. A peer is a
worker (or the supervisor's operations listener) connected over a Unix socket
(:mod:`broker.ipc`): the owner serves that socket (:meth:`TopicOwner.serve`), one trio task per
link reading requests, and the store is synchronous, so each topic's publications reach every
peer in offset order. An owner that lives in a worker also has a *local* peer
(:meth:`TopicOwner.attach_local`): its own router, handed publications and presence events by
a direct call, with no marshalling. When a link goes (its worker died, was killed as hung, or a
write to it failed), its watches and its connections' presence are dropped at once, and the
resulting leaves are sent to the others; nothing that happens on one link ends the owner.

The publishing peer hears its own publication once: when it watches the topic, the owner does
not forward the publication to it but flags the reply (``[offset, epoch, True]``), and the
peer, which still holds the publication's text, delivers it itself when the reply arrives.
The reply takes the place the forwarded publication had in that link's order (the owner sends
nothing between the two), so each peer still sees every topic in offset order. Publications,
publish requests and their replies cross in runs (:meth:`broker.ipc.Link.send_run`): the owner
handles a peer's batch of publish requests in one loop (:meth:`TopicOwner._publish_run`), and
each link gets its replies and forwarded publications as flat lists, one per run.

The store is bounded (``[limits] history_max_bytes`` and ``max_topics``; with owners in the
workers, each holds its share: :func:`owner_limits`), and history replies travel in pages
(:meth:`broker.ipc.Link.reply_paged`) so none passes the link's message size.

The link protocol is the one in :mod:`broker.ipc`; requests: ``hello`` (index, pid, node: who
the peer is, so that its presence can be forgotten with it), ``position``, ``history``,
``watch``, ``unwatch``, ``join``, ``leave``, ``presence``, and ``publish`` runs. Requests the
owner does not know go to :meth:`TopicOwner._control` (the hub's readiness).
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio
import trio.lowlevel

from broker.bus.base import ConnKey, HistoryResult, PresenceEvent, Publication, StreamPosition
from broker.config import HistoryRule, LimitsConfig, StoreConfig
from broker.errors import FrameError
from broker.history import TopicStore
from broker.ipc import Link, worst_size
from broker.store import COMMIT_FAILED, make_journal
from broker.topics import SubscriptionIndex

__all__ = ["Peer", "TopicOwner", "history_reply", "owner_index", "owner_limits"]

log = structlog.get_logger()
SWEEP_INTERVAL = 5.0
#: An upper bound of a publish reply's encoded bytes (four small values and an epoch string).
REPLY_SIZE = 128


def owner_index(topic: str, count: int) -> int:
    """The worker (of ``count``) that owns ``topic``: CRC-32 of its UTF-8 name, modulo the
    count. Stable across processes and restarts (unlike :func:`hash`), which is what lets a
    restarted owner find its topics in its store file and every worker agree on the owner."""
    return zlib.crc32(topic.encode("utf-8", "surrogatepass")) % count


def owner_limits(limits: LimitsConfig, count: int) -> LimitsConfig:
    """``limits`` with ``history_max_bytes`` and ``max_topics`` divided among ``count``
    owners (each at least 1): what one owner of several may hold, so that together they hold
    no more than one owner would."""
    return attrs.evolve(
        limits,
        history_max_bytes=max(1, limits.history_max_bytes // count),
        max_topics=max(1, limits.max_topics // count),
    )


def history_reply(result: HistoryResult) -> tuple[list[Any], list[Any]]:
    """A history result as a paged reply: the publications (``[offset, epoch, sender,
    data]``) and the rest (position, recovered, missed); see :meth:`IpcBus.history`."""
    return (
        [[p.offset, p.epoch, p.sender, p.data] for p in result.publications],
        [
            [result.position.offset, result.position.epoch],
            result.recovered,
            list(result.missed) if result.missed is not None else None,
        ],
    )


def _item_bytes(item: list[Any]) -> int:
    """An upper bound of a history item's encoded size (marshal: at most 4 bytes a char)."""
    return 4 * (len(item[3]) + len(item[2] or "")) + 64


def _remove_stale(path: Path) -> None:
    """A socket file left by a crashed process would make bind() fail."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class Peer:
    """A worker (or the operations listener) as an owner sees it: its link (None for the
    local peer, which is handed publications by a direct call), who it said it is, and the
    patterns it watches."""

    def __init__(self, link: Link | None) -> None:
        self.link = link
        self.index: int | None = None
        self.pid: int | None = None
        self.node = ""
        self.ready = False
        self.port: int | None = None
        self.patterns: set[str] = set()

    @property
    def last_seen(self) -> float:
        """When the peer was last heard from (now for the local peer)."""
        return self.link.last_seen if self.link is not None else trio.current_time()


class TopicOwner:
    def __init__(
        self,
        rule_for: Callable[[str], HistoryRule],
        limits: LimitsConfig | None = None,
        store: StoreConfig | None = None,
    ) -> None:
        self.store = TopicStore.bounded(rule_for, trio.current_time, limits or LimitsConfig())
        self.journal = make_journal(store)
        self.watchers: SubscriptionIndex[Peer] = SubscriptionIndex()
        self.peers: dict[int, Peer] = {}
        self.publications = 0
        self.local: Peer | None = None
        self._on_local_publication: Callable[[Publication], None] = lambda pub: None
        self._on_local_presence: Callable[[PresenceEvent], None] = lambda event: None

    def attach_local(
        self,
        on_publication: Callable[[Publication], None],
        on_presence: Callable[[PresenceEvent], None],
    ) -> Peer:
        """The peer of the process this owner lives in: what it watches is handed to
        ``on_publication`` and ``on_presence`` directly, in order with the other peers."""
        self.local = Peer(None)
        self._on_local_publication = on_publication
        self._on_local_presence = on_presence
        return self.local

    # --- serving --------------------------------------------------------------------------

    async def serve(
        self, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on the Unix socket ``path`` and serve every peer that connects
        (:meth:`handle`), with :meth:`services`, until cancelled."""
        _remove_stale(path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(128)
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.services)
            task_status.started()
            await trio.serve_listeners(self.handle, [listener], handler_nursery=nursery)

    async def services(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Read the store (with ``[store] path``), then keep it (the flusher, the sweeper)
        until cancelled; then write the store and mark it clean. Raises
        :class:`~broker.store.StoreError` when the store cannot be used."""
        # trio.current_time() is three calls deep to this clock's method: ask it directly.
        self.store.set_clock(trio.lowlevel.current_clock().current_time)
        async with trio.open_nursery() as nursery:
            if self.journal is not None:
                self.journal.start(self.store)
                nursery.start_soon(self.journal.run, self.store)
            nursery.start_soon(self._sweeper)
            task_status.started()

    async def _sweeper(self) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            self.store.sweep()

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one peer's link on ``stream`` until it goes; then forget the peer."""
        peer: Peer | None = None

        def on_message(link: Link, message: list[Any]) -> None:
            assert peer is not None
            if message[0] == "publish":
                self._publish_run(peer, link, message[1])
                return
            try:
                self._dispatch(peer, link, message)
            except FrameError as exc:  # a refusal the client hears about (too_many_topics)
                if message[0] == "req":
                    link.reply(message[1], False, [exc.code, exc.message])
            except Exception as exc:  # a bad request must not take the owner down
                log.exception("hub_request_failed", kind=message[0] if message else None)
                if message and message[0] == "req":
                    link.reply(message[1], False, f"internal: {exc}")

        peer = Peer(Link(stream, on_message))
        assert peer.link is not None
        try:
            await peer.link.run()
        except Exception:
            # Whatever ends one link ends only that link: the others, and this process, stay.
            log.exception("worker_link_failed", worker=peer.index, pid=peer.pid)
        finally:
            self.forget(peer)
            await trio.aclose_forcefully(stream)

    def forget(self, peer: Peer) -> None:
        """Drop ``peer``'s watches and, if it is the current peer of its index, its
        connections' presence (sending the leaves to the others)."""
        for pattern in peer.patterns:
            self.watchers.remove(pattern, peer)
        peer.patterns = set()
        if peer.index is not None and self.peers.get(peer.index) is peer:
            del self.peers[peer.index]
            for event in self.store.leave_worker(peer.node, peer.index):
                self.forward_presence(event)
            log.info("worker_link_closed", worker=peer.index, pid=peer.pid)

    # --- requests -------------------------------------------------------------------------

    def _dispatch(self, peer: Peer, link: Link, message: list[Any]) -> None:
        kind = message[0]
        if kind == "hb":
            return
        if kind != "req":
            log.warning("hub_unknown_message", kind=kind)
            return
        rid, method, args = message[1], message[2], message[3:]
        if method == "position":
            pos = self.store.position(args[0])
            link.reply(rid, True, [pos.offset, pos.epoch])
        elif method == "history":
            since = StreamPosition(args[1][0], args[1][1]) if args[1] is not None else None
            items, rest = history_reply(self.store.history(args[0], since, args[2], newest=args[3]))
            link.reply_paged(rid, items, rest, _item_bytes)
        elif method == "watch":
            self.watch(peer, args[0])
            link.reply(rid, True, None)
        elif method == "unwatch":
            self.unwatch(peer, args[0])
            link.reply(rid, True, None)
        elif method == "join":
            self.join(args[0], args[1], ConnKey(*args[2]))
            link.reply(rid, True, None)
        elif method == "leave":
            self.leave(args[0], args[1], ConnKey(*args[2]))
            link.reply(rid, True, None)
        elif method == "presence":
            link.reply(rid, True, self.store.members(args[0]))
        elif method == "hello":
            index, pid, node = args
            old = self.peers.get(index)
            if old is not None and old is not peer:
                # A replacement arrived before the old link's EOF was seen: forget the old now.
                self.forget(old)
            peer.index, peer.pid, peer.node = index, pid, node
            self.peers[index] = peer
            link.reply(rid, True, None)
        elif not self._control(peer, link, rid, method, args):
            link.reply(rid, False, f"unknown method {method!r}")

    def _control(self, peer: Peer, link: Link, rid: int, method: str, args: list[Any]) -> bool:
        """Answer a request this class does not know; False if the subclass does not either."""
        return False

    def watch(self, peer: Peer, pattern: str) -> None:
        if pattern not in peer.patterns:
            peer.patterns.add(pattern)
            self.watchers.add(pattern, peer)

    def unwatch(self, peer: Peer, pattern: str) -> None:
        if pattern in peer.patterns:
            peer.patterns.discard(pattern)
            self.watchers.remove(pattern, peer)

    def join(self, topic: str, client: str, key: ConnKey) -> None:
        if self.store.join(topic, client, key):
            self.forward_presence(PresenceEvent(topic, "join", client))

    def leave(self, topic: str, client: str, key: ConnKey) -> None:
        if self.store.leave(topic, client, key):
            self.forward_presence(PresenceEvent(topic, "leave", client))

    def _publish_run(self, peer: Peer, link: Link, values: list[Any]) -> None:
        """Handle a run of publish requests (``[id, topic, data, sender, ...]``) in one loop:
        each is answered with ``[offset, epoch, mine]`` (``mine``: ``peer`` watches the topic
        and delivers the publication itself), in a run of replies; a refusal or a failure
        answers only its own request."""
        journal = self.journal
        durable = journal is not None and journal.ack_on_disk
        for i in range(0, len(values), 4):
            rid = values[i]
            try:
                if durable:
                    self._publish_durable(link, rid, values[i + 1], values[i + 2], values[i + 3])
                else:  # no closure per publication
                    pub, mine = self.publish_from(values[i + 1], values[i + 2], values[i + 3], peer)
                    link.reply_run(rid, [pub.offset, pub.epoch, mine], REPLY_SIZE)
            except FrameError as exc:  # a refusal the client hears about (too_many_topics)
                link.reply(rid, False, [exc.code, exc.message])
            except Exception as exc:  # a bad request must not take the owner down
                log.exception("hub_request_failed", kind="publish")
                link.reply(rid, False, f"internal: {exc}")

    def _publish_durable(
        self, link: Link, rid: int, topic: str, data: str, sender: str | None
    ) -> None:
        """Publish and answer request ``rid`` once the publication is on disk. The
        publishing peer gets its publication forwarded like every other (in offset order
        with the rest of the topic), not with its reply, which may come after later
        publications."""
        journal = self.journal
        assert journal is not None
        pub, _ = self.publish_from(topic, data, sender, None)

        def answer(error: BaseException | None) -> None:
            if error is None:
                link.reply(rid, True, [pub.offset, pub.epoch, False])
            else:
                link.reply(rid, False, [COMMIT_FAILED.code, COMMIT_FAILED.message])

        journal.when_durable(answer)

    # --- used by the owner's own process --------------------------------------------------

    def history_stats(self) -> dict[str, Any]:
        stats = self.store.stats()
        if self.journal is not None:
            stats["store"] = self.journal.stats()
        return stats

    def publish(self, topic: str, data: str, sender: str | None) -> Publication:
        """Publish from outside every peer (the operations listener)."""
        return self.publish_from(topic, data, sender, None)[0]

    def publish_from(
        self, topic: str, data: str, sender: str | None, source: Peer | None
    ) -> tuple[Publication, bool]:
        """Store and forward a publication to its watchers but ``source``; and whether
        ``source`` watches it (then its reply says so and it delivers the publication itself).
        Raises :class:`FrameError` (``too_many_topics``, ``unavailable``) when refused."""
        pub = self.store.publish(topic, data, sender)
        self.publications += 1
        index = self.watchers
        if index.has_wildcards:
            # a peer watching through several patterns is matched (and sent it) once
            targets: Iterable[Peer] = {id(w): w for w in index.match(topic)}.values()
        else:
            # iterated as it is: nothing below changes who watches (a failed link is
            # forgotten by its own task, later)
            targets = index.exact.get(topic, ())
        mine = False
        values: tuple[Any, ...] = ()
        size = 0
        for w in targets:
            if w is source:
                mine = True
                continue
            link = w.link
            if link is None:  # this process's own router
                self._on_local_publication(pub)
                continue
            if not values:
                values = (pub.topic, pub.offset, pub.epoch, pub.sender, pub.data)
                size = worst_size(topic, data, sender)
            link.send_run("pubs", values, size)
        return pub, mine

    def forward_presence(self, event: PresenceEvent) -> None:
        targets = {id(w): w for w in self.watchers.match(event.topic)}
        for w in targets.values():
            if w.link is None:
                self._on_local_presence(event)
            else:
                w.link.send(["presence", event.topic, event.kind, event.client])
