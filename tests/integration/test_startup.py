"""Start-up, from outside: a busy WebSocket or HTTP port is one log line naming the key to
change and exit code 3, with no banner and no traceback, in ``serve`` (one worker and two)
and ``dev``; and every process raises its open-file limit and says so once."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import native
from broker.config import LimitsConfig
from tests.support.broker import DEFAULT_CONFIG as BROKER_CONFIG
from tests.support.broker import BrokerProcess, to_toml


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port someone else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def free_port() -> str:
    return "127.0.0.1:0"


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


def assert_one_listen_failure(result: subprocess.CompletedProcess[str], key: str) -> None:
    assert result.returncode == 3, result
    assert result.stdout == "", "no banner (and no token) for a broker that never ran"
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()  # one line, and nothing else
    failure = json.loads(line)
    assert failure["event"] == "listen_failed" and failure["level"] == "error", failure
    assert failure["key"] == key and "in use" in failure["problem"]


@pytest.mark.parametrize("which", ["listen", "http-listen"])
def test_serve_on_a_busy_port(tmp_path: Path, busy_port: int, workers: int, which: str) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(to_toml(BROKER_CONFIG))
    ports = {"listen": free_port(), "http-listen": free_port()}
    ports[which] = f"127.0.0.1:{busy_port}"
    result = run_cli(
        [
            "serve",
            "--config",
            str(config),
            "--listen",
            ports["listen"],
            "--http-listen",
            ports["http-listen"],
            "--workers",
            str(workers),
        ],
        tmp_path,
    )
    assert_one_listen_failure(result, "server." + which.replace("-", "_"))


@pytest.mark.parametrize("which", ["listen", "http-listen"])
def test_dev_on_a_busy_port(tmp_path: Path, busy_port: int, which: str) -> None:
    ports = {"listen": free_port(), "http-listen": free_port()}
    ports[which] = f"127.0.0.1:{busy_port}"
    result = run_cli(
        ["dev", "--listen", ports["listen"], "--http-listen", ports["http-listen"]], tmp_path
    )
    assert_one_listen_failure(result, "server." + which.replace("-", "_"))


def test_dev_serves_on_the_ports_it_is_given(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "dev", "--listen", free_port(), "--http-listen", ""],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        for line in proc.stderr:
            if '"ready"' in line:
                ready = json.loads(line)
                break
        else:
            pytest.fail("no ready line")
        assert ready["http_port"] is None  # "" disables the operations listener
        banner = [proc.stdout.readline() for _ in range(3)]
        assert f"  WebSocket:  ws://127.0.0.1:{ready['port']}/ws\n" in banner, banner
        with socket.create_connection(("127.0.0.1", ready["port"]), timeout=5):
            pass
    finally:
        proc.terminate()
        proc.wait(15)


def test_every_process_raises_its_open_file_limit(tmp_path: Path, workers: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip("needs a finite hard limit above 256")
    # The broker inherits a low soft limit, as from a shell's default `ulimit -n`.
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        cm = BrokerProcess.start(tmp_path, workers=workers)
        b = cm.__enter__()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        lines = b.events("open_files")
        # The supervisor (or the one process) and each worker: one line each.
        assert len(lines) == (1 if workers == 1 else 1 + workers), lines
        # The first process raises it; workers inherit the raised limit (and check it).
        assert lines[0]["raised_from"] == 256
        for line in lines:
            assert line["limit"] == hard, line
            assert line["connections"] > 0
        serving = [line for line in lines if line["needed"] is not None]
        assert len(serving) == workers
        defaults = LimitsConfig()
        needed = defaults.max_connections + defaults.max_pending_connections
        assert all(line["needed"] == needed for line in serving)
        for pid in [b.pid, *child_pids(b.pid)]:
            assert open_file_soft_limit(pid) == hard
    finally:
        cm.__exit__(None, None, None)


def test_every_process_says_whether_it_runs_the_compiled_modules(
    tmp_path: Path, workers: int
) -> None:
    """One ``compiled_modules`` line per process, agreeing with this (test) process, which
    makes the same choice from the same files and environment."""
    with BrokerProcess.start(tmp_path, workers=workers) as b:
        lines = b.events("compiled_modules")
    assert len(lines) == (1 if workers == 1 else 1 + workers), lines
    for line in lines:
        assert line["compiled"] is native.status.compiled, line
        assert line["reason"] == native.status.reason
        assert line["modules"] == list(native.MODULES)
        assert line["level"] == ("warning" if native.status.stale else "info")


def child_pids(pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def open_file_soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit")
