"""Pure ASGI middleware: body limits and signed-request authentication.

``BodyLimitMiddleware`` buffers the request body, refusing (413) as soon as the bytes
received exceed the limit for the path — while streaming, not after. The buffered body
is put in ``scope["fedgate.body"]`` and replayed to the application.

``SignatureAuthMiddleware`` authenticates every request except the explicitly public
paths (RFC 9421, see ``gateway.signatures``) at this node's origin: a request addressed to
another node is refused (``gateway.origin``). It records the nonce (a replay, even after a
restart, is refused) and sets ``scope["fedgate.principal"]`` to the ``VerifiedRequest``.
The one other exemption is the officer dashboard (``/dashboard`` and paths under
``/dashboard/``, exactly: see ``cookie_authenticated``), which browsers use without
signatures: its handlers authenticate by session cookie themselves and refuse every
page without one (``gateway.dashboard``). No handler behind it runs unauthenticated.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.node import Node
from gateway.origin import arrival_origin
from gateway.problems import Problem, problem_response
from gateway.signatures import verify_request
from ledger.registry import prune_nonces, remember_nonce

PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json"})
COOKIE_AUTH_PREFIXES = ("/dashboard",)
NONCE_PRUNE_INTERVAL_SECONDS = 60.0


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, limit_for_path: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for_path = limit_for_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for_path(scope["path"])
        too_large = Problem("payload-too-large", f"the body limit for {scope['path']} is "
                                                 f"{limit} bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await problem_response(too_large)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await problem_response(too_large)(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or cookie_authenticated(scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            principal = await run_in_threadpool(self._authenticate, scope)
        except Problem as problem:
            await problem_response(problem)(scope, receive, send)
            return
        scope["fedgate.principal"] = principal
        await self.app(scope, receive, send)

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

    def _authenticate(self, scope: Scope):  # type: ignore[no-untyped-def]
        now = time.time()
        config = self.node.config
        verified = verify_request(
            method=scope["method"],
            url=self._target_uri(scope),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            body=scope.get("fedgate.body", b""),
            lookup_key=self.node.lookup_key,
            now=now,
            window_seconds=config.signature_window_seconds,
            skew_seconds=config.clock_skew_seconds,
        )
        with self.node.session() as s:
            if now - self._last_prune > NONCE_PRUNE_INTERVAL_SECONDS:
                prune_nonces(s, now)
                self._last_prune = now
            fresh = remember_nonce(s, key_id=verified.key_id, nonce=verified.nonce,
                                   expires_at=verified.nonce_expires_at)
        if not fresh:
            raise Problem("replayed-nonce", "this request was already accepted once; sign a new "
                                            "request (the client does this on every call)")
        return verified
