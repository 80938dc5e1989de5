"""The hub of the local IPC bus: it lives in the supervisor and is the one place where a
machine's topics are ordered.

Workers connect over a Unix socket. The hub assigns offsets and keeps history and presence in
a :class:`~broker.history.TopicStore`, and forwards each publication (encoded once) only to the
workers that watch a matching pattern. Because the hub is one trio task per worker reading
requests and the store is synchronous, each topic's publications reach every worker in offset
order. When a worker's link goes (it died, was killed as hung, or a write to it failed), its
watches and its connections' presence are dropped at once, and the resulting leaves are sent to
the others; nothing that happens on one link ends the hub (and so the supervisor).

The publishing worker hears its own publication once: when it watches the topic, the hub does
not forward the publication to it but flags the reply (``[offset, epoch, True]``), and the
worker, which still holds the publication's text, delivers it itself when the reply arrives.
The reply takes the place the forwarded publication had in that link's order (the hub sends
nothing between the two), so each worker still sees every topic in offset order. Publications,
publish requests and their replies cross in runs (:meth:`broker.ipc.Link.send_run`): the hub
handles a worker's batch of publish requests in one loop (:meth:`Hub._publish_run`), and each
link gets its replies and forwarded publications as flat lists, one per run.

The store is bounded as in the one-process broker (``[limits] history_max_bytes`` and
``max_topics``), so the supervisor never holds more history than that budget, and history
replies travel in pages (:meth:`broker.ipc.Link.reply_paged`) so none passes the link's
message size, whatever the ``[[history]]`` rules allow.

With ``[store] path`` set, the hub keeps that history on disk (:mod:`broker.store`): it is read
before the hub serves, written by a flusher task beside the sweeper, and flushed and marked
clean when the hub stops. A worker's crash loses nothing, since no worker holds history.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import structlog
import trio

from broker.bus.base import ConnKey, HistoryResult, PresenceEvent, Publication, StreamPosition
from broker.config import HistoryRule, LimitsConfig, StoreConfig
from broker.errors import FrameError
from broker.history import TopicStore
from broker.ipc import Link, encode, worst_size
from broker.store import COMMIT_FAILED, make_journal
from broker.topics import SubscriptionIndex

__all__ = ["Hub"]

log = structlog.get_logger()
SWEEP_INTERVAL = 5.0
#: An upper bound of a publish reply's encoded bytes (four small values and an epoch string).
REPLY_SIZE = 128


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
    """A socket file left by a crashed supervisor would make bind() fail."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class WorkerLink:
    def __init__(self, link: Link) -> None:
        self.link = link
        self.index: int | None = None
        self.pid: int | None = None
        self.node = ""
        self.ready = False
        self.port: int | None = None
        self.patterns: set[str] = set()


class Hub:
    def __init__(
        self,
        rule_for: Callable[[str], HistoryRule],
        limits: LimitsConfig | None = None,
        store: StoreConfig | None = None,
    ) -> None:
        self.store = TopicStore.bounded(rule_for, trio.current_time, limits or LimitsConfig())
        self.journal = make_journal(store)
        self.watchers: SubscriptionIndex[WorkerLink] = SubscriptionIndex()
        self.workers: dict[int, WorkerLink] = {}
        self.publications = 0
        self.worker_ready = trio.Event()  # set (and replaced) whenever a worker reports ready

    # --- serving --------------------------------------------------------------------------

    async def serve(
        self, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        _remove_stale(path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(128)
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery:
            if self.journal is not None:
                self.journal.start(self.store)
                nursery.start_soon(self.journal.run, self.store)
            nursery.start_soon(self._sweeper)
            task_status.started()
            await trio.serve_listeners(self._handle, [listener], handler_nursery=nursery)

    async def _sweeper(self) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            self.store.sweep()

    async def _handle(self, stream: trio.abc.Stream) -> None:
        wl: WorkerLink | None = None

        def on_message(link: Link, message: list[Any]) -> None:
            assert wl is not None
            if message[0] == "publish":
                self._publish_run(wl, message[1])
                return
            try:
                self._dispatch(wl, message)
            except FrameError as exc:  # a refusal the client hears about (too_many_topics)
                if message[0] == "req":
                    link.reply(message[1], False, [exc.code, exc.message])
            except Exception as exc:  # a bad request must not take the hub down
                log.exception("hub_request_failed", kind=message[0] if message else None)
                if message and message[0] == "req":
                    link.reply(message[1], False, f"internal: {exc}")

        wl = WorkerLink(Link(stream, on_message))
        try:
            await wl.link.run()
        except Exception:
            # Whatever ends one link ends only that link: the others, and the supervisor, stay.
            log.exception("worker_link_failed", worker=wl.index, pid=wl.pid)
        finally:
            self._forget(wl)
            await trio.aclose_forcefully(stream)

    def _forget(self, wl: WorkerLink) -> None:
        for pattern in wl.patterns:
            self.watchers.remove(pattern, wl)
        wl.patterns = set()
        if wl.index is not None and self.workers.get(wl.index) is wl:
            del self.workers[wl.index]
            for event in self.store.leave_worker(wl.node, wl.index):
                self.forward_presence(event)
            log.info("worker_link_closed", worker=wl.index, pid=wl.pid)

    # --- requests -------------------------------------------------------------------------

    def _dispatch(self, wl: WorkerLink, message: list[Any]) -> None:
        kind = message[0]
        if kind == "hb":
            return
        if kind != "req":
            log.warning("hub_unknown_message", kind=kind)
            return
        rid, method, args = message[1], message[2], message[3:]
        link = wl.link
        if method == "position":
            pos = self.store.position(args[0])
            link.reply(rid, True, [pos.offset, pos.epoch])
        elif method == "history":
            since = StreamPosition(args[1][0], args[1][1]) if args[1] is not None else None
            items, rest = history_reply(self.store.history(args[0], since, args[2], newest=args[3]))
            link.reply_paged(rid, items, rest, _item_bytes)
        elif method == "watch":
            if args[0] not in wl.patterns:
                wl.patterns.add(args[0])
                self.watchers.add(args[0], wl)
            link.reply(rid, True, None)
        elif method == "unwatch":
            if args[0] in wl.patterns:
                wl.patterns.discard(args[0])
                self.watchers.remove(args[0], wl)
            link.reply(rid, True, None)
        elif method == "join":
            if self.store.join(args[0], args[1], ConnKey(*args[2])):
                self.forward_presence(PresenceEvent(args[0], "join", args[1]))
            link.reply(rid, True, None)
        elif method == "leave":
            if self.store.leave(args[0], args[1], ConnKey(*args[2])):
                self.forward_presence(PresenceEvent(args[0], "leave", args[1]))
            link.reply(rid, True, None)
        elif method == "presence":
            link.reply(rid, True, self.store.members(args[0]))
        elif method == "hello":
            index, pid, node = args
            old = self.workers.get(index)
            if old is not None and old is not wl:
                # A replacement arrived before the old link's EOF was seen: forget the old now.
                self._forget(old)
            wl.index, wl.pid, wl.node = index, pid, node
            self.workers[index] = wl
            link.reply(rid, True, None)
        elif method == "ready":
            wl.ready = True
            wl.port = args[0]
            self.worker_ready.set()
            self.worker_ready = trio.Event()
            link.reply(rid, True, None)
        else:
            link.reply(rid, False, f"unknown method {method!r}")

    def _publish_run(self, wl: WorkerLink, values: list[Any]) -> None:
        """Handle a run of publish requests (``[id, topic, data, sender, ...]``) in one loop:
        each is answered with ``[offset, epoch, mine]`` (``mine``: ``wl`` watches the topic
        and delivers the publication itself), in a run of replies; a refusal or a failure
        answers only its own request."""
        link = wl.link
        journal = self.journal
        durable = journal is not None and journal.ack_on_disk
        for i in range(0, len(values), 4):
            rid = values[i]
            try:
                if durable:
                    self._publish_durable(link, rid, values[i + 1], values[i + 2], values[i + 3])
                else:  # no closure per publication
                    pub, mine = self._publish(values[i + 1], values[i + 2], values[i + 3], wl)
                    link.reply_run(rid, [pub.offset, pub.epoch, mine], REPLY_SIZE)
            except FrameError as exc:  # a refusal the client hears about (too_many_topics)
                link.reply(rid, False, [exc.code, exc.message])
            except Exception as exc:  # a bad request must not take the hub down
                log.exception("hub_request_failed", kind="publish")
                link.reply(rid, False, f"internal: {exc}")

    def _publish_durable(
        self, link: Link, rid: int, topic: str, data: str, sender: str | None
    ) -> None:
        """Publish and answer request ``rid`` once the publication is on disk. The
        publishing worker gets its publication forwarded like every other (in offset order
        with the rest of the topic), not with its reply, which may come after later
        publications."""
        journal = self.journal
        assert journal is not None
        pub, _ = self._publish(topic, data, sender, None)

        def answer(error: BaseException | None) -> None:
            if error is None:
                link.reply(rid, True, [pub.offset, pub.epoch, False])
            else:
                link.reply(rid, False, [COMMIT_FAILED.code, COMMIT_FAILED.message])

        journal.when_durable(answer)

    # --- used by the hub's own requests and by the operations listener --------------------

    def history_stats(self) -> dict[str, Any]:
        stats = self.store.stats()
        if self.journal is not None:
            stats["store"] = self.journal.stats()
        return stats

    def publish(self, topic: str, data: str, sender: str | None) -> Publication:
        """Publish from outside every worker (the operations listener)."""
        return self._publish(topic, data, sender, None)[0]

    def _publish(
        self, topic: str, data: str, sender: str | None, source: WorkerLink | None
    ) -> tuple[Publication, bool]:
        """Store and forward a publication to its watchers but ``source``; and whether
        ``source`` watches it (then its reply says so and it delivers the publication itself)."""
        pub = self.store.publish(topic, data, sender)
        self.publications += 1
        index = self.watchers
        if index.has_wildcards:
            # a worker watching through several patterns is matched (and sent it) once
            targets: Iterable[WorkerLink] = {id(w): w for w in index.match(topic)}.values()
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
            if not values:
                values = (pub.topic, pub.offset, pub.epoch, pub.sender, pub.data)
                size = worst_size(topic, data, sender)
            w.link.send_run("pubs", values, size)
        return pub, mine

    def forward_presence(self, event: PresenceEvent) -> None:
        targets = {id(w): w for w in self.watchers.match(event.topic)}
        if targets:
            frame = encode(["presence", event.topic, event.kind, event.client])
            for w in targets.values():
                w.link.send_bytes(frame)

    async def ask_all(self, method: str, *args: Any) -> list[Any]:
        """Send a request to every connected worker; the answers of those that answered."""
        results: list[Any] = []

        async def ask(wl: WorkerLink) -> None:
            try:
                results.append(await wl.link.call(method, *args))
            except Exception as exc:
                log.warning("worker_request_failed", worker=wl.index, method=method, error=str(exc))

        async with trio.open_nursery() as nursery:
            for wl in list(self.workers.values()):
                nursery.start_soon(ask, wl)
        return results
