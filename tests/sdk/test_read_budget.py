"""The client against a broker whose read budget refuses part of a reconnect's recovery: a
re-subscription refused with rate_limited is asked again later, and nothing is lost."""

from __future__ import annotations

from pathlib import Path

import trio

import client_sdk
from client_sdk import ConnectionState, Message
from tests.sdk.proxy import CuttableProxy
from tests.support.broker import BrokerProcess
from tests.support.metrics import metric


async def test_a_resubscription_refused_by_the_read_budget_is_retried(tmp_path: Path) -> None:
    # Each replay below is about 12 KB: the first one overdraws the 2 KB burst, the second is
    # refused until the refill (20 KB/s) has paid the debt.
    limits = {"read_burst_bytes": 2000, "read_rate_bytes": 20000}
    with BrokerProcess.start(tmp_path, {"limits": limits}) as broker:
        proxy = CuttableProxy(broker.port)
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            async with (
                client_sdk.connect(
                    proxy.url, token=broker.token("alice"), backoff_base=0.05, backoff_max=0.2
                ) as client,
                client_sdk.connect(broker.url, token=broker.token("pub")) as publisher,
                client.subscribe("a") as sub_a,
                client.subscribe("b") as sub_b,
            ):
                proxy.blocked = True
                proxy.cut()
                with trio.fail_after(10):
                    async for state in client.states():
                        if state is ConnectionState.RECONNECTING:
                            break
                for i in range(20):
                    await publisher.publish("a", {"i": i, "pad": "x" * 500})
                    await publisher.publish("b", {"i": i, "pad": "x" * 500})
                proxy.blocked = False
                for sub in (sub_a, sub_b):
                    events = [await sub.get(10) for _ in range(20)]
                    assert all(isinstance(e, Message) for e in events), events
                    assert [e.data["i"] for e in events] == list(range(20))  # type: ignore[union-attr]
                assert metric(broker, "pubsub_read_refusals_total", op="subscribe") >= 1
            nursery.cancel_scope.cancel()
