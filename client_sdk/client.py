"""The trio client: :func:`connect` runs the :class:`~client_sdk._api.Client` over
trio-websocket.

    async with client_sdk.connect("ws://127.0.0.1:8765/ws", token=token) as client:
        async with client.subscribe("chat.room1") as sub:
            ...

This module is the trio driver: it opens one WebSocket per connection attempt
(:func:`_open_trio`) and hands it to the client as a :class:`~client_sdk._connection.Transport`.
Everything else (reconnects, recovery, requests, subscriptions) is shared with the asyncio
driver (``aio.py``) in ``_api.py``, ``_connection.py``, ``_subscription.py`` and
the sans-I/O core (``_protocol.py``, ``_recovery.py``, ``_schedule.py``).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Unpack

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    connect_websocket,
)

from client_sdk._api import Client, _raise_single, run_client
from client_sdk._connection import (
    Connection,
    ConnectOptions,
    TokenSource,
    Transport,
    TransportClosed,
)
from client_sdk._protocol import SUBPROTOCOL
from client_sdk._subscription import Subscription

__all__ = ["Client", "ConnectOptions", "Subscription", "TokenSource", "connect"]


class _WatchedNursery:
    """Stands in for the nursery given to ``trio_websocket.connect_websocket`` (which only
    calls ``start_soon`` for the connection's reader) to learn when that reader ends."""

    def __init__(self, nursery: trio.Nursery):
        self._nursery = nursery
        self.on_reader_exit: Callable[[], None] | None = None
        self.exited = False
        self.exited_event = trio.Event()
        self.error: BaseException | None = None

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        async def watched() -> None:
            try:
                await fn(*args)
            except Exception as exc:  # e.g. ConnectionRejected: reported by _open_trio
                self.error = exc
            finally:
                self.exited = True
                self.exited_event.set()
                if self.on_reader_exit is not None:
                    self.on_reader_exit()

        self._nursery.start_soon(watched)


def _closed(exc: ConnectionClosed) -> TransportClosed:
    reason = exc.reason
    return TransportClosed(reason.code, reason.reason) if reason else TransportClosed(1006, None)


@attrs.frozen
class _TrioTransport:
    """A trio-websocket connection as a :class:`Transport`."""

    ws: WebSocketConnection

    async def send(self, text: str) -> None:
        try:
            await self.ws.send_message(text)
        except ConnectionClosed as exc:
            raise _closed(exc) from None

    async def receive(self) -> str | bytes:
        try:
            message: str | bytes = await self.ws.get_message()
        except ConnectionClosed as exc:
            raise _closed(exc) from None
        return message

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        await self.ws.aclose(code, reason)


@asynccontextmanager
async def _open_trio(
    client: Connection, headers: list[tuple[str, str]]
) -> AsyncIterator[Transport]:
    """The trio :data:`Opener`: one trio-websocket connection."""
    host, port, resource, secure = client._endpoint
    use_ssl: bool | ssl.SSLContext = (client._ssl_context or True) if secure else False
    try:
        async with trio.open_nursery() as nursery:
            # trio-websocket waits for the handshake until its timeout even when the reader
            # already saw the connection die (reset or closed before the 101): watch the
            # reader, and give up as soon as it ends.
            watched = _WatchedNursery(nursery)
            ws: WebSocketConnection | None = None
            try:
                with trio.move_on_after(client._connect_timeout) as connecting:
                    watched.on_reader_exit = connecting.cancel
                    ws = await connect_websocket(
                        watched,  # type: ignore[arg-type]  # only start_soon is used
                        host,
                        port,
                        resource,
                        use_ssl=use_ssl,
                        subprotocols=[SUBPROTOCOL],
                        extra_headers=[(k.encode(), v.encode()) for k, v in headers],
                        max_message_size=client._max_message_size,
                        message_queue_size=64,
                    )
            except (HandshakeError, OSError, trio.BrokenResourceError) as exc:
                if isinstance(exc, ConnectionRejected):
                    raise client._rejected(exc.status_code, exc.body) from None
                raise client._cannot_connect(exc) from exc
            if ws is None:
                if isinstance(watched.error, ConnectionRejected):
                    error = watched.error
                    raise client._rejected(error.status_code, error.body) from None
                why = "connection closed during the handshake" if watched.exited else "timed out"
                raise client._cannot_connect(why)
            watched.on_reader_exit = None
            try:
                yield _TrioTransport(ws)
            finally:
                # Shielded: even when cancelled, say goodbye (briefly) before dropping TCP.
                # The reader must live until the broker answered the close (whoever
                # started it), so wait for it to end rather than cancel it.
                with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                    await ws.aclose()
                    await watched.exited_event.wait()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # only our own exceptions are in there
        _raise_single(group)


@asynccontextmanager
async def connect(
    url: str, token: TokenSource = None, **options: Unpack[ConnectOptions]
) -> AsyncGenerator[Client, None]:
    """Connect to the broker at ``url`` (``ws://HOST:PORT/ws``) and yield a :class:`Client`.

    Use as ``async with client_sdk.connect(url, token=...) as client:``. Returns once the first
    connection is authenticated. On exit the client closes: the connection with 1000, its
    subscriptions end, waiting calls raise ``ClientClosed``.

    Raises ``ValueError`` for a URL that is not ``ws://`` or ``wss://``;
    ``AuthenticationFailed`` at once without a token (unless ``anonymous=True``); and, for the
    first connection (unless ``retry_first_connect=True``): ``AuthenticationFailed`` (token
    refused), ``ConnectFailed`` (unreachable, rejected, timed out), ``TokenError`` (the token
    callable failed).
    """
    async with run_client(Client(url, token, _open_trio, **options)) as client:
        yield client
