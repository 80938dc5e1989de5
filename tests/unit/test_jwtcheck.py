"""The PyJWT decoder of ``broker/jwtcheck.py`` answers exactly as PyJWT's own steps do."""

from __future__ import annotations

import base64
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jwt.algorithms import HMACAlgorithm
from jwt.warnings import InsecureKeyLengthWarning

from broker.jwtcheck import PLAIN_HEADERS, decode_segment, make_decoder

SECRET = "s" * 40

# base64url text, padding, and bytes a token must not hold, in any mix
segments = st.lists(
    st.sampled_from([b"A", b"z", b"0", b"-", b"_", b"=", b"+", b"/", b"!", b".", b"\xc3", b" "]),
    max_size=14,
).map(b"".join)


def answer(decode: object, segment: bytes) -> bytes | str:
    try:
        return decode(segment, "payload")  # type: ignore[operator, no-any-return]
    except jwt.DecodeError as exc:
        return f"DecodeError: {exc}"


@given(segments | st.binary(max_size=12))
@example(b"QQ")  # canonical
@example(b"QR")  # non-canonical trailing bits
@example(b"QQ==")
@example(b"QQ=")
@example(b"QQ===")
@example(b"QUFB====")  # four "=" on a whole quantum
@example(b"A")
@example(b"AAAA\n")
def test_a_segment_decodes_exactly_as_pyjwt_decodes_it(segment: bytes) -> None:
    ours = answer(decode_segment, segment)
    assert ours == answer(jwt.PyJWS._decode_base64url_segment, segment)


def test_the_configured_secret_is_prepared_once(monkeypatch: pytest.MonkeyPatch) -> None:
    token = jwt.encode({"sub": "a", "exp": time.time() + 60}, SECRET, algorithm="HS256")
    prepared: list[object] = []
    real = HMACAlgorithm.prepare_key

    def prepare_key(self: HMACAlgorithm, key: str | bytes) -> bytes:
        prepared.append(key)
        return real(self, key)

    monkeypatch.setattr(HMACAlgorithm, "prepare_key", prepare_key)
    decoder = make_decoder("HS256", SECRET)
    for _ in range(3):
        assert decoder.decode(token, SECRET, algorithms=["HS256"])["sub"] == "a"
    assert prepared == [SECRET]
    # any other key is still prepared (and checked) by PyJWT per call
    with pytest.raises(jwt.InvalidSignatureError):
        decoder.decode(token, "t" * 40, algorithms=["HS256"])
    assert prepared == [SECRET, "t" * 40]


def test_a_secret_pyjwt_refuses_is_refused_per_token() -> None:
    pem = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
    token = jwt.encode({"sub": "a"}, SECRET, algorithm="HS256")
    with pytest.raises(jwt.InvalidKeyError):
        make_decoder("HS256", pem).decode(token, pem, algorithms=["HS256"])


# --- the direct HS256 check answers as PyJWT does -------------------------------------------

OTHER_SECRET = "t" * 40
NOW = int(time.time())  # claims 1,000 s either side of it: valid for a long test run


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


headers = st.sampled_from(
    [
        {"alg": "HS256", "typ": "JWT"},
        {"typ": "JWT", "alg": "HS256"},
        {"alg": "HS256"},
        {"alg": "HS256", "kid": "k1"},
        {"alg": "HS256", "kid": 5},
        {"alg": "HS256", "jku": "https://example.com"},
        {"alg": "HS384", "typ": "JWT"},
        {"alg": "none"},
        {"alg": "HS256", "b64": False, "crit": ["b64"]},
        {"alg": "HS256", "crit": ["exp"]},
        {"typ": "JWT"},
        [1, 2],
        "HS256",
    ]
).map(lambda h: json.dumps(h).encode()) | st.sampled_from([b"{", b"", b"\xff"])
times = st.sampled_from([NOW - 1000, NOW + 1000, "soon", 1.5e12, None, True])
claims = st.fixed_dictionaries(
    {},
    optional={
        "sub": st.sampled_from(["a", "", 7, None]),
        "exp": times,
        "nbf": times,
        "iat": times,
        "aud": st.sampled_from(["a", ["a", "b"], ["c"], 5, []]),
        "iss": st.sampled_from(["i", "j", 3]),
        "jti": st.sampled_from(["x", 1]),
    },
).map(lambda c: json.dumps(c).encode()) | st.sampled_from(
    [b"[]", b"{", b"7", b"", b"{\xff}", b"{\x00\x00\x00", b"\xef\xbb\xbf{}", b'{"sub":"\\ud800"}']
)
mutations = st.sampled_from(
    ["none", "flip", "pad", "pad3", "noncanonical", "two_segments", "four_segments", "space"]
)


def make_token(header: bytes, payload: bytes, secret: str, mutation: str) -> str:
    signing_input = b64(header) + b"." + b64(payload)
    signature = b64(hmac.digest(secret.encode(), signing_input, "sha256"))
    if mutation == "flip":
        signature = (b"B" if signature[:1] == b"A" else b"A") + signature[1:]
    elif mutation == "pad":
        signature += b"="
    elif mutation == "pad3":
        signature += b"==="
    elif mutation == "noncanonical":  # 43 characters: the last one carries 2 spare bits
        signature = signature[:-1] + (b"B" if signature[-1:] == b"A" else b"A")
    token = signing_input + b"." + signature
    if mutation == "two_segments":
        token = signing_input
    elif mutation == "four_segments":
        token += b".AAAA"
    elif mutation == "space":
        token = b" " + token
    return token.decode()


def outcome(decode: Any, token: str, options: dict[str, Any], **kwargs: Any) -> object:
    try:
        return ("ok", decode(token, SECRET, algorithms=["HS256"], options=options, **kwargs))
    except Exception as exc:  # the answer compared, whatever it is
        return (type(exc).__name__, str(exc))


# (no deadline: a loaded machine makes an example of real HMAC and JSON take over 200 ms)
@settings(max_examples=300, deadline=None)
@given(
    header=headers,
    payload=claims,
    signed_with=st.sampled_from([SECRET, OTHER_SECRET]),
    mutation=mutations,
    require=st.sampled_from([["sub"], ["sub", "exp"], []]),
    audience=st.sampled_from([None, "a", ["a", "b"]]),
    issuer=st.sampled_from([None, "i"]),
)
def test_a_token_is_answered_exactly_as_pyjwt_answers_it(
    header: bytes,
    payload: bytes,
    signed_with: str,
    mutation: str,
    require: list[str],
    audience: str | list[str] | None,
    issuer: str | None,
) -> None:
    token = make_token(header, payload, signed_with, mutation)
    options: dict[str, Any] = {"require": require, "verify_aud": audience is not None}
    kwargs = {"audience": audience, "issuer": issuer, "leeway": 0}
    decoder = make_decoder("HS256", SECRET)
    # twice: the second time with the header remembered, if it was plain and signed
    for _ in range(2):
        ours = outcome(decoder.decode, token, options, **kwargs)
        assert ours == outcome(jwt.decode, token, options, **kwargs)


def test_a_plain_token_is_checked_without_pyjwts_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = make_decoder("HS256", SECRET)
    now = int(time.time())  # (not NOW: the suite may have run for minutes since import)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("PyJWT's own check ran")

    monkeypatch.setattr(jwt.PyJWS, "decode_complete", refuse)
    token = jwt.encode({"sub": "a", "exp": now + 60}, SECRET, algorithm="HS256")
    assert decoder.decode(token, SECRET, algorithms=["HS256"])["sub"] == "a"
    with pytest.raises(jwt.InvalidSignatureError):
        decoder.decode(token[:-2] + "AA", SECRET, algorithms=["HS256"])
    with pytest.raises(jwt.ExpiredSignatureError):
        expired = jwt.encode({"sub": "a", "exp": now - 60}, SECRET, algorithm="HS256")
        decoder.decode(expired, SECRET, algorithms=["HS256"])
    # an unusual header is PyJWT's to judge
    unusual = jwt.encode({"sub": "a"}, SECRET, algorithm="HS256", headers={"jku": "x"})
    with pytest.raises(AssertionError, match="PyJWT's own check ran"):
        decoder.decode(unusual, SECRET, algorithms=["HS256"])


def test_only_headers_of_validly_signed_tokens_are_remembered() -> None:
    decoder = make_decoder("HS256", SECRET)
    for i in range(PLAIN_HEADERS * 2):
        forged = jwt.encode({"sub": "a"}, OTHER_SECRET, algorithm="HS256", headers={"kid": f"{i}"})
        with pytest.raises(jwt.InvalidSignatureError):
            decoder.decode(forged, SECRET, algorithms=["HS256"])
    assert decoder._plain == {}  # type: ignore[attr-defined]
    token = jwt.encode({"sub": "a"}, SECRET, algorithm="HS256")
    decoder.decode(token, SECRET, algorithms=["HS256"])
    assert list(decoder._plain) == [token.encode().split(b".")[0]]  # type: ignore[attr-defined]


def test_a_short_secret_is_checked_by_pyjwt_with_its_warning() -> None:
    short = "s" * 8
    with pytest.warns(InsecureKeyLengthWarning):
        token = jwt.encode({"sub": "a"}, short, algorithm="HS256")
    decoder = make_decoder("HS256", short)
    with pytest.warns(InsecureKeyLengthWarning):
        assert decoder.decode(token, short, algorithms=["HS256"])["sub"] == "a"
    assert not hasattr(decoder, "_plain")
