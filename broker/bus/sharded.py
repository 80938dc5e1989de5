"""The sharded bus: topics owned by workers (``[server] topic_owner = "workers"``), the hub
off the data path.

Theory of operation
-------------------
With ``N`` workers each topic has one owner, worker :func:`broker.owner.owner_index` of its
name, which orders it exactly as the hub does in the other mode (offsets, epoch, history on
disk, presence): every worker runs a :class:`~broker.owner.TopicOwner` for its shard and
serves it on its own Unix socket, and keeps a :class:`ShardLink` to every other worker's
socket. A request about a topic goes to its owner: over that owner's link with the same
messages and runs as the hub's link, or, when this worker owns the topic, to its own owner
by a direct call, with nothing marshalled (this worker's router is the owner's *local peer*).
A wildcard watch goes to every owner. Publications of one topic reach each worker in offset
order: they leave one owner, over one link per worker (or by a direct call).

When an owner's worker dies, its peers see its link close: requests for its topics fail with
:class:`~broker.errors.BusUnavailable` (clients get ``unavailable``) until the supervisor has
restarted it and the link is back (reconnected with a short backoff); on reconnecting, a
worker sends its watches and its connections' presence again. The restarted owner reads its
store file when ``[store] path`` is set (:mod:`broker.store`: after a kill at most the last
flush interval is lost, and named exactly as a gap); without one its topics start a new epoch.
Either way subscribers learn it through the usual recovery (a jump in offsets, or a new
epoch), never silently.

The supervisor's operations listener uses this bus too, with no shard of its own
(``index=None``): the HTTP API's publish, history and presence go to the owner.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
import trio

from broker.bus.base import (
    BusHandlers,
    ConnKey,
    HistoryResult,
    Publication,
    StreamPosition,
)
from broker.bus.ipc import Caller, LinkBus
from broker.config import HistoryRule
from broker.errors import BusUnavailable, FrameError
from broker.ipc import Link
from broker.owner import TopicOwner, owner_index
from broker.store import COMMIT_FAILED
from broker.topics import is_wildcard

__all__ = ["ShardLink", "ShardedBus"]

log = structlog.get_logger()

#: Seconds between attempts to reach an owner's socket: doubling from the first to the last.
RECONNECT_MIN = 0.05
RECONNECT_MAX = 0.5
#: Seconds a starting worker waits for its links to every other owner before it serves.
PEER_WAIT = 10.0
#: The request id of requests whose answer nobody waits for (a link's ids start at 1).
UNANSWERED = 0


class ShardLink(Caller):
    """This process's link to one owner, reconnected whenever it is lost.

    ``connect`` opens a stream to the owner (its socket) or raises :class:`OSError`; ``hello`` is ``(index, pid, node)``, what this process tells the owner it is; messages
    the owner pushes go to ``on_push``; ``on_connect(owner, link)`` runs as each new link is
    up (before anything else is sent on it), ``on_lost(owner)`` after each is gone.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[trio.abc.Stream]],
        owner: int,
        hello: tuple[int, int, str],
        on_push: Callable[[list[Any]], None],
        on_connect: Callable[[int, Link], None],
        on_lost: Callable[[int], None],
    ) -> None:
        self.connect = connect
        self.owner = owner
        self.hello = hello
        self.on_push = on_push
        self.on_connect = on_connect
        self.on_lost = on_lost
        self.link: Link | None = None
        self.connected = trio.Event()  # set once, when the first link is up
        self.down = f"unavailable: the owner of this topic (worker {owner}) is down"

    async def run(self) -> None:
        """Connect, serve the link until it goes, and connect again, until cancelled."""
        backoff = RECONNECT_MIN
        while True:
            try:
                stream = await self.connect()
            except OSError:
                await trio.sleep(backoff)
                backoff = min(2 * backoff, RECONNECT_MAX)
                continue
            backoff = RECONNECT_MIN
            link = Link(stream, lambda _, message: self.on_push(message))
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(link.run)
                    link.send(["req", UNANSWERED, "hello", *self.hello])
                    self.link = link
                    self.on_connect(self.owner, link)
                    self.connected.set()
                    await link.gone.wait()
                    nursery.cancel_scope.cancel()
            finally:
                self.link = None
                link.close()
                await trio.aclose_forcefully(stream)
            self.on_lost(self.owner)
            await trio.sleep(backoff)


class ShardedBus(LinkBus):
    """The bus of a worker among ``len(paths)`` owners (``paths``: their sockets, by index),
    itself owner ``index`` through ``owner``; or, with ``index`` None and no ``owner``, a
    client of every owner (the operations listener). ``wait_for_peers``: :meth:`run` reports
    started once every other owner is reached (or after :data:`PEER_WAIT` seconds).
    ``connect(i)``, when given, opens a stream to owner ``i`` instead of its socket, and this
    worker's owner serves no socket (whoever connects calls its ``handle``)."""

    def __init__(
        self,
        handlers: BusHandlers,
        *,
        paths: list[str],
        index: int | None,
        node: str,
        owner: TopicOwner | None = None,
        wait_for_peers: bool = True,
        connect: Callable[[int], Awaitable[trio.abc.Stream]] | None = None,
    ) -> None:
        self.handlers = handlers
        self.paths = paths
        self.count = len(paths)
        self.index = index
        self.owner = owner
        self.local = (
            owner.attach_local(handlers.on_publication, handlers.on_presence) if owner else None
        )
        self.wait_for_peers = wait_for_peers
        hello = (-1 if index is None else index, os.getpid(), node)
        # Tests connect owners otherwise (memory streams): then nothing listens on a socket.
        self.connect = connect
        self.shards: dict[int, ShardLink] = {
            i: ShardLink(
                functools.partial(connect, i)
                if connect is not None
                else functools.partial(trio.open_unix_socket, path),
                i,
                hello,
                self._on_push,
                self._resync,
                self._lost,
            )
            for i, path in enumerate(paths)
            if i != index
        }
        # What this worker asked of the owners, sent again to one that comes back: the
        # patterns it watches, and its connections' presence by topic.
        self._watches: set[str] = set()
        self._joined: dict[str, dict[ConnKey, str]] = {}
        # Publications not answered yet, in the order made: [done, result once known].
        self._answers: deque[list[Any]] = deque()

    # --- links ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.owner is not None and self.index is not None:
                if self.connect is None:
                    await nursery.start(self.owner.serve, Path(self.paths[self.index]))
                else:
                    await nursery.start(self.owner.services)
            for shard in self.shards.values():
                nursery.start_soon(shard.run)
            if self.wait_for_peers:
                with trio.move_on_after(PEER_WAIT):
                    await self.wait_connected()
            task_status.started()

    async def wait_connected(self) -> None:
        """Return once every other owner has been reached (once: not whether it is now)."""
        for shard in self.shards.values():
            await shard.connected.wait()

    @property
    def is_up(self) -> bool:
        return all(shard.is_up for shard in self.shards.values())

    def _resync(self, owner: int, link: Link) -> None:
        """Tell a (re)connected owner what this worker watches of it and who is present on
        its topics, before anything else crosses the new link."""
        for pattern in self._watches:
            if is_wildcard(pattern) or owner_index(pattern, self.count) == owner:
                link.send(["req", UNANSWERED, "watch", pattern])
        for topic, members in self._joined.items():
            if owner_index(topic, self.count) == owner:
                for key, client in members.items():
                    key_values = [key.node, key.worker, key.conn]
                    link.send(["req", UNANSWERED, "join", topic, client, key_values])
        log.info("owner_link_up", owner=owner, watches=len(self._watches))
        if self.is_up:  # every owner reached again
            self.handlers.on_state(True)

    def _lost(self, owner: int) -> None:
        log.warning("owner_link_lost", owner=owner)
        self.handlers.on_state(False)

    def _caller(self, topic: str) -> Caller:
        return self.shards[owner_index(topic, self.count)]

    def _owns(self, topic: str) -> bool:
        return self.index is not None and owner_index(topic, self.count) == self.index

    # --- the Bus interface --------------------------------------------------------------------

    def publish_nowait(
        self,
        topic: str,
        data: str,
        sender: str | None,
        done: Callable[[Publication | BaseException], None],
    ) -> bool:
        # Answered in the order published (what a connection's replies rely on), though
        # owners answer at their own pace: while an answer is outstanding, later ones wait.
        at = owner_index(topic, self.count)
        if at != self.index:
            return self._publish_through(self.shards[at], topic, data, sender, self._in_order(done))
        owner = self.owner
        assert owner is not None
        journal = owner.journal
        try:
            if journal is not None and journal.ack_on_disk:
                # Delivered here like anywhere else, answered once it is on disk.
                pub, _ = owner.publish_from(topic, data, sender, None)
                answer = self._in_order(done)
                journal.when_durable(lambda error: answer(pub if error is None else COMMIT_FAILED))
                return True
            pub, mine = owner.publish_from(topic, data, sender, self.local)
        except FrameError as exc:  # too_many_topics, unavailable: answered like any result
            self._answer_now(done, exc)
            return True
        if mine:
            self.handlers.on_publication(pub)
        self._answer_now(done, pub)
        return True

    def _answer_now(
        self,
        done: Callable[[Publication | BaseException], None],
        result: Publication | BaseException,
    ) -> None:
        """Call ``done`` with ``result`` now, or, while answers of publications made before
        it are outstanding, after them."""
        if self._answers:
            self._answers.append([done, result])
        else:
            done(result)

    def _in_order(
        self, done: Callable[[Publication | BaseException], None]
    ) -> Callable[[Publication | BaseException], None]:
        """``done``, called once every publication made before it is answered."""
        entry: list[Any] = [done, None]
        self._answers.append(entry)

        def answer(result: Publication | BaseException) -> None:
            entry[1] = result
            answers = self._answers
            while answers and answers[0][1] is not None:
                first, outcome = answers.popleft()
                first(outcome)

        return answer

    async def position(self, topic: str) -> StreamPosition:
        if self._owns(topic):
            assert self.owner is not None
            return self.owner.store.position(topic)
        return await super().position(topic)

    async def history(
        self, topic: str, since: StreamPosition | None, limit: int | None, *, newest: bool = False
    ) -> HistoryResult:
        if self._owns(topic):
            assert self.owner is not None
            return self.owner.store.history(topic, since, limit, newest=newest)
        return await super().history(topic, since, limit, newest=newest)

    async def watch(self, pattern: str) -> None:
        self._watches.add(pattern)
        if is_wildcard(pattern):
            # Every owner: one that is down is told when it is back (_resync).
            if self.owner is not None and self.local is not None:
                self.owner.watch(self.local, pattern)
            await self._to_every_owner("watch", pattern)
        elif self._owns(pattern):
            assert self.owner is not None and self.local is not None
            self.owner.watch(self.local, pattern)
        else:
            try:
                await super().watch(pattern)
            except BaseException:
                self._watches.discard(pattern)
                raise

    async def unwatch(self, pattern: str) -> None:
        self._watches.discard(pattern)
        if self.owner is not None and self.local is not None:
            self.owner.unwatch(self.local, pattern)
        if is_wildcard(pattern):
            await self._to_every_owner("unwatch", pattern)
        elif not self._owns(pattern):
            # An owner that is down forgot this worker's watches with its link.
            with contextlib.suppress(BusUnavailable):
                await super().unwatch(pattern)

    async def _to_every_owner(self, method: str, pattern: str) -> None:
        async def one(shard: ShardLink) -> None:
            # One that is down learns this worker's watches when it is back (_resync).
            with contextlib.suppress(BusUnavailable):
                await shard.call(method, pattern)

        async with trio.open_nursery() as nursery:
            for shard in self.shards.values():
                nursery.start_soon(one, shard)

    async def presence_join(self, topic: str, client: str, key: ConnKey) -> None:
        self._joined.setdefault(topic, {})[key] = client
        if self._owns(topic):
            assert self.owner is not None
            self.owner.join(topic, client, key)
        else:
            await super().presence_join(topic, client, key)

    async def presence_leave(self, topic: str, client: str, key: ConnKey) -> None:
        members = self._joined.get(topic)
        if members is not None:
            members.pop(key, None)
            if not members:
                del self._joined[topic]
        if self._owns(topic):
            assert self.owner is not None
            self.owner.leave(topic, client, key)
        else:
            await super().presence_leave(topic, client, key)

    async def presence(self, topic: str) -> list[str]:
        if self._owns(topic):
            assert self.owner is not None
            return self.owner.store.members(topic)
        return await super().presence(topic)

    def presence_members(self) -> int:
        return self.owner.store.presence_members if self.owner is not None else 0

    def history_stats(self) -> dict[str, Any]:
        return self.owner.history_stats() if self.owner is not None else {}

    def reconfigure(self, history_rule: Callable[[str], HistoryRule]) -> None:
        if self.owner is not None:
            self.owner.store.rule_for = history_rule
