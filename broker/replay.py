"""Replays: history sent to one connection in bounded pages, as fast as that client reads.

Theory of operation
-------------------
A ``subscribe`` with ``since`` replays what a topic holds after that position, and a
``history`` request returns part of it. Either can be far larger than the connection's send
queue, which may never hold more than ``send_queue_max_bytes`` (past it the client is a slow
consumer). So nothing of a replay is read or queued whole:

- The bus is read in pages (:class:`HistoryPager`): each read asks for what follows the last
  publication read, as many as fit in about :data:`PAGE_BYTES` judging by the page before (at
  most :data:`MAX_PAGE`). The worker, the hub's link and Redis carry one page at a time,
  whatever the history window holds.
- Frames are queued by :func:`paced_send`: while the connection's queue holds more than half
  its bound, the replay waits until the client has read it down to a quarter. A client that
  reads gets the whole replay at the speed it reads; one that does not stops being written to,
  and its ``write_timeout`` makes it a slow consumer (4008) as for any other frame.
- A replay ends at the position its first read reported, the one the ``subscribe`` reply
  announces. What is published meanwhile is held by the router (``Subscription.pending``)
  and sent after the replay, paced the same way (:func:`stitch`). The holding is bounded by
  ``send_queue_max_bytes``: past it the router drops what it holds and holds nothing more,
  and once the replay is sent the session holds anew and reads the rest from history, up to
  the topic's position then, exactly as a subscription starts. A client that reads keeps up
  however busy the topic, as long as history still holds what it has not read.
- When a later page finds that what follows the last replayed offset is gone (evicted, aged
  out, or the topic has a new epoch: the client read slower than the window moves), the
  replay cannot go on exactly: :attr:`HistoryPager.lost` is set and the caller makes the
  connection a slow consumer. The client resumes after the last offset it received and is
  told exactly what is gone.

A ``history`` reply stays one frame (:func:`history_reply`): it holds the oldest messages that
fit in :func:`reply_budget` bytes (at least one), and the client reads on with ``since``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from broker import protocol as p
from broker.bus.base import Bus, HistoryResult, Publication, StreamPosition
from broker.router import Router, Subscription, message_frame
from broker.sendqueue import SendQueue

__all__ = [
    "FIRST_PAGE",
    "MAX_PAGE",
    "PAGE_BYTES",
    "HistoryPager",
    "history_reply",
    "paced_replay",
    "paced_send",
    "position_fields",
    "release_pending",
    "reply_budget",
    "stitch",
]

#: What one bus read of a replay aims to bring, in bytes of publication data.
PAGE_BYTES = 256 * 1024
#: Publications asked for by a replay's first read, before their size is known.
FIRST_PAGE = 16
#: The most publications one read asks for (also the protocol's largest ``limit``).
MAX_PAGE = 1000


def reply_budget(queue_bytes: int) -> int:
    """The most bytes of messages one ``history`` reply holds (beyond its first message) on a
    connection whose send queue holds ``queue_bytes``: half of it, so that a reply never makes
    a client that reads a slow consumer."""
    return queue_bytes // 2


async def paced_send(queue: SendQueue, frame: bytes) -> bool:
    """Queue ``frame`` once the connection's queue has room for it below half its bound:
    above that, wait until the client has read it down to a quarter (or to what leaves room
    for a frame larger than that). Returns False when the connection is a slow consumer or
    closed, and the frame was dropped."""
    limit = queue.max_bytes
    if queue.queued + len(frame) > limit // 2:
        await queue.wait_drained(max(0, min(limit // 4, limit - len(frame))))
    return queue.send(frame)


@attrs.define
class HistoryPager:
    """Reads ``topic``'s history after ``since`` from ``bus`` in pages, up to the position the
    first read reports, and at most ``limit`` publications (all when ``None``): the oldest
    ones, or with ``newest`` the newest ones, in one read.

    Call :meth:`first` once, then :meth:`next` until it returns an empty page.
    """

    bus: Bus
    topic: str
    since: StreamPosition | None
    limit: int | None = None
    # The newest ``limit`` after ``since`` (``history`` with ``last``) instead of the oldest:
    # one read (``limit`` is at most the protocol's 1000), no further pages.
    newest: bool = False
    position: StreamPosition | None = None  # where the replay ends: the first read's
    lost: bool = False  # a later page found the history moved on past the replay
    _cursor: int = 0  # the last offset read
    _asked: int = FIRST_PAGE
    _done: bool = False

    async def first(self) -> HistoryResult:
        """The first page, with the position, ``recovered`` and ``missed`` to announce."""
        if self.newest:
            result = await self.bus.history(self.topic, self.since, self.limit, newest=True)
            self.position = result.position
            self._done = True
            return result
        result = await self.bus.history(self.topic, self.since, self._ask())
        self.position = result.position
        return attrs.evolve(result, publications=self._take(result.publications))

    async def next(self) -> tuple[Publication, ...]:
        """The next page, oldest first; empty once the replay is complete, or ``lost``."""
        if self._done:
            return ()
        assert self.position is not None, "first() comes first"
        after = StreamPosition(self._cursor, self.position.epoch)
        result = await self.bus.history(self.topic, after, self._ask())
        if not result.recovered or result.position.epoch != self.position.epoch:
            self.lost = self._done = True
            return ()
        return self._take(result.publications)

    def _ask(self) -> int:
        if self.limit is None:
            return self._asked
        return max(1, min(self._asked, self.limit))

    def _take(self, pubs: tuple[Publication, ...]) -> tuple[Publication, ...]:
        assert self.position is not None
        end = self.position.offset
        page = tuple(pub for pub in pubs if pub.offset <= end)
        if self.limit is not None:
            self.limit -= len(page)
        if page:
            self._cursor = page[-1].offset
            size = sum(len(pub.data) for pub in page) // len(page) + 1
            self._asked = max(1, min(MAX_PAGE, PAGE_BYTES // size))
        # Fewer than asked is not the end by itself: a read may stop short of the position
        # (at a crash's gap in history on disk); the next read says what follows.
        self._done = len(page) < len(pubs) or self._cursor >= end or self.limit == 0 or not page
        return page


def position_fields(result: HistoryResult, since: StreamPosition | None) -> dict[str, Any]:
    """The reply fields that tell where a read after ``since`` stands: ``offset`` and
    ``epoch``, then with ``since`` also ``recovered`` and (when not) ``missed``."""
    fields: dict[str, Any] = {"offset": result.position.offset, "epoch": result.position.epoch}
    if since is not None:
        fields["recovered"] = result.recovered
        if result.missed is not None:
            fields["missed"] = {"from": result.missed[0], "to": result.missed[1]}
    return fields


async def history_reply(pager: HistoryPager, frame_id: p.FrameId, budget: int) -> bytes:
    """The one frame answering a ``history`` request: where the topic stands, then the oldest
    messages ``pager`` reads that fit in ``budget`` bytes (at least one, when there is any).
    A history that moved on between pages ends the reply where it is still contiguous."""
    result = await pager.first()
    pushes: list[str] = []
    size = 0
    page = result.publications
    while page:
        for m in page:
            push = p.encode_message(m.topic, m.offset, m.epoch, m.sender, m.data)
            size += len(push) if push.isascii() else len(push.encode())  # bytes, as sent
            if pushes and size > budget:
                page = ()
                break
            pushes.append(push)
        else:
            page = await pager.next()
    reply = p.encode_history_reply(frame_id, pushes, **position_fields(result, pager.since))
    return p.frame_text(reply.encode())


async def paced_replay(
    queue: SendQueue,
    page: tuple[Publication, ...],
    pager: HistoryPager,
    on_page: Callable[[int], None],
) -> None:
    """Send ``page`` and every page after it from ``pager``, paced, calling ``on_page`` with
    the bytes of each page once it is queued. Stops early when the connection is a slow
    consumer or closed."""
    while page:
        sent = 0
        for pub in page:
            frame = message_frame(pub)
            if not await paced_send(queue, frame):
                page = ()
                break
            sent += len(frame)
        else:
            page = await pager.next()
        on_page(sent)


async def release_pending(
    queue: SendQueue, sub: Subscription, position: StreamPosition, router: Router
) -> StreamPosition:
    """Send what the router held for ``sub`` and is not covered by ``position``, in order and
    paced (a ``latest`` topic's under its policy, which needs no pacing: it never overflows
    the queue); then, unless the router dropped what it held, let the subscription receive
    live. Returns the position of the last publication sent (``position`` when none was)."""
    pending = sub.pending or []
    done = 0
    while done < len(pending):  # the router may append (or drop) while a frame waits for room
        pub = pending[done]
        done += 1
        if pub.epoch == position.epoch and pub.offset <= position.offset:
            continue
        if router.is_latest(pub.topic):
            router.send_one(queue, pub)
        elif not await paced_send(queue, message_frame(pub)):
            break
        position = StreamPosition(pub.offset, pub.epoch)
    if not sub.dropped:
        # No await since the loop's last check: nothing can arrive between it and this.
        sub.pending = None
    return position


async def stitch(
    queue: SendQueue,
    sub: Subscription,
    bus: Bus,
    first: HistoryResult,
    pager: HistoryPager | None,
    on_page: Callable[[int], None],
    on_refill: Callable[[], None],
    router: Router,
) -> bool:
    """Send a new subscription's replay (``first``'s page, then ``pager``'s; none without a
    pager), then what the router held meanwhile, so that live delivery follows with no gap
    and no duplicate. When the router had to drop what it held (more arrived than the send
    queue's bound while the client read), read on from history where the client is, holding
    anew, until nothing was dropped (calling ``on_refill`` each time). Returns False when history moved on past what the client
    got (the caller makes it a slow consumer; it resumes exactly from what it has)."""
    position = first.position
    page = first.publications
    while True:
        if pager is not None:
            await paced_replay(queue, page, pager, on_page)
            if pager.lost:
                return False
        position = await release_pending(queue, sub, position, router)
        if not sub.dropped or queue.overflowed or queue.closed:
            sub.pending = None
            return True
        # What was dropped is in history: hold anew first (what is published from now on
        # arrives there), then read up to the topic's position, as the subscription did.
        on_refill()
        sub.restart_pending()
        pager = HistoryPager(bus, sub.pattern, position)
        result = await pager.first()
        if not result.recovered or result.position.epoch != position.epoch:
            return False
        position = result.position
        page = result.publications
