"""Generated client frames through a real worker's session (over in-memory streams), before
and after authentication: every frame gets a documented answer, never ``internal``, and the
connection keeps being served. ``targets.command`` checks the parser alone; this checks what
the session does with what the parser lets through (topics, tokens, since, limits, ...)."""

from __future__ import annotations

import json

import trio
import trio_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.protocol import ErrorCode
from tests.fuzz.test_fuzz import frames
from tests.support.inmemory import call, connect, make_worker, recv, running, token

CODES = {code.value for code in ErrorCode} - {"internal"}


async def answers(ws: trio_websocket.WebSocketConnection, frame: bytes, n: int) -> None:
    """Send ``frame``, then a ping with a fresh id; every error before the ping's reply has a
    documented code."""
    await ws.send_message(frame.decode())
    await ws.send_message(json.dumps({"op": "ping", "id": f"sync{n}"}))
    while True:
        msg = await recv(ws)
        if msg.get("ok") is False:
            assert msg["error"]["code"] in CODES, (frame, msg)
        if msg.get("id") == f"sync{n}":
            return


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames(), min_size=1, max_size=6), st.booleans())
def test_generated_frames_get_documented_answers(batch: list[bytes], in_band: bool) -> None:
    async def main() -> None:
        # Generous limits: this is about answers, not about the abuse budget.
        worker = make_worker(limits={"max_violations": 1000})
        async with running(worker) as nursery:
            headers = None if in_band else [(b"Authorization", f"Bearer {token()}".encode())]
            ws = await connect(worker, nursery, headers=headers)
            if in_band:
                # Before authentication only `auth` is served; the rest is `unauthorized`
                # (a failed first `auth` closes the connection, as documented: not sent here).
                if json.loads(batch[0]).get("op") != "auth":
                    await answers(ws, batch[0], 0)
                reply = await call(ws, op="auth", token=token(), id="auth")
                assert reply["ok"] or reply["error"]["code"] in CODES, reply
            else:
                assert (await recv(ws))["op"] == "welcome"
            for n, frame in enumerate(batch, start=1):
                await answers(ws, frame, n)
            assert worker.errors["internal"] == 0
            await ws.aclose()

    trio.run(main)
