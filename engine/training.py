"""User-level DP-FedAvg on TensorFlow Federated, one virtual silo (client) per user.

Per round, for a training partition of N users:

* every user is sampled independently with probability q (Poisson sampling; fresh OS
  randomness, so the sample cannot be predicted or replayed);
* each sampled user trains locally (``local_epochs`` passes, SGD) from the server model; its
  model delta is clipped to L2 norm C (``DifferentiallyPrivateFactory.gaussian_fixed``: fixed
  clipping over all trainable tensors jointly);
* the server adds Gaussian noise of std z·C to the *sum* of clipped deltas and divides by the
  constant ``expected_clients_per_round`` = q·N (never by the realised count); the server
  optimizer step (SGD with momentum) is post-processing.

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

    def run(self, partition: Partition, on_round: Callable[[int], None]) -> tf.keras.Model:
        """Train for ``spec.rounds`` rounds; return the Keras model holding the final weights."""
        import tensorflow_federated as tff

        rng = np.random.default_rng(secrets.randbits(128))
        for round_number in range(1, self.spec.rounds + 1):
            sampled = poisson_sample(rng, partition.users, self.spec.sampling_rate)
            clients = [self._client_dataset(*partition.user_examples(int(user)))
                       for user in sampled]
            self.state = self.process.next(self.state, clients).state  # metrics dropped
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


def dp_aggregator(spec: JobSpec, *, audit_noise_disabled: bool = False) -> Any:
    """The DP-FedAvg model aggregator: the one place the engine's privacy mechanism is built.

    Clips each client's delta to L2 norm ``spec.clip`` jointly over all tensors, adds
    N(0, (noise_multiplier·clip)²) to the sum of clipped deltas and divides by the constant
    ``spec.expected_clients_per_round``.

    ``audit_noise_disabled`` builds the same aggregator with noise multiplier 0 — a deliberately
    broken mechanism for :mod:`engine.privacy_audit` to detect. It is keyword-only, is not a
    :class:`JobSpec` field and is never passed by :func:`prepare_training`, so no job (and
    nothing the gateway accepts) can reach it.
    """
    import tensorflow_federated as tff

    return tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
        noise_multiplier=0.0 if audit_noise_disabled else spec.noise_multiplier,
        clients_per_round=spec.expected_clients_per_round,
        clip=spec.clip,
    )


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
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(spec.client_learning_rate),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(
            spec.server_learning_rate, momentum=spec.server_momentum or None
        ),
        model_aggregator=aggregator,
    )
    keras_model = keras_from_artifact(doc)
    initial = tff.learning.models.ModelWeights(
        trainable=[w.numpy() for w in keras_model.trainable_weights],
        non_trainable=[w.numpy() for w in keras_model.non_trainable_weights],
    )
    state = process.set_model_weights(process.initialize(), initial)
    return FederatedTraining(process=process, state=state, spec=spec, keras_model=keras_model)
