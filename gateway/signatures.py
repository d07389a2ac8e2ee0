"""RFC 9421 HTTP Message Signature verification (Ed25519) for incoming requests.

Contract — a request is authenticated iff all of these hold:

* a ``Signature-Input`` member with ``tag="fedgate"`` and parameters ``keyid``,
  ``created``, ``expires``, ``nonce`` (``alg``, if present, is ``ed25519``);
* the key id is registered and not revoked;
* ``created <= now + skew``, ``now <= expires + skew``, ``expires - created <= window``
  and ``now - created <= window + skew``;
* the signature covers ``@method`` and ``@target-uri`` and, when there is a body,
  ``content-digest`` and ``content-type``; the RFC 9530 ``Content-Digest`` (sha-256)
  matches the received bytes;
* the Ed25519 signature over the RFC 9421 signature base verifies
  (wire format by the ``http-message-signatures`` library);
* the nonce has not been accepted before from this key (checked by the caller, which
  persists it — see ``SignatureAuthMiddleware``).

Each failure raises a ``Problem`` with its own type, so clients can tell what to fix.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import http_sf
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from http_message_signatures import HTTPMessageVerifier, HTTPSignatureKeyResolver, algorithms
from http_message_signatures.exceptions import HTTPMessageSignaturesException

from gateway.problems import Problem

SIGNATURE_TAG = "fedgate"
REQUIRED_COMPONENTS = ("@method", "@target-uri")
BODY_COMPONENTS = ("content-digest", "content-type")
DEFAULT_WINDOW_SECONDS = 300
DEFAULT_SKEW_SECONDS = 5


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
    """An authenticated request: who signed it, and the nonce to remember until when."""

    key_id: str
    principal: str
    role: str
    nonce: str
    nonce_expires_at: float


class _HeaderView:
    """Read-only header view in the shape the signature library expects."""

    def __init__(self, fields: list[tuple[str, str]]) -> None:
        self._fields = fields

    def items(self) -> Iterable[tuple[str, str]]:
        return list(self._fields)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(name for name, _ in self._fields))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(k.lower() == name.lower() for k, _ in self._fields)

    def get(self, name: str) -> str | None:
        values = [v for k, v in self._fields if k.lower() == name.lower()]
        return ", ".join(values) if values else None


@dataclass
class _RequestView:
    method: str
    url: str
    headers: _HeaderView


class _SingleKeyResolver(HTTPSignatureKeyResolver):
    def __init__(self, key: RegisteredKey) -> None:
        self._key = key

    def resolve_public_key(self, key_id: str) -> Ed25519PublicKey | None:
        return self._key.public_key if key_id == self._key.key_id else None

    def resolve_private_key(self, key_id: str) -> None:
        raise NotImplementedError("the gateway never signs with researcher keys")


def _signature_parameters(headers: _HeaderView) -> dict[str, object]:
    """Parameters of the ``tag="fedgate"`` member of Signature-Input."""
    signature_input = headers.get("signature-input")
    if signature_input is None or headers.get("signature") is None:
        raise Problem(
            "signature-missing",
            "sign every request with RFC 9421 HTTP Message Signatures "
            "(Signature-Input and Signature headers); the fedgate client does this for you",
        )
    try:
        members = http_sf.parse(signature_input.encode("latin-1"), tltype="dictionary")
    except Exception as exc:  # the parser raises several exception types
        raise Problem(
            "signature-malformed", f"Signature-Input is not a structured field: {exc}"
        ) from None
    tagged = [params for _, (_, params) in members.items() if params.get("tag") == SIGNATURE_TAG]
    if len(tagged) != 1:
        raise Problem(
            "signature-malformed", f'exactly one signature must carry tag="{SIGNATURE_TAG}"'
        )
    params = tagged[0]
    missing = [p for p in ("keyid", "created", "expires", "nonce") if p not in params]
    if missing:
        raise Problem("signature-malformed", f"signature parameters missing: {', '.join(missing)}")
    if type(params["created"]) is not int or type(params["expires"]) is not int:
        raise Problem("signature-malformed", "created and expires must be integers")
    if not isinstance(params["keyid"], str) or not isinstance(params["nonce"], str):
        raise Problem("signature-malformed", "keyid and nonce must be strings")
    if params.get("alg", "ed25519") != "ed25519":
        raise Problem("signature-malformed", 'alg must be "ed25519"')
    return dict(params)


def _check_freshness(created: int, expires: int, now: float, window: int, skew: int) -> None:
    if created > now + skew:
        raise Problem(
            "signature-from-future",
            f"signature created {created - now:.0f} s in the future; check the client clock",
        )
    if expires - created > window:
        raise Problem(
            "signature-expired",
            f"signature validity {expires - created} s exceeds the node's window of {window} s",
        )
    if now > expires + skew or now - created > window + skew:
        raise Problem("signature-expired", "signature has expired; sign the request again")


def _check_content_digest(headers: _HeaderView, body: bytes) -> None:
    value = headers.get("content-digest")
    if value is None:
        raise Problem(
            "digest-missing", "requests with a body need an RFC 9530 Content-Digest (sha-256)"
        )
    try:
        members = http_sf.parse(value.encode("latin-1"), tltype="dictionary")
        claimed = members["sha-256"][0]
    except Exception:
        raise Problem("digest-mismatch", "Content-Digest must contain a sha-256 member") from None
    if not isinstance(claimed, bytes) or not hmac.compare_digest(
        claimed, hashlib.sha256(body).digest()
    ):
        raise Problem("digest-mismatch", "the body does not match its Content-Digest")


def verify_request(
    *,
    method: str,
    url: str,
    headers: list[tuple[str, str]],
    body: bytes,
    lookup_key: Callable[[str], RegisteredKey | None],
    now: float,
    window_seconds: int = DEFAULT_WINDOW_SECONDS,
    skew_seconds: int = DEFAULT_SKEW_SECONDS,
) -> VerifiedRequest:
    """Authenticate one request (see the module contract); raises ``Problem``."""
    view = _HeaderView(headers)
    params = _signature_parameters(view)
    key_id = str(params["keyid"])
    key = lookup_key(key_id)
    if key is None:
        raise Problem("unknown-key", f"key {key_id} is not registered on this node")
    if key.revoked:
        raise Problem("revoked-key", f"key {key_id} has been revoked; ask the owner for a new one")
    created, expires = int(params["created"]), int(params["expires"])  # type: ignore[call-overload]
    _check_freshness(created, expires, now, window_seconds, skew_seconds)
    required = REQUIRED_COMPONENTS + (BODY_COMPONENTS if body else ())
    if body:
        _check_content_digest(view, body)
    verifier = HTTPMessageVerifier(
        signature_algorithm=algorithms.ED25519, key_resolver=_SingleKeyResolver(key)
    )
    # Freshness is enforced above with our own window; give the library the same skew.
    verifier.max_clock_skew = dt.timedelta(seconds=skew_seconds)
    try:
        verifier.verify(
            _RequestView(method=method, url=url, headers=view),
            max_age=None,
            expect_tag=SIGNATURE_TAG,
            require_components=required,
            body=body,
        )
    except HTTPMessageSignaturesException as exc:
        raise Problem("signature-invalid", f"signature does not verify: {exc}") from None
    return VerifiedRequest(
        key_id=key_id,
        principal=key.principal,
        role=key.role,
        nonce=str(params["nonce"]),
        nonce_expires_at=float(expires + skew_seconds),
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
