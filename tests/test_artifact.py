"""Model artifacts (keras-json-v1): allowlists, weight encoding, tamper checks."""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from engine.artifact import (
    LAYER_ALLOWLIST,
    ModelRejected,
    artifact_digest,
    decode_array,
    encode_array,
    keras_from_artifact,
    linear_classifier_artifact,
    parse_artifact,
    validate_artifact,
    validate_artifact_structure,
)

FEATURES, CLASSES = 60, 10

# A Lambda layer exactly as Keras 2.14 serializes `Lambda(lambda x: x * 2)`: marshalled bytecode.
LAMBDA_LAYER = {
    "module": "keras.layers",
    "class_name": "Lambda",
    "config": {
        "name": "lambda", "trainable": True, "dtype": "float32",
        "function": ["4wEAAAAAAAAAAAAAAAIAAAADAAAA8wwAAACXAHwAZAF6BQAAUwApAk7pAgAAAKkAKQHaAXhzAQAA\n"
                     "ACD6CS90bXAvay5wefoIPGxhbWJkYT5yBgAAAA0AAABzDQAAAIAA0FFS0FNU0VFUgADzAAAAAA==\n",
                     None, None],
        "function_type": "lambda", "module": "__main__", "output_shape": None,
        "output_shape_type": "raw", "output_shape_module": None, "arguments": {},
    },
    "registered_name": None,
    "build_config": {"input_shape": [None, FEATURES]},
}


def linear() -> dict[str, Any]:
    return linear_classifier_artifact(FEATURES, CLASSES)


def layers_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["config"]["config"]["layers"]


def dense_config(doc: dict[str, Any]) -> dict[str, Any]:
    return layers_of(doc)[1]["config"]


def rejection(doc: dict[str, Any]) -> str:
    with pytest.raises(ModelRejected) as info:
        validate_artifact(doc, num_features=FEATURES, num_classes=CLASSES)
    return info.value.reason


def functional(layers: list[dict[str, Any]], output: str) -> dict[str, Any]:
    return {
        "class_name": "Functional",
        "config": {"name": "model", "trainable": True, "layers": layers,
                   "input_layers": [["x", 0, 0]], "output_layers": [[output, 0, 0]]},
        "keras_version": "2.14.0",
        "backend": "tensorflow",
    }


def node(class_name: str, name: str, inputs: list[str], **config: Any) -> dict[str, Any]:
    return {"module": "keras.layers", "class_name": class_name,
            "config": {"name": name, "trainable": True, "dtype": "float32", **config},
            "registered_name": None, "name": name,
            "inbound_nodes": [[[source, 0, 0, {}] for source in inputs]] if inputs else []}


def input_node(size: int) -> dict[str, Any]:
    layer = node("InputLayer", "x", [], batch_input_shape=[None, size], sparse=False,
                 ragged=False)
    del layer["config"]["trainable"]
    return layer


def weights(*shapes: tuple[int, ...]) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    return [encode_array(rng.normal(size=shape).astype(np.float32)) for shape in shapes]


# --- valid artifacts ---------------------------------------------------------------------------


def test_linear_classifier_is_valid_and_summarised() -> None:
    summary = validate_artifact(linear(), num_features=FEATURES, num_classes=CLASSES)
    assert summary.family == "keras-sequential"
    assert summary.layers == ("InputLayer", "Dense")
    assert summary.parameter_count == FEATURES * CLASSES + CLASSES
    assert summary.input_shape == (FEATURES,)
    assert summary.output_units == CLASSES
    assert summary.outputs_probabilities


def test_functional_model_with_residual_add_is_valid() -> None:
    config = functional(
        [input_node(FEATURES),
         node("Dense", "hidden", ["x"], units=16, activation="relu"),
         node("Dense", "skip", ["hidden"], units=16),
         node("Add", "sum", ["hidden", "skip"]),
         node("Dense", "logits", ["sum"], units=CLASSES)],
        output="logits",
    )
    doc = {"format": "keras-json-v1", "config": config,
           "weights": weights((FEATURES, 16), (16,), (16, 16), (16,), (16, CLASSES), (CLASSES,))}
    summary = validate_artifact(doc, num_features=FEATURES, num_classes=CLASSES)
    assert summary.family == "keras-functional"
    assert summary.parameter_count == 60 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10
    assert not summary.outputs_probabilities


def test_summary_does_not_depend_on_weights() -> None:
    other = linear()
    other["weights"] = weights((FEATURES, CLASSES), (CLASSES,))
    assert validate_artifact_structure(other) == validate_artifact_structure(linear())


# --- code and custom objects are refused, naming what -----------------------------------------


def test_lambda_layer_is_rejected_by_name() -> None:
    doc = linear()
    layers_of(doc).insert(1, LAMBDA_LAYER)
    reason = rejection(doc)
    assert "'Lambda'" in reason and "not allowed" in reason


@pytest.mark.parametrize("class_name", ["TFOpLambda", "SlicingOpLambda", "MyAttention",
                                        "Sequential", "BatchNormalization"])
def test_layer_classes_outside_the_allowlist_are_rejected_by_name(class_name: str) -> None:
    doc = linear()
    layers_of(doc)[1]["class_name"] = class_name
    assert f"layer class {class_name!r} is not allowed" in rejection(doc)
    assert class_name not in LAYER_ALLOWLIST


def test_registered_custom_layer_is_rejected() -> None:
    doc = linear()
    layers_of(doc)[1]["registered_name"] = "Custom>Dense"
    assert "'Custom>Dense'" in rejection(doc)


def test_layer_from_a_foreign_module_is_rejected() -> None:
    doc = linear()
    layers_of(doc)[1]["module"] = "my_package.layers"
    assert "'my_package.layers'" in rejection(doc)


def test_custom_initializer_object_is_rejected() -> None:
    doc = linear()
    dense_config(doc)["kernel_initializer"] = {
        "module": "evil", "class_name": "Payload", "config": {}, "registered_name": "Payload"}
    reason = rejection(doc)
    assert "kernel_initializer" in reason and "'evil'" in reason


def test_unknown_initializer_name_is_rejected() -> None:
    doc = linear()
    dense_config(doc)["kernel_initializer"] = "os.system"
    assert "initializer 'os.system' is not allowed" in rejection(doc)


def test_function_field_in_an_allowed_layer_is_rejected() -> None:
    doc = linear()
    dense_config(doc)["function"] = LAMBDA_LAYER["config"]["function"]
    assert "field 'function' looks like serialized code" in rejection(doc)


def test_long_opaque_string_is_rejected() -> None:
    doc = linear()
    dense_config(doc)["name"] = "x" * 10
    dense_config(doc)["comment"] = base64.b64encode(bytes(600)).decode()
    assert "long opaque string" in rejection(doc)


def test_serialized_activation_function_is_rejected() -> None:
    doc = linear()
    dense_config(doc)["activation"] = {"module": "__main__", "class_name": "function",
                                       "config": "my_act", "registered_name": "function"}
    assert "activation" in rejection(doc)


def test_unknown_activation_name_is_rejected() -> None:
    doc = linear()
    dense_config(doc)["activation"] = "leaky_magic"
    assert "activation 'leaky_magic' is not allowed" in rejection(doc)


def test_mixed_precision_dtype_policy_is_rejected() -> None:
    doc = linear()
    dense_config(doc)["dtype"] = {"module": "keras.mixed_precision", "class_name": "Policy",
                                  "config": {"name": "mixed_float16"}, "registered_name": None}
    assert "dtype" in rejection(doc)


def test_unknown_model_class_is_rejected() -> None:
    doc = linear()
    doc["config"]["class_name"] = "MyModel"
    assert "model class 'MyModel' is not allowed" in rejection(doc)


def test_shared_layer_is_rejected() -> None:
    config = functional(
        [input_node(FEATURES), node("Dense", "out", ["x"], units=CLASSES)], output="out")
    config["config"]["layers"][1]["inbound_nodes"].append([["x", 0, 0, {}]])
    doc = {"format": "keras-json-v1", "config": config,
           "weights": weights((FEATURES, CLASSES), (CLASSES,))}
    assert "applied 2 times" in rejection(doc)


def test_layer_not_connected_to_the_output_is_rejected() -> None:
    config = functional(
        [input_node(FEATURES), node("Dense", "out", ["x"], units=CLASSES),
         node("Dense", "dangling", ["x"], units=3)], output="out")
    doc = {"format": "keras-json-v1", "config": config,
           "weights": weights((FEATURES, CLASSES), (CLASSES,), (FEATURES, 3), (3,))}
    assert "'dangling' is not connected" in rejection(doc)


# --- weights must be exactly what the config implies ------------------------------------------


def test_weight_shape_tampering_is_refused() -> None:
    doc = linear()
    kernel = np.zeros((CLASSES, FEATURES), np.float32)  # same size, transposed shape
    doc["weights"][0] = encode_array(kernel)
    assert "weight #0 has shape [10, 60], the config implies [60, 10]" in rejection(doc)


def test_weight_dtype_tampering_is_refused() -> None:
    doc = linear()
    doc["weights"][1] = encode_array(np.zeros(CLASSES, np.float64))
    assert "weight #1 has dtype float64" in rejection(doc)


def test_declared_shape_not_matching_the_data_is_refused() -> None:
    doc = linear()
    doc["weights"][1]["shape"] = [CLASSES + 1]
    assert "weight #1 does not decode" in rejection(doc)


def test_missing_or_extra_weights_are_refused() -> None:
    doc = linear()
    doc["weights"].pop()
    assert "1 weight arrays, the config implies 2" in rejection(doc)
    doc = linear()
    doc["weights"].append(encode_array(np.zeros(3, np.float32)))
    assert "3 weight arrays, the config implies 2" in rejection(doc)


def test_non_finite_weights_are_refused() -> None:
    doc = linear()
    doc["weights"][1] = encode_array(np.full(CLASSES, np.nan, np.float32))
    assert "weight #1 contains non-finite values" in rejection(doc)


def test_build_config_cannot_enlarge_the_model() -> None:
    doc = linear()
    layers_of(doc)[1]["build_config"] = {"input_shape": [None, 10**9]}
    assert "build_config input_shape" in rejection(doc)


def test_huge_layer_is_refused_before_any_weight_is_decoded() -> None:
    doc = linear()
    dense_config(doc)["units"] = 10**9
    assert "parameters (maximum" in rejection(doc)


def test_input_and_output_must_fit_the_dataset() -> None:
    with pytest.raises(ModelRejected, match=r"expected \[59\]"):
        validate_artifact(linear(), num_features=59, num_classes=CLASSES)
    with pytest.raises(ModelRejected, match="dataset has 3 classes"):
        validate_artifact(linear(), num_features=FEATURES, num_classes=3)


def test_format_tag_and_fields_are_checked() -> None:
    doc = linear()
    doc["format"] = "keras-h5"
    assert "format 'keras-h5'" in rejection(doc)
    doc = linear()
    doc["pickle"] = "..."
    assert "exactly the fields" in rejection(doc)


# --- array encoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64"])
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4), (2, 0, 5), (2, 3, 4)])
def test_array_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    array = (np.arange(int(np.prod(shape))) - 3).astype(dtype).reshape(shape)
    encoded = json.loads(json.dumps(encode_array(array)))
    decoded = decode_array(encoded)
    assert decoded.dtype == np.dtype(dtype) and decoded.shape == shape
    assert np.array_equal(decoded, array)
    assert decoded.flags.writeable


def test_encoding_is_little_endian_raw_bytes() -> None:
    encoded = encode_array(np.array([1.0], dtype=">f4"))
    assert base64.b64decode(encoded["data"]) == np.array([1.0], "<f4").tobytes()


@pytest.mark.parametrize("dtype", ["object", "float16", "complex64", "bool", "<U4"])
def test_unlisted_dtypes_are_refused(dtype: str) -> None:
    with pytest.raises(ValueError, match="not allowed"):
        decode_array({"shape": [1], "dtype": dtype, "data": "AAAA"})
    if dtype != "object":
        with pytest.raises(ValueError, match="not allowed"):
            encode_array(np.zeros(1, dtype=dtype))


@pytest.mark.parametrize("tamper", [
    {"shape": [3]},                      # fewer elements than the data holds
    {"shape": [10**12]},                 # huge declared shape: refused before decoding
    {"shape": [-1]},
    {"shape": [True]},
    {"data": "!!!!" * 4},                # not base64
    {"extra": 1},
])
def test_malformed_encoded_arrays_are_refused(tamper: dict[str, Any]) -> None:
    encoded = {**encode_array(np.zeros(4, np.float32)), **tamper}
    with pytest.raises(ValueError):
        decode_array(encoded)


# --- parsing and digests ----------------------------------------------------------------------


def test_digest_is_over_the_exact_uploaded_bytes() -> None:
    raw = json.dumps(linear()).encode()
    digest = artifact_digest(raw)
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    assert artifact_digest(raw + b" ") != digest
    assert artifact_digest(raw) == digest


def test_parse_refuses_duplicate_keys_and_non_json_constants() -> None:
    with pytest.raises(ModelRejected, match="duplicate key"):
        parse_artifact(b'{"format": "keras-json-v1", "format": "x"}')
    with pytest.raises(ModelRejected, match="NaN"):
        parse_artifact(b'{"format": NaN}')
    with pytest.raises(ModelRejected, match="JSON object"):
        parse_artifact(b"[]")
    with pytest.raises(ModelRejected, match="nested too deeply"):
        parse_artifact(b"[" * 100_000 + b"]" * 100_000)
    assert parse_artifact(json.dumps(linear()).encode()) == linear()


def test_validation_does_not_import_tensorflow() -> None:
    code = ("import sys, json; from engine import artifact, datastore, launcher, job; "
            "artifact.validate_artifact(artifact.linear_classifier_artifact(4, 2), "
            "num_features=4, num_classes=2); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- against real Keras -----------------------------------------------------------------------


def _keras_models() -> list[Any]:
    from tensorflow import keras

    layers = keras.layers
    models = [
        keras.Sequential([keras.Input((60,)), layers.Dense(16, activation="relu",
                                                           kernel_regularizer="l2"),
                          layers.Dropout(0.2), layers.Dense(10, activation="softmax")]),
        keras.Sequential([keras.Input((60,)), layers.Reshape((12, 5)),
                          layers.Conv1D(4, 3, padding="causal"), layers.MaxPooling1D(2),
                          layers.GRU(3, return_sequences=True), layers.SimpleRNN(2),
                          layers.Dense(10)]),
    ]
    x = keras.Input((60,))
    a, b = layers.Dense(4)(x), layers.Dense(3)(x)
    r = layers.Reshape((7, 1))(layers.Concatenate()([a, b]))
    out = layers.Dense(10, activation="softmax")(
        layers.Activation("relu")(layers.Flatten()(layers.AveragePooling1D(2, padding="same")(r))))
    models.append(keras.Model(x, out))
    grid = layers.Conv2D(2, (3, 3), strides=2, padding="same")(layers.Reshape((6, 10, 1))(x))
    out = layers.Dense(10)(layers.GlobalAveragePooling2D()(layers.MaxPooling2D()(grid)))
    models.append(keras.Model(x, out))
    seq = layers.LSTM(5)(layers.Embedding(100, 4)(x))
    out = layers.Dropout(0.1)(layers.Dense(10, activation="softmax")(
        layers.Add()([seq, layers.Dense(5)(seq)])))
    models.append(keras.Model(x, out))
    return models


@pytest.mark.tff
def test_inferred_weight_shapes_match_keras_and_weights_round_trip() -> None:
    for model in _keras_models():
        from engine.artifact import artifact_from_keras

        doc = json.loads(json.dumps(artifact_from_keras(model)))
        summary = validate_artifact(doc, num_features=60, num_classes=10)
        assert summary.parameter_count == model.count_params()
        rebuilt = keras_from_artifact(doc)
        for original, restored in zip(model.get_weights(), rebuilt.get_weights(), strict=True):
            assert np.array_equal(original, restored)


@pytest.mark.tff
def test_keras_never_sees_a_rejected_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow as tf

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("Keras deserialized a config that should have been refused")

    monkeypatch.setattr(tf.keras.models, "model_from_json", fail)
    doc = linear()
    layers_of(doc).insert(1, copy.deepcopy(LAMBDA_LAYER))
    with pytest.raises(ModelRejected, match="Lambda"):
        keras_from_artifact(doc)


@pytest.mark.tff
def test_linear_classifier_loads_in_keras() -> None:
    model = keras_from_artifact(linear())
    probabilities = model(np.zeros((2, FEATURES), np.float32)).numpy()
    assert np.allclose(probabilities, 1 / CLASSES)


def test_admission_parses_an_uploaded_model_once_and_again_only_when_its_file_changes(
        tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Admission reads an uploaded model's checks from a cache keyed by the file's (mtime,
    size, inode): the same model admitted again is not parsed again, and a file replaced on
    disk is checked afresh (a rejected replacement is rejected)."""
    import os
    from types import SimpleNamespace

    from engine.artifact import linear_classifier_artifact
    from gateway.node import admission
    from ledger.canonical import canonical_json, sha256_digest

    parsed: list[int] = []
    real_parse = admission.parse_artifact
    monkeypatch.setattr(admission, "parse_artifact",
                        lambda raw: parsed.append(len(raw)) or real_parse(raw))
    node = SimpleNamespace(deployment=SimpleNamespace(models_dir=tmp_path))
    raw = canonical_json(linear_classifier_artifact(num_features=3, num_classes=2))
    digest = sha256_digest(raw)
    path = tmp_path / (digest.removeprefix("sha256:") + ".json")
    path.write_bytes(raw)
    first = admission._uploaded_artifact(node, digest)  # type: ignore[arg-type]
    again = admission._uploaded_artifact(node, digest)  # type: ignore[arg-type]
    assert first is again and first is not None and first.summary is not None
    assert parsed == [len(raw)]
    replacement = tmp_path / "replacement"
    replacement.write_bytes(b'{"format": "not-a-model"}')
    os.replace(replacement, path)
    changed = admission._uploaded_artifact(node, digest)  # type: ignore[arg-type]
    assert changed is not None and changed.summary is None and changed.rejected
    assert len(parsed) == 2
    assert admission._uploaded_artifact(node, "sha256:" + "0" * 64) is None  # type: ignore[arg-type]
    assert admission._uploaded_artifact(node, "../" + digest) is None  # type: ignore[arg-type]
