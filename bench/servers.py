"""Start and watch the servers under test: this broker, nats-server and the Socket.IO peer.

Each server runs as a child process on 127.0.0.1 with a free port. :class:`Server` knows its
process tree (the broker's supervisor and workers), its CPU time (utime + stime from
``/proc/PID/stat``, summed over the tree) and its memory (RSS and PSS from
``/proc/PID/smaps_rollup``, summed over the tree).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import jwt

from bench.loadgen import proc_cpu_seconds

__all__ = ["Server", "make_tokens", "start_broker", "start_nats", "start_socketio"]

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
SOCKETIO_DIR = BENCH_DIR / "peers" / "socketio"


def make_tokens(secret: str, count: int, prefix: str = "bench", ttl: int = 3600) -> list[str]:
    """``count`` distinct HS256 tokens (subs ``prefix-0``...) allowed to publish and subscribe
    everywhere."""
    exp = int(time.time()) + ttl
    claims = {"pubsub": {"publish": [">"], "subscribe": [">"]}, "exp": exp}
    return [
        jwt.encode({"sub": f"{prefix}-{i}", **claims}, secret, algorithm="HS256")
        for i in range(count)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    kids = _children()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(kids.get(p, []))
    return tree


def _sum_fields(pids: list[int], name: str, keys: dict[str, str]) -> dict[str, int]:
    """Sum ``KEY: value`` lines of ``/proc/PID/<name>`` over ``pids``; ``keys`` maps the
    file's key to the result's."""
    total = dict.fromkeys(keys.values(), 0)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/{name}") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in keys:
                        total[keys[key]] += int(rest.split()[0])
        except OSError:
            continue
    return total


def memory_kib(pids: list[int]) -> dict[str, int]:
    """RSS and PSS in KiB, summed over ``pids``."""
    return _sum_fields(pids, "smaps_rollup", {"Rss": "rss", "Pss": "pss"})


def syscalls(pids: list[int]) -> dict[str, int]:
    """Read and write system calls so far (``syscr``/``syscw`` of ``/proc/PID/io``, which
    count recv/send/writev alike), summed over ``pids``."""
    return _sum_fields(pids, "io", {"syscr": "syscr", "syscw": "syscw"})


class Server:
    """A server child process; ``port`` is its WebSocket port."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.port = port
        self.log = log
        self.secret = ""
        self.tokens: list[str] = []
        self.extra: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def cpu_seconds(self, pids: list[int] | None = None) -> float:
        return sum(proc_cpu_seconds(p) for p in pids or self.pids())

    def memory_kib(self) -> dict[str, int]:
        return memory_kib(self.pids())

    def syscalls(self, pids: list[int] | None = None) -> dict[str, int]:
        return syscalls(pids or self.pids())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                for pid in reversed(self.pids()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_ready_line(
    proc: subprocess.Popen[bytes], stream: IO[bytes], log: Path, timeout: float
) -> dict[str, Any]:
    """Read JSON lines from ``stream`` (copying every line to ``log``) until one has
    ``"event": "ready"``; keep copying in a thread afterwards."""
    found: dict[str, Any] = {}
    ready = threading.Event()

    def pump() -> None:
        with log.open("ab") as out:
            for line in stream:
                out.write(line)
                out.flush()
                if not ready.is_set():
                    with contextlib.suppress(ValueError):
                        event = json.loads(line)
                        if isinstance(event, dict) and event.get("event") == "ready":
                            found.update(event)
                            ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.05):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"server did not become ready; log tail:\n{tail}")
    return found


def _wait_port(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    proc.kill()
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"server did not listen on {port}; log tail:\n{tail}")


def broker_command() -> list[str]:
    script = Path(sys.executable).parent / "pubsub-broker"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from broker.cli import main; main()"]


def start_broker(
    workdir: Path,
    workers: int = 1,
    limits: dict[str, Any] | None = None,
    delivery: str = "",
    store: bool = False,
    history: list[dict[str, Any]] | None = None,
    owned: bool = False,
) -> Server:
    """Start the broker with ``workers`` workers, the suite's limits (and ``limits``);
    ``delivery``, when given, is the policy of every topic; with ``store``, history on disk
    (``[store] path``); ``history`` as its ``[[history]]`` rules (default: the broker's); with
    ``owned``, topics owned by the workers (``topic_owner = "workers"``), not the hub."""
    secret = secrets.token_hex(32)
    lim = {
        "max_connections": 30000,
        "publish_rate": 1000000.0,
        "publish_burst": 1000000,
        "max_subscriptions": 128,
        **(limits or {}),
    }
    lines = [
        "[server]",
        'listen = "127.0.0.1:0"',
        f"workers = {workers}",
        'http_listen = ""',
        *(['topic_owner = "workers"'] if owned else []),
        "[auth]",
        f'jwt_secret = "{secret}"',
        "[limits]",
        *(f"{k} = {v!r}" for k, v in lim.items()),
        "[timeouts]",
        "handshake_timeout = 60",
        "idle_timeout = 3600",
        "ping_interval = 600",
    ]
    if delivery:
        lines += ["[[delivery]]", 'pattern = ">"', f'policy = "{delivery}"']
    for rule in history or []:
        lines += ["[[history]]", *(f"{k} = {json.dumps(v)}" for k, v in rule.items())]
    name = f"broker-{workers}w" + ("-owned" if owned else "") + ("-store" if store else "")
    if store:
        db = workdir / f"{name}.db"
        for old in workdir.glob(f"{name}.db*"):
            old.unlink()
        lines += ["[store]", f'path = "{db}"']
    config = workdir / f"{name}.toml"
    config.write_text("\n".join(lines) + "\n")
    log = workdir / f"{name}.log"
    cmd = [*broker_command(), "serve", "--config", str(config), "--listen", "127.0.0.1:0"]
    # The checkout's own broker in every process: the installed console script would import
    # whatever copy is installed for the supervisor (and so the hub), the workers this one.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    ready = _wait_ready_line(proc, proc.stderr, log, timeout=30)
    server = Server(name, proc, int(ready["port"]), log)
    server.secret = secret
    # a broker without multi-worker support says so in its ready line
    server.extra = {"workers": int(ready.get("workers", workers)), "requested_workers": workers}
    # the workers may still be starting; wait until the process tree stops growing
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(server.pids()) < workers + (workers > 1):
        time.sleep(0.05)
    return server


def start_nats(workdir: Path) -> Server:
    binary = shutil.which("nats-server")
    if binary is None:
        raise RuntimeError("nats-server is not installed (Debian package nats-server)")
    token = secrets.token_hex(16)
    port, client_port = free_port(), free_port()
    config = workdir / "nats.conf"
    config.write_text(
        f'listen: "127.0.0.1:{client_port}"\n'
        "max_connections: 100000\n"
        f'authorization {{ token: "{token}" }}\n'
        f'websocket {{ listen: "127.0.0.1:{port}", no_tls: true, compression: false }}\n'
    )
    log = workdir / "nats.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, "-c", str(config)], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    _wait_port(proc, port, log, timeout=20)
    server = Server("nats", proc, port, log)
    server.tokens = [token]
    return server


def ensure_socketio() -> None:
    if (SOCKETIO_DIR / "node_modules" / "socket.io").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed")
    args = ["ci"] if (SOCKETIO_DIR / "package-lock.json").exists() else ["install"]
    subprocess.run(
        [npm, *args, "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=SOCKETIO_DIR,
        check=True,
        timeout=300,
    )


def start_socketio(workdir: Path) -> Server:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed")
    ensure_socketio()
    secret = secrets.token_hex(32)
    log = workdir / "socketio.log"
    proc = subprocess.Popen(
        [node, "server.js", "0"],
        cwd=SOCKETIO_DIR,
        env={**os.environ, "BENCH_JWT_SECRET": secret},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    ready = _wait_ready_line(proc, proc.stdout, log, timeout=30)
    server = Server("socketio", proc, int(ready["port"]), log)
    server.secret = secret
    return server
