"""What a reader gets from a topic's held history: the recovery rules, and the crash gap.

Theory of operation
-------------------
A bus holds, per topic, its position ``(epoch, offset)`` and its latest publications, oldest
first, with contiguous offsets. :func:`select_history` turns what is held into the answer to one
read (a ``history`` op, or the replay of a ``subscribe`` with ``since``): at most ``limit`` of
the publications after the reader's position, the oldest or the newest ones, and whether the
reader recovered without loss or which offsets it ``missed``
(:class:`~broker.bus.base.HistoryResult`). Every bus uses it, so the rules are the same
everywhere. Nothing here does I/O or keeps state.

After a crash, a topic kept on disk may resume past offsets that were never saved: its *gap*
``(first, last)`` names them, held between older entries and the newer ones. A read never
crosses it: a reader from before its end resumes after it, told (as ``missed``) that everything
from its position to the gap's end is gone, as after an eviction; a reader whose next offsets
are held up to the gap gets them first, and learns of the gap on its next read. The store
clears the gap once every entry older than it has left history.
"""

from __future__ import annotations

from broker.bus.base import HistoryResult, Publication, StreamPosition, recovery

__all__ = ["select_history"]


def _held_up_to_gap(
    publications: list[Publication],
    since: StreamPosition,
    position: StreamPosition,
    gap: tuple[int, int],
    newest: bool,
) -> bool:
    """Whether a read of the oldest after ``since`` finds the offsets after it held without a
    hole up to the crash ``gap`` (so it can return them, and stop at the gap)."""
    if newest or since.epoch != position.epoch or since.offset >= gap[0] - 1:
        return False
    after = [p.offset for p in publications if since.offset < p.offset < gap[0]]
    return bool(after) and after[0] == since.offset + 1


def select_history(
    publications: list[Publication],
    position: StreamPosition,
    since: StreamPosition | None,
    limit: int | None,
    *,
    newest: bool = False,
    gap: tuple[int, int] | None = None,
) -> HistoryResult:
    """Apply the recovery rules of :class:`~broker.bus.base.HistoryResult` to the publications
    still held for a topic (oldest first, contiguous offsets but for ``gap``, the offsets a
    crash lost between them): at most ``limit`` of those after ``since``, the oldest ones, or
    the newest ones when ``newest``. Shared by every bus."""
    if gap is not None and since is not None:
        if _held_up_to_gap(publications, since, position, gap, newest):
            # A read from before the gap, with what follows ``since`` held up to it, stops at
            # the gap: nothing it returns is lost. The next read, from the gap's start, is told
            # exactly what the crash lost (below).
            publications = [p for p in publications if p.offset < gap[0]]
        elif since.epoch != position.epoch or since.offset < gap[1]:
            # Recovery never crosses the gap: a client from before its end resumes after it,
            # told that everything from its position to the gap's end is gone (as after an
            # eviction; clients take ``missed`` to end where the replay begins).
            publications = [p for p in publications if p.offset > gap[1]]
    first = publications[0].offset if publications else position.offset + 1
    recovered, missed = recovery(position, first, since, limit if newest else None)
    selected = publications
    if since is not None and since.epoch == position.epoch:
        selected = [p for p in publications if p.offset > since.offset]
    if limit is not None:
        # Not selected[-limit:], which selects everything when the limit is 0.
        selected = selected[max(0, len(selected) - limit) :] if newest else selected[:limit]
    return HistoryResult(tuple(selected), position, recovered, missed)
