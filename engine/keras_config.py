"""Pure validation of a Keras 2 model config (the parsed ``model.to_json()``).

Keras deserialization is code loading: a ``Lambda`` layer carries marshalled Python bytecode,
``TFOpLambda`` calls any TensorFlow function by name, and a nested object whose ``module`` /
``registered_name`` points outside Keras imports arbitrary modules. This module therefore
decides, *without importing TensorFlow*, whether a config is made only of allowlisted,
code-free parts, and infers every layer's output shape and weight shapes from the config alone.
The inferred weight shapes bound what the model can allocate (the uploaded weights must match
them exactly), so a tiny config cannot ask for a huge model.

Only single-input, single-output models made of built-in layers are accepted: ``Sequential``
and ``Functional`` (``Model``), with no shared layers and channels-last data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Shape = tuple[int, ...]
"""A tensor shape without the batch dimension."""

LAYER_ALLOWLIST: frozenset[str] = frozenset(
    {
        "InputLayer",
        "Dense",
        "Flatten",
        "Dropout",
        "Activation",
        "Reshape",
        "Conv1D",
        "Conv2D",
        "MaxPooling1D",
        "MaxPooling2D",
        "MaxPooling3D",
        "AveragePooling1D",
        "AveragePooling2D",
        "AveragePooling3D",
        "GlobalAveragePooling1D",
        "GlobalAveragePooling2D",
        "GlobalAveragePooling3D",
        "Embedding",
        "SimpleRNN",
        "GRU",
        "LSTM",
        "Concatenate",
        "Add",
    }
)
"""Built-in layers whose config holds no code and whose weights are all trainable.

``BatchNormalization`` is deliberately absent: its moving mean and variance are non-trainable
state computed directly from raw feature values. DP-FedAvg clips and noises only the trainable
delta; TFF keeps the server's copy of non-trainable state, so those statistics would either
stay at their initial values (a broken model at inference) or, under any algorithm that did
aggregate them, leave the node without clipping or noise.
"""

ACTIVATION_ALLOWLIST: frozenset[str] = frozenset(
    {
        "linear",
        "relu",
        "elu",
        "selu",
        "gelu",
        "sigmoid",
        "hard_sigmoid",
        "tanh",
        "softmax",
        "softplus",
        "softsign",
        "swish",
        "mish",
        "exponential",
    }
)
"""Built-in activations, referenced by name only (a serialized function object is refused)."""

MODEL_CLASSES: Mapping[str, str] = {
    "Sequential": "keras-sequential",
    "Functional": "keras-functional",
    "Model": "keras-functional",
}

MAX_PARAMETERS = 20_000_000

_OBJECT_ALLOWLISTS: Mapping[str, tuple[str, frozenset[str]]] = {
    "initializer": (
        "keras.initializers",
        frozenset(
            {
                "Zeros", "Ones", "Constant", "RandomNormal", "RandomUniform", "TruncatedNormal",
                "GlorotUniform", "GlorotNormal", "HeUniform", "HeNormal", "LecunUniform",
                "LecunNormal", "Orthogonal", "Identity", "VarianceScaling",
                "zeros", "ones", "constant", "random_normal", "random_uniform",
                "truncated_normal", "glorot_uniform", "glorot_normal", "he_uniform", "he_normal",
                "lecun_uniform", "lecun_normal", "orthogonal", "identity", "variance_scaling",
            }
        ),
    ),
    "regularizer": (
        "keras.regularizers",
        frozenset({"L1", "L2", "L1L2", "l1", "l2", "l1_l2"}),
    ),
    "constraint": (
        "keras.constraints",
        frozenset(
            {
                "MaxNorm", "MinMaxNorm", "NonNeg", "UnitNorm", "RadialConstraint",
                "max_norm", "min_max_norm", "non_neg", "unit_norm", "radial_constraint",
            }
        ),
    ),
}

# Fields through which Keras (or a custom layer) would load code: Lambda/TFOpLambda payloads
# and import paths. None of them belongs in an allowlisted layer's config.
_CODE_FIELDS = frozenset(
    {"function", "function_type", "module", "fn", "output_shape_module", "output_shape_type"}
)
_MAX_STRING = 256
_LAYER_ENVELOPE_KEYS = frozenset({"module", "class_name", "config", "registered_name",
                                  "build_config"})
_FUNCTIONAL_ENVELOPE_KEYS = _LAYER_ENVELOPE_KEYS | {"name", "inbound_nodes"}
_OBJECT_ENVELOPE_KEYS = frozenset({"module", "class_name", "config", "registered_name"})


class ModelRejected(ValueError):
    """The model artifact is refused; ``reason`` says exactly what, for the researcher."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ConfigSummary:
    """What a validated config implies, independent of any weights or dataset."""

    family: str
    layers: tuple[str, ...]
    input_shape: Shape
    output_shape: Shape
    output_activation: str
    weight_shapes: tuple[Shape, ...]
    working_elements: int = 0
    """Floats one example keeps alive through a forward pass (every layer's output and its
    internal working tensors: a convolution's patches, an RNN's per-step gates and states),
    the input included: :mod:`engine.memory` scales it by batch and users."""
    forward_flops: int = 0
    """FLOPs of one example's forward pass (2 per multiply-add of Dense, convolution and
    recurrent kernels, one per output element of every other layer):
    :mod:`engine.compute` scales it by examples, users and rounds."""

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(shape) for shape in self.weight_shapes)


@dataclass(frozen=True)
class _Layer:
    name: str
    class_name: str
    config: Mapping[str, Any]
    build_config: Any


def check_model_config(model: object) -> ConfigSummary:
    """Validate a parsed Keras model JSON; raise :class:`ModelRejected` naming the problem."""
    model = _mapping(model, "model config")
    _only_keys(model, {"class_name", "config", "keras_version", "backend"}, "model config")
    class_name = model.get("class_name")
    if class_name not in MODEL_CLASSES:
        raise ModelRejected(
            f"model class {class_name!r} is not allowed (allowed: {', '.join(MODEL_CLASSES)})"
        )
    if model.get("backend", "tensorflow") != "tensorflow":
        raise ModelRejected(f"backend {model.get('backend')!r} is not supported")
    body = _mapping(model.get("config"), "model config 'config'")
    check = _check_sequential if class_name == "Sequential" else _check_functional
    summary = check(body)
    if summary.parameter_count > MAX_PARAMETERS:
        raise ModelRejected(
            f"model has {summary.parameter_count} parameters (maximum {MAX_PARAMETERS})"
        )
    return summary


# ---------------------------------------------------------------------------------------------
# Model graphs


def _check_sequential(body: Mapping[str, Any]) -> ConfigSummary:
    _only_keys(body, {"name", "layers", "trainable"}, "Sequential config")
    entries = _sequence(body.get("layers"), "Sequential 'layers'")
    layers = [_parse_layer(entry, functional=False, index=i) for i, entry in enumerate(entries)]
    if not layers:
        raise ModelRejected("Sequential model has no layers")
    first = layers[0]
    if first.class_name == "InputLayer":
        input_shape = _input_layer_shape(first)
        body_layers = layers[1:]
    elif first.config.get("batch_input_shape") is not None:
        # Keras makes an implicit InputLayer from the first layer's declared shape (and ignores
        # shapes declared by later layers).
        input_shape = _batch_shape(first.config["batch_input_shape"], first.name)
        body_layers = layers
    else:
        raise ModelRejected("model has no input shape; start it with an InputLayer")
    if not body_layers:
        raise ModelRejected("Sequential model has no layers after its InputLayer")
    shape = input_shape
    weights: list[Shape] = []
    activation = "linear"
    working, flops = math.prod(input_shape), 0
    for layer in body_layers:
        if layer.class_name == "InputLayer":
            raise ModelRejected(f"layer {layer.name!r}: InputLayer must come first")
        inputs = [shape]
        shape, layer_weights = _apply(layer, inputs)
        weights.extend(layer_weights)
        working += _working_elements(layer, inputs, shape)
        flops += _forward_flops(layer, inputs, shape)
        activation = _activation_of(layer, activation)
    return ConfigSummary(
        family=MODEL_CLASSES["Sequential"],
        layers=tuple(layer.class_name for layer in layers),
        input_shape=input_shape,
        output_shape=shape,
        output_activation=activation,
        weight_shapes=tuple(weights),
        working_elements=working,
        forward_flops=flops,
    )


def _check_functional(body: Mapping[str, Any]) -> ConfigSummary:
    _only_keys(body, {"name", "layers", "trainable", "input_layers", "output_layers"},
               "Functional config")
    entries = _sequence(body.get("layers"), "Functional 'layers'")
    layers = [_parse_layer(entry, functional=True, index=i) for i, entry in enumerate(entries)]
    by_name: dict[str, _Layer] = {}
    for layer in layers:
        if layer.name in by_name:
            raise ModelRejected(f"layer name {layer.name!r} is used twice")
        by_name[layer.name] = layer
    inbound = {layer.name: _inbound_names(entry, layer, by_name)
               for entry, layer in zip(entries, layers, strict=True)}
    input_name = _single_endpoint(body.get("input_layers"), "input_layers", by_name)
    output_name = _single_endpoint(body.get("output_layers"), "output_layers", by_name)
    inputs = [layer for layer in layers if layer.class_name == "InputLayer"]
    if [layer.name for layer in inputs] != [input_name]:
        raise ModelRejected("model must have exactly one InputLayer, named in input_layers")

    needed = _ancestors(output_name, inbound)
    unused = [layer.name for layer in layers if layer.name not in needed]
    if unused:
        raise ModelRejected(f"layer {unused[0]!r} is not connected to the model output")

    shapes: dict[str, Shape] = {input_name: _input_layer_shape(by_name[input_name])}
    activations: dict[str, str] = {input_name: "linear"}
    weights_by_layer: dict[str, list[Shape]] = {input_name: []}
    working, flops = math.prod(shapes[input_name]), 0
    pending = [layer for layer in layers if layer.name != input_name]
    while pending:
        ready = [layer for layer in pending if all(n in shapes for n in inbound[layer.name])]
        if not ready:
            raise ModelRejected(f"layer {pending[0].name!r} has a cyclic or missing input")
        for layer in ready:
            sources = inbound[layer.name]
            inputs = [shapes[name] for name in sources]
            shapes[layer.name], weights_by_layer[layer.name] = _apply(layer, inputs)
            working += _working_elements(layer, inputs, shapes[layer.name])
            flops += _forward_flops(layer, inputs, shapes[layer.name])
            activations[layer.name] = _activation_of(layer, activations[sources[0]])
        pending = [layer for layer in pending if layer.name not in shapes]
    # Keras restores a Functional model's layers (and so get_weights()) in config order; the
    # Keras bridge re-checks the built model's weight shapes against this order.
    weights = [shape for layer in layers for shape in weights_by_layer[layer.name]]
    return ConfigSummary(
        family=MODEL_CLASSES["Functional"],
        layers=tuple(layer.class_name for layer in layers),
        input_shape=shapes[input_name],
        output_shape=shapes[output_name],
        output_activation=activations[output_name],
        weight_shapes=tuple(weights),
        working_elements=working,
        forward_flops=flops,
    )


def _inbound_names(entry: Mapping[str, Any], layer: _Layer,
                   by_name: Mapping[str, _Layer]) -> list[str]:
    nodes = _sequence(entry.get("inbound_nodes"), f"layer {layer.name!r} inbound_nodes")
    if layer.class_name == "InputLayer":
        if nodes:
            raise ModelRejected(f"InputLayer {layer.name!r} must have no inbound nodes")
        return []
    if len(nodes) != 1:
        raise ModelRejected(
            f"layer {layer.name!r} is applied {len(nodes)} times (shared or unused layers "
            "are not supported)"
        )
    refs = _sequence(nodes[0], f"layer {layer.name!r} inbound node")
    names = []
    for ref in refs:
        ref = _sequence(ref, f"layer {layer.name!r} inbound tensor")
        if (len(ref) != 4 or not isinstance(ref[0], str) or ref[1] != 0 or ref[2] != 0
                or ref[3] != {}):
            raise ModelRejected(
                f"layer {layer.name!r}: inbound tensor {ref!r} is not supported "
                "(expected [layer_name, 0, 0, {}])"
            )
        if ref[0] not in by_name:
            raise ModelRejected(f"layer {layer.name!r} refers to unknown layer {ref[0]!r}")
        names.append(ref[0])
    if not names:
        raise ModelRejected(f"layer {layer.name!r} has no inputs")
    return names


def _single_endpoint(value: object, field: str, by_name: Mapping[str, _Layer]) -> str:
    refs = _sequence(value, field)
    if len(refs) != 1:
        raise ModelRejected(f"model must have exactly one entry in {field}")
    ref = _sequence(refs[0], field)
    if len(ref) != 3 or not isinstance(ref[0], str) or ref[1] != 0 or ref[2] != 0:
        raise ModelRejected(f"{field} entry {ref!r} is not supported (expected [name, 0, 0])")
    if ref[0] not in by_name:
        raise ModelRejected(f"{field} refers to unknown layer {ref[0]!r}")
    return ref[0]


def _ancestors(name: str, inbound: Mapping[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    stack = [name]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(inbound[current])
    return seen


def _activation_of(layer: _Layer, input_activation: str) -> str:
    """The activation that produced this layer's output, looking through value-preserving
    layers (so ``Dense(softmax) → Dropout`` still outputs probabilities)."""
    if layer.class_name in {"Dropout", "Reshape", "Flatten"}:
        return input_activation
    activation = layer.config.get("activation", "linear")
    return activation if isinstance(activation, str) else "linear"


# ---------------------------------------------------------------------------------------------
# One layer: envelope, config fields, shapes


def _parse_layer(entry: object, *, functional: bool, index: int) -> _Layer:
    entry = _mapping(entry, f"layer #{index}")
    class_name = entry.get("class_name")
    if not isinstance(class_name, str):
        raise ModelRejected(f"layer #{index} has no class_name")
    if class_name not in LAYER_ALLOWLIST:
        raise ModelRejected(
            f"layer class {class_name!r} is not allowed "
            f"(allowed: {', '.join(sorted(LAYER_ALLOWLIST))})"
        )
    _only_keys(entry, _FUNCTIONAL_ENVELOPE_KEYS if functional else _LAYER_ENVELOPE_KEYS,
               f"layer #{index} ({class_name})")
    _builtin_reference(entry, "keras.layers", f"layer #{index} ({class_name})")
    config = _mapping(entry.get("config"), f"layer #{index} ({class_name}) config")
    name = entry.get("name", config.get("name")) if functional else config.get("name")
    if not isinstance(name, str) or not name or len(name) > _MAX_STRING:
        raise ModelRejected(f"layer #{index} ({class_name}) has no valid name")
    layer = _Layer(name, class_name, config, entry.get("build_config"))
    for key, value in config.items():
        _check_field(layer, key, value)
    return layer


def _builtin_reference(entry: Mapping[str, Any], module: str, what: str) -> None:
    if entry.get("module", module) != module:
        raise ModelRejected(f"{what} refers to module {entry.get('module')!r} "
                            f"(only built-in {module} objects are allowed)")
    if entry.get("registered_name") is not None:
        raise ModelRejected(f"{what} is a registered custom object "
                            f"{entry.get('registered_name')!r} (custom objects are not allowed)")


def _check_field(layer: _Layer, key: object, value: object) -> None:
    where = f"layer {layer.name!r} ({layer.class_name})"
    if not isinstance(key, str):
        raise ModelRejected(f"{where} has a non-string config key")
    if key in _CODE_FIELDS:
        raise ModelRejected(f"{where} field {key!r} looks like serialized code")
    if key == "dtype":
        if value != "float32":
            raise ModelRejected(f"{where} dtype {value!r} is not allowed (allowed: float32)")
    elif key in {"activation", "recurrent_activation"}:
        if not isinstance(value, str) or value not in ACTIVATION_ALLOWLIST:
            raise ModelRejected(
                f"{where} {key} {value!r} is not allowed "
                f"(allowed: {', '.join(sorted(ACTIVATION_ALLOWLIST))})"
            )
    elif (kind := key.rsplit("_", 1)[-1]) in _OBJECT_ALLOWLISTS:
        _check_object(value, kind, f"{where} {key}")
    else:
        _check_plain(value, f"{where} field {key!r}")


def _check_object(value: object, kind: str, where: str) -> None:
    """An initializer, regularizer or constraint: None, a built-in name, or its serialization."""
    module, allowed = _OBJECT_ALLOWLISTS[kind]
    if value is None:
        return
    if isinstance(value, str):
        class_name = value
    else:
        obj = _mapping(value, where)
        _only_keys(obj, _OBJECT_ENVELOPE_KEYS, where)
        _builtin_reference(obj, module, where)
        class_name = obj.get("class_name")
        config = _mapping(obj.get("config", {}), f"{where} config")
        for key, item in config.items():
            if not isinstance(key, str) or key in _CODE_FIELDS:
                raise ModelRejected(f"{where} field {key!r} is not allowed")
            _check_plain(item, f"{where} field {key!r}")
    if class_name not in allowed:
        raise ModelRejected(f"{where} {kind} {class_name!r} is not allowed "
                            f"(allowed: {', '.join(sorted(c for c in allowed if c[0].isupper()))})")


def _check_plain(value: object, where: str) -> None:
    """Plain data only: no nested objects, no long opaque strings (e.g. encoded bytecode)."""
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ModelRejected(f"{where} is not finite")
        return
    if isinstance(value, str):
        if len(value) > _MAX_STRING:
            raise ModelRejected(f"{where} is a long opaque string (looks like encoded code)")
        return
    if isinstance(value, list):
        for item in value:
            _check_plain(item, where)
        return
    raise ModelRejected(f"{where} holds a nested object, which is not allowed here")


def _apply(layer: _Layer, inputs: list[Shape]) -> tuple[Shape, list[Shape]]:
    """Output shape and weight shapes (in Keras creation order) of ``layer`` on ``inputs``."""
    rule = _RULES.get(layer.class_name)
    if rule is None:  # InputLayer anywhere but the start
        raise ModelRejected(f"layer {layer.name!r}: {layer.class_name} is misplaced")
    _check_build_config(layer, inputs)
    return rule(_Params(layer), inputs)


def _working_elements(layer: _Layer, inputs: list[Shape], output: Shape) -> int:
    """Floats per example that ``layer`` keeps for its backward pass: its output, plus a
    convolution's extracted patches (output positions × kernel window × input channels, the
    vectorized engine's im2col) or an RNN's gates and states at every step."""
    elements = math.prod(output)
    kind = layer.class_name
    if kind.startswith("Conv"):
        elements += math.prod(output[:-1]) * _taps(layer) * inputs[0][-1]
    elif kind in _GATES:  # per step: input and recurrent projections, gates, states
        steps = inputs[0][0]
        units = int(layer.config.get("units", 1))
        elements += steps * (2 * _GATES[kind] + 2) * units
    return elements


def _taps(layer: _Layer) -> int:
    """Kernel positions of a (validated) convolution: the product of its kernel_size."""
    kernel = layer.config.get("kernel_size")
    return math.prod(kernel) if isinstance(kernel, list) else int(kernel or 1)


def _forward_flops(layer: _Layer, inputs: list[Shape], output: Shape) -> int:
    """FLOPs of ``layer`` on one example (see ``ConfigSummary.forward_flops``)."""
    kind, elements = layer.class_name, math.prod(output)
    if kind == "Dense":
        return 2 * elements * inputs[0][-1]
    if kind.startswith("Conv"):
        taps = _taps(layer)
        groups = int(layer.config.get("groups", 1) or 1)
        return 2 * elements * taps * (inputs[0][-1] // groups)
    if kind in _GATES:
        steps, features = inputs[0]
        units = int(layer.config.get("units", 1))
        return 2 * steps * _GATES[kind] * units * (features + units)
    if "Pooling" in kind and not kind.startswith("Global"):
        pool = layer.config.get("pool_size", 2)
        return elements * (math.prod(pool) if isinstance(pool, list) else int(pool))
    return elements + sum(math.prod(shape) for shape in inputs)


def _check_build_config(layer: _Layer, inputs: list[Shape]) -> None:
    """Keras builds weights from ``build_config``; it must agree with the inferred shapes."""
    if layer.build_config is None:
        return
    build = _mapping(layer.build_config, f"layer {layer.name!r} build_config")
    _only_keys(build, {"input_shape"}, f"layer {layer.name!r} build_config")
    expected: list[Any] = [[None, *shape] for shape in inputs]
    declared = build.get("input_shape")
    if declared != (expected[0] if len(inputs) == 1 else expected):
        raise ModelRejected(
            f"layer {layer.name!r} build_config input_shape {declared!r} does not match the "
            f"inferred {expected[0] if len(inputs) == 1 else expected!r}"
        )


class _Params:
    """Typed access to one layer's config, raising ModelRejected with the layer named."""

    def __init__(self, layer: _Layer) -> None:
        self.layer = layer
        self.where = f"layer {layer.name!r} ({layer.class_name})"

    def reject(self, problem: str) -> ModelRejected:
        return ModelRejected(f"{self.where}: {problem}")

    def integer(self, key: str, *, default: int | None = None, minimum: int = 1) -> int:
        value = self.layer.config.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.reject(f"{key} must be an integer ≥ {minimum}, got {value!r}")
        return value

    def integers(self, key: str, count: int, *, default: object = None) -> tuple[int, ...]:
        value = self.layer.config.get(key, default)
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value] * count
        if (not isinstance(value, list) or len(value) != count
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                           for v in value)):
            raise self.reject(f"{key} must be {count} positive integer(s), got {value!r}")
        return tuple(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.layer.config.get(key, default)
        if not isinstance(value, bool):
            raise self.reject(f"{key} must be true or false")
        return value

    def choice(self, key: str, allowed: Sequence[object], default: object) -> Any:
        value = self.layer.config.get(key, default)
        if value not in allowed:
            raise self.reject(f"{key} {value!r} is not supported (allowed: {list(allowed)})")
        return value

    def rate(self, key: str) -> None:
        value = self.layer.config.get(key, 0.0)
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1:
            raise self.reject(f"{key} must be in [0, 1)")

    def single(self, inputs: list[Shape], rank: int | None = None) -> Shape:
        if len(inputs) != 1:
            raise self.reject(f"takes one input, got {len(inputs)}")
        shape = inputs[0]
        if rank is not None and len(shape) != rank:
            raise self.reject(f"expects inputs of rank {rank} (without batch), got {shape}")
        if not shape:
            raise self.reject("expects a non-scalar input")
        return shape


def _dense(p: _Params, inputs: list[Shape]) -> tuple[Shape, list[Shape]]:
    shape = p.single(inputs)
    units = p.integer("units")
    weights = [(shape[-1], units)] + ([(units,)] if p.flag("use_bias", True) else [])
    return (*shape[:-1], units), weights


def _passthrough(p: _Params, inputs: list[Shape]) -> tuple[Shape, list[Shape]]:
    if p.layer.class_name == "Dropout":
        p.rate("rate")
    return p.single(inputs), []


def _flatten(p: _Params, inputs: list[Shape]) -> tuple[Shape, list[Shape]]:
    p.choice("data_format", ["channels_last", None], "channels_last")
    return (math.prod(p.single(inputs)),), []


def _reshape(p: _Params, inputs: list[Shape]) -> tuple[Shape, list[Shape]]:
    size = math.prod(p.single(inputs))
    target = p.layer.config.get("target_shape")
    if (not isinstance(target, list) or not target
            or not all(isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or v == -1)
                       for v in target) or target.count(-1) > 1):
        raise p.reject(f"target_shape {target!r} is not a valid shape")
    known = math.prod(v for v in target if v != -1)
    if -1 in target:
        if size % known:
            raise p.reject(f"cannot reshape {size} values to {target}")
        target = [size // known if v == -1 else v for v in target]
    elif known != size:
        raise p.reject(f"cannot reshape {size} values to {target}")
    return tuple(target), []


def _window_output(p: _Params, length: int, window: int, stride: int, padding: str,
                   dilation: int = 1) -> int:
    if padding in {"same", "causal"}:
        return -(-length // stride)
    out = (length - dilation * (window - 1) - 1) // stride + 1
    if out < 1:
        raise p.reject(f"window {window} does not fit an input of length {length}")
    return out


def _conv(n: int) -> Callable[[_Params, list[Shape]], tuple[Shape, list[Shape]]]:
    def rule(p: _Params, inputs: list[Shape]) -> tuple[Shape, list[Shape]]:
        shape = p.single(inputs, rank=n + 1)
        p.choice("data_format", ["channels_last", None], "channels_last")
        filters = p.integer("filters")
        kernel = p.integers("kernel_size", n)
        strides = p.integers("strides", n, default=1)
        dilation = p.integers("dilation_rate", n, default=1)
        groups = p.integer("groups", default=1)
        padding = p.choice("padding", ["valid", "same", "causal"] if n == 1 else
                           ["valid", "same"], "valid")
        channels = shape[-1]
        if channels % groups or filters % groups:
            raise p.reject(f"groups={groups} must divide input channels {channels} and "
                           f"filters {filters}")
        spatial = tuple(
            _window_output(p, length, k, s, padding, d)
            for length, k, s, d in zip(shape[:-1], kernel, strides, dilation, strict=True)
        )
        weights = [(*kernel, channels // groups, filters)]
        if p.flag("use_bias", True):
            weights.append((filters,))
        return (*spatial, filters), weights

    return rule


def _pool(n: int) -> Callable[[_Params, list[Shape]], tuple[Shape, list[Shape]]]:
    def rule(p: _Params, inputs: list[Shape]) -> tuple[Shape, list[Shape]]:
        shape = p.single(inputs, rank=n + 1)
        p.choice("data_format", ["channels_last", None], "channels_last")
        pool = p.integers("pool_size", n, default=2)
        strides = pool if p.layer.config.get("strides") is None else p.integers("strides", n)
        padding = p.choice("padding", ["valid", "same"], "valid")
        spatial = tuple(
            _window_output(p, length, k, s, padding)
            for length, k, s in zip(shape[:-1], pool, strides, strict=True)
        )
        return (*spatial, shape[-1]), []

    return rule


def _global_pool(n: int) -> Callable[[_Params, list[Shape]], tuple[Shape, list[Shape]]]:
    def rule(p: _Params, inputs: list[Shape]) -> tuple[Shape, list[Shape]]:
        shape = p.single(inputs, rank=n + 1)
        p.choice("data_format", ["channels_last", None], "channels_last")
        if p.flag("keepdims", False):
            return (*([1] * n), shape[-1]), []
        return (shape[-1],), []

    return rule


def _embedding(p: _Params, inputs: list[Shape]) -> tuple[Shape, list[Shape]]:
    shape = p.single(inputs, rank=1)
    input_dim, output_dim = p.integer("input_dim"), p.integer("output_dim")
    length = p.layer.config.get("input_length")
    if length is not None and length != shape[0]:
        raise p.reject(f"input_length {length!r} does not match the input length {shape[0]}")
    return (shape[0], output_dim), [(input_dim, output_dim)]


_GATES = {"SimpleRNN": 1, "GRU": 3, "LSTM": 4}


def _rnn(p: _Params, inputs: list[Shape]) -> tuple[Shape, list[Shape]]:
    steps, features = p.single(inputs, rank=2)
    units = p.integer("units")
    for key in ("return_state", "stateful", "time_major"):
        if p.flag(key, False):
            raise p.reject(f"{key}=true is not supported")
    p.rate("dropout")
    p.rate("recurrent_dropout")
    gates = _GATES[p.layer.class_name]
    weights = [(features, gates * units), (units, gates * units)]
    if p.flag("use_bias", True):
        if p.layer.class_name == "GRU" and p.flag("reset_after", True):
            weights.append((2, gates * units))
        else:
            weights.append((gates * units,))
    output = (steps, units) if p.flag("return_sequences", False) else (units,)
    return output, weights


def _concatenate(p: _Params, inputs: list[Shape]) -> tuple[Shape, list[Shape]]:
    if len(inputs) < 2 or len({len(shape) for shape in inputs}) != 1:
        raise p.reject(f"needs at least two inputs of equal rank, got {inputs}")
    rank = len(inputs[0])
    axis = p.layer.config.get("axis", -1)
    if not isinstance(axis, int) or isinstance(axis, bool) or not (-rank <= axis <= rank) \
            or axis == 0:
        raise p.reject(f"axis {axis!r} is not a feature axis")
    index = axis + rank if axis < 0 else axis - 1  # config axes count the batch dimension
    rest = {shape[:index] + shape[index + 1:] for shape in inputs}
    if len(rest) != 1:
        raise p.reject(f"input shapes {inputs} differ outside axis {axis}")
    joined = sum(shape[index] for shape in inputs)
    return (*inputs[0][:index], joined, *inputs[0][index + 1:]), []


def _add(p: _Params, inputs: list[Shape]) -> tuple[Shape, list[Shape]]:
    if len(inputs) < 2 or len(set(inputs)) != 1:
        raise p.reject(f"needs at least two inputs of the same shape, got {inputs}")
    return inputs[0], []


_RULES: Mapping[str, Callable[[_Params, list[Shape]], tuple[Shape, list[Shape]]]] = {
    "Dense": _dense,
    "Dropout": _passthrough,
    "Activation": _passthrough,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Conv1D": _conv(1),
    "Conv2D": _conv(2),
    "MaxPooling1D": _pool(1),
    "MaxPooling2D": _pool(2),
    "MaxPooling3D": _pool(3),
    "AveragePooling1D": _pool(1),
    "AveragePooling2D": _pool(2),
    "AveragePooling3D": _pool(3),
    "GlobalAveragePooling1D": _global_pool(1),
    "GlobalAveragePooling2D": _global_pool(2),
    "GlobalAveragePooling3D": _global_pool(3),
    "Embedding": _embedding,
    "SimpleRNN": _rnn,
    "GRU": _rnn,
    "LSTM": _rnn,
    "Concatenate": _concatenate,
    "Add": _add,
}


# ---------------------------------------------------------------------------------------------
# Input layers and generic JSON helpers


def _input_layer_shape(layer: _Layer) -> Shape:
    config = layer.config
    if config.get("sparse", False) or config.get("ragged", False):
        raise ModelRejected(f"InputLayer {layer.name!r} must be dense (sparse/ragged refused)")
    return _batch_shape(config.get("batch_input_shape"), layer.name)


def _batch_shape(value: object, name: str) -> Shape:
    if (not isinstance(value, list) or len(value) < 2 or value[0] is not None
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                       for v in value[1:])):
        raise ModelRejected(
            f"layer {name!r} batch_input_shape {value!r} must be [null, n1, ...] with known "
            "positive sizes"
        )
    return tuple(value[1:])


def _mapping(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ModelRejected(f"{what} must be a JSON object")
    return value


def _sequence(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ModelRejected(f"{what} must be a JSON array")
    return value


def _only_keys(value: Mapping[str, Any], allowed: set[str] | frozenset[str], what: str) -> None:
    unknown = sorted(str(key) for key in value if key not in allowed)
    if unknown:
        raise ModelRejected(f"{what} has unexpected field {unknown[0]!r}")
