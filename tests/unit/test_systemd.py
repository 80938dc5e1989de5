"""broker.systemd against the real kernel interfaces systemd uses.

Notifications go to a real Unix datagram socket named in NOTIFY_SOCKET, as systemd's own is;
socket activation is tested by starting a child the way systemd does: the listening socket as
fd 3, LISTEN_PID set to the child's own pid, and a connection that the child must accept.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest
import trio

from broker import systemd

REPO_ROOT = Path(__file__).resolve().parents[2]

ENV_VARS = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests may themselves run under systemd: never let them notify the real manager."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


class FakeManager:
    """The receiving end of NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def receive(self) -> dict[str, str]:
        """The next notification, as its assignments; fails if none was sent."""
        data = self.sock.recv(4096)
        lines = data.decode("utf-8").split("\n")
        return dict(line.split("=", 1) for line in lines)

    def pending(self) -> list[dict[str, str]]:
        """Every notification received so far and not yet read."""
        found: list[dict[str, str]] = []
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    data = self.sock.recv(4096)
                except BlockingIOError:
                    return found
                found.append(dict(line.split("=", 1) for line in data.decode().split("\n")))
        finally:
            self.sock.setblocking(True)


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeManager]:
    # A short directory: AF_UNIX paths are limited to 107 bytes, which pytest's tmp_path can
    # exceed for long test names.
    with (
        tempfile.TemporaryDirectory() as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        path = os.path.join(directory, "notify")
        sock.bind(path)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield FakeManager(sock)


def test_not_under_systemd_nothing_is_sent() -> None:
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False
    assert systemd.reloading() is False
    assert systemd.stopping() is False
    assert systemd.watchdog() is False
    assert systemd.status("x") is False


def test_ready(manager: FakeManager) -> None:
    assert systemd.ready() is True
    assert manager.receive() == {"READY": "1"}


def test_ready_with_status(manager: FakeManager) -> None:
    assert systemd.ready(status="serving on port 8765, 4 workers")
    assert manager.receive() == {"READY": "1", "STATUS": "serving on port 8765, 4 workers"}


def test_stopping(manager: FakeManager) -> None:
    assert systemd.stopping()
    assert manager.receive() == {"STOPPING": "1"}


def test_reloading_carries_monotonic_usec(manager: FakeManager) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = manager.receive()
    assert set(message) == {"RELOADING", "MONOTONIC_USEC"}
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= after


def test_watchdog(manager: FakeManager) -> None:
    assert systemd.watchdog()
    assert manager.receive() == {"WATCHDOG": "1"}


def test_status_keeps_to_one_line(manager: FakeManager) -> None:
    assert systemd.status("draining\n120 connections left")
    assert manager.receive() == {"STATUS": "draining 120 connections left"}


def test_extend_timeout(manager: FakeManager) -> None:
    assert systemd.extend_timeout(2.5)
    assert manager.receive() == {"EXTEND_TIMEOUT_USEC": "2500000"}


def test_raw_notify_sends_assignments_verbatim(manager: FakeManager) -> None:
    assert systemd.notify("READY=1\nMAINPID=42")
    assert manager.receive() == {"READY": "1", "MAINPID": "42"}


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"pubsub-broker-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", ["", "relative/path", "vsock:2:1234"])
def test_unsupported_notify_socket(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert systemd.notify("READY=1") is False


def test_unreachable_notify_socket_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory() as directory:
        monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(directory, "nobody-listens"))
        assert systemd.notify("READY=1") is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("1500000", "self", 1.5),
        ("30000000", "other", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        ("30000000", "garbage", None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    assert systemd.watchdog_interval() == expected


async def test_watchdog_loop_beats_at_half_the_interval_only_while_alive(
    manager: FakeManager, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    start = trio.current_time()
    beats: list[float] = []

    def is_alive() -> bool:
        elapsed = trio.current_time() - start
        alive = not 2.5 <= elapsed < 4.5  # a hang from 2.5 s to 4.5 s
        if alive:
            beats.append(elapsed)
        return alive

    with trio.move_on_after(6.5):
        await systemd.watchdog_loop(is_alive)
    assert beats == [0.0, 1.0, 2.0, 5.0, 6.0]
    assert manager.pending() == [{"WATCHDOG": "1"}] * len(beats)


async def test_watchdog_loop_explicit_interval(
    manager: FakeManager, autojump_clock: trio.abc.Clock
) -> None:
    with trio.move_on_after(1.1):
        await systemd.watchdog_loop(lambda: True, interval=1.0)
    assert len(manager.pending()) == 3  # at 0, 0.5 and 1.0 s


async def test_watchdog_loop_without_watchdog_returns_at_once(manager: FakeManager) -> None:
    with trio.fail_after(1):
        await systemd.watchdog_loop(lambda: True)
    assert manager.pending() == []


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"LISTEN_FDS": "1"},
        {"LISTEN_PID": "other", "LISTEN_FDS": "1"},
        {"LISTEN_PID": "self", "LISTEN_FDS": "0"},
        {"LISTEN_PID": "self", "LISTEN_FDS": "many"},
    ],
)
def test_listen_fds_when_not_for_us(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str]
) -> None:
    # None of these make listen_fds() touch a descriptor, so they can run in-process.
    pids = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}
    for name, value in environ.items():
        monkeypatch.setenv(name, pids.get(value, value))
    assert systemd.listen_fds() == []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        assert name not in os.environ


# The child: whatever it finds, it reports as one JSON line; for each socket it was given it
# accepts one connection and echoes what it receives.
CHILD = """
import json, os, socket, sys
from broker import systemd
found = systemd.listen_fds_with_names()
report = {
    "names": [name for name, _ in found],
    "fds": [sock.fileno() for _, sock in found],
    "inheritable": [os.get_inheritable(sock.fileno()) for _, sock in found],
    "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    "again": len(systemd.listen_fds()),
    "echoed": [],
}
for _, sock in found:
    sock.settimeout(10)
    conn, _ = sock.accept()
    with conn:
        data = conn.recv(100)
        conn.sendall(data)
        report["echoed"].append(data.decode())
print(json.dumps(report), flush=True)
"""


class ActivatedChild:
    def __init__(self, pid: int, stdout: TextIO) -> None:
        self.pid = pid
        self.stdout = stdout

    def report(self) -> dict[str, Any]:
        """Wait for the child to exit; what it found, as it printed it."""
        with self.stdout:
            output = self.stdout.read()
        _, wait_status = os.waitpid(self.pid, 0)
        assert os.waitstatus_to_exitcode(wait_status) == 0, output
        result: dict[str, Any] = json.loads(output)
        return result


def spawn_activated(
    listeners: list[socket.socket], *, names: str | None, listen_pid: str = "$$"
) -> ActivatedChild:
    """Start the child as systemd would: *listeners* as fds 3, 4, ..., LISTEN_PID its own pid.

    posix_spawn's dup2 file actions put each socket at its fixed number (clearing
    close-on-exec there), and `exec` keeps the shell's pid, so `$$` is the child's pid.
    """
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["LISTEN_FDS"] = str(len(listeners))
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    # Copies at 10 or above (lowest free, close-on-exec): a dup2 onto 3, 4, ... then can never
    # overwrite a socket that has yet to be moved, nor be a no-op that keeps close-on-exec.
    moved = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 10) for s in listeners]
    read_end, write_end = os.pipe()
    try:
        actions: list[tuple[int, int, int]] = [(os.POSIX_SPAWN_DUP2, write_end, 1)]
        actions += [
            (os.POSIX_SPAWN_DUP2, fd, systemd.SD_LISTEN_FDS_START + i) for i, fd in enumerate(moved)
        ]
        script = f'LISTEN_PID={listen_pid}; export LISTEN_PID; exec "$0" -c "$1"'
        pid = os.posix_spawn(
            "/bin/sh", ["sh", "-c", script, sys.executable, CHILD], env, file_actions=actions
        )
    finally:
        os.close(write_end)
        for fd in moved:
            os.close(fd)
    return ActivatedChild(pid, os.fdopen(read_end))


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def echo_through(port: int, text: str) -> str:
    # The connection waits in the backlog until the child accepts it.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(text.encode())
        return conn.recv(100).decode()


def test_listen_fds_accepts_on_the_passed_socket() -> None:
    with listening_socket() as listener:
        child = spawn_activated([listener], names="ws")
        assert echo_through(listener.getsockname()[1], "hello") == "hello"
        report = child.report()
    assert report == {
        "names": ["ws"],
        "fds": [3],
        "inheritable": [False],
        "env_left": [],
        "again": 0,
        "echoed": ["hello"],
    }


def test_listen_fds_several_sockets_and_missing_names() -> None:
    with listening_socket() as first, listening_socket() as second:
        child = spawn_activated([first, second], names="ws")
        assert echo_through(first.getsockname()[1], "one") == "one"
        assert echo_through(second.getsockname()[1], "two") == "two"
        report = child.report()
    assert report["names"] == ["ws", "unknown"]
    assert report["fds"] == [3, 4]
    assert report["echoed"] == ["one", "two"]


def test_listen_fds_meant_for_another_process() -> None:
    with listening_socket() as listener:
        child = spawn_activated([listener], names="ws", listen_pid="1")
        report = child.report()
    assert report["fds"] == []
    assert report["env_left"] == []
