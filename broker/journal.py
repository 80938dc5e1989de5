"""What the in-memory history store tells the keeper of its copy on disk, and what it hands it.

The store (:class:`~broker.history.TopicStore`) calls a :class:`Journal` as it keeps, evicts
and forgets; the journal (:class:`broker.store.DiskJournal`) reads topics back as
:data:`PersistedState` tuples. Both are declared here, apart from either side, so that neither
imports the other's implementation. Nothing here does I/O.
"""

from __future__ import annotations

from typing import Protocol

from broker.bus.base import Publication

__all__ = ["Journal", "PersistedState"]


class Journal(Protocol):
    """What the store tells the keeper of its copy on disk (:class:`broker.store.DiskJournal`).
    Every method is called on the event loop and must not block."""

    def publishing(self, topic: str, offset: int) -> None:
        """``offset`` of ``topic`` is about to be used. Raise :class:`~broker.errors.FrameError`
        (``unavailable``) when it may not be used yet (it is past what the disk has reserved
        for the topic)."""

    def kept(self, when: float, pub: Publication, size: int) -> None:
        """``pub`` is held from ``when`` (the store's clock), ``size`` bytes as
        :func:`~broker.historytable.entry_bytes` counts them. One call per held publication,
        while its objects are still in the processor's cache."""

    def evicted(self, topic: str, offset: int) -> None:
        """``topic``'s entries up to ``offset`` left history."""

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
