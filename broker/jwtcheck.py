"""A PyJWT decoder that does per token only the work that depends on the token.

A token the worker has not seen before (a client's first connect to a worker, and every
client of a restarted broker) is checked in full, and most of PyJWT's CPU for that check went
to steps that do not need to run per token, or not in that form:

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
  bytes must encode back to the same text (no non-canonical trailing bits: checked on the
  last character instead of by encoding the bytes again). The unit tests compare it with
  PyJWT's own on generated segments.
- **The HS256 check of a plain token** (:class:`_HS256Decoder`), half of what was left: the
  header of one issuer's tokens is the same few bytes on every token, yet PyJWT decoded and
  judged it on each, and went through two layers of option merging and calls. A token whose
  header segment is one already judged *plain* (a JSON object naming ``HS256``, with nothing
  but ``typ`` and a string ``kid`` beside ``alg``: nothing that changes how PyJWT reads the
  rest) is checked directly: its payload and signature segments by :func:`decode_segment`, the
  HMAC by the standard library, the claims by PyJWT's own ``_validate_claims`` with the same
  options. Whatever that path does not settle plainly (an unknown or unusual header, a
  segment that does not decode, a payload that is not a JSON object) goes to PyJWT with the
  same arguments, so every refusal is PyJWT's own; a wrong signature on a plain token is
  refused as PyJWT refuses it, with ``InvalidSignatureError``. At most
  :data:`PLAIN_HEADERS` plain header segments are remembered, and only from tokens whose
  signature was valid (so only the issuer's own); a client making up headers only costs
  itself a header decode more before PyJWT's check. A full check of a fresh token by
  :class:`~broker.auth.TokenVerifier` takes about 12 µs of CPU in a loop instead of 19.

Everything hooks into PyJWT through its decoder objects (``PyJWS.register_algorithm``, the
``_decode_base64url_segment`` step, ``PyJWT._jws``, ``_merge_options`` and
``_validate_claims``), never its module-wide defaults, so other users of PyJWT in the process
are unaffected. Should a PyJWT release rename the private hooks, the decoder falls back to
PyJWT's own steps: the same answers, only slower.
"""

from __future__ import annotations

import binascii
import hmac
import json
import re
from collections.abc import Sequence
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import DecodeError, InvalidSignatureError

__all__ = ["PLAIN_HEADERS", "decode_segment", "make_decoder"]

#: Plain header segments remembered per decoder (only from tokens whose signature was valid).
PLAIN_HEADERS = 16

_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*")
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_REPAD = {0: b"", 2: b"==", 3: b"="}
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# The last character of a segment 2 or 3 (mod 4) long carries 4 or 2 bits that decode to
# nothing: canonical only when they are zero.
_CANONICAL_LAST = {
    2: frozenset(_ALPHABET[i] for i in range(0, 64, 16)),
    3: frozenset(_ALPHABET[i] for i in range(0, 64, 4)),
}
# What a plain header may hold: nothing that changes how PyJWT reads the token (no ``crit``,
# no ``b64``, no ``jku`` to look at).
_PLAIN_HEADER_KEYS = frozenset({"alg", "typ", "kid"})


def decode_segment(segment: bytes, name: str) -> bytes:
    """The bytes of one base64url segment of a token, by PyJWT's rules (see the module).

    Raises :class:`jwt.DecodeError` ("Invalid <name> padding") where PyJWT would."""
    stripped = segment.rstrip(b"=")
    padding = len(segment) - len(stripped)
    tail = len(stripped) % 4
    if (
        padding > 2
        or (padding and len(segment) % 4)
        or tail == 1
        or _BASE64URL.fullmatch(stripped) is None
        or (tail and stripped[-1] not in _CANONICAL_LAST[tail])
    ):
        raise DecodeError(f"Invalid {name} padding")
    try:
        return binascii.a2b_base64(stripped.translate(_TO_STANDARD) + _REPAD[tail])
    except binascii.Error as err:  # (not reached with the alphabet checked: PyJWT's rule)
        raise DecodeError(f"Invalid {name} padding") from err


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


def _plain_header(segment: bytes) -> dict[str, Any] | None:
    """The header in ``segment``, decoded as PyJWT decodes it, if PyJWT accepts it for HS256
    and it changes nothing about how PyJWT reads the rest; else None."""
    try:
        header = json.loads(decode_segment(segment, "header"))
    except (DecodeError, ValueError, RecursionError):
        return None
    if (
        isinstance(header, dict)
        and header.get("alg") == "HS256"
        and header.keys() <= _PLAIN_HEADER_KEYS
        and isinstance(header.get("kid", ""), str)
    ):
        return header
    return None


class _HS256Decoder(jwt.PyJWT):
    """PyJWT's decoder with the direct check of plain HS256 tokens under the configured
    secret (see the module); anything else is PyJWT's own ``decode_complete``."""

    def __init__(self, secret: str | bytes, prepared: bytes) -> None:
        super().__init__()
        self._secret = secret
        self._prepared = prepared
        # header segment -> the plain header it holds (only those of validly signed tokens)
        self._plain: dict[bytes, dict[str, Any]] = {}
        # The last options given and what PyJWT merged them into (they rarely change)
        self._options: dict[str, Any] | None = None
        self._merged = self._merge_options(None)

    def decode_complete(  # type: ignore[override]
        self,
        jwt: str | bytes,
        key: Any = "",
        algorithms: Sequence[str] | None = None,
        options: Any = None,
        verify: bool | None = None,
        detached_payload: bytes | None = None,
        audience: Any = None,
        issuer: Any = None,
        subject: str | None = None,
        leeway: Any = 0,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if (
            key is self._secret
            and isinstance(jwt, str)
            and algorithms is not None
            and "HS256" in algorithms
            and verify is None
            and detached_payload is None
            and not kwargs
            and (options is None or options.get("verify_signature", True))
        ):
            decoded = self._plain_token(jwt.encode("utf-8"))
            if decoded is not None:
                if options != self._options:  # (the caller's usually are the same each time)
                    self._options = None if options is None else dict(options)
                    self._merged = self._merge_options(options)
                merged = self._merged
                self._validate_claims(
                    decoded["payload"],
                    merged,
                    audience=audience,
                    issuer=issuer,
                    subject=subject,
                    leeway=leeway,
                )
                return decoded
        return super().decode_complete(
            jwt,
            key,
            algorithms,
            options,
            verify=verify,
            detached_payload=detached_payload,
            audience=audience,
            issuer=issuer,
            subject=subject,
            leeway=leeway,
            **kwargs,
        )

    def _plain_token(self, token: bytes) -> dict[str, Any] | None:
        """``decode_complete``'s answer for a plain token with a valid signature, before its
        claims are checked; None when PyJWT must judge the token. Raises
        :class:`jwt.InvalidSignatureError` for a plain token whose signature is wrong."""
        signing_input, dot, crypto_segment = token.rpartition(b".")
        header_segment, dot2, payload_segment = signing_input.partition(b".")
        if not dot or not dot2:
            return None
        known = self._plain
        header = known.get(header_segment)
        remember = header is None
        if header is None:
            header = _plain_header(header_segment)
            if header is None:
                return None
        try:
            payload = decode_segment(payload_segment, "payload")
            signature = decode_segment(crypto_segment, "crypto")
        except DecodeError:
            return None
        if not hmac.compare_digest(signature, hmac.digest(self._prepared, signing_input, "sha256")):
            raise InvalidSignatureError("Signature verification failed")
        if remember and len(known) < PLAIN_HEADERS:
            # Only a header a token was signed with: a client cannot fill the memo with
            # made-up ones.
            known[header_segment] = header
        try:
            if payload[:1] == b"{" and payload[1:2] != b"\x00":
                # What json.loads does with bytes that start so (json.detect_encoding says
                # UTF-8), without finding that out again
                claims = json.loads(payload.decode("utf-8", "surrogatepass"))
            else:
                claims = json.loads(payload)
        except (ValueError, RecursionError):
            return None
        if not isinstance(claims, dict):
            return None
        return {"payload": claims, "header": dict(header), "signature": signature}


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
            if prepared.check_key_length(prepared._prepared) is None and all(
                hasattr(jwt.PyJWT, hook) for hook in ("_merge_options", "_validate_claims")
            ):
                # (a short secret: PyJWT warns on every check, so it checks them all; and
                # without the hooks, PyJWT's own steps)
                decoder = _HS256Decoder(key, prepared._prepared)
    decoder._jws = jws
    return decoder
