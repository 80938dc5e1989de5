"""The async client recovering a history many times the broker's send queue: the paced replay
arrives whole, in order, with no gap, then the live publications."""

from __future__ import annotations

from pathlib import Path

import trio

import client_sdk
from client_sdk import Message, Position
from tests.integration.test_replay import CONFIG, DATA
from tests.support.broker import BrokerProcess


async def test_a_replay_six_times_the_send_queue_arrives_whole(tmp_path: Path) -> None:
    with BrokerProcess.start(tmp_path, CONFIG) as b:
        async with client_sdk.connect(b.url, token=b.token("writer")) as writer:
            for _ in range(100):  # 6 MB, the broker's send queue holds 1 MiB
                await writer.publish("big", DATA)
            epoch = (await writer.history("big", limit=1)).epoch
            async with (
                client_sdk.connect(b.url, token=b.token("reader")) as reader,
                reader.subscribe("big", since=Position(0, epoch)) as sub,
            ):
                for _ in range(5):
                    await writer.publish("big", DATA)
                with trio.fail_after(30):
                    events = [await sub.get() for _ in range(105)]
                assert all(isinstance(e, Message) and e.data == DATA for e in events)
                assert [e.offset for e in events if isinstance(e, Message)] == list(range(1, 106))
                assert sub.dropped == 0
        assert not b.events("slow_consumer")
