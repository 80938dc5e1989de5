"""The SDK's reconnect schedule over hours, on trio's autojump clock: the backoff grows while
connections fail at once, and starts again from ``backoff_base`` after a connection that stayed
up (else every later reconnect would wait up to ``backoff_max``). The broker is a worker in the
same trio run, on a loopback socket, so that it shares the fake clock."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

import client_sdk
from broker.protocol import CloseCode
from broker.worker import Worker, make_listen_socket
from tests.support.inmemory import make_worker, token

HOUR = 3600.0


@asynccontextmanager
async def broker_on_loopback() -> AsyncIterator[tuple[Worker, str]]:
    """A worker serving the SDK over a real loopback socket, in this trio run (so on its
    clock)."""
    worker = make_worker()
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(worker.serve, [make_listen_socket("127.0.0.1", 0)])
        yield worker, f"ws://127.0.0.1:{ports[0]}/ws"
        nursery.cancel_scope.cancel()


async def test_the_sdk_backoff_starts_again_after_a_stable_connection(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Full jitter draws the delay in [0, ceiling]: always take the ceiling, so that the delay
    # shows which attempt the client thinks it is at.
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    connected = trio.Event()

    def on_state(state: client_sdk.ConnectionState) -> None:
        if state is client_sdk.ConnectionState.CONNECTED:
            connected.set()

    async def drop_and_time_the_reconnect(worker: Worker) -> float:
        nonlocal connected
        connected = trio.Event()
        dropped = trio.current_time()
        for session in list(worker.sessions.values()):
            session.close(CloseCode.SLOW_CONSUMER, "dropped by the test")
        await connected.wait()
        return trio.current_time() - dropped

    async with (
        broker_on_loopback() as (worker, url),
        client_sdk.connect(
            url,
            token=token(ttl=10 * HOUR),
            backoff_base=1.0,
            backoff_max=1000.0,
            on_state_change=on_state,
        ),
    ):
        # A crash loop: each connection dropped at once, each wait twice the last.
        quick = [await drop_and_time_the_reconnect(worker) for _ in range(6)]
        assert [round(d) for d in quick] == [1, 2, 4, 8, 16, 32]
        await trio.sleep(HOUR)  # then a connection that stays up
        after_stable = await drop_and_time_the_reconnect(worker)
        assert after_stable < 1.5, f"the backoff did not reset: waited {after_stable:.1f}s"
