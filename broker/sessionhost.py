"""What a session uses of the worker that runs it, and nothing more.

A :class:`~broker.session.Session` needs its worker's shared parts (configuration, token
verifier, router, bus, deadlines, connection slots) and reports to it (statistics, a slow
consumer). The worker creates sessions, so it imports :mod:`broker.session`; the session names
its worker only through :class:`SessionHost`, which :class:`~broker.worker.Worker` satisfies
structurally. The imports thus go one way (worker -> session and the layers it is built from,
:mod:`broker.connstate` last -> this module), and a session can be driven by any object with
these members.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from broker.auth import TokenVerifier
from broker.bus.base import Bus
from broker.config import Config
from broker.router import Router
from broker.slots import Slots
from broker.timers import Deadlines

__all__ = ["SessionHost"]

S_contra = TypeVar("S_contra", contravariant=True)


class SessionHost(Protocol[S_contra]):
    """The worker as its sessions see it; ``S_contra`` is the session type it closes (this
    module cannot name :class:`~broker.session.Session` without importing it back)."""

    node: str
    index: int
    config: Config
    verifier: TokenVerifier
    router: Router
    bus: Bus
    deadlines: Deadlines
    slots: Slots

    def slow_consumer(self, session: S_contra, reason: str) -> None:
        """Close ``session``, whose queue went over its limit, with 4008 (paced)."""

    def refusal(self, reason: str) -> tuple[int, str, str]:
        """The close code, error code and message of a refused admission."""

    def count_close(self, code: int) -> None: ...

    def count_auth_failure(self, reason: str) -> None: ...

    def count_error(self, code: str) -> None: ...

    def count_presence_refused(self, code: str) -> None: ...

    def count_read_refusal(self, op: str) -> None: ...

    def count_replay(self, outcome: str) -> None: ...

    def count_replay_refill(self) -> None: ...
