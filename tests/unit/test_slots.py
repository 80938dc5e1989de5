"""Connection slots (broker.slots): the pending budget makes room by dropping the oldest, the
admitted and per-client budgets refuse, and every refusal is counted by reason."""

from __future__ import annotations

from broker.config import LimitsConfig
from broker.slots import CAPACITY, PENDING, PER_CLIENT, Slots


def slots(**limits: int) -> tuple[Slots, list[int]]:
    dropped: list[int] = []
    s = Slots(LimitsConfig(**limits))  # type: ignore[arg-type]
    return s, dropped


def test_a_full_pending_budget_drops_the_oldest_pending_connection() -> None:
    s, dropped = slots(max_pending_connections=3)
    for conn in range(1, 4):
        s.arrive(conn, lambda conn=conn: dropped.append(conn))  # type: ignore[misc]
    assert dropped == []
    s.arrive(4, lambda: dropped.append(4))
    assert dropped == [1]
    assert list(s.pending) == [2, 3, 4]
    assert s.refused == {PENDING: 1}
    s.leave(1)  # the dropped connection ending later changes nothing
    assert list(s.pending) == [2, 3, 4]


def test_admitted_connections_leave_the_pending_budget() -> None:
    s, dropped = slots(max_pending_connections=2)
    s.arrive(1, lambda: dropped.append(1))
    s.arrive(2, lambda: dropped.append(2))
    assert s.admit(1, "alice") is None
    s.arrive(3, lambda: dropped.append(3))  # room without dropping anyone
    assert dropped == [] and s.admitted == 1 and s.refused == {}


def test_waiting_for_auth_keeps_the_place_in_the_queue() -> None:
    s, dropped = slots(max_pending_connections=2)
    s.arrive(1, lambda: dropped.append(-1))
    s.arrive(2, lambda: dropped.append(-2))
    s.wait_for_auth(1, lambda: dropped.append(1))  # upgraded, now a session
    s.arrive(3, lambda: dropped.append(3))
    assert dropped == [1]
    s.wait_for_auth(1, lambda: dropped.append(100))  # already dropped: not pending again
    assert 1 not in s.pending


def test_max_connections_counts_admitted_connections_only() -> None:
    s, _ = slots(max_connections=2, max_pending_connections=10)
    for conn in range(1, 6):
        s.arrive(conn, lambda: None)
    assert not s.full()
    assert s.admit(1, "a") is None
    assert s.admit(2, "b") is None
    assert s.full()
    assert s.admit(3, "c") == CAPACITY
    assert 3 in s.pending  # refused: unchanged, the caller closes it
    s.release("a")
    assert not s.full()
    assert s.refused == {CAPACITY: 1}


def test_per_client_limit_and_release() -> None:
    s, _ = slots(max_connections_per_client=2)
    for conn in range(1, 6):
        s.arrive(conn, lambda: None)
    assert s.admit(1, "alice") is None
    assert s.admit(2, "alice") is None
    assert s.admit(3, "alice") == PER_CLIENT
    assert s.admit(4, "bob") is None
    assert s.admit(5, "anonymous", limited=False) is None
    s.release("alice")
    assert s.per_client["alice"] == 1
    s.release("alice")
    assert "alice" not in s.per_client  # nothing kept for clients that are gone
    assert s.refused == {PER_CLIENT: 1}


def test_the_anonymous_identity_has_no_per_client_limit() -> None:
    s, _ = slots(max_connections_per_client=1)
    for conn in range(3):
        s.arrive(conn, lambda: None)
        assert s.admit(conn, "anonymous", limited=False) is None
    assert s.per_client["anonymous"] == 3
