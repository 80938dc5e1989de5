"""WebSocket frames (RFC 6455 section 5), without I/O: the client's frames in, the server's out.

Theory of operation
-------------------
:class:`FrameReader` takes the bytes a client sends after the upgrade (:meth:`~FrameReader.feed`)
and hands out what they hold (:meth:`~FrameReader.next`): each complete message as ``str``
(text) or ``bytes`` (binary), reassembled from its fragments, and the control frames a server
must act on, :class:`Ping` and :class:`Close`. Pongs are consumed silently. A client that breaks
the protocol gets :class:`~broker.errors.WebSocketViolation` with the close code to send: 1002
for a malformed frame, 1007 for text that is not UTF-8, 1009 for a message over the limit or in
too many frames.

The limit is judged on the frame header, before the payload arrives: a header that announces
2**62 bytes is refused at once instead of holding the connection open while "receiving" it.

What a message being assembled may hold is bounded whatever its fragmentation: its fragments are
unmasked into one ``bytearray`` (a list of small pieces cost about 40 bytes per 1-byte
fragment), a message may come in at most :data:`MAX_FRAGMENTS` frames, and the headers of those
frames count against the size limit, which allows :data:`HEADER_ALLOWANCE` bytes for them on
top of ``max_message``. Empty continuation frames therefore grow nothing, and cost at most
:data:`MAX_FRAGMENTS` header parses per message. How long a message may take is the business
of the I/O layer (:mod:`broker.wsserver`), which asks :attr:`FrameReader.in_message`.

Why our own reader and not wsproto's: a publisher's frames are the broker's hot input, and
wsproto's general machinery (an event generator per read, named tuples per frame, an
incremental UTF-8 decoder per message, its extension hooks) was a third of a publishing
worker's time. The broker negotiates no extension, so the server side of the frame layer is
small enough to own (the HTTP upgrade is :mod:`broker.upgrade`'s, with h11 and wsproto for
unusual requests). The encoding side,
:func:`encode_frame` and :func:`close_frame`, builds unmasked server frames.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

import attrs

from broker.errors import WebSocketViolation

__all__ = [
    "ABNORMAL_CLOSURE",
    "BINARY",
    "CLOSE",
    "CONTINUATION",
    "HEADER_ALLOWANCE",
    "INVALID_DATA",
    "MAX_FRAGMENTS",
    "MESSAGE_TOO_BIG",
    "NO_STATUS",
    "PING",
    "PONG",
    "PROTOCOL_ERROR",
    "TEXT",
    "Close",
    "FrameReader",
    "Ping",
    "close_frame",
    "encode_frame",
]

# Final: compiled, a constant is an integer in the code, not a look-up in the module's dict.
CONTINUATION: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA

# Close codes of the protocol itself (RFC 6455 7.4.1); the broker's own are in
# broker.protocol.CloseCode, which takes the three it sends from here.
PROTOCOL_ERROR: Final = 1002
INVALID_DATA: Final = 1007
MESSAGE_TOO_BIG: Final = 1009
#: A close frame without a code; reported as this, never sent.
NO_STATUS: Final = 1005
#: No close frame came: the peer went away, or the socket failed. Never sent.
ABNORMAL_CLOSURE: Final = 1006

# Codes a peer may send (RFC 6455 7.4 and the IANA registry): 1004-1006 and 1015 are reserved,
# 1016-2999 unassigned; 3000-4999 belong to libraries and applications.
_SENDABLE_BELOW_3000 = frozenset((1000, 1001, 1002, 1003, *range(1007, 1015)))
MAX_CONTROL_PAYLOAD: Final = 125

#: Data frames one message may come in (websockets allows 4096; browsers send one frame per
#: message, and a client that streams a 64 KiB message in 1 KiB pieces needs 64). One more
#: is refused with 1009.
MAX_FRAGMENTS: Final = 1024
#: Header bytes a message's frames may take beyond ``max_message``: with them counted, the
#: wire size of a message is at most ``max_message`` + 4096 (room for 512 fragments with
#: 16-bit lengths at the size limit).
HEADER_ALLOWANCE: Final = 4096


@attrs.frozen
class Ping:
    """A ping; answer it with a pong carrying ``payload``."""

    payload: bytes


@attrs.frozen
class Close:
    """The client's close frame: ``code`` (1005 when it gave none) and ``reason``."""

    code: int
    reason: str


def _xor_unmask(data: bytearray, mask: bytearray) -> bytes:
    """``data`` XOR the repeated 4-byte ``mask``: as big integers, one C loop each way."""
    n = len(data)
    if not n:
        return b""
    key = (mask * ((n + 3) >> 2))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


#: How a payload is unmasked: websockets' C routine where it is built (one pass over the
#: bytes, no intermediate objects: a quarter of the big-integer way's time for a publication
#: of 64 bytes, which makes four objects on the way), else :func:`_xor_unmask`. The two give
#: the same bytes (``tests/unit/test_frames.py`` checks both).
_unmask: Callable[[bytearray, bytearray], bytes]
try:
    from websockets.speedups import apply_mask as _unmask
except ImportError:  # websockets installed without its C extension
    _unmask = _xor_unmask


class FrameReader:
    """The client-to-server frame stream of one connection. After a
    :class:`~broker.errors.WebSocketViolation` it must not be used again."""

    # Slots: one per connection, and a worker holds tens of thousands.
    __slots__ = ("_buf", "_frames", "_headers", "_message", "_opcode", "_pos", "max_message")

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._pos = 0  # where the next frame starts in _buf
        self._opcode = 0  # TEXT or BINARY while a fragmented message is open, else 0
        self._message: bytearray | None = None  # its payload so far, unmasked
        self._frames = 0  # the frames it came in so far
        self._headers = 0  # and the bytes of their headers

    @property
    def in_message(self) -> bool:
        """Whether part of a message or frame is held: a fragmented message is open, or
        received bytes wait for the rest of their frame."""
        return bool(self._opcode) or self._pos < len(self._buf)

    def feed(self, data: bytes) -> None:
        """Add received bytes."""
        buf = self._buf
        if self._pos:
            del buf[: self._pos]
            self._pos = 0
        buf += data

    def next(self) -> str | bytes | Ping | Close | None:
        """The next message or control event, or None until more bytes are fed.

        Raises :class:`~broker.errors.WebSocketViolation` as soon as a frame header breaks the
        protocol or announces more than ``max_message`` (counting the message's earlier
        fragments), and when a complete text message is not UTF-8."""
        buf = self._buf
        pos = self._pos
        n = len(buf)
        while n - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            if length < 126:
                start = pos + 6
            elif length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 8
            else:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 14
            opcode = b0 & 0x0F
            head = start - pos
            if b0 != 0x81 or not b1 & 0x80 or self._opcode or length > self.max_message:
                # Anything but the usual frame (a whole, masked text message within the
                # limit, none open), which passes every check, is judged in full.
                self._check_header(b0, b1, opcode, length, head)
            end = start + length
            if end > n:
                break
            payload = _unmask(buf[start:end], buf[start - 4 : start])
            pos = end
            self._pos = pos
            if opcode >= CLOSE:
                if opcode == PING:
                    return Ping(payload)
                if opcode == CLOSE:
                    return _parse_close(payload)
                continue  # a pong: nothing to do
            if opcode:  # the first frame of a message
                if b0 & 0x80:  # FIN: the whole message in one frame, the usual case
                    return _decode(opcode, payload)
                self._opcode = opcode
                self._message = bytearray(payload)
                self._frames = 1
                self._headers = head
                continue
            message = self._message
            assert message is not None
            message += payload
            if b0 & 0x80:  # FIN
                opcode = self._opcode
                self._message = None
                self._opcode = self._frames = self._headers = 0
                return _decode(opcode, message)
            self._frames += 1
            self._headers += head
        if pos == n and n:
            # Everything is consumed: let go of the buffer (it may have grown to a large
            # message) rather than keep it for as long as the connection idles.
            self._buf = bytearray()
            self._pos = 0
        return None

    def _check_header(self, b0: int, b1: int, opcode: int, length: int, head: int) -> None:
        """Refuse a frame from its header (``head`` bytes, announcing ``length``): judged again
        on every call until the frame is complete, so it only reads the reader's state."""
        if b0 & 0x70:
            raise WebSocketViolation(
                PROTOCOL_ERROR, "reserved bits set, and no extension was agreed"
            )
        if not b1 & 0x80:
            raise WebSocketViolation(PROTOCOL_ERROR, "a client's frames must be masked")
        if opcode >= CLOSE:
            if opcode > PONG:
                raise WebSocketViolation(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
            if not b0 & 0x80:
                raise WebSocketViolation(PROTOCOL_ERROR, "a control frame must not be fragmented")
            if length > MAX_CONTROL_PAYLOAD:
                raise WebSocketViolation(
                    PROTOCOL_ERROR, "a control frame's payload is over 125 bytes"
                )
            return
        if opcode > BINARY:
            raise WebSocketViolation(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if opcode == CONTINUATION:
            message = self._message
            if message is None:
                raise WebSocketViolation(PROTOCOL_ERROR, "a continuation frame without a message")
            length += len(message)
            if length > self.max_message:
                raise WebSocketViolation(MESSAGE_TOO_BIG, "message too large")
            if length + self._headers + head > self.max_message + HEADER_ALLOWANCE:
                raise WebSocketViolation(
                    MESSAGE_TOO_BIG, "message too large, counting its frame headers"
                )
            if self._frames >= MAX_FRAGMENTS:
                raise WebSocketViolation(MESSAGE_TOO_BIG, "too many fragments", kind="fragments")
            return
        if self._opcode:
            raise WebSocketViolation(
                PROTOCOL_ERROR, "a new message before the fragmented one ended"
            )
        if length > self.max_message:
            raise WebSocketViolation(MESSAGE_TOO_BIG, "message too large")


def _decode(opcode: int, payload: bytes | bytearray) -> str | bytes:
    if opcode == BINARY:
        return bytes(payload)
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketViolation(INVALID_DATA, "a text message that is not UTF-8") from None


def _parse_close(payload: bytes) -> Close:
    if not payload:
        return Close(NO_STATUS, "")
    if len(payload) == 1:
        raise WebSocketViolation(PROTOCOL_ERROR, "a close frame with a one-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not (code in _SENDABLE_BELOW_3000 or 3000 <= code <= 4999):
        raise WebSocketViolation(PROTOCOL_ERROR, f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketViolation(INVALID_DATA, "a close reason that is not UTF-8") from None
    return Close(code, reason)


_HEADER_16 = struct.Struct("!BBH").pack
_HEADER_64 = struct.Struct("!BBQ").pack


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame (a server's frames are never masked, so the same bytes can go
    to every recipient)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:  # a publication's frame, usually: its header in one call
        return _HEADER_16(0x80 | opcode, 126, n) + payload
    return _HEADER_64(0x80 | opcode, 127, n) + payload


def close_frame(code: int, reason: str) -> bytes:
    """A close frame with ``code`` and ``reason`` (cut to fit 125 bytes, on a character
    boundary); without a payload for :data:`NO_STATUS`, which is never sent as a code."""
    if code == NO_STATUS:
        return encode_frame(CLOSE, b"")
    data = reason.encode("utf-8")[: MAX_CONTROL_PAYLOAD - 2]
    data = data.decode("utf-8", "ignore").encode("utf-8")  # drop a cut character
    return encode_frame(CLOSE, code.to_bytes(2, "big") + data)
