"""A validated Keras config as a pure function of *per-user* weights, for vectorized training.

``forward(params, x, training)`` evaluates the model for U users at once, each with its own
weights: ``params[i]`` has shape ``[U, *weight_shape_i]`` (Keras ``trainable_weights`` order)
and ``x`` has shape ``[U, B, *input_shape]``; the result is ``[U, B, num_classes]`` logits.

Invariant (the user is the privacy unit): nothing mixes users. Every operation is one of

* elementwise (activations, Dropout, Add, the RNN gates);
* a batched matmul or gather whose batch axis is the user axis, each user with their own
  weights: Dense, Conv1D/Conv2D (on patches), Embedding (``tf.gather(..., batch_dims=1)``),
  a Conv2D with no more filters than kernel taps as one depthwise convolution whose channels
  are the users' (a depthwise convolution never mixes channels),
  the input and recurrent kernels of SimpleRNN/GRU/LSTM;
* a weight-free operation on one example at a time, on a merged ``[U·B, ...]`` axis or along
  the per-example axes: Flatten, Reshape, Concatenate, convolution patch extraction,
  Max/AveragePooling 1D/2D/3D, GlobalAveragePooling1D/2D/3D, softmax (over an example's last
  axis).

So user u's outputs depend only on user u's weights and inputs (``tests/test_vectorized_
engine.py`` checks it bit for bit) and every example's only on that example.

Supported, exactly as Keras 2.14 computes them on CPU (``tests/test_functional_model.py``
compares each with Keras, user by user): ``Sequential`` and single-input ``Functional``
models (evaluated in topological order of their ``inbound_nodes``) of

* ``InputLayer``, ``Dense``, ``Activation``, ``Flatten``, ``Reshape``, ``Dropout`` (without
  ``noise_shape``), ``Add``, ``Concatenate``;
* ``Conv1D`` (``valid``/``same``/``causal``) and ``Conv2D`` (``valid``/``same``), any strides
  or dilation (Keras takes one of them above 1) and groups, channels-last;
* ``MaxPooling``/``AveragePooling`` 1D/2D/3D (``valid``/``same``) and ``GlobalAveragePooling``
  1D/2D/3D (``keepdims`` either way), channels-last;
* ``Embedding`` without ``mask_zero`` or ``sparse`` (float ids are truncated to int32, as
  Keras does; an id outside ``[0, input_dim)`` is an error on both paths);
* ``SimpleRNN``, ``GRU`` (``reset_after`` either way) and ``LSTM``, with any allowlisted
  activations, ``return_sequences`` and ``go_backwards`` either way, zero initial state.

Refused by :func:`vectorizable`, with the reason, at admission (``model-rejected``) and again by
the engine before it reads data (the per-user TFF path, ``engine.training``, remains only as the
reference implementation in tests, benchmarks and the privacy audit): regularizers and constraints,
frozen layers (``trainable: false``), ``Embedding(mask_zero=True)`` and ``sparse=True``,
stateful / ``return_state`` / ``time_major`` RNNs and RNN (recurrent) dropout, ``Dropout`` with
a ``noise_shape``, ``channels_first`` data, a final softmax that is not the last Dense or
Activation before the output (only Dropout may follow it), and any config field this module
does not read. Initializers are ignored: the weights come from the artifact.

Loss: the final activation, if it is a softmax, is *not* applied: the loss is computed from
logits (exact cross-entropy), whereas TFF's Keras wrapper computes it on probabilities clipped
to [1e-7, 1 − 1e-7], which gives zero gradient to confident mistakes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["StackedModel", "build_stacked_model", "vectorizable"]

_Step = Callable[[Sequence[Any], list[Any], bool], Any]
"""One layer: (stacked params, its input tensors, training) → its output tensor."""

_RNN_FIELDS = frozenset({"units", "activation", "use_bias", "return_sequences", "return_state",
                         "go_backwards", "stateful", "unroll", "time_major", "dropout",
                         "recurrent_dropout"})
_POOL_FIELDS = frozenset({"pool_size", "strides", "padding", "data_format"})
_CONV_FIELDS = frozenset({"filters", "kernel_size", "strides", "padding", "data_format",
                          "dilation_rate", "groups", "activation", "use_bias"})
_FIELDS: Mapping[str, frozenset[str]] = {
    "Dense": frozenset({"units", "activation", "use_bias"}),
    "Activation": frozenset({"activation"}),
    "Flatten": frozenset({"data_format"}),
    "Reshape": frozenset({"target_shape"}),
    "Dropout": frozenset({"rate", "noise_shape", "seed"}),
    "Conv1D": _CONV_FIELDS,
    "Conv2D": _CONV_FIELDS,
    **{f"{kind}Pooling{n}D": _POOL_FIELDS for kind in ("Max", "Average") for n in (1, 2, 3)},
    **{f"GlobalAveragePooling{n}D": frozenset({"data_format", "keepdims"}) for n in (1, 2, 3)},
    "Embedding": frozenset({"input_dim", "output_dim", "mask_zero", "input_length", "sparse"}),
    "SimpleRNN": _RNN_FIELDS,
    "GRU": _RNN_FIELDS | {"recurrent_activation", "implementation", "reset_after"},
    # unit_forget_bias only initializes the bias; implementation 1 and 2 are the same math.
    "LSTM": _RNN_FIELDS | {"recurrent_activation", "implementation", "unit_forget_bias"},
    "Concatenate": frozenset({"axis"}),
    "Add": frozenset(),
}
"""The config fields each vectorized layer kind reads (besides the common ones below)."""
_COMMON_FIELDS = frozenset({"name", "trainable", "dtype", "batch_input_shape"})
_MUST_BE_OFF: Mapping[str, object] = {
    "mask_zero": False, "sparse": False, "return_state": False, "stateful": False,
    "time_major": False, "noise_shape": None, "dropout": 0.0, "recurrent_dropout": 0.0,
}
"""Fields read only to refuse them when set: masks, sparse outputs, RNN state across batches
or time-major data, RNN dropout and shared dropout masks are not vectorized."""
_GATES = {"SimpleRNN": 1, "GRU": 3, "LSTM": 4}


class _Refused(Exception):
    """The config is valid but not vectorized; the message says why."""


@dataclass(frozen=True)
class _Node:
    """One layer of the model graph, as the vectorized engine reads it."""

    name: str
    kind: str
    fields: Mapping[str, Any]
    inputs: tuple[str, ...]
    weight_index: int
    """Index of its first weight in Keras ``trainable_weights`` order."""


@dataclass(frozen=True)
class _Plan:
    """A vectorizable model graph: nodes in evaluation (topological) order."""

    input_name: str
    output_name: str
    nodes: tuple[_Node, ...]
    weight_count: int
    dropped_softmax: str | None
    """The layer whose final softmax ``forward`` leaves out, if any."""


def vectorizable(config: dict[str, Any]) -> str | None:
    """None if :func:`build_stacked_model` supports the (already validated) model config,
    else the reason it does not."""
    try:
        _plan(config)
    except _Refused as refusal:
        return str(refusal)
    return None


@dataclass(frozen=True)
class StackedModel:
    """The model as a function of stacked per-user weights.

    ``forward(params, x, training)`` returns logits ``[U, B, C]``; ``from_logits`` is always
    True for the loss (a final softmax is left out of ``forward``).
    """

    forward: Callable[[Sequence[Any], Any, bool], Any]
    weight_count: int


def build_stacked_model(config: dict[str, Any]) -> StackedModel:
    """Compile a supported config (see :func:`vectorizable`) into a StackedModel."""
    try:
        plan = _plan(config)
    except _Refused as refusal:
        raise ValueError(str(refusal)) from refusal
    steps = [(node, _BUILDERS[node.kind](node, node.name == plan.dropped_softmax))
             for node in plan.nodes]

    def forward(params: Sequence[Any], x: Any, training: bool) -> Any:
        values: dict[str, Any] = {plan.input_name: x}
        for node, step in steps:
            inputs = [values[name] for name in node.inputs]
            if not _keeps_channels(node):
                inputs = [_users_first(value) for value in inputs]
            values[node.name] = step(params, inputs, training)
        return _users_first(values[plan.output_name])

    return StackedModel(forward=forward, weight_count=plan.weight_count)


# ---------------------------------------------------------------------------------------------
# The plan: which layers, in which order, with which weights (pure, no TensorFlow)


def _plan(config: Mapping[str, Any]) -> _Plan:
    model_class = config.get("class_name")
    body = config.get("config", {})
    if body.get("trainable", True) is not True:
        raise _Refused("a frozen model (trainable=false) is not supported: every weight trains")
    if model_class == "Sequential":
        input_name, output_name, layers = _sequential_graph(body)
    elif model_class in ("Functional", "Model"):
        input_name, output_name, layers = _functional_graph(body)
    else:
        raise _Refused(f"{model_class} models are not supported (Sequential and Functional only)")
    weight_index = 0
    nodes: dict[str, _Node] = {}
    for name, kind, fields, inputs in layers:  # config order = Keras weight order
        _check_fields(name, kind, fields)
        nodes[name] = _Node(name, kind, fields, inputs, weight_index)
        weight_index += _weight_count(kind, fields)
    return _Plan(input_name=input_name, output_name=output_name,
                 nodes=_topological(input_name, nodes), weight_count=weight_index,
                 dropped_softmax=_final_softmax(output_name, nodes))


_Layers = list[tuple[str, str, Mapping[str, Any], tuple[str, ...]]]


def _sequential_graph(body: Mapping[str, Any]) -> tuple[str, str, _Layers]:
    entries = [layer for layer in body.get("layers", []) if layer.get("class_name") != "InputLayer"]
    names = [entry.get("config", {}).get("name") for entry in entries]
    if not entries or len(set(names)) != len(names):
        raise _Refused("a Sequential model without layers or with repeated names is not supported")
    layers: _Layers = []
    previous = ""  # the input's key (validated layer names are never empty)
    for name, entry in zip(names, entries, strict=True):
        layers.append((name, entry.get("class_name"), entry.get("config", {}), (previous,)))
        previous = name
    return "", previous, layers


def _functional_graph(body: Mapping[str, Any]) -> tuple[str, str, _Layers]:
    layers: _Layers = []
    inputs = []
    for entry in body.get("layers", []):
        name = entry.get("name")
        if entry.get("class_name") == "InputLayer":
            inputs.append(name)
            continue
        nodes = entry.get("inbound_nodes", [])
        if len(nodes) != 1:
            raise _Refused(f"layer {name!r} is applied {len(nodes)} times (not supported)")
        sources = tuple(ref[0] for ref in nodes[0])
        layers.append((name, entry.get("class_name"), entry.get("config", {}), sources))
    if len(inputs) != 1:
        raise _Refused("models with several inputs are not supported")
    return inputs[0], body["output_layers"][0][0], layers


def _topological(input_name: str, nodes: Mapping[str, _Node]) -> tuple[_Node, ...]:
    done, order = {input_name}, []
    pending = list(nodes.values())
    while pending:
        ready = [node for node in pending if all(name in done for name in node.inputs)]
        if not ready:
            raise _Refused(f"layer {pending[0].name!r} has a cyclic or missing input")
        order.extend(ready)
        done.update(node.name for node in ready)
        pending = [node for node in pending if node.name not in done]
    return tuple(order)


def _final_softmax(output_name: str, nodes: Mapping[str, _Node]) -> str | None:
    """The layer whose softmax produces the model output, looking through Dropout, Reshape and
    Flatten as ``engine.keras_config`` does (its output activation decides the per-user path's
    loss), or None. ``forward`` leaves that softmax out, which gives the same loss from logits
    only if it is the softmax of the output itself: a Dense or Activation that only Dropout
    follows; any other final softmax is refused."""
    node, reshaped = nodes.get(output_name), None
    while node is not None and node.kind in ("Dropout", "Reshape", "Flatten"):
        reshaped = reshaped or (node.kind if node.kind != "Dropout" else None)
        node = nodes.get(node.inputs[0])
    if node is None or node.fields.get("activation") != "softmax":
        return None
    if reshaped is not None:
        raise _Refused(f"the final softmax of layer {node.name!r} is followed by {reshaped} "
                       "(not supported)")
    if node.kind not in ("Dense", "Activation"):
        raise _Refused(f"a final softmax on {node.kind} is not supported (Dense or Activation only)")
    return node.name


@dataclass(frozen=True)
class _UsersAsChannels:
    """A layer output in the layout of a depthwise convolution: ``tensor`` is
    ``[B, *spatial, U·F]`` with user u's feature f of example b in channel ``u·F + f``.

    Operations that act on each channel of each example alone keep it (elementwise activations,
    Dropout, 2D pooling, the next depthwise convolution), which saves the two transposes of the
    largest activations per layer; every other layer gets ``[U, B, *spatial, F]`` from
    :func:`_users_first`. Channels never mix in these operations, so neither do users."""

    tensor: Any
    users: Any
    features: int
    like: Any
    """A ``[U, B, ...]`` tensor whose static U and B the standard layout carries."""


_ELEMENTWISE = frozenset({"linear", "relu", "elu", "selu", "gelu", "sigmoid", "hard_sigmoid",
                          "tanh", "softplus", "softsign", "swish", "mish", "exponential"})
"""Allowlisted activations that act on each element alone (softmax is the exception)."""


def _keeps_channels(node: _Node) -> bool:
    """Whether ``node`` takes a :class:`_UsersAsChannels` input as it is (its builder handles
    that layout); every other node gets the standard layout."""
    if node.kind == "Activation":
        return str(node.fields.get("activation") or "linear") in _ELEMENTWISE
    return node.kind in ("Dropout", "MaxPooling2D", "AveragePooling2D", "Conv2D")


def _users_first(value: Any) -> Any:
    """The standard ``[U, B, *spatial, F]`` layout of a layer output."""
    import tensorflow as tf

    if not isinstance(value, _UsersAsChannels):
        return value
    tensor = value.tensor
    spatial = [int(n) for n in tensor.shape[1:-1]]
    split = tf.reshape(tensor, tf.concat([tf.shape(tensor)[:1], spatial,
                                          tf.stack([value.users, value.features])], axis=0))
    rank = len(spatial) + 2
    result = tf.transpose(split, [rank - 1, *range(rank - 1), rank])
    result.set_shape(value.like.shape[:2].concatenate([*spatial, value.features]))
    return result


def _channels_map(value: Any, function: Callable[[Any], Any]) -> Any:
    """``function`` (per element or per channel of each example) applied in either layout."""
    if isinstance(value, _UsersAsChannels):
        return _UsersAsChannels(function(value.tensor), value.users, value.features, value.like)
    return function(value)


def _check_fields(name: str, kind: str, fields: Mapping[str, Any]) -> None:
    where = f"layer {name!r} ({kind})"
    if kind not in _FIELDS:
        raise _Refused(f"layer {kind} is not supported (supported: {', '.join(_FIELDS)})")
    for key, value in fields.items():
        if key.endswith(("_regularizer", "_constraint")):
            if value is not None:
                raise _Refused(f"{where}: regularizers and constraints are not supported")
        elif key in _MUST_BE_OFF:
            if value not in (_MUST_BE_OFF[key], None):
                raise _Refused(f"{where}: {key}={value!r} is not supported")
        elif key == "trainable":
            if value is not True:
                raise _Refused(f"{where}: frozen layers (trainable=false) are not supported")
        elif key == "data_format":
            if value not in ("channels_last", None):
                raise _Refused(f"{where}: data_format {value!r} is not supported (channels_last only)")
        elif not (key.endswith("_initializer") or key in _COMMON_FIELDS or key in _FIELDS[kind]):
            raise _Refused(f"{where}: field {key!r} is not read by the engine "
                           "(not supported)")


def _weight_count(kind: str, fields: Mapping[str, Any]) -> int:
    bias = 1 if fields.get("use_bias", True) else 0
    if kind in ("Dense", "Conv1D", "Conv2D"):
        return 1 + bias
    if kind in _GATES:
        return 2 + bias
    return 1 if kind == "Embedding" else 0


# ---------------------------------------------------------------------------------------------
# The layers as TensorFlow functions of stacked weights: x is [U, B, *example_shape]


def _activation(name: object, dropped: bool = False) -> Callable[[Any], Any]:
    """The named activation; a dropped final softmax is the identity (the loss takes logits)."""
    import tensorflow as tf

    name = "linear" if name is None else str(name)
    if name == "linear" or (dropped and name == "softmax"):
        return lambda x: x
    function: Callable[[Any], Any] = tf.keras.activations.get(name)
    return function


def _ints(value: object, count: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * count
    assert isinstance(value, list | tuple) and len(value) == count  # validated config
    return tuple(int(v) for v in value)


def _to_examples(y: Any, like: Any, shape: Sequence[int]) -> Any:
    """``y`` reshaped to [U, B, *shape], U and B being ``like``'s (``like`` is [U, B, ...])."""
    import tensorflow as tf

    result = tf.reshape(y, tf.concat([tf.shape(like)[:2], list(shape)], axis=0))
    result.set_shape(like.shape[:2].concatenate(shape))
    return result


def _merge_examples(x: Any) -> Any:
    """[U, B, *S] → [U·B, *S] for weight-free per-example ops (they never mix the axis)."""
    import tensorflow as tf

    return tf.reshape(x, [-1, *x.shape[2:]])


def _dense(node: _Node, dropped: bool) -> _Step:
    """Per-user matmul on the last axis: [U, N, in] @ [U, in, out]."""
    import tensorflow as tf

    index, bias = node.weight_index, node.fields.get("use_bias", True)
    units = int(node.fields["units"])
    activation = _activation(node.fields.get("activation"), dropped)

    def apply(params: Sequence[Any], inputs: list[Any], training: bool) -> Any:
        x = inputs[0]
        flat = tf.reshape(x, tf.stack([tf.shape(x)[0], -1, x.shape[-1]]))
        y = tf.matmul(flat, params[index])
        if bias:
            y = y + params[index + 1][:, None, :]
        return activation(_to_examples(y, x, [*x.shape[2:-1], units]))

    return apply


def _activation_layer(node: _Node, dropped: bool) -> _Step:
    activation = _activation(node.fields.get("activation"), dropped)
    return lambda params, inputs, training: _channels_map(inputs[0], activation)


def _flatten(node: _Node, dropped: bool) -> _Step:
    return lambda params, inputs, training: _to_examples(
        inputs[0], inputs[0], [math.prod(inputs[0].shape[2:])])


def _reshape(node: _Node, dropped: bool) -> _Step:
    target = [int(n) for n in node.fields["target_shape"]]

    def apply(params: Sequence[Any], inputs: list[Any], training: bool) -> Any:
        size, known = math.prod(inputs[0].shape[2:]), math.prod(n for n in target if n != -1)
        shape = [size // known if n == -1 else n for n in target]
        return _to_examples(inputs[0], inputs[0], shape)

    return apply


def _dropout(node: _Node, dropped: bool) -> _Step:
    """Independent per element (hence per user and example), as Keras without noise_shape."""
    import tensorflow as tf

    rate = float(node.fields.get("rate", 0.0))
    return lambda params, inputs, training: (
        _channels_map(inputs[0], lambda x: tf.nn.dropout(x, rate=rate))
        if training and rate > 0 else inputs[0])


def _conv(node: _Node, dropped: bool) -> _Step:
    """Patches of each example (weight-free, on the merged U·B axis), then per user
    ``[U, positions, K·C] @ [U, K·C, F]`` with the user's kernel (einsum per group)."""
    import tensorflow as tf

    rank = 1 if node.kind == "Conv1D" else 2
    fields, index = node.fields, node.weight_index
    kernel_size = _ints(fields["kernel_size"], rank)
    strides = _ints(fields.get("strides", 1), rank)
    dilation = _ints(fields.get("dilation_rate", 1), rank)
    padding, groups = fields.get("padding", "valid"), int(fields.get("groups", 1))
    filters, bias = int(fields["filters"]), fields.get("use_bias", True)
    activation = _activation(fields.get("activation"), dropped)
    taps = math.prod(kernel_size)

    # Conv2D with few filters (F ≤ taps, so the per-channel outputs are no larger than the
    # patches) as one depthwise convolution: users side by side as channels.
    depthwise = (rank == 2 and groups == 1 and filters <= taps and strides[0] == strides[1]
                 and padding in ("valid", "same"))

    def apply(params: Sequence[Any], inputs: list[Any], training: bool) -> Any:
        if depthwise:
            y = _depthwise_conv2d(inputs[0], params[index], filters, strides[0], dilation,
                                  padding)
            if bias:  # bias [U, F] is channel u·F + f's: a contiguous per-channel add
                y = _channels_map(y, lambda t: tf.nn.bias_add(
                    t, tf.reshape(params[index + 1], [-1])))
            return _channels_map(y, activation)
        x = _users_first(inputs[0])
        users, channels = tf.shape(x)[0], int(x.shape[-1])
        patches = _patches(_merge_examples(x), kernel_size, strides, dilation, padding)
        positions = list(patches.shape[1:-2])  # [U·B, *positions, taps, C]
        if groups == 1:
            y = tf.matmul(tf.reshape(patches, tf.stack([users, -1, taps * channels])),
                          tf.reshape(params[index], tf.stack([users, taps * channels, filters])))
        else:  # channel c of group g is g·(C/G) + c; filter f of group g is g·(F/G) + f
            grouped = tf.reshape(patches, tf.stack([users, -1, taps, groups, channels // groups]))
            kernel = tf.reshape(params[index], tf.stack([users, taps, channels // groups, groups,
                                                         filters // groups]))
            y = tf.reshape(tf.einsum("umkgc,ukcgf->umgf", grouped, kernel),
                           tf.stack([users, -1, filters]))
        if bias:
            y = y + params[index + 1][:, None, :]
        return activation(_to_examples(y, x, [*positions, filters]))

    return apply


def _depthwise_conv2d(x: Any, kernel: Any, filters: int, stride: int,
                      dilation: Sequence[int], padding: str) -> _UsersAsChannels:
    """Per-user Conv2D as one depthwise convolution: ``x`` [U, B, H, W, C] (or already
    :class:`_UsersAsChannels`) becomes [B, H, W, U·C] (user u's example b in channels u·C …
    u·C + C − 1 of image b), each channel is convolved with its own F kernels (user u's,
    ``kernel`` [U, kh, kw, C, F]) and the C input channels of each user are summed: the
    result is [B, H', W', U·F] in the :class:`_UsersAsChannels` layout. Channels never mix in a
    depthwise convolution, so neither do users; padding and strides are TensorFlow's, which
    Keras uses."""
    import tensorflow as tf

    users = tf.shape(kernel)[0]
    kh, kw, channels = (int(n) for n in kernel.shape[1:4])
    if isinstance(x, _UsersAsChannels):
        images, like = x.tensor, x.like
    else:
        batch, height, width = tf.shape(x)[1], int(x.shape[2]), int(x.shape[3])
        images = tf.reshape(tf.transpose(x, [1, 2, 3, 0, 4]),
                            tf.stack([batch, height, width, users * channels]))
        like = x
    depth = tf.reshape(tf.transpose(kernel, [1, 2, 0, 3, 4]),
                       tf.stack([kh, kw, users * channels, filters]))
    y = tf.nn.depthwise_conv2d(images, depth, [1, stride, stride, 1], padding.upper(),
                               dilations=list(dilation))
    if channels > 1:
        out_h, out_w = int(y.shape[1]), int(y.shape[2])
        y = tf.reduce_sum(tf.reshape(y, tf.stack([tf.shape(y)[0], out_h, out_w, users,
                                                  channels, filters])), axis=4)
        y = tf.reshape(y, tf.stack([tf.shape(y)[0], out_h, out_w, users * filters]))
    return _UsersAsChannels(y, users, filters, like)


def _patches(x: Any, kernel_size: Sequence[int], strides: Sequence[int],
             dilation: Sequence[int], padding: str) -> Any:
    """``x`` [N, *S, C] → [N, *positions, taps, C], taps in the row-major order of the Keras
    kernel's spatial axes, with TensorFlow's padding: 'same' pads ⌊total/2⌋ before and the
    rest after, so that there are ⌈S/stride⌉ positions; 'causal' pads (k−1)·d before."""
    import tensorflow as tf

    pads, positions = [[0, 0]], []
    for length, k, s, d in zip(x.shape[1:-1], kernel_size, strides, dilation, strict=True):
        span = (k - 1) * d + 1
        if padding == "same":
            total = max((-(-length // s) - 1) * s + span - length, 0)
            before, after = total // 2, total - total // 2
        else:
            before, after = (span - 1 if padding == "causal" else 0), 0
        pads.append([before, after])
        positions.append((length + before + after - span) // s + 1)
    padded = tf.pad(x, [*pads, [0, 0]])
    taps = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        window = tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                       for o, d, n, s in zip(offset, dilation, positions, strides, strict=True))
        taps.append(padded[(slice(None), *window, slice(None))])
    return tf.stack(taps, axis=-2)


def _pool(node: _Node, dropped: bool) -> _Step:
    """TensorFlow's pooling (the op Keras calls) on the merged U·B axis: per example."""
    import tensorflow as tf

    rank = int(node.kind[-2])
    pool_size = _ints(node.fields.get("pool_size", 2), rank)
    strides_field = node.fields.get("strides")
    strides = pool_size if strides_field is None else _ints(strides_field, rank)
    padding = str(node.fields.get("padding", "valid")).upper()
    pool = tf.nn.max_pool if node.kind.startswith("Max") else tf.nn.avg_pool

    def apply(params: Sequence[Any], inputs: list[Any], training: bool) -> Any:
        if isinstance(inputs[0], _UsersAsChannels):  # 2D only (see _keeps_channels)
            return _channels_map(inputs[0], lambda t: pool(t, pool_size, strides, padding))
        pooled = pool(_merge_examples(inputs[0]), pool_size, strides, padding)
        return _to_examples(pooled, inputs[0], pooled.shape[1:])

    return apply


def _global_average(node: _Node, dropped: bool) -> _Step:
    """Mean over each example's spatial axes."""
    import tensorflow as tf

    keepdims = bool(node.fields.get("keepdims", False))
    return lambda params, inputs, training: tf.reduce_mean(
        inputs[0], axis=list(range(2, len(inputs[0].shape) - 1)), keepdims=keepdims)


def _embedding(node: _Node, dropped: bool) -> _Step:
    """Each user's rows of their own table: ``gather([U, V, D], ids [U, B, T], batch_dims=1)``.
    Float ids are cast to int32 (truncation), as Keras's Embedding does."""
    import tensorflow as tf

    index = node.weight_index
    return lambda params, inputs, training: tf.gather(
        params[index], tf.cast(inputs[0], tf.int32), batch_dims=1)


def _recurrent(node: _Node, dropped: bool) -> _Step:
    """SimpleRNN, GRU or LSTM from a zero state, one ``tf.scan`` over time.

    The input projection ``[U, B·T, F] @ [U, F, k·H]`` is one batched matmul; each step does
    ``h [U, B, H] @ recurrent [U, H, k·H]``; gates are split in Keras order (GRU z, r, h;
    LSTM i, f, c, o) and sums are taken in Keras's order. With go_backwards the sequence is
    read from the end and, with return_sequences, returned in that (reversed) order, as Keras
    does."""
    import tensorflow as tf

    fields, index, kind = node.fields, node.weight_index, node.kind
    units, bias = int(fields["units"]), fields.get("use_bias", True)
    activation = _activation(fields.get("activation", "tanh"))
    recurrent_activation = _activation(fields.get("recurrent_activation", "sigmoid"))
    reset_after = kind == "GRU" and fields.get("reset_after", True)
    sequences, backwards = fields.get("return_sequences", False), fields.get("go_backwards", False)

    def apply(params: Sequence[Any], inputs: list[Any], training: bool) -> Any:
        x = inputs[0]  # [U, B, T, F]
        users, batch = tf.shape(x)[0], tf.shape(x)[1]
        kernel, recurrent = params[index], params[index + 1]
        width = _GATES[kind] * units
        projected = tf.matmul(tf.reshape(x, tf.stack([users, -1, x.shape[-1]])), kernel)
        input_bias = recurrent_bias = None
        if bias and reset_after:
            input_bias, recurrent_bias = params[index + 2][:, 0], params[index + 2][:, 1]
        elif bias:
            input_bias = params[index + 2]
        if input_bias is not None and kind != "LSTM":  # Keras adds the LSTM bias last
            projected = projected + input_bias[:, None, :]
        steps = tf.reshape(projected, tf.stack([users, batch, x.shape[2], width]))
        steps = tf.transpose(steps, [2, 0, 1, 3])  # [T, U, B, k·H]
        if backwards:
            steps = tf.reverse(steps, [0])
        zeros = tf.zeros(tf.stack([users, batch, units]))

        def simple_rnn(h: Any, x_t: Any) -> Any:
            return activation(x_t + tf.matmul(h, recurrent))

        def gru(h: Any, x_t: Any) -> Any:
            x_z, x_r, x_h = tf.split(x_t, 3, axis=-1)
            if reset_after:
                inner = tf.matmul(h, recurrent)
                if recurrent_bias is not None:
                    inner = inner + recurrent_bias[:, None, :]
                r_z, r_r, r_h = tf.split(inner, 3, axis=-1)
                z, r = recurrent_activation(x_z + r_z), recurrent_activation(x_r + r_r)
                candidate = activation(x_h + r * r_h)
            else:
                r_z, r_r = tf.split(tf.matmul(h, recurrent[:, :, :2 * units]), 2, axis=-1)
                z, r = recurrent_activation(x_z + r_z), recurrent_activation(x_r + r_r)
                candidate = activation(x_h + tf.matmul(r * h, recurrent[:, :, 2 * units:]))
            return z * h + (1 - z) * candidate

        def lstm(state: tuple[Any, Any], x_t: Any) -> tuple[Any, Any]:
            h, c = state
            z = x_t + tf.matmul(h, recurrent)
            if input_bias is not None:
                z = z + input_bias[:, None, :]
            z_i, z_f, z_c, z_o = tf.split(z, 4, axis=-1)
            c = recurrent_activation(z_f) * c + recurrent_activation(z_i) * activation(z_c)
            return recurrent_activation(z_o) * activation(c), c

        if kind == "LSTM":
            outputs = tf.scan(lstm, steps, initializer=(zeros, zeros))[0]
        else:
            outputs = tf.scan(simple_rnn if kind == "SimpleRNN" else gru, steps,
                              initializer=zeros)
        return tf.transpose(outputs, [1, 2, 0, 3]) if sequences else outputs[-1]

    return apply


def _concatenate(node: _Node, dropped: bool) -> _Step:
    """Joins each example's tensors; the config's axis counts the batch axis, the stacked
    tensors have the user axis in front of it."""
    import tensorflow as tf

    axis = int(node.fields.get("axis", -1))
    axis = axis + 1 if axis > 0 else axis
    return lambda params, inputs, training: tf.concat(inputs, axis=axis)


def _add(node: _Node, dropped: bool) -> _Step:
    import tensorflow as tf

    return lambda params, inputs, training: tf.add_n(inputs)


_BUILDERS: Mapping[str, Callable[[_Node, bool], _Step]] = {
    "Dense": _dense,
    "Activation": _activation_layer,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Dropout": _dropout,
    "Conv1D": _conv,
    "Conv2D": _conv,
    **{f"{kind}Pooling{n}D": _pool for kind in ("Max", "Average") for n in (1, 2, 3)},
    **{f"GlobalAveragePooling{n}D": _global_average for n in (1, 2, 3)},
    "Embedding": _embedding,
    "SimpleRNN": _recurrent,
    "GRU": _recurrent,
    "LSTM": _recurrent,
    "Concatenate": _concatenate,
    "Add": _add,
}
