"""Model artifact format ``keras-json-v1``: a Keras model config plus its weights, as one JSON.

::

    {"format": "keras-json-v1",
     "config": <parsed keras model.to_json()>,
     "weights": [{"shape": [...], "dtype": "float32", "data": "<base64, little-endian>"}, ...]}

No pickle anywhere: weights are raw little-endian bytes of an allowlisted dtype. The config is
checked by :mod:`engine.keras_config` (layer/activation/initializer allowlists, no code-bearing
fields, inferred weight shapes) *before* any Keras deserialization, because deserializing a
Keras config can execute code (``Lambda``).

This module imports TensorFlow only inside :func:`artifact_from_keras` and
:func:`keras_from_artifact`; the gateway imports it to validate uploads without TensorFlow.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.keras_config import (
    ACTIVATION_ALLOWLIST,
    LAYER_ALLOWLIST,
    ConfigSummary,
    ModelRejected,
    check_model_config,
)

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "ACTIVATION_ALLOWLIST",
    "FORMAT",
    "LAYER_ALLOWLIST",
    "ModelRejected",
    "ModelSummary",
    "artifact_digest",
    "artifact_from_keras",
    "decode_array",
    "encode_array",
    "keras_from_artifact",
    "linear_classifier_artifact",
    "parse_artifact",
    "validate_artifact",
    "validate_artifact_structure",
]

FORMAT = "keras-json-v1"

_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
_WEIGHT_DTYPE = "float32"


@dataclass(frozen=True)
class ModelSummary:
    """What a validated artifact is, for policy checks and the job manifest.

    It describes the architecture only (no weights, no digest), so two uploads of the same
    architecture have equal summaries.
    """

    family: str
    layers: tuple[str, ...]
    parameter_count: int
    input_shape: tuple[int, ...]
    output_units: int
    output_activation: str
    working_elements: int = 0
    """Floats one example keeps alive through a forward pass (``ConfigSummary``)."""
    forward_flops: int = 0
    """FLOPs of one example's forward pass (``ConfigSummary``)."""

    @property
    def outputs_probabilities(self) -> bool:
        """True if the output is a softmax (so the loss must not apply one again)."""
        return self.output_activation == "softmax"


def artifact_digest(raw_bytes: bytes) -> str:
    """Content address of an upload: ``sha256:<hex>`` over the exact uploaded bytes."""
    return "sha256:" + hashlib.sha256(raw_bytes).hexdigest()


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """Encode an array of an allowlisted dtype as ``{"shape", "dtype", "data"}``."""
    array = np.asarray(a)
    name = array.dtype.name
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not allowed (allowed: {', '.join(_DTYPES)})")
    raw = np.ascontiguousarray(array, dtype=_DTYPES[name]).tobytes(order="C")
    return {
        "shape": [int(n) for n in array.shape],
        "dtype": name,
        "data": base64.b64encode(raw).decode("ascii"),
    }


def decode_array(d: dict[str, Any]) -> np.ndarray:
    """Decode :func:`encode_array` output; refuse unknown dtypes and shape/size mismatches."""
    if not isinstance(d, dict) or set(d) != {"shape", "dtype", "data"}:
        raise ValueError("an encoded array must have exactly the fields shape, dtype, data")
    dtype_name, shape, data = d["dtype"], d["shape"], d["data"]
    if dtype_name not in _DTYPES:
        raise ValueError(f"dtype {dtype_name!r} is not allowed (allowed: {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ValueError(f"shape {shape!r} must be a list of non-negative integers")
    if not isinstance(data, str):
        raise ValueError("data must be a base64 string")
    dtype = _DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    # Compare sizes before decoding, so a huge declared shape costs nothing.
    if len(data) != 4 * math.ceil(expected / 3):
        raise ValueError(f"data length does not match shape {shape} and dtype {dtype_name}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError("data is not valid base64") from error
    if len(raw) != expected:
        raise ValueError(f"data holds {len(raw)} bytes, shape {shape} of {dtype_name} needs "
                         f"{expected}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def parse_artifact(raw_bytes: bytes) -> dict[str, Any]:
    """Parse uploaded bytes as a JSON object, refusing duplicate keys and NaN/Infinity."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ModelRejected("artifact JSON has a duplicate key")
        return dict(pairs)

    def no_constants(name: str) -> None:
        raise ModelRejected(f"artifact JSON contains {name}, which is not valid JSON")

    try:
        doc = json.loads(raw_bytes, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelRejected(f"artifact is not valid UTF-8 JSON ({error.__class__.__name__})") \
            from error
    except RecursionError as error:
        raise ModelRejected("artifact JSON is nested too deeply") from error
    if not isinstance(doc, dict):
        raise ModelRejected("artifact must be a JSON object")
    return doc


def validate_artifact_structure(doc: dict[str, Any]) -> ModelSummary:
    """Dataset-independent checks, e.g. at upload; raise ``ModelRejected`` naming the problem.

    Checks, without TensorFlow: the format tag; every layer, activation, initializer,
    regularizer and constraint is allowlisted and no field carries code or custom-object
    references; the weights decode, are float32 and finite, and their number and shapes are
    exactly those the config implies; the output is a vector of class scores.
    """
    config, _ = _check_document(doc)
    if len(config.output_shape) != 1:
        raise ModelRejected(f"model output shape {list(config.output_shape)} is not a vector of "
                            "class scores")
    return ModelSummary(
        family=config.family,
        layers=config.layers,
        parameter_count=config.parameter_count,
        input_shape=config.input_shape,
        output_units=config.output_shape[0],
        output_activation=config.output_activation,
        working_elements=config.working_elements,
        forward_flops=config.forward_flops,
    )


def validate_artifact(doc: dict[str, Any], *, num_features: int,
                      num_classes: int) -> ModelSummary:
    """:func:`validate_artifact_structure`, and the model fits the dataset: its input is
    ``(num_features,)`` and its output has ``num_classes`` units."""
    return check_fits_dataset(validate_artifact_structure(doc), num_features=num_features,
                              num_classes=num_classes)


def check_fits_dataset(summary: ModelSummary, *, num_features: int,
                       num_classes: int) -> ModelSummary:
    """``summary`` of a structurally valid artifact, if its input is ``(num_features,)`` and
    its output has ``num_classes`` units; raise ``ModelRejected`` otherwise."""
    if summary.input_shape != (num_features,):
        raise ModelRejected(
            f"model input shape {list(summary.input_shape)} does not match the dataset's "
            f"{num_features} features (expected [{num_features}])"
        )
    if summary.output_units != num_classes:
        raise ModelRejected(
            f"model output has {summary.output_units} units but the dataset has {num_classes} "
            "classes"
        )
    return summary


def _check_document(doc: object) -> tuple[ConfigSummary, list[np.ndarray]]:
    if not isinstance(doc, dict) or set(doc) != {"format", "config", "weights"}:
        raise ModelRejected("artifact must have exactly the fields format, config, weights")
    if doc["format"] != FORMAT:
        raise ModelRejected(f"artifact format {doc['format']!r} is not supported "
                            f"(expected {FORMAT!r})")
    config = check_model_config(doc["config"])
    encoded = doc["weights"]
    if not isinstance(encoded, list):
        raise ModelRejected("artifact weights must be a JSON array")
    if len(encoded) != len(config.weight_shapes):
        raise ModelRejected(f"artifact has {len(encoded)} weight arrays, the config implies "
                            f"{len(config.weight_shapes)}")
    weights = []
    for index, (item, shape) in enumerate(zip(encoded, config.weight_shapes, strict=True)):
        try:
            array = decode_array(item)
        except ValueError as error:
            raise ModelRejected(f"weight #{index} does not decode: {error}") from error
        if array.dtype.name != _WEIGHT_DTYPE:
            raise ModelRejected(f"weight #{index} has dtype {array.dtype.name} "
                                f"(expected {_WEIGHT_DTYPE})")
        if array.shape != shape:
            raise ModelRejected(f"weight #{index} has shape {list(array.shape)}, the config "
                                f"implies {list(shape)}")
        if not np.isfinite(array).all():
            raise ModelRejected(f"weight #{index} contains non-finite values")
        weights.append(array)
    return config, weights


def artifact_from_keras(model: tf.keras.Model) -> dict[str, Any]:
    """Export a Keras model as an artifact, refusing it early if the node would refuse it."""
    doc = {
        "format": FORMAT,
        "config": json.loads(model.to_json()),
        "weights": [encode_array(w) for w in model.get_weights()],
    }
    _check_document(doc)
    return doc


def keras_from_artifact(doc: dict[str, Any], *, load_weights: bool = True) -> tf.keras.Model:
    """Build the Keras model of an artifact (imports TensorFlow).

    The config passes the pure allowlist checks *before* Keras sees it; afterwards the built
    model's weight shapes must equal the inferred ones, in order, so weights cannot land in a
    layer other than the one the checks assumed.
    """
    config, weights = _check_document(doc)
    import tensorflow as tf

    model = tf.keras.models.model_from_json(json.dumps(doc["config"]))
    built = tuple(tuple(int(n) for n in w.shape) for w in model.weights)
    if built != config.weight_shapes:
        raise ModelRejected("the model's weights are not in the order its config implies")
    if load_weights:
        model.set_weights(weights)
    return model


def linear_classifier_artifact(num_features: int, num_classes: int) -> dict[str, Any]:
    """A zero-initialised softmax regression (``Input → Dense(softmax)``), built without TF.

    A baseline for mock-data rehearsals, examples and tests; Keras loads it like any export.
    """
    dense = {
        "module": "keras.layers",
        "class_name": "Dense",
        "config": {
            "name": "dense", "trainable": True, "dtype": "float32", "units": num_classes,
            "activation": "softmax", "use_bias": True,
            "kernel_initializer": {"module": "keras.initializers", "class_name": "GlorotUniform",
                                   "config": {"seed": None}, "registered_name": None},
            "bias_initializer": {"module": "keras.initializers", "class_name": "Zeros",
                                 "config": {}, "registered_name": None},
            "kernel_regularizer": None, "bias_regularizer": None, "activity_regularizer": None,
            "kernel_constraint": None, "bias_constraint": None,
        },
        "registered_name": None,
        "build_config": {"input_shape": [None, num_features]},
    }
    inputs = {
        "module": "keras.layers",
        "class_name": "InputLayer",
        "config": {"batch_input_shape": [None, num_features], "dtype": "float32",
                   "sparse": False, "ragged": False, "name": "features"},
        "registered_name": None,
    }
    config = {
        "class_name": "Sequential",
        "config": {"name": "linear_classifier", "layers": [inputs, dense]},
        "keras_version": "2.14.0",
        "backend": "tensorflow",
    }
    weights = [np.zeros((num_features, num_classes), np.float32),
               np.zeros((num_classes,), np.float32)]
    return {"format": FORMAT, "config": config, "weights": [encode_array(w) for w in weights]}
