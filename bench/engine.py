"""Engine benchmarks: fedgate's DP-FedAvg against the same DP-FedAvg written directly with TFF,
the sandbox's start-up cost, and rounds per second as clients per round and users grow.

(a) **Overhead versus plain TFF** (issue 8 target: ≤ 1.10× excluding start-up). Both sides use
the same dataset (Synthetic(1, 1) through the datastore, memory-mapped), the same 60 → 10
softmax model, rounds, Poisson sampling rate, clip and noise: fedgate through
:func:`engine.training.prepare_training` and :meth:`FederatedTraining.run` (the runner's code
path: per-user datasets read on demand from the partition), plain TFF as the textbook loop —
``build_unweighted_fed_avg`` with ``DifferentiallyPrivateFactory.gaussian_fixed``, client
datasets from the same arrays. Start-up (TF/TFF import, building the process) is measured
separately and excluded; the two sides alternate to spread machine noise.

(b) **Sandbox start-up**: ``python -I -c pass`` through :func:`engine.launcher.run_job`, in the
bubblewrap sandbox versus ``sandbox = "none"`` (a plain process group) — what the sandbox adds
to every job before any engine code runs.

(c) **Scaling**: rounds per second through fedgate's training loop as expected clients per round
grow (10, 100, 1,000 on 10,000 users) and as the dataset grows (1,000, 10,000, 100,000 users at
10 clients per round), on a 10-feature dataset so that generating 100,000 users stays cheap.

The TFF measurements run in a child process in a private loopback-only network namespace
(TFF's ``worker_binary`` listens on all interfaces without authentication), killed as a group.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.isolated import run_isolated

REPOSITORY = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    """How much to measure; :data:`FULL` for ``make bench``, :data:`TINY` for the smoke test."""

    overhead_users: int = 1000
    overhead_clients: float = 20.0
    overhead_rounds: int = 8
    overhead_repeats: int = 3
    sandbox_starts: int = 5
    scaling_clients: tuple[int, ...] = (10, 100, 1000)
    scaling_clients_users: int = 10_000
    scaling_users: tuple[int, ...] = (1000, 10_000, 100_000)
    scaling_rounds: int = 3


FULL = Sizes()
TINY = Sizes(overhead_users=60, overhead_clients=5.0, overhead_rounds=2, overhead_repeats=1,
             sandbox_starts=1, scaling_clients=(5,), scaling_clients_users=60,
             scaling_users=(60,), scaling_rounds=1)

CLIP = 1.0
NOISE = 1.0


# ---------------------------------------------------------------------------------------------
# In the child process (TFF)

def _dataset(root: Path, users: int, features: int) -> Path:
    from engine.datastore import generate_synthetic, import_dataset

    table = root / f"users-{users}-{features}.parquet"
    generate_synthetic(table, users=users, features=features, seed=3)
    ds_dir = root / f"ds-{users}-{features}"
    # A small evaluation share: training users are what these benchmarks scale.
    import_dataset(table, ds_dir, name=ds_dir.name, user_column="user_id", label_column="label",
                   split_key=b"bench", evaluation_fraction=0.05)
    table.unlink()
    return ds_dir


def _spec(users: int, clients: float, rounds: int) -> Any:
    from engine.job import JobSpec

    return JobSpec(job_id="bench", dataset_dir=Path("/unused"), model_path=Path("/unused"),
                   rounds=rounds, sampling_rate=min(1.0, clients / users),
                   expected_clients_per_round=min(1.0, clients / users) * users,
                   noise_multiplier=NOISE, clip=CLIP, client_learning_rate=0.1,
                   server_learning_rate=1.0, server_momentum=0.9, local_epochs=1,
                   batch_size=16, evaluation=None)


def _fedgate(ds_dir: Path, clients: float, rounds: int) -> dict[str, Any]:
    """fedgate's training loop; returns build time and per-round times."""
    from engine import artifact, datastore
    from engine.training import prepare_training

    schema = datastore.load_schema(ds_dir)
    partition = datastore.open_partition(ds_dir, "training")
    doc = artifact.parse_artifact(json.dumps(
        artifact.linear_classifier_artifact(schema.num_features, schema.num_classes)).encode())
    summary = artifact.validate_artifact(doc, num_features=schema.num_features,
                                         num_classes=schema.num_classes)
    start = time.perf_counter()
    training = prepare_training(doc, summary, _spec(partition.users, clients, rounds),
                                schema.num_features)
    build = time.perf_counter() - start
    stamps = [time.perf_counter()]
    training.run(partition, on_round=lambda _: stamps.append(time.perf_counter()))
    return {"build_s": build, "rounds_s": list(np.diff(stamps)),
            "client_updates": training.client_updates}


def _plain_tff(ds_dir: Path, clients: float, rounds: int) -> dict[str, Any]:
    """The same DP-FedAvg written directly with TFF, as a tutorial would."""
    import tensorflow as tf
    import tensorflow_federated as tff

    from engine import datastore

    schema = datastore.load_schema(ds_dir)
    part = datastore.open_partition(ds_dir, "training")
    features, labels, offsets = np.asarray(part.features), np.asarray(part.labels), part.offsets
    users = part.users
    q = min(1.0, clients / users)

    def model_fn() -> tff.learning.models.VariableModel:
        keras_model = tf.keras.Sequential([
            tf.keras.layers.InputLayer(input_shape=(schema.num_features,)),
            tf.keras.layers.Dense(schema.num_classes, activation="softmax",
                                  kernel_initializer="zeros"),
        ])
        return tff.learning.models.from_keras_model(
            keras_model, loss=tf.keras.losses.SparseCategoricalCrossentropy(),
            input_spec=(tf.TensorSpec([None, schema.num_features], tf.float32),
                        tf.TensorSpec([None], tf.int32)))

    start = time.perf_counter()
    process = tff.learning.algorithms.build_unweighted_fed_avg(
        model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.1),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0, momentum=0.9),
        model_aggregator=tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
            noise_multiplier=NOISE, clients_per_round=q * users, clip=CLIP),
    )
    state = process.initialize()
    build = time.perf_counter() - start
    rng = np.random.default_rng()
    stamps = [time.perf_counter()]
    client_updates = 0
    for _ in range(rounds):
        sampled = np.flatnonzero(rng.random(users) < q)
        client_updates += len(sampled)
        data = [
            tf.data.Dataset.from_tensor_slices((features[offsets[u]:offsets[u + 1]],
                                                labels[offsets[u]:offsets[u + 1]]))
            .shuffle(int(offsets[u + 1] - offsets[u])).batch(16)
            for u in sampled
        ]
        state = process.next(state, data).state
        stamps.append(time.perf_counter())
    return {"build_s": build, "rounds_s": list(np.diff(stamps)), "client_updates": client_updates}


def measure_training(config: dict[str, Any]) -> dict[str, Any]:
    """All TFF measurements (run in the isolated child process)."""
    sizes = Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    import_start = time.perf_counter()
    import tensorflow_federated  # noqa: F401  (start-up, reported, excluded below)

    results: dict[str, Any] = {"import_s": time.perf_counter() - import_start}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ds = _dataset(root, sizes.overhead_users, 60)
        # Warm-up of both (graph tracing caches), then alternate.
        _fedgate(ds, sizes.overhead_clients, 1)
        _plain_tff(ds, sizes.overhead_clients, 1)
        runs: dict[str, list[dict[str, Any]]] = {"fedgate": [], "tff": []}
        for _ in range(sizes.overhead_repeats):
            runs["fedgate"].append(_fedgate(ds, sizes.overhead_clients, sizes.overhead_rounds))
            runs["tff"].append(_plain_tff(ds, sizes.overhead_clients, sizes.overhead_rounds))
        results["overhead"] = runs

        scaling: dict[str, list[dict[str, Any]]] = {"clients": [], "users": []}
        generated: dict[int, Path] = {}
        for users in sorted({sizes.scaling_clients_users, *sizes.scaling_users}):
            start = time.perf_counter()
            generated[users] = _dataset(root, users, 10)
            scaling.setdefault("generate_s", []).append(
                {"users": users, "seconds": time.perf_counter() - start})
        for clients in sizes.scaling_clients:
            run = _fedgate(generated[sizes.scaling_clients_users], clients, sizes.scaling_rounds)
            scaling["clients"].append({"clients": clients, **run})
        for users in sizes.scaling_users:
            run = _fedgate(generated[users], min(10, users), sizes.scaling_rounds)
            scaling["users"].append({"users": users, **run})
        results["scaling"] = scaling
    return results


# ---------------------------------------------------------------------------------------------
# In the benchmark process

def _run_child(sizes: Sizes, timeout_s: float) -> dict[str, Any]:
    from dataclasses import asdict

    return run_isolated("bench.engine", "measure_training", asdict(sizes), timeout_s)


def measure_sandbox_start(starts: int) -> dict[str, float]:
    """Median wall time of ``python -I -c pass`` through the launcher, per sandbox mode."""
    from engine.launcher import run_job
    from engine.sandbox import SandboxSettings

    medians = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("none", "bwrap"):
            times = []
            for i in range(starts + 1):  # the first start warms caches
                job_dir = Path(tmp) / f"{mode}-{i}"
                job_dir.mkdir()
                start = time.perf_counter()
                asyncio.run(run_job(job_dir, on_event=lambda _: None, timeout_s=60,
                                    stderr_log=Path(tmp) / "engine.log",
                                    sandbox=SandboxSettings(mode=mode),  # type: ignore[arg-type]
                                    program=("-c", "pass")))
                times.append(time.perf_counter() - start)
            medians[mode] = statistics.median(times[1:])
    return medians


def _median_round(runs: list[dict[str, Any]]) -> float:
    return statistics.median(t for run in runs for t in run["rounds_s"])


def _total(runs: list[dict[str, Any]]) -> float:
    return statistics.median(sum(run["rounds_s"]) for run in runs)


def _per_client_update(runs: list[dict[str, Any]]) -> float:
    """Seconds per client update over all runs: Poisson sampling draws a different number of
    clients each round on each side, and a round's time is nearly proportional to it, so this
    is the like-for-like comparison (the per-round figures carry the sampling noise)."""
    return sum(sum(run["rounds_s"]) for run in runs) / max(1, sum(run["client_updates"] for run in runs))


def run(sizes: Sizes = FULL, timeout_s: float = 900) -> str:
    started = time.perf_counter()
    sandbox = measure_sandbox_start(sizes.sandbox_starts)
    results = _run_child(sizes, timeout_s)
    overhead = results["overhead"]
    fed_round, tff_round = _median_round(overhead["fedgate"]), _median_round(overhead["tff"])
    fed_total, tff_total = _total(overhead["fedgate"]), _total(overhead["tff"])
    fed_update = _per_client_update(overhead["fedgate"])
    tff_update = _per_client_update(overhead["tff"])
    fed_build = statistics.median(r["build_s"] for r in overhead["fedgate"])
    tff_build = statistics.median(r["build_s"] for r in overhead["tff"])
    lines = [
        "## Engine: DP-FedAvg versus plain TFF, sandbox start-up, scaling",
        "",
        f"`python -m bench.run engine` — {sizes.overhead_users:,}-user Synthetic(1, 1), "
        f"60 → 10 softmax, {sizes.overhead_clients:g} expected clients per round, clip {CLIP:g}, "
        f"noise multiplier {NOISE:g}, {sizes.overhead_rounds} rounds × "
        f"{sizes.overhead_repeats} alternating runs per side (after one warm-up round each). "
        "Start-up excluded: `import tensorflow_federated` took "
        f"{results['import_s']:.1f} s; building the process {fed_build:.2f} s (fedgate) vs "
        f"{tff_build:.2f} s (plain TFF). \"fedgate engine\" here is the per-user path "
        "(one TFF client per user), now the reference implementation; the vectorized engine "
        "every job runs, and its ratio to a plain vectorized TensorFlow reference, is in "
        "\"Vectorized engine\" below.",
        "",
        "| | per client update (ms) | median round (s) | total of rounds (s) |",
        "| --- | ---: | ---: | ---: |",
        f"| plain TFF | {tff_update * 1e3:.1f} | {tff_round:.3f} | {tff_total:.2f} |",
        f"| fedgate engine | {fed_update * 1e3:.1f} | {fed_round:.3f} | {fed_total:.2f} |",
        f"| ratio (target ≤ 1.10×) | **{fed_update / tff_update:.2f}×** | "
        f"{fed_round / tff_round:.2f}× | {fed_total / tff_total:.2f}× |",
        "",
        "The per-client-update ratio is the like-for-like figure: each side's Poisson sampling "
        f"draws its own number of clients per round (standard deviation about "
        f"{100 / math.sqrt(sizes.overhead_clients):.0f} % of the {sizes.overhead_clients:g} "
        "expected), and a round's time is nearly proportional to it.",
        "",
        f"Sandbox start-up (`python -I -c pass` through the launcher, median of "
        f"{sizes.sandbox_starts}): bubblewrap {sandbox['bwrap'] * 1e3:.0f} ms vs plain process "
        f"group {sandbox['none'] * 1e3:.0f} ms (+{(sandbox['bwrap'] - sandbox['none']) * 1e3:.0f}"
        " ms per job).",
        "",
        f"Rounds per second through the per-user path (10-feature Synthetic(1, 1), "
        f"10 → 10 softmax, median of {sizes.scaling_rounds} rounds):",
        "",
        "| users | expected clients per round | rounds/s |",
        "| ---: | ---: | ---: |",
    ]
    for row in results["scaling"]["clients"]:
        lines.append(f"| {sizes.scaling_clients_users:,} | {row['clients']:,} | "
                     f"{1 / statistics.median(row['rounds_s']):.2f} |")
    for row in results["scaling"]["users"]:
        lines.append(f"| {row['users']:,} | {min(10, row['users'])} | "
                     f"{1 / statistics.median(row['rounds_s']):.2f} |")
    generated = ", ".join(f"{g['users']:,} users {g['seconds']:.0f} s"
                          for g in results["scaling"]["generate_s"])
    lines += ["", f"Dataset generation and import (not in the rates): {generated}. Whole "
              f"section: {time.perf_counter() - started:.0f} s."]
    return "\n".join(lines) + "\n"
