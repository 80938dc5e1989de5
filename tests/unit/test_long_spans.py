"""What only shows after a long time: hours pass in milliseconds on trio's autojump clock.

An idle publisher must not save up more than ``publish_burst`` tokens however long it waits
(tests/sdk/test_reconnect_schedule.py does the same for the SDK's reconnect backoff).
"""

from __future__ import annotations

import json

import trio
import trio.testing
import trio_websocket

from broker.budget import TokenBucket
from tests.support.inmemory import connect, make_worker, recv, running, token

HOUR = 3600.0


def test_the_token_bucket_saves_at_most_its_burst() -> None:
    bucket = TokenBucket(rate=1.0, burst=5, now=0.0)
    assert sum(bucket.take(0.0) for _ in range(10)) == 5  # starts full
    assert sum(bucket.take(HOUR) for _ in range(10)) == 5  # an idle hour refills, to the cap
    assert sum(bucket.take(HOUR + 2.5) for _ in range(10)) == 2  # then rate tokens a second


async def test_a_client_idle_for_an_hour_publishes_at_most_the_burst_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    burst = 5
    worker = make_worker(
        limits={"publish_rate": 1.0, "publish_burst": burst},
        timeouts={"idle_timeout": 10 * HOUR, "ping_interval": 10 * HOUR},
    )

    async def publish_all(
        ws: trio_websocket.WebSocketConnection, n: int, first_id: int
    ) -> list[str]:
        """Pipeline ``n`` publications at one instant; the outcome of each, in order."""
        for i in range(n):
            frame = {"op": "publish", "topic": "t", "data": i, "id": first_id + i}
            await ws.send_message(json.dumps(frame))
        outcomes = []
        while len(outcomes) < n:
            reply = await recv(ws)
            if "id" in reply:
                outcomes.append("ok" if reply.get("ok") else reply["error"]["code"])
        return outcomes

    async with running(worker) as nursery:
        ws = await connect(worker, nursery, f"/ws?token={token(ttl=10 * HOUR)}")
        assert (await recv(ws))["op"] == "welcome"
        start = trio.current_time()
        assert await publish_all(ws, burst + 3, 1) == ["ok"] * burst + ["rate_limited"] * 3
        await trio.sleep(HOUR)
        outcomes = await publish_all(ws, burst + 3, 100)
        assert trio.current_time() - start < HOUR + 1  # the burst went out at one instant
        assert outcomes == ["ok"] * burst + ["rate_limited"] * 3, "saved past publish_burst"
        nursery.cancel_scope.cancel()
