"""Callbacks instead of iterators in the trio, asyncio and blocking clients, the mistake of
awaiting ``subscribe``, JSON hooks, the missing-token error, and a quiet ``client_sdk`` logger."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import decimal
import functools
import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

import client_sdk
import client_sdk.sync
from client_sdk import (
    AuthenticationFailed,
    EncodeError,
    Forbidden,
    Gap,
    Message,
    PresenceEvent,
    aio,
)
from tests.sdk.aioutil import data, proxy_in_thread, wait_for_state
from tests.support.broker import PRESENCE_EVERYWHERE, BrokerProcess


async def test_trio_callbacks_get_every_event_in_order(presence_broker: BrokerProcess) -> None:
    b = presence_broker
    messages: list[Message] = []
    presence: list[PresenceEvent] = []
    done = trio.Event()

    async def on_message(msg: Message) -> None:  # async callbacks are awaited in order
        await trio.sleep(0.01)
        messages.append(msg)
        if len(messages) == 5:
            done.set()

    async with (
        client_sdk.connect(b.url, token=b.token("alice")) as client,
        client.subscribe(
            "room", presence=True, on_message=on_message, on_presence=presence.append
        ) as sub,
    ):
        for i in range(5):
            await client.publish("room", i)
        with trio.fail_after(5):
            await done.wait()
        assert [m.data for m in messages] == [0, 1, 2, 3, 4]
        assert presence == [PresenceEvent("join", "room", "alice")]
        with pytest.raises(RuntimeError, match="callbacks"):
            await sub.get(1)


async def test_awaiting_subscribe_says_what_to_do_instead(broker: BrokerProcess) -> None:
    async with client_sdk.connect(broker.url, token=broker.token("alice")) as client:
        with pytest.raises(TypeError, match=r"async with client\.subscribe\(topic\) as sub"):
            await client.subscribe("t")  # type: ignore[misc]


def test_asyncio_callbacks_and_on_gap(tmp_path: Path) -> None:
    config = {"history": [{"pattern": ">", "size": 2, "ttl": 600}]}
    with BrokerProcess.start(tmp_path, config) as b, proxy_in_thread(b.port) as proxy:
        events: list[Any] = []

        async def main() -> None:
            got = asyncio.Event()

            def on_message(msg: Message) -> None:
                events.append(msg.data)
                if msg.data == 9:
                    got.set()

            async with (
                aio.connect(b.url, token=b.token("pub")) as publisher,
                aio.connect(
                    proxy.url, token=b.token("sub"), backoff_base=0.05, backoff_max=0.2
                ) as client,
                client.subscribe("t", on_message=on_message, on_gap=events.append),
            ):
                await publisher.publish("t", 1)
                proxy.block(True)
                proxy.cut()
                await wait_for_state(client, client_sdk.ConnectionState.RECONNECTING)
                for i in range(2, 10):
                    await publisher.publish("t", i)
                proxy.block(False)
                async with asyncio.timeout(10):
                    await got.wait()

        asyncio.run(main())
        gap = events[1]
        assert events[0] == 1 and isinstance(gap, Gap)
        assert (gap.from_offset, gap.to_offset) == (2, 7)
        assert events[2:] == [8, 9]


def test_a_blocking_program_publishes_and_receives_without_a_thread_of_its_own(
    broker: BrokerProcess,
) -> None:
    received: list[Any] = []
    errors: list[Exception] = []
    five = threading.Event()

    def on_message(msg: Message) -> None:
        received.append(msg.data)
        if len(received) == 5:
            five.set()

    with client_sdk.sync.connect(broker.url, token=broker.token("alice")) as client:
        with client.subscribe("jobs", on_message=on_message, on_error=errors.append) as sub:
            for i in range(5):
                client.publish("jobs", i)
            assert five.wait(5)
            with pytest.raises(RuntimeError, match="callbacks"):
                next(iter(sub))
        client.publish("jobs", "after close")
    assert received == [0, 1, 2, 3, 4] and errors == []


def test_a_refused_resubscription_reaches_on_error(tmp_path: Path) -> None:
    # The first token allows "secret"; the one used on reconnect does not.
    with BrokerProcess.start(tmp_path) as b, proxy_in_thread(b.port) as proxy:
        tokens = iter([b.token("a")] + [b.token("a", subscribe=["other"])] * 100)
        ended = threading.Event()
        errors: list[Exception] = []

        def on_error(exc: Exception) -> None:
            errors.append(exc)
            ended.set()

        with client_sdk.sync.connect(
            proxy.url, token=lambda: next(tokens), backoff_base=0.05, backoff_max=0.2
        ) as client:
            client.subscribe("secret", on_message=print, on_error=on_error)
            proxy.cut()
            assert ended.wait(10)
        assert len(errors) == 1 and isinstance(errors[0], Forbidden)


@dataclasses.dataclass
class Order:
    id: int
    at: datetime.datetime
    total: decimal.Decimal


async def test_json_hooks_encode_and_decode_application_types(broker: BrokerProcess) -> None:
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    async with (
        client_sdk.connect(
            broker.url,
            token=broker.token("alice"),
            dumps=functools.partial(json.dumps, default=client_sdk.json_default),
            loads=functools.partial(json.loads, parse_float=decimal.Decimal),
        ) as client,
        client.subscribe("orders") as sub,
    ):
        await client.publish("orders", Order(7, when, decimal.Decimal("9.5")))
        await client.publish("orders", {"price": 1.25})
        first, second = [await sub.get(5) for _ in range(2)]
        assert data([first]) == [{"id": 7, "at": "2026-01-02T03:04:05+00:00", "total": "9.5"}]
        assert data([second]) == [{"price": decimal.Decimal("1.25")}]


async def test_a_value_that_is_not_json_is_named(broker: BrokerProcess) -> None:
    async with client_sdk.connect(broker.url, token=broker.token("alice")) as client:
        with pytest.raises(EncodeError, match=r"data\['items'\]\[1\]\['at'\] = .* \(date\)"):
            await client.publish("t", {"items": [1, {"at": datetime.date(2026, 1, 2)}]})
        with pytest.raises(TypeError, match="dumps="):  # also a TypeError, as json raises
            await client.publish("t", {1, 2})


def test_no_token_fails_at_once_unless_anonymous(tmp_path: Path) -> None:
    async def main(url: str) -> None:
        # No broker listens on port 1: the error comes before any connection attempt.
        for connect in (client_sdk.connect, aio.connect):
            with pytest.raises(AuthenticationFailed, match="anonymous=True"):
                async with connect("ws://127.0.0.1:1/ws"):
                    pass
        async with aio.connect(url, anonymous=True) as client:
            assert client.client_id == "anonymous"

    with pytest.raises(AuthenticationFailed, match="no token"):
        client_sdk.sync.connect("ws://127.0.0.1:1/ws")
    with pytest.raises(AuthenticationFailed, match="no token"):  # e.g. an unset variable
        client_sdk.sync.connect("ws://127.0.0.1:1/ws", token="")
    with BrokerProcess.start(tmp_path, {"auth": {"allow_anonymous": True}}) as b:
        asyncio.run(main(b.url))
        with client_sdk.sync.connect(b.url, anonymous=True) as client:
            assert client.client_id == "anonymous"


async def test_the_sdk_is_quiet_about_what_the_application_receives(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("client_sdk").handlers)
    caplog.set_level(logging.DEBUG, logger="client_sdk")
    with BrokerProcess.start(tmp_path, {"server": {"shutdown_timeout": 1.0}}) as b:
        async with (
            client_sdk.connect(
                b.url, token=b.token("a", ttl=3), backoff_base=0.05, backoff_max=0.2
            ) as client,
            client.subscribe("t") as sub,
        ):
            await client.publish("t", 1)
            await trio.to_thread.run_sync(lambda: b.restart(kill=True))
            await client.publish("t", 2, timeout=15)
            events = [await sub.get(5) for _ in range(3)]
            assert isinstance(events[1], Gap)  # received: not logged as a warning
            with pytest.raises(AuthenticationFailed):  # the fixed token expires: received too
                with trio.fail_after(10):
                    while True:
                        await client.publish("t", 3)
                        await trio.sleep(0.2)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [], [r.getMessage() for r in loud]


def test_presence_callbacks_in_the_blocking_client(tmp_path: Path) -> None:
    with BrokerProcess.start(tmp_path, PRESENCE_EVERYWHERE) as b:
        joined = threading.Event()
        seen: list[PresenceEvent] = []

        def on_presence(event: PresenceEvent) -> None:
            seen.append(event)
            if event.client == "bob":
                joined.set()

        with (
            client_sdk.sync.connect(b.url, token=b.token("alice")) as alice,
            client_sdk.sync.connect(b.url, token=b.token("bob")) as bob,
        ):
            alice.subscribe("room", presence=True, on_presence=on_presence)
            bob.subscribe("room")
            assert joined.wait(5)
        assert [(e.kind, e.client) for e in seen[:2]] == [("join", "alice"), ("join", "bob")]
