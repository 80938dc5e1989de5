"""The ``pubsub`` command driven as a subprocess, as a newcomer would use it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import client_sdk.sync
from tests.support.broker import PRESENCE_EVERYWHERE, BrokerProcess

ROOT = Path(__file__).resolve().parents[2]
PUBSUB = [sys.executable, "-m", "client_sdk.cli"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A broker that tracks presence: the tests see that the CLI subscribed through it."""
    with BrokerProcess.start(tmp_path, PRESENCE_EVERYWHERE) as b:
        yield b


def env_for(b: BrokerProcess, sub: str = "cli", **claims: Any) -> dict[str, str]:
    return {**os.environ, "PUBSUB_URL": b.url, "PUBSUB_TOKEN": b.token(sub, **claims)}


def run(
    args: list[str], env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        PUBSUB + args, env=env, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=30
    )


@contextmanager
def background(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        PUBSUB + args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def wait_subscribed(b: BrokerProcess, topic: str, who: str = "cli") -> None:
    """The CLI prints nothing until a message comes; its presence says it is subscribed."""
    with client_sdk.sync.connect(b.url, token=b.token("observer")) as c:
        deadline = time.monotonic() + 10
        while who not in c.presence(topic):
            assert time.monotonic() < deadline, f"{who} never subscribed to {topic}"
            time.sleep(0.05)


def lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines()]


def test_sub_prints_json_lines_for_pub_with_data_and_from_stdin(broker: BrokerProcess) -> None:
    env = env_for(broker)
    with background(["sub", "chat.a", "chat.*", "--count", "5"], env) as sub:
        wait_subscribed(broker, "chat.a")
        done = run(["pub", "chat.a", '{"text": "hi"}', "-v"], env_for(broker, "alice"))
        assert done.returncode == 0, done.stderr
        assert lines(done.stdout) == [{"topic": "chat.a", "offset": 1}]
        done = run(["pub", "chat.b"], env_for(broker, "bob"), stdin='plain words\n42\n\n"7"\n')
        assert (done.returncode, done.stdout) == (0, "")
        run(["pub", "chat.a", "last"], env)
        out, err = sub.communicate(timeout=10)
    assert sub.returncode == 0, err
    printed = lines(out)
    # chat.a matches both TOPIC arguments and is still printed once
    assert [(m["topic"], m["offset"], m["data"]) for m in printed] == [
        ("chat.a", 1, {"text": "hi"}),
        ("chat.b", 1, "plain words"),
        ("chat.b", 2, 42),
        ("chat.b", 3, "7"),
        ("chat.a", 2, "last"),
    ]
    assert printed[0]["from"] == "alice" and printed[1]["from"] == "bob"
    assert all(isinstance(m["epoch"], str) for m in printed)


def test_sub_since_history_and_presence(broker: BrokerProcess) -> None:
    env = env_for(broker)
    for i in range(1, 6):
        assert run(["pub", "log", str(i)], env).returncode == 0
    done = run(["sub", "log", "--since", "2", "--count", "3", "--data-only"], env)
    assert (done.returncode, done.stdout) == (0, "3\n4\n5\n"), done.stderr
    history = run(["history", "log", "--limit", "2"], env)
    assert history.returncode == 0
    assert [m["offset"] for m in lines(history.stdout)] == [1, 2]
    since = run(["history", "log", "--since", "3"], env)
    assert [m["data"] for m in lines(since.stdout)] == [4, 5]
    assert since.stderr == ""
    stale = run(["history", "log", "--since", "3:an-old-epoch"], env)
    assert [m["data"] for m in lines(stale.stdout)] == [1, 2, 3, 4, 5]
    [gap] = [json.loads(line)["gap"] for line in stale.stderr.splitlines()]
    assert gap["epoch_changed"] is True and gap["previous_offset"] == 3
    with background(["sub", "log", "l.>", "--presence"], env_for(broker, "watcher")) as watcher:
        wait_subscribed(broker, "log", "watcher")
        presence = run(["presence", "log"], env)
        assert (presence.returncode, presence.stdout) == (0, "watcher\n")
        watcher.send_signal(signal.SIGTERM)
        out, err = watcher.communicate(timeout=10)
        assert watcher.returncode == 0, "SIGTERM is how sub is stopped: exit 0"
        assert "exact topics only, not 'l.>'" in err
        assert lines(out)[0] == {"presence": "join", "topic": "log", "client": "watcher"}


def test_history_last_prints_the_newest(broker: BrokerProcess) -> None:
    env = env_for(broker)
    assert run(["pub", "log"], env, stdin="1\n2\n3\n4\n5\n").returncode == 0
    latest = run(["history", "log", "--last", "2"], env)
    assert (latest.returncode, [m["data"] for m in lines(latest.stdout)]) == (0, [4, 5])
    after = run(["history", "log", "--since", "1", "--last", "3"], env)
    assert [m["offset"] for m in lines(after.stdout)] == [3, 4, 5]
    assert after.stderr == ""  # offset 2 was skipped by choice, not lost
    both = run(["history", "log", "--last", "2", "--limit", "2"], env)
    assert both.returncode == 1 and "not allowed with" in both.stderr
    zero = run(["history", "log", "--last", "0"], env)
    assert zero.returncode == 3 and "'last' must be 1 to 1000" in zero.stderr


def test_sub_follows_a_broker_restart_and_reports_the_gap(tmp_path: Path) -> None:
    config = {"server": {"shutdown_timeout": 1.0}, **PRESENCE_EVERYWHERE}
    with BrokerProcess.start(tmp_path, config) as b:
        env = env_for(b)
        with background(["sub", "t", "--count", "2"], env) as sub:
            wait_subscribed(b, "t")
            run(["pub", "t", "before"], env)
            b.restart(kill=True)
            deadline = time.monotonic() + 15
            while True:  # publish until the reconnected sub has it (it may still be away)
                run(["pub", "t", "after"], env)
                try:
                    out, err = sub.communicate(timeout=1)
                    break
                except subprocess.TimeoutExpired:
                    assert time.monotonic() < deadline
        assert sub.returncode == 0, err
        assert [m["data"] for m in lines(out)] == ["before", "after"]
        assert "reconnecting" in err
        gap = [json.loads(line)["gap"] for line in err.splitlines() if line.startswith("{")]
        assert gap and gap[0]["topic"] == "t" and gap[0]["epoch_changed"] is True


def test_sub_retry_keeps_trying_while_the_broker_is_down(tmp_path: Path) -> None:
    with BrokerProcess.start(tmp_path, PRESENCE_EVERYWHERE) as b:
        env = env_for(b)
        b.stop()
        with background(["sub", "t", "--count", "1", "--retry"], env) as sub:
            time.sleep(1.5)  # a few attempts fail meanwhile
            assert sub.poll() is None, "sub --retry gave up while the broker was down"
            b._spawn(port=b.port)
            wait_subscribed(b, "t")
            run(["pub", "t", "up"], env)
            out, err = sub.communicate(timeout=15)
        assert sub.returncode == 0, err
        assert [m["data"] for m in lines(out)] == ["up"]
        assert "--retry" in err
        # Without --retry the same command gives up at once.
        b.stop()
        assert run(["sub", "t", "--count", "1"], env).returncode == 2


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ([], 1),
        (["sub"], 1),
        (["sub", "a.*", "--since", "3"], 1),
        (["sub", "a", "--since", "x"], 1),
        (["pub", "a", "1", "--bogus"], 1),
        (["pub", "not.allowed", "1"], 3),
        (["pub", "a.*", "1"], 3),
        (["presence", "a.*"], 3),
        (["presence", "a"], 3),  # the token's claim does not allow reading presence
        (["pub", "a", "1", "--token", "not-a-jwt"], 2),
        (["pub", "a", "1", "--url", "ws://127.0.0.1:9/ws"], 2),
    ],
)
def test_exit_codes(broker: BrokerProcess, args: list[str], code: int) -> None:
    env = env_for(broker, publish=["a", "a.>"], subscribe=[">"])
    done = run(args, env)
    assert done.returncode == code, done.stderr
    if code != 0:
        assert done.stderr.strip(), "a failure always says why on stderr"


def test_a_url_that_is_not_a_websocket_one_is_a_usage_error() -> None:
    # The operations listener's http:// address is the easy mistake; it used to end in a
    # traceback from inside the client (also exit code 1, hence the checks on stderr).
    for args, env in (
        (["pub", "a", "1", "--url", "http://127.0.0.1:8766/ws"], dict(os.environ)),
        (["pub", "a", "1"], {**os.environ, "PUBSUB_URL": "127.0.0.1:8765"}),
    ):
        done = run(args, env)
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        assert "not a ws:// or wss:// URL" in done.stderr
        assert "such as ws://127.0.0.1:8765/ws" in done.stderr


def test_help_shows_examples_and_exit_codes() -> None:
    done = run(["--help"], dict(os.environ))
    assert done.returncode == 0
    assert "examples:" in done.stdout and "exit codes:" in done.stdout
    assert "PUBSUB_URL" in done.stdout and "pubsub sub chat.room1" in done.stdout
    sub_help = run(["sub", "--help"], dict(os.environ))
    assert "--since" in sub_help.stdout and "--presence" in sub_help.stdout


def test_pub_from_stdin_slows_down_to_the_rate_limit(tmp_path: Path) -> None:
    config = {"limits": {"publish_rate": 20.0, "publish_burst": 2}}
    with BrokerProcess.start(tmp_path, config) as b:
        env = env_for(b)
        done = run(["pub", "burst", "-v"], env, stdin="".join(f"{i}\n" for i in range(12)))
        assert done.returncode == 0, done.stderr
        assert [m["offset"] for m in lines(done.stdout)] == list(range(1, 13))
        history = run(["history", "burst"], env)
        assert [m["data"] for m in lines(history.stdout)] == list(range(12))
