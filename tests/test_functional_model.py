"""The stacked forward pass as a specification: for every vectorized layer kind, U users with
different weights get, row by row, exactly what Keras computes for each of them alone; no row
depends on another user's inputs, no example on another example; everything else is refused
with a reason.

Pure TensorFlow (no TFF). Models are exported with ``artifact_from_keras`` and rebuilt from
their config, as a job does, so the weight order is the one the engine sees.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from engine.functional_model import build_stacked_model, vectorizable
from engine.keras_config import check_model_config

USERS, BATCH = 3, 4


def _layers() -> Any:
    import tensorflow as tf

    return tf.keras.layers


def _sequential(input_shape: tuple[int, ...], *layers: Any) -> Any:
    import tensorflow as tf

    return tf.keras.Sequential([_layers().InputLayer(input_shape=input_shape), *layers])


def _user_weights(model: Any, seed: int) -> list[list[np.ndarray]]:
    """Each user's weights: the model's, perturbed differently per user."""
    rng = np.random.default_rng(seed)
    return [[(w + rng.normal(0, 0.3, w.shape)).astype(np.float32) for w in model.get_weights()]
            for _ in range(USERS)]


def _stacked_logits(config: dict[str, Any], weights: list[list[np.ndarray]],
                    x: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    params = [tf.constant(np.stack(per_weight)) for per_weight in zip(*weights, strict=True)]
    model = build_stacked_model(config)
    assert model.weight_count == len(params)
    return model.forward(params, tf.constant(x), False).numpy()


def _keras_outputs(config: dict[str, Any], weights: list[list[np.ndarray]],
                   x: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    model = tf.keras.models.model_from_json(json.dumps(config))
    outputs = []
    for user_weights, user_x in zip(weights, x, strict=True):
        model.set_weights(user_weights)
        outputs.append(model(user_x, training=False).numpy())
    return np.stack(outputs)


def _assert_each_user_gets_keras_output(model: Any, x: np.ndarray, seed: int = 0) -> None:
    """forward(stacked weights, x)[u] == Keras(user u's weights)(x[u]), and row u depends on
    x[u] only, example b on x[u, b] only (bit for bit)."""
    from engine.artifact import artifact_from_keras

    config = artifact_from_keras(model)["config"]
    assert vectorizable(config) is None
    weights = _user_weights(model, seed)
    stacked = _stacked_logits(config, weights, x)
    np.testing.assert_allclose(stacked, _keras_outputs(config, weights, x), rtol=1e-5, atol=1e-5)

    changed = x.copy()
    changed[1, 2] = x.max() + 1.0 - x[1, 2]  # ids stay valid ids
    after = _stacked_logits(config, weights, changed)
    assert np.array_equal(after[[0, 2]], stacked[[0, 2]])
    assert np.array_equal(after[1, [0, 1, 3]], stacked[1, [0, 1, 3]])
    assert not np.array_equal(after[1, 2], stacked[1, 2])


def _features(*shape: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(USERS, BATCH, *shape)).astype(np.float32)


def _token_ids(length: int, vocabulary: int, seed: int = 1) -> np.ndarray:
    """Token ids as the datastore gives them: integer values in float32 features."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocabulary - 1, (USERS, BATCH, length)).astype(np.float32)


def test_dense_layers_with_and_without_bias_match_keras_per_user() -> None:
    layers = _layers()
    model = _sequential((6,), layers.Dense(5, activation="relu"), layers.Dropout(0.3),
                        layers.Dense(4, use_bias=False, activation="tanh"), layers.Dense(3))
    _assert_each_user_gets_keras_output(model, _features(6))


def test_dense_on_sequences_acts_on_the_last_axis_per_user() -> None:
    layers = _layers()
    model = _sequential((12,), layers.Reshape((3, 4)), layers.Dense(5, activation="gelu"),
                        layers.Flatten(), layers.Dense(2))
    _assert_each_user_gets_keras_output(model, _features(12))


CONV2D = {
    "valid_stride_1": dict(kernel_size=3),
    "same_stride_2_odd_input": dict(kernel_size=3, strides=2, padding="same"),
    "same_even_kernel_strides_2_1": dict(kernel_size=(2, 4), strides=(2, 1), padding="same"),
    "same_dilation_2": dict(kernel_size=3, dilation_rate=2, padding="same"),
    "valid_dilation_2_1_no_bias": dict(kernel_size=(2, 3), dilation_rate=(2, 1), use_bias=False),
    "groups_2_relu": dict(kernel_size=3, groups=2, padding="same", activation="relu"),
    # 6 filters > 4 taps: patches and a batched matmul (the others above with F ≤ taps and
    # equal strides run as one depthwise convolution)
    "valid_more_filters_than_taps": dict(kernel_size=2),
}


@pytest.mark.parametrize("options", CONV2D.values(), ids=CONV2D.keys())
def test_conv2d_matches_keras_per_user(options: dict[str, Any]) -> None:
    layers = _layers()
    model = _sequential((7, 6, 4), layers.Conv2D(6, **options), layers.Flatten(), layers.Dense(3))
    _assert_each_user_gets_keras_output(model, _features(7, 6, 4))


CONV1D = {
    "valid": dict(kernel_size=3),
    "same_dilation_2": dict(kernel_size=3, dilation_rate=2, padding="same"),
    "valid_stride_2": dict(kernel_size=3, strides=2),
    "same_even_kernel_stride_3": dict(kernel_size=4, strides=3, padding="same"),
    "causal_dilation_3": dict(kernel_size=2, dilation_rate=3, padding="causal"),
    "causal_stride_2_no_bias": dict(kernel_size=3, strides=2, padding="causal", use_bias=False),
    "causal_dilation_2_stride_1": dict(kernel_size=3, dilation_rate=2, padding="causal"),
    "groups_3_elu": dict(kernel_size=2, groups=3, activation="elu"),
}


@pytest.mark.parametrize("options", CONV1D.values(), ids=CONV1D.keys())
def test_conv1d_matches_keras_per_user(options: dict[str, Any]) -> None:
    layers = _layers()
    model = _sequential((11, 3), layers.Conv1D(6, **options), layers.Flatten(), layers.Dense(3))
    _assert_each_user_gets_keras_output(model, _features(11, 3))


POOLS = {
    "max1d": ("MaxPooling1D", (9, 2), dict(pool_size=3, strides=2, padding="same")),
    "avg1d": ("AveragePooling1D", (9, 2), dict(pool_size=2)),
    "max2d": ("MaxPooling2D", (5, 6, 2), dict(pool_size=2)),
    "avg2d_same": ("AveragePooling2D", (5, 6, 2), dict(pool_size=(2, 3), strides=1,
                                                       padding="same")),
    "max3d_same": ("MaxPooling3D", (3, 4, 5, 2), dict(pool_size=2, padding="same")),
    "avg3d": ("AveragePooling3D", (3, 4, 5, 2), dict(pool_size=(1, 2, 2), strides=(1, 1, 2))),
    "global_avg1d": ("GlobalAveragePooling1D", (9, 2), {}),
    "global_avg2d_keepdims": ("GlobalAveragePooling2D", (5, 6, 2), dict(keepdims=True)),
    "global_avg3d": ("GlobalAveragePooling3D", (3, 4, 5, 2), {}),
}


@pytest.mark.parametrize("kind, shape, options", POOLS.values(), ids=POOLS.keys())
def test_pooling_matches_keras_per_user(kind: str, shape: tuple[int, ...],
                                        options: dict[str, Any]) -> None:
    layers = _layers()
    model = _sequential(shape, layers.Dense(3, activation="relu"),
                        getattr(layers, kind)(**options), layers.Flatten(), layers.Dense(2))
    _assert_each_user_gets_keras_output(model, _features(*shape))


def test_embedding_looks_up_each_users_own_table_from_float_ids() -> None:
    layers = _layers()
    model = _sequential((5,), layers.Embedding(7, 3), layers.Flatten(), layers.Dense(2))
    _assert_each_user_gets_keras_output(model, _token_ids(5, 7))


RECURRENT = {
    "simple_rnn_last": ("SimpleRNN", dict()),
    "simple_rnn_sequences_backwards_relu": ("SimpleRNN", dict(return_sequences=True,
                                                              go_backwards=True,
                                                              activation="relu")),
    "gru_last": ("GRU", dict()),
    "gru_sequences_backwards": ("GRU", dict(return_sequences=True, go_backwards=True)),
    "gru_reset_before": ("GRU", dict(reset_after=False)),
    "gru_reset_before_no_bias_hard_sigmoid": ("GRU", dict(reset_after=False, use_bias=False,
                                                          recurrent_activation="hard_sigmoid")),
    "gru_no_bias_sequences": ("GRU", dict(use_bias=False, return_sequences=True)),
    "lstm_last": ("LSTM", dict()),
    "lstm_sequences": ("LSTM", dict(return_sequences=True)),
    "lstm_backwards_no_bias": ("LSTM", dict(go_backwards=True, use_bias=False)),
    "lstm_relu_hard_sigmoid_implementation_1": ("LSTM", dict(activation="relu",
                                                             recurrent_activation="hard_sigmoid",
                                                             implementation=1)),
}


@pytest.mark.parametrize("kind, options", RECURRENT.values(), ids=RECURRENT.keys())
def test_recurrent_layers_match_keras_per_user(kind: str, options: dict[str, Any]) -> None:
    layers = _layers()
    model = _sequential((6, 3), getattr(layers, kind)(4, **options), layers.Flatten(),
                        layers.Dense(2))
    _assert_each_user_gets_keras_output(model, _features(6, 3))


def test_embedding_into_stacked_lstm_and_gru_matches_keras_per_user() -> None:
    layers = _layers()
    model = _sequential((7,), layers.Embedding(9, 4), layers.LSTM(5, return_sequences=True),
                        layers.GRU(3), layers.Dense(2))
    _assert_each_user_gets_keras_output(model, _token_ids(7, 9))


def test_small_cnn_with_reshape_conv_pool_dense_matches_keras_per_user() -> None:
    layers = _layers()
    model = _sequential((36,), layers.Reshape((6, 6, 1)),
                        layers.Conv2D(4, 3, padding="same", activation="relu"),
                        layers.MaxPooling2D(), layers.Conv2D(3, 2, activation="swish"),
                        layers.GlobalAveragePooling2D(), layers.Dense(5))
    _assert_each_user_gets_keras_output(model, _features(36))


def _functional(build: Callable[[Any], Any], input_shape: tuple[int, ...]) -> Any:
    import tensorflow as tf

    inputs = tf.keras.Input(shape=input_shape)
    return tf.keras.Model(inputs, build(inputs))


def test_users_as_channels_layout_flows_through_activation_dropout_pooling_and_add() -> None:
    """A depthwise convolution's output stays in its users-as-channels layout through an
    Activation, Dropout, 'same' average pooling and the next convolution (3 input channels),
    and returns to [U, B, ...] for Add and Flatten: each user still gets Keras's output."""
    layers = _layers()

    def build(inputs: Any) -> Any:
        a = layers.AveragePooling2D(padding="same")(layers.Dropout(0.5)(
            layers.Activation("tanh")(layers.Conv2D(3, 3, padding="same")(inputs))))
        b = layers.Conv2D(3, 2, padding="same", activation="relu")(a)
        c = layers.MaxPooling2D(padding="same")(layers.Conv2D(3, 3, padding="same")(inputs))
        return layers.Dense(3)(layers.Flatten()(layers.Add()([b, c])))

    _assert_each_user_gets_keras_output(_functional(build, (6, 7, 2)), _features(6, 7, 2))


def test_functional_residual_add_matches_keras_per_user() -> None:
    layers = _layers()

    def build(inputs: Any) -> Any:
        hidden = layers.Dense(6, activation="relu")(inputs)
        residual = layers.Dense(6)(hidden)
        return layers.Dense(3)(layers.Add()([hidden, residual, layers.Dense(6)(inputs)]))

    _assert_each_user_gets_keras_output(_functional(build, (5,)), _features(5))


def test_functional_branches_concatenated_keep_the_keras_weight_order() -> None:
    layers = _layers()

    def build(inputs: Any) -> Any:
        sequence = layers.Reshape((4, 3))(inputs)
        convolved = layers.Conv1D(2, 2, padding="same")(sequence)  # [4, 2]
        recurrent = layers.LSTM(3, return_sequences=True)(sequence)  # [4, 3]
        joined = layers.Concatenate(axis=2)([recurrent, convolved, sequence])  # [4, 8]
        wide = layers.Concatenate()([layers.Flatten()(joined), layers.Dense(2)(inputs)])
        return layers.Dense(3)(wide)

    _assert_each_user_gets_keras_output(_functional(build, (12,)), _features(12))


def test_a_final_softmax_is_left_out_so_the_loss_takes_logits() -> None:
    layers = _layers()
    from engine.artifact import artifact_from_keras

    model = _sequential((6,), layers.Dense(5, activation="relu"),
                        layers.Dense(3, activation="softmax"), layers.Dropout(0.2))
    config = artifact_from_keras(model)["config"]
    weights = _user_weights(model, 4)
    logits = _stacked_logits(config, weights, _features(6))
    linear = json.loads(json.dumps(config))
    linear["config"]["layers"][2]["config"]["activation"] = "linear"
    np.testing.assert_allclose(logits, _keras_outputs(linear, weights, _features(6)),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits.sum(axis=-1), 1.0)


def test_a_softmax_before_the_last_layer_is_applied() -> None:
    layers = _layers()
    model = _sequential((6,), layers.Dense(4, activation="softmax"), layers.Dense(3))
    _assert_each_user_gets_keras_output(model, _features(6))


def _layer(kind: str, **fields: Any) -> dict[str, Any]:
    return {"class_name": kind, "config": {"name": kind.lower(), **fields}}


def _model(*layers: dict[str, Any]) -> dict[str, Any]:
    return {"class_name": "Sequential", "config": {"layers": [
        {"class_name": "InputLayer", "config": {"batch_input_shape": [None, 6]}}, *layers]}}


REFUSED = {
    "batch_normalization": (_model(_layer("BatchNormalization")), "BatchNormalization"),
    "embedding_mask_zero": (_model(_layer("Embedding", input_dim=5, output_dim=2,
                                          mask_zero=True)), "mask_zero"),
    "embedding_sparse": (_model(_layer("Embedding", input_dim=5, output_dim=2, sparse=True)),
                         "sparse"),
    "stateful_lstm": (_model(_layer("LSTM", units=2, stateful=True)), "stateful"),
    "lstm_return_state": (_model(_layer("LSTM", units=2, return_state=True)), "return_state"),
    "time_major_gru": (_model(_layer("GRU", units=2, time_major=True)), "time_major"),
    "lstm_dropout": (_model(_layer("LSTM", units=2, dropout=0.2)), "dropout"),
    "gru_recurrent_dropout": (_model(_layer("GRU", units=2, recurrent_dropout=0.1)),
                              "recurrent_dropout"),
    "dropout_noise_shape": (_model(_layer("Dropout", rate=0.5, noise_shape=[None, 1])),
                            "noise_shape"),
    "channels_first_conv": (_model(_layer("Conv1D", filters=2, kernel_size=1,
                                          data_format="channels_first")), "channels_first"),
    "regularized_dense": (_model(_layer("Dense", units=2, kernel_regularizer={
        "class_name": "L2", "config": {"l2": 0.1}})), "regularizers"),
    "constrained_embedding": (_model(_layer("Embedding", input_dim=5, output_dim=2,
                                            embeddings_constraint="non_neg")), "constraints"),
    "frozen_layer": (_model(_layer("Dense", units=2, trainable=False)), "trainable=false"),
    "unread_field": (_model(_layer("Dense", units=2, lora_rank=4)), "'lora_rank'"),
    "softmax_then_flatten": (_model(_layer("Dense", units=2, activation="softmax"),
                                    _layer("Flatten")), "followed by Flatten"),
    "final_softmax_in_an_rnn": (_model(_layer("Reshape", target_shape=[3, 2]),
                                       _layer("SimpleRNN", units=2, activation="softmax")),
                                "final softmax on SimpleRNN"),
    "two_inputs": ({"class_name": "Functional", "config": {"layers": [
        {"class_name": "InputLayer", "name": "a", "config": {}, "inbound_nodes": []},
        {"class_name": "InputLayer", "name": "b", "config": {}, "inbound_nodes": []},
        {"class_name": "Add", "name": "add", "config": {},
         "inbound_nodes": [[["a", 0, 0, {}], ["b", 0, 0, {}]]]}],
        "output_layers": [["add", 0, 0]]}}, "several inputs"),
}


@pytest.mark.parametrize("config, reason", REFUSED.values(), ids=REFUSED.keys())
def test_configs_outside_the_vectorized_engine_are_refused_with_the_reason(
    config: dict[str, Any], reason: str
) -> None:
    refusal = vectorizable(config)
    assert refusal is not None and reason in refusal and "not supported" in refusal
    with pytest.raises(ValueError, match="not supported"):
        build_stacked_model(config)


def _working_elements(model: Any) -> int:
    from engine.artifact import artifact_from_keras

    return check_model_config(artifact_from_keras(model)["config"]).working_elements


def test_working_memory_counts_inputs_outputs_patches_and_recurrent_state_per_example() -> None:
    layers = _layers()

    cnn = _sequential((36,), layers.Reshape((6, 6, 1)), layers.Conv2D(4, 3), layers.Flatten(),
                      layers.Dense(5))
    reshape, conv, patches, flatten, dense = 36, 4 * 4 * 4, 4 * 4 * 9 * 1, 64, 5
    assert _working_elements(cnn) == 36 + reshape + conv + patches + flatten + dense
    lstm = _sequential((7,), layers.Embedding(9, 4), layers.LSTM(5), layers.Dense(2))
    embedding, recurrent = 7 * 4, 5 + 7 * (2 * 4 + 2) * 5
    assert _working_elements(lstm) == 7 + embedding + recurrent + 2
