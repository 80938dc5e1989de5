"""The server side of one WebSocket connection: the upgrade request, then messages.

Theory of operation
-------------------
A connection is one task. It calls :meth:`ServerWebSocket.receive_request` for the upgrade
request, answers with :meth:`~ServerWebSocket.accept` or :meth:`~ServerWebSocket.reject`,
then calls :meth:`~ServerWebSocket.next_message` in a loop: that reads from the stream, feeds
the connection's :class:`~broker.frames.FrameReader`, answers pings and the client's close
frame, and returns each complete message (:meth:`~ServerWebSocket.buffered_message` returns
one the last read holds without a coroutine, which a burst of publications makes common). Everything written (the 101, pongs, close frames and
all the session sends) goes into the connection's :class:`~broker.sendqueue.SendQueue`, the one
writer of the socket, so nothing here ever waits for the client to read.

Why not trio-websocket on the server side: it gives every connection a reader task of its own,
a nursery, a memory channel for messages and three events, and keeps the finished HTTP
handshake. With tens of thousands of idle connections that was about half of a connection's
memory (docs/performance.md has the figures). Here an idle connection is one task waiting for
its socket, a frame reader and a few counters. :mod:`broker.upgrade` reads a plainly valid
upgrade request and writes the answers; any other request goes to wsproto (with h11), which
judges and answers it as it always did, and is dropped once it has; :mod:`broker.frames` does
the frames. (The SDK's client side uses trio-websocket as it is.)

Limits are enforced as bytes arrive, and every one of them holds however the client splits its
bytes into reads:

- the request head may be at most :data:`MAX_REQUEST_HEAD` bytes, counted here up to its blank
  line (so that one large read cannot pass it either); over it, 431. A header wsproto must
  decode as ASCII and cannot (a non-ASCII ``Host``, say) is a 400, not a traceback;
- bytes that arrive behind the request head (frames a client pipelined after its upgrade
  request) are not part of the request: they go to the frame reader, and are served once the
  upgrade is accepted;
- the frame reader refuses a frame whose header announces more than ``max_message`` (with the
  message's earlier fragments) before its payload comes, and bounds fragments (see
  :mod:`broker.frames`);
- a message must arrive whole within ``message_timeout`` of its first byte, or the connection
  is closed with 1008. Control frames do not extend that deadline, though they keep the idle
  timer (the session's) from firing. The deadline is a cancel scope around the reader's own
  wait for bytes, and only while part of a message is held: no task, and nothing at all for a
  connection between messages;
- a read is parsed :data:`PARSE_SIZE` bytes at a time, with a checkpoint between slices, so that
  a read full of tiny frames does not hold the worker's other connections.

Closing after a violation (RFC 6455 7.1.1 wants the server to close TCP first): once the close
frame is written, the write side is shut (the client reads the close frame, then end of file)
and the client's input is drained for at most :data:`VIOLATION_DRAIN` seconds, or until its own
end of file, so that the kernel does not answer unread bytes with a reset that could overtake
the close frame; then the socket is closed. :meth:`ServerWebSocket.finish_close` does it, and so
does every refusal of an upgrade request by this layer (the worker's own refusals, answers to
a complete and valid request, close at once).

Every refusal of this layer is counted by kind in the worker's shared
:class:`FrameLimits` (``pubsub_ws_violations_total``).
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections import Counter
from contextlib import suppress

import attrs
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

from broker.config import Config
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
from broker.handshake import Reject
from broker.protocol import CloseCode
from broker.sendqueue import SendQueue
from broker.upgrade import UpgradeRequest, accept_response, parse_request, reject_response

__all__ = [
    "MAX_REQUEST_HEAD",
    "RECEIVE_SIZE",
    "VIOLATION_DRAIN",
    "FrameLimits",
    "ServerWebSocket",
]

log = structlog.get_logger()

# Read in large pieces: a publisher's burst is taken (and its replies coalesced) in one pass.
RECEIVE_SIZE = 65536
#: The longest request head (request line, headers, blank line) accepted: h11's own default.
MAX_REQUEST_HEAD = 16384
#: After a violation, how long the client's input is read and dropped once the close frame is
#: out and the write side shut (RFC 6455 7.1.1: the server closes first, and soon).
VIOLATION_DRAIN = 0.5
# Where a request head ends, as h11 finds it: a blank line, with or without its CR.
_BLANK_LINE = re.compile(rb"\n\r?\n")
# But parse a read in slices of this size, and let the worker's other connections run between
# two slices: 64 KiB of 1-byte fragments or of pings is about 9,000 frames, some 30 ms of
# parsing; a slice is a quarter of that. Smaller slices cost the send path: a publisher's burst
# split across slices lets the flusher write between them (8 KiB slices with 64-message turns
# took the many-topics bench from 35 deliveries per write to 10, and 1.34x the CPU).
PARSE_SIZE = 16384

# Connection states: plain ints, like broker.sendqueue's queue states.
UPGRADING = 0  # the upgrade request is being read or answered
OPEN = 1
CLOSE_SENT = 2  # our close frame is queued; waiting for the client's
CLOSED = 3  # the client's close frame was answered, or the upgrade was refused


@attrs.frozen
class FrameLimits:
    """What a worker's connections are read with, shared by all of them: the message size
    and time limits, and the count of refusals by kind (the worker's metric)."""

    max_message: int = 65536
    message_timeout: float = 10.0
    refused: Counter[str] = attrs.field(factory=Counter, eq=False, repr=False)

    @classmethod
    def from_config(cls, config: Config, refused: Counter[str] | None = None) -> FrameLimits:
        """The limits of ``config``; ``refused`` carries the counts over a reload."""
        return cls(
            config.limits.max_message_size,
            config.timeouts.message_timeout,
            Counter() if refused is None else refused,
        )


class ServerWebSocket:
    """One client connection's WebSocket protocol state, over ``stream`` (a trio stream, or
    the connected socket itself, non-blocking, as the worker accepts plain TCP), writing into
    ``queue``, within ``limits``. ``last_receive`` and ``bytes_received`` say when and how much
    the client last sent (the idle timer and the metrics read them)."""

    # Slots: a worker holds tens of thousands of these.
    __slots__ = (
        "_handshake",
        "_key",
        "_reader",
        "_state",
        "_unparsed",
        "_wait_first",
        "bytes_received",
        "last_receive",
        "limits",
        "queue",
        "remote_close",
        "socket",
        "stream",
        "violated",
    )

    def __init__(
        self,
        stream: trio.abc.Stream | socket.socket,
        queue: SendQueue,
        limits: FrameLimits | None = None,
    ) -> None:
        # A plain TCP connection is read from its socket directly (as the send queue writes
        # it): three coroutine frames fewer for every idle connection to hold. The worker
        # hands over the socket itself, without trio's socket and SocketStream around it:
        # those cost two system calls a connect (TCP_NODELAY and TCP_NOTSENT_LOWAT, which an
        # accepted socket inherits from its listener, where the worker sets them once).
        self.socket: socket.socket | trio.socket.SocketType | None
        self.stream: trio.abc.Stream | None
        if isinstance(stream, socket.socket):
            self.socket, self.stream = stream, None
        elif isinstance(stream, trio.SocketStream):
            self.socket, self.stream = stream.socket, stream
        else:
            self.socket, self.stream = None, stream
        self.queue = queue
        queue.attach(stream)
        self.limits = FrameLimits() if limits is None else limits
        self.last_receive = trio.current_time()
        self.bytes_received = 0
        self._state = UPGRADING
        # Until the upgrade is answered: the request's key when broker.upgrade read it, or
        # h11 and wsproto when they had to (see receive_request); then only the frame reader
        # is kept.
        self._key: bytes | None = None
        self._handshake: WSConnection | None = None
        # Made by accept(), or earlier when frames came right behind the upgrade request.
        self._reader: FrameReader | None = None
        self._unparsed: memoryview | None = None  # the rest of a read, past PARSE_SIZE
        # Set by accept(): the next read waits for the socket first (see _receive).
        self._wait_first = False
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
            assert self.stream is not None
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""
            if not isinstance(data, bytes):  # the Stream interface allows a bytearray
                data = bytes(data)
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            if self._wait_first:
                # The first read after the 101 was queued: the client has not seen it yet, so
                # what it sends next is nearly never there, and a read that finds nothing
                # costs a system call and an exception. (A client that sent more right behind
                # its request is woken for at once.)
                self._wait_first = False
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:
                    return b""
                waited = True
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

    async def receive_request(self) -> UpgradeRequest | None:
        """Read the upgrade request. Returns None if the client went away first, or sent
        something that is not a valid WebSocket upgrade (then the error response, a 400, 426
        or 431, is already sent).

        A plainly valid request is read by :func:`broker.upgrade.parse_request`; any other
        goes to h11 and wsproto, with the bytes they were always given, and is answered by
        them (h11 judges a head only once its blank line is in, except one whose first byte
        cannot start a request line: that is handed over at once, as before)."""
        assert self._state == UPGRADING and self._key is None, "the upgrade was already read"
        # A bytearray: a head that trickles in byte by byte is not copied whole per byte.
        buf = bytearray()
        while True:
            data = await self._receive()
            if not data:
                return None
            # A blank line may straddle two reads: search from the last two bytes on.
            start = max(0, len(buf) - 2)
            buf += data
            del data
            match = _BLANK_LINE.search(buf, start)
            end = len(buf) if match is None else match.end()
            if end > MAX_REQUEST_HEAD:
                await self._refuse_request(
                    Reject(
                        431,
                        "bad_request",
                        f"the request head is over {MAX_REQUEST_HEAD} bytes",
                        "request_head",
                    )
                )
                return None
            if match is None:
                if buf[0] < 0x21:  # h11's "obviously invalid request line"
                    return await self._general_request(bytes(buf))
                continue
            if end < len(buf):
                # Frames the client sent right behind its request: kept for the frame reader.
                self._reader = FrameReader(self.limits.max_message)
                self._reader.feed(bytes(buf[end:]))
            head = bytes(buf[:end])
            del buf  # (the request's bytes hold the token)
            request = parse_request(head)
            if request is None:
                return await self._general_request(head)
            self._key = request.key
            return request

    async def _general_request(self, head: bytes) -> UpgradeRequest | None:
        """Let h11 and wsproto judge ``head``, which :func:`~broker.upgrade.parse_request`
        did not take: the request they read, or None once they have refused it (answered)
        or found none."""
        handshake = self._handshake = WSConnection(ConnectionType.SERVER)
        try:
            handshake.receive_data(head)
        except RemoteProtocolError as exc:
            hint = exc.event_hint
            if isinstance(hint, RejectConnection):
                # e.g. a proxy that dropped the Upgrade header: say which header is wrong
                log.info("rejected", status=hint.status_code, reason=str(exc))
                self.queue.send(handshake.send(hint))
                await self._close_write_and_drain()
            return None
        except UnicodeError:
            # wsproto decodes Host as IDNA and Connection, Upgrade and the
            # Sec-WebSocket-* lists as ASCII, and lets the error escape.
            await self._refuse_request(
                Reject(
                    400,
                    "bad_request",
                    "Host, Connection and Sec-WebSocket-* headers must be ASCII",
                    "header_encoding",
                )
            )
            return None
        for event in handshake.events():
            if isinstance(event, Request):
                return UpgradeRequest(event.target, event.extra_headers, tuple(event.subprotocols))
        # A whole head and no request: nothing more will come. (A head cut short is only
        # handed over when h11 refuses its first byte, which it always does.)
        return None

    async def _refuse_request(self, refusal: Reject) -> None:
        """Answer the upgrade request with ``refusal``, then close as after a violation."""
        log.info("rejected", status=refusal.status, reason=refusal.reason)
        self.limits.refused[refusal.reason] += 1
        await self.reject(refusal.status, [(b"Content-Type", b"application/json")], refusal.body())
        await self._close_write_and_drain()

    def buffered_message(self) -> str | bytes | None:
        """The client's next complete message if the bytes already read hold one, without
        waiting; None when they do not, or once the client has closed. Answers pings on the
        way. Raises :class:`~broker.errors.WebSocketViolation` as :meth:`next_message`."""
        reader = self._reader
        assert reader is not None and self._state != UPGRADING, "accept() first"
        while self.remote_close is None:
            try:
                event = reader.next()  # what _parse does, a call fewer per message
            except WebSocketViolation as exc:
                raise self._violation(exc) from None
            if event is None:
                return None
            # Not isinstance(event, str | bytes): a union costs five times one type.
            if isinstance(event, str) or isinstance(event, bytes):  # noqa: SIM101
                return event
            if isinstance(event, Ping):
                # Through the bounded path: a client that pings and never reads becomes a
                # slow consumer like any other. Its deadline stays where it was.
                self.queue.send(encode_frame(PONG, event.payload))
            else:
                self._closed_by_client(event)
        return None

    async def next_message(self) -> str | bytes | None:
        """The client's next complete message. Answers pings on the way. Returns None once
        the client has closed (its close frame is in :attr:`remote_close`, and the answer is
        queued) or gone away.

        Raises :class:`~broker.errors.WebSocketViolation` (with the close code to send) when
        the client breaks the WebSocket protocol, sends more than ``max_message``, or takes
        longer than ``message_timeout`` over a message."""
        reader = self._reader
        assert reader is not None and self._state != UPGRADING, "accept() first"
        # Since when a message (or frame) has been found incomplete: its clock. It starts in
        # this call at the earliest, so that the time the session spent serving the previous
        # message, not reading, is never charged to the client.
        since = math.inf
        while True:
            message = self.buffered_message()
            if message is not None:
                return message
            if self.remote_close is not None:
                return None
            if not reader.in_message:
                since = math.inf
            elif since == math.inf:
                since = trio.current_time()
            if not await self._feed(reader, since + self.limits.message_timeout):
                return None

    async def _receive_by(self, deadline: float) -> bytes:
        """:meth:`_receive`, for the rest of a message that must be complete by ``deadline``.
        Raises :class:`~broker.errors.WebSocketViolation` (1008) once it has passed."""
        with trio.move_on_at(deadline):
            return await self._receive()
        raise self._violation(
            WebSocketViolation(
                CloseCode.POLICY_VIOLATION,
                f"message not completed within {self.limits.message_timeout:g} s",
                kind="message_timeout",
            )
        )

    async def _feed(self, reader: FrameReader, deadline: float) -> bool:
        """Give ``reader`` the next slice of the client's bytes: the rest of the last read
        (after a checkpoint, so that others run first), else a new read, which must come by
        ``deadline`` (``math.inf``: no deadline). False once the client has gone away.

        Raises :class:`~broker.errors.WebSocketViolation` (1008) when the deadline passes."""
        rest = self._unparsed
        if rest is None:
            if deadline == math.inf:
                data = await self._receive()
            else:
                data = await self._receive_by(deadline)
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
        except WebSocketViolation as exc:
            raise self._violation(exc) from None

    def _violation(self, exc: WebSocketViolation) -> WebSocketViolation:
        """Remember and count ``exc``; return it to be raised."""
        self.violated = True
        self.limits.refused[exc.kind] += 1
        return exc

    def _closed_by_client(self, event: Close) -> None:
        self.remote_close = (event.code, event.reason)
        if self._state == OPEN:  # answer with the same code (RFC 6455 5.5.1)
            self.queue.send_control(close_frame(event.code, event.reason))
        self._state = CLOSED

    # --- answering the upgrade ------------------------------------------------------------

    def accept(self, subprotocol: str | None) -> None:
        """Queue the 101 response; from now on the connection speaks frames."""
        assert self._state == UPGRADING, "the upgrade was already answered"
        if self._key is not None:
            self.queue.send_control(accept_response(self._key, subprotocol))
        else:
            handshake = self._handshake
            assert handshake is not None, "no upgrade request was read"
            self.queue.send_control(handshake.send(AcceptConnection(subprotocol=subprotocol)))
        if self._reader is None:
            self._reader = FrameReader(self.limits.max_message)
        self._wait_first = True
        self._state = OPEN
        # h11's state, the request's headers (the token among them): nothing needs them now.
        self._handshake = self._key = None

    async def reject(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Send an HTTP error response with ``body`` and wait until it is written."""
        assert self._state == UPGRADING, "the upgrade was already answered"
        headers = [*headers, (b"Content-Length", str(len(body)).encode())]
        handshake = self._handshake
        if handshake is None:  # as h11 writes it for a request of the fast path (or none)
            data = reject_response(status, headers, body)
        else:
            data = handshake.send(
                RejectConnection(status_code=status, headers=headers, has_body=True)
            )
            data += handshake.send(RejectData(data=body))
        self._handshake = self._key = None
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

        After a violation the write side is shut once the close frame is out, and the
        client's bytes are only read and discarded, briefly (:meth:`_close_write_and_drain`):
        its stream cannot be parsed any more, and it is most likely still sending an
        oversized message."""
        await self.queue.wait_drained()
        reader = self._reader
        while reader is not None and not self.violated and self._state == CLOSE_SENT:
            try:
                event = self._parse(reader)
            except WebSocketViolation:
                break
            if event is None:
                if not await self._feed(reader, math.inf):
                    return
            elif isinstance(event, Close):
                self._closed_by_client(event)
                return
            # messages and pings after our close frame are dropped (RFC 6455 5.5.1)
        if self.violated or reader is None:
            await self._close_write_and_drain()

    async def _close_write_and_drain(self) -> None:
        """Everything queued is written: shut the write side (the client reads end of file
        after our last frame or response), then read and drop what the client sends until its
        own end of file, for at most :data:`VIOLATION_DRAIN` seconds. Closing a socket with
        unread data makes the kernel send a reset, which can overtake what was written; a
        short lingering read avoids most of that without holding the socket for long."""
        await self.queue.wait_drained()
        if self.socket is not None:
            with suppress(OSError):
                self.socket.shutdown(socket.SHUT_WR)
        elif isinstance(self.stream, trio.abc.HalfCloseableStream):
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.send_eof()
        with trio.move_on_after(VIOLATION_DRAIN):
            while await self._receive():
                pass

    async def aclose(self) -> None:
        """Drop what is queued and release the socket, without waiting for anything."""
        self.queue.close()
        sock = self.socket
        if sock is not None:
            # What SocketStream.aclose does, without its checkpoint or the cancel scope that
            # aclose_forcefully puts around it: those cost a short connection about 13 % of
            # its CPU, measured on the connect benchmark.
            # The accepted socket is closed without trio's notify_closing (an epoll_ctl and
            # its bookkeeping, about 4 % of a reconnect's samples): only two tasks ever wait
            # on it, this connection's reader, which is the caller, and its drainer, which
            # queue.close() just cancelled (trio delivers that at once to a task blocked in a
            # wait, and the wait drops its registration), and the kernel takes a closed
            # descriptor out of the epoll set itself.
            sock.close()
            return
        assert self.stream is not None
        await trio.aclose_forcefully(self.stream)

    @property
    def remote_code(self) -> int:
        """The code of the client's close frame, or 1006 if it sent none."""
        return self.remote_close[0] if self.remote_close else ABNORMAL_CLOSURE
