"""What ``pubsub-broker dev`` (``make run``) prints: every line can be pasted as it is, and
every address in it is one the broker is bound to."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from broker import logs, supervisor
from broker.auth import TokenVerifier
from broker.cli import main
from broker.config import Config


def run_dev(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[str, Config, dict[str, int]]:
    """Run ``dev`` in ``tmp_path`` with the serving patched out; returns what it printed, the
    configuration it would serve and the ports of the sockets it bound."""
    monkeypatch.chdir(tmp_path)
    served: list[tuple[Config, dict[str, int]]] = []

    def run_broker(config: Config, overrides: Any, listeners: Any) -> int:
        ports = {"ws": listeners.ws[0][0].getsockname()[1]}
        if listeners.http is not None:
            ports["http"] = listeners.http.getsockname()[1]
        served.append((config, ports))
        for sock in [*(s for group in listeners.ws for s in group), listeners.http]:
            if sock is not None:
                sock.close()
        return 0

    monkeypatch.setattr(supervisor, "run_broker", run_broker)
    monkeypatch.setattr(logs, "configure_logging", lambda *a, **k: None)
    assert main(["dev", "--listen", "127.0.0.1:0", *args]) == 0
    [(config, ports)] = served
    return capsys.readouterr().out, config, ports


def line_after(out: str, marker: str) -> str:
    """The first line of ``out`` that contains ``marker``."""
    return next(line for line in out.splitlines() if marker in line)


def test_the_banner_gives_every_address_and_a_ready_curl_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out, config, ports = run_dev(tmp_path, monkeypatch, capsys, "--http-listen", "127.0.0.1:0")
    ws, origin = f"ws://127.0.0.1:{ports['ws']}/ws", f"http://127.0.0.1:{ports['http']}"
    assert f"  WebSocket:  {ws}\n" in out
    token = line_after(out, "export PUBSUB_URL").split("PUBSUB_TOKEN=")[1].strip()
    assert TokenVerifier(config.auth).verify(token).client == "dev-user"
    assert f"{origin}/demo/?token={token}" in out
    assert f"{origin}/status/" in out and f"{origin}/metrics" in out
    # The curl line, joined as a shell joins it, publishes with the configured key.
    start = out.index("curl -s")
    command = shlex.split(out[start:].replace("\\\n", "").splitlines()[0])
    [key] = config.api_keys
    assert command[:4] == ["curl", "-s", "-H", f"Authorization: Bearer {key}"]
    assert command[4] == "-d" and json.loads(command[5])["topic"] == "chat.room1"
    assert command[6:] == [f"{origin}/api/publish"]
    # How to run the examples, with the interpreter `make run` installed into.
    for example in ("subscribe.py", "publish.py", "token_refresh.py"):
        assert f"    .venv/bin/python examples/{example}" in out
        assert (Path(__file__).resolve().parents[2] / "examples" / example).exists()


def test_the_banner_without_an_operations_listener_or_an_api_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _, ports = run_dev(tmp_path, monkeypatch, capsys, "--http-listen", "")
    assert "http" not in ports
    assert "disabled (server.http_listen is empty)" in out
    assert "http://" not in out and "curl" not in out
    # A development file without [api] keys says where to add one.
    path = tmp_path / ".pubsub-dev" / "broker.toml"
    path.write_text(path.read_text().split("[api]")[0])
    out, config, _ = run_dev(tmp_path, monkeypatch, capsys, "--http-listen", "127.0.0.1:0")
    assert config.api_keys == ()
    assert "HTTP API:   no key: add [api] keys" in out and "curl" not in out


def test_the_token_command_says_what_a_token_may_do(capsys: pytest.CaptureFixture[str]) -> None:
    # The banner sends newcomers to `pubsub-broker token` for more tokens; its help must say
    # that naming one permission drops the configured defaults for the others.
    with pytest.raises(SystemExit) as exited:
        main(["token", "--help"])
    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default 3600" in help_text
    assert "given any of them, it may do only what they list" in help_text
