"""The signed release: what a node returns for a finished job, and how anyone checks it.

A release document is ``{"manifest", "signature", "weights"}``:

* ``manifest`` — a :class:`ReleaseManifest`: job id, dataset, researcher key id, model and
  request digests, the job's parameters, the (ε, δ) charged and the accountant, the policy
  version, the digest of the released weights, the DP metrics, the release time and the node's
  key id;
* ``signature`` — Ed25519 by the node key over the canonical JSON of the manifest (base64);
* ``weights`` — the DP weights (keras-json-v1 encoded arrays), bound by ``weights_digest``.

:func:`sign_release` (the node, ``gateway.node.release``) and :func:`verify_release_document` (the
SDK, a federation coordinator, an auditor) live side by side so the two cannot drift. Pure:
the standard library, ``cryptography`` and ``ledger.canonical``.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledger.canonical import canonical_json, sha256_digest

__all__ = ["ReleaseManifest", "ReleaseVerificationFailed", "manifest_digest", "sign_release",
           "verify_manifest_signature", "verify_release_document"]


class ReleaseVerificationFailed(Exception):
    """The release is not what the node signed (signature, manifest shape or weights)."""


@dataclass(frozen=True)
class ReleaseManifest:
    """What the node signs for a finished job (the release gate's contract, ``gateway.node.release``:
    nothing computed on user data is released unless it is named here)."""

    job_id: str
    dataset: str
    researcher_key_id: str
    model_digest: str
    request_digest: str
    parameters: dict[str, Any]
    epsilon: float
    delta: float
    accountant: str
    policy_version: str
    weights_digest: str
    metrics: dict[str, float]
    released_at: str
    node_key_id: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: object) -> ReleaseManifest:
        """The manifest a document holds; exactly these fields, of these JSON types."""
        if not isinstance(data, Mapping):
            raise ReleaseVerificationFailed("the manifest is not a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise ReleaseVerificationFailed(
                f"the manifest's fields are not a release manifest's: missing "
                f"{sorted(names - set(data))}, unknown {sorted(set(data) - names)}")
        for field, kinds in _JSON_KINDS.items():
            value = data[field]
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise ReleaseVerificationFailed(f"the manifest's {field} has the wrong type")
        return cls(**{name: data[name] for name in names})


_JSON_KINDS: dict[str, type | tuple[type, ...]] = {
    "job_id": str, "dataset": str, "researcher_key_id": str, "model_digest": str,
    "request_digest": str, "parameters": dict, "epsilon": (int, float), "delta": (int, float),
    "accountant": str, "policy_version": str, "weights_digest": str, "metrics": dict,
    "released_at": str, "node_key_id": str,
}


def manifest_digest(body: Mapping[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON (the bytes the node signs)."""
    return sha256_digest(canonical_json(body))


def verify_manifest_signature(body: object, signature: object,
                              node_public_key: Ed25519PublicKey) -> None:
    """Check the node's Ed25519 signature (base64) over the canonical JSON of ``body``,
    exactly as received; raises :class:`ReleaseVerificationFailed`."""
    try:
        raw = base64.b64decode(signature, validate=True)  # type: ignore[arg-type]
        node_public_key.verify(raw, canonical_json(body))
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ReleaseVerificationFailed(f"node signature does not verify: {exc!r}") from None


def sign_release(manifest: ReleaseManifest, weights: list[Any],
                 node_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The release document; ``manifest.weights_digest`` must be the digest of ``weights``."""
    if sha256_digest(canonical_json(weights)) != manifest.weights_digest:
        raise ValueError("the manifest's weights_digest is not the digest of these weights")
    body = manifest.to_json()
    signature = node_key.sign(canonical_json(body))
    return {"manifest": body, "signature": base64.b64encode(signature).decode("ascii"),
            "weights": weights}


def verify_release_document(document: Mapping[str, Any],
                            node_public_key: Ed25519PublicKey) -> ReleaseManifest:
    """Check the node's signature over the manifest exactly as received, the manifest's shape
    and that the document's weights are the signed ones. Raises
    :class:`ReleaseVerificationFailed` naming the first failed check."""
    try:
        body, signature = document["manifest"], document["signature"]
    except (KeyError, TypeError) as exc:
        raise ReleaseVerificationFailed(f"node signature does not verify: {exc!r}") from None
    verify_manifest_signature(body, signature, node_public_key)
    manifest = ReleaseManifest.from_json(body)
    if sha256_digest(canonical_json(document.get("weights"))) != manifest.weights_digest:
        raise ReleaseVerificationFailed("weights do not match the signed manifest")
    return manifest
