"""Start the real broker as a subprocess for integration tests.

    with BrokerProcess.start(tmp_path, config={"limits": {...}}) as b:
        b.url, b.http_url, b.token("alice"), b.pid, b.stop(), b.kill(), b.restart()

The broker listens on free loopback ports it picks itself (``--listen 127.0.0.1:0``); the
ports are read from its ``ready`` log line. Every process started here is stopped by the
context manager, by pid, even when the test fails.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import jwt

SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
API_KEY = "test-api-key-0123456789"

DEFAULT_CONFIG: dict[str, Any] = {
    "auth": {"jwt_secret": SECRET, "default_publish": [">"], "default_subscribe": [">"]},
    "api": {"keys": [API_KEY]},
    # Tests publish in bursts; the rate limit has tests of its own.
    "limits": {"publish_rate": 100000.0, "publish_burst": 100000},
}

# Presence is opt-in twice (tracked topics, and who may read them): tests of presence itself
# merge this into their configuration, as `pubsub-broker dev` does for development.
PRESENCE_EVERYWHERE: dict[str, Any] = {
    "auth": {"default_presence": [">"]},
    "presence": {"topics": [">"]},
}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def to_toml(config: dict[str, Any]) -> str:
    lines: list[str] = []
    for section, body in config.items():
        if isinstance(body, list):
            for entry in body:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
        lines.append("")
    return "\n".join(lines)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


class BrokerProcess:
    def __init__(
        self, workdir: Path, config: dict[str, Any], workers: int, env: dict[str, str] | None
    ):
        self.workdir = workdir
        self.config = config
        self.workers = workers
        self.config_path = workdir / "broker.toml"
        self.config_path.write_text(to_toml(config))
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.http_port: int | None = None
        self.lines: list[dict[str, Any]] = []
        self._lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.log_path = workdir / "broker.log"

    @classmethod
    @contextmanager
    def start(
        cls,
        workdir: Path,
        config: dict[str, Any] | None = None,
        *,
        workers: int = 1,
        env: dict[str, str] | None = None,
    ) -> Iterator[BrokerProcess]:
        b = cls(workdir, merge(DEFAULT_CONFIG, config or {}), workers, env)
        try:
            b._spawn(port=0)
            yield b
        finally:
            b.stop()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def secret(self) -> str:
        return str(self.config["auth"]["jwt_secret"])

    def token(
        self,
        sub: str,
        *,
        publish: list[str] | None = None,
        subscribe: list[str] | None = None,
        presence: list[str] | None = None,
        ttl: float | None = 3600,
        **claims: Any,
    ) -> str:
        body: dict[str, Any] = {"sub": sub, **claims}
        if ttl is not None:
            body["exp"] = int(time.time() + ttl)
        if publish is not None or subscribe is not None or presence is not None:
            body["pubsub"] = {"publish": publish or [], "subscribe": subscribe or []}
            if presence is not None:
                body["pubsub"]["presence"] = presence
        return jwt.encode(body, self.secret, algorithm="HS256")

    def _spawn(self, port: int) -> None:
        http = "127.0.0.1:0" if self.config.get("api") is not None else ""
        cmd = [
            sys.executable,
            "-m",
            "broker.cli",
            "serve",
            "--config",
            str(self.config_path),
            "--listen",
            f"127.0.0.1:{port}",
            "--http-listen",
            http,
            "--workers",
            str(self.workers),
        ]
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(
            cmd,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=self.workdir,
            start_new_session=True,
        )
        self._lines = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc, self._lines), daemon=True).start()
        ready = self.wait_for("ready", timeout=30)
        self.port = int(ready["port"])
        hp = ready.get("http_port")
        self.http_port = int(hp) if hp else None

    def _pump(self, proc: subprocess.Popen[str], q: queue.Queue[dict[str, Any]]) -> None:
        assert proc.stderr is not None
        with self.log_path.open("a") as log:
            for line in proc.stderr:
                log.write(line)
                log.flush()
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {"event": "raw", "line": line.rstrip()}
                self.lines.append(event)
                q.put(event)

    def wait_for(self, event: str, timeout: float = 10, **match: Any) -> dict[str, Any]:
        """Wait for the next log event named ``event`` (with ``match`` key/values)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"broker did not log {event!r} in {timeout}s; log: {self.log_path.read_text()[-3000:]}"
                )
            try:
                e = self._lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self.proc is not None and self.proc.poll() is not None and self._lines.empty():
                    raise RuntimeError(
                        f"broker exited with {self.proc.returncode}; log: {self.log_path.read_text()[-3000:]}"
                    ) from None
                continue
            if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
                return e

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.lines if e.get("event") == name]

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM, then SIGKILL of the whole process group after ``timeout``."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self._kill_group(proc)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the broker (and its workers) at once."""
        if self.proc is not None:
            self._kill_group(self.proc)

    @staticmethod
    def _kill_group(proc: subprocess.Popen[str]) -> None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def restart(self, *, kill: bool = False) -> None:
        """Stop (or kill) the broker and start it again on the same port."""
        if kill:
            self.kill()
        else:
            self.stop()
        deadline = time.monotonic() + 10
        while True:
            try:
                self._spawn(port=self.port)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
