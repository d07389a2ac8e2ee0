"""User-level DP-FedAvg on TensorFlow Federated, one virtual silo (client) per user.

Per round, for a training partition of N users:

* every user is sampled independently with probability q (Poisson sampling, each decision
  from the OS CSPRNG: :func:`poisson_sample`; the sample cannot be predicted or replayed);
* each sampled user trains locally (``local_epochs`` passes, the job's client optimizer) from
  the server model on at most ``max_examples_per_user`` of their examples (a fresh uniform
  subset when they have more: the owner's bound on one user's local work); its model delta is
  zeroed if not finite and clipped to L2 norm C jointly over all trainable tensors
  (:class:`engine.dp_query.FiniteGaussianSumQuery`);
* the server adds Gaussian noise of std σ ≥ z·C (float32, ``JobSpec.noise_stddev``) to the
  *sum* of clipped deltas and divides by the public constant ``expected_clients_per_round`` =
  q·N̂ (never by the realised count, never by the exact N); the server optimizer step (the
  job's choice: SGD, SGD with momentum, Adam, Yogi or Adagrad) is post-processing.

A round in which nobody is sampled still runs: TFF 0.87 accepts an empty client list, sums to
zero and adds the noise, which is exactly the mechanism's output for an empty sample.

TFF's training metrics (loss, accuracy, example counts) are computed on raw client data and
summed without noise; they are discarded here and never leave this module.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.artifact import ModelSummary, keras_from_artifact
from engine.job import JobSpec, JobSpecInvalid

if TYPE_CHECKING:
    import tensorflow as tf

    from engine.datastore import Partition

__all__ = [
    "FederatedTraining",
    "cap_examples",
    "capped_subset",
    "dp_aggregator",
    "poisson_sample",
    "prepare_training",
    "tff_optimizer",
]


@dataclass
class FederatedTraining:
    """A built DP-FedAvg process and its state, initialised with the uploaded weights."""

    process: Any
    state: Any
    spec: JobSpec
    keras_model: tf.keras.Model
    client_updates: int = 0
    """Client updates computed so far (Σ sampled users over rounds): data-dependent, reported
    to the owner's metering only (``engine.meter.COUNTS_FILE``), never released."""

    def run(self, partition: Partition, on_round: Callable[[int], None]) -> tf.keras.Model:
        """Train for ``spec.rounds`` rounds; return the Keras model holding the final weights."""
        import tensorflow_federated as tff

        rng = np.random.default_rng(secrets.randbits(128))  # example subsets only
        for round_number in range(1, self.spec.rounds + 1):
            sampled = poisson_sample(partition.users, self.spec.sampling_rate)
            clients = [self._client_dataset(*cap_examples(
                rng, *partition.user_examples(int(user)), self.spec.max_examples_per_user))
                       for user in sampled]
            self.state = self.process.next(self.state, clients).state  # metrics dropped
            self.client_updates += len(clients)
            on_round(round_number)
        weights: tff.learning.models.ModelWeights = self.process.get_model_weights(self.state)
        weights.assign_weights_to(self.keras_model)
        return self.keras_model

    def _client_dataset(self, features: np.ndarray, labels: np.ndarray) -> Any:
        import tensorflow as tf

        return (
            tf.data.Dataset.from_tensor_slices((np.array(features), np.array(labels)))
            .shuffle(len(labels), reshuffle_each_iteration=True)
            .repeat(self.spec.local_epochs)
            .batch(self.spec.batch_size)
        )


def poisson_sample(population: int, sampling_rate: float,
                   random_bytes: Callable[[int], bytes] = os.urandom) -> np.ndarray:
    """Indices of the members of ``range(population)`` included in one round: each independently
    with probability p ≤ ``sampling_rate`` (the PoissonSampled event the ledger accounts).

    Each member gets 64 fresh bits from the OS CSPRNG (``random_bytes``, ``os.urandom``; never
    a seeded generator, whose state could be predicted) and is included iff they are below
    ⌊q·2⁶⁴⌋, so p = ⌊q·2⁶⁴⌋/2⁶⁴ is within 2⁻⁶⁴ of q and never above it (sampling with a
    smaller rate only lowers the privacy loss). q = 1 includes everyone.
    """
    if not 0.0 < sampling_rate <= 1.0:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if sampling_rate == 1.0:
        return np.arange(population)
    threshold = np.uint64(math.floor(Fraction(sampling_rate) * 2**64))
    draws = np.frombuffer(random_bytes(8 * population), dtype=np.uint64)
    return np.flatnonzero(draws < threshold)


def cap_examples(rng: np.random.Generator, features: np.ndarray, labels: np.ndarray,
                 cap: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One sampled user's examples for this round: all of them if they have at most ``cap``,
    else a uniform subset of exactly ``cap`` without replacement (fresh each round). Bounds a
    user's local work by ``local_epochs × ⌈cap / batch_size⌉`` steps; ``cap`` None: no cap."""
    if cap is None or len(labels) <= cap:
        return features, labels
    chosen = capped_subset(rng, len(labels), cap)
    return features[chosen], labels[chosen]


def capped_subset(rng: np.random.Generator, examples: int, cap: int) -> np.ndarray:
    """A uniform subset of exactly ``cap`` of ``range(examples)`` (``examples > cap``), without
    replacement, sorted: which of an over-cap user's examples train this round."""
    return np.sort(rng.choice(examples, size=cap, replace=False))


def dp_aggregator(spec: JobSpec, *, audit_noise_disabled: bool = False,
                  audit_clipping_removed: bool = False, noise_seed: int | None = None) -> Any:
    """The per-user path's DP-FedAvg model aggregator (the vectorized engine builds its
    shard-sum counterpart in ``engine.shard_process``, with the same σ and denominator).

    Clips each client's delta to L2 norm ``spec.clip`` jointly over all tensors, adds
    N(0, (noise_multiplier·clip)²) to the sum of clipped deltas and divides by the constant
    ``spec.expected_clients_per_round``. The noise is fresh (TF's unseeded generator) in every
    job and every round.

    The noise std is ``spec.noise_stddev()`` (float32, ≥ noise_multiplier × float32(clip):
    ``ledger.mechanism``) and each client's delta is zeroed if not finite before it is clipped
    (:class:`engine.dp_query.FiniteGaussianSumQuery`).

    Three keyword-only switches exist for :mod:`engine.privacy_audit` alone:

    * ``audit_noise_disabled`` — noise multiplier 0 (a broken mechanism the audit must catch);
    * ``audit_clipping_removed`` — no clipping (clip norm 1e30) while the noise stays
      calibrated to the claimed C (another broken mechanism the audit must catch);
    * ``noise_seed`` — the same query with its noise drawn from a seed
      (:class:`engine.seeded_noise.SeededGaussianSumQuery`) so an audit is reproducible.
      Seeded noise is predictable, hence no protection for real users.

    None of them is a :class:`JobSpec` field and :func:`prepare_training` passes none, so no
    job (and nothing the gateway accepts) can reach them. Without them this is the composition
    ``DifferentiallyPrivateFactory.gaussian_fixed`` builds
    (``NormalizedQuery(GaussianSumQuery(clip, σ), q·N̂)``) with the finite-delta rule and the
    exact float32 σ; with them, only the audited change.
    """
    import tensorflow_federated as tff
    import tensorflow_privacy as tfp

    from engine.dp_query import FiniteGaussianSumQuery

    stddev = 0.0 if audit_noise_disabled else spec.noise_stddev()  # the noise claimed for C
    # A finite stand-in for "no clip": tf.clip_by_global_norm(x, inf) computes inf·0 = NaN.
    l2_norm_clip = 1e30 if audit_clipping_removed else spec.clip
    if noise_seed is None:
        sum_query = FiniteGaussianSumQuery(l2_norm_clip=l2_norm_clip, stddev=stddev)
    else:
        from engine.seeded_noise import SeededGaussianSumQuery

        sum_query = SeededGaussianSumQuery(l2_norm_clip, stddev, noise_seed)
    return tff.aggregators.DifferentiallyPrivateFactory(
        tfp.NormalizedQuery(sum_query, denominator=float(spec.expected_clients_per_round)))


def tff_optimizer(spec: JobSpec, side: str) -> Any:
    """The job's ``side`` optimizer from ``tff.learning.optimizers`` (closed choice, validated
    in :class:`JobSpec`). Local training (client) happens before clipping, the server step
    after the noise: neither changes the accounted mechanism or ε. sgd and sgdm with momentum
    0 are ``build_sgdm`` without momentum, as before the choice existed."""
    import tensorflow_federated as tff

    name, learning_rate, hyperparameters = spec.optimizer(side)
    if name in ("sgd", "sgdm"):
        return tff.learning.optimizers.build_sgdm(
            learning_rate, momentum=hyperparameters.get("momentum") or None)
    build = {"adam": tff.learning.optimizers.build_adam,
             "yogi": tff.learning.optimizers.build_yogi,
             "adagrad": tff.learning.optimizers.build_adagrad}[name]
    return build(learning_rate, **hyperparameters)


def prepare_training(doc: dict[str, Any], summary: ModelSummary, spec: JobSpec,
                     num_features: int) -> FederatedTraining:
    """Build the TFF process from a validated artifact; reads no user data. The per-user
    reference path clips at a fixed C: an adaptive-clipping spec is refused, never run as
    fixed (its clipped-count query is part of what was charged)."""
    import tensorflow as tf
    import tensorflow_federated as tff

    if spec.clip_strategy != "fixed":
        raise JobSpecInvalid("adaptive clipping runs on the vectorized engine only "
                             "(engine.shard_process); the per-user path clips at a fixed C")

    input_spec = (
        tf.TensorSpec([None, num_features], tf.float32),
        tf.TensorSpec([None], tf.int32),
    )
    from_logits = not summary.outputs_probabilities

    def model_fn() -> tff.learning.models.VariableModel:
        return tff.learning.models.from_keras_model(
            keras_from_artifact(doc, load_weights=False),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
            input_spec=input_spec,
        )

    aggregator = dp_aggregator(spec)
    process = tff.learning.algorithms.build_unweighted_fed_avg(
        model_fn,
        client_optimizer_fn=tff_optimizer(spec, "client"),
        server_optimizer_fn=tff_optimizer(spec, "server"),
        model_aggregator=aggregator,
    )
    keras_model = keras_from_artifact(doc)
    initial = tff.learning.models.ModelWeights(
        trainable=[w.numpy() for w in keras_model.trainable_weights],
        non_trainable=[w.numpy() for w in keras_model.non_trainable_weights],
    )
    state = process.set_model_weights(process.initialize(), initial)
    return FederatedTraining(process=process, state=state, spec=spec, keras_model=keras_model)
