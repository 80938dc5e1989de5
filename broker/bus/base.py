"""The bus interface: what a worker needs from whatever connects it to the other workers.

Theory of operation
-------------------
A worker owns connections; a bus owns topics. The worker calls :meth:`Bus.publish` and gets
back the :class:`Publication` with its offset; the bus then hands that publication to
:attr:`BusHandlers.on_publication` of *every* worker that called :meth:`Bus.watch` with a
pattern matching its topic (the publishing worker included, if it watches it). Per topic, the
bus delivers publications to each watching worker in offset order.

Offsets start at 1 in each epoch and grow by 1. The epoch is an opaque string that changes
whenever the topic's history is lost (an in-memory store restarted, an idle topic dropped):
a position ``(offset, epoch)`` from another epoch cannot be resumed.

Presence is kept per topic and client id (the token's ``sub``), counting connections: the
first connection of a client id to join a topic emits a ``join`` event to the topic's
watchers, the last one to leave emits ``leave``. Connections are named by
:class:`ConnKey` so that a bus can forget every connection of a dead worker at once. A bus
tracks whatever it is told to: the worker joins only topics that ``[presence] topics`` tracks,
so the others cost a bus nothing.

Implementations: :mod:`broker.bus.local` (one worker, in-process), :mod:`broker.bus.ipc`
(several workers on one machine, through the supervisor's hub), :mod:`broker.bus.sharded`
(several workers on one machine, each owning a share of the topics) and
:mod:`broker.bus.redis` (several machines).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

if TYPE_CHECKING:
    from broker.config import HistoryRule

__all__ = [
    "Bus",
    "BusHandlers",
    "ConnKey",
    "HistoryResult",
    "PresenceEvent",
    "Publication",
    "StreamPosition",
    "recovery",
]


@attrs.frozen
class StreamPosition:
    """A point in one topic's stream: the latest offset (0 when none yet) and the epoch."""

    offset: int
    epoch: str


@attrs.frozen
class Publication:
    """One publication as the bus stored and delivers it.

    ``data`` is the JSON text of the published value, encoded once by the publishing worker,
    so no one downstream parses or re-encodes it.
    """

    topic: str
    offset: int
    epoch: str
    sender: str | None
    data: str


@attrs.frozen
class HistoryResult:
    """What the bus still holds of a topic after a position.

    ``publications`` are in offset order. ``position`` is the topic's latest position.
    ``missed`` is ``(first, last)``, the inclusive range of offsets after ``since`` that are
    gone, or ``None`` when nothing after ``since`` was lost (``recovered``). When ``since``
    named another epoch, ``recovered`` is false and ``missed`` covers the offsets of the
    current epoch that are gone (``(1, 0)`` when none are). A read of the newest ``n`` asks
    only for those: ``missed`` then counts only what is gone of them (see :func:`recovery`).
    """

    publications: tuple[Publication, ...]
    position: StreamPosition
    recovered: bool
    missed: tuple[int, int] | None


def recovery(
    position: StreamPosition, first: int, since: StreamPosition | None, newest: int | None
) -> tuple[bool, tuple[int, int] | None]:
    """``(recovered, missed)`` of a read after ``since`` of a topic at ``position`` whose
    oldest held offset is ``first`` (``position.offset + 1`` when it holds nothing).

    The read asks for the offsets after ``since`` (after 0 when ``since`` names another
    epoch), or, when ``newest`` is given, only for the newest ``newest`` of those: what it
    skips by choice is not missed. ``missed`` names what it asked for and is gone; in the
    epoch case it is always given, as an empty range ``(start, start - 1)`` when nothing is.
    Shared by every bus, so that they all answer alike."""
    if since is None:
        return True, None
    same_epoch = since.epoch == position.epoch
    start = since.offset + 1 if same_epoch else 1
    if newest is not None:
        start = max(start, position.offset - newest + 1)
    if not same_epoch:
        return False, (start, max(start, first) - 1)
    if first > start:
        return False, (start, first - 1)
    return True, None


@attrs.frozen
class ConnKey:
    """Names one connection across the whole deployment, for presence."""

    node: str
    worker: int
    conn: int


@attrs.frozen
class PresenceEvent:
    """``kind`` is ``"join"`` or ``"leave"``; ``client`` is the client id (``sub``)."""

    topic: str
    kind: str
    client: str


@attrs.define
class BusHandlers:
    """The worker's callbacks. They are called from the worker's trio thread, must not block,
    and must not raise."""

    on_publication: Callable[[Publication], None]
    on_presence: Callable[[PresenceEvent], None]
    on_state: Callable[[bool], None] = lambda up: None


class Bus(abc.ABC):
    """The interface every bus implements. Every method may raise
    :class:`~broker.errors.BusUnavailable` when the bus is down."""

    handlers: BusHandlers

    @abc.abstractmethod
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the bus's background work (connections, readers, expiry) until cancelled.

        Calls ``task_status.started()`` once the bus can serve requests."""

    @property
    @abc.abstractmethod
    def is_up(self) -> bool:
        """Whether the bus is currently connected (always true for in-process buses)."""

    @abc.abstractmethod
    async def publish(self, topic: str, data: str, sender: str | None) -> Publication:
        """Assign the next offset of ``topic``, store the publication in history, deliver it to
        the watchers, and return it. ``data`` is the JSON text of the value. Raises
        :class:`~broker.errors.FrameError` (``too_many_topics``) when a new topic is refused."""

    def publish_now(self, topic: str, data: str, sender: str | None) -> Publication | None:
        """:meth:`publish` settled before it returns, when this bus can (the in-process bus
        without acknowledgements from disk): the publication, delivered here already. None
        when it cannot (then the caller uses :meth:`publish_nowait` or :meth:`publish`).
        Raises what :meth:`publish` raises."""
        return None

    def publish_nowait(
        self,
        topic: str,
        data: str,
        sender: str | None,
        done: Callable[[Publication | BaseException], None],
    ) -> bool:
        """Start :meth:`publish` without waiting and call ``done`` with the publication (or
        the exception) later, in order with the other publications of this worker. Returns
        False when this bus cannot (then the caller awaits :meth:`publish`)."""
        return False

    @abc.abstractmethod
    async def position(self, topic: str) -> StreamPosition:
        """The topic's latest position (offset 0 and the current epoch when it has none)."""

    @abc.abstractmethod
    async def history(
        self, topic: str, since: StreamPosition | None, limit: int | None, *, newest: bool = False
    ) -> HistoryResult:
        """The publications still held after ``since`` (all held ones when ``None``), oldest
        first; at most ``limit`` of them when ``limit`` is given: the oldest ones, or the
        newest ones when ``newest`` (then ``recovered`` and ``missed`` concern only those,
        see :func:`recovery`)."""

    @abc.abstractmethod
    async def watch(self, pattern: str) -> None:
        """Start delivering publications and presence events of topics matching ``pattern``
        (an exact topic or a wildcard pattern) to this worker. Calls are not counted: the
        worker calls it once per pattern, when its first subscriber arrives."""

    @abc.abstractmethod
    async def unwatch(self, pattern: str) -> None:
        """Stop what :meth:`watch` started; called when the pattern's last subscriber goes."""

    @abc.abstractmethod
    async def presence_join(self, topic: str, client: str, key: ConnKey) -> None:
        """Record that connection ``key`` of ``client`` is subscribed to ``topic``."""

    @abc.abstractmethod
    async def presence_leave(self, topic: str, client: str, key: ConnKey) -> None:
        """Undo :meth:`presence_join`; a no-op for an unknown key."""

    @abc.abstractmethod
    async def presence(self, topic: str) -> list[str]:
        """The distinct client ids present on ``topic``, sorted."""

    def presence_members(self) -> int:
        """How many (topic, client id) presence entries this process holds for the bus (0
        where they live elsewhere: the hub, Redis), for the metrics."""
        return 0

    def history_stats(self) -> dict[str, Any]:
        """The figures of the history this process holds (:meth:`broker.history.TopicStore.
        stats`), or an empty dict when it holds none (the hub or Redis holds it)."""
        return {}

    def reconfigure(self, history_rule: Callable[[str], HistoryRule]) -> None:  # noqa: B027
        """Apply reloaded ``[[history]]`` rules (to topics created from now on). Buses whose
        history lives elsewhere (the hub) ignore it."""
