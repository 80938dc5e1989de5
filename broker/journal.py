"""What the in-memory history store tells the keeper of its copy on disk, and what it hands it.

The store (:class:`~broker.history.TopicStore`) calls a :class:`Journal` as it keeps, evicts
and forgets; the journal (:class:`broker.store.DiskJournal`) reads topics back as
:data:`PersistedState` tuples. Both are declared here, apart from either side, so that neither
imports the other's implementation. Nothing here does I/O.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["KEPT_FIELDS", "Journal", "PersistedState"]

#: Fields per publication in :attr:`Journal.kept`.
KEPT_FIELDS = 6


class Journal(Protocol):
    """What the store tells the keeper of its copy on disk (:class:`broker.store.DiskJournal`).
    Every method is called on the event loop and must not block.

    What the store does for the journal per publication is kept to one list extend and one
    remainder: a method call costs as much as all the rest, and with many topics, where each
    publication has few deliveries, it shows in the broker's CPU per delivery."""

    #: Where the store appends the fields of every publication it holds, as it holds it, one
    #: publication after the other: ``topic, epoch, offset, time kept (the store's clock),
    #: sender, data`` (:data:`KEPT_FIELDS` of them; while their objects are in the processor's
    #: cache, so that the journal need not visit the publication again). The journal may
    #: replace the list (the store looks it up at every publication).
    kept: list[Any]
    #: Offsets come in blocks of this many: :meth:`publishing` is called for the first offset
    #: of each block only (offsets ``1, block + 1, 2 * block + 1``...).
    block: int

    def publishing(self, topic: str, offset: int) -> None:
        """``offset`` of ``topic``, the first of a block, is about to be used. Raise
        :class:`~broker.errors.FrameError` (``unavailable``) when it may not be used yet (it is
        past what the disk has reserved for the topic)."""

    #: The store's clock when the journal last took :attr:`kept`: the store reports evictions
    #: of entries kept at or after it only (those the journal may not have written yet).
    since: float

    def evicted(self, topic: str, offset: int, size: int) -> None:
        """``topic``'s entries up to ``offset`` left history, the last of them (``size`` bytes)
        kept at or after :attr:`since`."""

    def touched(self, topic: str) -> None:
        """``topic``'s position or gap changed otherwise than by a held publication: the
        journal reads its state again."""

    def forget(self, topic: str) -> None:
        """``topic`` is forgotten (its tombstone went): its next epoch is a new one."""


#: A topic as the journal writes it (:meth:`~broker.history.TopicStore.persisted_states`): its
#: name, epoch, offset and gap, and its held entries newer than the journal asked for, oldest
#: first, as ``(offset, time kept + shift, sender, data)``. A plain tuple: the journal reads
#: one per changed topic per batch.
PersistedState = tuple[
    str, str, int, tuple[int, int] | None, list[tuple[int, float, str | None, str]]
]
