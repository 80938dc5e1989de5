"""One client connection, from the accepted upgrade to the close.

Theory of operation
-------------------
A session is one task, the *reader*: it takes the client's messages from
:class:`~broker.wsserver.ServerWebSocket` and serves them until the connection closes. A
:class:`Session` is built in layers, each in its own module and each importing only the one
below it: :mod:`broker.connstate` (the state, replies, deadlines and the close),
:mod:`broker.reads` (subscriptions, history, presence), :mod:`broker.dispatch`
(the request dispatcher and the publish path) and this module (the serving loop, its fair
turns and the close handshake). The layers add methods only; the loop calls the dispatcher's
methods on itself directly, so the hot path has no call layer for the split. Nothing in a
session waits for the client to read, except a replay (a ``since`` or a ``history`` reply
larger than the queue may hold), which :mod:`broker.replay` paces by what the client reads. A
session reaches its worker only through :class:`~broker.sessionhost.SessionHost` (the worker
imports this module, never the reverse).

No connection holds the worker: the reader serves its client in turns (``TURN_MESSAGES``
requests, or ``TURN_BYTES`` of replies queued) and yields between them, and waits for a turn's
replies to be written before the next when they are large, so a pipelining client is served as
fast as it reads. A connection that is closing, or whose queue overflowed, is served nothing
more of what it sent.

A session ends for exactly one reason, recorded once by :meth:`Session.close`: the client
closed, the timer fired (4009, 4001, 4003), the client was too slow (4008), too abusive (4029),
its client id holds too many connections (4029), it had not authenticated when room was needed
or the worker is full (1013), its permissions were revoked (1008), or the worker is shutting
down (1001). Whatever happens, its subscriptions and presence are removed before the task
returns.
"""

from __future__ import annotations

import trio
import trio.lowlevel

from broker import protocol as p
from broker.dispatch import SessionDispatch
from broker.errors import WebSocketViolation
from broker.frames import ABNORMAL_CLOSURE
from broker.logs import info_line

__all__ = ["Session"]

CLOSE_GRACE = 2.0  # how long a close frame may take to go out before the socket is dropped
ABORTED = ABNORMAL_CLOSURE  # the socket failed: no close frame can be sent, only released

# A reader's turn: after this many messages, or once it has queued this many bytes for its
# client, it yields so that the worker's other connections run. One read (RECEIVE_SIZE,
# 64 KiB) can hold a thousand pipelined requests; served in one go, expensive ones (history)
# would hold every other connection of the worker for as long as they take: TURN_BYTES ends
# those turns early. Cheap ones are bounded by the count, kept high because a yield in the
# middle of a publisher's burst lets the flusher write it in pieces (64 took the many-topics
# bench from 35 deliveries per write to 10); publishes are bounded by publish_burst anyway.
TURN_MESSAGES = 1024
TURN_BYTES = 256 * 1024


class Session(SessionDispatch):
    """One connection served until it closes (see the module docstring)."""

    # No __dict__ (a worker holds tens of thousands of sessions): the state is SessionState's.
    __slots__ = ()

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self, scope: trio.CancelScope) -> None:
        """Serve the connection until it closes, inside ``scope``: the connection's cancel
        scope, entered by the worker around this call (the worker's one scope per
        connection, for the handshake and then the session), which :meth:`close` cancels.
        Raises only Cancelled (that one, or another scope's)."""
        cfg = self.worker.config
        self._scope = scope
        if self.close_code is not None:  # closed before we started (slow already?)
            scope.cancel()
        try:
            if self.identity is not None:
                self._welcome()
            self._reschedule()
            ws = self.ws
            queue = self.queue
            served = 0  # messages served in this turn
            turn_start = queue.appended
            while True:
                if self.close_code is not None or queue.overflowed:
                    # Condemned: nothing more it sent (however much is buffered) is
                    # parsed or served.
                    await self._await_close()
                    break
                try:
                    # What the last read holds is taken without a coroutine: a burst of
                    # publications costs no await per message.
                    message = ws.buffered_message()
                    if message is None:
                        message = await ws.next_message()
                except WebSocketViolation as exc:
                    self.close(exc.code, exc.reason)
                    break
                if message is None:  # the client closed, or went away
                    break
                left = self._serve_now(message)
                if left is not None:
                    await left
                # Not kept while the connection waits, idle, for its next message.
                del message, left
                served += 1
                if served >= TURN_MESSAGES or queue.appended - turn_start >= TURN_BYTES:
                    # The turn ends: others run (and a session closed meanwhile stops).
                    if queue.queued >= TURN_BYTES:
                        # Its replies are not out yet: serve it more only once they are.
                        # A client that keeps asking and does not read what it asked for
                        # is then held back by TCP, then a slow consumer (write_timeout).
                        await queue.wait_drained()
                    else:
                        await trio.lowlevel.checkpoint()
                    served = 0
                    turn_start = queue.appended
        finally:
            self.worker.deadlines.cancel(self)
            if self.subs or self.close_code is not None or self.queue.queued:
                with trio.CancelScope(shield=True):
                    await self._close_all(cfg.timeouts.write_timeout)
            else:
                # Nothing to release or wait for (a client that simply went away): no
                # checkpoint on the way, so no shield (a cancel scope costs about 4 µs).
                await self._close_all(cfg.timeouts.write_timeout)

    async def _close_all(self, grace: float) -> None:
        """Release the subscriptions, then close the connection (see :meth:`run`)."""
        await self._cleanup()
        await self._finish_close(grace)

    async def _await_close(self) -> None:
        """Serve nothing until the close decided for this connection takes effect.

        A slow consumer is closed by the worker's closer, paced with the others
        (:meth:`~broker.worker.Worker.slow_consumer`): its :meth:`close` cancels this wait.
        Should that never come, the idle timer ends the connection, as nothing is read now."""
        if self.close_code is None:
            await trio.sleep_forever()

    # --- what the send queue reports (see Worker._connection) -----------------------------

    def on_slow(self, reason: str) -> None:
        self.worker.slow_consumer(self, reason)

    def on_broken(self, reason: str) -> None:
        self.close(ABORTED, reason)

    def make_room(self) -> None:
        """Dropped, still unauthenticated, to make room for newer connections (see
        :mod:`broker.slots`): 1013, try again later (not 4001, which clients take as fatal)."""
        self.close(
            p.CloseCode.TRY_AGAIN_LATER,
            "too many connections waiting to authenticate; try again later",
        )

    async def _finish_close(self, grace: float) -> None:
        ws = self.ws
        code = self.close_code
        if code is None:
            remote = ws.remote_close
            # info_line: log.info's line, for less CPU (two lines per connection)
            info_line(
                "disconnect",
                code=ws.remote_code,
                reason=remote[1] if remote else "",
                initiator="client",
            )
            if self.queue.queued:  # (no cancel scope for a client that is simply gone)
                with trio.move_on_after(min(grace, CLOSE_GRACE)):
                    await self.queue.wait_drained()  # our answer to its close frame
        else:
            info_line("disconnect", code=code, reason=self.close_reason, initiator="server")
            self.worker.count_close(code)
            if code != ABORTED and ws.send_close(code, self.close_reason):
                with trio.move_on_after(min(grace, CLOSE_GRACE)):
                    await ws.finish_close()
        # However the close handshake went, release the socket now.
        await ws.aclose()
