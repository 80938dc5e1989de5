"""The async client against the real broker subprocess: the whole API, typed errors, recovery
across lost connections and broker restarts, token refresh, and fatal closes."""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

import client_sdk
from client_sdk import (
    AuthenticationFailed,
    BadRequest,
    BadTopic,
    ClientClosed,
    ConnectFailed,
    ConnectionState,
    Event,
    Forbidden,
    Gap,
    GapError,
    Message,
    NotTracked,
    PermissionRevoked,
    Position,
    PresenceEvent,
    PubSubError,
    RequestTimeout,
    ServerError,
    Subscription,
    SubscriptionClosed,
    TokenError,
    TooLarge,
)
from tests.sdk.proxy import CuttableProxy
from tests.support.broker import PRESENCE_EVERYWHERE, BrokerProcess

# Restarts in these tests must not wait for the default 10 s drain (and its 5 s hint spread).
FAST_SHUTDOWN = {"server": {"shutdown_timeout": 1.0}}


async def take(sub: Subscription, n: int, within: float = 5.0) -> list[Event]:
    return [await sub.get(within) for _ in range(n)]


async def wait_for_state(client: client_sdk.Client, state: ConnectionState) -> None:
    with trio.fail_after(10):
        async for s in client.states():
            if s is state:
                return


async def test_publish_and_subscribe(broker: BrokerProcess) -> None:
    async with client_sdk.connect(broker.url, token=broker.token("alice")) as client:
        assert client.state is ConnectionState.CONNECTED
        assert client.client_id == "alice"
        assert client.welcome is not None and client.welcome.expires_at is not None
        async with client.subscribe("chat.room1") as sub:
            offsets = [await client.publish("chat.room1", {"n": i}) for i in range(5)]
            assert offsets == [1, 2, 3, 4, 5]
            got = await take(sub, 5)
            assert all(isinstance(m, Message) for m in got)
            messages = [m for m in got if isinstance(m, Message)]
            assert [m.offset for m in messages] == offsets
            assert [m.data for m in messages] == [{"n": i} for i in range(5)]
            assert {(m.topic, m.sender, m.epoch) for m in messages} == {
                ("chat.room1", "alice", messages[0].epoch)
            }
            assert sub.position == Position(5, messages[0].epoch)
            assert sub.pending == 0


async def test_presence_history_and_presence_events(presence_broker: BrokerProcess) -> None:
    broker = presence_broker
    async with (
        client_sdk.connect(broker.url, token=broker.token("alice")) as alice,
        client_sdk.connect(broker.url, token=broker.token("bob")) as bob,
        alice.subscribe("room.1", presence=True) as watch,
    ):
        assert await take(watch, 1) == [PresenceEvent("join", "room.1", "alice")]
        async with bob.subscribe("room.1"):
            assert await take(watch, 1) == [PresenceEvent("join", "room.1", "bob")]
            assert await alice.presence("room.1") == ("alice", "bob")
            for text in ("a", "b", "c"):
                await bob.publish("room.1", text)
        events = await take(watch, 4)  # in wire order: the messages, then bob's leave
        assert [getattr(e, "data", None) for e in events[:3]] == ["a", "b", "c"]
        assert events[3] == PresenceEvent("leave", "room.1", "bob")
        history = await alice.history("room.1")
        assert [m.data for m in history.messages] == ["a", "b", "c"]
        assert history.offset == 3 and history.epoch == history.messages[0].epoch
        later = await alice.history("room.1", since=Position(1, history.epoch))
        assert [m.offset for m in later.messages] == [2, 3] and later.recovered is True
        # without an epoch, "since" means the topic's current epoch
        assert (await alice.history("room.1", since=Position(2))).messages[0].data == "c"
        assert await alice.presence("room.1") == ("alice",)


async def test_wildcard_subscriptions(broker: BrokerProcess) -> None:
    async with (
        client_sdk.connect(broker.url, token=broker.token("alice")) as client,
        client.subscribe("chat.*") as one_level,
        client.subscribe("news.>") as deep,
    ):
        for topic in ("chat.a", "chat.a.b", "news.x.y", "other", "chat.b", "news.z"):
            await client.publish(topic, topic)
        assert [getattr(e, "data", e) for e in await take(one_level, 2)] == ["chat.a", "chat.b"]
        assert [getattr(e, "data", e) for e in await take(deep, 2)] == ["news.x.y", "news.z"]
        assert one_level.position is None  # offsets are per exact topic
        with pytest.raises(PubSubError):  # nothing else arrived
            await one_level.get(0.2)


async def test_presence_refusals_are_typed(tmp_path: Path) -> None:
    with BrokerProcess.start(tmp_path, {"presence": {"topics": ["room.tracked"]}}) as b:
        reader_token = b.token("reader", subscribe=[">"], presence=[">"])
        async with (
            client_sdk.connect(b.url, token=b.token("plain")) as plain,
            client_sdk.connect(b.url, token=reader_token) as reader,
        ):
            with pytest.raises(Forbidden):
                await plain.presence("room.tracked")
            with pytest.raises(Forbidden):
                async with plain.subscribe("room.tracked", presence=True):
                    pass
            with pytest.raises(NotTracked) as info:
                await reader.presence("room.other")
            assert info.value.code == "not_tracked" and isinstance(info.value, ServerError)
            with pytest.raises(NotTracked):
                async with reader.subscribe("room.other", presence=True):
                    pass
            async with plain.subscribe("room.tracked"):  # allowed, and listed
                await plain.history("room.tracked")  # served after the join: frames in order
                assert await reader.presence("room.tracked") == ("plain",)


async def test_errors_are_typed(tmp_path: Path) -> None:
    config = {"limits": {"max_data_size": 100}}
    with BrokerProcess.start(tmp_path, config) as b:
        token = b.token("alice", publish=["chat.>"], subscribe=["chat.>"])
        async with client_sdk.connect(b.url, token=token) as client:
            with pytest.raises(Forbidden) as forbidden:
                await client.publish("news.x", 1)
            assert forbidden.value.code == "forbidden" and isinstance(forbidden.value, ServerError)
            with pytest.raises(BadTopic):
                await client.publish("chat.*", 1)
            with pytest.raises(BadTopic):
                await client.publish("bad topic", 1)
            with pytest.raises(TooLarge):
                await client.publish("chat.a", "x" * 200)
            # A frame over max_message_size: the broker closes with 1009 (TooLarge); but it
            # closes the socket with the rest of the frame unread, so the kernel's reset often
            # destroys the close frame and the client sees 1006 (outcome unknown).
            with pytest.raises((TooLarge, client_sdk.ConnectionLost)):
                await client.publish("chat.a", "x" * 70_000)
            await client.wait_connected(5)
            with pytest.raises(TypeError):
                await client.publish("chat.a", object())
            with pytest.raises(Forbidden):
                async with client.subscribe("news.x"):
                    pass
            with pytest.raises(BadRequest):
                async with client.subscribe("chat.*", presence=True):
                    pass
            async with client.subscribe("chat.a"):
                with pytest.raises(BadRequest):
                    async with client.subscribe("chat.a"):
                        pass
            # the failed attempts left nothing behind: the topic can be subscribed again
            async with client.subscribe("chat.a") as sub:
                await client.publish("chat.a", "ok")
                [event] = await take(sub, 1)
                assert isinstance(event, Message) and event.data == "ok"
            with pytest.raises(ServerError):
                await client.history("chat.*")
            with pytest.raises(BadRequest):
                async with client.subscribe("chat.*", since=Position(1, "e")):
                    pass
            for _ in range(3):  # a subscribe given up on leaves nothing behind either
                with pytest.raises(RequestTimeout):
                    async with client.subscribe("chat.slow", timeout=0):
                        pass
                with trio.move_on_after(0.05):
                    async with client.subscribe("chat.slow"):
                        await trio.sleep_forever()
            async with client.subscribe("chat.slow"):
                pass
            assert client.state is ConnectionState.CONNECTED


async def test_connect_failures_are_typed(broker: BrokerProcess) -> None:
    with pytest.raises(AuthenticationFailed):
        async with client_sdk.connect(broker.url, token="not-a-jwt"):
            pass
    expired = broker.token("alice", ttl=-10)
    with pytest.raises(AuthenticationFailed):
        async with client_sdk.connect(broker.url, token=expired):
            pass
    with pytest.raises(ConnectFailed) as not_found:
        async with client_sdk.connect(broker.url.replace("/ws", "/nope"), token="x"):
            pass
    assert not_found.value.status == 404

    def broken() -> str:
        raise RuntimeError("vault is down")

    with pytest.raises(TokenError):
        async with client_sdk.connect(broker.url, token=broken):
            pass
    dead = trio.socket.socket()
    await dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    with pytest.raises(ConnectFailed):
        async with client_sdk.connect(f"ws://127.0.0.1:{port}/ws", token="x"):
            pass


async def test_application_errors_pass_through_connect_unwrapped(broker: BrokerProcess) -> None:
    with pytest.raises(KeyError):
        async with (
            client_sdk.connect(broker.url, token=broker.token("alice")) as client,
            client.subscribe("a.b"),
        ):
            raise KeyError("mine")


async def test_exact_recovery_across_a_lost_connection(broker: BrokerProcess) -> None:
    """Within one epoch nothing is lost: what was published while the client was cut off is
    replayed, in order, then live publications continue, with no gap and no duplicate."""
    tokens: list[str] = []

    def token() -> str:  # a plain callable, called for every connection
        tokens.append(broker.token("alice"))
        return tokens[-1]

    proxy = CuttableProxy(broker.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        async with (
            client_sdk.connect(
                proxy.url, token=token, backoff_base=0.05, backoff_max=0.2
            ) as client,
            client_sdk.connect(broker.url, token=broker.token("pub")) as publisher,
            client.subscribe("orders") as sub,
        ):
            states: list[ConnectionState] = []

            async def watch() -> None:
                async for s in client.states():
                    states.append(s)

            nursery.start_soon(watch)
            for i in range(1, 6):
                await publisher.publish("orders", i)
            assert [getattr(e, "data", e) for e in await take(sub, 5)] == [1, 2, 3, 4, 5]

            proxy.blocked = True
            proxy.cut()
            await wait_for_state(client, ConnectionState.RECONNECTING)
            for i in range(6, 16):
                await publisher.publish("orders", i)
            proxy.blocked = False
            await client.wait_connected(10)
            for i in range(16, 21):
                await publisher.publish("orders", i)
            events = await take(sub, 15)
            assert [getattr(e, "data", e) for e in events] == list(range(6, 21))
            assert [m.offset for m in events if isinstance(m, Message)] == list(range(6, 21))
            with pytest.raises(PubSubError):
                await sub.get(0.3)  # and nothing more: no duplicate, no gap
            assert client.reconnects == 1 and len(tokens) >= 2  # called per connection attempt
            assert states[:3] == [
                ConnectionState.CONNECTED,
                ConnectionState.RECONNECTING,
                ConnectionState.CONNECTED,
            ]
        nursery.cancel_scope.cancel()


async def test_requests_in_flight_fail_and_later_ones_wait_for_the_reconnect(
    broker: BrokerProcess,
) -> None:
    proxy = CuttableProxy(broker.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        async with client_sdk.connect(
            proxy.url, token=broker.token("a"), backoff_base=0.05, backoff_max=0.2
        ) as c:
            proxy.blocked = True
            proxy.cut()
            await wait_for_state(c, ConnectionState.RECONNECTING)
            with pytest.raises(client_sdk.RequestTimeout):
                await c.publish("t", 1, timeout=0.3)

            async def unblock() -> None:
                await trio.sleep(0.3)
                proxy.blocked = False

            nursery.start_soon(unblock)
            assert await c.publish("t", 2, timeout=10) == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("kill", [True, False], ids=["killed", "stopped"])
async def test_broker_restart_mid_stream_reports_the_lost_epoch(tmp_path: Path, kill: bool) -> None:
    """The broker's history is in memory: a restart changes the epoch, so whatever was
    published after the client's last message in the old epoch is unknowable and reported."""
    with BrokerProcess.start(tmp_path, FAST_SHUTDOWN) as b:
        async with (
            client_sdk.connect(
                b.url, token=b.token("alice"), backoff_base=0.05, backoff_max=0.2
            ) as client,
            client.subscribe("chat.a") as exact,
            client.subscribe("chat.*") as pattern,
            client.subscribe("chat.b", strict=True) as strict,
        ):
            for i in (1, 2, 3):
                await client.publish("chat.a", i)
            await client.publish("chat.b", "b1")
            old = await take(exact, 3)
            assert [getattr(e, "data", e) for e in old] == [1, 2, 3]
            old_epoch = old[0].epoch  # type: ignore[union-attr]
            assert [getattr(e, "data", e) for e in await take(strict, 1)] == ["b1"]

            began = time.monotonic()
            await trio.to_thread.run_sync(lambda: b.restart(kill=kill))
            await client.wait_connected(15)
            assert time.monotonic() - began < 10
            assert await client.publish("chat.a", "after") == 1
            await client.publish("chat.b", "b-after")

            gap, after = await take(exact, 2)
            assert isinstance(gap, Gap) and gap.epoch_changed and gap.topic == "chat.a"
            assert gap.previous == Position(3, old_epoch) and gap.reason == "epoch_changed"
            assert isinstance(after, Message) and after.data == "after" and after.offset == 1
            assert after.epoch != old_epoch and gap.epoch == after.epoch
            assert exact.position == Position(1, after.epoch)

            seen = [e for e in await take(pattern, 6)]
            assert [getattr(e, "data", None) for e in seen[:4]] == [1, 2, 3, "b1"]
            assert isinstance(seen[4], Gap) and seen[4].reason == "wildcard_reconnect"
            assert [getattr(e, "data", None) for e in seen[5:]] == ["after"]

            with pytest.raises(GapError) as lost:
                await strict.get(5)
            assert lost.value.gap.epoch_changed and lost.value.gap.topic == "chat.b"
            assert [getattr(e, "data", e) for e in await take(strict, 1)] == ["b-after"]


async def test_token_is_refreshed_before_it_expires(broker: BrokerProcess) -> None:
    calls = 0

    async def token() -> str:  # an async callable
        nonlocal calls
        calls += 1
        return broker.token("alice", ttl=3)

    async with (
        client_sdk.connect(broker.url, token=token) as client,
        client.subscribe("t") as sub,
    ):
        first_expiry = client.welcome.expires_at  # type: ignore[union-attr]
        await trio.sleep(5)
        assert calls >= 3, "refreshed about every 2 s"
        assert client.reconnects == 0 and client.state is ConnectionState.CONNECTED
        assert client.welcome.expires_at > first_expiry  # type: ignore[union-attr, operator]
        await client.publish("t", "still here")
        [event] = await take(sub, 1)
        assert isinstance(event, Message) and event.data == "still here"


async def test_a_fixed_token_that_expires_stops_the_client(broker: BrokerProcess) -> None:
    """4003 means "refresh, then reconnect"; a fixed string cannot be refreshed, so the
    reconnect is refused with 401 and the client stops with AuthenticationFailed."""
    async with client_sdk.connect(broker.url, token=broker.token("alice", ttl=2)) as client:
        async with client.subscribe("t") as sub:
            with trio.fail_after(10), pytest.raises(AuthenticationFailed):
                async for _ in sub:
                    pass
        assert client.state is ConnectionState.CLOSED
        with pytest.raises(AuthenticationFailed):
            await client.publish("t", 1)


async def test_revoked_permissions_stop_the_client(broker: BrokerProcess) -> None:
    tokens = iter(
        [
            broker.token("alice", subscribe=["secret.>"], ttl=2),
            broker.token("alice", subscribe=["public.>"]),
        ]
    )
    async with client_sdk.connect(broker.url, token=lambda: next(tokens)) as client:
        async with client.subscribe("secret.x") as sub:
            with trio.fail_after(10), pytest.raises(PermissionRevoked) as revoked:
                await sub.get()
            assert revoked.value.code == 1008
        assert client.state is ConnectionState.CLOSED


async def test_a_slow_application_sees_an_overflow_gap(broker: BrokerProcess) -> None:
    async with (
        client_sdk.connect(broker.url, token=broker.token("alice"), max_buffer=3) as client,
        client.subscribe("fast") as sub,
    ):
        for i in range(1, 11):
            await client.publish("fast", i)  # replies still arrive although sub is full
        events = await take(sub, 4)
        assert [getattr(e, "data", None) for e in events[:3]] == [1, 2, 3]
        gap = events[3]
        assert isinstance(gap, Gap) and gap.reason == "overflow"
        assert (gap.from_offset, gap.to_offset, gap.count) == (4, 10, 7)
        assert sub.dropped == 7


async def test_resume_from_a_persisted_position(broker: BrokerProcess) -> None:
    async with client_sdk.connect(broker.url, token=broker.token("alice")) as client:
        for i in range(1, 6):
            await client.publish("log", i)
        epoch = (await client.history("log", limit=1)).epoch
        async with client.subscribe("log", since=Position(2, epoch)) as sub:
            assert [getattr(e, "data", e) for e in await take(sub, 3)] == [3, 4, 5]
            await client.publish("log", 6)
            assert [getattr(e, "data", e) for e in await take(sub, 1)] == [6]
        async with client.subscribe("log", since=Position(4)) as sub:  # current epoch
            assert [getattr(e, "data", e) for e in await take(sub, 2)] == [5, 6]
        async with client.subscribe("log", since=Position(4, "gone")) as sub:
            events = await take(sub, 7)
            assert isinstance(events[0], Gap) and events[0].epoch_changed
            assert [getattr(e, "data", e) for e in events[1:]] == [1, 2, 3, 4, 5, 6]


async def test_closing_ends_subscriptions_and_later_calls_fail(broker: BrokerProcess) -> None:
    ended = trio.Event()
    states: list[ConnectionState] = []
    async with trio.open_nursery() as nursery:
        async with client_sdk.connect(
            broker.url, token=broker.token("alice"), on_state_change=states.append
        ) as client:
            sub = await client.subscribe("t").__aenter__()

            async def consume() -> None:
                async for _ in sub:
                    pass
                ended.set()

            nursery.start_soon(consume)
            await trio.sleep(0.1)
            began = time.monotonic()
        assert time.monotonic() - began < 1.0, "the close handshake does not wait for a timeout"
        with trio.fail_after(5):
            await ended.wait()
    closed = await trio.to_thread.run_sync(lambda: broker.wait_for("disconnect", client="alice"))
    assert (closed["code"], closed["initiator"]) == (1000, "client")
    assert client.state is ConnectionState.CLOSED and states == [
        ConnectionState.CONNECTED,
        ConnectionState.CLOSED,
    ]
    with pytest.raises(ClientClosed):
        await client.publish("t", 1)
    with pytest.raises(SubscriptionClosed):
        await sub.get(1)


async def test_retry_first_connect_waits_for_the_broker(tmp_path: Path) -> None:
    with BrokerProcess.start(tmp_path) as b:
        url, token = b.url, b.token("alice")
        b.stop()

        async def start_later() -> None:
            await trio.sleep(0.5)
            await trio.to_thread.run_sync(lambda: b._spawn(port=b.port))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(start_later)
            with trio.fail_after(15):
                async with client_sdk.connect(
                    url, token=token, retry_first_connect=True, backoff_base=0.05, backoff_max=0.2
                ) as client:
                    assert await client.publish("t", 1) == 1


async def test_a_silent_broker_is_detected_by_the_keepalive(tmp_path: Path) -> None:
    """TCP alone would notice a frozen broker only after minutes: the client pings when
    nothing arrived for the broker's ping interval and reconnects when no reply comes."""
    config = {"timeouts": {"ping_interval": 1, "idle_timeout": 10}}
    with BrokerProcess.start(tmp_path, config) as b:
        async with (
            client_sdk.connect(
                b.url, token=b.token("alice"), ping_timeout=0.5, backoff_max=0.2
            ) as client,
            client.subscribe("t") as sub,
        ):
            assert client.welcome is not None and client.welcome.ping_interval == 1
            os.killpg(b.pid, signal.SIGSTOP)
            try:
                with trio.fail_after(5):
                    await wait_for_state(client, ConnectionState.RECONNECTING)
            finally:
                os.killpg(b.pid, signal.SIGCONT)
            await client.wait_connected(10)
            await client.publish("t", "back")
            [event] = await take(sub, 1)  # same epoch: nothing to report, nothing lost
            assert isinstance(event, Message) and event.data == "back"


async def test_the_reconnect_hint_of_a_1001_close_is_honoured(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="client_sdk")
    with BrokerProcess.start(tmp_path, FAST_SHUTDOWN) as b:
        async with client_sdk.connect(b.url, token=b.token("alice")) as client:
            await trio.to_thread.run_sync(b.restart)
            await client.wait_connected(10)
    [line] = [r.getMessage() for r in caplog.records if "reconnect_after_ms" in r.getMessage()]
    match = re.search(r"reconnect_after_ms=(\d+)\); reconnecting in ([\d.]+)s", line)
    assert match is not None, line
    assert float(match.group(2)) >= int(match.group(1)) / 1000


async def test_an_expired_token_is_replaced_on_reconnect(broker: BrokerProcess) -> None:
    """4003: the token expired because refreshing failed (here the refresh is refused); the
    client fetches a fresh token, reconnects at once and recovers what it missed."""
    first_connection = True
    states: list[ConnectionState] = []

    def token() -> str:
        if first_connection and states[-1:] == [ConnectionState.CONNECTED]:
            return broker.token("mallory")  # a refresh naming someone else is refused
        return broker.token("alice", ttl=2)

    async with client_sdk.connect(broker.url, token=token, on_state_change=states.append) as client:
        async with client.subscribe("t") as sub:
            await client.publish("t", 1)
            with trio.fail_after(10):
                await wait_for_state(client, ConnectionState.RECONNECTING)
            first_connection = False
            await client.wait_connected(5)
            await client.publish("t", 2)
            assert [getattr(e, "data", e) for e in await take(sub, 2)] == [1, 2]
        assert client.reconnects == 1 and client.client_id == "alice"


async def test_every_acknowledged_publication_is_delivered_or_reported(tmp_path: Path) -> None:
    """A publisher and a subscriber run through a broker kill: every publication the broker
    acknowledged reaches the subscriber exactly once, in order, or is named by a gap."""
    config = {**FAST_SHUTDOWN, "limits": {"publish_rate": 10000.0, "publish_burst": 10000}}
    with BrokerProcess.start(tmp_path, config) as b:
        acked: list[tuple[int, bool]] = []  # (value, acknowledged after the restart)
        restarted = False
        received: list[Message] = []
        gaps: list[Gap] = []
        opts: dict[str, Any] = {"backoff_base": 0.05, "backoff_max": 0.2}
        async with (
            client_sdk.connect(b.url, token=b.token("pub"), **opts) as publisher,
            client_sdk.connect(b.url, token=b.token("sub"), **opts) as subscriber,
            subscriber.subscribe("ledger") as sub,
            trio.open_nursery() as nursery,
        ):
            stop = trio.Event()

            async def publish() -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    try:
                        await publisher.publish("ledger", n, timeout=5)
                    except (client_sdk.ConnectionLost, client_sdk.RequestTimeout):
                        continue  # outcome unknown: not counted either way
                    acked.append((n, restarted))
                    await trio.sleep(0.002)

            async def consume() -> None:
                async for event in sub:
                    if isinstance(event, Message):
                        received.append(event)
                    elif isinstance(event, Gap):
                        gaps.append(event)

            nursery.start_soon(publish)
            nursery.start_soon(consume)
            await trio.sleep(0.5)
            await trio.to_thread.run_sync(lambda: b.restart(kill=True))
            restarted = True
            await trio.sleep(0.5)
            stop.set()
            await trio.sleep(0.5)  # let the last ones arrive
            nursery.cancel_scope.cancel()

        history_epochs = {m.epoch for m in received}
        assert len(history_epochs) == 2, "the subscriber saw both epochs"
        # exactly once, in order within each epoch
        keys = [(m.epoch, m.offset) for m in received]
        assert len(keys) == len(set(keys))
        for epoch in history_epochs:
            offsets = [m.offset for m in received if m.epoch == epoch]
            assert offsets == sorted(offsets)
        # every acknowledged value was delivered, or falls under a reported gap
        delivered = {m.data for m in received}
        missing = [(n, after) for n, after in acked if n not in delivered]
        assert len(gaps) == 1 and gaps[0].epoch_changed
        last_old = gaps[0].previous
        assert last_old is not None
        old_epoch_values = [m.data for m in received if m.epoch == last_old.epoch]
        # only the old epoch's tail can be lost, and the gap says it may be
        assert all(not after and n > max(old_epoch_values) for n, after in missing), missing
        assert sum(after for _, after in acked) > 20 and len(acked) > 50


async def test_subscriptions_made_while_reconnecting_are_made_once(broker: BrokerProcess) -> None:
    proxy = CuttableProxy(broker.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        async with (
            client_sdk.connect(
                proxy.url, token=broker.token("a"), backoff_base=0.01, backoff_max=0.05
            ) as client,
            AsyncExitStack() as stack,
        ):
            for i in range(5):  # existing ones, re-made while the new ones arrive
                await stack.enter_async_context(client.subscribe(f"old.{i}"))
            proxy.blocked = True
            proxy.cut()
            await wait_for_state(client, ConnectionState.RECONNECTING)
            subs: dict[int, Subscription] = {}

            async def join(i: int) -> None:
                await trio.sleep(i * 0.004)
                subs[i] = await stack.enter_async_context(client.subscribe(f"new.{i}"))

            async with trio.open_nursery() as joining:
                for i in range(30):
                    joining.start_soon(join, i)
                await trio.sleep(0.03)
                proxy.blocked = False
            for i, sub in subs.items():
                await client.publish(f"new.{i}", i)
                assert [getattr(e, "data", e) for e in await take(sub, 1)] == [i]
        nursery.cancel_scope.cancel()


async def test_two_workers_and_a_restart(tmp_path: Path) -> None:
    """With several workers the hub orders publications; clients on any worker see one
    stream, and recover it across a restart of the whole broker."""
    config = {**FAST_SHUTDOWN, **PRESENCE_EVERYWHERE}
    with BrokerProcess.start(tmp_path, config, workers=2) as b:
        opts: dict[str, Any] = {"backoff_base": 0.05, "backoff_max": 0.2}
        async with AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    client_sdk.connect(b.url, token=b.token(f"c{i}"), **opts)
                )
                for i in range(6)
            ]
            # (the kernel spreads connections over the workers; 6 nearly always reach both)
            subs = [await stack.enter_async_context(c.subscribe("room")) for c in clients]
            assert await clients[0].presence("room") == tuple(f"c{i}" for i in range(6))
            for i, c in enumerate(clients):
                await c.publish("room", i)
            for sub in subs:
                assert [getattr(e, "data", e) for e in await take(sub, 6)] == list(range(6))
            await trio.to_thread.run_sync(b.restart)
            for c in clients:
                await c.wait_connected(10)
            await clients[3].publish("room", "after")
            for sub in subs:
                gap, after = await take(sub, 2)
                assert isinstance(gap, Gap) and gap.epoch_changed
                assert isinstance(after, Message) and after.data == "after"


async def test_a_client_id_over_its_connection_limit_backs_off_then_gets_in(
    tmp_path: Path,
) -> None:
    """Close 4029 before the welcome (too many connections for this client id) is retried
    with the exponential backoff, not in a hot loop, and succeeds once a slot is free."""
    config = {"limits": {"max_connections_per_client": 1}}
    with BrokerProcess.start(tmp_path, config) as b:
        token = b.token("alice")
        release = trio.Event()

        async def holder(task_status: trio.TaskStatus[None]) -> None:
            async with client_sdk.connect(b.url, token=token):
                task_status.started()
                await release.wait()

        async def second() -> None:
            async with client_sdk.connect(
                b.url, token=token, retry_first_connect=True, backoff_base=0.05, backoff_max=0.5
            ) as client:
                assert await client.publish("t", 1) == 1

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(holder)
                nursery.start_soon(second)
                await trio.sleep(3)
                refused = len(b.events("refused"))
                # A hot loop would be hundreds of attempts in 3 s; the backoff (up to 0.5 s,
                # full jitter) allows a dozen or so.
                assert 2 <= refused <= 40, refused
                release.set()  # a slot frees: the second client gets in and publishes
