"""Recovery as a property: a seeded random schedule interleaves publications, subscribers
dropping and coming back with ``since``, and time passing beyond the history's ttl. Every
subscriber's view must account for each offset exactly once, in order: delivered, or inside an
exact ``missed`` range that matches what the model says was evicted (by size or by age)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket

from tests.unit.test_session_memory import connect, make_worker, running, token

SIZE = 6
TTL = 30.0


class Subscriber:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ws: trio_websocket.WebSocketConnection | None = None
        self.position: dict[str, Any] | None = None
        self.start: int | None = None  # the offset its first subscription started after
        self.view: list[tuple[str, int, int]] = []  # ("msg", o, o) or ("missed", a, b)


async def drain(sub: Subscriber) -> None:
    """Read what has arrived (the clock does not need to move for in-memory streams)."""
    assert sub.ws is not None
    while True:
        with trio.move_on_after(0.001) as scope:
            raw = await sub.ws.get_message()
        if scope.cancelled_caught:
            return
        msg = json.loads(raw)
        if msg.get("op") == "message":
            sub.view.append(("msg", msg["offset"], msg["offset"]))
            sub.position = {"offset": msg["offset"], "epoch": msg["epoch"]}


@pytest.mark.parametrize("seed", range(6))
async def test_random_schedule_accounts_for_every_offset(
    seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    rng = random.Random(seed)
    worker = make_worker(
        history=[{"pattern": ">", "size": SIZE, "ttl": TTL}],
        timeouts={"idle_timeout": 10_000, "ping_interval": 10_000},
    )
    published: dict[int, float] = {}  # offset -> time of publication (the model)
    async with running(worker) as nursery:
        pub = await connect(worker, nursery, f"/ws?token={token('pub', ttl=10**6)}")
        await pub.get_message()
        subs = [Subscriber(f"s{i}") for i in range(3)]
        for step in range(160):
            action = rng.random()
            if action < 0.5:
                await pub.send_message(
                    json.dumps({"op": "publish", "topic": "t", "data": step, "id": step})
                )
                reply = json.loads(await pub.get_message())
                published[reply["offset"]] = trio.current_time()
            elif action < 0.65:
                sub = rng.choice(subs)
                if sub.ws is not None:
                    await drain(sub)
                    if rng.random() < 0.5:
                        await sub.ws.aclose()
                    else:
                        await trio.aclose_forcefully(sub.ws._stream)  # no close frame
                    sub.ws = None
            elif action < 0.85:
                sub = rng.choice(subs)
                if sub.ws is None:
                    sub.ws = await connect(
                        worker, nursery, f"/ws?token={token(sub.name, ttl=10**6)}"
                    )
                    await sub.ws.get_message()
                    frame: dict[str, Any] = {"op": "subscribe", "topic": "t", "id": "s"}
                    if sub.position is not None:
                        frame["since"] = sub.position
                    await sub.ws.send_message(json.dumps(frame))
                    reply = json.loads(await sub.ws.get_message())
                    assert reply["ok"], reply
                    now = trio.current_time()
                    current = max(published, default=0)
                    assert reply["offset"] == current
                    if sub.position is None:
                        sub.start = current
                    else:
                        # The model: what is still held after the client's position.
                        held = [
                            o for o, t in published.items() if t > now - TTL and o > current - SIZE
                        ]
                        first_held = min(held, default=current + 1)
                        since = sub.position["offset"]
                        if since + 1 < first_held:
                            assert reply["recovered"] is False
                            assert reply["missed"] == {"from": since + 1, "to": first_held - 1}
                            sub.view.append(("missed", since + 1, first_held - 1))
                        else:
                            assert reply["recovered"] is True and "missed" not in reply
                    sub.position = {
                        "offset": reply["offset"]
                        if sub.position is None
                        else sub.position["offset"],
                        "epoch": reply["epoch"],
                    }
            else:
                await trio.sleep(rng.uniform(0, TTL * 1.2))
            for sub in subs:
                if sub.ws is not None:
                    await drain(sub)
        final = max(published, default=0)
        # The schedule must have exercised both paths: exact replays and reported gaps.
        assert any(kind == "missed" for s in subs for kind, _, _ in s.view), seed
        for sub in subs:
            if sub.ws is None:
                continue
            await drain(sub)
            if sub.start is None:
                continue
            # Every offset after the first subscription, exactly once, in order.
            covered: list[int] = []
            for _kind, a, b in sub.view:
                covered.extend(range(a, b + 1))
            expected_end = sub.position["offset"] if sub.position else sub.start
            assert covered == list(range(sub.start + 1, expected_end + 1)), (
                seed,
                sub.name,
                sub.view,
            )
            assert expected_end == final, (seed, sub.name)
        nursery.cancel_scope.cancel()
