"""A Gaussian sum query whose noise is drawn from a seed: the privacy audit's reproducible copy.

:class:`SeededGaussianSumQuery` is the query every job runs
(:class:`engine.dp_query.FiniteGaussianSumQuery`: TF Privacy's ``GaussianSumQuery`` with
non-finite deltas zeroed before clipping) with exactly one thing replaced: the random
generator. Preprocessing (the finite-delta rule, then joint L2 clipping with
``tf.clip_by_global_norm``), the sum, the noise std and the DP event are the parent's. The
parent draws its noise from an unseeded stateful generator (``tf.random_normal_initializer``);
this one draws i.i.d. N(0, stddev²) values with ``tf.random.stateless_normal`` from a seed
carried in the query's global state and split afresh every round, so two runs from the same
seed add bit-identical noise.

Privacy invariant: **seeded noise is predictable noise.** Anyone who knows the seed can
subtract it and recover the clipped sum, so this query must never protect real users. Only
:func:`engine.training.dp_aggregator`'s keyword-only, audit-only ``noise_seed`` builds it, and
no job can set that (``JobSpec`` has no such field and ``prepare_training`` never passes it).
This module imports TensorFlow at import time: import it lazily, only for an audit.
"""

from __future__ import annotations

import collections
from typing import Any

import dp_accounting
import tensorflow as tf

from engine.dp_query import FiniteGaussianSumQuery

__all__ = ["SeededGaussianSumQuery"]


class SeededGaussianSumQuery(FiniteGaussianSumQuery):
    """The job's query with noise N(0, stddev²) drawn from ``seed`` (audit only)."""

    _GlobalState = collections.namedtuple("_GlobalState", ["l2_norm_clip", "stddev", "noise_seed"])

    def __init__(self, l2_norm_clip: float, stddev: float, seed: int) -> None:
        super().__init__(l2_norm_clip=l2_norm_clip, stddev=stddev)
        self._seed = int(seed)

    def initial_global_state(self) -> Any:
        return self._GlobalState(
            tf.cast(self._l2_norm_clip, tf.float32), tf.cast(self._stddev, tf.float32),
            tf.constant([self._seed, 0], dtype=tf.int64),
        )

    def get_noised_result(self, sample_state: Any, global_state: Any) -> Any:
        """The parent's result with stateless noise: one fresh sub-seed per tensor per round."""
        leaves = tf.nest.flatten(sample_state)
        seeds = tf.random.experimental.stateless_split(global_state.noise_seed,
                                                       num=len(leaves) + 1)
        noised = [
            leaf + tf.random.stateless_normal(tf.shape(leaf), seed=seeds[i + 1],
                                              stddev=global_state.stddev, dtype=leaf.dtype)
            for i, leaf in enumerate(leaves)
        ]
        result = tf.nest.pack_sequence_as(sample_state, noised)
        event = dp_accounting.GaussianDpEvent(global_state.stddev / global_state.l2_norm_clip)
        return result, global_state._replace(noise_seed=seeds[0]), event
