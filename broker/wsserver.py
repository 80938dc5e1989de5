"""The server side of one WebSocket connection: the upgrade on wsproto, then messages.

Theory of operation
-------------------
A connection is one task. It calls :meth:`ServerWebSocket.receive_request` for the upgrade
request, answers with :meth:`~ServerWebSocket.accept` or :meth:`~ServerWebSocket.reject`,
then calls :meth:`~ServerWebSocket.next_message` in a loop: that reads from the stream, feeds
the connection's :class:`~broker.frames.FrameReader`, answers pings and the client's close
frame, and returns each complete message. Everything written (the 101, pongs, close frames and
all the session sends) goes into the connection's :class:`~broker.sendqueue.SendQueue`, the one
writer of the socket, so nothing here ever waits for the client to read.

Why not trio-websocket on the server side: it gives every connection a reader task of its own,
a nursery, a memory channel for messages and three events, and keeps the finished HTTP
handshake. With tens of thousands of idle connections that was about half of a connection's
memory (docs/performance.md has the figures). Here an idle connection is one task waiting for
its socket, a frame reader and a few counters. wsproto (with h11) does the HTTP upgrade and is
dropped once it is answered; :mod:`broker.frames` does the frames. (The SDK's client side uses
trio-websocket as it is.)

Limits are enforced as bytes arrive: the frame reader refuses a frame whose header announces
more than ``max_message`` (with the message's earlier fragments) before its payload comes.
A read is parsed ``PARSE_SIZE`` bytes at a time, with a checkpoint between slices, so that a
read full of tiny frames does not hold the worker's other connections.
"""

from __future__ import annotations

import os

import structlog
import trio
import trio.lowlevel
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    RejectConnection,
    RejectData,
    Request,
)
from wsproto.utilities import RemoteProtocolError

from broker.errors import WebSocketViolation
from broker.frames import (
    ABNORMAL_CLOSURE,
    PONG,
    Close,
    FrameReader,
    Ping,
    close_frame,
    encode_frame,
)
from broker.sendqueue import SendQueue

__all__ = ["RECEIVE_SIZE", "ServerWebSocket"]

log = structlog.get_logger()

# Read in large pieces: a publisher's burst is taken (and its replies coalesced) in one pass.
RECEIVE_SIZE = 65536
# But parse a read in slices of this size, and let the worker's other connections run between
# two slices: 64 KiB of 1-byte fragments or of pings is about 9,000 frames, some 30 ms of
# parsing; a slice is an eighth of that.
PARSE_SIZE = 8192

# Connection states: plain ints, like broker.sendqueue's queue states.
UPGRADING = 0  # the upgrade request is being read or answered
OPEN = 1
CLOSE_SENT = 2  # our close frame is queued; waiting for the client's
CLOSED = 3  # the client's close frame was answered, or the upgrade was refused


class ServerWebSocket:
    """One client connection's WebSocket protocol state, over ``stream``, writing into
    ``queue``. ``last_receive`` and ``bytes_received`` say when and how much the client
    last sent (the idle timer and the metrics read them)."""

    # Slots: a worker holds tens of thousands of these.
    __slots__ = (
        "_handshake",
        "_reader",
        "_state",
        "_unparsed",
        "bytes_received",
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
        self.last_receive = trio.current_time()
        self.bytes_received = 0
        self._state = UPGRADING
        # The HTTP side (h11) lives only until the upgrade is answered; then only the frame
        # reader is kept.
        self._handshake: WSConnection | None = WSConnection(ConnectionType.SERVER)
        self._reader: FrameReader | None = None
        self._unparsed: memoryview | None = None  # the rest of a read, past PARSE_SIZE
        #: the client's close frame (code, reason), once it has sent one
        self.remote_close: tuple[int, str] | None = None
        #: set when the client broke the protocol: its further bytes are never parsed
        self.violated = False

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
        return data

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
        reader = self._reader
        assert reader is not None, "accept() first"
        if self.remote_close is not None:
            return None
        while True:
            event = self._parse(reader)
            if event is None:
                if not await self._feed(reader):
                    return None
            elif isinstance(event, str | bytes):
                return event
            elif isinstance(event, Ping):
                # Through the bounded path: a client that pings and never reads becomes a
                # slow consumer like any other.
                self.queue.send(encode_frame(PONG, event.payload))
            else:
                self._closed_by_client(event)
                return None

    async def _feed(self, reader: FrameReader) -> bool:
        """Give ``reader`` the next slice of the client's bytes: the rest of the last read
        (after a checkpoint, so that others run first), else a new read. False once the client
        has gone away."""
        rest = self._unparsed
        if rest is None:
            data = await self._receive()
            if not data:
                return False
            if len(data) <= PARSE_SIZE:
                reader.feed(data)
                # A suspended coroutine keeps its locals: an idle connection must not hold
                # on to the last bytes it read while it waits for the next.
                del data
                return True
            rest = memoryview(data)
            del data
        else:
            await trio.lowlevel.checkpoint()
        reader.feed(bytes(rest[:PARSE_SIZE]))
        self._unparsed = rest[PARSE_SIZE:] if len(rest) > PARSE_SIZE else None
        del rest
        return True

    def _parse(self, reader: FrameReader) -> str | bytes | Ping | Close | None:
        """The reader's next event; a violation is remembered (see :meth:`finish_close`)."""
        try:
            return reader.next()
        except WebSocketViolation:
            self.violated = True
            raise

    def _closed_by_client(self, event: Close) -> None:
        self.remote_close = (event.code, event.reason)
        if self._state == OPEN:  # answer with the same code (RFC 6455 5.5.1)
            self.queue.send_control(close_frame(event.code, event.reason))
        self._state = CLOSED

    # --- answering the upgrade ------------------------------------------------------------

    def accept(self, subprotocol: str | None) -> None:
        """Queue the 101 response; from now on the connection speaks frames."""
        handshake = self._handshake
        assert handshake is not None, "the upgrade was already answered"
        self.queue.send_control(handshake.send(AcceptConnection(subprotocol=subprotocol)))
        self._reader = FrameReader(self.max_message)
        self._state = OPEN
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
        self._state = CLOSED
        self.queue.send_control(data)
        await self.queue.wait_drained()

    # --- closing --------------------------------------------------------------------------

    def send_close(self, code: int, reason: str) -> bool:
        """Queue a close frame, even past the queue's limit. Returns False if none can be sent
        (not upgraded, or a close frame was already sent or answered)."""
        if self._state != OPEN:
            return False
        self._state = CLOSE_SENT
        self.queue.send_control(close_frame(code, reason))
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
        reader = self._reader
        while reader is not None and not self.violated and self._state == CLOSE_SENT:
            try:
                event = self._parse(reader)
            except WebSocketViolation:
                break
            if event is None:
                if not await self._feed(reader):
                    return
            elif isinstance(event, Close):
                self._closed_by_client(event)
                return
            # messages and pings after our close frame are dropped (RFC 6455 5.5.1)
        if self.violated or reader is None:
            while await self._receive():
                pass

    async def aclose(self) -> None:
        """Drop what is queued and release the socket, without waiting for anything."""
        self.queue.close()
        if self.socket is not None:
            # What SocketStream.aclose does, without its checkpoint or the cancel scope that
            # aclose_forcefully puts around it: those cost a short connection about 13 % of
            # its CPU, measured on the connect benchmark.
            self.socket.close()
            return
        await trio.aclose_forcefully(self.stream)

    @property
    def remote_code(self) -> int:
        """The code of the client's close frame, or 1006 if it sent none."""
        return self.remote_close[0] if self.remote_close else ABNORMAL_CLOSURE
