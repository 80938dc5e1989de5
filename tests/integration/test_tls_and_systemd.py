"""TLS on the client listener, and the broker under systemd's protocols: readiness, reload
and stopping notifications on a fake NOTIFY_SOCKET, and socket activation with LISTEN_FDS."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import jwt
from websockets.asyncio.client import connect

from tests.support.broker import DEFAULT_CONFIG, SECRET, BrokerProcess, to_toml
from tests.support.tls import self_signed


def test_wss_on_the_same_listener(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with BrokerProcess.start(
        tmp_path, {"server": {"tls_cert": str(cert), "tls_key": str(key)}}
    ) as b:
        ctx = ssl.create_default_context(cafile=str(cert))

        async def main() -> None:
            url = f"wss://127.0.0.1:{b.port}/ws?token={b.token('alice')}"
            async with (
                connect(url, ssl=ctx, subprotocols=["pubsub.v1"]) as a,
                connect(url, ssl=ctx) as p,
            ):  # type: ignore[list-item]
                assert json.loads(await a.recv())["op"] == "welcome"
                await p.recv()
                await a.send(json.dumps({"op": "subscribe", "topic": "t", "id": 1}))
                assert json.loads(await a.recv())["ok"]
                for k in range(200):  # enough to go through the TLS writer more than once
                    await p.send(json.dumps({"op": "publish", "topic": "t", "data": "x" * k}))
                offsets = []
                while len(offsets) < 200:
                    msg = json.loads(await asyncio.wait_for(a.recv(), 10))
                    offsets.append(msg["offset"])
                assert offsets == list(range(1, 201))

        asyncio.run(main())


def _notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    return sock, path


def _collect(sock: socket.socket, until: str, timeout: float = 20) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if any(until in m for m in seen):
            return seen
    raise AssertionError(f"no {until!r} in {seen}")


def test_socket_activation_and_notify_protocol(tmp_path: Path) -> None:
    """Started as systemd would: the listening socket at fd 3 with LISTEN_PID naming the
    broker, NOTIFY_SOCKET and WATCHDOG_USEC set."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    notify, notify_path = _notify_socket(tmp_path)
    config = tmp_path / "broker.toml"
    config.write_text(
        to_toml(
            {**DEFAULT_CONFIG, "server": {"listen": "127.0.0.1:1", "workers": 2, "http_listen": ""}}
        )
    )
    fd = listener.fileno()
    env = {
        **os.environ,
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "ws",
        "NOTIFY_SOCKET": notify_path,
        "WATCHDOG_USEC": "2000000",
        "PASSED_FD": str(fd),
    }
    # As systemd does: the socket at fd 3, and LISTEN_PID naming the broker's own pid.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys; os.dup2(int(os.environ.pop('PASSED_FD')), 3); "
            "os.environ['LISTEN_PID'] = str(os.getpid()); "
            "from broker.cli import main; sys.exit(main(sys.argv[1:]))",
            "serve",
            "--config",
            str(config),
        ],
        env=env,
        pass_fds=(fd,),
        stderr=(tmp_path / "broker.log").open("w"),
        start_new_session=True,
    )
    try:
        listener.close()  # the broker holds it now
        messages = _collect(notify, "READY=1")
        token = jwt.encode({"sub": "a", "exp": time.time() + 60}, SECRET, algorithm="HS256")

        async def main() -> int:
            async with connect(f"ws://127.0.0.1:{port}/ws?token={token}") as ws:
                return int(json.loads(await ws.recv())["worker"])

        assert asyncio.run(main()) in (0, 1)
        messages += _collect(notify, "WATCHDOG=1", timeout=5)
        proc.send_signal(signal.SIGHUP)
        messages += _collect(notify, "RELOADING=1")
        assert any("MONOTONIC_USEC=" in m for m in messages if "RELOADING=1" in m)
        proc.send_signal(signal.SIGTERM)
        messages += _collect(notify, "STOPPING=1")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        notify.close()
