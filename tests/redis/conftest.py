"""Real ``redis-server`` processes for the Redis bus tests.

Every server runs on a free loopback port in the test's temporary directory, without
persistence, and is stopped by its fixture even when the test fails. ``redis_server`` is one
server per test (tests may kill and restart it on the same port); ``redis_cluster`` is a
three-master Redis Cluster (no replicas) shared by the tests of a module and flushed before
each test.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")

requires_redis = pytest.mark.skipif(
    REDIS_SERVER is None or REDIS_CLI is None,
    reason="redis-server and redis-cli are not installed (Debian package redis-server)",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.redis)
            item.add_marker(requires_redis)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(*, cluster: bool = False) -> int:
    """A free loopback port. A cluster node also listens on port + 10000 (its cluster bus),
    so cluster ports are drawn below 55535 with that second port free as well."""
    if not cluster:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 45000)
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port``; ``kill()`` and ``start()`` again
    reuse the same port and directory (nothing is persisted, so a restart starts empty)."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        cluster: bool = False,
        password: str | None = None,
    ):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port(cluster=cluster)
        self.cluster = cluster
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        assert REDIS_SERVER is not None
        args = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.directory / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.directory / "nodes.conf"),
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
            if self._wait_ready(deadline):
                return
            # The port may still be held by the previous process's socket: try again.
            self._reap(signal.SIGKILL)
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def _wait_ready(self, deadline: float) -> bool:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self.cli("PING", check=False).strip() == "PONG":
                return True
            time.sleep(0.02)
        return False

    def cli(self, *args: str, check: bool = True) -> str:
        assert REDIS_CLI is not None
        auth = ["--no-auth-warning", "-a", self.password] if self.password else []
        out = subprocess.run(
            [REDIS_CLI, "-h", "127.0.0.1", "-p", str(self.port), *auth, *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"redis-cli {args}: {out.stderr or out.stdout}")
        return out.stdout

    def _reap(self, sig: int) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        """Kill -9: clients see their connections reset, no goodbye."""
        self._reap(signal.SIGKILL)

    def stop(self) -> None:
        self._reap(signal.SIGTERM)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class RedisCluster:
    """Three masters, no replicas, all 16384 slots covered."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.servers = [RedisServer(directory / f"node{i}", cluster=True) for i in range(masters)]

    @property
    def url(self) -> str:
        return self.servers[0].url

    def start(self) -> None:
        assert REDIS_CLI is not None
        for s in self.servers:
            s.start()
        subprocess.run(
            [
                REDIS_CLI, "--cluster", "create",
                *(f"127.0.0.1:{s.port}" for s in self.servers),
                "--cluster-replicas", "0", "--cluster-yes",
            ],
            capture_output=True,
            check=True,
            timeout=30,
        )  # fmt: skip
        self.wait_ok()

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Wait until every node sees every other one and all slots are served."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            infos = [s.cli("CLUSTER", "INFO", check=False) for s in self.servers]
            if all("cluster_state:ok" in i for i in infos) and all(
                f"cluster_known_nodes:{len(self.servers)}" in i for i in infos
            ):
                return
            time.sleep(0.05)
        raise RuntimeError("the Redis cluster did not reach cluster_state:ok")

    def flush(self) -> None:
        for s in self.servers:
            s.cli("FLUSHALL")

    def stop(self) -> None:
        for s in self.servers:
            with contextlib.suppress(Exception):
                s.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def _cluster_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(_cluster_module: RedisCluster) -> RedisCluster:
    _cluster_module.flush()
    return _cluster_module


__all__ = ["RedisCluster", "RedisServer", "free_port", "requires_redis"]
