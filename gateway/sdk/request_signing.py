"""Client side of RFC 9421: sign outgoing requests for the fedgate gateway.

Every request gets ``created``, ``expires`` (created + validity), a fresh 128-bit
``nonce``, ``keyid``, ``alg="ed25519"`` and ``tag="fedgate"``; it covers ``@method`` and
``@target-uri`` and, with a body, ``content-digest`` (RFC 9530 sha-256) and
``content-type``.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Generator

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_message_signatures import HTTPMessageSigner, HTTPSignatureKeyResolver, algorithms

from gateway.protocol.signing import BODY_COMPONENTS, REQUIRED_COMPONENTS, SIGNATURE_TAG
from ledger.keys import key_id as derive_key_id

DEFAULT_VALIDITY_SECONDS = 120


class _PrivateKeyResolver(HTTPSignatureKeyResolver):
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    def resolve_public_key(self, key_id: str) -> None:
        raise NotImplementedError

    def resolve_private_key(self, key_id: str) -> Ed25519PrivateKey:
        return self._key


class _Message:
    def __init__(self, method: str, url: str, headers: dict[str, str]) -> None:
        self.method = method
        self.url = url
        self.headers = headers


def signature_headers(
    *,
    private_key: Ed25519PrivateKey,
    method: str,
    url: str,
    body: bytes,
    content_type: str | None,
    key_id: str | None = None,
    validity_seconds: int = DEFAULT_VALIDITY_SECONDS,
    now: dt.datetime | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Headers (Signature-Input, Signature, Content-Digest) that sign one request."""
    headers: dict[str, str] = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    created = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    components = REQUIRED_COMPONENTS + (BODY_COMPONENTS if body else ())
    signer = HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519, key_resolver=_PrivateKeyResolver(private_key)
    )
    signer.sign(
        _Message(method.upper(), url, headers),
        key_id=key_id or derive_key_id(private_key.public_key()),
        created=created,
        expires=created + dt.timedelta(seconds=validity_seconds),
        nonce=nonce or secrets.token_urlsafe(16),
        label="fedgate",
        tag=SIGNATURE_TAG,
        covered_component_ids=components,
        body=body if body else None,
    )
    return headers


class SignedRequestAuth(httpx.Auth):
    """httpx auth flow that signs each request (a fresh nonce per attempt)."""

    requires_request_body = True

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        body = request.content
        headers = signature_headers(
            private_key=self._private_key,
            method=request.method,
            url=str(request.url),
            body=body,
            content_type=request.headers.get("content-type") if body else None,
        )
        for name, value in headers.items():
            request.headers[name] = value
        yield request
