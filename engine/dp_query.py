"""The Gaussian sum query that runs in every job: TF Privacy's, with non-finite deltas zeroed.

Contract (per round, per sampled user u with model delta Δ_u, in float32):

* if any coordinate of Δ_u is non-finite, or its global L2 norm overflows float32, Δ_u is
  replaced by 0 (a fixed per-user rule: local training that diverged contributes nothing);
* Δ_u is clipped to L2 norm C = float32(clip) jointly over all tensors
  (``tf.clip_by_global_norm``, as ``tfp.GaussianSumQuery``);
* the clipped deltas are summed and N(0, σ²) is added once, σ = float32(stddev) with
  σ ≥ z·C (``ledger.mechanism.noise_stddev`` computes it; the validator bounds C and σ so that
  neither is subnormal and no sum overflows).

Why the zeroing: ``tf.clip_by_global_norm`` returns NaN for every coordinate when the norm is
inf or NaN. Without the rule, one user whose local training diverged would turn the whole noisy
sum — hence the release — into NaN: a data-dependent failure bit that no noise covers. With it,
every user's contribution is a deterministic function of their own data with norm ≤ C, so the
sum's sensitivity is C and the output is always finite.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
import tensorflow_privacy as tfp

__all__ = ["FiniteGaussianSumQuery", "zero_if_not_finite"]


def zero_if_not_finite(record: Any) -> Any:
    """``record`` (a nest of float tensors) unchanged if every coordinate is finite and its
    global L2 norm is finite in the record's dtype; otherwise the same nest of zeros."""
    leaves = tf.nest.flatten(record)
    finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(x)) for x in leaves]))
    norm_finite = tf.math.is_finite(tf.linalg.global_norm(leaves))
    keep = tf.logical_and(finite, norm_finite)
    return tf.nest.pack_sequence_as(
        record, [tf.where(keep, x, tf.zeros_like(x)) for x in leaves])


class FiniteGaussianSumQuery(tfp.GaussianSumQuery):
    """``tfp.GaussianSumQuery`` whose per-record preprocessing first applies
    :func:`zero_if_not_finite`, then clips as the parent does. Noise, sum and DP event are the
    parent's."""

    def preprocess_record(self, params: Any, record: Any) -> Any:
        return super().preprocess_record(params, zero_if_not_finite(record))
