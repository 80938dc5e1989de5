"""The open-file limit (broker.rlimit): raised to the hard limit, never failing, and logged
once with the room it leaves, as a warning when the connection limits do not fit."""

from __future__ import annotations

import resource

import pytest
import structlog.testing

from broker import rlimit


def fake_limits(
    monkeypatch: pytest.MonkeyPatch, soft: int, hard: int, *, refuse: bool = False
) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, hard))

    def setrlimit(which: int, limits: tuple[int, int]) -> None:
        if refuse:
            raise ValueError("not allowed")
        calls.append(limits)

    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    return calls


def test_the_soft_limit_is_raised_to_the_hard_one(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_limits(monkeypatch, 1024, 65536)
    assert rlimit.raise_file_limit() == rlimit.FileLimit(before=1024, soft=65536, hard=65536)
    assert calls == [(65536, 65536)]


def test_an_unlimited_hard_limit_means_the_kernels_ceiling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = fake_limits(monkeypatch, 1024, resource.RLIM_INFINITY)
    monkeypatch.setattr(rlimit, "_nr_open", lambda: 1 << 20)
    limit = rlimit.raise_file_limit()
    assert (limit.soft, limit.hard) == (1 << 20, -1)
    assert calls == [(1 << 20, resource.RLIM_INFINITY)]


def test_a_refusal_keeps_the_limit_it_had(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_limits(monkeypatch, 1024, 65536, refuse=True)
    assert rlimit.raise_file_limit().soft == 1024


def test_one_line_a_warning_when_the_limits_do_not_fit() -> None:
    small = rlimit.FileLimit(before=1024, soft=1024, hard=1024)
    with structlog.testing.capture_logs() as logs:
        rlimit.log_file_limit(small, needed=11000)
        rlimit.log_file_limit(rlimit.FileLimit(1024, 20000, 20000), needed=11000)
        rlimit.log_file_limit(small, needed=None)  # serves no clients: nothing to fit
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("open_files", "warning"),
        ("open_files", "info"),
        ("open_files", "info"),
    ]
    assert logs[0]["connections"] == 1024 - rlimit.RESERVED_FDS
    assert "limits.max_pending_connections" in logs[0]["problem"]
