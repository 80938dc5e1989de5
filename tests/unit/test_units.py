"""The systemd units and the example configuration, checked with systemd's own tools.

`systemd-analyze verify` only warns about typos (exit status 0), so the tests assert that it
prints nothing at all. It also fails when ExecStart's binary does not exist, so it checks a copy
of the units whose ExecStart points at this Python interpreter; nothing else is changed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
SERVICE = SYSTEMD_DIR / "pubsub-broker.service"
SOCKET = SYSTEMD_DIR / "pubsub-broker.socket"
EXAMPLE_CONFIG = SYSTEMD_DIR / "broker.toml"

INSTALLED_BINARY = "/opt/pubsub-broker/venv/bin/pubsub-broker"
INSTALLED_CONFIG = "/etc/pubsub-broker/broker.toml"
MAX_EXPOSURE = 2.0

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package: systemd)"
)


def directives(path: Path) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file, keys in the order met, repeated keys kept."""
    found: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture
def unit_copies(tmp_path: Path) -> Path:
    """Both units in a fresh directory, ExecStart pointing at a binary that exists here."""
    text = SERVICE.read_text()
    pattern = re.compile(r"^ExecStart=(\S+)", re.MULTILINE)
    assert pattern.findall(text) == [INSTALLED_BINARY]
    (tmp_path / SERVICE.name).write_text(pattern.sub(f"ExecStart={sys.executable}", text))
    shutil.copy(SOCKET, tmp_path / SOCKET.name)
    return tmp_path


def run_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@needs_systemd_analyze
@pytest.mark.parametrize("units", [["service"], ["socket"], ["service", "socket"]])
def test_verify_prints_nothing(unit_copies: Path, units: list[str]) -> None:
    # The socket names its service, so verifying it alone also loads the service from the
    # same directory.
    names = [f"pubsub-broker.{unit}" for unit in units]
    result = run_analyze("verify", *(str(unit_copies / name) for name in names), cwd=unit_copies)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@needs_systemd_analyze
def test_verify_would_catch_a_typo(unit_copies: Path) -> None:
    # Guards the test above: verify must be seen to complain about a bad unit.
    service = unit_copies / SERVICE.name
    service.write_text(service.read_text().replace("ProtectHome=", "ProtectHomes="))
    result = run_analyze("verify", str(service), cwd=unit_copies)
    assert "ProtectHomes" in result.stdout + result.stderr


@needs_systemd_analyze
def test_security_exposure(unit_copies: Path) -> None:
    result = run_analyze(
        "security", "--offline=true", "--no-pager", str(unit_copies / SERVICE.name), cwd=unit_copies
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match is not None, output
    assert float(match.group(1)) <= MAX_EXPOSURE, output


def test_service_promises() -> None:
    """What the broker's supervisor and the documentation rely on."""
    unit = directives(SERVICE)
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "ExecStart": [f"{INSTALLED_BINARY} serve --config {INSTALLED_CONFIG}"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "EnvironmentFile": ["-/etc/pubsub-broker/env"],
        "WatchdogSec": ["30"],
        "Restart": ["on-failure"],
        "KillMode": ["mixed"],
        "LimitNOFILE": ["65536"],
        "RuntimeDirectory": ["pubsub-broker"],
        "DynamicUser": ["yes"],
        "ProtectSystem": ["strict"],
        "NoNewPrivileges": ["yes"],
        "CapabilityBoundingSet": [""],
        "AmbientCapabilities": [""],
        "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"],
        "MemoryDenyWriteExecute": ["yes"],
    }
    assert {key: unit.get(key) for key in expected} == expected
    assert unit["SystemCallFilter"][0] == "@system-service"
    assert "MemoryHigh" in unit
    assert "MemoryMax" in unit
    # The supervisor drains within [server] shutdown_timeout (10 s by default) before systemd
    # escalates to SIGKILL.
    (stop_timeout,) = unit["TimeoutStopSec"]
    assert int(stop_timeout.removesuffix("s")) > 10


def test_socket_activates_the_service() -> None:
    unit = directives(SOCKET)
    assert unit["Service"] == [SERVICE.name]
    assert unit["FileDescriptorName"] == ["ws"]
    assert len(unit["ListenStream"]) == 1
    assert unit["ListenStream"][0].endswith("8765")


# The configuration keys of the broker; the example must show (and so document) every one.
CONFIG_KEYS = {
    "server": {
        "listen",
        "allowed_origins",
        "tls_cert",
        "tls_key",
        "workers",
        "http_listen",
        "node_id",
        "shutdown_timeout",
        "http_max_connections",
        "http_ops_reserve",
        "topic_owner",
    },
    "auth": {
        "jwt_secret",
        "jwt_public_key_file",
        "allow_anonymous",
        "default_publish",
        "default_subscribe",
        "audience",
        "issuer",
        "require_exp",
        "default_presence",
        "token_cache_size",
    },
    "limits": {
        "max_message_size",
        "max_data_size",
        "max_subscriptions",
        "max_connections",
        "publish_rate",
        "publish_burst",
        "send_queue_max_bytes",
        "max_violations",
        "history_max_bytes",
        "max_topics",
        "read_rate_bytes",
        "read_burst_bytes",
        "max_pending_connections",
        "max_connections_per_client",
    },
    "timeouts": {
        "handshake_timeout",
        "auth_timeout",
        "idle_timeout",
        "ping_interval",
        "write_timeout",
        "message_timeout",
    },
    "bus": {"url", "cluster", "presence_ttl"},
    "presence": {"topics"},
    "api": {"keys"},
}


def test_example_config_shows_every_key_and_no_secret() -> None:
    config = tomllib.loads(EXAMPLE_CONFIG.read_text())
    assert {
        section: set(config[section]) for section in CONFIG_KEYS if section in config
    } == CONFIG_KEYS
    for rule in config["history"]:
        assert set(rule) == {"pattern", "size", "ttl", "max_bytes"}
    # The file is world-readable under DynamicUser=: secrets come from the environment file.
    assert config["auth"]["jwt_secret"] == ""
    assert config["api"]["keys"] == []
    # Shutdown must finish before systemd's TimeoutStopSec escalates to SIGKILL.
    (stop_timeout,) = directives(SERVICE)["TimeoutStopSec"]
    assert config["server"]["shutdown_timeout"] < int(stop_timeout.removesuffix("s"))


def test_example_config_loads_with_the_secret_from_the_environment() -> None:
    from broker.config import SECRET_ENV, load_config
    from broker.errors import ConfigError

    secret = "s" * 64
    config = load_config(EXAMPLE_CONFIG, env={SECRET_ENV: secret})
    assert config.auth.jwt_secret == secret
    # Without the environment file the service must refuse to start, naming the key.
    with pytest.raises(ConfigError, match="jwt_secret"):
        load_config(EXAMPLE_CONFIG, env={})
