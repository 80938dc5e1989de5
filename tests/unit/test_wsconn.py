"""The contract of :mod:`broker.wsconn` with trio-websocket and wsproto: if a release changes
what it relies on, these fail (rather than connections breaking or memory quietly growing)."""

from __future__ import annotations

import inspect

import trio
import trio.testing
import wsproto

from broker.wsconn import release_handshake
from tests.support.inmemory import call, connect, make_worker, recv, running, token


def test_wsproto_asks_the_handshake_only_for_events_once_open() -> None:
    # release_handshake replaces `handshake` once `connection` is set. wsproto 1.2 and 1.3
    # read it in seven places, all but events() behind `if self.connection is None`.
    source = inspect.getsource(wsproto.WSConnection)
    assert source.count("self.handshake.") == 7, "wsproto's use of its handshake changed"
    assert "yield from self.handshake.events()" in source


async def test_an_open_connection_works_without_its_handshake() -> None:
    worker = make_worker()
    async with running(worker) as nursery:
        ws = await connect(worker, nursery, f"/ws?token={token()}")
        assert (await recv(ws))["op"] == "welcome"
        [session] = worker.sessions.values()
        # the worker released it already; a second call finds nothing to drop
        assert not release_handshake(session.ws)
        assert (await call(ws, op="subscribe", topic="a", id=1))["ok"]
        assert (await call(ws, op="publish", topic="a", data=1, id=2))["ok"]
        await ws.ping(b"p")  # control frames and their answers still flow
        await ws.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert not worker.sessions
        nursery.cancel_scope.cancel()
