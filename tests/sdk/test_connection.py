"""The connection loop against a scripted transport, on trio's autojump clock: what a request
does when the connection under it has just died."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from client_sdk._api import Client, run_client
from client_sdk._connection import Connection, Transport, TransportClosed
from client_sdk.errors import ConnectionLost, RequestTimeout

WELCOME = json.dumps({"op": "welcome", "client": "alice", "expires_at": None})


class ScriptedTransport:
    """A WebSocket whose broker acknowledges every publication. Once ``dead``, ``send`` raises
    at once without yielding, as trio-websocket does after a close, while ``receive`` goes on
    waiting until :meth:`drop` (the reader has not noticed yet)."""

    def __init__(self) -> None:
        self.dead = False
        self.published: list[object] = []
        self._send, self._receive = trio.open_memory_channel[str | None](100)
        self._send.send_nowait(WELCOME)

    async def send(self, text: str) -> None:
        if self.dead:
            raise TransportClosed(1006, None)
        frame = json.loads(text)
        if frame["op"] == "publish":
            self.published.append(frame["data"])
            reply = {"id": frame["id"], "ok": True, "offset": len(self.published)}
            self._send.send_nowait(json.dumps(reply))

    async def receive(self) -> str | bytes:
        text = await self._receive.receive()
        if text is None:
            raise TransportClosed(1006, None)
        return text

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.dead = True

    def drop(self) -> None:
        self.dead = True
        self._send.send_nowait(None)


async def test_a_request_after_a_send_found_the_connection_dead_waits_for_the_next_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transports: list[ScriptedTransport] = []

    @asynccontextmanager
    async def opener(
        client: Connection, headers: list[tuple[str, str]]
    ) -> AsyncIterator[Transport]:
        transports.append(ScriptedTransport())
        yield transports[-1]

    client = Client("ws://127.0.0.1:1/ws", "token", opener, backoff_base=0.1)
    async with run_client(client):
        assert await client.publish("t", 1) == 1
        transports[0].dead = True
        with pytest.raises(ConnectionLost):
            await client.publish("t", 2)
        # Not the dead connection again, at once: a publisher retrying after ConnectionLost
        # would spin on it without yielding, and the reader would never see the close.
        with pytest.raises(RequestTimeout):
            await client.publish("t", 3, timeout=1.0)
        transports[0].drop()
        assert await client.publish("t", 4) == 1
        assert [t.published for t in transports] == [[1], [4]]
