"""The asyncio client against the real broker subprocess: the same API and guarantees as the
trio client (recovery with ``since`` across a lost connection, exact gaps, a broker stopped and
SIGKILLed under it, token callables and refresh, presence, history, typed errors)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from client_sdk import (
    AuthenticationFailed,
    BadTopic,
    ConnectFailed,
    ConnectionState,
    Forbidden,
    Gap,
    GapError,
    Message,
    Position,
    PresenceEvent,
    PubSubError,
    TokenError,
    aio,
)
from tests.sdk.aioutil import data, proxy_in_thread, take, wait_for_state
from tests.sdk.test_examples import env_for, example
from tests.support.broker import PRESENCE_EVERYWHERE, BrokerProcess

FAST_SHUTDOWN = {"server": {"shutdown_timeout": 1.0}}


def test_publish_subscribe_presence_history_and_typed_errors(tmp_path: Path) -> None:
    with BrokerProcess.start(tmp_path, PRESENCE_EVERYWHERE) as b:

        async def token() -> str:  # an async token callable, as an asyncio app has
            return b.token("alice", publish=["chat.>"], subscribe=["chat.>"], presence=["chat.>"])

        async def main() -> None:
            async with (
                aio.connect(b.url, token=token) as alice,
                aio.connect(b.url, token=b.token("bob")) as bob,
                alice.subscribe("chat.room", presence=True) as sub,
            ):
                assert alice.state is ConnectionState.CONNECTED and alice.client_id == "alice"
                assert await sub.get(5) == PresenceEvent("join", "chat.room", "alice")
                assert [await alice.publish("chat.room", {"n": i}) for i in range(3)] == [1, 2, 3]
                got = await take(sub, 3)
                assert all(isinstance(m, Message) and m.sender == "alice" for m in got)
                assert data(got) == [{"n": 0}, {"n": 1}, {"n": 2}]
                assert sub.position == Position(3, got[0].epoch)  # type: ignore[union-attr]

                async with bob.subscribe("chat.room"):
                    joined = await sub.get(5)
                    assert joined == PresenceEvent("join", "chat.room", "bob")
                    assert await alice.presence("chat.room") == ("alice", "bob")
                history = await bob.history("chat.room", since=Position(1, None))
                assert [m.data for m in history.messages] == [{"n": 1}, {"n": 2}]
                assert history.recovered is True

                with pytest.raises(Forbidden):
                    await alice.publish("news", 1)
                with pytest.raises(BadTopic):
                    await alice.publish("chat..x", 1)

        asyncio.run(main())


def test_connect_failures_are_typed(broker: BrokerProcess) -> None:
    async def main() -> None:
        with pytest.raises(AuthenticationFailed):
            async with aio.connect(broker.url, token="not a jwt"):
                pass
        with pytest.raises(ConnectFailed):
            async with aio.connect("ws://127.0.0.1:1/ws", token="t", connect_timeout=2):
                pass
        with pytest.raises(ConnectFailed) as not_found:
            async with aio.connect(broker.url.replace("/ws", "/nope"), token="x"):
                pass
        assert not_found.value.status == 404

        def broken() -> str:
            raise RuntimeError("vault is down")

        with pytest.raises(TokenError):
            async with aio.connect(broker.url, token=broken):
                pass
        with pytest.raises(KeyError):  # the application's own errors come out unwrapped
            async with (
                aio.connect(broker.url, token=broker.token("a")) as client,
                client.subscribe("a.b"),
            ):
                raise KeyError("mine")

    asyncio.run(main())


def test_exact_recovery_and_exact_gaps_across_a_lost_connection(tmp_path: Path) -> None:
    """Within one epoch a reconnect resumes with ``since``: what the broker still holds is
    replayed with no gap and no duplicate; what it no longer holds is one exact gap."""
    config = {"history": [{"pattern": "small.>", "size": 3, "ttl": 600}]}
    with BrokerProcess.start(tmp_path, config) as b, proxy_in_thread(b.port) as proxy:

        async def main() -> None:
            async with (
                aio.connect(
                    proxy.url, token=b.token("alice"), backoff_base=0.05, backoff_max=0.2
                ) as client,
                aio.connect(b.url, token=b.token("pub")) as publisher,
                client.subscribe("orders") as orders,
                client.subscribe("small.t") as small,
            ):
                for i in range(1, 4):
                    await publisher.publish("orders", i)
                    await publisher.publish("small.t", i)
                assert data(await take(orders, 3)) == [1, 2, 3]
                assert data(await take(small, 3)) == [1, 2, 3]

                proxy.block(True)
                proxy.cut()
                await wait_for_state(client, ConnectionState.RECONNECTING)
                for i in range(4, 14):
                    await publisher.publish("orders", i)
                    await publisher.publish("small.t", i)
                proxy.block(False)
                await client.wait_connected(10)
                await publisher.publish("orders", 14)

                assert data(await take(orders, 11)) == list(range(4, 15))
                gap, *rest = await take(small, 4)
                # The broker holds 11..13 only: 4..10 are gone, and said so exactly.
                assert isinstance(gap, Gap) and gap.reason == "not_recovered"
                assert (gap.from_offset, gap.to_offset, gap.epoch_changed) == (4, 10, False)
                assert data(rest) == [11, 12, 13]
                with pytest.raises(PubSubError):
                    await orders.get(0.3)  # nothing more: no duplicate
                assert client.reconnects == 1

        asyncio.run(main())


@pytest.mark.parametrize("kill", [True, False], ids=["killed", "stopped"])
def test_broker_restart_mid_stream_reports_the_lost_epoch(tmp_path: Path, kill: bool) -> None:
    with BrokerProcess.start(tmp_path, FAST_SHUTDOWN) as b:

        async def main() -> None:
            async with (
                aio.connect(
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
                old_epoch = old[0].epoch  # type: ignore[union-attr]
                assert data(await take(strict, 1)) == ["b1"]

                began = time.monotonic()
                await asyncio.to_thread(b.restart, kill=kill)
                await client.wait_connected(15)
                assert time.monotonic() - began < 10
                assert await client.publish("chat.a", "after") == 1
                await client.publish("chat.b", "b-after")

                gap, after = await take(exact, 2)
                assert isinstance(gap, Gap) and gap.epoch_changed and gap.reason == "epoch_changed"
                assert gap.previous == Position(3, old_epoch)
                assert isinstance(after, Message) and after.offset == 1 and after.data == "after"
                assert gap.epoch == after.epoch != old_epoch

                seen = await take(pattern, 6)
                assert data(seen[:4]) == [1, 2, 3, "b1"]
                assert isinstance(seen[4], Gap) and seen[4].reason == "wildcard_reconnect"
                assert data(seen[5:]) == ["after"]

                with pytest.raises(GapError) as lost:
                    await strict.get(5)
                assert lost.value.gap.topic == "chat.b" and lost.value.gap.epoch_changed
                assert data(await take(strict, 1)) == ["b-after"]

        asyncio.run(main())


def test_two_workers_a_lost_connection_and_a_sigkill(tmp_path: Path) -> None:
    """With two workers the hub orders publications: clients on either worker see one
    stream, recover it exactly after a lost connection, and learn of the epoch a SIGKILL of
    the whole broker lost."""
    with (
        BrokerProcess.start(tmp_path, FAST_SHUTDOWN, workers=2) as b,
        proxy_in_thread(b.port) as proxy,
    ):

        async def main() -> None:
            opts: dict[str, Any] = {"backoff_base": 0.05, "backoff_max": 0.2}
            async with AsyncExitStack() as stack:
                # (the kernel spreads connections over the workers; 5 nearly always reach both)
                clients = [
                    await stack.enter_async_context(
                        aio.connect(b.url, token=b.token(f"c{i}"), **opts)
                    )
                    for i in range(5)
                ]
                cut = await stack.enter_async_context(
                    aio.connect(proxy.url, token=b.token("cut"), **opts)
                )
                subs = [await stack.enter_async_context(c.subscribe("room")) for c in clients]
                cut_sub = await stack.enter_async_context(cut.subscribe("room"))
                for i, c in enumerate(clients):
                    await c.publish("room", i)
                for sub in [*subs, cut_sub]:
                    assert data(await take(sub, 5)) == list(range(5))

                proxy.block(True)
                proxy.cut()
                await wait_for_state(cut, ConnectionState.RECONNECTING)
                for i, c in enumerate(clients):
                    await c.publish("room", 5 + i)
                proxy.block(False)
                await cut.wait_connected(10)
                assert data(await take(cut_sub, 5)) == list(range(5, 10))  # no gap

                await asyncio.to_thread(b.restart, kill=True)
                for c in [*clients, cut]:
                    await c.wait_connected(15)
                await clients[3].publish("room", "after")
                for sub in subs:
                    assert data(await take(sub, 5)) == list(range(5, 10))
                for sub in [*subs, cut_sub]:
                    gap, after = await take(sub, 2)
                    assert isinstance(gap, Gap) and gap.epoch_changed
                    assert gap.previous is not None and gap.previous.offset == 10
                    assert isinstance(after, Message) and after.data == "after"

        asyncio.run(main())


def test_token_is_refreshed_in_band_before_it_expires(broker: BrokerProcess) -> None:
    calls = 0

    def token() -> str:
        nonlocal calls
        calls += 1
        return broker.token("alice", ttl=3)

    async def main() -> None:
        async with aio.connect(broker.url, token=token) as client:
            first = client.welcome.expires_at  # type: ignore[union-attr]
            await asyncio.sleep(4)  # past the first token's expiry
            assert await client.publish("t", 1) == 1
            assert client.reconnects == 0 and calls >= 2
            assert client.welcome.expires_at > first  # type: ignore[union-attr, operator]

    asyncio.run(main())


def test_a_fixed_token_that_expires_stops_the_client(tmp_path: Path) -> None:
    with BrokerProcess.start(tmp_path, FAST_SHUTDOWN) as b:

        async def main() -> None:
            async with aio.connect(b.url, token=b.token("a", ttl=2)) as client:
                with pytest.raises(AuthenticationFailed):
                    async with asyncio.timeout(10):
                        await wait_for_state(client, ConnectionState.CLOSED)
                        await client.publish("t", 1)

        asyncio.run(main())


def test_a_silent_broker_is_detected_by_the_keepalive(tmp_path: Path) -> None:
    config = {"timeouts": {"ping_interval": 1, "idle_timeout": 10}}
    with BrokerProcess.start(tmp_path, config) as b:

        async def main() -> None:
            async with (
                aio.connect(b.url, token=b.token("a"), ping_timeout=0.5, backoff_max=0.2) as client,
                client.subscribe("t") as sub,
            ):
                os.killpg(b.pid, signal.SIGSTOP)
                try:
                    async with asyncio.timeout(5):
                        await wait_for_state(client, ConnectionState.RECONNECTING)
                finally:
                    os.killpg(b.pid, signal.SIGCONT)
                await client.wait_connected(10)
                await client.publish("t", "back")
                assert data(await take(sub, 1)) == ["back"]  # same epoch: nothing lost

        asyncio.run(main())


def test_the_reconnect_hint_of_a_1001_close_is_honoured(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="client_sdk")
    with BrokerProcess.start(tmp_path, FAST_SHUTDOWN) as b:

        async def main() -> None:
            async with aio.connect(b.url, token=b.token("alice")) as client:
                await asyncio.to_thread(b.restart)
                await client.wait_connected(10)

        asyncio.run(main())
    [line] = [r.getMessage() for r in caplog.records if "reconnect_after_ms" in r.getMessage()]
    match = re.search(r"reconnect_after_ms=(\d+)\); reconnecting in ([\d.]+)s", line)
    assert match is not None, line
    assert float(match.group(2)) >= int(match.group(1)) / 1000


def test_asyncio_example(presence_broker: BrokerProcess) -> None:
    done = example("asyncio_usage.py", [], env_for(presence_broker, "aio"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:4] == ["connected as aio", "#1: {'i': 0}", "#2: {'i': 1}", "#3: {'i': 2}"]
    assert lines[4] == "here now: ('aio',)"  # asked while it is subscribed
    assert lines[5:7] == ["callback #1: first", "callback #2: last"]
    assert lines[-1] == "history: [{'i': 0}, {'i': 1}, {'i': 2}]"


def test_without_websockets_the_import_error_says_how_to_install_it() -> None:
    hide = "import sys; sys.modules['websockets'] = None; import client_sdk.aio"
    done = subprocess.run(
        [sys.executable, "-c", hide], cwd=Path(__file__).parents[2], capture_output=True, text=True
    )
    assert done.returncode == 1
    # The project is installed from its repository: a name on a package index is no help.
    assert "pip install -e '.[aio]'" in done.stderr.splitlines()[-1]
