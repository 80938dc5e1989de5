"""The send path: per-connection outbound queues and the worker's single flusher.

Theory of operation
-------------------
Waking a task per subscriber per publication costs more than the write itself (the design
notes measure 15 µs per delivery that way, against under 1 µs here). So a publication is
framed once, and :meth:`SendQueue.send` only appends the same ``bytes`` object to each
subscriber's queue and marks the queue dirty, synchronously. One :class:`Flusher` task per
worker wakes up after a few scheduler passes (letting readers finish what they received, so
many frames coalesce into one write) and writes each dirty queue with one non-blocking
``writev`` on the socket's file descriptor.

Only a connection whose kernel buffer is full gets a task of its own, the *drainer*, which
waits for writability and is given ``write_timeout`` to make progress. A queue that grows past
``max_bytes`` or a drainer that times out marks the connection a slow consumer: its queued
bytes are dropped at once (so memory stays bounded) and the session closes it with 4008. No
other connection ever waits for it.

The WebSocket layer (:mod:`broker.wsserver`) writes the 101 response, pongs and close frames
into the same queue, so there is exactly one writer per socket and frames never interleave.
Drainers run in the worker's nursery, not the connection's (an idle connection then needs no
nursery of its own); closing the queue cancels its drainer.

Streams that are not plain sockets (TLS, in-memory test streams) have no file descriptor to
write to without blocking; for them the drainer writes every batch with ``send_all``.

Publications on a topic whose delivery policy is ``latest`` come through the same
:meth:`SendQueue.send`, given the publication as well: the same append while the queue has
room, and past the limit a slot per topic holding the newest frame instead of a 4008
(:mod:`broker.latest`). The held frames go out once everything queued before them is written.
A reader that keeps up must cost what it costs on any other topic, so ``send`` compares the
queued bytes with ``_room`` (not ``max_bytes``), which is the limit while nothing is held and
-1 while anything is: one comparison decides between the append and everything else, and the
held frames are looked at only on the way past it. A connection that receives such topics
(``receives_latest``, set by the router when it subscribes) is not closed by ``write_timeout``
either: its reader is allowed to be slow, and its memory is bounded by the limit all the same.
"""

from __future__ import annotations

import bisect
import math
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import structlog
import trio
import trio.lowlevel

from broker.latest import LatestSlots
from broker.native import mypyc_attr

if TYPE_CHECKING:
    from broker.bus.base import Publication

__all__ = ["Flusher", "SendQueue"]

log = structlog.get_logger()

IOV_MAX: Final = 1024
#: The most dirty queues a lone publication may leave and still be written after a single
#: scheduler pass (:class:`Flusher`): past it, the write costs enough that waiting for the
#: next publications to share it is worth the passes.
LONE_QUEUES: Final = 8


def _mark(waiter: tuple[int, trio.Event]) -> int:
    return waiter[0]


def _ignore(_: object) -> None:
    """The callback of a queue or stream that has nobody (or nobody any more) to tell."""


# Queue states. Plain module constants, not an Enum: the send path checks them per delivery,
# and an enum member lookup costs several times a global's on CPython 3.11. Final, so that
# compiled they are integers in the code, not a look-up in the module's dict each time.
IDLE: Final = 0  # nothing queued
DIRTY: Final = 1  # queued, waiting for the flusher
BLOCKED: Final = 2  # the drainer owns the writing (socket full, or not a plain socket)
OVERFLOWED: Final = 3  # slow consumer: only control frames are accepted now
CLOSED: Final = 4  # the last: send() refuses from OVERFLOWED on with one comparison


class Flusher:
    """Writes every dirty queue of one worker. Run :meth:`run` once per worker.

    Before writing, the flusher yields to the scheduler while work keeps arriving: at least
    ``min_passes`` times, then until two passes in a row brought no new publication (read from
    ``progress``, a counter the router increments), at most ``max_passes``. Each pass lets the
    tasks that are already runnable (readers with data, the bus link) add to the queues, so a
    burst of publications coalesces into one write per connection. Latency stays low because
    nothing waits for a timer, only for work that is already there. (Asking trio how many tasks
    are runnable would be simpler, but ``current_statistics()`` walks every registered socket.)

    Those passes pay off only under load. A wake-up that brought at most one publication since
    the last flush, for at most ``lone_queues`` connections, and after which one pass brought
    nothing more, is written after that one pass: at a low rate every publication arrives
    alone, and each extra pass is a turn of trio's run loop (an ``epoll_wait`` and the
    scheduler) that coalesces nothing, costs CPU and delays the frame. A fan-out (many dirty
    queues) or a burst (a second publication before the write) still gets every pass.
    """

    def __init__(
        self,
        progress: Callable[[], int] = lambda: 0,
        *,
        min_passes: int = 3,
        max_passes: int = 64,
        lone_queues: int = LONE_QUEUES,
    ) -> None:
        self.progress = progress
        self.min_passes = min_passes
        self.max_passes = max_passes
        self.lone_queues = lone_queues
        self._flushed_at = 0  # progress() when the last flush began
        self._dirty: list[SendQueue] = []
        self._wakeup = trio.Event()
        self.writes = 0  # statistics: writev calls
        self.bytes_written = 0
        self.skipped = 0  # publications replaced by a newer one under the latest policy

    def mark(self, queue: SendQueue) -> None:
        self._dirty.append(queue)
        if len(self._dirty) == 1:
            self._wakeup.set()

    async def run(self) -> None:
        progress = self.progress
        checkpoint = trio.lowlevel.checkpoint
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            seen = progress()
            quiet = 0
            for i in range(self.max_passes):
                await checkpoint()
                now = progress()
                quiet = quiet + 1 if now == seen else 0
                seen = now
                if i + 1 >= self.min_passes and quiet >= 2:
                    break
                # A lone publication (or only control frames) to a few connections: nothing
                # is coming to coalesce with, so write now rather than after the extra passes.
                if quiet and now - self._flushed_at <= 1 and len(self._dirty) <= self.lone_queues:
                    break
            self._flushed_at = seen
            dirty, self._dirty = self._dirty, []
            for queue in dirty:
                queue.flush()


# Subclassable from Python when compiled: tests stand in for a queue with a subclass.
@mypyc_attr(allow_interpreted_subclasses=True)
class SendQueue:
    """The outbound bytes of one connection, bounded by ``max_bytes``.

    ``on_slow`` is called once, with ``"send_queue_max_bytes"`` or ``"write_timeout"``, when
    the connection becomes a slow consumer; ``on_broken`` once when the socket fails.
    """

    # Slots: tens of thousands of these live at once, and a __dict__ each would cost ~1 KiB.
    __slots__ = (
        "_chunks",
        "_drain_scope",
        "_flusher",
        "_head",
        "_latest",
        "_nursery",
        "_room",
        "_socket",
        "_state",
        "_stream",
        "_waiters",
        "appended",
        "max_bytes",
        "on_broken",
        "on_slow",
        "queued",
        "receives_latest",
        "settled",
        "write_timeout",
    )

    def __init__(
        self,
        flusher: Flusher,
        nursery: trio.Nursery,
        *,
        max_bytes: int,
        write_timeout: float,
        on_slow: Callable[[str], None] = _ignore,
        on_broken: Callable[[str], None] = _ignore,
    ) -> None:
        self._flusher = flusher
        self._nursery = nursery
        self.max_bytes = max_bytes
        self.write_timeout = write_timeout
        self.on_slow = on_slow
        self.on_broken = on_broken
        # Plain lists, not deques: an idle connection's empty deque costs a 500-byte block,
        # and a list that is written whole is handed to writev as it is.
        self._chunks: list[bytes] = []
        self._head = 0  # bytes of _chunks[0] already written
        self.queued = 0  # bytes in _chunks not yet written
        self.appended = 0  # bytes ever queued
        self.settled = 0  # bytes ever written or dropped: waiters wake when it passes their mark
        self._state = IDLE
        self._socket: socket.socket | trio.socket.SocketType | None = None
        self._stream: trio.abc.Stream | None = None
        self._waiters: list[tuple[int, trio.Event]] = []
        self._drain_scope: trio.CancelScope | None = None  # the drainer's, while one runs
        # Made by the first frame held: the frames held for topics delivered `latest`.
        self._latest: LatestSlots | None = None
        # What send appends without a second look: max_bytes, or -1 while frames are held.
        self._room = max_bytes
        #: It receives topics delivered ``latest``: ``write_timeout`` does not cut it.
        self.receives_latest = False

    def attach(self, stream: trio.abc.Stream | socket.socket) -> None:
        """Write to ``stream``: directly to its socket when it is a non-blocking socket or a
        plain :class:`trio.SocketStream`, else through ``send_all`` in the drainer."""
        if isinstance(stream, socket.socket):
            self._socket = stream
        elif isinstance(stream, trio.SocketStream):
            self._socket = stream.socket
        else:
            self._stream = stream

    @property
    def closed(self) -> bool:
        return self._state == CLOSED

    @property
    def overflowed(self) -> bool:
        return self._state == OVERFLOWED

    def send(self, frame: bytes, pub: Publication | None = None) -> bool:
        """Queue one complete frame without blocking. With ``pub``, the frame is that
        publication of a topic delivered ``latest``: past the limit (or behind a held frame of
        its topic) it is held as the topic's newest instead (:mod:`broker.latest`). Returns
        False if it was dropped because the connection is closing or just became a slow
        consumer."""
        # The hottest function of the broker (once per delivery): every attribute read and
        # call here is paid a million times a second under fan-out, whatever the policy.
        state = self._state
        if state >= OVERFLOWED:  # or CLOSED: the two states past it
            return False
        n = len(frame)
        queued = self.queued + n
        if queued > self._room:
            return self._past_room(frame, pub)
        self._chunks.append(frame)
        self.queued = queued
        self.appended += n
        if state == IDLE:
            self._state = DIRTY
            self._flusher.mark(self)
        return True

    def _past_room(self, frame: bytes, pub: Publication | None) -> bool:
        """:meth:`send` of a frame that does not fit below ``_room``: past the limit, or while
        frames are held."""
        over = self.queued + len(frame) > self.max_bytes
        if pub is not None:
            self.receives_latest = True
            latest = self._latest
            if latest is None:
                latest = self._latest = LatestSlots()
            # A topic that holds a frame holds the later ones too: appended, they would
            # overtake it. Past the limit with bytes queued (so the queue is dirty or
            # draining, and the held frame goes out after them) the frame is held; with
            # nothing queued, a frame larger than the whole queue makes a slow consumer.
            if pub.topic in latest.held or (over and self.queued):
                return self._hold(latest, pub, frame)
        if over:
            self.overflow("send_queue_max_bytes")
            return False
        self._append(frame)
        return True

    def _hold(self, latest: LatestSlots, pub: Publication, frame: bytes) -> bool:
        """Hold ``frame`` as its topic's newest; past the held bytes' limit, overflow."""
        replaced = latest.hold(pub.topic, frame, pub.offset, pub.epoch, self.max_bytes)
        if replaced is None:
            self.overflow("send_queue_max_bytes")
            return False
        self._flusher.skipped += replaced
        self._room = -1  # every frame takes _past_room until the held ones are released
        return True

    @property
    def held_bytes(self) -> int:
        """Bytes of frames held for ``latest`` topics, besides the ``queued`` ones."""
        return 0 if self._latest is None else self._latest.bytes

    def _release_held(self) -> None:
        """Queue the held frames (with their ``skipped`` pushes): what came before them is out."""
        assert self._latest is not None
        frames = self._latest.release()
        n = sum(map(len, frames))
        self._chunks.extend(frames)
        self.queued += n
        self.appended += n
        self._room = self.max_bytes

    def _append(self, data: bytes) -> None:
        """Queue ``data`` whatever the limit (the caller checked it, or has none)."""
        self._chunks.append(data)
        self.queued += len(data)
        self.appended += len(data)
        if self._state == IDLE:
            self._state = DIRTY
            self._flusher.mark(self)

    def send_control(self, data: bytes) -> None:
        """Queue ``data`` (a control frame or an HTTP response) even past the limit, and even
        for a slow consumer whose other frames were dropped: control frames are tiny, and the
        close frame that tells a slow consumer why must still go out. Dropped only once the
        queue is closed."""
        state = self._state
        if state == CLOSED:
            return
        self._append(data)
        if state == OVERFLOWED:
            self._start_drainer()

    async def wait_drained(self, below: int = 0) -> None:
        """Wait until at most ``below`` bytes of what is queued now are still unwritten
        (everything, by default), or the queue dropped them or closed. A replay waits for a
        low-water mark this way between its frames (:mod:`broker.replay`)."""
        mark = self.appended - below
        if self._state == CLOSED or self.settled >= mark:
            return
        event = trio.Event()
        # Kept in order of their marks, which _settle wakes from the front.
        bisect.insort(self._waiters, (mark, event), key=_mark)
        await event.wait()

    def overflow(self, reason: str) -> None:
        """Make the connection a slow consumer now (its queue overflowed, or the caller says
        it is one): drop what is queued, refuse further frames and report ``reason`` to
        ``on_slow`` (once)."""
        if self._state in (CLOSED, OVERFLOWED):
            return
        # Keep only a partly written frame (its tail must still go out, or the stream would be
        # corrupt for the close frame that follows); drop everything else now.
        keep = self._chunks[0] if self._chunks and self._head else None
        self._chunks.clear()
        if self._latest is not None:
            self._latest.clear()
        self.settled += self.queued
        self.queued = 0
        if keep is not None:
            self.settled -= len(keep) - self._head
            self._chunks.append(keep)
            self.queued = len(keep) - self._head
        else:
            self._head = 0
        blocked = self._state == BLOCKED
        self._state = OVERFLOWED
        self.on_slow(reason)
        if self._chunks and not blocked:
            self._start_drainer()

    def release_callbacks(self) -> None:
        """Drop the callbacks. They are the session's bound methods, and the session holds
        the queue: left in place, that cycle keeps a closed connection's whole object graph
        (socket, wsproto, buffers) alive until a full garbage collection, which with
        :mod:`broker.gctune`'s thresholds can be half an hour away."""
        self.on_slow = self.on_broken = _ignore

    def close(self) -> None:
        """Drop everything queued, refuse further frames, stop the drainer and wake every
        waiter."""
        self._state = CLOSED
        if self._drain_scope is not None:
            self._drain_scope.cancel()
        self._chunks.clear()
        if self._latest is not None:
            self._latest.clear()
        self.queued = 0
        waiters, self._waiters = self._waiters, []
        for _, event in waiters:
            event.set()

    def _advance(self, n: int) -> None:
        """Drop ``n`` written bytes from the front of the queue."""
        self.queued -= n
        chunks = self._chunks
        if not self.queued:  # the common case: everything went out
            chunks.clear()
            self._head = 0
            if self._latest is not None and self._latest.held:
                self._release_held()
            return
        n += self._head
        done = 0
        for chunk in chunks:
            if n < len(chunk):
                break
            n -= len(chunk)
            done += 1
        if done == len(chunks):
            chunks.clear()
        else:
            del chunks[:done]
        self._head = n

    def _settle(self, n: int) -> None:
        self.settled += n
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.settled:
            waiters.pop(0)[1].set()

    def _write_nonblocking(self) -> bool | None:
        """One ``writev`` of what is queued. True: all written; False: the socket is full;
        None: the socket failed (the queue is closed)."""
        sock = self._socket
        assert sock is not None
        fd = sock.fileno()
        if fd < 0:
            self._fail("socket closed")
            return None
        chunks = self._chunks
        bufs: list[bytes] | list[memoryview]
        if not self._head and len(chunks) <= IOV_MAX:
            bufs = chunks  # the common case: no copy of the list at all
        else:
            bufs = [memoryview(c) for c in chunks[:IOV_MAX]]
            bufs[0] = bufs[0][self._head :]
        try:
            n = os.writev(fd, bufs)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._fail(exc.strerror or "write failed")
            return None
        self._flusher.writes += 1
        self._flusher.bytes_written += n
        self._advance(n)
        self._settle(n)
        return not chunks

    def _fail(self, reason: str) -> None:
        self.close()
        self.on_broken(reason)

    def flush(self) -> None:
        """Called by the flusher: write what is queued, or hand over to the drainer."""
        if self._state != DIRTY:
            return
        if self._socket is None:
            self._start_drainer()
            return
        while self._chunks:
            done = self._write_nonblocking()
            if done is None:
                return
            if not done:
                self._start_drainer()
                return
        self._state = IDLE

    def _start_drainer(self) -> None:
        if self._state == DIRTY:
            self._state = BLOCKED
        if self._drain_scope is None:
            # At most one drainer: two tasks may not wait on one socket (and must not
            # interleave writes).
            self._drain_scope = trio.CancelScope()
            self._nursery.start_soon(self._drain, self._drain_scope)

    async def _drain(self, scope: trio.CancelScope) -> None:
        """Write until the queue is empty, giving each step ``write_timeout`` to progress."""
        try:
            with scope:
                await self._drain_loop()
        except Exception:
            # It runs in the worker's nursery: a bug here must cost one connection, not all.
            log.exception("drainer_failed")
            self._fail("internal error")
        finally:
            self._drain_scope = None

    async def _drain_loop(self) -> None:
        try:
            while self._chunks and self._state != CLOSED:
                # A connection receiving `latest` topics may read as slowly as it likes.
                tolerant = self.receives_latest and self._state != OVERFLOWED
                timeout = math.inf if tolerant else self.write_timeout
                with trio.move_on_after(timeout) as scope:
                    if self._socket is not None:
                        await trio.lowlevel.wait_writable(self._socket)
                        progressed = self._write_nonblocking()
                        if progressed is None:
                            return
                    else:
                        await self._send_batch()
                if scope.cancelled_caught:
                    if self._state == OVERFLOWED:
                        # Even the close frame cannot go out: give up on this socket.
                        self._fail("write_timeout")
                        return
                    self.overflow("write_timeout")
                    if self._socket is None:
                        # A cancelled send_all leaves a stream that is not a plain socket
                        # (TLS) in an unknown state: nothing more may be written to it.
                        self.close()
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail(str(exc) or "stream closed")
            return
        if self._state == BLOCKED:
            self._state = IDLE
            if self._chunks:  # appended while the last write was in flight
                self._state = DIRTY
                self._flusher.mark(self)

    async def _send_batch(self) -> None:
        assert self._stream is not None
        # Take the batch out of the queue before the (cancellable, slow) send, so that a slow
        # consumer verdict reached meanwhile only drops what is still queued behind it.
        batch = b"".join(self._chunks)[self._head :]
        self._advance(len(batch))
        await self._stream.send_all(batch)
        self._settle(len(batch))
