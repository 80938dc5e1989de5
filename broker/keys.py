"""Public keys for token checks: reading the PEM file that ``[auth] jwt_public_key_file`` names.

Both the configuration check (:mod:`broker.config`, at load) and the token verifier
(:mod:`broker.auth`) read keys through here, so neither imports the other for it."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from broker.errors import ConfigError

__all__ = ["PublicKey", "load_public_key"]

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def load_public_key(path: str) -> tuple[PublicKey, str]:
    """The PEM public key in ``path`` and the one algorithm it verifies (RS256 or ES256).

    Raises :class:`ConfigError` (naming ``auth.jwt_public_key_file``) when the file cannot be
    read or holds anything but an RSA or an EC P-256 public key."""
    key_name = "auth.jwt_public_key_file"
    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(key_name, f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise ConfigError(key_name, f"{path} does not hold a PEM public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise ConfigError(key_name, "must be an RSA (RS256) or EC P-256 (ES256) public key")
