"""The vectorized engine against its floors: client updates per second of one DP-FedAvg round.

In one child process (loopback-only network namespace, as every TFF measurement), for the
60 → 10 softmax model on a 10,000-user Synthetic(1, 1) dataset, local_epochs 1, batch 16, the
owner's cap of 64 examples per user, at 20, 100, 1,000 and 5,000 expected clients per round:

(a) **fedgate's vectorized engine**: :class:`engine.shard_process.ShardedTraining` — shards of
    users as TFF clients, per-user training vectorized inside each shard, noise on the total;
(b) **the per-user path**: :func:`engine.training.prepare_training` — one TFF client per user
    (the engine before this change; skipped where a round would take minutes);
(c) **plain TensorFlow, vectorized**: the same round written only for this benchmark — no TFF,
    no shards — per-user weights as one ``[U, d, C]`` tensor, analytic softmax-regression
    gradients, masked batches, per-user clipping, Gaussian noise on the sum;
(d) **the FLOP bound**: the machine's float32 matmul rate (a 2048² matmul) divided by the FLOPs
    of one client update (forward and backward of every padded example: 6·d·C per example).

Every figure is client updates per second over the rounds (after a warm-up round); the ratios
are what the issue's targets speak of: (a)/(b) ≥ 100× and (c)/(a) ≤ 3× at ≥ 1,000 clients.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.isolated import run_isolated

FEATURES, CLASSES, CAP, BATCH, CLIP, NOISE = 60, 10, 64, 16, 1.0, 1.0


@dataclass(frozen=True)
class Sizes:
    users: int = 10_000
    clients: tuple[int, ...] = (20, 100, 1000, 5000)
    rounds: int = 3
    per_user_max_clients: int = 1000  # (b) beyond this a round takes minutes


FULL = Sizes()
TINY = Sizes(users=300, clients=(20, 100), rounds=1, per_user_max_clients=20)


def _spec(users: int, clients: float, rounds: int) -> Any:
    from engine.job import JobSpec

    q = min(1.0, clients / users)
    return JobSpec(job_id="bench", dataset_dir=Path("/unused"), model_path=Path("/unused"),
                   rounds=rounds, sampling_rate=q, expected_clients_per_round=q * users,
                   noise_multiplier=NOISE, clip=CLIP, client_learning_rate=0.1,
                   server_learning_rate=1.0, server_momentum=0.9, local_epochs=1,
                   batch_size=BATCH, evaluation=None, max_examples_per_user=CAP)


def _timed_run(training: Any, partition: Any) -> dict[str, Any]:
    stamps = [time.perf_counter()]
    training.run(partition, on_round=lambda _: stamps.append(time.perf_counter()))
    return {"seconds": float(stamps[-1] - stamps[0]), "updates": int(training.client_updates)}


def _engine(doc: dict[str, Any], partition: Any, clients: int, rounds: int,
            sharded: bool) -> dict[str, Any]:
    from engine import artifact
    from engine.shard_process import prepare_sharded_training
    from engine.training import prepare_training

    spec = _spec(partition.users, clients, rounds)
    if sharded:
        scratch = Path(tempfile.mkdtemp())  # as the runner's job directory
        warm = prepare_sharded_training(doc, _spec(partition.users, clients, 1), cap=CAP,
                                        scratch_dir=scratch)
        warm.run(partition, on_round=lambda _: None)  # trace the computations once
        training = prepare_sharded_training(doc, spec, cap=CAP, scratch_dir=scratch)
    else:
        summary = artifact.validate_artifact(doc, num_features=FEATURES, num_classes=CLASSES)
        training = prepare_training(doc, summary, spec, FEATURES)
    return _timed_run(training, partition)


def _plain_tf(partition: Any, clients: int, rounds: int) -> dict[str, Any]:
    """(c): the same round in plain TF, vectorized over users, no TFF."""
    import tensorflow as tf

    from engine.training import cap_examples, poisson_sample
    from engine.vectorized_users import example_order, pad_users

    users = partition.users
    q = min(1.0, clients / users)
    rng = np.random.default_rng(0)
    weights = tf.Variable(tf.zeros([FEATURES, CLASSES]))
    bias = tf.Variable(tf.zeros([CLASSES]))
    steps = -(-CAP // BATCH)

    @tf.function(reduce_retracing=True)
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
        dw, db = weights[None] - w, bias[None] - b
        norm = tf.sqrt(tf.reduce_sum(dw ** 2, axis=[1, 2]) + tf.reduce_sum(db ** 2, axis=1))
        scale = tf.minimum(1.0, CLIP / tf.maximum(norm, 1e-12))
        total_w = tf.reduce_sum(dw * scale[:, None, None], axis=0)
        total_b = tf.reduce_sum(db * scale[:, None], axis=0)
        denominator = q * users
        weights.assign_sub((total_w + tf.random.normal(tf.shape(total_w), stddev=NOISE * CLIP))
                           / denominator)
        bias.assign_sub((total_b + tf.random.normal(tf.shape(total_b), stddev=NOISE * CLIP))
                        / denominator)

    def one_round() -> int:
        sampled = poisson_sample(users, q)
        examples = [cap_examples(rng, *partition.user_examples(int(u)), CAP) for u in sampled]
        x, y, counts = pad_users(examples, CAP, (FEATURES,))
        order = example_order(rng, counts, CAP, 1)
        round_fn(x, y, counts, order)
        return len(sampled)

    one_round()  # trace
    start, updates = time.perf_counter(), 0
    for _ in range(rounds):
        updates += one_round()
    return {"seconds": time.perf_counter() - start, "updates": updates}


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
    from engine import artifact, datastore
    from engine.datastore import generate_synthetic, import_dataset

    results: dict[str, Any] = {"flops_per_s": _flop_rate(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        table, ds_dir = Path(tmp) / "users.parquet", Path(tmp) / "ds"
        generate_synthetic(table, users=sizes.users, features=FEATURES, classes=CLASSES, seed=3)
        import_dataset(table, ds_dir, name="bench", user_column="user_id", label_column="label",
                       split_key=b"bench", evaluation_fraction=0.05)
        partition = datastore.open_partition(ds_dir, "training")
        doc = artifact.parse_artifact(json.dumps(
            artifact.linear_classifier_artifact(FEATURES, CLASSES)).encode())
        for clients in sizes.clients:
            row: dict[str, Any] = {"clients": clients}
            row["vectorized"] = _engine(doc, partition, clients, sizes.rounds, sharded=True)
            row["plain_tf"] = _plain_tf(partition, clients, sizes.rounds)
            if clients <= sizes.per_user_max_clients:
                row["per_user"] = _engine(doc, partition, clients, 1, sharded=False)
            results["rows"].append(row)
    return results


def _rate(measured: dict[str, Any] | None) -> float | None:
    if measured is None or measured["updates"] == 0:
        return None
    return measured["updates"] / measured["seconds"]


def run(sizes: Sizes = FULL, timeout_s: float = 1800) -> str:
    started = time.perf_counter()
    results = run_isolated("bench.vectorized", "measure", asdict(sizes), timeout_s)
    flops_per_update = 6 * FEATURES * CLASSES * CAP
    bound = results["flops_per_s"] / flops_per_update
    lines = [
        "## Vectorized engine: client updates per second against the floors",
        "",
        f"`python -m bench.run vectorized` — {sizes.users:,}-user Synthetic(1, 1), 60 → 10 "
        f"softmax, 1 local epoch, batch {BATCH}, every user padded to the cap of {CAP} "
        f"examples, clip {CLIP:g}, noise multiplier {NOISE:g}; {sizes.rounds} rounds after one "
        "warm-up round (per-user path: 1 round). Matmul rate "
        f"{results['flops_per_s'] / 1e9:.1f} GFLOP/s; one client update is "
        f"{flops_per_update:,} FLOPs (6·d·C per padded example), so the FLOP bound is "
        f"{bound:,.0f} updates/s.",
        "",
        "| expected clients per round | (a) vectorized engine | (b) per-user TFF | (c) plain TF "
        "vectorized | (a)/(b) | (c)/(a) | (a) / FLOP bound |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        a, b, c = _rate(row["vectorized"]), _rate(row.get("per_user")), _rate(row["plain_tf"])
        lines.append(
            f"| {row['clients']:,} | {a:,.0f} | {'—' if b is None else f'{b:,.0f}'} | "
            f"{c:,.0f} | {'—' if b is None else f'{a / b:,.0f}×'} | {c / a:.2f}× | "
            f"{a / bound:.1%} |")
    lines += ["", "Updates per second (higher is better); — : not measured (a per-user round "
              "would take minutes). Whole section: "
              f"{time.perf_counter() - started:.0f} s."]
    return "\n".join(lines) + "\n"
