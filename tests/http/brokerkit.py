"""Helpers for tests that talk to the real broker: HTTP with urllib, WebSocket with the
`websockets` library (independent of the project's own clients)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from websockets.sync.client import ClientConnection, connect

from tests.support.broker import API_KEY, BrokerProcess


def http(
    b: BrokerProcess, method: str, path: str, body: Any = None, key: str | None = API_KEY
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(b.http_url + path, data=data, method=method)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


@contextmanager
def ws_welcomed(
    b: BrokerProcess, sub: str, token: str | None = None
) -> Iterator[tuple[ClientConnection, dict[str, Any]]]:
    """A WebSocket connection as ``sub`` with ``token`` (default: one with the configured
    defaults), and the welcome frame it received."""
    with connect(
        b.url,
        subprotocols=["pubsub.v1"],  # type: ignore[list-item]
        additional_headers={"Authorization": f"Bearer {token or b.token(sub)}"},
        open_timeout=10,
    ) as conn:
        welcome = json.loads(conn.recv(timeout=10))
        assert welcome["op"] == "welcome"
        assert welcome["client"] == sub
        yield conn, welcome


@contextmanager
def ws_client(b: BrokerProcess, sub: str, token: str | None = None) -> Iterator[ClientConnection]:
    """A connection as ``sub``, with ``token`` (default: one with the configured defaults)."""
    with ws_welcomed(b, sub, token) as (conn, _):
        yield conn


def next_op(conn: ClientConnection, op: str) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = json.loads(conn.recv(timeout=10))
        if frame.get("op") == op:
            return frame


def request(conn: ClientConnection, **frame: Any) -> dict[str, Any]:
    conn.send(json.dumps(frame))
    while True:
        reply: dict[str, Any] = json.loads(conn.recv(timeout=10))
        if reply.get("id") == frame["id"]:
            return reply
