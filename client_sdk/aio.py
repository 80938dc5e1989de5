"""The asyncio client: the same :class:`~client_sdk._api.Client` as on trio, over
``websockets``.

    from client_sdk import aio

    async with aio.connect("ws://127.0.0.1:8765/ws", token=token) as client:
        async with client.subscribe("chat.room1") as sub:
            await client.publish("chat.room1", {"text": "hi"})
            async for event in sub:
                ...

Theory of operation: the client's connection logic (reconnects, recovery with ``since``, gaps,
token refresh, requests and their replies) is written once against anyio and runs unchanged on
asyncio; this driver only opens the WebSocket. It uses the ``websockets`` library (installed by
the ``aio`` extra: ``pip install -e '.[aio]'``): asyncio-native, maintained since 2013, with its own
protocol implementation, a bounded receive queue and a size limit per message, and the
handshake details the broker needs (subprotocol, ``Authorization`` header, HTTP rejection
bodies). Its own keepalive is turned off: the client's keepalive follows the broker's
``ping_interval`` on both drivers.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Unpack

import anyio
import attrs

from client_sdk._api import Client, run_client
from client_sdk._connection import (
    Connection,
    ConnectOptions,
    TokenSource,
    Transport,
    TransportClosed,
)
from client_sdk._protocol import SUBPROTOCOL
from client_sdk._subscription import Subscription

try:
    from websockets.asyncio.client import ClientConnection
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
    from websockets.typing import Subprotocol
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "client_sdk.aio needs the 'websockets' package, the project's 'aio' extra: "
        "pip install -e '.[aio]' in the repository (make run's: .venv/bin/pip install -e '.[aio]')"
    ) from exc

__all__ = ["Client", "Subscription", "connect"]


def _closed(exc: ConnectionClosed) -> TransportClosed:
    frame = exc.rcvd
    return TransportClosed(frame.code, frame.reason) if frame else TransportClosed(1006, None)


@attrs.frozen
class _WebsocketsTransport:
    """A ``websockets`` connection as a :class:`~client_sdk._connection.Transport`."""

    ws: ClientConnection

    async def send(self, text: str) -> None:
        try:
            await self.ws.send(text)
        except ConnectionClosed as exc:
            raise _closed(exc) from None

    async def receive(self) -> str | bytes:
        try:
            return await self.ws.recv()
        except ConnectionClosed as exc:
            raise _closed(exc) from None

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        await self.ws.close(code, reason or "")


@asynccontextmanager
async def _open_websockets(
    client: Connection, headers: list[tuple[str, str]]
) -> AsyncIterator[Transport]:
    """The asyncio :data:`~client_sdk._connection.Opener`: one ``websockets`` connection."""
    secure = client._endpoint[3]
    options = {"ssl": client._ssl_context or ssl.create_default_context()} if secure else {}
    try:
        with anyio.fail_after(client._connect_timeout):
            ws = await ws_connect(
                client._url,
                additional_headers=headers,
                subprotocols=[Subprotocol(SUBPROTOCOL)],
                max_size=client._max_message_size,
                max_queue=64,
                open_timeout=None,  # bounded above, welcome included in the client
                ping_interval=None,  # the client's keepalive follows the broker's interval
                close_timeout=2.0,
                compression=None,  # the broker does not negotiate permessage-deflate
                **options,  # type: ignore[arg-type]
            )
    except InvalidStatus as exc:
        raise client._rejected(exc.response.status_code, bytes(exc.response.body)) from None
    except TimeoutError:
        raise client._cannot_connect("timed out") from None
    except (InvalidHandshake, OSError) as exc:
        raise client._cannot_connect(exc) from exc
    try:
        yield _WebsocketsTransport(ws)
    finally:
        # Shielded: even when cancelled, say goodbye (briefly) before dropping TCP.
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            await ws.close()


@asynccontextmanager
async def connect(
    url: str, token: TokenSource = None, **options: Unpack[ConnectOptions]
) -> AsyncGenerator[Client, None]:
    """Connect to the broker at ``url`` from asyncio and yield a :class:`Client`.

    The same options, behaviour and exceptions as :func:`client_sdk.connect` (see there); a
    token callable may be a plain or an ``async`` function, callbacks run in this event loop.
    """
    async with run_client(Client(url, token, _open_websockets, **options)) as client:
        yield client
