"""Presence is opt-in twice: ``[presence] topics`` says which topics track it, and the token's
``pubsub.presence`` claim (or ``[auth] default_presence``) says who may read it."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest
import trio
import trio.testing

from broker.auth import TokenVerifier
from broker.brokermetrics import hub_presence_snapshot, snapshot_from_stats
from broker.cli import main, make_token
from broker.config import AuthConfig, PresenceConfig, parse_config
from broker.errors import ConfigError, FrameError
from broker.metrics import merge, render
from tests.support.inmemory import call, closed_with, connect, make_worker, recv, running, token
from tests.unit.test_dev_banner import run_dev

SECRET = "s" * 40


def hs(claims: dict[str, object]) -> str:
    return jwt.encode({"exp": int(time.time()) + 60, **claims}, SECRET, algorithm="HS256")


# --- which topics track presence -------------------------------------------------------------


def test_no_topic_tracks_presence_by_default() -> None:
    cfg = parse_config({"auth": {"jwt_secret": SECRET}}, env={})
    assert cfg.presence.topics == () and cfg.auth.default_presence == ()
    assert not cfg.presence.tracks("chat.room1")
    with pytest.raises(FrameError) as info:
        cfg.presence.check("chat.room1")
    assert info.value.code == "not_tracked"


def test_tracked_topics_follow_patterns_and_a_deny_wins() -> None:
    rules = PresenceConfig(("chat.>", "!chat.support.>", "lobby"))
    assert rules.tracks("chat.room1") and rules.tracks("chat.a.b") and rules.tracks("lobby")
    assert not rules.tracks("chat.support.x")  # denied, whatever the allow before it says
    assert not rules.tracks("chat") and not rules.tracks("news.x") and not rules.tracks("lobby.x")
    deny_first = PresenceConfig(("!a.b", ">"))  # the order does not matter
    assert deny_first.tracks("a.c") and not deny_first.tracks("a.b")
    rules.check("chat.room1")  # no error


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"presence": {"topics": ["chat..x"]}}, "presence.topics"),
        ({"presence": {"topics": "chat.>"}}, "presence.topics"),
        ({"presence": {"topic": ["chat.>"]}}, "presence.topic"),
        ({"presence": {"topics": ["!a.>."]}}, "presence.topics"),
        ({"auth": {"jwt_secret": SECRET, "default_presence": ["a.>.b"]}}, "auth.default_presence"),
        ({"auth": {"jwt_secret": SECRET, "default_presence": [3]}}, "auth.default_presence"),
    ],
)
def test_bad_presence_keys_are_named(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"auth": {"jwt_secret": SECRET}, **raw}, env={})
    assert info.value.key == key


def test_presence_section_parses() -> None:
    cfg = parse_config(
        {
            "auth": {"jwt_secret": SECRET, "default_presence": ["chat.>", "!chat.x"]},
            "presence": {"topics": ["chat.>"]},
        },
        env={},
    )
    assert cfg.presence.topics == ("chat.>",)
    assert cfg.auth.default_presence == ("chat.>", "!chat.x")


# --- who may read it -------------------------------------------------------------------------


def test_presence_permission_from_the_claim_or_the_default() -> None:
    v = TokenVerifier(AuthConfig(jwt_secret=SECRET, default_presence=("chat.>",)))
    defaulted = v.verify(hs({"sub": "a"}))
    assert defaulted.presence.allows_topic("chat.x") and not defaulted.presence.allows_topic("x")
    claimed = v.verify(hs({"sub": "a", "pubsub": {"presence": ["news.>", "!news.hr.>"]}}))
    assert claimed.presence.allows_topic("news.x")
    assert not claimed.presence.allows_topic("news.hr.x") and not claimed.presence.allows_topic(
        "chat.x"
    )
    # A pubsub claim without "presence" allows none: the claim replaces every default.
    assert not v.verify(hs({"sub": "a", "pubsub": {"subscribe": [">"]}})).presence.allow
    assert v.anonymous().presence.allows_topic("chat.x")
    assert not TokenVerifier(AuthConfig(jwt_secret=SECRET)).verify(hs({"sub": "a"})).presence.allow


@pytest.mark.parametrize("bad", ["chat.>", [""], ["a..b"], [1]])
def test_a_bad_presence_claim_is_refused(bad: object) -> None:
    v = TokenVerifier(AuthConfig(jwt_secret=SECRET))
    with pytest.raises(Exception) as info:
        v.verify(hs({"sub": "a", "pubsub": {"presence": bad}}))
    assert getattr(info.value, "reason", None) == "bad_claims"


def test_tokens_with_the_same_claims_share_their_permissions() -> None:
    v = TokenVerifier(AuthConfig(jwt_secret=SECRET, default_presence=("a",)))
    claim = {"subscribe": ["chat.>"], "presence": ["chat.>"]}
    one = v.verify(hs({"sub": "alice", "pubsub": claim}))
    two = v.verify(hs({"sub": "bob", "pubsub": dict(claim)}))
    assert one.presence is two.presence and one.subscribe is two.subscribe
    # The same patterns under another key are a different permission object.
    assert one.presence is not v.verify(hs({"sub": "c", "pubsub": {"publish": ["chat.>"]}})).publish
    # Without the claim, every token shares the configured default.
    assert v.verify(hs({"sub": "x"})).presence is v.verify(hs({"sub": "y"})).presence


def test_the_token_command_mints_the_presence_claim() -> None:
    cfg = parse_config({"auth": {"jwt_secret": SECRET}}, env={})
    claims = jwt.decode(
        make_token(cfg, "alice", subscribe=["chat.>"], presence=["chat.>"]),
        SECRET,
        algorithms=["HS256"],
    )
    assert claims["pubsub"] == {"publish": [], "subscribe": ["chat.>"], "presence": ["chat.>"]}
    plain = jwt.decode(make_token(cfg, "bob"), SECRET, algorithms=["HS256"])
    assert "pubsub" not in plain  # the configured defaults apply


def test_the_token_command_has_a_presence_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(f'[auth]\njwt_secret = "{SECRET}"\n')
    args = ["token", "--config", str(path), "--sub", "a", "--presence", "x.>", "--presence", "!x.y"]
    assert main(args) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), SECRET, algorithms=["HS256"])
    assert claims["pubsub"]["presence"] == ["x.>", "!x.y"]


def test_the_development_configuration_allows_presence_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    free = ["--http-listen", "127.0.0.1:0"]
    out, config, _ = run_dev(tmp_path, monkeypatch, capsys, *free)
    assert config.presence.tracks("chat.room1") and config.presence.tracks("any.topic.at.all")
    token_line = out.split("token (user")[1].splitlines()[1].strip()
    identity = TokenVerifier(config.auth).verify(token_line)
    assert identity.presence.allows_topic("chat.room1")
    # A development file from before presence was opt-in gets a hint how to turn it on.
    (tmp_path / ".pubsub-dev" / "broker.toml").write_text(f'[auth]\njwt_secret = "{SECRET}"\n')
    out, _, _ = run_dev(tmp_path, monkeypatch, capsys, *free)
    assert "presence is off: delete .pubsub-dev/broker.toml" in out


# --- the metrics -----------------------------------------------------------------------------


def test_presence_metrics_per_worker_and_for_the_hub() -> None:
    worker = snapshot_from_stats(
        {"worker": 0, "presence_members": 3, "presence_refused": {"forbidden": 2}}
    )
    text = render(merge([worker, hub_presence_snapshot(5)]))
    assert 'pubsub_presence_members{worker="0"} 3' in text
    assert 'pubsub_presence_members{worker="hub"} 5' in text
    assert 'pubsub_presence_refused_total{code="forbidden",worker="0"} 2' in text


# --- sessions, in memory ---------------------------------------------------------------------


async def test_untracked_topics_hold_no_presence_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker(presence={"topics": ["room"]})
    claims = {"subscribe": [">"], "presence": [">"]}
    async with running(worker) as nursery:
        ws = await connect(worker, nursery, f"/ws?token={token(pubsub=claims)}")
        await recv(ws)
        for i in range(50):
            assert (await call(ws, op="subscribe", topic=f"other.{i}", id=i))["ok"]
        store = worker.bus.store  # type: ignore[attr-defined]
        assert store.presence_members == 0 and not store._presence
        reply = await call(ws, op="presence", topic="other.1", id="p")
        assert reply["error"]["code"] == "not_tracked"
        reply = await call(ws, op="subscribe", topic="x", presence=True, id="s")
        assert reply["error"]["code"] == "not_tracked"
        assert "x" not in worker.router.index.exact  # the refused subscription was not made
        assert (await call(ws, op="subscribe", topic="room", presence=True, id="r"))["ok"]
        assert await recv(ws) == {"op": "join", "topic": "room", "client": "alice"}
        assert store.presence_members == 1 and set(store._presence) == {"room"}
        assert worker.stats()["presence_members"] == 1
        assert worker.stats()["presence_refused"] == {"not_tracked": 2}


async def test_reading_presence_needs_the_permission(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker(presence={"topics": [">"]})
    async with running(worker) as nursery:
        reader = await connect(worker, nursery, f"/ws?token={token('r')}")  # no claim, no default
        await recv(reader)
        assert (await call(reader, op="presence", topic="room", id=1))["error"][
            "code"
        ] == "forbidden"
        reply = await call(reader, op="subscribe", topic="room", presence=True, id=2)
        assert reply["error"]["code"] == "forbidden"
        # Subscribing without presence is allowed, and lists the client (the topic tracks it).
        assert (await call(reader, op="subscribe", topic="room", id=3))["ok"]
        assert worker.bus.presence_members() == 1
        assert worker.stats()["presence_refused"] == {"forbidden": 2}
        # Reading also needs the subscribe permission on the topic.
        claims = {"subscribe": ["room"], "presence": [">"]}
        other = await connect(worker, nursery, f"/ws?token={token('o', pubsub=claims)}")
        await recv(other)
        assert (await call(other, op="presence", topic="hall", id=1))["error"][
            "code"
        ] == "forbidden"
        assert (await call(other, op="presence", topic="room", id=2))["clients"] == ["r"]


async def test_a_refresh_that_revokes_presence_closes_with_1008(
    autojump_clock: trio.testing.MockClock,
) -> None:
    worker = make_worker(presence={"topics": [">"]})
    async with running(worker) as nursery:
        claims = {"subscribe": [">"], "presence": [">"]}
        ws = await connect(worker, nursery, f"/ws?token={token(pubsub=claims)}")
        await recv(ws)
        assert (await call(ws, op="subscribe", topic="a", presence=True, id=1))["ok"]
        assert (await call(ws, op="subscribe", topic="b", id=2))["ok"]
        # Still allowed to subscribe to both, no longer to read presence of "a".
        fresh = token(pubsub={"subscribe": [">"], "presence": ["b"]})
        await ws.send_message(f'{{"op": "auth", "token": "{fresh}"}}')
        assert await closed_with(ws) == 1008
        await trio.sleep(1)
        assert worker.bus.presence_members() == 0  # its entries went with it
