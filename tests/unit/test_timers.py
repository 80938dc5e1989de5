"""The worker's deadline heap: entries of closed owners do not pile up."""

from __future__ import annotations

import trio

from broker.timers import Deadlines, Timer


def test_deadline_heap_sheds_entries_of_closed_owners() -> None:
    class Owner:
        def __init__(self) -> None:
            self.timer: Timer | None = None

        def on_deadline(self, now: float) -> float | None:
            return None

    async def main() -> None:
        deadlines = Deadlines()
        owners = [Owner() for _ in range(5000)]
        for o in owners:
            deadlines.schedule(o, 1e9)
        for o in owners[:4000]:
            deadlines.cancel(o)
        # Not 5000 entries kept until 1e9 seconds: the dead ones were shed.
        assert len(deadlines) < 3000
        assert all(o.timer is not None for o in owners[4000:])

    trio.run(main)
