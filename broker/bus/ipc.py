"""The worker's side of the local IPC bus: every operation is a request to the supervisor's
hub (:mod:`broker.hub`) over a Unix socket; publications and presence events the hub forwards
arrive on the same link, in order. Requests the hub sends the other way (statistics, a
disconnect ordered through the HTTP API) go to ``control``.

A publish request crosses batched (in a run of them, :meth:`broker.ipc.Link.call_run`), and
its reply says whether this worker watches the topic: then the hub has not forwarded the
publication here, and this worker delivers it to its own subscribers when the reply arrives,
from the reader, at the place in the link's order where the forwarded publication would have
been (see :mod:`broker.owner`). Publications forwarded by the hub arrive in runs too, each
run delivered in one loop.

:class:`LinkBus` is that request and reply logic for any owner of topics reached over a link
(:class:`Caller`); :class:`IpcBus` is it with the hub as the owner of every topic, and
:class:`broker.bus.sharded.ShardedBus` with each topic's owning worker."""

from __future__ import annotations

import abc
import os
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

from broker.bus.base import (
    Bus,
    BusHandlers,
    ConnKey,
    HistoryResult,
    PresenceEvent,
    Publication,
    StreamPosition,
)
from broker.errors import BusUnavailable, FrameError
from broker.ipc import Link, fits, worst_size

__all__ = ["Caller", "HubClient", "IpcBus", "LinkBus"]

log = structlog.get_logger()
HEARTBEAT = 1.0
#: Seconds a publish waits for its owner's answer (the links' own request timeout).
CALL_TIMEOUT = 10.0

Control = Callable[[str, list[Any]], Awaitable[Any]]


class Caller:
    """Whatever carries a :class:`LinkBus`'s requests to the owner of a topic, over its
    current :attr:`link` (None while there is none: requests then fail with
    :class:`BusUnavailable`): the hub's :class:`HubClient`, or a link to one worker's shard
    (:class:`broker.bus.sharded.ShardLink`)."""

    link: Link | None = None
    #: What a request made while there is no link fails with.
    down = "not connected to the hub"

    def call_run(
        self,
        done: Callable[[Any | BaseException], None],
        kind: str,
        values: tuple[Any, ...],
        size: int,
    ) -> None:
        """:meth:`broker.ipc.Link.call_run` on the link, once there is one."""
        if self.link is None:
            done(BusUnavailable(self.down))
            return
        self.link.call_run(done, kind, values, size)

    async def call(self, method: str, *args: Any) -> Any:
        """:meth:`broker.ipc.Link.call` on the link, once there is one."""
        if self.link is None:
            raise BusUnavailable(self.down)
        return await self.link.call(method, *args)

    @property
    def is_up(self) -> bool:
        return self.link is not None and not self.link.closed


class HubClient(Caller):
    """A worker's link to its supervisor's hub: the hello, readiness, heartbeats, and the
    supervisor's requests (``control``). Every multi-worker process has one, whatever its bus."""

    def __init__(self, path: str, *, index: int, node: str, control: Control | None = None) -> None:
        self.path = path
        self.index = index
        self.node = node
        self.control = control
        self.link: Link | None = None
        self.on_push: Callable[[list[Any]], None] = lambda message: None
        self._nursery: trio.Nursery | None = None
        self.connected = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and serve the link; return when the hub closes it (the supervisor is gone)."""
        stream = await trio.open_unix_socket(self.path)
        link = Link(stream, self._on_message)
        self.link = link
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(link.run)
            await link.call("hello", self.index, os.getpid(), self.node)
            nursery.start_soon(self._heartbeat)
            self.connected.set()
            task_status.started()
            await link.gone.wait()
            nursery.cancel_scope.cancel()
        log.error("hub_link_lost")

    async def _heartbeat(self) -> None:
        # Sent from the worker's own loop: a blocked loop stops sending, which is how the
        # supervisor tells a hung worker from a busy one.
        assert self.link is not None
        while True:
            self.link.send(["hb"])
            await trio.sleep(HEARTBEAT)

    def _on_message(self, link: Link, message: list[Any]) -> None:
        if message[0] == "req" and self._nursery is not None:
            self._nursery.start_soon(self._answer, link, message)
        else:
            self.on_push(message)

    async def _answer(self, link: Link, message: list[Any]) -> None:
        rid, method, args = message[1], message[2], message[3:]
        if self.control is None:
            link.reply(rid, False, "no control handler")
            return
        try:
            link.reply(rid, True, await self.control(method, args))
        except Exception as exc:
            log.exception("control_failed", method=method)
            link.reply(rid, False, f"internal: {exc}")

    async def wait_closed(self) -> None:
        await self.connected.wait()
        assert self.link is not None
        await self.link.gone.wait()


class LinkBus(Bus):
    """A bus whose topics are ordered in another process, reached over links
    (:mod:`broker.ipc`): each request goes to :meth:`_caller` of its topic; publications and
    presence events the owners forward arrive through :meth:`_on_push`."""

    @abc.abstractmethod
    def _caller(self, topic: str) -> Caller:
        """What carries requests about ``topic``."""

    def _on_push(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == "pubs":  # a run: [topic, offset, epoch, sender, data, ...]
            values = message[1]
            on_publication = self.handlers.on_publication
            for i in range(0, len(values), 5):
                on_publication(
                    Publication(
                        values[i], values[i + 1], values[i + 2], values[i + 3], values[i + 4]
                    )
                )
        elif kind == "presence":
            _, topic, what, client = message
            self.handlers.on_presence(PresenceEvent(topic, what, client))

    async def _call(self, method: str, topic: str, *args: Any) -> Any:
        return await self._caller(topic).call(method, topic, *args)

    @staticmethod
    def _check_fits(topic: str, data: str, sender: str | None) -> int:
        """A publication the link cannot carry (``max_data_size`` set past it) is refused
        here, rather than ending this worker's link; else its :func:`worst_size`."""
        worst = worst_size(topic, data, sender)
        if not fits(worst, topic, data, sender):
            raise FrameError("too_large", "the publication is larger than the bus can carry")
        return worst

    async def publish(self, topic: str, data: str, sender: str | None) -> Publication:
        # Through publish_nowait: the local delivery must happen in the reader, in order.
        answered = trio.Event()
        slot: list[Publication | BaseException] = []

        def done(result: Publication | BaseException) -> None:
            slot.append(result)
            answered.set()

        self.publish_nowait(topic, data, sender, done)
        with trio.move_on_after(CALL_TIMEOUT):
            await answered.wait()
        if not slot:
            raise BusUnavailable(f"no answer to publish in {CALL_TIMEOUT:g}s")
        if isinstance(slot[0], BaseException):
            raise slot[0]
        return slot[0]

    def publish_nowait(
        self,
        topic: str,
        data: str,
        sender: str | None,
        done: Callable[[Publication | BaseException], None],
    ) -> bool:
        return self._publish_through(self._caller(topic), topic, data, sender, done)

    def _publish_through(
        self,
        caller: Caller,
        topic: str,
        data: str,
        sender: str | None,
        done: Callable[[Publication | BaseException], None],
    ) -> bool:
        """:meth:`publish_nowait` through ``caller``, the topic's :meth:`_caller`."""

        def reply(result: Any | BaseException) -> None:
            if isinstance(result, BaseException):
                done(result)
                return
            pub = Publication(topic, result[0], result[1], sender, data)
            if result[2]:  # watched here: the owner left the delivery to us
                self.handlers.on_publication(pub)
            done(pub)

        try:
            size = self._check_fits(topic, data, sender)
        except FrameError as exc:
            done(exc)
            return True
        caller.call_run(reply, "publish", (topic, data, sender), size)
        return True

    async def position(self, topic: str) -> StreamPosition:
        offset, epoch = await self._call("position", topic)
        return StreamPosition(offset, epoch)

    async def history(
        self, topic: str, since: StreamPosition | None, limit: int | None, *, newest: bool = False
    ) -> HistoryResult:
        raw_since = None if since is None else [since.offset, since.epoch]
        # A paged reply (broker.owner.history_reply): the items arrive in bounded messages.
        pubs, pos, recovered, missed = await self._call("history", topic, raw_since, limit, newest)
        return HistoryResult(
            tuple(Publication(topic, o, e, s, d) for o, e, s, d in pubs),
            StreamPosition(pos[0], pos[1]),
            recovered,
            None if missed is None else (missed[0], missed[1]),
        )

    async def watch(self, pattern: str) -> None:
        await self._call("watch", pattern)

    async def unwatch(self, pattern: str) -> None:
        await self._call("unwatch", pattern)

    async def presence_join(self, topic: str, client: str, key: ConnKey) -> None:
        await self._call("join", topic, client, [key.node, key.worker, key.conn])

    async def presence_leave(self, topic: str, client: str, key: ConnKey) -> None:
        await self._call("leave", topic, client, [key.node, key.worker, key.conn])

    async def presence(self, topic: str) -> list[str]:
        return list(await self._call("presence", topic))


class IpcBus(LinkBus):
    """The local bus over a :class:`HubClient` (which the worker process runs): the hub
    owns every topic."""

    def __init__(self, client: HubClient, handlers: BusHandlers) -> None:
        self.client = client
        self.handlers = handlers
        client.on_push = self._on_push

    def _caller(self, topic: str) -> Caller:
        return self.client

    @property
    def is_up(self) -> bool:
        return self.client.is_up

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.client.connected.wait()
        task_status.started()
        await self.client.wait_closed()
