"""Configuration: defaults, one clear line naming a bad key, secrets from the environment."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from broker.cli import main
from broker.config import load_config, node_name, parse_config
from broker.errors import ConfigError
from broker.http import http_limits

SECRET = {"auth": {"jwt_secret": "k" * 40}}


def error_key(raw: dict[str, object], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, env=env or {})
    return info.value.key


def test_defaults_are_safe() -> None:
    cfg = parse_config(SECRET, env={})
    assert cfg.server.listen == "127.0.0.1:8765"
    assert cfg.server.allowed_origins == ()
    assert not cfg.auth.allow_anonymous
    assert cfg.auth.default_publish == () and cfg.auth.default_subscribe == ()
    assert cfg.timeouts.idle_timeout == 60 and cfg.timeouts.auth_timeout == 5
    assert cfg.limits.send_queue_max_bytes == 1 << 20


def test_bad_keys_are_named() -> None:
    assert error_key({**SECRET, "limits": {"max_conections": 5}}) == "limits.max_conections"
    assert error_key({**SECRET, "timeouts": {"idle_timeout": "60"}}) == "timeouts.idle_timeout"
    assert error_key({**SECRET, "timeouts": {"idle_timeout": 0}}) == "timeouts.idle_timeout"
    assert error_key({**SECRET, "limits": {"max_connections": True}}) == "limits.max_connections"
    assert error_key({**SECRET, "server": {"listen": "nope"}}) == "server.listen"
    assert (
        error_key({**SECRET, "server": {"allowed_origins": ["app.example.com"]}})
        == "server.allowed_origins"
    )
    assert error_key({**SECRET, "serverr": {}}) == "serverr"
    # keys that TOML must quote are named as written (the fuzzer found `[""]` named as "")
    assert error_key({**SECRET, "": {}}) == '""'
    assert error_key({**SECRET, "server": {"a b": 1}}) == 'server."a b"'
    assert error_key({**SECRET, "history": [{"pattern": "a.>", "size": 5}]}) == "history[0].ttl"
    assert (
        error_key({**SECRET, "history": [{"pattern": "a..b", "size": 5, "ttl": 1}]})
        == "history[0].pattern"
    )
    assert error_key({"auth": {"jwt_secret": "short"}}) == "auth.jwt_secret"
    assert error_key({}) == "auth.jwt_secret"


def test_secret_from_environment() -> None:
    cfg = parse_config({}, env={"PUBSUB_BROKER_JWT_SECRET": "e" * 40})
    assert cfg.auth.jwt_secret == "e" * 40


def test_api_keys_from_environment() -> None:
    cfg = parse_config(SECRET, env={"PUBSUB_BROKER_API_KEYS": "a" * 16 + ", " + "b" * 20})
    assert cfg.api_keys == ("a" * 16, "b" * 20)
    assert error_key(SECRET, env={"PUBSUB_BROKER_API_KEYS": "short"}) == "PUBSUB_BROKER_API_KEYS"


def test_history_rules_first_match_wins() -> None:
    cfg = parse_config(
        {
            **SECRET,
            "history": [
                {"pattern": "chat.>", "size": 5, "ttl": 10},
                {"pattern": ">", "size": 0, "ttl": 1},
            ],
        },
        env={},
    )
    assert cfg.history_rule("chat.x").size == 5
    assert cfg.history_rule("other").size == 0
    assert cfg.history_rule("chat.x").max_bytes == 1024 * 1024  # the default


def test_history_byte_budgets() -> None:
    rule = {"pattern": ">", "size": 5, "ttl": 1, "max_bytes": 4096}
    cfg = parse_config({**SECRET, "history": [rule]}, env={})
    assert cfg.history_rule("a").max_bytes == 4096
    assert cfg.limits.history_max_bytes == 256 * 1024 * 1024
    assert cfg.limits.max_topics == 100_000
    bad = {**rule, "max_bytes": 0}
    assert error_key({**SECRET, "history": [bad]}) == "history[0].max_bytes"
    assert error_key({**SECRET, "limits": {"history_max_bytes": 0}}) == "limits.history_max_bytes"
    assert error_key({**SECRET, "limits": {"max_topics": -1}}) == "limits.max_topics"


def test_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text('[auth]\njwt_secret = "' + "k" * 40 + '"\n[server]\nlisten = "127.0.0.1:1"\n')
    cfg = load_config(path, overrides={"server.listen": "127.0.0.1:2"}, env={})
    assert cfg.server.listen == "127.0.0.1:2"


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "b.toml"
    path.write_text('[auth]\njwt_secret = "' + "k" * 40 + '"\n[limits]\nmax_conections = 1\n')
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # One line naming the key and listing the known ones (the list grows with new keys).
    assert len(err) == 1
    assert err[0].startswith(
        "pubsub-broker: config error: limits.max_conections: unknown key (known keys of [limits]: "
    )
    # Every known key is named, in order, so that the typo is easy to spot.
    known = err[0].split("known keys of [limits]: ")[1].rstrip(")").split(", ")
    assert known == sorted(known) and {"max_connections", "max_subscriptions"} <= set(known)
    path.write_text("not toml [")
    assert main(["check-config", "--config", str(path)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_exit_codes_match_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve"])  # --config missing: bad usage
    assert info.value.code == 1
    assert main(["check-config", "--config", "/nonexistent/broker.toml"]) == 2


def test_message_timeout_defaults_to_ten_seconds_and_must_be_positive() -> None:
    assert parse_config(SECRET, env={}).timeouts.message_timeout == 10.0
    assert error_key({**SECRET, "timeouts": {"message_timeout": 0}}) == "timeouts.message_timeout"


def test_the_operations_listener_budget_is_checked() -> None:
    cfg = parse_config(SECRET, env={})
    assert (cfg.server.http_max_connections, cfg.server.http_ops_reserve) == (512, 32)
    limits = http_limits(parse_config({**SECRET, "server": {"http_max_connections": 64}}, env={}))
    assert (limits.max_connections, limits.ops_reserve) == (64, 32)
    for bad in (
        {"http_max_connections": 0},
        {"http_max_connections": 32},
        {"http_ops_reserve": -1},
        {"http_ops_reserve": 512},
    ):
        assert error_key({**SECRET, "server": bad}).startswith("server.http_"), bad


def test_the_node_name_is_the_configured_one_or_random() -> None:
    cfg = parse_config(SECRET, env={})
    assert re.fullmatch(r"[0-9a-f]{12}", node_name(cfg))
    assert node_name(cfg) == node_name(parse_config(SECRET, env={})) != socket.gethostname()
    assert node_name(parse_config({**SECRET, "server": {"node_id": "edge-1"}}, env={})) == "edge-1"


def test_delivery_rules_first_match_wins_and_close_is_the_default() -> None:
    rules = [
        {"pattern": "prices.slow", "policy": "close"},
        {"pattern": "prices.>", "policy": "latest"},
    ]
    cfg = parse_config({**SECRET, "delivery": rules}, env={})
    assert cfg.delivery_policy("prices.eur") == "latest"
    assert cfg.delivery_policy("prices.slow") == "close"
    assert cfg.delivery_policy("chat.x") == "close"
    assert parse_config(SECRET, env={}).delivery_policy("prices.eur") == "close"


@pytest.mark.parametrize(
    ("delivery", "key"),
    [
        ({"pattern": ">", "policy": "newest"}, "delivery[0].policy"),
        ({"pattern": ">", "policy": 1}, "delivery[0].policy"),
        ({"pattern": "a..b", "policy": "latest"}, "delivery[0].pattern"),
        ({"policy": "latest"}, "delivery[0].pattern"),
        ({"pattern": ">"}, "delivery[0].policy"),
        ({"pattern": ">", "policy": "latest", "size": 1}, "delivery[0].size"),
    ],
)
def test_bad_delivery_rules_are_named(delivery: dict[str, object], key: str) -> None:
    assert error_key({**SECRET, "delivery": [delivery]}) == key
    assert error_key({**SECRET, "delivery": {"pattern": ">"}}) == "delivery"


def test_the_token_cache_size_defaults_to_ten_thousand_and_may_be_zero() -> None:
    assert parse_config(SECRET, env={}).auth.token_cache_size == 10_000
    off = parse_config({"auth": {**SECRET["auth"], "token_cache_size": 0}}, env={})
    assert off.auth.token_cache_size == 0
    bad = {"auth": {**SECRET["auth"], "token_cache_size": -1}}
    assert error_key(bad) == "auth.token_cache_size"
    assert error_key({"auth": {**SECRET["auth"], "token_cache_size": "many"}}) == (
        "auth.token_cache_size"
    )


def test_topics_are_owned_by_the_hub_unless_the_workers_are_asked_to() -> None:
    def owners(server: dict[str, object], bus: dict[str, object] | None = None) -> int:
        return parse_config({**SECRET, "server": server, "bus": bus or {}}, env={}).owner_count

    assert parse_config(SECRET, env={}).server.topic_owner == "hub"
    assert owners({"workers": 4}) == 0
    assert owners({"workers": 4, "topic_owner": "workers"}) == 4
    # One worker orders its topics itself, and with Redis, Redis does.
    assert owners({"workers": 1, "topic_owner": "workers"}) == 0
    redis = {"url": "redis://127.0.0.1:6379/0"}
    assert owners({"workers": 4, "topic_owner": "workers"}, redis) == 0
    assert error_key({**SECRET, "server": {"topic_owner": "shards"}}) == "server.topic_owner"
