"""The WebSocket upgrade decision, without I/O: accept (with whom and which subprotocol) or
refuse (with which HTTP status and JSON body). The worker applies the verdict.

The checks run in a fixed order, cheapest and least revealing first: the path (404), header
abuse and the subprotocol offer (400), the ``Origin`` (403, before any token is looked at),
the worker's connection limit (503), then the token (401).
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import attrs

from broker.auth import Identity, TokenVerifier, check_origin
from broker.errors import AuthError
from broker.protocol import SUBPROTOCOL

__all__ = ["Accept", "Reject", "evaluate"]

MAX_HEADERS = 64
MAX_SUBPROTOCOL_HEADER = 1024
WS_PATH = "/ws"


@attrs.frozen
class Accept:
    """Upgrade. ``identity`` is None when the client will authenticate in-band."""

    identity: Identity | None
    subprotocol: str | None
    token_source: str  # "header", "query", "anonymous" or "none"


@attrs.frozen
class Reject:
    status: int
    code: str
    message: str
    reason: str  # for logs and metrics

    def body(self) -> bytes:
        return json.dumps({"error": {"code": self.code, "message": self.message}}).encode()


def evaluate(
    target: str,
    headers: list[tuple[bytes, bytes]],
    subprotocols: tuple[str, ...],
    *,
    allowed_origins: tuple[str, ...],
    verifier: TokenVerifier,
    at_capacity: bool,
) -> Accept | Reject:
    """Decide on one upgrade request. ``target`` is the request target (path and query),
    ``headers`` the request's headers but Host and the Sec-WebSocket-Protocol and -Extensions
    lists (lower-cased names; see :class:`broker.upgrade.UpgradeRequest`)."""
    try:
        url = urlsplit(target)
    except ValueError:
        # e.g. "//[": urlsplit refuses an unclosed IPv6 bracket in the authority
        return Reject(400, "bad_request", "malformed request target", "bad_target")
    if url.path != WS_PATH:
        return Reject(
            404,
            "not_found",
            f"no WebSocket endpoint at {url.path[:100]!r}; use {WS_PATH}",
            "not_found",
        )
    if len(headers) > MAX_HEADERS:
        return Reject(
            400, "bad_request", f"too many headers (at most {MAX_HEADERS})", "bad_headers"
        )
    if sum(len(p) + 2 for p in subprotocols) > MAX_SUBPROTOCOL_HEADER:
        return Reject(400, "bad_request", "Sec-WebSocket-Protocol is too long", "bad_headers")
    if subprotocols and SUBPROTOCOL not in subprotocols:
        return Reject(
            400,
            "bad_request",
            f"unsupported subprotocols; this server speaks {SUBPROTOCOL}",
            "bad_subprotocol",
        )
    origins: list[str] = []
    authorization: list[str] = []
    for name, value in headers:
        lname = name.lower()
        if lname == b"origin":
            origins.append(value.decode("latin-1"))
        elif lname == b"authorization":
            authorization.append(value.decode("latin-1"))
    try:
        check_origin(origins, allowed_origins)
    except AuthError as exc:
        code = "forbidden" if exc.status == 403 else "bad_request"
        return Reject(exc.status, code, str(exc), exc.reason)
    if at_capacity:
        return Reject(
            503, "unavailable", "this worker is at its connection limit; retry later", "capacity"
        )
    subprotocol = SUBPROTOCOL if subprotocols else None
    token: str | None = None
    source = "none"
    if len(authorization) > 1:
        return Reject(400, "bad_request", "more than one Authorization header", "bad_headers")
    if authorization:
        scheme, _, credentials = authorization[0].partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return Reject(401, "unauthorized", "Authorization must be 'Bearer <jwt>'", "malformed")
        token, source = credentials.strip(), "header"
    else:
        tokens = parse_qs(url.query).get("token")
        if tokens:
            if len(tokens) > 1:
                return Reject(400, "bad_request", "more than one token parameter", "bad_headers")
            token, source = tokens[0], "query"
    if token is None:
        if verifier.allow_anonymous:
            return Accept(verifier.anonymous(), subprotocol, "anonymous")
        return Accept(None, subprotocol, "none")
    try:
        identity = verifier.verify(token)
    except AuthError as exc:
        return Reject(401, "unauthorized", str(exc), exc.reason)
    return Accept(identity, subprotocol, source)
