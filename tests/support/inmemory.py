"""A worker served over in-memory streams: the real session code, no socket. Used with
trio's autojump clock, every timer of a connection runs in milliseconds."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import jwt
import pytest
import trio
import trio.testing
import trio_websocket

from broker.bus.base import Bus, BusHandlers
from broker.config import Config, parse_config
from broker.worker import Worker

SECRET = "m" * 40


def make_worker(
    bus_factory: Callable[[Config, BusHandlers], Bus] | None = None, **sections: dict[str, Any]
) -> Worker:
    """A worker with these config sections (and ``bus_factory``; the in-process bus when
    None), accepting tokens made by :func:`token`."""
    raw: dict[str, Any] = {
        "auth": {"jwt_secret": SECRET, "default_publish": [">"], "default_subscribe": [">"]},
        **sections,
    }
    return Worker(parse_config(raw, env={}), node="test", bus_factory=bus_factory)


def token(sub: str = "alice", ttl: float = 3600, **claims: Any) -> str:
    return jwt.encode(
        {"sub": sub, "exp": int(time.time() + ttl), **claims}, SECRET, algorithm="HS256"
    )


@asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.services)
        yield nursery
        nursery.cancel_scope.cancel()


async def connect(
    worker: Worker,
    nursery: trio.Nursery,
    resource: str = "/ws",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> trio_websocket.WebSocketConnection:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    nursery.start_soon(worker._handle, server_stream)
    return await trio_websocket.wrap_client_stream(
        nursery,
        client_stream,
        "test",
        resource,
        extra_headers=headers,
        subprotocols=["pubsub.v1"],  # type: ignore[arg-type]
    )


async def recv(ws: trio_websocket.WebSocketConnection) -> dict[str, Any]:
    return json.loads(await ws.get_message())  # type: ignore[no-any-return]


async def call(ws: trio_websocket.WebSocketConnection, **frame: Any) -> dict[str, Any]:
    await ws.send_message(json.dumps(frame))
    while True:
        msg = await recv(ws)
        if msg.get("id") == frame.get("id"):
            return msg


async def closed_with(ws: trio_websocket.WebSocketConnection) -> int:
    with pytest.raises(trio_websocket.ConnectionClosed) as info:
        while True:
            await ws.get_message()
    assert info.value.reason is not None
    return info.value.reason.code
