"""Who is asking: a registered key, and a request authenticated with one.

The signature check (``gateway.api.signatures``) looks keys up through
``Node.lookup_key`` and hands every authenticated request to the node's services as a
``VerifiedRequest``; the services decide with it and never see HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


@dataclass(frozen=True)
class RegisteredKey:
    """What the key registry knows about a key id."""

    key_id: str
    principal: str
    role: str
    public_key: Ed25519PublicKey
    revoked: bool


@dataclass(frozen=True)
class VerifiedRequest:
    """An authenticated request: who signed it, the nonce to remember until when, and the
    sha-256 its body must have (None when it declared no body)."""

    key_id: str
    principal: str
    role: str
    nonce: str
    nonce_expires_at: float
    content_digest: bytes | None = None
