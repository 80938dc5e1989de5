"""The in-process bus: one worker, no other process. Publications are delivered by a direct
call, in the publishing task, before :meth:`LocalBus.publish` returns. History lives in a
:class:`~broker.history.TopicStore` bounded by ``[limits] history_max_bytes`` and
``max_topics``, kept on disk when ``[store] path`` is set (:mod:`broker.store`): the file is
read before the bus serves, and written by a flusher task beside the sweeper."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
import trio.lowlevel

from broker.bus.base import (
    Bus,
    BusHandlers,
    ConnKey,
    HistoryResult,
    PresenceEvent,
    Publication,
    StreamPosition,
)
from broker.config import HistoryRule, LimitsConfig, StoreConfig
from broker.errors import FrameError
from broker.history import TopicStore
from broker.store import COMMIT_FAILED, make_journal

__all__ = ["LocalBus"]

SWEEP_INTERVAL = 5.0


class LocalBus(Bus):
    def __init__(
        self,
        rule_for: Callable[[str], HistoryRule],
        handlers: BusHandlers,
        limits: LimitsConfig | None = None,
        store: StoreConfig | None = None,
    ) -> None:
        self.handlers = handlers
        self.store = TopicStore.bounded(rule_for, trio.current_time, limits or LimitsConfig())
        self.journal = make_journal(store)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # trio.current_time() is three calls deep to this clock's method: ask it directly.
        self.store.set_clock(trio.lowlevel.current_clock().current_time)
        async with trio.open_nursery() as nursery:
            if self.journal is not None:
                self.journal.start(self.store)
                nursery.start_soon(self.journal.run, self.store)
            task_status.started()
            while True:
                await trio.sleep(SWEEP_INTERVAL)
                self.store.sweep()

    @property
    def is_up(self) -> bool:
        return True

    async def publish(self, topic: str, data: str, sender: str | None) -> Publication:
        pub = self.store.publish(topic, data, sender)
        self.handlers.on_publication(pub)
        if self.journal is not None:
            await self.journal.acknowledged()
        return pub

    def publish_now(self, topic: str, data: str, sender: str | None) -> Publication | None:
        journal = self.journal
        if journal is not None and journal.ack_on_disk:
            return None  # settled once on disk: publish_nowait
        pub = self.store.publish(topic, data, sender)
        self.handlers.on_publication(pub)
        return pub

    def publish_nowait(
        self,
        topic: str,
        data: str,
        sender: str | None,
        done: Callable[[Publication | BaseException], None],
    ) -> bool:
        try:
            pub = self.store.publish(topic, data, sender)
        except FrameError as exc:  # too_many_topics: the caller answers it like any result
            done(exc)
            return True
        self.handlers.on_publication(pub)
        journal = self.journal
        if journal is None or not journal.ack_on_disk:  # no closure per publication
            done(pub)
        else:
            journal.when_durable(lambda error: done(pub if error is None else COMMIT_FAILED))
        return True

    def history_stats(self) -> dict[str, Any]:
        stats = self.store.stats()
        if self.journal is not None:
            stats["store"] = self.journal.stats()
        return stats

    async def position(self, topic: str) -> StreamPosition:
        return self.store.position(topic)

    async def history(
        self, topic: str, since: StreamPosition | None, limit: int | None, *, newest: bool = False
    ) -> HistoryResult:
        return self.store.history(topic, since, limit, newest=newest)

    def reconfigure(self, history_rule: Callable[[str], HistoryRule]) -> None:
        self.store.rule_for = history_rule

    async def watch(self, pattern: str) -> None:
        # Everything published here is delivered here: the router filters by subscription.
        pass

    async def unwatch(self, pattern: str) -> None:
        pass

    async def presence_join(self, topic: str, client: str, key: ConnKey) -> None:
        if self.store.join(topic, client, key):
            self.handlers.on_presence(PresenceEvent(topic, "join", client))

    async def presence_leave(self, topic: str, client: str, key: ConnKey) -> None:
        if self.store.leave(topic, client, key):
            self.handlers.on_presence(PresenceEvent(topic, "leave", client))

    async def presence(self, topic: str) -> list[str]:
        return self.store.members(topic)

    def presence_members(self) -> int:
        return self.store.presence_members
