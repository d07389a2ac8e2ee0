"""Local training of many users at once, one independent model per user: a shard's work.

Contract of :func:`shard_clipped_sum` (the client work of one TFF client = one shard of U
sampled users), in float32:

* every user u starts from the same server weights w and trains alone on their own examples:
  ``local_epochs`` passes, each a fresh order of their (at most ``cap``) examples, cut into
  batches of ``batch_size`` across epoch boundaries — exactly ``dataset.shuffle().repeat(E)
  .batch(B)`` of the per-user path — with the job's client optimizer (sgd or sgdm);
* users are padded to ``cap`` examples with masks, so every user runs the same number of steps
  ⌈E·cap / B⌉; a step whose batch holds none of a user's examples leaves that user's weights
  and momentum unchanged (as if their dataset had ended), so padding changes nothing (with
  sgd because the masked loss's gradient is exactly 0; with sgdm by a select);
* per-user losses are masked means over the batch, from logits (``engine.functional_model``);
  the gradient of Σ_u loss_u w.r.t. the stacked weights is, row by row, each user's own
  gradient: no operation mixes users before clipping (no batch statistics across users);
* user u's update is Δ_u = w − w_u (TFF's sign); if any coordinate is non-finite or its norm
  overflows, Δ_u = 0; Δ_u is clipped to L2 norm C jointly over all tensors;
* the shard returns Σ_u clip(Δ_u). Nothing else leaves: no per-user value, no count, no loss
  — except under adaptive clipping (:func:`shard_clipped_sum_and_count`), which also returns
  Σ_u (2·b_u − 1) as an exact int64, b_u = 1 iff ‖Δ_u‖ ≤ C (twice the centred count the
  server noises with N(0, σ_b²), sensitivity 1/2 per user after halving; see
  ``ledger.accounting.training_event``). The clip may then be a float32 tensor (C_t).

The order of each user's examples is an input (``order``), drawn outside TF by the caller from
a CSPRNG-seeded generator, so tests can fix it and compare with the per-user reference path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.functional_model import StackedModel

if TYPE_CHECKING:
    from engine.datastore import Partition

_UNROLLED_STEPS = 64
"""Local steps up to which a shard's training is one unrolled graph (TensorFlow schedules the
steps' independent ops together; a while loop costs ~10 % at 1,000 users per shard)."""

__all__ = ["example_order", "gather_users", "pad_users", "shard_clipped_sum",
           "shard_clipped_sum_and_count", "user_clipped_updates"]


def pad_users(examples: Sequence[tuple[np.ndarray, np.ndarray]], cap: int,
              feature_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack users' (features, labels), each already at most ``cap`` examples, into
    ``features [U, cap, *feature_shape]``, ``labels [U, cap]`` and ``counts [U]`` (zeros pad)."""
    users = len(examples)
    features = np.zeros((users, cap, *feature_shape), np.float32)
    labels = np.zeros((users, cap), np.int32)
    counts = np.zeros(users, np.int32)
    for u, (x, y) in enumerate(examples):
        n = len(y)
        features[u, :n] = x
        labels[u, :n] = y
        counts[u] = n
    return features, labels, counts


def gather_users(partition: Partition, users: np.ndarray, cap: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`pad_users` of the sampled ``users`` of ``partition``, each capped as
    ``engine.training.cap_examples`` caps them (all examples of a user with at most ``cap``; a
    fresh uniform subset of exactly ``cap`` otherwise, drawn from ``rng``), with one gather
    from the memory-mapped partition instead of a Python loop over users."""
    from engine.training import capped_subset

    users = np.asarray(users, np.int64)
    start = partition.offsets[users].astype(np.int64)
    available = partition.offsets[users + 1].astype(np.int64) - start
    counts = np.minimum(available, cap).astype(np.int32)
    positions = np.arange(cap, dtype=np.int64)
    index = start[:, None] + positions[None, :]
    for row in np.flatnonzero(available > cap):
        index[row] = start[row] + capped_subset(rng, int(available[row]), cap)
    valid = positions[None, :] < counts[:, None]
    index = np.where(valid, index, 0).ravel()
    feature_shape = partition.features.shape[1:]
    features = np.asarray(partition.features[index], np.float32).reshape(
        len(users), cap, *feature_shape)
    labels = np.asarray(partition.labels[index], np.int32).reshape(len(users), cap)
    features[~valid] = 0.0
    labels[~valid] = 0
    return features, labels, counts


def example_order(rng: np.random.Generator, counts: np.ndarray, cap: int,
                  local_epochs: int) -> np.ndarray:
    """Each user's sequence of example indices over ``local_epochs`` passes: ``[U, E·cap]``.

    Position p of user u (with n_u examples) is valid iff p < E·n_u; it reads the example
    ``perm_e[p mod n_u]`` of epoch e = p div n_u, a fresh uniform permutation per epoch.
    Invalid positions hold 0 (masked by the caller through ``counts``).
    """
    users = len(counts)
    length = local_epochs * cap
    keys = rng.random((users, local_epochs, cap))
    padding = np.broadcast_to(np.arange(cap)[None, None, :] >= counts[:, None, None], keys.shape)
    keys[padding] = 2.0  # padding sorts last
    permutations = np.argsort(keys, axis=-1).astype(np.int32)  # [U, E, cap]
    positions = np.arange(length)[None, :]
    safe = np.maximum(counts, 1)[:, None]
    epoch = np.minimum(positions // safe, local_epochs - 1)
    within = positions % safe
    order = np.take_along_axis(permutations.reshape(users, length),
                               epoch * cap + within, axis=1)
    return np.where(positions < local_epochs * counts[:, None], order, 0).astype(np.int32)


def shard_clipped_sum(model: StackedModel, server_weights: Sequence[Any], features: Any,
                      labels: Any, counts: Any, order: Any, *, clip: Any, local_epochs: int,
                      batch_size: int, learning_rate: float, momentum: float | None) -> list[Any]:
    """Σ over the shard's users of their clipped model updates (see the module contract)."""
    import tensorflow as tf

    return [tf.reduce_sum(u, axis=0) for u in user_clipped_updates(
        model, server_weights, features, labels, counts, order, clip=clip,
        local_epochs=local_epochs, batch_size=batch_size, learning_rate=learning_rate,
        momentum=momentum)]


def shard_clipped_sum_and_count(model: StackedModel, server_weights: Sequence[Any],
                                features: Any, labels: Any, counts: Any, order: Any, *,
                                clip: Any, local_epochs: int, batch_size: int,
                                learning_rate: float, momentum: float | None
                                ) -> tuple[list[Any], Any]:
    """(Σ_u clip(Δ_u), Σ_u (2·b_u − 1) as int64) for adaptive clipping: b_u = 1 iff user u's
    update norm is at most ``clip`` (a non-finite update counts as above it)."""
    import tensorflow as tf

    clipped, below = _clipped_updates(
        model, server_weights, features, labels, counts, order, clip=clip,
        local_epochs=local_epochs, batch_size=batch_size, learning_rate=learning_rate,
        momentum=momentum)
    below_count = tf.reduce_sum(tf.cast(below, tf.int64))
    users = tf.cast(tf.shape(labels)[0], tf.int64)
    return [tf.reduce_sum(u, axis=0) for u in clipped], 2 * below_count - users


def user_clipped_updates(model: StackedModel, server_weights: Sequence[Any], features: Any,
                         labels: Any, counts: Any, order: Any, *, clip: Any,
                         local_epochs: int, batch_size: int, learning_rate: float,
                         momentum: float | None) -> list[Any]:
    """Each user's clipped update, stacked ``[U, *weight_shape]`` (never leaves a shard:
    :func:`shard_clipped_sum` sums it).

    TensorFlow function body: call it inside ``tf.function`` or a TFF computation. Shapes:
    ``features [U, cap, ...]``, ``labels [U, cap]``, ``counts [U]``, ``order [U, E·cap]``.
    """
    return _clipped_updates(model, server_weights, features, labels, counts, order, clip=clip,
                            local_epochs=local_epochs, batch_size=batch_size,
                            learning_rate=learning_rate, momentum=momentum)[0]


def _clipped_updates(model: StackedModel, server_weights: Sequence[Any], features: Any,
                     labels: Any, counts: Any, order: Any, *, clip: Any, local_epochs: int,
                     batch_size: int, learning_rate: float, momentum: float | None
                     ) -> tuple[list[Any], Any]:
    """(each user's clipped update ``[U, *weight_shape]``, whether their unclipped norm is at
    most ``clip`` ``[U]`` bool)."""
    import tensorflow as tf

    users = tf.shape(labels)[0]
    cap = tf.shape(labels)[1] if labels.shape[1] is None else int(labels.shape[1])
    if labels.shape[1] is not None:  # a batch beyond E·cap holds only masked positions: exact
        batch_size = min(batch_size, local_epochs * int(labels.shape[1]))
    steps = (local_epochs * cap + batch_size - 1) // batch_size
    valid_length = local_epochs * counts  # [U]
    stacked = [tf.repeat(w[None], users, axis=0) for w in server_weights]
    accumulators = [tf.zeros_like(w) for w in stacked]
    lr = tf.constant(learning_rate, tf.float32)

    def step(s: Any, weights: list[Any], accumulator: list[Any]) -> tuple[Any, ...]:
        positions = s * batch_size + tf.range(batch_size)  # [B]
        in_range = positions < local_epochs * cap
        safe_positions = tf.where(in_range, positions, 0)
        index = tf.gather(order, safe_positions, axis=1)  # [U, B]
        mask = tf.logical_and(in_range[None, :], positions[None, :] < valid_length[:, None])
        x = tf.gather(features, index, axis=1, batch_dims=1)  # [U, B, ...]
        y = tf.gather(labels, index, axis=1, batch_dims=1)  # [U, B]
        mask_f = tf.cast(mask, tf.float32)
        examples = tf.reduce_sum(mask_f, axis=1)  # [U]
        active = examples > 0
        with tf.GradientTape() as tape:
            tape.watch(weights)
            logits = model.forward(weights, x, True)
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            per_user = tf.reduce_sum(losses * mask_f, axis=1) / tf.maximum(examples, 1.0)
            total = tf.reduce_sum(per_user)
        gradients = tape.gradient(total, weights)
        new_weights, new_accumulator = [], []
        for w, a, g in zip(weights, accumulator, gradients, strict=True):
            g = tf.zeros_like(w) if g is None else g
            if momentum:  # momentum would move an inactive user: keep them as they are
                keep = tf.reshape(active, tf.concat([[-1], tf.ones(tf.rank(w) - 1, tf.int32)],
                                                    0))
                a_next = momentum * a + g
                w_next = w - lr * a_next
                new_accumulator.append(tf.where(keep, a_next, a))
                new_weights.append(tf.where(keep, w_next, w))
            else:  # an inactive user's gradient is exactly 0 (all its examples are masked)
                new_weights.append(w - lr * g)
                new_accumulator.append(a)
        return s + 1, new_weights, new_accumulator

    if isinstance(steps, int) and steps <= _UNROLLED_STEPS:  # static cap: one graph, no loop
        state: tuple[Any, ...] = (tf.constant(0), stacked, accumulators)
        for _ in range(steps):
            state = step(*state)
        trained = state[1]
    else:
        _, trained, _ = tf.while_loop(lambda s, *_: s < steps, step,
                                      (0, stacked, accumulators))
    updates = [tf.repeat(w[None], users, axis=0) - t for w, t in zip(server_weights, trained,
                                                                       strict=True)]
    flat = [tf.reshape(d, [users, -1]) for d in updates]
    finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(d), axis=1)
                                     for d in flat], axis=1), axis=1)  # [U]
    squared = tf.add_n([tf.reduce_sum(tf.where(finite[:, None], d, 0.0) ** 2, axis=1)
                        for d in flat])
    norm = tf.sqrt(squared)
    keep = tf.logical_and(finite, tf.math.is_finite(norm))
    scale = tf.where(keep, tf.minimum(1.0, clip / tf.maximum(norm, 1e-30)), 0.0)  # [U]
    clipped = []
    for d in updates:
        shaped = tf.reshape(scale, tf.concat([[-1], tf.ones(tf.rank(d) - 1, tf.int32)], 0))
        clipped.append(tf.where(shaped > 0, d, 0.0) * shaped)
    return clipped, tf.logical_and(keep, norm <= clip)
