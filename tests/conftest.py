from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import BrokerProcess


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A real single-worker broker subprocess on a free loopback port."""
    with BrokerProcess.start(tmp_path) as b:
        yield b
