"""A connection whose publication Redis could not take: the client is told, and the connection
goes on serving (the Redis bus publishes by awaiting, not through publish_nowait)."""

from __future__ import annotations

import trio

from tests.support.inmemory import call, connect, make_worker, recv, running, token

from .conftest import RedisServer


async def test_a_failed_publish_leaves_the_connection_serving(redis_server: RedisServer) -> None:
    worker = make_worker(bus={"url": redis_server.url})
    async with running(worker) as nursery:
        ws = await connect(worker, nursery, f"/ws?token={token()}")
        await recv(ws)
        with trio.fail_after(20):
            assert (await call(ws, op="publish", topic="t", data=1, id=1))["ok"]
            redis_server.kill()
            failed = await call(ws, op="publish", topic="t", data=2, id=2)
            assert failed["error"]["code"] == "unavailable"
            # Later ops were left waiting for that publication's answer, until the idle
            # timeout closed the connection.
            assert (await call(ws, op="ping", id=3))["ok"]
        nursery.cancel_scope.cancel()
