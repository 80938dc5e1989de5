"""The runnable examples work as their docstrings say, against the real broker."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import client_sdk.sync
from tests.sdk.test_cli import broker, wait_subscribed
from tests.support.broker import BrokerProcess

# The examples are written for the development broker, which tracks presence everywhere; the
# tests see through presence that an example has subscribed.
__all__ = ["broker"]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def env_for(b: BrokerProcess, sub: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PUBSUB_URL": b.url,
        "PUBSUB_TOKEN": b.token(sub),
        "PUBSUB_BROKER_JWT_SECRET": b.secret,
    }


def example(
    name: str, args: list[str], env: dict[str, str], cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


@contextmanager
def running(
    name: str, args: list[str], env: dict[str, str], cwd: Path = ROOT
) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / name), *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def test_publish_and_subscribe_examples(broker: BrokerProcess) -> None:
    with running("subscribe.py", ["chat.room1"], env_for(broker, "reader")) as proc:
        wait_subscribed(broker, "chat.room1", "reader")
        done = example("publish.py", ["chat.room1", "hello", "again"], env_for(broker, "writer"))
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["chat.room1 #1: hello", "chat.room1 #2: again"]
        time.sleep(0.3)
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert "chat.room1: reader joins" in out
    assert "chat.room1 #1 from writer: {'text': 'hello'}" in out
    assert "chat.room1 #2 from writer: {'text': 'again'}" in out
    assert "-- connected" in err


def test_sync_example(broker: BrokerProcess) -> None:
    done = example("sync_usage.py", [], env_for(broker, "syncer"))
    assert done.returncode == 0, done.stderr
    assert "connected as syncer" in done.stdout
    assert "#5: {'i': 4}" in done.stdout and "here now: ('syncer',)" in done.stdout
    assert "callback #1: first\ncallback #2: last" in done.stdout


def test_examples_run_where_presence_is_off(tmp_path: Path) -> None:
    with BrokerProcess.start(tmp_path) as b:  # no topic tracks presence, nobody may read it
        done = example("sync_usage.py", [], env_for(b, "syncer"))
        assert done.returncode == 0, done.stderr
        assert "#5: {'i': 4}" in done.stdout
        assert "presence not available: forbidden: not allowed to read" in done.stdout
        with (
            running("subscribe.py", ["chat.room1"], env_for(b, "reader")) as proc,
            client_sdk.sync.connect(b.url, token=b.token("writer")) as writer,
        ):
            # Nothing says when it has subscribed (without presence): publish until the first
            # publication reaches it. Its first line is that message, or EOF if it failed.
            assert proc.stdout is not None
            stop = threading.Event()

            def publish() -> None:
                while not stop.wait(0.1):
                    writer.publish("chat.room1", "hello")

            publisher = threading.Thread(target=publish)
            publisher.start()
            try:
                first = proc.stdout.readline()
            finally:
                stop.set()
                publisher.join(10)
            proc.terminate()
            _, err = proc.communicate(timeout=10)
        assert first.startswith("chat.room1 #") and "from writer: 'hello'" in first, err


def test_token_refresh_example(broker: BrokerProcess) -> None:
    done = example("token_refresh.py", ["5"], env_for(broker, "unused"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("minting a new 5 s token") >= 2
    assert "reconnects: 0" in done.stdout


def test_resume_example_accounts_for_every_message(broker: BrokerProcess, tmp_path: Path) -> None:
    env = env_for(broker, "worker")

    def run_worker_while(action: Callable[[], None]) -> list[str]:
        with running("resume.py", ["orders"], env, cwd=tmp_path) as proc:
            wait_subscribed(broker, "orders", "worker")
            action()
            time.sleep(0.5)  # let it handle what the action caused
            proc.terminate()
            out, _ = proc.communicate(timeout=10)
        return out.splitlines()

    with client_sdk.sync.connect(broker.url, token=broker.token("producer")) as producer:
        first = run_worker_while(lambda: [producer.publish("orders", i) for i in (1, 2, 3)])
        for i in (4, 5):  # published while the worker is down
            producer.publish("orders", i)
        second = run_worker_while(lambda: None)
    assert first[0] == "starting orders from now"
    assert first[1:] == ["handled #1: 1", "handled #2: 2", "handled #3: 3"]
    assert second[0].startswith("resuming orders after Position(offset=3")
    assert second[1:] == ["handled #4: 4", "handled #5: 5"]
