from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import BrokerProcess


@pytest.fixture(params=[1, 2], ids=["1worker", "2workers"])
def workers(request: pytest.FixtureRequest) -> int:
    """Run a test against a one-process broker and against a supervisor with two workers."""
    return int(request.param)


@pytest.fixture
def any_broker(tmp_path: Path, workers: int) -> Iterator[BrokerProcess]:
    with BrokerProcess.start(tmp_path, workers=workers) as b:
        yield b
