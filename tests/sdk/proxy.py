"""A TCP proxy the tests can cut, to lose a connection without restarting the broker (so the
topic's epoch stays and recovery must be exact)."""

from __future__ import annotations

from contextlib import suppress

import trio


class CuttableProxy:
    """Forwards 127.0.0.1:``port`` to the broker; :meth:`cut` drops every connection, and
    connections are refused (closed at once) while :attr:`blocked`. Between :meth:`pause` and
    :meth:`resume` nothing from the broker is forwarded (nor read): a client that stopped
    reading, as the broker sees it."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = 0
        self.blocked = False
        self._scopes: list[trio.CancelScope] = []
        self._flowing = trio.Event()
        self._flowing.set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def pause(self) -> None:
        self._flowing = trio.Event()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        for scope in self._scopes:
            scope.cancel()
        self._scopes.clear()

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.blocked:
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            self._scopes.append(scope)
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            except OSError:  # the broker is down (restarting): as if the path were broken
                await client.aclose()
                return
            async with client, upstream, trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, upstream, nursery.cancel_scope)
                nursery.start_soon(self._pipe, upstream, client, nursery.cancel_scope, True)
        # Abort rather than close: the client sees the TCP connection die (1006), as when a
        # network path fails.
        with suppress(OSError):
            client.socket.close()

    async def _pipe(
        self,
        src: trio.SocketStream,
        dst: trio.SocketStream,
        scope: trio.CancelScope,
        pausable: bool = False,
    ) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                if pausable:
                    await self._flowing.wait()
                data = await src.receive_some(65536)
                if not data:
                    break
                await dst.send_all(data)
        scope.cancel()
