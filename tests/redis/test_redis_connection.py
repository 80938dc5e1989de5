"""The Redis bus's connection at the end of a session, against a stand-in client.

The moment between a session breaking and its client's pool having exited is short against a
real Redis; a stand-in client that holds its exit open makes it last, so that what a command
started then meets is certain.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from broker.bus.redis.connection import Connection, Reconnect
from broker.errors import BusUnavailable


class _ExitingClient:
    """A client whose pool exits slowly: its exit waits for ``release``; a command after the
    exit began fails as coredis's does on an exited pool."""

    def __init__(self) -> None:
        self.exiting = trio.Event()
        self.release = trio.Event()

    async def __aenter__(self) -> _ExitingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.exiting.set()
        await self.release.wait()

    async def ping(self) -> bytes:
        return b"PONG"

    async def get(self, key: str) -> bytes:
        if self.exiting.is_set():
            raise RuntimeError("Connection pool is not initialized or has exited.")
        return b"1"


async def test_a_command_while_the_session_ends_is_unavailable_never_a_crash() -> None:
    client = _ExitingClient()
    conn = Connection(
        "redis://127.0.0.1:1/0",
        node="n",
        cluster=False,
        timeout=1.0,
        reconnect_max=60.0,
        on_state=lambda up: None,
    )
    conn._make_client = lambda: client  # type: ignore[method-assign]
    broke = trio.Event()

    async def session(_: Any) -> None:
        conn.announce_up()
        await broke.wait()
        raise Reconnect("the connection was lost")

    async with trio.open_nursery() as nursery:
        await nursery.start(conn.maintain, session)
        with conn.ops("get") as c:
            assert await c.get("k") == b"1"
        broke.set()
        await client.exiting.wait()
        # The session is over, its pool exiting: a command fails as Redis being away does.
        with pytest.raises(BusUnavailable), conn.ops("get") as c:
            await c.get("k")
        client.release.set()
        nursery.cancel_scope.cancel()
