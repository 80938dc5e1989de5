"""The SDK on a `latest` topic against the real broker: a client that stopped reading is not
disconnected; when it reads again it gets a gap with reason "skipped", then the newest value."""

from __future__ import annotations

from pathlib import Path

import trio

import client_sdk
from client_sdk import Gap, Message
from tests.sdk.proxy import CuttableProxy
from tests.support.broker import BrokerProcess

CONFIG = {
    "limits": {"send_queue_max_bytes": 64 * 1024, "publish_rate": 10000.0, "publish_burst": 10000},
    "delivery": [{"pattern": "prices.>", "policy": "latest"}],
}


async def test_a_client_behind_on_a_latest_topic_sees_a_skipped_gap_then_the_newest(
    tmp_path: Path,
) -> None:
    last = 2000
    pad = "x" * 16_000  # 32 MB in all: past every socket buffer between broker and client
    with BrokerProcess.start(tmp_path, CONFIG) as b:
        proxy = CuttableProxy(b.port)
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            async with (
                client_sdk.connect(proxy.url, token=b.token("alice")) as client,
                client_sdk.connect(b.url, token=b.token("pub")) as publisher,
                client.subscribe("prices.eur") as sub,
            ):
                await publisher.publish("prices.eur", {"n": 1})
                first = await sub.get(5)
                assert isinstance(first, Message) and first.offset == 1
                proxy.pause()
                for n in range(2, last + 1):
                    await publisher.publish("prices.eur", {"n": n, "pad": pad})
                proxy.resume()
                events: list[Gap | Message] = []
                with trio.fail_after(60):
                    while not events or getattr(events[-1], "offset", 0) != last:
                        event = await sub.get()
                        assert isinstance(event, Gap | Message)
                        events.append(event)
                gaps = [e for e in events if isinstance(e, Gap)]
                assert gaps and all(g.reason == "skipped" for g in gaps)
                # Every offset is delivered or inside a reported range, in order, once.
                covered = [1]
                for e in events:
                    if isinstance(e, Gap):
                        assert e.from_offset is not None and e.to_offset is not None
                        covered.extend(range(e.from_offset, e.to_offset + 1))
                    else:
                        covered.append(e.offset)
                assert covered == list(range(1, last + 1))
                assert events[-1].data["n"] == last  # type: ignore[union-attr]
                assert client.reconnects == 0
                assert sub.position == events[-1].position  # type: ignore[union-attr]
            nursery.cancel_scope.cancel()
