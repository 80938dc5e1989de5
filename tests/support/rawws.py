"""A minimal raw-socket WebSocket client for tests that must misbehave on purpose: stop
reading, send bytes one at a time, send frames no library would send."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from typing import Any


def http_request(
    path: str,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    *,
    port: int,
    upgrade: bool = True,
) -> bytes:
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if upgrade:
        key = base64.b64encode(os.urandom(16)).decode()
        lines += [
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
    lines += [f"{k}: {v}" for k, v in items]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP response head (and its body when it has a Content-Length)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest


def handshake(
    port: int,
    path: str = "/ws",
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    *,
    rcvbuf: int | None = None,
    timeout: float = 10,
) -> tuple[int, dict[str, str], bytes, socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    sock.sendall(http_request(path, headers, port=port))
    status, hdrs, rest = read_response(sock)
    return status, hdrs, rest, sock


def encode_frame(
    payload: bytes,
    opcode: int = 0x1,
    *,
    fin: bool = True,
    length: int | None = None,
    masked: bool = True,
) -> bytes:
    """A client frame, masked unless ``masked`` is False (which no client may send);
    ``length`` may lie about the payload length."""
    n = len(payload) if length is None else length
    bit = 0x80 if masked else 0
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class FrameReader:
    """Parses unmasked server frames from a socket."""

    def __init__(self, sock: socket.socket, initial: bytes = b"") -> None:
        self.sock = sock
        self.buf = initial

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk

    def frame(self) -> tuple[int, bytes]:
        self._need(2)
        opcode = self.buf[0] & 0x0F
        n = self.buf[1] & 0x7F
        pos = 2
        if n == 126:
            self._need(4)
            n = struct.unpack("!H", self.buf[2:4])[0]
            pos = 4
        elif n == 127:
            self._need(10)
            n = struct.unpack("!Q", self.buf[2:10])[0]
            pos = 10
        self._need(pos + n)
        payload = self.buf[pos : pos + n]
        self.buf = self.buf[pos + n :]
        return opcode, payload

    def json(self) -> dict[str, Any]:
        """The next text frame as JSON (skipping pings)."""
        while True:
            opcode, payload = self.frame()
            if opcode == 0x1:
                return json.loads(payload)  # type: ignore[no-any-return]
            if opcode == 0x8:
                raise ConnectionError(f"closed: {close_code(payload)}")

    def close_code(self) -> int:
        """Read until the close frame; return its code."""
        while True:
            opcode, payload = self.frame()
            if opcode == 0x8:
                return close_code(payload)


def close_code(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
