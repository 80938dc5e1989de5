"""Token verification, permissions, the origin policy and the handshake verdict."""

from __future__ import annotations

import base64
import datetime
import json
import time
from pathlib import Path

import jwt
import jwt.api_jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st

from broker.auth import Permissions, TokenVerifier, check_origin
from broker.config import AuthConfig
from broker.errors import AuthError
from broker.handshake import Accept, Reject, evaluate
from broker.topics import pattern_matches

SECRET = "s" * 40


def hs(claims: dict[str, object], key: str = SECRET) -> str:
    return jwt.encode(claims, key, algorithm="HS256")


def verifier(**kw: object) -> TokenVerifier:
    return TokenVerifier(AuthConfig(jwt_secret=SECRET, **kw))  # type: ignore[arg-type]


def reason_of(v: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthError) as info:
        v.verify(token)
    return info.value.reason


def test_a_good_token_names_its_client_and_permissions() -> None:
    exp = int(time.time()) + 60
    ident = verifier().verify(hs({"sub": "alice", "exp": exp, "pubsub": {"publish": ["a.>"]}}))
    assert ident.client == "alice"
    assert ident.expires_at == exp
    assert ident.publish.allows_topic("a.b")
    assert not ident.subscribe.allows_topic("a.b")  # claim present, key absent: nothing


def test_defaults_apply_without_the_claim() -> None:
    v = TokenVerifier(AuthConfig(jwt_secret=SECRET, default_subscribe=("news.*",)))
    ident = v.verify(hs({"sub": "bob", "exp": time.time() + 60}))
    assert ident.subscribe.allows_pattern("news.*")
    assert not ident.publish.allows_topic("news.x")


def test_refusals_have_precise_reasons() -> None:
    v = verifier()
    now = time.time()
    assert reason_of(v, hs({"sub": "a", "exp": now - 1})) == "expired"
    assert reason_of(v, hs({"sub": "a", "exp": now + 60, "nbf": now + 60})) == "not_yet_valid"
    assert reason_of(v, hs({"sub": "a", "exp": now + 60}, key="x" * 40)) == "bad_signature"
    assert reason_of(v, hs({"exp": now + 60})) == "missing_claim"
    assert reason_of(v, hs({"sub": "a"})) == "missing_claim"
    assert reason_of(v, "not.a.jwt") == "malformed"
    assert (
        reason_of(v, hs({"sub": "a", "exp": now + 60, "pubsub": {"publish": "a"}})) == "bad_claims"
    )


@pytest.mark.parametrize(
    ("exp", "expired"),
    [(-1, True), (0, True), (0.5, True), (1, False), ("99999999999", None)],
    ids=["before", "at", "within-the-second", "after", "a-string"],
)
def test_expiry_at_the_boundary(
    monkeypatch: pytest.MonkeyPatch, exp: float | str, expired: bool | None
) -> None:
    """A token is expired from its ``exp`` second on (PyJWT's check, the only one), on a
    clock frozen at a whole second; a numeric string, which PyJWT reads as a number, is
    refused as a bad claim."""
    frozen = 1_800_000_000

    class FrozenDatetime(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> FrozenDatetime:
            return cls.fromtimestamp(frozen, tz)

    monkeypatch.setattr(jwt.api_jwt, "datetime", FrozenDatetime)
    token = hs({"sub": "a", "exp": exp if isinstance(exp, str) else frozen + exp})
    if expired is None:
        assert reason_of(verifier(), token) == "bad_claims"
    elif expired:
        assert reason_of(verifier(), token) == "expired"
    else:
        assert verifier().verify(token).expires_at == frozen + 1


def test_claims_at_their_limits() -> None:
    v = verifier()
    exp = time.time() + 60
    assert v.verify(hs({"sub": "s" * 255, "exp": exp})).client == "s" * 255
    assert reason_of(v, hs({"sub": "s" * 256, "exp": exp})) == "bad_claims"
    assert reason_of(v, hs({"sub": "", "exp": exp})) == "bad_claims"
    for patterns in ([5], [""], ["a.>", None], "a.>"):
        claim = {"pubsub": {"subscribe": patterns}}
        assert reason_of(v, hs({"sub": "a", "exp": exp, **claim})) == "bad_claims", patterns
    assert reason_of(v, hs({"sub": "a", "exp": exp, "pubsub": ["a.>"]})) == "bad_claims"
    # No audience configured: a token's aud claim is not checked (it names other services).
    assert v.verify(hs({"sub": "a", "exp": exp, "aud": "elsewhere"})).client == "a"


def test_the_anonymous_identity_has_the_default_permissions() -> None:
    v = TokenVerifier(
        AuthConfig(
            jwt_secret=SECRET,
            allow_anonymous=True,
            default_publish=("pub.>",),
            default_subscribe=("sub.>", "!sub.secret.>"),
        )
    )
    anon = v.anonymous()
    assert (anon.client, anon.expires_at) == ("anonymous", None)
    assert anon.publish.allows_topic("pub.x") and not anon.publish.allows_topic("sub.x")
    assert anon.subscribe.allows_pattern("sub.*") and not anon.subscribe.allows_topic("pub.x")
    assert not anon.subscribe.allows_topic("sub.secret.x")


def test_alg_none_is_refused() -> None:
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT"}).encode()).rstrip(
        b"="
    )
    body = base64.urlsafe_b64encode(
        json.dumps({"sub": "a", "exp": time.time() + 60}).encode()
    ).rstrip(b"=")
    token = f"{header.decode()}.{body.decode()}."
    assert reason_of(verifier(), token) == "bad_signature"


def test_audience_and_issuer_are_checked_when_configured() -> None:
    v = verifier(audience="pubsub", issuer="auth.example")
    now = time.time() + 60
    ok = hs({"sub": "a", "exp": now, "aud": "pubsub", "iss": "auth.example"})
    assert v.verify(ok).client == "a"
    assert (
        reason_of(v, hs({"sub": "a", "exp": now, "aud": "other", "iss": "auth.example"}))
        == "bad_audience"
    )
    assert (
        reason_of(v, hs({"sub": "a", "exp": now, "aud": "pubsub", "iss": "evil"})) == "bad_issuer"
    )


def test_tokens_without_exp_need_the_configuration_to_allow_them() -> None:
    assert verifier(require_exp=False).verify(hs({"sub": "a"})).expires_at is None


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_public_key_tokens(tmp_path: Path, kind: str) -> None:
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        alg = "RS256"
    else:
        key = ec.generate_private_key(ec.SECP256R1())  # type: ignore[assignment]
        alg = "ES256"
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / "key.pem"
    path.write_bytes(pem)
    v = TokenVerifier(AuthConfig(jwt_public_key_file=str(path)))
    token = jwt.encode({"sub": "k", "exp": time.time() + 60}, key, algorithm=alg)
    assert v.verify(token).client == "k"
    # Key confusion: an HS256 token "signed" with the public key text must not pass.
    forged = jwt.encode({"sub": "k", "exp": time.time() + 60}, "x" * 40, algorithm="HS256")
    assert reason_of(v, forged) == "bad_signature"


def test_deny_wins_over_allow() -> None:
    perms = Permissions.from_list(["a.>", "!a.secret.>"])
    assert perms.allows_topic("a.public")
    assert not perms.allows_topic("a.secret.x")
    assert perms.allows_pattern("a.public.>")
    assert not perms.allows_pattern("a.>")  # could deliver a.secret.x
    assert not perms.allows_pattern("a.*.x")  # could deliver a.secret.x
    assert not perms.allows_pattern("b.*")


SEG = st.sampled_from(["a", "secret", "b", "x"])


@st.composite
def subscription_patterns(draw: st.DrawFn) -> str:
    segs = draw(st.lists(st.one_of(SEG, st.just("*")), min_size=1, max_size=4))
    if draw(st.booleans()):
        segs.append(">")
    return ".".join(segs)


@given(subscription_patterns(), st.lists(SEG, min_size=1, max_size=5).map(".".join))
def test_no_allowed_subscription_ever_delivers_a_denied_topic(pattern: str, topic: str) -> None:
    perms = Permissions.from_list(["a.>", "!a.secret.>"])
    if perms.allows_pattern(pattern) and pattern_matches(pattern, topic):
        assert perms.allows_topic(topic)
        assert not pattern_matches("a.secret.>", topic)


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "https://app.example.com.evil.com",
        "null",
        "http://app.example.com",
        "https://app.example.com:8443",
        "https://APP.example.com.",
        "https://app.example.com/",
    ],
)
def test_origin_matrix(origin: str) -> None:
    with pytest.raises(AuthError) as info:
        check_origin([origin], ("https://app.example.com",))
    assert (info.value.status, info.value.reason) == (403, "bad_origin")  # the metric's label


def test_origin_exact_match_and_absence_are_allowed() -> None:
    check_origin(["https://app.example.com"], ("https://app.example.com",))
    check_origin([], ("https://app.example.com",))
    check_origin(["https://anything"], ("*",))
    with pytest.raises(AuthError) as info:
        check_origin(
            ["https://app.example.com", "https://app.example.com"], ("https://app.example.com",)
        )
    assert (info.value.status, info.value.reason) == (400, "bad_origin")


def decide(
    target: str,
    headers: list[tuple[bytes, bytes]] | None = None,
    subprotocols: tuple[str, ...] = (),
    *,
    capacity: bool = False,
    anonymous: bool = False,
) -> Accept | Reject:
    return evaluate(
        target,
        headers or [],
        subprotocols,
        allowed_origins=("https://app.example.com",),
        verifier=verifier(allow_anonymous=anonymous),
        at_capacity=capacity,
    )


def test_handshake_order_and_statuses() -> None:
    good = hs({"sub": "a", "exp": time.time() + 60})
    assert isinstance(decide("/other"), Reject) and decide("/other").status == 404  # type: ignore[union-attr]
    bad_proto = decide("/ws", subprotocols=("mqtt",))
    assert isinstance(bad_proto, Reject) and bad_proto.status == 400
    # Origin is checked before the token: a forged token from a bad origin gets 403.
    evil = decide("/ws?token=garbage", [(b"origin", b"https://evil.example")])
    assert isinstance(evil, Reject) and evil.status == 403
    full = decide(f"/ws?token={good}", capacity=True)
    assert isinstance(full, Reject) and full.status == 503
    bad = decide("/ws?token=garbage")
    assert isinstance(bad, Reject) and bad.status == 401
    assert json.loads(bad.body())["error"]["code"] == "unauthorized"
    many = decide("/ws", [(b"x-h", b"v")] * 100)
    assert isinstance(many, Reject) and many.status == 400
    huge = decide("/ws", subprotocols=("p" * 10000,))
    assert isinstance(huge, Reject) and huge.status == 400


def test_handshake_token_sources() -> None:
    good = hs({"sub": "a", "exp": time.time() + 60})
    by_header = decide("/ws", [(b"authorization", f"Bearer {good}".encode())], ("pubsub.v1",))
    assert isinstance(by_header, Accept) and by_header.token_source == "header"
    assert by_header.subprotocol == "pubsub.v1"
    by_query = decide(f"/ws?token={good}")
    assert isinstance(by_query, Accept) and by_query.token_source == "query"
    assert by_query.subprotocol is None
    inband = decide("/ws")
    assert isinstance(inband, Accept) and inband.identity is None
    anon = decide("/ws", anonymous=True)
    assert (
        isinstance(anon, Accept)
        and anon.identity is not None
        and anon.identity.client == "anonymous"
    )
    basic = decide("/ws", [(b"authorization", b"Basic abc")])
    assert isinstance(basic, Reject) and basic.status == 401


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, tmp_path: Path) -> Path:
    path = tmp_path / "key.pem"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.mark.parametrize("key_kind", ["rsa", "ec"])
def test_only_the_algorithm_of_the_key_type_is_accepted(tmp_path: Path, key_kind: str) -> None:
    """An ES256 token against an RSA key (or RS256 against EC) is a 401 like any bad
    signature; PyJWT's InvalidKeyError must not escape as an internal error."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    configured, other, other_alg = (
        (rsa_key, ec_key, "ES256") if key_kind == "rsa" else (ec_key, rsa_key, "RS256")
    )
    v = TokenVerifier(AuthConfig(jwt_public_key_file=str(_pem(configured, tmp_path))))
    claims = {"sub": "k", "exp": time.time() + 60}
    assert reason_of(v, jwt.encode(claims, other, algorithm=other_alg)) == "bad_signature"
    # The other family's algorithms with the right key type are refused too.
    wrong = "RS384" if key_kind == "rsa" else "ES384"
    if key_kind == "ec":
        configured = ec.generate_private_key(ec.SECP384R1())
    assert reason_of(v, jwt.encode(claims, configured, algorithm=wrong)) == "bad_signature"


def test_an_unusable_public_key_file_names_the_key(tmp_path: Path) -> None:
    from broker.errors import ConfigError

    path = tmp_path / "key.pem"
    path.write_text("not a key")
    with pytest.raises(ConfigError) as info:
        TokenVerifier(AuthConfig(jwt_public_key_file=str(path)))
    assert info.value.key == "auth.jwt_public_key_file"
    _pem(ec.generate_private_key(ec.SECP384R1()), tmp_path)  # ES384 is not offered
    with pytest.raises(ConfigError, match="P-256"):
        TokenVerifier(AuthConfig(jwt_public_key_file=str(path)))


def test_a_sub_with_a_lone_surrogate_is_refused() -> None:
    assert reason_of(verifier(), hs({"sub": "\ud800", "exp": time.time() + 60})) == "bad_claims"


class Clock:
    """A clock for both the cache and PyJWT's own check, frozen until moved."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, now: float) -> None:
        self.now = now
        clock = self

        class FrozenDatetime(datetime.datetime):
            @classmethod
            def now(cls, tz: datetime.tzinfo | None = None) -> FrozenDatetime:
                return cls.fromtimestamp(clock.now, tz)

        monkeypatch.setattr(jwt.api_jwt, "datetime", FrozenDatetime)

    def __call__(self) -> float:
        return self.now


def counting_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every signature check (PyJWT's decode) from here on."""
    checked: list[str] = []
    real_decode = jwt.PyJWT.decode

    def decode(self: jwt.PyJWT, token: str, *args: object, **kwargs: object) -> object:
        checked.append(token)
        return real_decode(self, token, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(jwt.PyJWT, "decode", decode)
    return checked


def test_a_verified_token_is_remembered_until_its_exp_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock(monkeypatch, 1_800_000_000)
    checked = counting_checks(monkeypatch)
    v = TokenVerifier(AuthConfig(jwt_secret=SECRET), clock=clock)
    token = hs({"sub": "a", "exp": 1_800_000_010})
    first = v.verify(token)
    clock.now = 1_800_000_009.999  # the last instant before exp: still served from the cache
    assert v.verify(token) is first
    assert len(checked) == 1 and v.counts == {"miss": 1, "hit": 1}
    clock.now = 1_800_000_010  # exactly exp: refused, as the check itself refuses it
    assert reason_of(v, token) == "expired"
    assert len(checked) == 2
    assert reason_of(v, token) == "expired"  # and not remembered as valid again
    assert v.counts["hit"] == 1


def test_only_valid_tokens_are_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    checked = counting_checks(monkeypatch)
    v = verifier()
    forged = hs({"sub": "a", "exp": time.time() + 60}, key="x" * 40)
    for _ in range(3):
        assert reason_of(v, forged) == "bad_signature"
    assert len(checked) == 3 and not v.counts


def test_the_cache_keeps_at_most_its_size_least_recently_used_out_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checked = counting_checks(monkeypatch)
    v = verifier(token_cache_size=2)
    a, b, c = (hs({"sub": s, "exp": time.time() + 60}) for s in "abc")
    v.verify(a)
    v.verify(b)
    v.verify(a)  # a is now the most recently used: b goes first
    v.verify(c)
    assert v.counts == {"miss": 3, "hit": 1, "evicted": 1}
    checked.clear()
    v.verify(a)
    v.verify(c)
    assert checked == []  # both still remembered
    v.verify(b)
    assert checked == [b]  # b was the one dropped
    assert v.counts["evicted"] == 2  # and a (least recent now) made room for it


def test_a_cache_size_of_zero_checks_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    checked = counting_checks(monkeypatch)
    v = verifier(token_cache_size=0)
    token = hs({"sub": "a", "exp": time.time() + 60})
    v.verify(token)
    v.verify(token)
    assert len(checked) == 2 and not v.counts


def test_a_new_verifier_starts_empty_and_keeps_the_counts() -> None:
    """A reload builds a new verifier: the old key's tokens are not answered from memory."""
    v = verifier()
    token = hs({"sub": "a", "exp": time.time() + 60})
    v.verify(token)
    rotated = TokenVerifier(AuthConfig(jwt_secret="r" * 40), v.counts)
    assert reason_of(rotated, token) == "bad_signature"
    assert rotated.counts is v.counts and v.counts["miss"] == 1


def test_the_cache_counts_are_a_metric_per_worker() -> None:
    from broker.brokermetrics import snapshot_from_stats
    from broker.metrics import render

    text = render(snapshot_from_stats({"worker": 1, "token_cache": {"hit": 7, "evicted": 2}}))
    assert 'pubsub_token_cache_total{result="hit",worker="1"} 7' in text
    assert 'pubsub_token_cache_total{result="evicted",worker="1"} 2' in text


@pytest.mark.parametrize(
    ("patterns", "everything"),
    [([">"], True), (["a.>", ">"], True), (["a.>"], False), ([">", "!a.>"], False), ([], False)],
)
def test_a_grant_of_every_topic_is_known_without_matching(
    patterns: list[str], everything: bool
) -> None:
    perms = Permissions.from_list(patterns)
    assert perms.everything is everything
    topics = ["a.b", "x", "a", "b.c.d"]
    expected = [any(pattern_matches(p, t) for p in perms.allow) for t in topics]
    expected = [
        e and not any(pattern_matches(d, t) for d in perms.deny)
        for e, t in zip(expected, topics, strict=True)
    ]
    assert [perms.allows_topic(t) for t in topics] == expected
    assert perms == Permissions(perms.allow, perms.deny)  # not part of its value
