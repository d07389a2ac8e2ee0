"""Canonical JSON: the one byte encoding that fedgate signs and hashes.

Invariant: equal values always encode to equal bytes (sorted keys, no insignificant
whitespace, UTF-8, no NaN/Infinity). Audit entries, release manifests and job
requests are hashed and signed in this encoding, so a verifier can recompute every
digest from the decoded value alone.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    """Encode ``value`` as canonical JSON bytes; raises ValueError on NaN/Infinity."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def sha256_digest(data: bytes) -> str:
    """Content address used across fedgate: ``"sha256:" + hex``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def entry_object(text: str) -> dict[str, Any] | None:
    """The object an entry text encodes, if the text is its canonical JSON; else None."""
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) and canonical_json(value) == text.encode() else None
    except ValueError:
        return None
