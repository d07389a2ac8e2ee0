"""The vectorized engine as a specification: shards of users under TFF compute exactly what the
per-user path computes, users never mix, and the loss is the exact one from logits.

Equivalence is checked with the noise switched off (``noiseless_sharded_training_for_tests``
and the audit-only ``audit_noise_disabled`` switch of the reference aggregator), a denominator
of 1 and a server SGD step of 1, so both processes release w₀ − Σ_u clip(Δ_u) and any
difference is a difference in the clipped per-user updates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.functional_model import build_stacked_model, vectorizable
from engine.job import JobSpec
from engine.vectorized_users import example_order, pad_users, user_clipped_updates
from tests.conftest import in_own_process

pytestmark = pytest.mark.tff

FIXTURES = Path(__file__).parent / "fixtures"
CAP = 12


def _spec(**fields: Any) -> JobSpec:
    base: dict[str, Any] = dict(
        job_id="t", dataset_dir=Path("/d"), model_path=Path("/m"), rounds=1, sampling_rate=0.5,
        expected_clients_per_round=1.0, noise_multiplier=1.0, clip=0.3,
        client_learning_rate=0.5, server_learning_rate=1.0, server_momentum=0.0,
        local_epochs=1, batch_size=4, evaluation=None, server_optimizer="sgd")
    return JobSpec(**{**base, **fields})


def _linear() -> dict[str, Any]:
    doc = json.loads((FIXTURES / "logreg-20x5.json").read_text())
    rng = np.random.default_rng(1)
    from engine.artifact import encode_array

    doc["weights"] = [encode_array(rng.normal(0, 0.3, (20, 5)).astype(np.float32)),
                      encode_array(rng.normal(0, 0.1, 5).astype(np.float32))]
    return doc


def _mlp() -> dict[str, Any]:
    import tensorflow as tf

    from engine.artifact import artifact_from_keras

    tf.keras.utils.set_random_seed(3)
    model = tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=(20,), name="features"),
        tf.keras.layers.Dense(16, activation="relu"),
        tf.keras.layers.Dense(5, activation="softmax"),
    ])
    return artifact_from_keras(model)


def _cnn() -> dict[str, Any]:
    """A small CNN on the 20 features seen as a 4×5 image."""
    import tensorflow as tf

    from engine.artifact import artifact_from_keras

    tf.keras.utils.set_random_seed(4)
    layers = tf.keras.layers
    model = tf.keras.Sequential([
        layers.InputLayer(input_shape=(20,), name="features"),
        layers.Reshape((4, 5, 1)),
        layers.Conv2D(3, 2, padding="same", activation="relu"),
        layers.MaxPooling2D(),
        layers.Flatten(),
        layers.Dense(5, activation="softmax"),
    ])
    return artifact_from_keras(model)


VOCABULARY, TOKENS = 10, 6


def _lstm() -> dict[str, Any]:
    """Embedding → LSTM → Dense on TOKENS token ids (float features, as the datastore has)."""
    import tensorflow as tf

    from engine.artifact import artifact_from_keras

    tf.keras.utils.set_random_seed(5)
    layers = tf.keras.layers
    model = tf.keras.Sequential([
        layers.InputLayer(input_shape=(TOKENS,), name="tokens"),
        layers.Embedding(VOCABULARY, 4),
        layers.LSTM(4),
        layers.Dense(5, activation="softmax"),
    ])
    return artifact_from_keras(model)


MODELS = {"linear": _linear, "mlp": _mlp, "cnn": _cnn, "lstm": _lstm}


def _users(model: str = "mlp", seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Six users with 1 to CAP examples each: 20 normal features, or token ids for lstm."""
    rng = np.random.default_rng(seed)
    sizes = [3, 12, 7, 10, 5, 1]
    if model == "lstm":
        features = [rng.integers(0, VOCABULARY, (n, TOKENS)).astype(np.float32) for n in sizes]
    else:
        features = [rng.normal(size=(n, 20)).astype(np.float32) for n in sizes]
    return [(x, rng.integers(0, 5, len(x)).astype(np.int32)) for x in features]


def _changed_features(model: str, x: np.ndarray) -> np.ndarray:
    """Other features of the same kind (token ids stay ids)."""
    return (x + 3) % VOCABULARY if model == "lstm" else x * 5.0 + 1.0


def _feature_shape(doc: dict[str, Any]) -> tuple[int, ...]:
    from engine.keras_config import check_model_config

    return check_model_config(doc["config"]).input_shape


def _reference_round(doc: dict[str, Any], spec: JobSpec,
                     users: list[tuple[np.ndarray, np.ndarray]], order: np.ndarray) -> list[Any]:
    """Today's per-user TFF path (one client per user), noise off, examples in ``order``."""
    import tensorflow as tf
    import tensorflow_federated as tff

    from engine.artifact import keras_from_artifact
    from engine.training import dp_aggregator, tff_optimizer

    def model_fn() -> Any:
        return tff.learning.models.from_keras_model(
            keras_from_artifact(doc, load_weights=False),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=False),
            input_spec=(tf.TensorSpec([None, *_feature_shape(doc)], tf.float32),
                        tf.TensorSpec([None], tf.int32)))

    process = tff.learning.algorithms.build_unweighted_fed_avg(
        model_fn, client_optimizer_fn=tff_optimizer(spec, "client"),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
        model_aggregator=dp_aggregator(spec, audit_noise_disabled=True))
    keras_model = keras_from_artifact(doc)
    state = process.set_model_weights(process.initialize(), tff.learning.models.ModelWeights(
        trainable=[w.numpy() for w in keras_model.trainable_weights], non_trainable=[]))
    datasets = []
    for u, (x, y) in enumerate(users):
        index = order[u, :spec.local_epochs * len(y)]
        datasets.append(tf.data.Dataset.from_tensor_slices((x[index], y[index]))
                        .batch(spec.batch_size))
    state = process.next(state, datasets).state
    return [np.asarray(w) for w in process.get_model_weights(state).trainable]


def _sharded_round(doc: dict[str, Any], spec: JobSpec, users: list[tuple[np.ndarray, np.ndarray]],
                   order: np.ndarray, shards: int) -> list[Any]:
    import tensorflow as tf

    from engine.shard_process import noiseless_sharded_training_for_tests

    training = noiseless_sharded_training_for_tests(doc, spec, cap=CAP)
    features, labels, counts = pad_users(users, CAP, _feature_shape(doc))
    datasets = [tf.data.Dataset.from_tensors((features[part], labels[part], counts[part],
                                              order[part]))
                for part in np.array_split(np.arange(len(users)), shards)]
    state = training.process.next(training.state, datasets).state
    return [np.asarray(w) for w in training.process.get_model_weights(state).trainable]


@pytest.mark.parametrize("model, epochs, optimizer, shards", [
    ("linear", 1, {}, 1),
    ("linear", 3, {"client_optimizer": "sgdm", "client_momentum": 0.9}, 2),
    ("mlp", 3, {}, 2),
    ("mlp", 1, {"client_optimizer": "sgdm", "client_momentum": 0.5}, 1),
    ("cnn", 1, {}, 1),
    ("cnn", 3, {"client_optimizer": "sgdm", "client_momentum": 0.9}, 2),
    ("lstm", 1, {"client_optimizer": "sgdm", "client_momentum": 0.5}, 2),
    ("lstm", 3, {}, 1),
])
@in_own_process
def test_sharded_round_equals_the_per_user_reference_with_noise_off(
    model: str, epochs: int, optimizer: dict[str, Any], shards: int
) -> None:
    doc = MODELS[model]()
    spec = _spec(local_epochs=epochs, **optimizer)
    users = _users(model)
    counts = np.array([len(y) for _, y in users], np.int32)
    order = example_order(np.random.default_rng(5), counts, CAP, epochs)
    reference = _reference_round(doc, spec, users, order)
    sharded = _sharded_round(doc, spec, users, order, shards)
    initial = [np.asarray(w) for w in _weights(doc)]
    moved = sum(float(np.abs(r - w).sum()) for r, w in zip(reference, initial, strict=True))
    assert moved > 1e-3  # training happened
    for r, s in zip(reference, sharded, strict=True):
        np.testing.assert_allclose(s, r, rtol=1e-4, atol=2e-6)


def _weights(doc: dict[str, Any]) -> list[np.ndarray]:
    from engine.artifact import decode_array

    return [decode_array(w) for w in doc["weights"]]


def _per_user_updates(doc: dict[str, Any], spec: JobSpec,
                      users: list[tuple[np.ndarray, np.ndarray]], order: np.ndarray) -> list[Any]:
    import tensorflow as tf

    stacked = build_stacked_model(doc["config"])
    features, labels, counts = pad_users(users, CAP, _feature_shape(doc))
    weights = [tf.constant(w) for w in _weights(doc)]
    updates = user_clipped_updates(stacked, weights, tf.constant(features), tf.constant(labels),
                                   tf.constant(counts), tf.constant(order), clip=spec.clip,
                                   local_epochs=spec.local_epochs, batch_size=spec.batch_size,
                                   learning_rate=spec.client_learning_rate, momentum=None)
    return [u.numpy() for u in updates]


@pytest.mark.parametrize("model", ["mlp", "cnn", "lstm"])
def test_changing_one_users_data_changes_only_that_users_clipped_update(model: str) -> None:
    doc, spec = MODELS[model](), _spec(local_epochs=2)
    users = _users(model)
    counts = np.array([len(y) for _, y in users], np.int32)
    order = example_order(np.random.default_rng(2), counts, CAP, 2)
    before = _per_user_updates(doc, spec, users, order)
    changed = list(users)
    x, y = changed[2]
    changed[2] = (_changed_features(model, x), (y + 1) % 5)
    after = _per_user_updates(doc, spec, changed, order)
    for b, a in zip(before, after, strict=True):
        others = [u for u in range(len(users)) if u != 2]
        assert np.array_equal(b[others], a[others])  # bit-identical
        assert not np.array_equal(b[2], a[2])
    norms = np.sqrt(sum((b.reshape(len(users), -1) ** 2).sum(axis=1) for b in before))
    assert np.all(norms <= spec.clip * (1 + 1e-5))


def _adaptive_spec(**fields: Any) -> JobSpec:
    return _spec(clip_strategy="adaptive", clipped_count_stddev=5.0,
                 target_unclipped_quantile=0.5, clip_learning_rate=0.2,
                 expected_clients_per_round=6.0, **fields)


@in_own_process
def test_an_adaptive_round_with_noise_off_applies_the_fixed_clip_mean_and_moves_the_clip() -> None:
    """Round 1 of adaptive clipping clips at the initial C exactly as a fixed clip does; the
    next clip is C·exp(−η(b̄ − γ)) with b̄ the fraction of users whose norm was at most C."""
    import tensorflow as tf

    from engine.shard_process import AdaptiveClipProcess, noiseless_sharded_training_for_tests

    doc, users = _mlp(), _users()
    counts = np.array([len(y) for _, y in users], np.int32)
    order = example_order(np.random.default_rng(5), counts, CAP, 1)
    features, labels, counts = pad_users(users, CAP, _feature_shape(doc))
    shard = (features, labels, counts, order)
    unclipped = _per_user_updates(doc, _spec(clip=1e6), users, order)
    norms = np.sqrt(sum((u.reshape(len(users), -1).astype(np.float64) ** 2).sum(axis=1)
                        for u in unclipped))
    clip = round(float(np.median(norms)), 4)
    fixed_spec = _spec(expected_clients_per_round=6.0, clip=clip)
    adaptive_spec = _adaptive_spec(clip=clip)
    below = int(np.sum(norms <= np.float32(clip)))
    assert 0 < below < len(users)  # the clip splits these users: the test can see a move

    results = []
    for spec in (fixed_spec, adaptive_spec):
        training = noiseless_sharded_training_for_tests(doc, spec, cap=CAP)
        state = training.process.next(training.state, [
            tf.data.Dataset.from_tensors(tuple(a[part] for a in shard))
            for part in np.array_split(np.arange(len(users)), 2)]).state
        results.append((training, state))
    (fixed, fixed_state), (adaptive, adaptive_state) = results
    assert isinstance(adaptive.process, AdaptiveClipProcess)
    for f, a in zip(fixed.process.get_model_weights(fixed_state).trainable,
                    adaptive.process.get_model_weights(adaptive_state).trainable, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(f), rtol=1e-6, atol=1e-7)
    fraction = below / 6.0
    expected = np.float32(np.float64(np.float32(clip)) * np.exp(-0.2 * (fraction - 0.5)))
    assert AdaptiveClipProcess.clip(adaptive_state) == pytest.approx(float(expected), rel=1e-6)


def test_the_shard_counts_each_unclipped_user_exactly_once_centred() -> None:
    """Σ(2·b_u − 1) over a shard: b_u = 1 iff the user's update norm is at most C."""
    import tensorflow as tf

    from engine.vectorized_users import shard_clipped_sum_and_count

    doc, users = _mlp(), _users()
    counts = np.array([len(y) for _, y in users], np.int32)
    order = example_order(np.random.default_rng(5), counts, CAP, 1)
    unclipped = _per_user_updates(doc, _spec(clip=1e6), users, order)
    norms = np.sqrt(sum((u.reshape(len(users), -1).astype(np.float64) ** 2).sum(axis=1)
                        for u in unclipped))
    clip = float(np.median(norms))
    features, labels, padded = pad_users(users, CAP, _feature_shape(doc))
    _, twice_centred = shard_clipped_sum_and_count(
        build_stacked_model(doc["config"]), [tf.constant(w) for w in _weights(doc)],
        tf.constant(features), tf.constant(labels), tf.constant(padded), tf.constant(order),
        clip=tf.constant(clip, tf.float32), local_epochs=1, batch_size=4, learning_rate=0.5,
        momentum=None)
    below = int(np.sum(norms <= np.float32(clip)))
    assert twice_centred.dtype == tf.int64
    assert int(twice_centred) == 2 * below - len(users)


def test_a_non_finite_local_update_contributes_nothing() -> None:
    doc, spec = _linear(), _spec(client_learning_rate=1e30, clip=1.0)
    users = _users()
    counts = np.array([len(y) for _, y in users], np.int32)
    order = example_order(np.random.default_rng(2), counts, CAP, 1)
    updates = _per_user_updates(doc, spec, users, order)
    assert all(np.all(np.isfinite(u)) for u in updates)
    norms = np.sqrt(sum((u.reshape(len(users), -1) ** 2).sum(axis=1) for u in updates))
    assert np.all((norms == 0) | (norms <= 1.0 + 1e-5))


def test_the_loss_is_the_exact_cross_entropy_from_logits_even_for_confident_mistakes() -> None:
    doc = _linear()
    weights = _weights(doc)
    weights[1] = np.array([40.0, 0, 0, 0, -40.0], np.float32)  # class 4: p ≈ e⁻⁸⁰ ≪ 1e-7
    from engine.artifact import encode_array

    doc["weights"] = [encode_array(w) for w in weights]
    spec = _spec(clip=1e9, client_learning_rate=1.0, batch_size=1)
    x = np.random.default_rng(0).normal(size=(1, 20)).astype(np.float32)
    users = [(x, np.array([4], np.int32))]
    order = example_order(np.random.default_rng(0), np.array([1], np.int32), CAP, 1)
    kernel_update, bias_update = (u[0] for u in _per_user_updates(doc, spec, users, order))
    logits = x[0] @ weights[0] + weights[1]
    softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    expected_bias = softmax - np.eye(5)[4]  # update = w₀ − w₁ = lr · gradient
    np.testing.assert_allclose(bias_update, expected_bias, atol=1e-6)
    np.testing.assert_allclose(kernel_update, np.outer(x[0], expected_bias), atol=1e-5)
    assert abs(bias_update[4] + 1.0) < 1e-6  # full gradient, not the clipped-probability 0


def test_a_model_outside_the_vectorized_engine_is_refused_by_the_engine_before_reading_data(
) -> None:
    from engine.job import JobSpecInvalid
    from engine.runner import build_training

    normalized = {"class_name": "Sequential", "config": {"layers": [
        {"class_name": "InputLayer", "config": {}},
        {"class_name": "BatchNormalization", "config": {}}]}}
    assert "BatchNormalization is not supported" in vectorizable(normalized)
    for model in ("cnn", "lstm"):
        assert vectorizable(MODELS[model]()["config"]) is None
    assert vectorizable(_linear()["config"]) is None
    regularized = _linear()
    regularized["config"]["config"]["layers"][1]["config"]["kernel_regularizer"] = {
        "class_name": "L2"}
    assert "regularizers" in vectorizable(regularized["config"])
    with pytest.raises(JobSpecInvalid, match=r"cannot train this model: .*regularizers"):
        build_training(regularized, _spec(max_examples_per_user=CAP))
    with pytest.raises(JobSpecInvalid, match="max_examples_per_user"):
        build_training(_linear(), _spec())  # no cap: an older job file


def test_a_shard_of_cnn_users_counts_their_activations_and_fits_its_memory() -> None:
    import tensorflow as tf

    from engine.artifact import artifact_from_keras
    from engine.keras_config import check_model_config
    from engine.memory import SHARD_MEMORY_BYTES, per_user_bytes, users_per_shard

    layers = tf.keras.layers
    model = tf.keras.Sequential([
        layers.InputLayer(input_shape=(784,)), layers.Reshape((28, 28, 1)),
        layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(), layers.Flatten(),
        layers.Dense(10, activation="softmax")])
    floats = check_model_config(artifact_from_keras(model)["config"]).working_elements
    sizes = {counted: users_per_shard(per_user_bytes(
        cap=100, example_floats=784, parameters=model.count_params(), local_epochs=1,
        batch_size=32, working_elements=floats if counted else 0)) for counted in (True, False)}
    assert sizes[True] * 32 * floats * 4 <= SHARD_MEMORY_BYTES  # one batch's activations fit
    assert sizes[False] * 32 * floats * 4 > 2 * SHARD_MEMORY_BYTES  # uncounted: 3x over


def test_a_shard_written_to_the_job_directory_reads_back_exactly_round_after_round(
    tmp_path: Path
) -> None:
    from engine.shard_process import ShardFile

    shard_file = ShardFile(tmp_path / "shard-0.bin", CAP, 3 * CAP, (20,))
    for seed, users in ((4, _users()), (5, _users()[:2]), (6, []), (7, _users()[1:])):
        features, labels, counts = pad_users(users, CAP, (20,))
        order = example_order(np.random.default_rng(seed), counts, CAP, 3)
        dataset = shard_file.write((features, labels, counts, order))
        assert dataset is shard_file.dataset  # built once, reads every round's shard
        for read, written in zip(dataset.get_single_element(),
                                 (features, labels, counts, order), strict=True):
            assert read.dtype.as_numpy_dtype == written.dtype
            assert np.array_equal(read.numpy(), written)


def test_gathering_a_shard_from_the_partition_caps_each_user_exactly_as_the_per_user_path() -> None:
    """One gather from the memory-mapped partition = the per-user loop of ``cap_examples`` and
    ``pad_users``, draw for draw: under-cap users keep all their examples, over-cap users a
    fresh uniform subset of exactly the cap, padding is zero."""
    from engine.datastore import Partition
    from engine.training import cap_examples
    from engine.vectorized_users import gather_users

    rng = np.random.default_rng(7)
    sizes = np.array([3, 12, 0, 30, 12, 13, 1])
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    partition = Partition(features=rng.normal(size=(offsets[-1], 4)).astype(np.float32),
                          labels=rng.integers(0, 5, offsets[-1]).astype(np.int32),
                          offsets=offsets)
    sampled = np.array([5, 0, 3, 2, 6, 1])
    gathered = gather_users(partition, sampled, CAP, np.random.default_rng(11))
    loop_rng = np.random.default_rng(11)
    expected = pad_users([cap_examples(loop_rng, *partition.user_examples(int(u)), CAP)
                          for u in sampled], CAP, (4,))
    for got, want in zip(gathered, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert list(gathered[2]) == [12, 3, 12, 0, 1, 12]
