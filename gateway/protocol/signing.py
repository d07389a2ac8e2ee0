"""What a fedgate request signature covers (RFC 9421), shared by the SDK that signs and the
gateway that verifies (``gateway.sdk.request_signing``, ``gateway.api.signatures``).

Every request is signed with the tag ``fedgate`` over ``@method`` and ``@target-uri``; a
request with a body also covers its ``content-digest`` (SHA-256 of the exact bytes) and
``content-type``, so the body cannot be swapped. The signature's ``created``/``expires`` and
``nonce`` bound replay (the gateway's window and nonce store).
"""

from __future__ import annotations

__all__ = ["BODY_COMPONENTS", "REQUIRED_COMPONENTS", "SIGNATURE_TAG"]

SIGNATURE_TAG = "fedgate"
REQUIRED_COMPONENTS = ("@method", "@target-uri")
BODY_COMPONENTS = ("content-digest", "content-type")
