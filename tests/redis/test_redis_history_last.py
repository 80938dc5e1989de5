"""``history`` with ``last`` on the Redis bus: the bus agrees with the in-memory store, offset
by offset, for every position and count (the newest read is one XREVRANGE in the history
script); and a real broker on Redis answers ``last`` like one without it."""

from __future__ import annotations

from pathlib import Path

import trio

from broker.bus.base import StreamPosition
from broker.config import HistoryRule
from broker.history import TopicStore
from tests.http.brokerkit import request, ws_client
from tests.integration.test_history_budget import publish_all
from tests.support.broker import BrokerProcess

from .busutil import running_bus
from .conftest import RedisServer


async def test_the_redis_bus_selects_the_newest_like_the_store(redis_server: RedisServer) -> None:
    store = TopicStore(lambda t: HistoryRule(">", 4, 600.0), trio.current_time)
    async with running_bus(redis_server.url, size=4) as (bus, _):
        for i in range(1, 10):  # offsets 6..9 held
            await bus.publish("t.last", str(i), "x")
            store.publish("t.last", str(i), "x")
        epoch = (await bus.position("t.last")).epoch
        mine = store.position("t.last").epoch
        for n in (1, 2, 4, 5, 9, 1000):
            expected = store.history("t.last", None, n, newest=True)
            got = await bus.history("t.last", None, n, newest=True)
            assert [p.offset for p in got.publications] == [p.offset for p in expected.publications]
            assert [p.data for p in got.publications] == [p.data for p in expected.publications]
            assert (got.recovered, got.missed) == (True, None)
            for s in range(11):
                for e, e2 in ((epoch, mine), ("old", "old")):
                    want = store.history("t.last", StreamPosition(s, e2), n, newest=True)
                    got = await bus.history("t.last", StreamPosition(s, e), n, newest=True)
                    offsets = [p.offset for p in got.publications]
                    assert offsets == [p.offset for p in want.publications], (n, s, e)
                    assert (got.recovered, got.missed) == (want.recovered, want.missed), (n, s, e)
        oldest = await bus.history("t.last", StreamPosition(6, epoch), 2)
        assert [p.offset for p in oldest.publications] == [7, 8]  # limit still reads forward


def test_a_broker_on_redis_answers_last(tmp_path: Path, redis_server: RedisServer) -> None:
    config = {
        "bus": {"url": redis_server.url},
        "history": [{"pattern": ">", "size": 5, "ttl": 600}],
    }
    with BrokerProcess.start(tmp_path, config) as b, ws_client(b, "pub") as c:
        epoch = publish_all(c, [{"topic": "r", "data": i} for i in range(1, 9)])[0]["epoch"]
        latest = request(c, op="history", id=1, topic="r", last=2)
        assert [m["data"] for m in latest["messages"]] == [7, 8] and "recovered" not in latest
        lost = request(
            c, op="history", id=2, topic="r", last=6, since={"offset": 1, "epoch": epoch}
        )
        assert [m["offset"] for m in lost["messages"]] == [4, 5, 6, 7, 8]
        assert lost["recovered"] is False and lost["missed"] == {"from": 3, "to": 3}
