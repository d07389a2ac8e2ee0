"""A verified release on the researcher's side: DP weights, DP metrics, what was charged, and
the model they belong to; saved as a keras-json-v1 artifact or a Keras ``.keras`` file.

:func:`verify_release` checks the node's signature over the manifest, the manifest's shape and
the weights' digest (``gateway.protocol.release``); given the model artifact the job trained
(``GET /v1/jobs/{id}/model``), it also checks that artifact's digest against the signed
``model_digest``, so a saved model is exactly the architecture the node trained with the
weights it released. TensorFlow is imported only to write ``.keras`` (the light install has
no TensorFlow; ``.json`` needs none).
"""

from __future__ import annotations

import html
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from engine.artifact import FORMAT, artifact_digest, decode_array, encode_array, parse_artifact
from gateway.protocol.release import ReleaseVerificationFailed, verify_release_document

__all__ = ["MODEL_SUFFIXES", "Release", "verify_release", "write_model"]

# engine.artifact.keras_from_artifact (TensorFlow) is imported inside write_model, for .keras.

MODEL_SUFFIXES = (".json", ".keras")
"""The model formats by file suffix: keras-json-v1 (what the node accepts and ``fedgate model
to-keras`` converts) and Keras' own ``.keras`` (needs TensorFlow)."""


@dataclass(frozen=True)
class Release:
    """A verified release: DP weights, DP metrics and what was charged for them; with
    ``model_config`` (the trained model's Keras config, digest-checked against the manifest)
    it can be saved as a whole model (:meth:`save`)."""

    job_id: str
    weights: list[Any]  # numpy arrays, in the model's get_weights() order
    metrics: dict[str, float]
    epsilon: float
    delta: float
    manifest: dict[str, Any]
    model_config: dict[str, Any] | None = None

    def artifact(self) -> dict[str, Any]:
        """The released model as a keras-json-v1 artifact: the trained architecture with the
        DP weights (load it with ``engine.artifact.keras_from_artifact``)."""
        if self.model_config is None:
            raise ValueError(f"release {self.job_id} was verified without its model "
                             "architecture; fetch it with Job.result() to save it")
        return {"format": FORMAT, "config": self.model_config,
                "weights": [encode_array(w) for w in self.weights]}

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the released model to ``path``: ``.json`` as keras-json-v1, ``.keras`` as a
        Keras model (needs TensorFlow). Refuses to replace an existing file unless
        ``overwrite``; returns the path."""
        return write_model(self.artifact(), Path(path), overwrite=overwrite)

    def _repr_html_(self) -> str:
        """A small table for Jupyter: job, dataset, ε charged, DP metrics."""
        rows = [("job", self.job_id), ("dataset", str(self.manifest.get("dataset", ""))),
                ("ε charged", f"{self.epsilon:.4g} (δ {self.delta:g}, "
                              f"{self.manifest.get('accountant', '')})"),
                *((f"DP {name} (held-out users)", f"{value:.4g}")
                  for name, value in sorted(self.metrics.items())),
                ("model", str(self.manifest.get("model_digest", ""))[:19] + "…"),
                ("signed by node key", str(self.manifest.get("node_key_id", "")))]
        body = "".join(f"<tr><th style=\"text-align:left\">{html.escape(k)}</th>"
                       f"<td style=\"text-align:left\">{html.escape(v)}</td></tr>"
                       for k, v in rows)
        return f"<table class=\"fedgate-release\">{body}</table>"


def verify_release(document: dict[str, Any], node_public_key: Ed25519PublicKey, *,
                   model: bytes | None = None) -> Release:
    """Check the node's signature, the manifest's shape and the weights digest
    (``gateway.protocol.release``); decode the weights. With ``model`` (the job's artifact as
    uploaded), check its digest against the manifest's ``model_digest`` and keep its config."""
    manifest = verify_release_document(document, node_public_key)
    config = None
    if model is not None:
        if artifact_digest(model) != manifest.model_digest:
            raise ReleaseVerificationFailed("the model artifact is not the one the manifest names")
        config = parse_artifact(model)["config"]
    return Release(
        job_id=manifest.job_id,
        weights=[decode_array(w) for w in document["weights"]],
        metrics=dict(manifest.metrics),
        epsilon=float(manifest.epsilon),
        delta=float(manifest.delta),
        manifest=manifest.to_json(),
        model_config=config,
    )


def write_model(artifact: dict[str, Any], path: Path, *, overwrite: bool = False) -> Path:
    """Write a keras-json-v1 ``artifact`` to ``path`` in the format its suffix names
    (:data:`MODEL_SUFFIXES`); never replaces an existing file unless ``overwrite``. The file
    appears whole or not at all (written beside it, then renamed)."""
    if path.suffix not in MODEL_SUFFIXES:
        raise ValueError(f"{path}: save a model as .json (keras-json-v1) or .keras")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or overwrite it "
                              "(--force, or overwrite=True)")
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial{path.suffix}")
    try:
        if path.suffix == ".json":
            partial.write_text(json.dumps(artifact))
        else:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            from engine.artifact import keras_from_artifact

            keras_from_artifact(artifact).save(partial)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path
