"""Every connection's deadlines, kept by one task per worker.

Why not a timer task per connection: a task with its cancel scope and event costs a few KiB,
and a worker holds tens of thousands of idle connections. Here each connection owns at most
one live entry in a heap; :class:`Deadlines` sleeps until the earliest one and calls its
owner's ``on_deadline(now)``, which does what is due (close an idle connection, send a ping)
and returns when it next needs to be called (or None). Entries are invalidated lazily: an
owner that needs an earlier call, or has closed, detaches its old entry's handle (which then
holds nothing), and detached entries are skipped when they come up. A deadline that merely
moves later (the idle timer after each received frame) needs no entry at all: the owner
recomputes it when its entry fires.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Protocol

import structlog
import trio

__all__ = ["Deadlines", "TimedOwner", "Timer"]


class TimedOwner(Protocol):
    timer: Timer | None

    def on_deadline(self, now: float) -> float | None:
        """Do what is due at ``now``; return the next time to be called, or None."""


class Timer:
    """A heap entry's handle on its owner. Cancelling drops the reference, so a closed
    connection is not kept alive by its stale entry until that entry comes up (with a long
    ping interval that was minutes of a dead connection's memory)."""

    __slots__ = ("owner",)

    def __init__(self, owner: TimedOwner) -> None:
        self.owner: TimedOwner | None = owner


class Deadlines:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._wakeup = trio.Event()
        self._next = math.inf
        self._stale = 0  # detached entries still in the heap

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, owner: TimedOwner, when: float) -> None:
        """Call ``owner.on_deadline`` at ``when``, replacing any earlier scheduling."""
        self.cancel(owner)
        timer = owner.timer = Timer(owner)
        heapq.heappush(self._heap, (when, next(self._order), timer))
        if when < self._next:
            self._wakeup.set()

    def cancel(self, owner: TimedOwner) -> None:
        if owner.timer is not None:
            owner.timer.owner = None
            owner.timer = None
            self._stale += 1
            if self._stale > 1024 and self._stale * 2 > len(self._heap):
                # Mostly dead entries (connections that closed long before their next
                # deadline): rebuild rather than carry them until they come up.
                self._heap[:] = [e for e in self._heap if e[2].owner is not None]
                heapq.heapify(self._heap)
                self._stale = 0

    async def run(self) -> None:
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, timer = heapq.heappop(heap)
                owner = timer.owner
                if owner is None:
                    self._stale = max(0, self._stale - 1)
                    continue  # replaced or cancelled
                try:
                    when = owner.on_deadline(now)
                except Exception:  # one owner's bug must not stop everyone's timers
                    structlog.get_logger().exception("deadline_failed")
                    continue
                if when is not None and timer.owner is not None:
                    heapq.heappush(heap, (when, next(self._order), timer))
            self._next = heap[0][0] if heap else math.inf
            self._wakeup = trio.Event()
            with trio.move_on_at(self._next):
                await self._wakeup.wait()
