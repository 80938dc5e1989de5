from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.http.httpkit import Listener, running_listener


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    async with running_listener() as lst:
        yield lst
