from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import native
from tests.support.broker import PRESENCE_EVERYWHERE, BrokerProcess


def pytest_report_header() -> str:
    """Which copy of the hot modules this run tests (broker/native.py)."""
    status = native.status
    return "broker hot modules: " + ("compiled" if status.compiled else f"pure ({status.reason})")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A real single-worker broker subprocess on a free loopback port."""
    with BrokerProcess.start(tmp_path) as b:
        yield b


@pytest.fixture
def presence_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """Like ``broker``, with presence tracked on every topic and readable by default."""
    with BrokerProcess.start(tmp_path, PRESENCE_EVERYWHERE) as b:
        yield b
