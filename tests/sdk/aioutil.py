"""Helpers for driving the asyncio client from tests: pytest runs async tests on trio
(``trio_mode``), so asyncio code runs under ``asyncio.run`` inside plain tests, and the trio
:class:`~tests.sdk.proxy.CuttableProxy` runs in a thread of its own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

from client_sdk import Client, ConnectionState, Event, Subscription
from tests.sdk.proxy import CuttableProxy


async def take(sub: Subscription, n: int, within: float = 5.0) -> list[Event]:
    return [await sub.get(within) for _ in range(n)]


async def wait_for_state(client: Client, state: ConnectionState) -> None:
    async with asyncio.timeout(10):
        async for s in client.states():
            if s is state:
                return


def data(events: list[Event]) -> list[Any]:
    return [getattr(e, "data", e) for e in events]


class ThreadedProxy:
    """A CuttableProxy on its own trio run in a thread."""

    def __init__(self, proxy: CuttableProxy, token: trio.lowlevel.TrioToken):
        self.proxy = proxy
        self._token = token

    @property
    def url(self) -> str:
        return self.proxy.url

    def block(self, blocked: bool) -> None:
        self.proxy.blocked = blocked

    def cut(self) -> None:
        trio.from_thread.run_sync(self.proxy.cut, trio_token=self._token)


@contextmanager
def proxy_in_thread(port: int) -> Iterator[ThreadedProxy]:
    proxy = CuttableProxy(port)
    ready = threading.Event()
    found: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            found["token"] = trio.lowlevel.current_trio_token()
            found["scope"] = nursery.cancel_scope
            ready.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(10), "the proxy did not start"
    try:
        yield ThreadedProxy(proxy, found["token"])
    finally:
        trio.from_thread.run_sync(found["scope"].cancel, trio_token=found["token"])
        thread.join(10)
