"""A PyJWT decoder that does per token only the work that depends on the token.

A token the worker has not seen before (a client's first connect to a worker, and every
client of a restarted broker) is checked in full by PyJWT, and about half of that check's CPU
went to two steps that do not need to run per token:

- **Preparing the HMAC key.** ``HMACAlgorithm.prepare_key`` refuses secrets that look like a
  PEM, SSH or DER key, a certificate or a JSON Web Key, and it ran on every call with the same
  configured secret. :class:`_PreparedHMAC` runs it once, when the decoder is built, and
  answers that same secret object from then on; any other key still goes through PyJWT's own
  preparation. A secret PyJWT refuses is not prepared ahead, so it is refused per token as
  before.
- **Checking the base64url alphabet** of each segment, which PyJWT does with a generator per
  byte (GHSA-hxm8-2xgr-2p9m). :func:`decode_segment` checks it with one compiled regular
  expression and otherwise keeps PyJWT's rules exactly: at most two ``=`` of padding and only
  on a segment whose length is a multiple of four, no length of 1 modulo 4, and the decoded
  bytes must encode back to the same text (no non-canonical trailing bits). The unit tests
  compare it with PyJWT's own on generated segments.

Both hook into PyJWT through its decoder objects (``PyJWS.register_algorithm``, the
``_decode_base64url_segment`` step and ``PyJWT._jws``), never its module-wide defaults, so
other users of PyJWT in the process are unaffected. Should a PyJWT release rename the private
hooks, the decoder falls back to PyJWT's own steps: the same answers, only slower.
"""

from __future__ import annotations

import binascii
import re
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import DecodeError
from jwt.utils import base64url_decode, base64url_encode

__all__ = ["decode_segment", "make_decoder"]

_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*")


def decode_segment(segment: bytes, name: str) -> bytes:
    """The bytes of one base64url segment of a token, by PyJWT's rules (see the module).

    Raises :class:`jwt.DecodeError` ("Invalid <name> padding") where PyJWT would."""
    stripped = segment.rstrip(b"=")
    padding = len(segment) - len(stripped)
    if (
        padding > 2
        or (padding and len(segment) % 4)
        or len(stripped) % 4 == 1
        or _BASE64URL.fullmatch(stripped) is None
    ):
        raise DecodeError(f"Invalid {name} padding")
    try:
        decoded = base64url_decode(stripped)
    except (TypeError, binascii.Error) as err:
        raise DecodeError(f"Invalid {name} padding") from err
    if base64url_encode(decoded) != stripped:
        raise DecodeError(f"Invalid {name} padding")
    return decoded


class _JWS(jwt.PyJWS):
    """PyJWS with the alphabet check of :func:`decode_segment`."""

    _decode_base64url_segment = staticmethod(decode_segment)


class _PreparedHMAC(HMACAlgorithm):
    """An HMAC algorithm that prepares the configured secret once."""

    def __init__(self, hash_alg: Any, secret: str | bytes) -> None:
        super().__init__(hash_alg)
        self._secret = secret
        self._prepared = super().prepare_key(secret)

    def prepare_key(self, key: str | bytes) -> bytes:
        if key is self._secret:
            return self._prepared
        return super().prepare_key(key)


def make_decoder(algorithm: str, key: Any) -> jwt.PyJWT:
    """A PyJWT decoder for tokens signed with ``algorithm`` under ``key``; its ``decode``
    takes the same arguments and gives the same answers as ``jwt.decode``. Only the given
    algorithm is registered on it (the caller still passes ``algorithms``)."""
    decoder = jwt.PyJWT()
    jws = _JWS(algorithms=[algorithm], options=decoder._jws.options)
    if algorithm == "HS256" and isinstance(key, str | bytes):
        try:
            prepared = _PreparedHMAC(HMACAlgorithm.SHA256, key)
        except jwt.InvalidKeyError:
            pass  # refused per token, as PyJWT does
        else:
            jws.unregister_algorithm(algorithm)
            jws.register_algorithm(algorithm, prepared)
    decoder._jws = jws
    return decoder
