"""Release gate: the only path by which anything computed on user data leaves the node.

Contract: a release contains exactly

* ``weights`` — the DP model weights (clipped, noised DP-FedAvg aggregate, then
  post-processed by the server optimizer), with the same count and shapes as the
  weights the researcher uploaded;
* ``manifest.metrics`` — DP evaluation metrics (``accuracy``, ``loss``; noised sums over
  held-out users, finite floats);
* the manifest (``gateway.protocol.release.ReleaseManifest``): job id, dataset, model digest,
  parameters, (ε, δ) charged, accountant, policy version, the digest of the weights, release
  time, node key id;
* ``signature`` — Ed25519 by the node key over the canonical JSON of the manifest
  (``sign_release``, beside the ``verify_release_document`` every recipient uses).

Anything else the engine wrote (TFF training metrics, client counts, logs) is refused:
an engine output with any other field fails the job (it is still charged).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from engine.artifact import decode_array
from gateway.protocol.release import ReleaseManifest, sign_release
from ledger.canonical import canonical_json, sha256_digest
from ledger.models import Job
from ledger.timestamps import utc_timestamp

RELEASED_METRICS = frozenset({"accuracy", "loss"})


class ReleaseRefused(Exception):
    """The engine output does not have the exact released shape."""


def _weights_shapes(encoded: list[Any]) -> list[tuple[int, ...]]:
    shapes = []
    for item in encoded:
        array = decode_array(item)
        if not bool(np.isfinite(array).all()):
            raise ReleaseRefused("released weights must be finite")
        shapes.append(tuple(array.shape))
    return shapes


def gate_engine_output(engine_output: Any, uploaded_weights: list[Any]) -> tuple[list[Any], dict[str, float]]:
    """Check the engine's output against the release contract; return (weights, metrics)."""
    if not isinstance(engine_output, dict) or set(engine_output) != {"weights", "metrics"}:
        raise ReleaseRefused("engine output must hold exactly 'weights' and 'metrics'")
    weights, metrics = engine_output["weights"], engine_output["metrics"]
    if not isinstance(weights, list) or not isinstance(metrics, dict):
        raise ReleaseRefused("engine output has the wrong types")
    if not set(metrics) <= RELEASED_METRICS:
        raise ReleaseRefused("engine output holds metrics that are not DP-accounted")
    clean_metrics: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(value, float | int) or not math.isfinite(value):
            raise ReleaseRefused(f"metric {name} must be a finite number")
        clean_metrics[name] = float(value)
    if _weights_shapes(weights) != _weights_shapes(uploaded_weights):
        raise ReleaseRefused("released weights do not match the uploaded model's shapes")
    return weights, clean_metrics


def build_release(
    *, job: Job, weights: list[Any], metrics: dict[str, float], node_key: Ed25519PrivateKey,
    node_key_id: str,
) -> dict[str, Any]:
    """Assemble and sign the release document for a finished job
    (``gateway.protocol.release``: the manifest and its signature)."""
    manifest = ReleaseManifest(
        job_id=job.id, dataset=job.dataset, researcher_key_id=job.researcher_key_id,
        model_digest=job.model_digest, request_digest=job.request_digest,
        parameters=json.loads(job.spec), epsilon=job.epsilon, delta=job.delta,
        accountant="rdp", policy_version=job.policy_version,
        weights_digest=sha256_digest(canonical_json(weights)), metrics=metrics,
        released_at=utc_timestamp(), node_key_id=node_key_id)
    return sign_release(manifest, weights, node_key)


def read_engine_output(path: Path) -> Any:
    return json.loads(path.read_bytes())
