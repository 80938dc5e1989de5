"""A large replay through the Redis bus (history read from Redis in pages): it reaches a
client that reads, whole, with the live publications made meanwhile after it in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_replay import CONFIG, replay_then_live
from tests.support.broker import BrokerProcess

from .conftest import RedisServer


@pytest.mark.parametrize("workers", [1, 2], ids=["1worker", "2workers"])
def test_a_large_replay_from_redis_reaches_a_reader_whole(
    tmp_path: Path, redis_server: RedisServer, workers: int
) -> None:
    config = {**CONFIG, "bus": {"url": redis_server.url}}
    with BrokerProcess.start(tmp_path, config, workers=workers) as b:
        replay_then_live(b)
