"""The server side of one WebSocket connection, on wsproto: the upgrade, then messages.

Theory of operation
-------------------
A connection is one task. It calls :meth:`ServerWebSocket.receive_request` for the upgrade
request, answers with :meth:`~ServerWebSocket.accept` or :meth:`~ServerWebSocket.reject`,
then calls :meth:`~ServerWebSocket.next_message` in a loop: that reads from the stream, feeds
wsproto, answers pings and the client's close frame, and returns each complete message.
Everything written (the 101, pongs, close frames and all the session sends) goes into the
connection's :class:`~broker.sendqueue.SendQueue`, the one writer of the socket, so nothing
here ever waits for the client to read.

Why wsproto directly and not trio-websocket on the server side: trio-websocket gives every
connection a reader task of its own, a nursery, a memory channel for messages and three
events, and keeps the finished HTTP handshake. With tens of thousands of idle connections that
was about half of a connection's memory (docs/performance.md has the figures). Here an idle
connection is one task waiting in ``receive_some``, a wsproto ``Connection`` and a few
counters. (The SDK's client side uses trio-websocket as it is.)

Limits are enforced as bytes arrive: a frame header that announces more than
``max_message`` is refused before its payload comes (:class:`~broker.inbound.FrameLengthGuard`),
and a message assembled from fragments is refused once it passes the same limit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import structlog
import trio
import trio.lowlevel
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from broker.errors import WebSocketViolation
from broker.inbound import FrameLengthGuard
from broker.protocol import CloseCode
from broker.sendqueue import SendQueue

__all__ = ["ABNORMAL_CLOSURE", "RECEIVE_SIZE", "ServerWebSocket"]

log = structlog.get_logger()

# Read in large pieces: a publisher's burst is taken (and its replies coalesced) in one pass.
RECEIVE_SIZE = 65536
#: No close frame came: the peer went away, or the socket failed (RFC 6455 7.1.5). Never sent.
ABNORMAL_CLOSURE = 1006


class ServerWebSocket:
    """One client connection's WebSocket protocol state, over ``stream``, writing into
    ``queue``. ``last_receive`` and ``bytes_received`` say when and how much the client
    last sent (the idle timer and the metrics read them)."""

    # Slots: a worker holds tens of thousands of these.
    __slots__ = (
        "_conn",
        "_events",
        "_handshake",
        "_parts",
        "_size",
        "bytes_received",
        "guard",
        "last_receive",
        "max_message",
        "queue",
        "remote_close",
        "socket",
        "stream",
        "violated",
    )

    def __init__(self, stream: trio.abc.Stream, queue: SendQueue, *, max_message: int) -> None:
        self.stream = stream
        # A plain TCP stream is read from its socket directly (as the send queue writes it):
        # three coroutine frames fewer for every idle connection to hold.
        self.socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.queue = queue
        queue.attach(stream)
        self.max_message = max_message
        self.guard = FrameLengthGuard(max_message)
        self.last_receive = trio.current_time()
        self.bytes_received = 0
        # The HTTP side (h11) lives only until the upgrade is answered; then only the frame
        # side (``_conn``) is kept.
        self._handshake: WSConnection | None = WSConnection(ConnectionType.SERVER)
        self._conn: Connection | None = None
        self._events: Iterator[Event] | None = None  # events of the last read, not all taken
        self._parts: list[str] | list[bytes] | None = None  # a fragmented message so far
        self._size = 0
        #: the client's close frame (code, reason), once it has sent one
        self.remote_close: tuple[int, str] | None = None
        #: set when the client broke the protocol: its further bytes are never parsed
        self.violated = False

    @property
    def is_open(self) -> bool:
        """Whether messages may still be sent (accepted, and no close frame sent or answered)."""
        return self._conn is not None and self._conn.state is ConnectionState.OPEN

    # --- reading --------------------------------------------------------------------------

    async def _receive(self) -> bytes:
        """The next bytes from the client; ``b""`` once it has gone away.

        A plain socket is read directly, with ``SocketStream.receive_some``'s checkpoints
        (cancellable only before anything is read, a shielded yield after an immediate read)
        but not its three layers of coroutines, which every idle connection would hold."""
        sock = self.socket
        data: bytes | bytearray
        if sock is None:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""
            if not isinstance(data, bytes):  # the Stream interface allows a bytearray
                data = bytes(data)
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            while True:
                fd = sock.fileno()  # -1 once closed: never read a number that was reused
                if fd < 0:
                    return b""
                try:
                    data = os.read(fd, RECEIVE_SIZE)
                    break
                except BlockingIOError:
                    pass
                except OSError:  # reset by the peer, and the like: gone
                    return b""
                # Wait outside the except clause: a coroutine suspended inside one keeps the
                # exception (and its traceback) alive for as long as the connection idles.
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:
                    return b""
                waited = True
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        self.last_receive = trio.current_time()
        self.bytes_received += len(data)
        self.guard.feed(data)
        return data

    def _check_guard(self) -> None:
        if self.guard.violation is not None:
            self.violated = True
            raise WebSocketViolation(CloseCode.MESSAGE_TOO_BIG, "frame too large")

    async def receive_request(self) -> Request | None:
        """Read the upgrade request. Returns None if the client went away first, or sent
        something that is not a valid WebSocket upgrade (then wsproto's error response, a 400
        or 426, is already queued and sent)."""
        handshake = self._handshake
        assert handshake is not None, "the upgrade was already read"
        while True:
            data = await self._receive()
            if not data:
                return None
            try:
                handshake.receive_data(data)
            except RemoteProtocolError as exc:
                hint = exc.event_hint
                if isinstance(hint, RejectConnection):
                    # e.g. a proxy that dropped the Upgrade header: say which header is wrong
                    log.info("rejected", status=hint.status_code, reason=str(exc))
                    self.queue.send(handshake.send(hint))
                    await self.queue.wait_drained()
                return None
            for event in handshake.events():
                if isinstance(event, Request):
                    return event

    async def next_message(self) -> str | bytes | None:
        """The client's next complete message. Answers pings on the way. Returns None once
        the client has closed (its close frame is in :attr:`remote_close`, and the answer is
        queued) or gone away.

        Raises :class:`~broker.errors.WebSocketViolation` (with the close code to send) when
        the client breaks the WebSocket protocol or sends more than ``max_message``."""
        conn = self._conn
        assert conn is not None, "accept() first"
        while True:
            if self._events is not None:
                message = self._take_message(conn)
                if message is not None:
                    return message
                if self.remote_close is not None:
                    return None
            data = await self._receive()
            self._check_guard()
            if not data:
                return None
            conn.receive_data(data)
            self._events = conn.events()
            # A suspended coroutine keeps its locals: an idle connection must not hold on to
            # the last bytes it read while it waits for the next.
            del data

    def _take_message(self, conn: Connection) -> str | bytes | None:
        """Walk the events of the last read up to the next complete message, answering
        pings and the client's close frame on the way; None when they are used up (or the
        client closed). Raises like :meth:`next_message`."""
        assert self._events is not None
        # Returning from inside the loop keeps the rest of this read's events for next time.
        for event in self._events:
            if isinstance(event, TextMessage | BytesMessage):
                message = self._assemble(event.data, event.message_finished)
                if message is not None:
                    return message
            elif isinstance(event, Ping):
                # Through the bounded path: a client that pings and never reads becomes a
                # slow consumer like any other.
                self.queue.send(conn.send(event.response()))
            elif isinstance(event, CloseConnection):
                self._events = None
                if conn.state is not ConnectionState.REMOTE_CLOSING:
                    # wsproto reports a frame it cannot parse as a close event while the
                    # connection is still open: the code (1002, 1007) is ours to send.
                    self.violated = True
                    raise WebSocketViolation(event.code, event.reason or "protocol error")
                self.remote_close = (event.code, event.reason or "")
                self.queue.send_control(conn.send(event.response()))
                return None
        self._events = None
        return None

    def _assemble(self, data: str | bytes | bytearray, finished: bool) -> str | bytes | None:
        """Add one piece of a message; return the message once it is complete."""
        if isinstance(data, bytearray):  # wsproto's binary payloads may come as bytearray
            data = bytes(data)
        parts = self._parts
        if parts is None and finished:  # the common case: a whole message in one frame
            if len(data) > self.max_message:
                self._too_big()
            return data
        size = self._size + len(data)
        if size > self.max_message:
            self._too_big()
        if parts is None:
            parts = self._parts = [data]  # type: ignore[assignment]
        else:
            parts.append(data)  # type: ignore[arg-type]
        self._size = size
        if not finished:
            return None
        self._parts = None
        self._size = 0
        if isinstance(data, str):
            return "".join(parts)  # type: ignore[arg-type]
        return b"".join(parts)  # type: ignore[arg-type]

    def _too_big(self) -> None:
        self.violated = True
        self._parts = None
        self._size = 0
        raise WebSocketViolation(CloseCode.MESSAGE_TOO_BIG, "message too large")

    # --- answering the upgrade ------------------------------------------------------------

    def accept(self, subprotocol: str | None) -> None:
        """Queue the 101 response; from now on the connection speaks frames."""
        handshake = self._handshake
        assert handshake is not None, "the upgrade was already answered"
        self.queue.send_control(handshake.send(AcceptConnection(subprotocol=subprotocol)))
        self._conn = handshake.connection
        # h11's state, the request's headers (the token among them): nothing needs them now.
        self._handshake = None

    async def reject(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Send an HTTP error response with ``body`` and wait until it is written."""
        handshake = self._handshake
        assert handshake is not None, "the upgrade was already answered"
        headers = [*headers, (b"Content-Length", str(len(body)).encode())]
        data = handshake.send(RejectConnection(status_code=status, headers=headers, has_body=True))
        data += handshake.send(RejectData(data=body))
        self._handshake = None
        self.queue.send_control(data)
        await self.queue.wait_drained()

    # --- closing --------------------------------------------------------------------------

    def send_close(self, code: int, reason: str) -> bool:
        """Queue a close frame, even past the queue's limit. Returns False if none can be sent
        (not upgraded, or a close frame was already sent or answered)."""
        if not self.is_open:
            return False
        assert self._conn is not None
        self.queue.send_control(self._conn.send(CloseConnection(code=code, reason=reason)))
        return True

    async def finish_close(self) -> None:
        """After :meth:`send_close`: wait until the close frame is written and the client
        has answered it (or gone away), dropping whatever it sends meanwhile. Bound it with a
        timeout.

        After a violation the client's bytes are only read and discarded: its stream cannot
        be parsed any more, and it is most likely still sending an oversized message. Closing
        a socket with unread data makes the kernel send a reset, which can overtake the close
        frame; a lingering read avoids that."""
        await self.queue.wait_drained()
        conn = self._conn
        self._events = None
        self._parts = None
        if self.violated or conn is None:
            while await self._receive():
                pass
            return
        while conn.state is ConnectionState.LOCAL_CLOSING:
            for event in conn.events():
                if isinstance(event, CloseConnection):
                    return
            data = await self._receive()
            if not data:
                return
            conn.receive_data(data)

    async def aclose(self) -> None:
        """Drop what is queued and release the socket, without waiting for anything."""
        self.queue.close()
        await trio.aclose_forcefully(self.stream)

    @property
    def remote_code(self) -> int:
        """The code of the client's close frame, or 1006 if it sent none."""
        return self.remote_close[0] if self.remote_close else ABNORMAL_CLOSURE
