"""A validated Keras config as a pure function of *per-user* weights, for vectorized training.

``stacked_forward(params, x)`` evaluates the model for U users at once, each with its own
weights: ``params[i]`` has shape ``[U, *weight_shape_i]`` (Keras weight order) and ``x`` has
shape ``[U, B, *input_shape]``; the result is ``[U, B, num_classes]`` logits. Nothing mixes users:
every operation is either elementwise or a batched matmul whose batch axis is the user axis,
so user u's outputs depend only on user u's weights and inputs (``tests/test_vectorized_
engine.py`` checks it bit for bit).

Supported (step 1 of the vectorized engine): ``Sequential`` models of ``InputLayer``,
``Dense``, ``Activation``, ``Flatten``, ``Reshape`` and ``Dropout`` without regularizers or
constraints. :func:`vectorizable` says why a model is not; such models train on the per-user
TFF path (``engine.training``), which runs every allowlisted layer.

Loss: the final activation, if it is a softmax, is *not* applied: the loss is computed from
logits (exact cross-entropy), whereas TFF's Keras wrapper computes it on probabilities clipped
to [1e-7, 1 − 1e-7], which gives zero gradient to confident mistakes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["StackedModel", "build_stacked_model", "vectorizable"]

_SUPPORTED = ("InputLayer", "Dense", "Activation", "Flatten", "Reshape", "Dropout")
_FORBIDDEN_FIELDS = ("kernel_regularizer", "bias_regularizer", "activity_regularizer",
                     "kernel_constraint", "bias_constraint")


def vectorizable(config: dict[str, Any]) -> str | None:
    """None if :func:`build_stacked_model` supports the (already validated) model config,
    else the reason it does not."""
    if config.get("class_name") != "Sequential":
        return f"{config.get('class_name')} models train per user (Sequential only so far)"
    for layer in config["config"]["layers"]:
        name = layer.get("class_name")
        if name not in _SUPPORTED:
            return f"layer {name} trains per user (vectorized: {', '.join(_SUPPORTED)})"
        fields = layer.get("config", {})
        if any(fields.get(key) is not None for key in _FORBIDDEN_FIELDS):
            return "regularizers and constraints train per user"
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
    """Compile a supported Sequential config (see :func:`vectorizable`) into a StackedModel."""
    import tensorflow as tf

    reason = vectorizable(config)
    if reason is not None:
        raise ValueError(reason)
    layers = [layer for layer in config["config"]["layers"] if layer["class_name"] != "InputLayer"]
    steps: list[Callable[[Sequence[Any], Any, bool], Any]] = []
    weight_index = 0
    # The output layer for the softmax rule: the last one that is not a Dropout.
    final = max(i for i, layer in enumerate(layers) if layer["class_name"] != "Dropout")
    for position, layer in enumerate(layers):
        fields = layer.get("config", {})
        kind = layer["class_name"]
        last = position == final
        if kind == "Dense":
            bias = fields.get("use_bias", True)
            steps.append(_dense(weight_index, bias, _activation(fields.get("activation"), last)))
            weight_index += 2 if bias else 1
        elif kind == "Activation":
            steps.append(_elementwise(_activation(fields.get("activation"), last)))
        elif kind == "Flatten":
            steps.append(lambda params, x, training: tf.reshape(
                x, tf.concat([tf.shape(x)[:2], [-1]], axis=0)))
        elif kind == "Reshape":
            target = [int(n) for n in fields["target_shape"]]
            steps.append(lambda params, x, training, target=target: tf.reshape(
                x, tf.concat([tf.shape(x)[:2], target], axis=0)))
        elif kind == "Dropout":
            rate = float(fields.get("rate", 0.0))
            steps.append(lambda params, x, training, rate=rate: (
                tf.nn.dropout(x, rate=rate) if training and rate > 0 else x))

    def forward(params: Sequence[Any], x: Any, training: bool) -> Any:
        for step in steps:
            x = step(params, x, training)
        return x

    return StackedModel(forward=forward, weight_count=weight_index)


def _activation(name: object, last: bool) -> Callable[[Any], Any]:
    """The named activation; a final softmax is the identity (the loss takes logits)."""
    import tensorflow as tf

    name = "linear" if name is None else str(name)
    if name == "softmax" and last:
        return lambda x: x
    if name == "linear":
        return lambda x: x
    return tf.keras.activations.get(name)


def _elementwise(function: Callable[[Any], Any]) -> Callable[[Sequence[Any], Any, bool], Any]:
    return lambda params, x, training: function(x)


def _dense(index: int, bias: bool, activation: Callable[[Any], Any]
           ) -> Callable[[Sequence[Any], Any, bool], Any]:
    """Dense with per-user weights: a batched matmul over the user axis on the last axis."""
    import tensorflow as tf

    def apply(params: Sequence[Any], x: Any, training: bool) -> Any:
        kernel = params[index]  # [U, in, out]
        shape = tf.shape(x)
        flat = tf.reshape(x, tf.stack([shape[0], -1, shape[-1]]))  # [U, N, in]
        y = tf.matmul(flat, kernel)  # [U, N, out]
        if bias:
            y = y + params[index + 1][:, None, :]
        y = tf.reshape(y, tf.concat([shape[:-1], tf.shape(kernel)[-1:]], axis=0))
        return activation(y)

    return apply
