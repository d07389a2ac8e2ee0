"""RFC 9457 problem details: every refusal fedgate makes, as one typed exception.

Each problem has a stable ``type`` URI (``urn:fedgate:problem:<slug>``, listed in
docs/problems.md), an HTTP status, a short title and a ``detail`` that tells the caller
what to change. Extra members carry machine-readable facts (e.g. remaining budget).
A ``Problem``'s text never contains data values or sandbox output.

Pure: the node turns a ``Problem`` into a response (``gateway.api.problems``); the researcher
SDK matches refusals by ``TYPE_PREFIX`` without loading a server library.
"""

from __future__ import annotations

from typing import Any

PROBLEM_CONTENT_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:fedgate:problem:"

# slug -> (status, title). The slug is the stable part of the type URI.
PROBLEM_TYPES: dict[str, tuple[int, str]] = {
    "signature-missing": (401, "Request is not signed"),
    "signature-malformed": (401, "Signature headers are malformed"),
    "signature-invalid": (401, "Signature does not verify"),
    "revoked-key": (401, "Signing key has been revoked"),
    "signature-expired": (401, "Signature is outside its validity window"),
    "signature-from-future": (401, "Signature was created in the future"),
    "digest-missing": (401, "Content-Digest header is missing"),
    "digest-mismatch": (401, "Body does not match its Content-Digest"),
    "replayed-nonce": (401, "Nonce was already used"),
    "login-required": (401, "Dashboard sign-in required"),
    "payload-too-large": (413, "Request body is too large"),
    # 421 Misdirected Request (RFC 9110): the request names another node's authority.
    "wrong-node": (421, "Request is addressed to another node"),
    "policy-denied": (403, "Denied by the data owner's policy"),
    "budget-exceeded": (403, "Privacy budget exceeded"),
    "output-policy": (403, "Refused by the output policy"),
    # 429, not 403: the refusal lifts by itself (jobs end, the month turns), no policy change needed.
    "quota-exceeded": (429, "Compute quota exceeded"),
    "invalid-request": (422, "Request is invalid"),
    "job-too-large": (422, "Job needs more memory or time than the node allows"),
    "model-rejected": (422, "Model artifact rejected"),
    "unknown-dataset": (404, "Unknown dataset"),
    "unknown-model": (404, "Unknown model artifact"),
    "not-found": (404, "Not found"),
    "method-not-allowed": (405, "Method not allowed"),
    "not-ready": (409, "Result is not available"),
    "internal-error": (500, "Internal error"),
}


class Problem(Exception):
    """A refusal to be sent as ``application/problem+json``."""

    def __init__(self, slug: str, detail: str, **extra: Any) -> None:
        if slug not in PROBLEM_TYPES:
            raise ValueError(f"unknown problem type {slug!r}")
        super().__init__(detail)
        self.slug = slug
        self.status, self.title = PROBLEM_TYPES[slug]
        self.detail = detail
        self.extra = extra

    @property
    def type_uri(self) -> str:
        return TYPE_PREFIX + self.slug

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }

