"""Pure ASGI middleware: signed-request authentication, then body limits.

``SignatureAuthMiddleware`` authenticates every request except the explicitly public paths
from its headers alone, before a byte of its body is read: the request must be addressed to
this node (``gateway.node.origin``) and its RFC 9421 signature must verify (``gateway.api.signatures``:
key, validity window, nonce length, covered components, the Content-Digest it binds the body
to); then its nonce is recorded (a replay, even after a restart, is refused) — by the route,
with its decision, for ``NONCE_WITH_DECISION``, and the answer is held until it is
(``gateway.node.nonces``). It sets
``scope["fedgate.principal"]`` to the ``VerifiedRequest``. An outsider's request is refused
with its body unread, so what unauthenticated clients send costs the gateway no memory.
The one other exemption is the officer dashboard (``/dashboard`` and paths under
``/dashboard/``, exactly: see ``cookie_authenticated``), which browsers use without
signatures: its handlers authenticate by session cookie themselves and refuse every
page without one (``gateway.dashboard``). No handler behind it runs unauthenticated.

``BodyLimitMiddleware`` then reads the body, refusing (413) a Content-Length over the path's
limit before reading and a body that grows past it while streaming; it hashes the body as it
arrives and refuses a signed request whose body does not match the digest its signature
bound. Bodies of upload paths (model artifacts, the large limit) are read by at most
``max_concurrent_uploads`` requests at once; further uploads wait for a slot, their bytes left
in the socket. The body is put in ``scope["fedgate.body"]`` and replayed to the application.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlmodel import Session
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api.problems import problem_response
from gateway.api.signatures import verify_body_digest, verify_signature
from gateway.dashboard.routes import browser_refusal
from gateway.node.identity import VerifiedRequest
from gateway.node.node import Node
from gateway.node.nonces import PendingNonce, RecentNonces, record_nonce, replayed_nonce
from gateway.node.origin import arrival_origin
from gateway.protocol.problems import Problem
from ledger.registry import prune_nonces
from ledger.suspend import run_suspending

PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json", "/v1/node"})
COOKIE_AUTH_PREFIXES = ("/dashboard",)
UPLOAD_PATHS = frozenset({"/v1/models"})
NONCE_PRUNE_INTERVAL_SECONDS = 60.0
NONCE_WITH_DECISION = frozenset({("POST", "/v1/jobs")})
"""Requests whose route records the nonce in its decision's write (``gateway.node.nonces``)."""


@dataclass(frozen=True)
class BodyLimit:
    """The most body bytes a path accepts, and whether reading them takes an upload slot."""

    max_bytes: int
    upload: bool = False


def declared_body(scope: Scope) -> tuple[bool, int | None]:
    """Whether the request announces a body (a Content-Length above 0, or Transfer-Encoding),
    and its Content-Length if it gives a valid one."""
    headers = dict(scope["headers"])
    length = headers.get(b"content-length")
    size = int(length) if length is not None and length.isdigit() else None
    return bool(size) or b"transfer-encoding" in headers, size


def _refusal(scope: Scope, problem: Problem) -> Response:
    """problem+json, or the dashboard's HTML page when a browser asked for a dashboard page."""
    return browser_refusal(Request(scope), problem) or problem_response(problem)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, limit_for_path: Callable[[str], BodyLimit],
                 max_concurrent_uploads: int) -> None:
        self.app = app
        self.limit_for_path = limit_for_path
        self._upload_slots = asyncio.Semaphore(max_concurrent_uploads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for_path(scope["path"])
        too_large = Problem("payload-too-large", f"the body limit for {scope['path']} is "
                                                 f"{limit.max_bytes} bytes")
        _, declared = declared_body(scope)
        if declared is not None and declared > limit.max_bytes:
            await _refusal(scope, too_large)(scope, receive, send)
            return
        slot = self._upload_slots if limit.upload else contextlib.nullcontext()
        async with slot:
            chunks: list[bytes] = []
            digest = hashlib.sha256()
            size = 0
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit.max_bytes:
                    await _refusal(scope, too_large)(scope, receive, send)
                    return
                digest.update(chunk)
                chunks.append(chunk)
                more = message.get("more_body", False)
            body = b"".join(chunks)
            del chunks
        principal: VerifiedRequest | None = scope.get("fedgate.principal")
        if principal is not None:
            try:
                verify_body_digest(principal, digest.digest(), size)
            except Problem as problem:
                await problem_response(problem)(scope, receive, send)
                return
        scope["fedgate.body"] = body
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def cookie_authenticated(path: str) -> bool:
    """True for the dashboard's own paths, whose handlers check a session cookie instead of a
    signature: a prefix itself or anything below it, never a mere extension of its name."""
    return any(path == prefix or path.startswith(prefix + "/") for prefix in COOKIE_AUTH_PREFIXES)


class SignatureAuthMiddleware:
    def __init__(self, app: ASGIApp, *, node: Node) -> None:
        self.app = app
        self.node = node
        self._last_prune = 0.0
        self._recorded = RecentNonces()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or cookie_authenticated(scope["path"]):
            await self.app(scope, receive, send)
            return
        deferred = (scope["method"], scope["path"]) in NONCE_WITH_DECISION
        try:
            principal = await run_suspending(self._authenticate, scope, deferred)
        except Problem as problem:
            await problem_response(problem)(scope, receive, send)
            return
        scope["fedgate.principal"] = principal
        if not deferred:
            await self.app(scope, receive, send)
            return
        if self._recorded.seen(principal):  # a replay: refused before any admission work
            await problem_response(replayed_nonce())(scope, receive, send)
            return
        pending = scope["fedgate.nonce"] = PendingNonce(principal)
        replayed = False

        async def send_after_nonce(message: Message) -> None:
            # The answer leaves only once the nonce is on disk (``gateway.node.nonces``).
            nonlocal replayed
            if message["type"] == "http.response.start" and not pending.recorded:
                try:
                    await run_suspending(pending.ensure_recorded, self.node.writer)
                except Problem as problem:
                    replayed = True
                    await problem_response(problem)(scope, receive, send)
            if not replayed:
                await send(message)

        try:
            await self.app(scope, receive, send_after_nonce)
        finally:  # an error answered further out (500) is not sent through send_after_nonce
            if not pending.recorded and not replayed:
                with contextlib.suppress(Problem):
                    await run_suspending(pending.ensure_recorded, self.node.writer)
            if pending.recorded:
                self._recorded.add(principal)

    def _target_uri(self, scope: Scope) -> str:
        """The URI a signature for this node covers; refuses a request addressed elsewhere."""
        origin = self.node.config.public_origin or arrival_origin(scope)
        if origin is None:
            raise Problem("wrong-node", "this node has no origin to check requests against; the "
                                        "owner sets [gateway] public_origin")
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if not origin.is_named_by(host):
            raise Problem("wrong-node", f"this request is addressed to another node; this node "
                                        f"is {origin}: sign requests for {origin}",
                          origin=str(origin))
        return origin.target_uri(scope)

    def _authenticate(self, scope: Scope, deferred: bool) -> VerifiedRequest:
        """The verified request; its nonce recorded unless ``deferred`` (the route records
        it with its decision, ``gateway.node.nonces``)."""
        now = time.time()
        config = self.node.config
        verified = verify_signature(
            method=scope["method"],
            url=self._target_uri(scope),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            declares_body=declared_body(scope)[0],
            lookup_key=self.node.lookup_key,
            now=now,
            window_seconds=config.signature_window_seconds,
            skew_seconds=config.clock_skew_seconds,
        )
        prune = now - self._last_prune > NONCE_PRUNE_INTERVAL_SECONDS
        if prune:
            self._last_prune = now
        if deferred and not prune:
            return verified

        def record(s: Session) -> None:
            if prune:
                prune_nonces(s, now)
            if not deferred:
                record_nonce(s, verified)

        # Grouped with concurrent writes (``ledger.group_commit``): durable before it returns.
        self.node.writer.run(record)
        return verified


def request_middleware(node: Node) -> list[Middleware]:
    """The gateway's middleware, outermost first: authenticate from the headers, then read
    the body within its path's limit."""
    config = node.config

    def limit_for_path(path: str) -> BodyLimit:
        if path in UPLOAD_PATHS:
            return BodyLimit(config.max_model_bytes, upload=True)
        return BodyLimit(config.max_request_bytes)

    return [
        Middleware(SignatureAuthMiddleware, node=node),
        Middleware(BodyLimitMiddleware, limit_for_path=limit_for_path,
                   max_concurrent_uploads=config.max_concurrent_uploads),
    ]
