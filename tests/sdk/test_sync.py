"""The blocking client, used from plain threads against the real broker: same behaviour as the
async client, and it never leaves a thread behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import client_sdk.sync
from client_sdk import (
    AuthenticationFailed,
    BadTopic,
    ClientClosed,
    ConnectionState,
    Gap,
    Message,
    Position,
    RequestTimeout,
    SubscriptionClosed,
)
from tests.support.broker import BrokerProcess

ROOT = Path(__file__).resolve().parents[2]


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pubsub-client" and t.is_alive()]


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    before = set(client_threads())
    yield
    assert set(client_threads()) <= before


def test_publish_and_subscribe_from_plain_threads(presence_broker: BrokerProcess) -> None:
    broker = presence_broker
    with client_sdk.sync.connect(broker.url, token=broker.token("alice")) as client:
        assert client.state is ConnectionState.CONNECTED and client.client_id == "alice"
        received: list[Message] = []
        with client.subscribe("jobs", presence=True) as sub:

            def consume() -> None:
                for event in sub:
                    if isinstance(event, Message):
                        received.append(event)
                        if len(received) == 30:
                            return

            consumer = threading.Thread(target=consume)
            consumer.start()

            def produce(name: str) -> None:
                for i in range(10):
                    client.publish("jobs", {"by": name, "i": i})

            producers = [threading.Thread(target=produce, args=(f"p{n}",)) for n in range(3)]
            for t in producers:
                t.start()
            for t in producers:
                t.join(10)
            consumer.join(10)
            assert not consumer.is_alive()
            assert [m.offset for m in received] == list(range(1, 31))
            for name in ("p0", "p1", "p2"):  # each producer's order is kept
                mine = [m.data["i"] for m in received if m.data["by"] == name]
                assert mine == list(range(10))
            assert client.presence("jobs") == ("alice",)
            history = client.history("jobs", since=Position(28))
            assert [m.offset for m in history.messages] == [29, 30]
            assert sub.position == Position(30, received[0].epoch)
        with pytest.raises(BadTopic):  # typed errors cross the thread unchanged
            client.publish("$bad", 1)
    assert client.state is ConnectionState.CLOSED


def test_timeouts_and_closing_from_another_thread(broker: BrokerProcess) -> None:
    client = client_sdk.sync.connect(broker.url, token=broker.token("alice"))
    sub = client.subscribe("quiet")
    with pytest.raises(RequestTimeout):
        sub.get(timeout=0.2)
    done = threading.Event()

    def block_in_iteration() -> None:
        for _ in sub:
            pass
        done.set()

    waiter = threading.Thread(target=block_in_iteration)
    waiter.start()
    time.sleep(0.1)
    threading.Thread(target=client.close).start()
    waiter.join(5)
    assert done.is_set(), "closing the client ends iteration in other threads"
    client.close()  # idempotent, and waits for the client's thread
    with pytest.raises(ClientClosed):
        client.publish("quiet", 1)
    with pytest.raises(SubscriptionClosed):
        sub.get(0.1)


def test_a_refused_token_raises_and_leaves_no_thread(broker: BrokerProcess) -> None:
    with pytest.raises(AuthenticationFailed):
        client_sdk.sync.connect(broker.url, token="nope")


def test_survives_a_broker_restart(tmp_path: Path) -> None:
    with (
        BrokerProcess.start(tmp_path, {"server": {"shutdown_timeout": 1.0}}) as b,
        client_sdk.sync.connect(
            b.url, token=b.token("alice"), backoff_base=0.05, backoff_max=0.2
        ) as client,
        client.subscribe("t") as sub,
    ):
        client.publish("t", "before")
        assert isinstance(sub.get(5), Message)
        b.restart(kill=True)
        client.wait_connected(10)
        client.publish("t", "after")
        gap, after = sub.get(5), sub.get(5)
        assert isinstance(gap, Gap) and gap.epoch_changed
        assert isinstance(after, Message) and after.data == "after"
        assert client.reconnects >= 1


def test_a_forgotten_client_is_closed_at_exit(broker: BrokerProcess) -> None:
    script = textwrap.dedent(
        f"""
        import client_sdk.sync
        c = client_sdk.sync.connect({broker.url!r}, token={broker.token("forgetful")!r})
        c.publish("t", 1)
        print("published", flush=True)
        """
    )
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "published\n"
    assert time.monotonic() - began < 10
    closed = broker.wait_for("disconnect", client="forgetful")
    assert (closed["code"], closed["initiator"]) == (1000, "client")


def test_ctrl_c_in_a_blocking_loop_exits_at_once_and_closes(broker: BrokerProcess) -> None:
    script = textwrap.dedent(
        """
        import sys
        import client_sdk.sync
        with client_sdk.sync.connect(sys.argv[1], token=sys.argv[2]) as client:
            print("ready", flush=True)
            for event in client.subscribe("t"):
                pass
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, broker.url, broker.token("looper")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "KeyboardInterrupt" in err
    closed = broker.wait_for("disconnect", client="looper")
    assert (closed["code"], closed["initiator"]) == (1000, "client")
