"""Privacy versus utility: one small model trained through a real fedgate node at ε ≈ 1, 3, 8.

Run from the repository root, in the project environment (``make env``)::

    .venv/bin/python docs/examples/privacy_utility.py

It plays both parts on a temporary node:

* **owner** — ``fedgate init``, ``fedgate dataset synthesize --users 20000`` (the demo's kind of
  data: LEAF Synthetic(1, 1) with a labelling model shared by all users), ``fedgate dataset
  import`` with a budget large enough for every job (ε_total 50, δ 1e-5), ``fedgate researcher
  add``, and ``fedgate serve`` on a free loopback port;
* **researcher** — for each target ε, ``Client.calibrate`` picks the smallest noise multiplier z
  for fixed rounds and clients per round, and ``Client.train_model`` trains the demo's Keras model
  (multinomial logistic regression, 60 features, 10 classes) with user-level DP-FedAvg and returns
  the verified release: DP weights, the DP accuracy on held-out users, the ε charged.

Then, as the owner (who may read the data), two reference numbers that are **not** DP releases:
the exact accuracy of each released model on the held-out users, and the same model trained
**without differential privacy**: centrally with Keras on the training users' rows (read with
``engine.datastore.open_partition``) — fedgate does not expose non-private federated training.
Every accuracy is the mean over held-out users of each user's accuracy, the quantity the node's
DP evaluation estimates. The script prints a markdown table (see docs/privacy-utility.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

DATASET = "demo"
MODEL_SEED = 0


@dataclass(frozen=True)
class Outcome:
    target_epsilon: float
    epsilon_charged: float
    noise_multiplier: float
    rounds: int
    dp_accuracy: float  # released by the node (DP evaluation on held-out users)
    exact_accuracy: float  # computed by the owner on the same users; not a DP release
    seconds: float


def demo_model(num_features: int, num_classes: int):  # type: ignore[no-untyped-def]
    """The demo's model, with the same initial weights every time it is built."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(MODEL_SEED)
    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=(num_features,)),
        tf.keras.layers.Dense(num_classes, activation="softmax"),
    ])


def held_out_accuracy(model, dataset_dir: Path) -> float:  # type: ignore[no-untyped-def]
    """Mean over the held-out users of each user's accuracy (owner-side, exact)."""
    from engine.datastore import open_partition

    held_out = open_partition(dataset_dir, "evaluation")
    predictions = model.predict(np.asarray(held_out.features), batch_size=4096, verbose=0)
    return held_out.mean_user_accuracy(np.argmax(predictions, axis=1))


def train_without_dp(dataset_dir: Path, num_features: int, num_classes: int,
                     epochs: int) -> float:
    """The non-private reference: the same model trained centrally on all training users."""
    import tensorflow as tf

    from engine.datastore import open_partition

    training = open_partition(dataset_dir, "training")
    model = demo_model(num_features, num_classes)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy())
    model.fit(np.asarray(training.features), np.asarray(training.labels), batch_size=64,
              epochs=epochs, shuffle=True, verbose=0)
    return held_out_accuracy(model, dataset_dir)


def owner_sets_up_node(workdir: Path, *, users: int, epsilon_total: float, delta: float) -> Path:
    from gateway.cli import main as fedgate

    node = workdir / "node"
    table = workdir / "users.parquet"
    steps = [
        ["init", str(node), "--owner", "demo-owner"],
        ["dataset", "synthesize", str(table), "--users", str(users)],
        ["-d", str(node), "dataset", "import", DATASET, str(table), "--user-column", "user_id",
         "--label-column", "label", "--epsilon-total", str(epsilon_total), "--delta", str(delta)],
        ["keygen", "--out", str(workdir / "alice")],
        ["-d", str(node), "researcher", "add", "alice", "--public-key", str(workdir / "alice.pub")],
    ]
    for argv in steps:
        if fedgate(argv) != 0:
            raise SystemExit(f"fedgate {' '.join(argv)} failed")
    return node


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--clients-per-round", type=float, default=1000)
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--client-learning-rate", type=float, default=0.1)
    parser.add_argument("--server-learning-rate", type=float, default=1.0)
    parser.add_argument("--server-momentum", type=float, default=0.9)
    parser.add_argument("--epsilon-total", type=float, default=50.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--central-epochs", type=int, default=20,
                        help="epochs of the non-DP central reference")
    parser.add_argument("--keep", action="store_true", help="keep the temporary node")
    args = parser.parse_args()

    from fedgate import Client
    from gateway.cli.process import running_gateway

    job = {"rounds": args.rounds, "clients_per_round": args.clients_per_round, "clip": args.clip,
           "client_learning_rate": args.client_learning_rate,
           "server_learning_rate": args.server_learning_rate,
           "server_momentum": args.server_momentum, "local_epochs": 1, "batch_size": 16}
    workdir = Path(tempfile.mkdtemp(prefix="fedgate-privacy-utility-"))
    outcomes: list[Outcome] = []
    try:
        node = owner_sets_up_node(workdir, users=args.users, epsilon_total=args.epsilon_total,
                                  delta=args.delta)
        with contextlib.ExitStack() as stack:
            url = stack.enter_context(running_gateway(node, log_path=workdir / "gateway.log"))
            client = stack.enter_context(Client(url, key=workdir / "alice.key",
                                                node_public_key=node / "node.pub"))
            info = next(d for d in client.datasets() if d["name"] == DATASET)
            for target in args.targets:
                calibrated = client.calibrate(DATASET, target_epsilon=target, **job)
                z = calibrated["noise_multiplier"]
                print(f"\n== target ε {target:g}: noise_multiplier {z:.4g} "
                      f"(job ε {calibrated['epsilon']:.3f})", flush=True)
                model = demo_model(info["num_features"], info["num_classes"])
                started = time.monotonic()
                release = client.train_model(model, DATASET, noise_multiplier=z, **job)
                outcomes.append(Outcome(
                    target_epsilon=target, epsilon_charged=release.epsilon,
                    noise_multiplier=z, rounds=args.rounds,
                    dp_accuracy=release.metrics["accuracy"],
                    exact_accuracy=held_out_accuracy(model, node / "datasets" / DATASET),
                    seconds=time.monotonic() - started,
                ))
                print(f"   ε charged {release.epsilon:.3f}, DP accuracy "
                      f"{release.metrics['accuracy']:.3f}", flush=True)
        print("\n== non-DP reference: central Keras training on the training users", flush=True)
        reference = train_without_dp(node / "datasets" / DATASET, info["num_features"],
                                     info["num_classes"], args.central_epochs)
    finally:
        if args.keep:
            print(f"node kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{args.users} users (N̂ = {info['public_users']} training, public), "
          f"δ {args.delta:g}; every job: "
          f"{args.rounds} rounds, {args.clients_per_round:g} expected clients per round, clip "
          f"{args.clip:g}, client SGD lr {args.client_learning_rate:g} (1 local epoch, batch 16), "
          f"server SGD lr {args.server_learning_rate:g} momentum {args.server_momentum:g}\n")
    print("| target ε | ε charged (RDP) | noise multiplier z | rounds | DP accuracy, held-out "
          "users (released) | exact accuracy of the DP model, held-out users (owner-side) | "
          "non-DP accuracy (central, owner-side) | job time (s) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for o in outcomes:
        print(f"| {o.target_epsilon:g} | {o.epsilon_charged:.3f} | {o.noise_multiplier:.3f} | "
              f"{o.rounds} | {o.dp_accuracy:.3f} | {o.exact_accuracy:.3f} | {reference:.3f} | "
              f"{o.seconds:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
