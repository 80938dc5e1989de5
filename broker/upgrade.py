"""The WebSocket upgrade request and its answers, without I/O: the fast path of a connect.

Theory of operation
-------------------
:func:`parse_request` takes a complete request head (up to and including its blank line) and
returns an :class:`UpgradeRequest` when the head is *plainly* a valid upgrade: the request
line is exactly ``GET <target> HTTP/1.1``, every line ends with CRLF, every header is a token,
a colon and printable ASCII, and the headers that decide the upgrade (``Host``,
``Connection``, ``Upgrade``, ``Sec-WebSocket-Key``, ``Sec-WebSocket-Version``) each come once
and say what RFC 6455 4.2.1 asks. That is what browsers, the SDK and every WebSocket library
send, and it is judged by one regular expression and a loop over the headers.

Anything else returns None, and :class:`~broker.wsserver.ServerWebSocket` hands the same bytes
to h11 and wsproto, which judge it and write the answer exactly as they always did (400, 426,
a request that is valid but unusual, such as HTTP/1.0, ``Connection: close``, a body, obsolete
line folding, bare LF line ends or non-ASCII bytes). The fast path never answers a request
differently from that path: it only accepts what wsproto would accept, and builds the same
:class:`UpgradeRequest` from it (header names lower-cased, values stripped of surrounding
whitespace, ``Host``, ``Sec-WebSocket-Protocol`` and ``Sec-WebSocket-Extensions`` kept apart),
and :func:`accept_response` and :func:`reject_response` write, byte for byte, the responses
h11 writes for such a request (``tests/unit/test_upgrade.py`` compares them). Extensions
offered (``permessage-deflate``) are declined, as before, by not answering them.

Why not h11 for every request: on a reconnect storm with the verified-token cache warm, h11
and wsproto parsing the upgrade and writing the 101 were about 29 % of a connect's CPU (an h11
connection and state machine, event objects and header validation per request, then a
handshake object kept until the 101 is out); this path is a few microseconds.
"""

from __future__ import annotations

import base64
import hashlib
import re

import attrs

__all__ = ["UpgradeRequest", "accept_response", "parse_request", "reject_response"]

# RFC 6455 1.3: the GUID appended to the client's key before hashing.
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# The whole head at once: the request line and header lines, each ending with CRLF, then the
# blank line. A header is a token (RFC 9110 5.6.2), a colon and printable ASCII or tabs; so no
# obsolete folding (a line that starts with white space), no bare CR or LF, no byte >= 0x80.
_HEAD = re.compile(
    rb"GET ([\x21-\x7e]+) HTTP/1\.1\r\n"
    rb"((?:[-!#$%&'*+.^_`|~0-9A-Za-z]+:[\x20-\x7e\t]*\r\n)*)"
    rb"\r\n"
)
_OWS = b" \t"
# Headers that make h11 or wsproto do more than read them (framing, keep-alive, 100-continue):
# their requests take the general path.
_GENERAL_PATH = frozenset({b"content-length", b"transfer-encoding", b"expect"})
# Headers the upgrade is decided on: each must come exactly once on the fast path.
_ONCE = (b"host", b"connection", b"upgrade", b"sec-websocket-key", b"sec-websocket-version")


@attrs.frozen
class UpgradeRequest:
    """A WebSocket upgrade request: what the worker decides on (see
    :func:`broker.handshake.evaluate`), and the key the 101 answers."""

    target: str  # the request target: path and query
    # every header but Host, Sec-WebSocket-Protocol and Sec-WebSocket-Extensions, in order,
    # names lower-cased, values without surrounding white space
    extra_headers: list[tuple[bytes, bytes]]
    subprotocols: tuple[str, ...]
    key: bytes | None = None  # None when wsproto read the request (and will answer it)


def _comma_list(value: bytes) -> list[str]:
    """A comma-separated header's items, as wsproto splits them (empty items kept)."""
    return [piece.decode("ascii").strip() for piece in value.split(b",")]


def parse_request(head: bytes) -> UpgradeRequest | None:
    """The upgrade request in ``head`` (a whole request head, its blank line included), if it
    is plainly a valid one; None when h11 and wsproto must judge it (they may still accept
    it). Never raises."""
    match = _HEAD.fullmatch(head)
    if match is None:
        return None
    seen: dict[bytes, bytes] = {}
    headers: list[tuple[bytes, bytes]] = []
    subprotocols: list[str] = []
    lines = match.group(2)
    for line in lines.split(b"\r\n")[:-1] if lines else ():
        raw_name, _, raw_value = line.partition(b":")
        name = raw_name.lower()
        value = raw_value.strip(_OWS)
        if name == b"sec-websocket-protocol":
            subprotocols.extend(_comma_list(value))
            continue
        if name == b"sec-websocket-extensions":
            continue  # none is ever negotiated
        if name in _GENERAL_PATH:
            return None
        if name in _ONCE:
            if name in seen:
                return None
            seen[name] = value
            if name == b"host":
                continue
        headers.append((name, value))
    if len(seen) != len(_ONCE):
        return None
    tokens = [token.lower() for token in _comma_list(seen[b"connection"])]
    if (
        "upgrade" not in tokens
        # h11 adds "connection: close" to a refusal of such a request
        or "close" in tokens
        or seen[b"upgrade"].lower() != b"websocket"
        or seen[b"sec-websocket-version"] != b"13"
        # wsproto decodes Host as IDNA; without an ACE label that is plain ASCII
        or b"xn--" in seen[b"host"].lower()
    ):
        return None
    return UpgradeRequest(
        match.group(1).decode("ascii"), headers, tuple(subprotocols), seen[b"sec-websocket-key"]
    )


def accept_response(key: bytes, subprotocol: str | None) -> bytes:
    """The 101 that accepts a request with ``key``, selecting ``subprotocol`` (RFC 6455 4.2.2)."""
    accept = base64.b64encode(hashlib.sha1(key + _ACCEPT_GUID).digest())
    protocol = (
        b""
        if subprotocol is None
        else b"Sec-WebSocket-Protocol: %s\r\n" % (subprotocol.encode("ascii"))
    )
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: %s\r\n%s\r\n" % (accept, protocol)
    )


def reject_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """An HTTP error response with ``headers`` (Content-Length among them) and ``body``."""
    lines = b"".join(b"%s: %s\r\n" % header for header in headers)
    return b"HTTP/1.1 %d \r\n%s\r\n%s" % (status, lines, body)
