"""Officer endpoints for the audit log, and the periodic checkpoint publisher.

Every route requires a signed request (``SignatureAuthMiddleware``) whose principal the
policy allows ``read-audit`` on the object ``audit`` in the owner's domain; the default
policy grants it to the ``officers`` group (``p, officers, OWNER, *, read-audit, allow``).
A refusal is audited and returned as ``policy-denied``. Handlers only parse; the
authorisation and the work are in ``gateway.node.audit``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.node import audit as node_audit
from gateway.node.background import every
from gateway.node.identity import VerifiedRequest
from gateway.node.node import Node
from gateway.protocol.problems import Problem
from ledger.audit import AuditLogCorrupted

log = logging.getLogger("fedgate.audit")

CHECKPOINT_INTERVAL_SECONDS = 60.0


def routes() -> list[Route]:
    return [
        Route("/v1/audit/entries", audit_entries),
        Route("/v1/audit/checkpoint", audit_checkpoint),
        Route("/v1/audit/proof/inclusion", inclusion_proof),
        Route("/v1/audit/proof/consistency", consistency_proof),
        Route("/v1/audit/export", audit_export),
    ]


async def audit_entries(request: Request) -> Response:
    start = _optional_int(request, "start") or 0
    end = _optional_int(request, "end")
    return JSONResponse(await _officer_call(request, node_audit.entries_page, start, end))


async def audit_checkpoint(request: Request) -> Response:
    checkpoint = await _officer_call(request, node_audit.publish_node_checkpoint)
    return JSONResponse({"origin": checkpoint.origin, "size": checkpoint.size,
                         "root": checkpoint.root.hex(), "timestamp": checkpoint.timestamp,
                         "checkpoint": checkpoint.text})


async def inclusion_proof(request: Request) -> Response:
    index = _required_int(request, "index")
    size = _optional_int(request, "size")
    return JSONResponse(await _officer_call(request, node_audit.inclusion_proof_for, index, size))


async def consistency_proof(request: Request) -> Response:
    old = _required_int(request, "old")
    new = _optional_int(request, "new")
    return JSONResponse(await _officer_call(request, node_audit.consistency_proof_for, old, new))


async def audit_export(request: Request) -> Response:
    export, warning = await _officer_call(request, node_audit.export_node_audit)
    headers = {"Content-Disposition": 'attachment; filename="fedgate-audit-export.json"'}
    if warning:
        headers["Fedgate-Audit-Warning"] = warning.encode("ascii", "replace").decode("ascii")
    return Response(export, media_type="application/json", headers=headers)


@contextlib.asynccontextmanager
async def periodic_checkpoints(
    node: Node, interval_seconds: float = CHECKPOINT_INTERVAL_SECONDS
) -> AsyncIterator[None]:
    """While open, sign a checkpoint every ``interval_seconds`` if the log grew.

    Use in the app's lifespan: ``async with periodic_checkpoints(node): yield``.
    """

    async def step() -> None:
        try:
            await run_in_threadpool(node_audit.publish_node_checkpoint, node)
        except AuditLogCorrupted as exc:
            log.error("not signing a checkpoint: %s", exc)

    async with every(interval_seconds, step, "periodic audit checkpoint"):
        yield


async def _officer_call(request: Request, operation: Callable[..., Any], *args: Any) -> Any:
    """Authorise the caller for ``read-audit``, then run ``operation(node, *args)`` off-loop."""
    node: Node = request.app.state.node
    principal: VerifiedRequest = request.scope["fedgate.principal"]

    def authorised_call() -> Any:
        node_audit.authorise_audit_reader(node, subject=principal.principal, key_id=principal.key_id)
        try:
            return operation(node, *args)
        except node_audit.AuditRequestInvalid as exc:
            raise Problem("invalid-request", str(exc)) from None
        except AuditLogCorrupted as exc:
            raise Problem("internal-error", f"the stored audit log is inconsistent: {exc}; "
                                            "export it and run `fedgate audit verify`") from None

    return await run_in_threadpool(authorised_call)


def _optional_int(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name, "")
    if raw == "":
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise Problem("invalid-request", f"query parameter '{name}' must be a non-negative integer")
    return int(raw)


def _required_int(request: Request, name: str) -> int:
    value = _optional_int(request, name)
    if value is None:
        raise Problem("invalid-request", f"query parameter '{name}' is required")
    return value
