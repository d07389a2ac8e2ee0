"""RFC 9421 HTTP Message Signature verification (Ed25519) for incoming requests.

Contract — a request is authenticated iff all of these hold:

* a ``Signature-Input`` member with ``tag="fedgate"`` and parameters ``keyid``,
  ``created``, ``expires``, ``nonce`` (``alg``, if present, is ``ed25519``); the nonce and
  key id at most 64 characters, ``Signature-Input`` and ``Signature`` at most 4096 bytes;
* ``created <= now + skew``, ``now <= expires + skew``, ``expires - created <= window``
  and ``now - created <= window + skew``;
* the signature covers ``@method`` and ``@target-uri`` (the caller passes the URI at the
  node's own origin, so a signature made for another node does not verify) and, when the
  request declares a body, ``content-digest`` and ``content-type``;
* the Ed25519 signature over the RFC 9421 signature base verifies with the key the key id
  names (wire format by the ``http-message-signatures`` library), and that key is registered
  and not revoked;
* the body matches the RFC 9530 ``Content-Digest`` (sha-256) the signature covers;
* the nonce has not been accepted before from this key (checked by the caller, which
  persists it — see ``SignatureAuthMiddleware``).

Everything but the body is checked from the headers alone (``verify_signature``), so a request
is authenticated before its body is read; the body is then checked against the digest the
signature bound (``verify_body_digest``), hashed as it streams in.

Each failure raises a ``Problem`` whose type tells the signer what to fix, with one exception:
an unknown key id and a signature that does not verify are the same ``signature-invalid``,
reached by the same work, so a caller without a registered private key cannot learn which key
ids are registered or revoked. Only a signature that verifies can be told its key is revoked.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import http_sf
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from http_message_signatures import HTTPMessageVerifier, HTTPSignatureKeyResolver, algorithms
from http_message_signatures.exceptions import HTTPMessageSignaturesException

from gateway.node.identity import RegisteredKey, VerifiedRequest
from gateway.protocol.problems import Problem
from gateway.protocol.signing import BODY_COMPONENTS, REQUIRED_COMPONENTS, SIGNATURE_TAG

DEFAULT_WINDOW_SECONDS = 300
DEFAULT_SKEW_SECONDS = 5
MAX_NONCE_LENGTH = 64
MAX_KEY_ID_LENGTH = 64
MAX_SIGNATURE_FIELD_BYTES = 4096
# Stands in for an unknown key id, so an unknown key takes the same path and the same time as a
# registered key whose signature does not verify. Its private key is discarded at creation.
_NO_SUCH_KEY = Ed25519PrivateKey.generate().public_key()


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
    signature_input, signature = headers.get("signature-input"), headers.get("signature")
    if signature_input is None or signature is None:
        raise Problem(
            "signature-missing",
            "sign every request with RFC 9421 HTTP Message Signatures "
            "(Signature-Input and Signature headers); the fedgate client does this for you",
        )
    if max(len(signature_input), len(signature)) > MAX_SIGNATURE_FIELD_BYTES:
        raise Problem("signature-malformed", "Signature-Input and Signature may each be at most "
                                             f"{MAX_SIGNATURE_FIELD_BYTES} bytes")
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
    if len(params["nonce"]) > MAX_NONCE_LENGTH or len(params["keyid"]) > MAX_KEY_ID_LENGTH:
        raise Problem("signature-malformed", f"nonce and keyid may each be at most "
                                             f"{MAX_NONCE_LENGTH} characters")
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


def _claimed_content_digest(headers: _HeaderView) -> bytes:
    """The sha-256 member of Content-Digest (RFC 9530)."""
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
    if not isinstance(claimed, bytes):
        raise Problem("digest-mismatch", "Content-Digest must contain a sha-256 member")
    return claimed


def _invalid(reason: str) -> Problem:
    """The one refusal for an unknown key id and a signature that does not verify."""
    because = f" ({reason})" if reason else ""
    return Problem("signature-invalid", f"the signature does not verify with a key registered on "
                                        f"this node{because}; check that the owner registered "
                                        "your public key, and sign the request again")


def verify_signature(
    *,
    method: str,
    url: str,
    headers: list[tuple[str, str]],
    declares_body: bool,
    lookup_key: Callable[[str], RegisteredKey | None],
    now: float,
    window_seconds: int = DEFAULT_WINDOW_SECONDS,
    skew_seconds: int = DEFAULT_SKEW_SECONDS,
) -> VerifiedRequest:
    """Authenticate a request from its headers alone (see the module contract); the body, if
    ``declares_body``, must then pass ``verify_body_digest``. Raises ``Problem``."""
    view = _HeaderView(headers)
    params = _signature_parameters(view)
    key_id = str(params["keyid"])
    created, expires = int(params["created"]), int(params["expires"])  # type: ignore[call-overload]
    _check_freshness(created, expires, now, window_seconds, skew_seconds)
    content_digest = _claimed_content_digest(view) if declares_body else None
    key = lookup_key(key_id)
    candidate = key or RegisteredKey(key_id, "", "", _NO_SUCH_KEY, revoked=False)
    verifier = HTTPMessageVerifier(
        signature_algorithm=algorithms.ED25519, key_resolver=_SingleKeyResolver(candidate)
    )
    # Freshness is enforced above with our own window; give the library the same skew.
    verifier.max_clock_skew = dt.timedelta(seconds=skew_seconds)
    try:
        verifier.verify(
            _RequestView(method=method, url=url, headers=view),
            max_age=None,
            expect_tag=SIGNATURE_TAG,
            require_components=REQUIRED_COMPONENTS + (BODY_COMPONENTS if declares_body else ()),
        )
    except HTTPMessageSignaturesException as exc:
        raise _invalid(str(exc)) from None
    if key is None:
        raise _invalid("")
    if key.revoked:
        raise Problem("revoked-key", f"key {key_id} has been revoked; ask the owner for a new one")
    return VerifiedRequest(
        key_id=key_id,
        principal=key.principal,
        role=key.role,
        nonce=str(params["nonce"]),
        nonce_expires_at=float(expires + skew_seconds),
        content_digest=content_digest,
    )


def verify_body_digest(verified: VerifiedRequest, body_sha256: bytes, body_size: int) -> None:
    """The body received (its sha-256 and size) matches the Content-Digest the signature
    covers; a request that declared no body may not carry one. Raises ``Problem``."""
    if verified.content_digest is None:
        if body_size:
            raise Problem("digest-missing",
                          "requests with a body need an RFC 9530 Content-Digest (sha-256)")
        return
    if not hmac.compare_digest(verified.content_digest, body_sha256):
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
    """Authenticate a whole request held in memory: ``verify_signature`` then
    ``verify_body_digest``. Raises ``Problem``."""
    verified = verify_signature(method=method, url=url, headers=headers, declares_body=bool(body),
                                lookup_key=lookup_key, now=now, window_seconds=window_seconds,
                                skew_seconds=skew_seconds)
    verify_body_digest(verified, hashlib.sha256(body).digest(), len(body))
    return verified


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
