"""The vectorized engine against its floors: client updates per second of one DP-FedAvg round.

In one child process (loopback-only network namespace, as every TFF measurement), on a
10,000-user Synthetic(1, 1) dataset (60 features, 10 classes), local_epochs 1, batch 16, the
owner's cap of 64 examples per user, at 20, 100, 1,000 and 5,000 expected clients per round, for
two models: the demo's 60 → 10 softmax and a small CNN (Reshape 6×10×1 → Conv2D 8 3×3 same,
relu → MaxPooling2D 2 → Flatten → Dense 10 softmax):

(a) **fedgate's vectorized engine**: :class:`engine.shard_process.ShardedTraining` — shards of
    users as TFF clients, per-user training vectorized inside each shard, noise on the total;
(b) **the per-user path**: :func:`engine.training.prepare_training` — one TFF client per user
    (the engine before the vectorized one; skipped where a round would take minutes);
(c) **plain TensorFlow, vectorized**: the same round written only for this benchmark — no TFF,
    no shards, no files — per-user weights as stacked tensors (softmax: analytic gradients;
    CNN: the users' images side by side as channels of one depthwise convolution, gradients by
    GradientTape), masked batches, per-user clipping, Gaussian noise on the sum; its data come
    from the same :func:`engine.vectorized_users.gather_users`;
(d) **the FLOP bound**: the machine's float32 matmul rate (a 2048² matmul) divided by the FLOPs
    of one client update (forward and backward, 3× the forward multiply-adds × 2, of every
    padded example).

Every figure is the median, over the measured rounds, of one round's client updates per second
(robust to a round slowed by another tenant of this shared 2-core machine), after a warm-up
round of the *same* process (TFF traces a computation on its first call): (a) and (c) 6 rounds,
(b) 1.
The ratios are what the issue's targets speak of: (a)/(b) ≥ 100× and (c)/(a) ≤ 3× at ≥ 1,000
clients.
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.isolated import run_isolated

FEATURES, CLASSES, CAP, BATCH, CLIP, NOISE = 60, 10, 64, 16, 1.0, 1.0
IMAGE, FILTERS, KERNEL = (6, 10), 8, 3
MODELS = ("softmax", "cnn")


@dataclass(frozen=True)
class Sizes:
    users: int = 10_000
    clients: tuple[int, ...] = (20, 100, 1000, 5000)
    rounds: int = 6
    per_user_max_clients: int = 1000  # (b) beyond this a round takes minutes
    models: tuple[str, ...] = MODELS


FULL = Sizes()
TINY = Sizes(users=300, clients=(20, 100), rounds=1, per_user_max_clients=20)


def forward_flops(model: str) -> int:
    """FLOPs of one example's forward pass (2 per multiply-add)."""
    dense = FEATURES * CLASSES if model == "softmax" else (
        (IMAGE[0] // 2) * (IMAGE[1] // 2) * FILTERS * CLASSES)
    conv = 0 if model == "softmax" else IMAGE[0] * IMAGE[1] * FILTERS * KERNEL * KERNEL
    return 2 * (dense + conv)


def model_artifact(model: str) -> dict[str, Any]:
    """The benchmark's model as a fedgate artifact (fixed initial weights)."""
    import tensorflow as tf

    from engine import artifact

    if model == "softmax":
        return artifact.parse_artifact(json.dumps(
            artifact.linear_classifier_artifact(FEATURES, CLASSES)).encode())
    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    cnn = tf.keras.Sequential([
        layers.InputLayer(input_shape=(FEATURES,)), layers.Reshape((*IMAGE, 1)),
        layers.Conv2D(FILTERS, KERNEL, padding="same", activation="relu"),
        layers.MaxPooling2D(2), layers.Flatten(), layers.Dense(CLASSES, activation="softmax")])
    return artifact.parse_artifact(json.dumps(artifact.artifact_from_keras(cnn)).encode())


def _spec(users: int, clients: float, rounds: int) -> Any:
    from engine.job import JobSpec

    q = min(1.0, clients / users)
    return JobSpec(job_id="bench", dataset_dir=Path("/unused"), model_path=Path("/unused"),
                   rounds=rounds, sampling_rate=q, expected_clients_per_round=q * users,
                   noise_multiplier=NOISE, clip=CLIP, client_learning_rate=0.1,
                   server_learning_rate=1.0, server_momentum=0.9, local_epochs=1,
                   batch_size=BATCH, evaluation=None, max_examples_per_user=CAP)


def _timed_run(training: Any, partition: Any) -> dict[str, Any]:
    """Run ``training`` (its spec has one warm-up round more than is measured); time and count
    the client updates of every round after the first."""
    stamps: list[tuple[float, int]] = []
    training.run(partition, on_round=lambda _: stamps.append(
        (time.perf_counter(), int(training.client_updates))))
    return _measured(stamps)


def _measured(stamps: list[tuple[float, int]]) -> dict[str, Any]:
    """Totals and per-round rates from (time, client updates so far) after each round; the
    first stamp ends the warm-up round."""
    (start, before), (end, after) = stamps[0], stamps[-1]
    rates = [(u1 - u0) / (t1 - t0) for (t0, u0), (t1, u1) in itertools.pairwise(stamps)]
    return {"seconds": end - start, "updates": after - before, "round_rates": rates}


def _engine(doc: dict[str, Any], partition: Any, clients: int, rounds: int,
            sharded: bool) -> dict[str, Any]:
    from engine import artifact
    from engine.shard_process import prepare_sharded_training
    from engine.training import prepare_training

    spec = _spec(partition.users, clients, rounds + 1)  # + the warm-up round
    if sharded:
        scratch = Path(tempfile.mkdtemp())  # as the runner's job directory
        training = prepare_sharded_training(doc, spec, cap=CAP, scratch_dir=scratch)
    else:
        summary = artifact.validate_artifact(doc, num_features=FEATURES, num_classes=CLASSES)
        training = prepare_training(doc, summary, spec, FEATURES)
    return _timed_run(training, partition)


def _round_signature() -> list[Any]:
    """One trace for every round: the number of sampled users varies."""
    import tensorflow as tf

    return [tf.TensorSpec([None, CAP, FEATURES], tf.float32),
            tf.TensorSpec([None, CAP], tf.int32), tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, CAP], tf.int32)]


def _softmax_round(users: int, q: float) -> tuple[Any, Any]:
    """(c) for the softmax model: analytic per-user gradients, one tf.function per round."""
    import tensorflow as tf

    weights = tf.Variable(tf.zeros([FEATURES, CLASSES]))
    bias = tf.Variable(tf.zeros([CLASSES]))
    steps = -(-CAP // BATCH)

    @tf.function(input_signature=_round_signature())
    def round_fn(x: Any, y: Any, counts: Any, order: Any) -> None:
        u = tf.shape(y)[0]
        w = tf.repeat(weights[None], u, axis=0)
        b = tf.repeat(bias[None], u, axis=0)
        for s in range(steps):
            index = order[:, s * BATCH:(s + 1) * BATCH]
            mask = tf.cast(tf.range(s * BATCH, (s + 1) * BATCH)[None, :] < counts[:, None],
                           tf.float32)
            xb = tf.gather(x, index, axis=1, batch_dims=1)
            yb = tf.one_hot(tf.gather(y, index, axis=1, batch_dims=1), CLASSES)
            p = tf.nn.softmax(tf.matmul(xb, w) + b[:, None, :])
            n = tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
            err = (p - yb) * mask[:, :, None] / n[:, None, None]
            w = w - 0.1 * tf.matmul(xb, err, transpose_a=True)
            b = b - 0.1 * tf.reduce_sum(err, axis=1)
        _noised_step([weights, bias], [weights[None] - w, bias[None] - b], q * users)

    return round_fn, (weights, bias)


def _cnn_round(users: int, q: float) -> tuple[Any, Any]:
    """(c) for the CNN: user u's images are channel u of one depthwise convolution (each
    channel with its own FILTERS kernels), so every user has their own filters; the pooled maps
    go through a batched per-user Dense; gradients by GradientTape of Σ_u loss_u."""
    import tensorflow as tf

    height, width = IMAGE
    pooled = (height // 2) * (width // 2) * FILTERS
    rng = np.random.default_rng(0)
    variables = [tf.Variable(rng.normal(0, 0.3, (KERNEL, KERNEL, 1, FILTERS)), dtype=tf.float32),
                 tf.Variable(tf.zeros([FILTERS])),
                 tf.Variable(rng.normal(0, 0.1, (pooled, CLASSES)), dtype=tf.float32),
                 tf.Variable(tf.zeros([CLASSES]))]
    steps = -(-CAP // BATCH)

    def logits(params: list[Any], xb: Any) -> Any:
        kernel, conv_bias, dense, dense_bias = params  # stacked: [U, ...]
        u = tf.shape(xb)[0]
        images = tf.transpose(tf.reshape(xb, [u, BATCH, height, width]), [1, 2, 3, 0])
        filters = tf.reshape(tf.transpose(kernel[:, :, :, 0, :], [1, 2, 0, 3]),
                             [KERNEL, KERNEL, u, FILTERS])
        maps = tf.nn.depthwise_conv2d(images, filters, [1, 1, 1, 1], "SAME")  # [B,H,W,U·F]
        maps = tf.reshape(maps, [BATCH, height, width, u, FILTERS]) + conv_bias[None, None, None]
        maps = tf.nn.relu(tf.reshape(maps, [BATCH, height, width, u * FILTERS]))
        maps = tf.nn.max_pool2d(maps, 2, 2, "VALID")
        maps = tf.reshape(maps, [BATCH, height // 2, width // 2, u, FILTERS])
        flat = tf.reshape(tf.transpose(maps, [3, 0, 1, 2, 4]), [u, BATCH, pooled])
        return tf.matmul(flat, dense) + dense_bias[:, None, :]

    @tf.function(input_signature=_round_signature())
    def round_fn(x: Any, y: Any, counts: Any, order: Any) -> None:
        u = tf.shape(y)[0]
        params = [tf.repeat(v[None], u, axis=0) for v in variables]
        for s in range(steps):
            index = order[:, s * BATCH:(s + 1) * BATCH]
            mask = tf.cast(tf.range(s * BATCH, (s + 1) * BATCH)[None, :] < counts[:, None],
                           tf.float32)
            xb = tf.gather(x, index, axis=1, batch_dims=1)
            yb = tf.gather(y, index, axis=1, batch_dims=1)
            with tf.GradientTape() as tape:
                tape.watch(params)
                losses = tf.nn.sparse_softmax_cross_entropy_with_logits(yb, logits(params, xb))
                total = tf.reduce_sum(tf.reduce_sum(losses * mask, axis=1)
                                      / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0))
            grads = tape.gradient(total, params)
            params = [p - 0.1 * g for p, g in zip(params, grads, strict=True)]
        _noised_step(variables, [v[None] - p for v, p in zip(variables, params, strict=True)],
                     q * users)

    return round_fn, variables


def _noised_step(variables: list[Any], updates: list[Any], denominator: float) -> None:
    """Clip each user's update (over all tensors) to CLIP, sum, add N(0, (z·C)²), divide."""
    import tensorflow as tf

    flat = [tf.reshape(d, [tf.shape(d)[0], -1]) for d in updates]
    norm = tf.sqrt(tf.add_n([tf.reduce_sum(f ** 2, axis=1) for f in flat]))
    scale = tf.minimum(1.0, CLIP / tf.maximum(norm, 1e-12))
    for variable, f in zip(variables, flat, strict=True):
        total = tf.reshape(tf.reduce_sum(f * scale[:, None], axis=0), tf.shape(variable))
        variable.assign_sub((total + tf.random.normal(tf.shape(total), stddev=NOISE * CLIP))
                            / denominator)


def _plain_tf(model: str, partition: Any, clients: int, rounds: int) -> dict[str, Any]:
    """(c): the same round in plain TF, vectorized over users, no TFF."""
    from engine.training import poisson_sample
    from engine.vectorized_users import example_order, gather_users

    users = partition.users
    q = min(1.0, clients / users)
    rng = np.random.default_rng(0)
    round_fn, _ = (_softmax_round if model == "softmax" else _cnn_round)(users, q)

    def one_round() -> int:
        sampled = poisson_sample(users, q)
        x, y, counts = gather_users(partition, sampled, CAP, rng)
        order = example_order(rng, counts, CAP, 1)
        round_fn(x, y, counts, order)
        return len(sampled)

    updates = one_round()  # trace
    stamps = [(time.perf_counter(), updates)]
    for _ in range(rounds):
        updates += one_round()
        stamps.append((time.perf_counter(), updates))
    return _measured(stamps)


def _flop_rate() -> float:
    """float32 FLOP/s of a 2048² matmul on this machine (best of 5)."""
    import tensorflow as tf

    a = tf.random.normal([2048, 2048])
    matmul = tf.function(lambda: tf.reduce_sum(tf.matmul(a, a)))
    matmul()
    best = min(_seconds(matmul) for _ in range(5))
    return 2 * 2048**3 / best


def _seconds(function: Any) -> float:
    start = time.perf_counter()
    float(function())
    return time.perf_counter() - start


def measure(config: dict[str, Any]) -> dict[str, Any]:
    sizes = Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    from engine import datastore
    from engine.datastore import generate_synthetic, import_dataset

    results: dict[str, Any] = {"flops_per_s": _flop_rate(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        table, ds_dir = Path(tmp) / "users.parquet", Path(tmp) / "ds"
        generate_synthetic(table, users=sizes.users, features=FEATURES, classes=CLASSES, seed=3)
        import_dataset(table, ds_dir, name="bench", user_column="user_id", label_column="label",
                       split_key=b"bench", evaluation_fraction=0.05)
        partition = datastore.open_partition(ds_dir, "training")
        for model in sizes.models:
            doc = model_artifact(model)
            for clients in sizes.clients:
                row: dict[str, Any] = {"model": model, "clients": clients}
                row["vectorized"] = _engine(doc, partition, clients, sizes.rounds, sharded=True)
                row["plain_tf"] = _plain_tf(model, partition, clients, sizes.rounds)
                if clients <= sizes.per_user_max_clients:
                    row["per_user"] = _engine(doc, partition, clients, 1, sharded=False)
                results["rows"].append(row)
    return results


def _rate(measured: dict[str, Any] | None) -> float | None:
    """The median over the measured rounds of a round's updates per second: robust to a round
    slowed by another tenant of this shared machine."""
    if measured is None or measured["updates"] == 0:
        return None
    return statistics.median(measured["round_rates"])


CNN_BOUND = (
    "What bounds the CNN (#21 asks for (a)/(b) ≥ 100× at 1,000 clients): the plain-TF floor "
    "(c) itself is only 90–103× the per-user path there, so the target needs an engine faster "
    "than TensorFlow's best vectorized formulation of the round. Measured on this machine "
    "(2026-12-06/07, 1,000 users, batch 16): the per-user convolution is a depthwise "
    "convolution with the users as channels; its forward and filter gradient are most of the "
    "round. Patches and a batched matmul are 1.6× slower, shifted multiply-adds 7×; a grouped "
    "Conv2D (one group per user) runs oneDNN's kernel, bit-identical to the depthwise one and "
    "within 8 % of it; XLA (`jit_compile`) compiles in 2 s but its CPU grouped convolution "
    "took minutes per round. A custom kernel is not an option under TFF: its `worker_binary` "
    "runs only the TensorFlow ops compiled into it.")
"""Why the CNN's (a)/(b) stops near 100× (the same text is in docs/performance.md)."""


def run(sizes: Sizes = FULL, timeout_s: float = 2400) -> str:
    started = time.perf_counter()
    results = run_isolated("bench.vectorized", "measure", asdict(sizes), timeout_s)
    rate = results["flops_per_s"]
    lines = [
        "## Vectorized engine: client updates per second against the floors",
        "",
        f"`python -m bench.run vectorized` — {sizes.users:,}-user Synthetic(1, 1) (60 "
        f"features, 10 classes), 1 local epoch, batch {BATCH}, every user padded to the cap of "
        f"{CAP} examples, clip {CLIP:g}, noise multiplier {NOISE:g}; {sizes.rounds} rounds "
        "after a warm-up round of the same process (per-user path: 1 round); each figure is "
        "the median over those rounds of a round's updates per second. Models: the demo's "
        "60 → 10 softmax (610 parameters) and a CNN (Reshape 6×10×1 → Conv2D 8 3×3 same relu "
        "→ MaxPooling2D 2 → Flatten → Dense 10; 1,290 parameters). Matmul rate "
        f"{rate / 1e9:.1f} GFLOP/s; one client update is 3 × forward FLOPs × {CAP} examples: "
        + ", ".join(f"{m} {3 * forward_flops(m) * CAP:,} FLOPs" for m in sizes.models)
        + ". (c) is written only for the benchmark (module docstring).",
        "",
        "| model | expected clients per round | (a) vectorized engine | (b) per-user TFF | "
        "(c) plain TF vectorized | (a)/(b) | (c)/(a) | (a) / FLOP bound |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        bound = rate / (3 * forward_flops(row["model"]) * CAP)
        a, b, c = _rate(row["vectorized"]), _rate(row.get("per_user")), _rate(row["plain_tf"])
        lines.append(
            f"| {row['model']} | {row['clients']:,} | {a:,.0f} | "
            f"{'—' if b is None else f'{b:,.0f}'} | {c:,.0f} | "
            f"{'—' if b is None else f'{a / b:,.0f}×'} | {c / a:.2f}× | {a / bound:.1%} |")
    lines += ["", "Updates per second (higher is better); — : not measured (a per-user round "
              "would take minutes). Whole section: "
              f"{time.perf_counter() - started:.0f} s.", "", CNN_BOUND]
    return "\n".join(lines) + "\n"
