"""One worker's connection slots: who may hold a socket, and who makes room for whom.

Theory of operation
-------------------
A connection holds one of two kinds of slot, with separate budgets.

*Pending*, from the TCP accept until its client is known: the upgrade request is still being
read (however slowly its bytes come), answered, or the session waits for an in-band ``auth``
op. At most ``limits.max_pending_connections``. When a connection arrives and the budget is
full, the *oldest* pending connection is dropped to make room (its ``evict`` callback runs:
a half-read upgrade is cut, an unauthenticated session is closed with 1013, try again later).
Refusing the newcomer instead would let anyone who holds that many half-sent upgrades keep
every client with a token out; dropping the oldest means that to push out a client with a
token, which leaves the pending set within a round trip or two, an attacker would have to
open ``max_pending_connections`` connections within that round trip.

*Admitted*, once the client is authenticated (at the upgrade, or by its ``auth`` op): at most
``limits.max_connections`` (past it: HTTP 503 at the upgrade, ``unavailable`` and 1013
in-band), and at most ``limits.max_connections_per_client`` per client id (past it: close
4029). The anonymous identity has no per-client limit: every anonymous client shares it.

So a worker holds at most ``max_connections + max_pending_connections`` client sockets, and
pending connections can never take an admitted client's place. Refusals are counted by
reason for ``pubsub_connections_refused_total``. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable

from broker.config import LimitsConfig

__all__ = ["CAPACITY", "PENDING", "PER_CLIENT", "Slots"]

# Refusal reasons (the metric's label values).
PENDING = "pending"  # the oldest pending connection was dropped to make room
CAPACITY = "capacity"  # max_connections reached (or the worker is shutting down)
PER_CLIENT = "per_client"  # max_connections_per_client reached


class Slots:
    """The slots of one worker's connections, under ``limits`` (replace it on reload)."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits
        # conn id -> how to drop it; oldest first
        self.pending: OrderedDict[int, Callable[[], None]] = OrderedDict()
        self.admitted = 0
        self.per_client: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    def arrive(self, conn_id: int, evict: Callable[[], None]) -> None:
        """A connection was accepted: it is pending. If the pending budget is full, the oldest
        pending connection is dropped first (its ``evict`` is called, and it no longer holds
        a slot)."""
        while len(self.pending) >= self.limits.max_pending_connections:
            _, oldest = self.pending.popitem(last=False)
            self.refused[PENDING] += 1
            oldest()
        self.pending[conn_id] = evict

    def wait_for_auth(self, conn_id: int, evict: Callable[[], None]) -> None:
        """A pending connection was upgraded without a client: it stays pending (in its
        place in the queue), now dropped by ``evict``. No-op if it was dropped already."""
        if conn_id in self.pending:
            self.pending[conn_id] = evict

    def leave(self, conn_id: int) -> None:
        """A pending connection ended (or was dropped); no-op if it holds no pending slot."""
        self.pending.pop(conn_id, None)

    def full(self) -> bool:
        """Whether the admitted budget (``max_connections``) is used up."""
        return self.admitted >= self.limits.max_connections

    def refuse(self, reason: str) -> None:
        """Count a refusal decided elsewhere (the upgrade's 503)."""
        self.refused[reason] += 1

    def admit(self, conn_id: int, client: str, *, limited: bool = True) -> str | None:
        """Move a pending connection to an admitted slot for ``client``. Returns None, or
        why not (:data:`CAPACITY`, :data:`PER_CLIENT`; counted): then nothing changes and the
        caller closes it. ``limited=False`` (the anonymous identity) skips the per-client
        limit."""
        reason = None
        if self.full():
            reason = CAPACITY
        elif limited and self.per_client[client] >= self.limits.max_connections_per_client:
            reason = PER_CLIENT
        if reason is not None:
            self.refused[reason] += 1
            return reason
        self.pending.pop(conn_id, None)
        self.admitted += 1
        self.per_client[client] += 1
        return None

    def release(self, client: str) -> None:
        """An admitted connection of ``client`` ended."""
        self.admitted -= 1
        left = self.per_client[client] - 1
        if left > 0:
            self.per_client[client] = left
        else:
            del self.per_client[client]  # no entry kept for clients that are gone
