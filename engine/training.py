"""User-level DP-FedAvg on TensorFlow Federated, one virtual silo (client) per user.

Per round, for a training partition of N users:

* every user is sampled independently with probability q (Poisson sampling; fresh OS
  randomness, so the sample cannot be predicted or replayed);
* each sampled user trains locally (``local_epochs`` passes, the job's client optimizer) from
  the server model; its model delta is clipped to L2 norm C
  (``DifferentiallyPrivateFactory.gaussian_fixed``: fixed clipping over all trainable tensors
  jointly);
* the server adds Gaussian noise of std z·C to the *sum* of clipped deltas and divides by the
  constant ``expected_clients_per_round`` = q·N (never by the realised count); the server
  optimizer step (the job's choice: SGD, SGD with momentum, Adam, Yogi or Adagrad) is
  post-processing.

A round in which nobody is sampled still runs: TFF 0.87 accepts an empty client list, sums to
zero and adds the noise, which is exactly the mechanism's output for an empty sample.

TFF's training metrics (loss, accuracy, example counts) are computed on raw client data and
summed without noise; they are discarded here and never leave this module.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.artifact import ModelSummary, keras_from_artifact
from engine.job import JobSpec

if TYPE_CHECKING:
    import tensorflow as tf

    from engine.datastore import Partition

__all__ = ["FederatedTraining", "dp_aggregator", "poisson_sample", "prepare_training"]


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

        rng = np.random.default_rng(secrets.randbits(128))
        for round_number in range(1, self.spec.rounds + 1):
            sampled = poisson_sample(rng, partition.users, self.spec.sampling_rate)
            clients = [self._client_dataset(*partition.user_examples(int(user)))
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


def poisson_sample(rng: np.random.Generator, population: int, sampling_rate: float) -> np.ndarray:
    """Indices of the members of ``range(population)`` included in one round: each independently
    with probability ``sampling_rate`` (the PoissonSampled event the ledger accounts)."""
    return np.flatnonzero(rng.random(population) < sampling_rate)


def dp_aggregator(spec: JobSpec, *, audit_noise_disabled: bool = False,
                  audit_clipping_removed: bool = False, noise_seed: int | None = None) -> Any:
    """The DP-FedAvg model aggregator: the one place the engine's privacy mechanism is built.

    Clips each client's delta to L2 norm ``spec.clip`` jointly over all tensors, adds
    N(0, (noise_multiplier·clip)²) to the sum of clipped deltas and divides by the constant
    ``spec.expected_clients_per_round``. The noise is fresh (TF's unseeded generator) in every
    job and every round.

    Three keyword-only switches exist for :mod:`engine.privacy_audit` alone:

    * ``audit_noise_disabled`` — noise multiplier 0 (a broken mechanism the audit must catch);
    * ``audit_clipping_removed`` — no clipping (clip norm 1e30) while the noise stays
      calibrated to the claimed C (another broken mechanism the audit must catch);
    * ``noise_seed`` — the same query with its noise drawn from a seed
      (:class:`engine.seeded_noise.SeededGaussianSumQuery`) so an audit is reproducible.
      Seeded noise is predictable, hence no protection for real users.

    None of them is a :class:`JobSpec` field and :func:`prepare_training` passes none, so no
    job (and nothing the gateway accepts) can reach them. Without them this is exactly
    ``DifferentiallyPrivateFactory.gaussian_fixed``; with them it is the composition
    ``gaussian_fixed`` builds (``NormalizedQuery(GaussianSumQuery(clip, z·clip), q·N)``) with
    only the audited change.
    """
    import tensorflow_federated as tff

    noise_multiplier = 0.0 if audit_noise_disabled else spec.noise_multiplier
    if not audit_clipping_removed and noise_seed is None:
        return tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
            noise_multiplier=noise_multiplier,
            clients_per_round=spec.expected_clients_per_round,
            clip=spec.clip,
        )
    import tensorflow_privacy as tfp

    # A finite stand-in for "no clip": tf.clip_by_global_norm(x, inf) computes inf·0 = NaN.
    l2_norm_clip = 1e30 if audit_clipping_removed else spec.clip
    stddev = noise_multiplier * spec.clip  # still the noise claimed for clip C
    if noise_seed is None:
        sum_query = tfp.GaussianSumQuery(l2_norm_clip=l2_norm_clip, stddev=stddev)
    else:
        from engine.seeded_noise import SeededGaussianSumQuery

        sum_query = SeededGaussianSumQuery(l2_norm_clip, stddev, noise_seed)
    return tff.aggregators.DifferentiallyPrivateFactory(
        tfp.NormalizedQuery(sum_query, denominator=float(spec.expected_clients_per_round)))


def _optimizer(spec: JobSpec, side: str) -> Any:
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
    """Build the TFF process from a validated artifact; reads no user data."""
    import tensorflow as tf
    import tensorflow_federated as tff

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
        client_optimizer_fn=_optimizer(spec, "client"),
        server_optimizer_fn=_optimizer(spec, "server"),
        model_aggregator=aggregator,
    )
    keras_model = keras_from_artifact(doc)
    initial = tff.learning.models.ModelWeights(
        trainable=[w.numpy() for w in keras_model.trainable_weights],
        non_trainable=[w.numpy() for w in keras_model.non_trainable_weights],
    )
    state = process.set_model_weights(process.initialize(), initial)
    return FederatedTraining(process=process, state=state, spec=spec, keras_model=keras_model)
