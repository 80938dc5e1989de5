"""The PyJWT decoder of ``broker/jwtcheck.py`` answers exactly as PyJWT's own steps do."""

from __future__ import annotations

import time

import jwt
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from jwt.algorithms import HMACAlgorithm

from broker.jwtcheck import decode_segment, make_decoder

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
