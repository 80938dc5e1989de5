"""A guard on the bytes a client sends: it follows the frame headers (without decoding
payloads) and reports a frame that announces more than the size limit the moment its header
arrives.

Why: wsproto hands over a frame's payload as it arrives, so a size limit checked on what was
received would let a header that claims 2**62 bytes, followed by silence, hold the connection
open until the idle timer.
The stream is the HTTP upgrade request (a GET: no body) and then frames, so the guard skips to
the end of the request head and then walks frame boundaries itself, independent of any parser's
internals. Sans-I/O: :meth:`FrameLengthGuard.feed` is a plain function of bytes.
"""

from __future__ import annotations

__all__ = ["FrameLengthGuard"]


class FrameLengthGuard:
    """Feed it every received byte; :attr:`violation` becomes the announced length of the first
    frame over ``limit`` (and stays set)."""

    __slots__ = ("_header", "_in_head", "_skip", "_tail", "limit", "violation")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.violation: int | None = None
        self._in_head = True
        self._tail = b""  # the last bytes of the request head seen, to find b"\r\n\r\n"
        self._header = bytearray()
        self._skip = 0

    def feed(self, data: bytes | bytearray) -> int | None:
        """Account for ``data``; return the offending length once a frame is too large."""
        if self.violation is not None or not data:
            return self.violation
        view = memoryview(data)
        if self._in_head:
            # Only the upgrade request passes here, so copying it is cheap.
            joined = self._tail + bytes(view)
            end = joined.find(b"\r\n\r\n")
            if end < 0:
                self._tail = joined[-3:]
                return None
            view = memoryview(joined)[end + 4 :]
            self._in_head = False
            self._tail = b""
        pos = 0
        n = len(view)
        while pos < n:
            if self._skip:
                step = min(self._skip, n - pos)
                self._skip -= step
                pos += step
                continue
            h = self._header
            h.append(view[pos])
            pos += 1
            if len(h) < 2:
                continue
            short = h[1] & 0x7F
            ext = 2 if short == 126 else 8 if short == 127 else 0
            if len(h) == 2 + ext:
                # The length is known before the mask arrives: judge it now.
                length = int.from_bytes(h[2 : 2 + ext], "big") if ext else short
                if length > self.limit:
                    self.violation = length
                    return length
            if len(h) == 2 + ext + (4 if h[1] & 0x80 else 0):
                self._skip = int.from_bytes(h[2 : 2 + ext], "big") if ext else short
                h.clear()
        return None
