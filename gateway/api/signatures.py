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
* the Ed25519 signature over the RFC 9421 signature base (section 2.5, built here from one
  parse of each field; ``tests/test_signatures.py`` checks it against the
  ``http-message-signatures`` library that the SDK signs with) verifies with the key the key
  id names, and that key is registered and not revoked; the covered components are plain
  names (no component parameters), the derived ones among ``@method``, ``@target-uri``,
  ``@authority``, ``@scheme``, ``@request-target``, ``@path`` and ``@query``;
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
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import http_sf
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_message_signatures._url import parse_url  # the URL grammar the signing client uses
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


_SIGNATURE_PARAMETERS = frozenset({"alg", "created", "expires", "keyid", "nonce", "tag"})
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _field_lines(headers: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Each header's field lines by lowercase name, in wire order, with obsolete line folding
    unfolded and surrounding whitespace trimmed (RFC 9421 section 2.1)."""
    fields: dict[str, list[str]] = {}
    for name, value in headers:
        if "\r\n" in value:
            value = _OBS_FOLD.sub(" ", value)
        fields.setdefault(name.lower(), []).append(value.strip(" \t"))
    return fields


_OBS_FOLD = re.compile(r"(?:(?<![ \t])[ \t]+)?\r\n[ \t]+")


def _field(fields: dict[str, list[str]], name: str) -> str | None:
    """A header's value: its field lines joined by ", " (RFC 9421 section 2.1)."""
    lines = fields.get(name)
    return None if lines is None else ", ".join(lines)


def _parse_dictionary(value: str) -> dict[str, Any]:
    """An RFC 8941 Dictionary; a repeated member is refused (RFC 8941 would keep the last)."""
    def refuse_duplicate(key: str, context: str) -> None:
        if context == "dictionary":
            raise ValueError(f'duplicate member "{key}"')

    return http_sf.parse(value.encode("latin-1"), tltype="dictionary",  # type: ignore[return-value]
                         on_duplicate_key=refuse_duplicate)


@dataclass(frozen=True)
class _Signature:
    """The ``tag="fedgate"`` signature of a request: its covered component names, in order,
    its parameters, in order, and the Ed25519 signature bytes."""

    components: tuple[str, ...]
    params: dict[str, Any]
    signature: bytes


def _signature(fields: dict[str, list[str]]) -> _Signature:
    """Parse Signature-Input and Signature and select the one ``tag="fedgate"`` signature.

    Refused as ``signature-malformed``: a field that is no Dictionary, not exactly one member
    tagged ``fedgate``, a missing or mistyped parameter, an over-long nonce or key id, an
    algorithm other than ed25519. Refused as ``signature-invalid`` (what RFC 9421 verification
    refuses): labels that differ between the two fields, a member that is no Inner List of
    Strings or no Byte Sequence, a parameter RFC 9421 does not define, a covered component with
    parameters (no fedgate client sends one; none is supported).
    """
    signature_input, signature = _field(fields, "signature-input"), _field(fields, "signature")
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
        members = _parse_dictionary(signature_input)
    except Exception as exc:  # the parser raises several exception types
        raise Problem(
            "signature-malformed", f"Signature-Input is not a structured field: {exc}"
        ) from None
    tagged = [label for label, (_, params) in members.items()
              if params.get("tag") == SIGNATURE_TAG]
    if len(tagged) != 1:
        raise Problem(
            "signature-malformed", f'exactly one signature must carry tag="{SIGNATURE_TAG}"'
        )
    label = tagged[0]
    covered, params = members[label]
    missing = [p for p in ("keyid", "created", "expires", "nonce") if p not in params]
    if missing:
        raise Problem("signature-malformed", f"signature parameters missing: {', '.join(missing)}")
    if type(params["created"]) is not int or type(params["expires"]) is not int:
        raise Problem("signature-malformed", "created and expires must be integers")
    if type(params["keyid"]) is not str or type(params["nonce"]) is not str:
        raise Problem("signature-malformed", "keyid and nonce must be strings")
    if len(params["nonce"]) > MAX_NONCE_LENGTH or len(params["keyid"]) > MAX_KEY_ID_LENGTH:
        raise Problem("signature-malformed", f"nonce and keyid may each be at most "
                                             f"{MAX_NONCE_LENGTH} characters")
    if params.get("alg", "ed25519") != "ed25519":
        raise Problem("signature-malformed", 'alg must be "ed25519"')
    try:
        signatures = _parse_dictionary(signature)
    except Exception:
        raise _invalid('malformed structured header field "Signature"') from None
    if signatures.keys() != members.keys():
        raise _invalid("Signature-Input and Signature headers have different labels")
    for name, (value, member_params) in members.items():  # every member, as RFC 9421 verifies
        if not isinstance(value, list):
            raise _invalid(f'Signature-Input member "{name}" must be an Inner List')
        if not isinstance(signatures[name][0], bytes):
            raise _invalid(f'Signature member "{name}" must be a Byte Sequence')
        for parameter, given in member_params.items():
            if parameter in {"created", "expires"} and type(given) is not int:
                raise _invalid(f'parameter "{parameter}" must be a Structured Field Integer')
            if parameter in {"alg", "keyid", "nonce", "tag"} and type(given) is not str:
                raise _invalid(f'parameter "{parameter}" must be a Structured Field String')
    unknown = sorted(set(params) - _SIGNATURE_PARAMETERS)
    if unknown:
        raise _invalid(f'unexpected signature metadata parameter "{unknown[0]}"')
    names = []
    for name, component_params in covered:
        if type(name) is not str:
            raise _invalid("component names must be Structured Field Strings")
        if component_params:
            raise _invalid(f'covered component "{name}" has parameters; cover plain components')
        if name != name.lower():
            raise _invalid(f'component "{name}" is not all lowercase')
        if name in names:
            raise _invalid(f'component "{name}" appears more than once')
        names.append(name)
    return _Signature(tuple(names), dict(params), signatures[label][0])


def _derived(name: str, method: str, url: str) -> str:
    """A derived component of the request (RFC 9421 section 2.2), from its method and URL."""
    if name == "@method":
        return method
    try:
        parts = parse_url(url)
    except HTTPMessageSignaturesException:
        raise _invalid("the request URL is not an encoded absolute URL") from None
    path = parts.path or "/"
    if name == "@target-uri":
        return f"{parts.scheme}://{parts.authority}{path}{parts.query_suffix}"
    if name == "@authority":
        host, port = parts.host.lower(), parts.port
        if port and port.lstrip("0") == _DEFAULT_PORTS.get(parts.scheme.lower()):
            port = None
        return f"{host}:{port}" if port else host
    if name == "@scheme":
        return parts.scheme.lower()
    if name == "@request-target":
        return path + parts.query_suffix
    if name == "@path":
        return path
    if name == "@query":
        return "?" + (parts.query or "")
    raise _invalid(f"unsupported covered derived component {name}")


def _sf_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _signature_base(signed: _Signature, *, method: str, url: str,
                    fields: dict[str, list[str]]) -> bytes:
    """The RFC 9421 signature base (section 2.5) of ``signed`` over this request: one line
    per covered component, then ``@signature-params``, the covered names and the parameters
    serialized as RFC 8941 does (they are Strings and Integers, checked in ``_signature``).
    Refuses, as ``signature-invalid``, a covered header the request lacks and a value with a
    line break, a control character or (derived) surrounding whitespace."""
    lines = []
    for name in signed.components:
        if name.startswith("@"):
            value = _derived(name, method, url)
            if value and (not value.isprintable() or value[0] == " " or value[-1] == " "):
                raise _invalid(f'derived component "{name}" must be printable with no '
                               "surrounding whitespace")
        else:
            found = _field(fields, name)
            if found is None:
                raise _invalid(f'covered header field "{name}" not found in the message')
            value = found
            if "\r" in value or "\n" in value:
                raise _invalid(f'component value for "{name}" contains a line break')
            if value and not value.replace("\t", " ").isprintable():
                raise _invalid(f'field component "{name}" contains control characters')
        lines.append(f"{_sf_string(name)}: {value}")
    parameters = "".join(
        f";{key}={value}" if type(value) is int else f";{key}={_sf_string(value)}"
        for key, value in signed.params.items())
    covered = " ".join(_sf_string(name) for name in signed.components)
    lines.append(f'"@signature-params": ({covered}){parameters}')
    base = "\n".join(lines)
    if not base.isascii():
        raise _invalid("signature base contains non-ASCII characters")
    return base.encode("ascii")


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


def _claimed_content_digest(fields: dict[str, list[str]]) -> bytes:
    """The sha-256 member of Content-Digest (RFC 9530)."""
    value = _field(fields, "content-digest")
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
    fields = _field_lines(headers)
    signed = _signature(fields)
    params = signed.params
    key_id = str(params["keyid"])
    created, expires = int(params["created"]), int(params["expires"])
    _check_freshness(created, expires, now, window_seconds, skew_seconds)
    content_digest = _claimed_content_digest(fields) if declares_body else None
    missing = [c for c in REQUIRED_COMPONENTS + (BODY_COMPONENTS if declares_body else ())
               if c not in signed.components]
    if missing:
        raise _invalid(f"required component {missing[0]} was not covered by the signature")
    if method != method.upper():
        raise _invalid("the request method must be uppercase")
    base = _signature_base(signed, method=method, url=url, fields=fields)
    key = lookup_key(key_id)
    try:  # an unknown key id takes the same path, with a key nobody holds
        (key.public_key if key is not None else _NO_SUCH_KEY).verify(signed.signature, base)
    except InvalidSignature:
        raise _invalid("") from None
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
