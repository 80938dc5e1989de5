"""Message framing between the supervisor's hub and its workers, over Unix stream sockets.

Each message is a list, sent as a 4-byte big-endian length and the list in :mod:`marshal`
format. Why marshal and not JSON: the hub handles every publication of the machine, and
marshal encodes and decodes such a message four to seven times faster. Its two caveats do not
apply here: its format is tied to the Python version, and both ends are the same interpreter
(the supervisor starts its workers with its own ``sys.executable``); it is not meant for
untrusted input, and the only peer is that supervisor or one of its workers, over a socket
only the service's user can open. Only built-in values cross (str, int, float, bool, None,
lists, tuples and dicts of them); anything else fails at :func:`encode` with ``ValueError``.
:class:`Link` wraps one connected stream: :meth:`Link.send` appends without blocking (the
link's writer task writes in the background, coalescing), :meth:`Link.call` sends a request
and waits for its reply, and :meth:`Link.run` reads until the peer goes, dispatching replies
to their callers and everything else to the link's handler.

Message shapes (the first element names the kind):

    ["req", id, method, args...]   a request; the peer answers with
    ["res", id, true, result]      ... its result, or
    ["res", id, false, message]    ... a failure (``unavailable`` in the message if transient;
                                   ``[code, message]`` for a refusal with a protocol error code)
    ["part", id, [item...]]        ... or a page of a paged result's items, then
    ["end", id, [rest...]]         ... its end: the result is ``[all items, *rest]``
    ["presence", topic, kind, client]             a join or leave
    ["hb"]                                        a worker's heartbeat
    ["batch", [message...]]                       several of the above, in order
    [kind, [value...]]                            a run: many small messages of one kind

Runs (:meth:`Link.send_run`) carry the hot path, one flat list of values per run:

    ["publish", [id, topic, data, sender, ...]]             publish requests (4 values each)
    ["oks", [id, result, ...]]                              successful replies (2 values each)
    ["pubs", [topic, offset, epoch, sender, data, ...]]     publications (data: JSON text)

Batches: the hot messages (publish requests, their replies, forwarded publications) are queued
with :meth:`Link.send_batched` (or in runs, below), and whatever was queued that way since the
last message sent otherwise crosses as one ``batch`` message: one :func:`marshal.dumps` and one
length prefix for the lot, and one :func:`marshal.loads` and one dispatch per batch on the
other side, instead of one of each per message (per publication, the marshal calls and the
framing were most of what the link cost). A batch holds messages in the order they were sent
and is sealed before any other message is queued, so batching never reorders a link. A batch
is sealed when it reaches :data:`PAGE_BYTES` (by the callers' estimates), so it stays well
under :data:`MAX_MESSAGE`; a message estimated larger than a page crosses alone (and one that
passes :data:`MAX_MESSAGE` ends the link, as any other would).

A run goes one step further: consecutive messages of one kind, queued with
:meth:`Link.send_run`, are one message of the batch whose values are laid end to end in one
flat list. The peer then handles a whole run in one loop, with no list and no dispatch per
message (the hub's share of a publication was mostly such per-message overhead: a request
list, a reply list, a forwarded list, each decoded, dispatched on its kind and taken apart).
A run only ever grows at the end of the pending batch, so it keeps the link's order too.

Every message is bounded by :data:`MAX_MESSAGE`: a result that could be larger (history) is
sent with :meth:`Link.reply_paged`, in pages of at most :data:`PAGE_BYTES`. A link whose write
fails (the peer died), that would have to carry a larger message, or whose peer leaves more
than :data:`MAX_QUEUED` bytes unread ends by itself: only that link closes (the supervisor
then restarts its worker), never the process that holds it.
"""

from __future__ import annotations

import itertools
import marshal
import struct
from collections.abc import Callable
from typing import Any

import structlog
import trio

from broker.errors import BusError, BusUnavailable, FrameError

__all__ = ["Link", "encode", "fits", "worst_size"]

log = structlog.get_logger()

MAX_MESSAGE = 64 * 1024 * 1024
#: The most bytes (as estimated by the caller's ``size``) of items in one page of a paged reply.
PAGE_BYTES = 4 * 1024 * 1024
#: The most bytes queued for a peer that does not read them (a hung worker, until the
#: supervisor kills it): past it the link ends rather than the holder's memory growing.
MAX_QUEUED = 4 * MAX_MESSAGE
MAX_COALESCE_PASSES = 32
#: The most messages queued since the last write that the writer sends after a single quiet
#: scheduler pass instead of two: a lone publication's request, or its reply and its forward.
LONE_MESSAGES = 2
_LEN = struct.Struct("!I")


def encode(message: list[Any]) -> bytes:
    """The framed bytes of ``message``. Raises ``ValueError`` if it holds anything but
    built-in values."""
    body = marshal.dumps(message)
    return _LEN.pack(len(body)) + body


def worst_size(topic: str, data: str, sender: str | None) -> int:
    """An upper bound of the encoded bytes of a message carrying a publication's texts and a
    few small values (marshal: at most 4 bytes a character); what :meth:`Link.send_batched`
    and :meth:`Link.send_run` need. Written out, not summed over a generator: it runs once
    per publication."""
    return 4 * (len(topic) + len(data) + (len(sender) if sender else 0)) + 64


def fits(worst: int, *texts: str | None) -> bool:
    """Whether a message carrying ``texts`` (and a few small values), of at most ``worst``
    bytes (:func:`worst_size`), stays under :data:`MAX_MESSAGE`. Cheap for the usual sizes:
    the UTF-8 length is computed only when the worst case would not fit."""
    if worst + 1024 <= MAX_MESSAGE:
        return True
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts if t) + 1024 <= MAX_MESSAGE


class Link:
    """One end of a hub-worker connection.

    ``on_message(link, message)`` receives every message that is not a reply; it runs in the
    reader task, so it must not block. Requests it wants to answer later can be answered with
    :meth:`reply`.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        on_message: Callable[[Link, list[Any]], None],
        *,
        timeout: float = 10.0,
    ) -> None:
        self.stream = stream
        self.on_message = on_message
        self.timeout = timeout
        self._out: list[bytes] = []
        self._queued = 0  # bytes in _out
        self._batch: list[list[Any]] = []  # messages for the next batch, in order
        self._batch_bytes = 0  # their estimated size
        self._run: list[Any] | None = None  # the values of the run ending _batch, if one does
        self._run_kind = ""
        self._sent = 0  # messages queued so far (the writer watches it to coalesce)
        self._written = 0  # _sent when the writer last took the queue
        self._wakeup = trio.Event()
        self._ids = itertools.count(1)
        self._calls: dict[int, tuple[trio.Event, list[Any]]] = {}
        self._callbacks: dict[int, Callable[[Any | BaseException], None]] = {}
        self._parts: dict[int, list[Any]] = {}  # pages of paged results still coming
        self._scope: trio.CancelScope | None = None
        self.closed = False
        self.gone = trio.Event()
        self.last_seen = trio.current_time()

    def send_bytes(self, data: bytes) -> None:
        """Queue a framed message. One over :data:`MAX_MESSAGE` cannot be read by the peer:
        it ends this link instead (logged), as a failed write does."""
        if self.closed:
            return
        if self._batch:
            self._seal()
        self._push(data)

    def _push(self, data: bytes) -> None:
        if len(data) - 4 > MAX_MESSAGE:
            log.error("ipc_message_too_large", size=len(data) - 4, limit=MAX_MESSAGE)
            self.abort()
            return
        self._queued += len(data)
        if self._queued > MAX_QUEUED:
            log.error("ipc_queue_overflow", queued=self._queued, limit=MAX_QUEUED)
            self.abort()
            return
        self._out.append(data)
        self._sent += 1
        self._wakeup.set()

    def send_batched(self, message: list[Any], size: int) -> None:
        """Queue ``message`` (``size``: an upper bound of its encoded bytes) to cross in a
        batch with the messages queued the same way around it; see the module's docstring."""
        if self.closed:
            return
        self._run = None
        if self._batch and self._batch_bytes + size > PAGE_BYTES:
            self._seal()
        self._batch.append(message)
        self._batch_bytes += size
        self._sent += 1
        if self._batch_bytes >= PAGE_BYTES:
            self._seal()
        self._wakeup.set()

    def send_run(self, kind: str, values: tuple[Any, ...], size: int) -> None:
        """Queue one message of ``kind`` made of ``values`` (``size``: an upper bound of their
        encoded bytes), batched: appended to the run of ``kind`` that ends the pending batch,
        or the start of a new run. The peer's handler receives ``[kind, [values...]]``, the
        values of consecutive messages laid end to end; see the module's docstring."""
        run = self._run
        if run is not None and self._run_kind == kind and self._batch_bytes + size <= PAGE_BYTES:
            run.extend(values)
            self._batch_bytes += size
            self._sent += 1
            if self._batch_bytes >= PAGE_BYTES:
                self._seal()
            return  # the writer's wakeup is set: it was when the run began
        run = list(values)
        message = [kind, run]
        self.send_batched(message, size)
        if self._batch and self._batch[-1] is message:  # not sealed already: it may grow
            self._run, self._run_kind = run, kind

    def _seal(self) -> None:
        """Queue the pending batch as one message (a lone message as itself)."""
        self._run = None
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        self._push(encode(batch[0] if len(batch) == 1 else ["batch", batch]))

    def send(self, message: list[Any]) -> None:
        self.send_bytes(encode(message))

    def reply(self, rid: int, ok: bool, result: Any) -> None:
        """Answer request ``rid``; a result too large for one message becomes a failure."""
        frame = encode(["res", rid, ok, result])
        if len(frame) - 4 > MAX_MESSAGE:
            log.error("ipc_reply_too_large", size=len(frame) - 4, limit=MAX_MESSAGE)
            frame = encode(["res", rid, False, "internal: the reply is too large"])
        self.send_bytes(frame)

    def reply_paged(
        self, rid: int, items: list[Any], rest: list[Any], size: Callable[[Any], int]
    ) -> None:
        """Answer request ``rid`` with ``[items, *rest]``, the items in pages of at most
        :data:`PAGE_BYTES` (``size(item)`` estimates an item's encoded bytes; an item larger
        than a page gets a page of its own), so no message passes :data:`MAX_MESSAGE`."""
        frames: list[bytes] = []
        page: list[Any] = []
        held = 0
        for item in items:
            n = size(item)
            if page and held + n > PAGE_BYTES:
                frames.append(encode(["part", rid, page]))
                page, held = [], 0
            page.append(item)
            held += n
        if page:
            frames.append(encode(["part", rid, page]))
        frames.append(encode(["end", rid, rest]))
        if any(len(f) - 4 > MAX_MESSAGE for f in frames):
            log.error("ipc_reply_too_large", size=max(map(len, frames)) - 4, limit=MAX_MESSAGE)
            self.reply(rid, False, "internal: the reply is too large")
            return
        for frame in frames:
            self.send_bytes(frame)

    def abort(self) -> None:
        """End the link now: fail every pending call and stop :meth:`run`."""
        self.close()
        if self._scope is not None:
            self._scope.cancel()

    async def call(self, method: str, *args: Any) -> Any:
        """Send a request and wait for its result. Raises :class:`BusUnavailable` when the link
        is down or the peer does not answer within ``timeout``; :class:`BusError` when the
        peer reports a failure, :class:`FrameError` when it refuses with an error code."""
        if self.closed:
            raise BusUnavailable("the hub link is down")
        rid = next(self._ids)
        event = trio.Event()
        slot: list[Any] = []
        self._calls[rid] = (event, slot)
        self.send(["req", rid, method, *args])
        try:
            with trio.move_on_after(self.timeout):
                await event.wait()
        finally:
            self._calls.pop(rid, None)
        if not slot:
            raise BusUnavailable(f"no answer to {method} in {self.timeout:g}s")
        ok, result = slot
        if ok:
            return result
        raise _failure(result)

    def call_run(
        self,
        done: Callable[[Any | BaseException], None],
        kind: str,
        values: tuple[Any, ...],
        size: int,
    ) -> None:
        """Send a request without waiting, batched in the run of ``kind`` (:meth:`send_run`:
        the request's id followed by ``values``; ``size`` bounds their encoded bytes). ``done``
        gets its result (or a :class:`BusError`, or :class:`FrameError` for a refusal) when
        the reply comes, or :class:`BusUnavailable` if the link goes first; it runs in the
        reader, at the reply's place in the link's order. The peer answers with
        :meth:`reply_run`, or :meth:`reply` (a failure)."""
        if self.closed:
            done(BusUnavailable("the hub link is down"))
            return
        rid = next(self._ids)
        self._callbacks[rid] = done
        self.send_run(kind, (rid, *values), size)

    def reply_run(self, rid: int, result: Any, size: int) -> None:
        """Answer request ``rid`` successfully with ``result`` (of at most ``size`` encoded
        bytes), in the run of such replies (``["oks", [id, result, ...]]``)."""
        self.send_run("oks", (rid, result), size)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read and write until the peer closes or fails, then fail every pending call."""
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                if self.closed:  # aborted before it ran
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._writer)
                task_status.started()
                await self._reader()
                nursery.cancel_scope.cancel()
        finally:
            self.close()

    def close(self) -> None:
        self.closed = True
        self.gone.set()
        self._parts.clear()
        self._out, self._queued = [], 0
        self._batch, self._batch_bytes, self._run = [], 0, None
        for event, _ in self._calls.values():
            event.set()
        callbacks, self._callbacks = self._callbacks, {}
        for done in callbacks.values():
            done(BusUnavailable("the hub link is down"))

    async def _writer(self) -> None:
        while True:
            await self._wakeup.wait()
            # Yield while messages keep being queued (two quiet passes end it, at most
            # MAX_COALESCE_PASSES): a burst of publications crosses in one write, and the peer
            # then handles (and flushes to its clients) the whole burst at once. At a low rate
            # messages come alone, and the second quiet pass only costs a turn of the run loop
            # and delays the message: at most LONE_MESSAGES since the last write and one quiet
            # pass, and it goes.
            queued = self._sent
            quiet = 0
            for _ in range(MAX_COALESCE_PASSES):
                await trio.lowlevel.checkpoint()
                quiet = quiet + 1 if self._sent == queued else 0
                queued = self._sent
                if quiet >= 2 or (quiet and queued - self._written <= LONE_MESSAGES):
                    break
            self._written = queued
            if self._batch:
                self._seal()
            # A fresh event only now: made before the seal, the seal's own _push would set it
            # and wake the writer again, for a round of passes with nothing to write.
            self._wakeup = trio.Event()
            out, self._out = self._out, []
            self._queued = 0
            if out:
                try:
                    await self.stream.send_all(b"".join(out))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    # The peer is gone or stopped reading: this link ends, nothing else.
                    log.warning("ipc_write_failed", error=str(exc) or type(exc).__name__)
                    self.abort()
                    return

    async def _reader(self) -> None:
        buf = bytearray()
        while True:
            try:
                # 64 KiB: larger reads cross glibc's mmap threshold and cost several times more.
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            self.last_seen = trio.current_time()
            buf += data
            pos = 0
            n = len(buf)
            while n - pos >= 4:
                (size,) = _LEN.unpack_from(buf, pos)
                if size > MAX_MESSAGE:
                    # The peer is our own process; a message this size means its stream is
                    # corrupt. Close the link (the worker then restarts) rather than crash.
                    log.error("ipc_message_too_large", size=size, limit=MAX_MESSAGE)
                    return
                if n - pos - 4 < size:
                    break
                try:
                    with memoryview(buf) as view:
                        message = marshal.loads(view[pos + 4 : pos + 4 + size])
                except (ValueError, EOFError, TypeError) as exc:
                    log.error("ipc_message_undecodable", size=size, error=str(exc))
                    return
                pos += 4 + size
                if message[0] == "batch":
                    for each in message[1]:
                        self._dispatch(each)
                else:
                    self._dispatch(message)
            del buf[:pos]

    def _dispatch(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == "res":
            if self._parts:
                self._parts.pop(message[1], None)
            self._resolve(message[1], message[2], message[3])
        elif kind == "part":
            if message[1] in self._calls or message[1] in self._callbacks:
                self._parts.setdefault(message[1], []).extend(message[2])
        elif kind == "oks":
            values = message[1]
            for i in range(0, len(values), 2):
                self._resolve(values[i], True, values[i + 1])
        elif kind == "end":
            items = self._parts.pop(message[1], [])
            self._resolve(message[1], True, [items, *message[2]])
        else:
            self.on_message(self, message)

    def _resolve(self, rid: int, ok: bool, result: Any) -> None:
        """Hand a reply to the call waiting for it (none: it timed out; dropped)."""
        done = self._callbacks.pop(rid, None)
        if done is not None:
            done(result if ok else _failure(result))
            return
        waiter = self._calls.get(rid)
        if waiter is not None:
            waiter[1][:] = [ok, result]
            waiter[0].set()


def _failure(message: Any) -> BusError | FrameError:
    """The exception of a failure reply: a refusal with a protocol error code
    (``[code, message]``) is a :class:`FrameError`, anything else a :class:`BusError`."""
    if isinstance(message, list) and len(message) == 2:
        return FrameError(str(message[0]), str(message[1]))
    text = str(message)
    return BusUnavailable(text) if text.startswith("unavailable") else BusError(text)
