"""Every connection's deadlines, kept by one task per worker.

Why not a timer task per connection: a task with its cancel scope and event costs a few KiB,
and a worker holds tens of thousands of idle connections. Here each connection owns at most
one live entry in a heap; :class:`Deadlines` sleeps until the earliest one and calls its
owner's ``on_deadline(now)``, which does what is due (close an idle connection, send a ping)
and returns when it next needs to be called (or None). Entries are invalidated lazily: an
owner that needs an earlier call, or has closed, bumps its generation, and stale entries are
skipped when they come up. A deadline that merely moves later (the idle timer after each
received frame) needs no entry at all: the owner recomputes it when its entry fires.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Protocol

import trio

__all__ = ["Deadlines", "TimedOwner"]


class TimedOwner(Protocol):
    timer_generation: int

    def on_deadline(self, now: float) -> float | None:
        """Do what is due at ``now``; return the next time to be called, or None."""


class Deadlines:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, TimedOwner]] = []
        self._order = itertools.count()
        self._wakeup = trio.Event()
        self._next = math.inf

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, owner: TimedOwner, when: float) -> None:
        """Call ``owner.on_deadline`` at ``when``, replacing any earlier scheduling."""
        owner.timer_generation += 1
        heapq.heappush(self._heap, (when, next(self._order), owner.timer_generation, owner))
        if when < self._next:
            self._wakeup.set()

    @staticmethod
    def cancel(owner: TimedOwner) -> None:
        owner.timer_generation += 1

    async def run(self) -> None:
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, generation, owner = heapq.heappop(heap)
                if generation != owner.timer_generation:
                    continue  # replaced or cancelled
                try:
                    when = owner.on_deadline(now)
                except Exception:  # one owner's bug must not stop everyone's timers
                    import structlog

                    structlog.get_logger().exception("deadline_failed")
                    continue
                if when is not None:
                    heapq.heappush(heap, (when, next(self._order), generation, owner))
            self._next = heap[0][0] if heap else math.inf
            self._wakeup = trio.Event()
            with trio.move_on_at(self._next):
                await self._wakeup.wait()
