"""DP-FedAvg on TFF with shards of users as clients: the vectorized engine.

The privacy unit stays the user; only the unit of TFF work changes. Per round:

* every training user is sampled independently with probability q (:func:`engine.training.
  poisson_sample`, OS CSPRNG), exactly as on the per-user path;
* the sampled users are cut into shards of at most ``shard_size`` users; each shard is one TFF
  client whose work (:func:`engine.vectorized_users.shard_clipped_sum`) trains each of its users
  independently from the server weights, clips each user's update to C and returns the sum;
* TFF sums the shards' sums (the shards are *not* clipped again: each user's contribution is
  already clipped, so the total has sensitivity C), adds N(0, σ²) once with σ ≥ z·C
  (``JobSpec.noise_stddev``), divides by the public constant q·N̂ and applies the server
  optimizer (post-processing): ``DifferentiallyPrivateFactory(NormalizedQuery(
  ShardSumQuery(σ), q·N̂))`` wrapped as a weighted aggregator with weight 1 per shard.

The accounted event is unchanged: ``PoissonSampled(q, Gaussian(z))`` per round. Under
adaptive clipping (``JobSpec.clip_strategy == "adaptive"``) the process is
:class:`AdaptiveClipProcess` instead: the server state carries the clip C_t, broadcast with the
weights; each shard also returns its exact count of unclipped users, and the server noises the
sum with σ_t ≥ z_Δ·C_t and the centred count with σ_b, then moves C_t (the event is
``PoissonSampled(q, Composed([Gaussian(z_Δ), Gaussian(2σ_b)]))``, see
``ledger.mechanism.AdaptiveClipping``). Every sampled
user is padded to the owner's cap (masks), so a user's work is the same whatever their data;
a shard holds as many users as fit 256 MiB by :mod:`engine.memory`'s per-user model (the
padded examples, a few copies of the parameters and one local batch's working tensors:
convolution and RNN layers hold far more per example than their input), and a job's memory
is estimated, reported and checked against the node's limit by the same module. Which
layers run here, and why none of them mixes users, is
:mod:`engine.functional_model`'s contract.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.functional_model import StackedModel, build_stacked_model
from engine.job import JobSpec
from engine.keras_config import check_model_config
from engine.memory import per_user_bytes, users_per_shard
from engine.training import poisson_sample
from engine.vectorized_users import (
    example_order,
    gather_users,
    shard_clipped_sum,
    shard_clipped_sum_and_count,
)

if TYPE_CHECKING:
    import tensorflow as tf

    from engine.datastore import Partition

__all__ = ["AdaptiveClipProcess", "ShardedTraining", "prepare_sharded_training"]


@dataclass
class ShardedTraining:
    """A built sharded DP-FedAvg process, its state and how it packs users into shards."""

    process: Any
    state: Any
    spec: JobSpec
    keras_model: tf.keras.Model
    cap: int
    shard_size: int
    min_shards: int = 1
    scratch_dir: Path | None = None
    """Where a round's shards are written for the local runtime's worker to read (the job's
    own directory; one file per shard slot, overwritten every round, removed when training
    ends). None: shards travel inside TFF's serialized datasets (remote workers on other hosts
    cannot read local files)."""
    client_updates: int = 0
    """Client updates so far (Σ sampled users): owner's metering only, never released."""
    _rng: np.random.Generator = field(
        default_factory=lambda: np.random.default_rng(secrets.randbits(128)))
    _files: dict[int, ShardFile] = field(default_factory=dict)

    def run(self, partition: Partition, on_round: Callable[[int], None]) -> tf.keras.Model:
        """Train for ``spec.rounds`` rounds; return the Keras model holding the final weights.
        The shard files are removed when training ends, however it ends."""
        try:
            for round_number in range(1, self.spec.rounds + 1):
                sampled = poisson_sample(partition.users, self.spec.sampling_rate)
                shards = self.shards(partition, sampled)
                self.state = self.process.next(self.state, shards).state
                self.client_updates += len(sampled)
                on_round(round_number)
        finally:
            self._remove_shard_files()
        weights = self.process.get_model_weights(self.state)
        weights.assign_weights_to(self.keras_model)
        return self.keras_model

    def shards(self, partition: Partition, sampled: np.ndarray) -> list[Any]:
        """The round's shards: at least ``min_shards`` (one per remote worker), each of at
        most ``shard_size`` users, as one-element datasets of (features, labels, counts,
        order)."""
        import tensorflow as tf

        count = max(self.min_shards, math.ceil(len(sampled) / self.shard_size))
        result = []
        for index, users in enumerate(np.array_split(sampled, count)):
            features, labels, counts = gather_users(partition, users, self.cap, self._rng)
            order = example_order(self._rng, counts, self.cap, self.spec.local_epochs)
            arrays = (features, labels, counts, order)
            if self.scratch_dir is None:
                result.append(tf.data.Dataset.from_tensors(arrays))
            else:
                result.append(self._shard_file(index).write(arrays))
        return result

    def _shard_file(self, index: int) -> ShardFile:
        assert self.scratch_dir is not None
        if index not in self._files:
            self._files[index] = ShardFile(
                self.scratch_dir / f"shard-{index}.bin", self.cap,
                self.spec.local_epochs * self.cap,
                tuple(int(n) for n in self.keras_model.input_shape[1:]))
        return self._files[index]

    def _remove_shard_files(self) -> None:
        for shard_file in self._files.values():
            with contextlib.suppress(FileNotFoundError):
                shard_file.path.unlink()


class ShardFile:
    """One shard slot in the job directory: each round overwrites the file with the shard's
    arrays, and one dataset, built once, reads whatever the file holds.

    TFF serializes a dataset built from in-memory tensors into its graph and ships it to the
    worker (half of a round's time at 1,000 users); this one carries only the path, and the
    worker, in the same sandbox, reads the bytes itself. The file starts with the number of
    users U (int64); the arrays' shapes are U × the shapes fixed by the job (cap, epochs,
    input shape), so the same dataset (built and traced once, not every round) reads every
    round's shard. The file is overwritten in place (truncating only what a smaller shard leaves
    over) — a tenth of the cost of a new file — and removed when training ends.
    """

    def __init__(self, path: Path, cap: int, epochs_cap: int,
                 input_shape: tuple[int, ...]) -> None:
        import tensorflow as tf

        self.path = path
        rows = [(tf.float32, [cap, *input_shape]), (tf.int32, [cap]), (tf.int32, []),
                (tf.int32, [epochs_cap])]

        def load(file: Any) -> tuple[Any, ...]:
            raw = tf.io.read_file(file)
            users = tf.io.decode_raw(tf.strings.substr(raw, 0, 8), tf.int64)[0]
            offset, parts = tf.constant(8, tf.int64), []
            for dtype, shape in rows:
                size = users * 4 * math.prod(shape)
                piece = tf.io.decode_raw(tf.strings.substr(raw, offset, size), dtype)
                parts.append(tf.reshape(piece, [-1, *shape]))
                offset += size
            return tuple(parts)

        self.dataset = tf.data.Dataset.from_tensors(str(path)).map(load)

    def write(self, arrays: tuple[np.ndarray, ...]) -> Any:
        """Write one shard (features, labels, counts, order); returns the dataset reading it."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as handle:
                handle.write(np.int64(len(arrays[2])).tobytes())
                for array in arrays:
                    handle.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
                end = handle.tell()
            if os.fstat(fd).st_size > end:
                os.ftruncate(fd, end)
        finally:
            os.close(fd)
        return self.dataset


def shard_sum_query(*, clip: float, stddev: float) -> Any:
    """TF Privacy's Gaussian sum query over *shard sums*: records are not clipped again (each
    user inside was clipped to ``clip`` by the shard's work), the noise is N(0, stddev²) on the
    total. Its DP event is the same ``GaussianDpEvent(stddev / clip)``."""
    import tensorflow_privacy as tfp

    class ShardSumQuery(tfp.GaussianSumQuery):
        def preprocess_record(self, params: Any, record: Any) -> Any:
            return record

    return ShardSumQuery(l2_norm_clip=clip, stddev=stddev)


def prepare_sharded_training(doc: dict[str, Any], spec: JobSpec, *, cap: int,
                             min_shards: int = 1, scratch_dir: Path | None = None,
                             noise_stddev: float | None = None) -> ShardedTraining:
    """Build the sharded TFF process from a validated, vectorizable artifact; reads no data.

    ``noise_stddev`` None means the job's σ (``spec.noise_stddev()``); tests that compare with
    the per-user reference pass 0.0 through :func:`noiseless_sharded_training_for_tests`.
    """
    import tensorflow as tf
    import tensorflow_federated as tff
    import tensorflow_privacy as tfp

    from engine.artifact import keras_from_artifact
    from engine.training import tff_optimizer

    keras_model = keras_from_artifact(doc)
    stacked = build_stacked_model(doc["config"])
    input_shape = tuple(int(n) for n in keras_model.input_shape[1:])
    shapes = [tuple(int(n) for n in w.shape) for w in keras_model.trainable_weights]
    trainable_type = [tff.TensorType(np.float32, s) for s in shapes]
    weights_type = tff.to_type(tff.learning.models.ModelWeights(trainable=trainable_type,
                                                                non_trainable=[]))
    epochs_cap = spec.local_epochs * cap
    # One shard = a TFF client whose data is a one-element dataset (TFF's client work takes
    # sequences): (features [U, cap, ...], labels [U, cap], counts [U], order [U, E·cap]).
    shard_type = tff.SequenceType(tff.StructWithPythonType([
        tff.TensorType(np.float32, [None, cap, *input_shape]),
        tff.TensorType(np.int32, [None, cap]),
        tff.TensorType(np.int32, [None]),
        tff.TensorType(np.int32, [None, epochs_cap]),
    ], tuple))
    _, learning_rate, hyperparameters = spec.optimizer("client")  # sgd or sgdm
    momentum = hyperparameters.get("momentum") or None
    initial = [w.numpy() for w in keras_model.trainable_weights]
    size = users_per_shard(per_user_bytes(
        parameters=sum(math.prod(s) for s in shapes), example_floats=math.prod(input_shape),
        working_elements=check_model_config(doc["config"]).working_elements, cap=cap,
        local_epochs=spec.local_epochs, batch_size=spec.batch_size))
    adaptive = spec.adaptive_clipping()
    if adaptive is not None:
        if noise_stddev not in (None, 0.0):
            raise ValueError("adaptive clipping runs the job's noise, or none (tests only)")
        process = AdaptiveClipProcess(
            stacked=stacked, initial=initial, spec=spec, adaptive=adaptive,
            shard_type=shard_type, learning_rate=learning_rate, momentum=momentum,
            noise=noise_stddev is None)
        return ShardedTraining(process=process, state=process.initialize(), spec=spec,
                               keras_model=keras_model, cap=cap, shard_size=size,
                               min_shards=min_shards, scratch_dir=scratch_dir)

    @tff.tensorflow.computation(weights_type, shard_type)
    def client_update(weights: Any, shard: Any) -> Any:
        features, labels, counts, order = shard.get_single_element()
        clipped = _clipped_sum(stacked, list(weights.trainable), features, labels, counts, order,
                               spec, learning_rate, momentum)
        return tff.learning.templates.ClientResult(update=clipped,
                                                   update_weight=tf.constant(1.0))

    @tff.federated_computation
    def initialize() -> Any:
        return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(initialize.type_signature.result,
                               tff.FederatedType(weights_type, tff.CLIENTS),
                               tff.FederatedType(shard_type, tff.CLIENTS))
    def next_fn(state: Any, weights: Any, shards: Any) -> Any:
        results = tff.federated_map(client_update, (weights, shards))
        return tff.templates.MeasuredProcessOutput(state, results,
                                                   tff.federated_value((), tff.SERVER))

    client_work = tff.learning.templates.ClientWorkProcess(initialize, next_fn)
    stddev = spec.noise_stddev() if noise_stddev is None else noise_stddev
    factory = tff.aggregators.DifferentiallyPrivateFactory(tfp.NormalizedQuery(
        shard_sum_query(clip=spec.clip, stddev=stddev),
        denominator=float(spec.expected_clients_per_round)))
    aggregator = tff.aggregators.as_weighted_aggregator(factory).create(
        weights_type.trainable, tff.TensorType(np.float32))

    @tff.tensorflow.computation
    def initial_weights() -> Any:
        return tff.learning.models.ModelWeights(
            trainable=[tf.constant(w) for w in initial], non_trainable=[])

    process = tff.learning.templates.compose_learning_process(
        initial_weights,
        tff.learning.templates.build_broadcast_process(weights_type),
        client_work,
        aggregator,
        tff.learning.templates.build_apply_optimizer_finalizer(tff_optimizer(spec, "server"),
                                                               weights_type),
    )
    return ShardedTraining(process=process, state=process.initialize(), spec=spec,
                           keras_model=keras_model, cap=cap, shard_size=size,
                           min_shards=min_shards, scratch_dir=scratch_dir)


class AdaptiveClipProcess:
    """Sharded DP-FedAvg with adaptive clipping (Andrew et al. 2021), as a TFF computation.

    Server state: (trainable weights, server optimizer state, C_t as float32). One round
    (``next``): broadcast the weights and C_t; each shard returns Σ_u clip(Δ_u, C_t) and
    Σ_u (2·b_u − 1) (int64, exact); TFF sums the shards; the server adds N(0, σ_t²) to each
    tensor of the sum with σ_t = float32(C_t × m) (m = ``AdaptiveClipping.update_multiplier32``
    ≥ z_Δ·(1 + 2⁻¹⁸): σ_t ≥ z_Δ·C_t), divides by q·N̂ and takes the server optimizer's step; it
    adds N(0, σ_b²) in float64 to the centred count (the int64 halved, exact), estimates the
    unclipped fraction b̄ = noised count / (q·N̂) + 1/2 and sets C_{t+1} = clamp(C_t ·
    exp(−η (b̄ − γ)), [min_clip, max_clip]) — post-processing of the noised count. Nothing
    else leaves a shard or the server. ``noise=False`` (tests only) draws no noise at all.
    """

    def __init__(self, *, stacked: StackedModel, initial: list[np.ndarray], spec: JobSpec,
                 adaptive: Any, shard_type: Any, learning_rate: float,
                 momentum: float | None, noise: bool) -> None:
        import tensorflow as tf
        import tensorflow_federated as tff

        from engine.training import tff_optimizer

        optimizer = tff_optimizer(spec, "server")
        specs = [tf.TensorSpec(w.shape, tf.float32) for w in initial]
        trainable_type = [tff.TensorType(np.float32, w.shape) for w in initial]
        clip_type = tff.TensorType(np.float32)
        denominator = float(spec.expected_clients_per_round)
        multiplier = adaptive.update_multiplier32 if noise else 0.0
        count_stddev = adaptive.clipped_count_stddev if noise else 0.0
        low, high = adaptive.min_clip, adaptive.max_clip
        rate, target = adaptive.clip_learning_rate, adaptive.target_unclipped_quantile

        @tff.tensorflow.computation
        def server_initial() -> Any:
            trainable = [tf.constant(w) for w in initial]
            return trainable, optimizer.initialize(specs), tf.constant(spec.clip, tf.float32)

        state_type = server_initial.type_signature.result

        @tff.tensorflow.computation(state_type)
        def weights_and_clip(state: Any) -> Any:
            return state[0], state[2]

        @tff.tensorflow.computation(trainable_type, clip_type, shard_type)
        def client_update(trainable: Any, clip: Any, shard: Any) -> Any:
            features, labels, counts, order = shard.get_single_element()
            return shard_clipped_sum_and_count(
                stacked, list(trainable), features, labels, counts, order, clip=clip,
                local_epochs=spec.local_epochs, batch_size=spec.batch_size,
                learning_rate=learning_rate, momentum=momentum)

        total_type = client_update.type_signature.result

        @tff.tensorflow.computation(state_type, total_type)
        def server_update(state: Any, total: Any) -> Any:
            trainable, optimizer_state, clip = state
            sums, twice_centred = total
            stddev = clip * tf.constant(multiplier, tf.float32)
            average = [(s + tf.random.normal(tf.shape(s), stddev=stddev)) / denominator
                       for s in sums]
            optimizer_state, trainable = optimizer.next(optimizer_state, list(trainable),
                                                        average)
            centred = (tf.cast(twice_centred, tf.float64) / 2.0
                       + tf.random.normal([], stddev=count_stddev, dtype=tf.float64))
            unclipped = centred / denominator + 0.5
            moved = tf.cast(clip, tf.float64) * tf.exp(-rate * (unclipped - target))
            new_clip = tf.clip_by_value(tf.cast(moved, tf.float32), low, high)
            return trainable, optimizer_state, new_clip

        @tff.federated_computation
        def initialize() -> Any:
            return tff.federated_eval(server_initial, tff.SERVER)

        @tff.federated_computation(tff.FederatedType(state_type, tff.SERVER),
                                   tff.FederatedType(shard_type, tff.CLIENTS))
        def next_fn(state: Any, shards: Any) -> Any:
            trainable, clip = tff.federated_map(weights_and_clip, state)
            results = tff.federated_map(client_update, (
                tff.federated_broadcast(trainable), tff.federated_broadcast(clip), shards))
            return tff.federated_map(server_update, (state, tff.federated_sum(results)))

        self._initialize, self._next = initialize, next_fn

    def initialize(self) -> Any:
        return self._initialize()

    def next(self, state: Any, shards: list[Any]) -> Any:
        """One round; returns an object whose ``state`` is the new server state (as TFF's
        learning processes do)."""
        return _Output(self._next(state, shards))

    @staticmethod
    def clip(state: Any) -> float:
        """C_t of a server state (post-processing of noised counts; never released)."""
        return float(state[2])

    @staticmethod
    def get_model_weights(state: Any) -> Any:
        import tensorflow_federated as tff

        return tff.learning.models.ModelWeights(trainable=list(state[0]), non_trainable=[])


@dataclass
class _Output:
    state: Any


def _clipped_sum(stacked: StackedModel, weights: list[Any], features: Any, labels: Any,
                 counts: Any, order: Any, spec: JobSpec, learning_rate: float,
                 momentum: float | None) -> list[Any]:
    return shard_clipped_sum(stacked, weights, features, labels, counts, order, clip=spec.clip,
                             local_epochs=spec.local_epochs, batch_size=spec.batch_size,
                             learning_rate=learning_rate, momentum=momentum)


def noiseless_sharded_training_for_tests(doc: dict[str, Any], spec: JobSpec, *,
                                         cap: int) -> ShardedTraining:
    """The sharded process with the noise switched off: tests compare its pre-noise sum with
    the per-user reference. Not reachable from a job (no JobSpec field selects it)."""
    return prepare_sharded_training(doc, spec, cap=cap, noise_stddev=0.0)
