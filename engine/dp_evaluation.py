"""Differentially private evaluation of a model on held-out users.

Each evaluation user u contributes one vector ``c_u = (accuracy_u, min(mean_loss_u, L) / L, 1)``
with every coordinate in [0, 1], so adding or removing one user changes ``Σ c_u`` by at most
``‖(1, 1, 1)‖₂ = √3`` in L2 norm. The Gaussian mechanism adds independent
``N(0, (z·√3)²)`` noise to each of the three sums — one ``GaussianDpEvent(z)`` under add/remove
of a user. Everything after the noise is post-processing:

* accuracy = clamp(noisy_correct_sum / max(noisy_count, 1), 0, 1)
* loss     = clamp(L · noisy_loss_sum / max(noisy_count, 1), 0, L)

The noisy count itself is not released. Evaluation users are disjoint from training users, so
this composes in parallel with training.
"""

from __future__ import annotations

import math
import secrets
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

    from engine.datastore import Partition

__all__ = ["SENSITIVITY", "evaluate_privately", "noisy_metrics", "user_contributions"]

SENSITIVITY = math.sqrt(3.0)
_EVAL_BATCH = 4096


def user_contributions(correct: np.ndarray, losses: np.ndarray, offsets: np.ndarray,
                       loss_clip: float) -> np.ndarray:
    """Per-user vectors ``(accuracy, clipped mean loss / L, 1)``, shape [users, 3].

    ``correct`` and ``losses`` are per example, grouped by user as given by ``offsets``
    (every user has ≥ 1 example). A non-finite loss counts as the clip value L.
    """
    counts = np.diff(offsets)
    if len(counts) == 0:
        return np.zeros((0, 3))
    starts = offsets[:-1]
    losses = np.where(np.isfinite(losses), np.maximum(losses, 0.0), np.inf)
    accuracy = np.add.reduceat(correct.astype(np.float64), starts) / counts
    mean_loss = np.add.reduceat(losses.astype(np.float64), starts) / counts
    clipped_loss = np.minimum(mean_loss, loss_clip) / loss_clip
    return np.stack([accuracy, clipped_loss, np.ones_like(accuracy)], axis=1)


def noisy_metrics(contributions: np.ndarray, *, noise_multiplier: float, loss_clip: float,
                  rng: np.random.Generator | None = None) -> dict[str, float]:
    """Release DP accuracy and loss from per-user contributions (Gaussian mechanism, √3)."""
    if contributions.ndim != 2 or contributions.shape[1] != 3:
        raise ValueError("contributions must have shape [users, 3]")
    if contributions.size and (contributions.min() < 0 or contributions.max() > 1):
        raise ValueError("contributions must lie in [0, 1] (the sensitivity bound needs it)")
    rng = rng or np.random.default_rng(secrets.randbits(128))
    sums = contributions.sum(axis=0)
    noisy = sums + rng.normal(0.0, noise_multiplier * SENSITIVITY, size=3)
    count = max(float(noisy[2]), 1.0)
    return {
        "accuracy": float(np.clip(noisy[0] / count, 0.0, 1.0)),
        "loss": float(np.clip(loss_clip * noisy[1] / count, 0.0, loss_clip)),
    }


def evaluate_privately(model: tf.keras.Model, partition: Partition, *, from_logits: bool,
                       noise_multiplier: float, loss_clip: float) -> dict[str, float]:
    """Evaluate ``model`` on every user of ``partition`` and release only noisy metrics."""
    import tensorflow as tf

    rows = partition.examples
    correct = np.zeros(rows, dtype=bool)
    losses = np.zeros(rows, dtype=np.float64)
    for start in range(0, rows, _EVAL_BATCH):
        stop = min(start + _EVAL_BATCH, rows)
        features = np.asarray(partition.features[start:stop])
        labels = np.asarray(partition.labels[start:stop])
        outputs = model(features, training=False)
        losses[start:stop] = tf.keras.losses.sparse_categorical_crossentropy(
            labels, outputs, from_logits=from_logits
        ).numpy()
        correct[start:stop] = np.argmax(outputs.numpy(), axis=1) == labels
    contributions = user_contributions(correct, losses, np.asarray(partition.offsets),
                                       loss_clip)
    return noisy_metrics(contributions, noise_multiplier=noise_multiplier, loss_clip=loss_clip)
