"""Who a client is and what it may do: JWT verification, permissions, and the origin policy.

Tokens are verified with PyJWT against exactly one algorithm, fixed by the configuration:
HS256 for a shared secret, RS256 for an RSA public key file, ES256 for an EC (P-256) one. A
token cannot pick its own algorithm (``alg: none`` and key-confusion attacks are refused), and
a token whose algorithm does not match the key (an ES256 token against an RSA key) is refused
like any other bad signature (401 / ``unauthorized``), never an internal error.

Permissions are lists of patterns from the token's ``pubsub`` claim, or the configured
defaults. A pattern prefixed with ``!`` denies, and a deny always wins:
``["a.>", "!a.secret.>"]`` allows ``a.x`` but never ``a.secret.x``. A subscription pattern is
allowed only when one allowed pattern covers it wholly and it overlaps no denied pattern, so no
wildcard subscription can ever receive a denied topic.

Reading presence (the ``presence`` op, and ``join``/``leave`` events on a subscription) takes
a permission of its own, ``pubsub.presence`` (default ``[auth] default_presence``, empty):
who is subscribed is personal data, so being allowed to subscribe is not enough.

Verified tokens are remembered (``[auth] token_cache_size`` of them per worker, 10,000 by
default), keyed by the token's whole text: a client reconnecting with the same token (a
restart's reconnect storm, a page reload) skips the signature check and the claim parsing,
which were most of an authenticated connect's CPU. Only what passed every check is kept, so a
client sending bad tokens costs a full check each time and never grows the cache. A remembered
token is refused as expired from its ``exp`` second on, exactly as the check itself would
(``not_yet_valid`` cannot change: it passed once and time only moves on). The cache belongs to
its :class:`TokenVerifier`, and a reload builds a new one: new keys, audiences or default
permissions are never answered from the old cache. Its memory is bounded by the entry count:
an entry holds the token text (a few hundred bytes for the usual claims) and a reference to
an :class:`Identity` (whose permissions are shared); at the default, about 5 MiB per worker.
When full, the least recently used entry goes (counted as ``evicted``).
"""

from __future__ import annotations

import functools
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import jwt
import jwt.types

from broker.config import AuthConfig
from broker.errors import AuthError, FrameError
from broker.jwtcheck import make_decoder
from broker.keys import PublicKey, load_public_key
from broker.protocol import is_valid_unicode
from broker.topics import pattern_covers, pattern_matches, patterns_overlap, validate_pattern

__all__ = ["Identity", "Permissions", "TokenVerifier", "check_origin"]

ANONYMOUS = "anonymous"


@attrs.frozen
class Permissions:
    """Allowed and denied patterns for one action."""

    allow: tuple[str, ...]
    deny: tuple[str, ...]
    #: ``>`` allowed and nothing denied, the usual grant: every topic, known without matching.
    everything: bool = attrs.field(init=False, eq=False, repr=False)

    @everything.default
    def _allows_everything(self) -> bool:
        return not self.deny and ">" in self.allow

    @classmethod
    def from_list(cls, patterns: Iterable[str]) -> Permissions:
        allow: list[str] = []
        deny: list[str] = []
        for p in patterns:
            (deny if p.startswith("!") else allow).append(p.removeprefix("!"))
        return cls(tuple(allow), tuple(deny))

    def allows_topic(self, topic: str) -> bool:
        """Whether the exact ``topic`` is allowed."""
        # Plain loops: checked on every publish, and a generator per call costs more than
        # the usual one or two patterns themselves.
        if self.everything:
            return True
        for d in self.deny:
            if pattern_matches(d, topic):
                return False
        for a in self.allow:  # noqa: SIM110 (a generator per call is the cost avoided)
            if pattern_matches(a, topic):
                return True
        return False

    def allows_pattern(self, pattern: str) -> bool:
        """Whether every topic ``pattern`` can match is allowed."""
        if any(patterns_overlap(d, pattern) for d in self.deny):
            return False
        return any(pattern_covers(a, pattern) for a in self.allow)


@attrs.frozen
class Identity:
    """An authenticated client: its id (``sub``), when its token expires (unix seconds, or
    None), what it may publish and subscribe to, and whose presence it may read."""

    client: str
    expires_at: int | None
    publish: Permissions
    subscribe: Permissions
    presence: Permissions = Permissions((), ())


def _claimed(claim: Any, key: str, default: Permissions) -> Permissions:
    """The permissions of claim ``pubsub.<key>`` (``default`` without a ``pubsub`` claim)."""
    if claim is None:
        return default
    value = claim.get(key) if isinstance(claim, Mapping) else None
    if value is None:
        return _permissions((), key)
    if not isinstance(value, list):
        raise AuthError(f"the pubsub.{key} claim must be a list of patterns", reason="bad_claims")
    for v in value:  # (a loop, not all() over a generator: once per claim of a fresh token)
        if not isinstance(v, str) or not v:
            raise AuthError(
                f"the pubsub.{key} claim must be a list of patterns", reason="bad_claims"
            )
    return _permissions(tuple(value), key)


@functools.lru_cache(maxsize=1024)
def _permissions(patterns: tuple[str, ...], key: str) -> Permissions:
    """Checked and built once per distinct claim: clients holding tokens with the same
    patterns (the usual case) share one frozen object instead of each connection its own."""
    for pattern in patterns:
        try:
            validate_pattern(pattern.removeprefix("!"))
        except FrameError:
            raise AuthError(
                f"the pubsub.{key} claim holds an invalid pattern {pattern[:100]!r}",
                reason="bad_claims",
            ) from None
    return Permissions.from_list(patterns)


class TokenVerifier:
    """Verifies tokens against one configuration. Build a new one to reload keys.

    Raises :class:`ConfigError` if the public key file is not a usable key."""

    def __init__(
        self,
        cfg: AuthConfig,
        counts: Counter[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._cfg = cfg
        # token text -> who it names, least recently used first. An OrderedDict, not a dict:
        # taking a dict's first entry walks past every entry deleted before it (each hit
        # moves its token to the end, each eviction takes the first), about 2 µs of CPU an
        # eviction at 10,000 entries, where the OrderedDict's linked list takes 0.3.
        self._cache: OrderedDict[str, Identity] = OrderedDict()
        #: ``hit``, ``miss`` (verified and remembered) and ``evicted``; the worker passes the
        #: same counter to each new verifier, so the counts outlive reloads.
        self.counts: Counter[str] = Counter() if counts is None else counts
        self._clock = clock
        self._key: str | PublicKey
        if cfg.jwt_public_key_file:
            # Only the key type's own algorithm: offering PyJWT both RS256 and ES256 with an
            # RSA key made an ES256 token fail inside PyJWT's key preparation (InvalidKeyError)
            # instead of being refused as a token.
            self._key, algorithm = load_public_key(cfg.jwt_public_key_file)
            self._algorithms = [algorithm]
        else:
            self._key = cfg.jwt_secret
            self._algorithms = ["HS256"]
        # PyJWT's check with the key prepared once (``broker/jwtcheck.py``): a first connect
        # to each worker pays the check, so with more workers there are more of them.
        self._decoder = make_decoder(self._algorithms[0], self._key)
        # PyJWT's options, the same for every token (PyJWT copies them; nothing changes them)
        required = ["sub", "exp"] if cfg.require_exp else ["sub"]
        self._options: jwt.types.Options = {"require": required, "verify_aud": bool(cfg.audience)}
        self._default_publish = Permissions.from_list(cfg.default_publish)
        self._default_subscribe = Permissions.from_list(cfg.default_subscribe)
        self._default_presence = Permissions.from_list(cfg.default_presence)

    @property
    def allow_anonymous(self) -> bool:
        return self._cfg.allow_anonymous

    def anonymous(self) -> Identity:
        return Identity(
            ANONYMOUS,
            None,
            self._default_publish,
            self._default_subscribe,
            self._default_presence,
        )

    def verify(self, token: str) -> Identity:
        """Check ``token``'s signature and claims, or find it remembered; return who it names.
        Raises as :meth:`check` does."""
        cache = self._cache
        identity = cache.get(token)
        if identity is not None:
            # PyJWT's own rule (expired once int(exp) <= now, no leeway): a remembered token
            # expires exactly when the check would refuse it.
            exp = identity.expires_at
            if exp is None or exp > self._clock():
                cache.move_to_end(token)  # the most recently used again
                self.counts["hit"] += 1
                return identity
            del cache[token]
        identity = self._check(token)
        size = self._cfg.token_cache_size
        if size:
            if len(cache) >= size:
                cache.popitem(last=False)
                self.counts["evicted"] += 1
            cache[token] = identity
            self.counts["miss"] += 1
        return identity

    def _check(self, token: str) -> Identity:
        """Check ``token``'s signature and claims; return who it names.

        Raises :class:`AuthError` (status 401) with a ``reason`` of ``malformed``,
        ``bad_signature``, ``expired``, ``not_yet_valid``, ``bad_audience``, ``bad_issuer``,
        ``missing_claim`` or ``bad_claims``.

        Expiry is PyJWT's check alone (a token is expired from its ``exp`` second on): a check
        of our own after it could only decide if the clock passed ``exp`` in between, and the
        session then closes the connection at once with 4003 anyway.
        """
        try:
            claims = self._decoder.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._cfg.audience or None,
                issuer=self._cfg.issuer or None,
                options=self._options,
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token has expired", reason="expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError(
                "token is not valid yet (nbf/iat in the future)", reason="not_yet_valid"
            ) from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience does not match", reason="bad_audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer does not match", reason="bad_issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(
                f"token lacks the '{exc.claim}' claim", reason="missing_claim"
            ) from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature is invalid", reason="bad_signature") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("token algorithm is not accepted", reason="bad_signature") from None
        except jwt.InvalidTokenError:
            raise AuthError("token is malformed", reason="malformed") from None
        except (jwt.PyJWTError, ValueError):
            # e.g. InvalidKeyError, or a token that is not even encodable: still the token's
            # fault, and answered as such rather than as an internal error.
            raise AuthError("token cannot be verified with this key", reason="malformed") from None
        sub = claims.get("sub")
        # A lone surrogate (JSON allows the escape) could never be written into a welcome.
        if not isinstance(sub, str) or not sub or len(sub) > 255 or not is_valid_unicode(sub):
            raise AuthError("the sub claim must be a non-empty string", reason="bad_claims")
        exp = claims.get("exp")
        if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int | float)):
            raise AuthError("the exp claim must be a number", reason="bad_claims")
        claim = claims.get("pubsub")
        if claim is not None and not isinstance(claim, Mapping):
            raise AuthError("the pubsub claim must be an object", reason="bad_claims")
        return Identity(
            client=sub,
            expires_at=None if exp is None else int(exp),
            publish=_claimed(claim, "publish", self._default_publish),
            subscribe=_claimed(claim, "subscribe", self._default_subscribe),
            presence=_claimed(claim, "presence", self._default_presence),
        )


def check_origin(origins: list[str], allowed: tuple[str, ...]) -> None:
    """Apply the origin policy to the request's ``Origin`` header values.

    No header: a non-browser client, allowed. One header: allowed when it equals an allowed
    origin exactly (scheme, host and port), or when ``"*"`` is configured. Raises
    :class:`AuthError` with status 403, or 400 for duplicate headers.
    """
    if not origins:
        return
    if len(origins) > 1:
        raise AuthError("more than one Origin header", reason="bad_origin", status=400)
    if "*" in allowed:
        return
    origin = origins[0]
    if origin not in allowed:
        raise AuthError(f"origin {origin[:200]!r} is not allowed", reason="bad_origin", status=403)
