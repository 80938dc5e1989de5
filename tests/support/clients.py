"""Small helpers around the `websockets` library, the independent client of the tests."""

from __future__ import annotations

import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.support.broker import BrokerProcess


async def open_client(
    b: BrokerProcess, sub: str, *, via: str = "header"
) -> tuple[ClientConnection, dict[str, Any]]:
    """Connect as ``sub`` (token in the Authorization header or the query) and read the
    welcome; return the connection and the welcome."""
    token = b.token(sub)
    if via == "header":
        ws = await connect(
            b.url,
            additional_headers={"Authorization": f"Bearer {token}"},
            subprotocols=["pubsub.v1"],
            max_size=None,
        )  # type: ignore[list-item]
    else:
        ws = await connect(f"{b.url}?token={token}", subprotocols=["pubsub.v1"], max_size=None)  # type: ignore[list-item]
    welcome = json.loads(await ws.recv())
    assert welcome["op"] == "welcome" and welcome["client"] == sub, welcome
    return ws, welcome


async def call(ws: ClientConnection, **frame: Any) -> dict[str, Any]:
    """Send ``frame`` and return the reply with its id, dropping pushes received meanwhile."""
    await ws.send(json.dumps(frame))
    while True:
        msg = json.loads(await ws.recv())
        if msg.get("id") == frame.get("id") and "ok" in msg:
            return msg  # type: ignore[no-any-return]
