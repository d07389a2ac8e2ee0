"""``make demo``: the whole fedgate story on a temporary node, end to end.

1. The owner initialises a node, imports a synthetic non-IID per-user dataset
   (LEAF Synthetic(α, β) style) and sets its budget (ε_total, δ).
2. A researcher creates a key pair; the owner registers the public key.
3. The gateway starts on a free loopback port.
4. The researcher trains a small Keras model through the Python client: a signed
   request, policy + privacy filter admission, DP-FedAvg in a separate engine process,
   a progress bar of rounds, and a signed, verified release (DP weights, DP accuracy).
5. A second, much larger job is refused: it does not fit the remaining budget, and the
   refusal says what to change.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.artifact import artifact_from_keras
from gateway.cli.common import Fedgate
from gateway.cli.process import running_gateway
from gateway.sdk.client import BudgetExceeded, Client
from ledger import keys

# TensorFlow is imported inside demo_model, when the demo runs: the CLI imports this module to
# build its parser, on a researcher's light install too.

DEMO_DATASET = "demo"
DEMO_EPSILON_TOTAL = 8.0
DEMO_DELTA = 1e-5
FIRST_JOB = {"rounds": 200, "clients_per_round": 1000, "noise_multiplier": 1.6, "clip": 1.0,
             "client_learning_rate": 0.1, "server_learning_rate": 1.0, "local_epochs": 1,
             "batch_size": 16}
GREEDY_JOB = {**FIRST_JOB, "rounds": 2000}


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def demo_model(num_features: int, num_classes: int):  # type: ignore[no-untyped-def]
    """The researcher's model: multinomial logistic regression in Keras."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's start-up chatter out
    import tensorflow as tf

    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=(num_features,)),
        tf.keras.layers.Dense(num_classes, activation="softmax"),
    ])


@contextlib.contextmanager
def temporary_deployment(prefix: str, *, keep: bool
                         ) -> Iterator[tuple[Path, contextlib.ExitStack]]:
    """A scratch directory for a demo's node and files, and a stack for what runs in it (the
    gateway); both end with the demo, the directory unless ``keep``."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    stack = contextlib.ExitStack()
    try:
        yield workdir, stack
    finally:
        stack.close()
        if keep:
            print(f"deployment kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def report_release(release: Any, started: float, *, held_out: str = "held-out users") -> None:
    """What a researcher learns from a verified release: ε charged and the DP metrics."""
    print(f"released job {release.job_id} in {time.monotonic() - started:.1f} s "
          "(node signature verified)")
    print(f"  ε charged: {release.epsilon:.3f} (δ {release.delta:.2g}, RDP accountant)")
    for name, value in sorted(release.metrics.items()):
        print(f"  DP evaluation {name} on {held_out}: {value:.3f}")


def run_demo(fedgate: Fedgate, *, users: int = 20_000, keep: bool = False) -> int:
    """The whole story on a temporary node; ``fedgate`` runs each command a user would type
    (``gateway.cli.main``)."""
    with temporary_deployment("fedgate-demo-", keep=keep) as (workdir, stack):
        node_dir = workdir / "node"
        _say("Owner: initialise a node, import a synthetic per-user dataset, set its budget")
        fedgate(["init", str(node_dir), "--owner", "demo-owner"])
        table = workdir / "users.parquet"
        fedgate(["dataset", "synthesize", str(table), "--users", str(users)])
        fedgate(["-d", str(node_dir), "dataset", "import", DEMO_DATASET, str(table),
                 "--user-column", "user_id", "--label-column", "label",
                 "--epsilon-total", str(DEMO_EPSILON_TOTAL), "--delta", str(DEMO_DELTA)])

        _say("Researcher: create a key pair; owner: register the public key")
        fedgate(["keygen", "--out", str(workdir / "alice")])
        fedgate(["-d", str(node_dir), "researcher", "add", "alice",
                 "--public-key", str(workdir / "alice.pub")])

        _say("Owner: start the gateway on loopback")
        url = stack.enter_context(running_gateway(node_dir, log_path=workdir / "gateway.log"))
        print(f"gateway listening on {url}")

        client = Client(url, key=workdir / "alice.key", node_public_key=node_dir / "node.pub")
        dataset = client.datasets()[0]
        print(f"visible dataset: {dataset['name']} (N̂ = {dataset['public_users']} training "
              f"users, {dataset['num_features']} features, {dataset['num_classes']} classes; "
              f"budget ε={dataset['epsilon_total']:g}, δ={dataset['delta']:g}, "
              f"{dataset['budget_used']:.0%} used)")

        _say("Researcher: estimate, then train a small Keras model under user-level DP")
        estimate = client.estimate(DEMO_DATASET, **FIRST_JOB)
        print(f"projected ε {estimate['epsilon']:.3f} at δ {estimate['delta']:g}; fits: "
              f"{estimate['fits']}; such jobs that fit in total: {estimate['jobs_that_fit']}")
        model = demo_model(dataset["num_features"], dataset["num_classes"])
        started = time.monotonic()
        release = client.train_model(model, DEMO_DATASET, **FIRST_JOB)
        report_release(release, started)
        print(f"  DP weights loaded into the Keras model: {[w.shape for w in model.get_weights()]}")
        after = client.estimate(DEMO_DATASET, **FIRST_JOB)
        print(f"remaining budget: {after['jobs_that_fit']} more job(s) like this one fit")

        _say("Researcher: a much larger job (2000 rounds) is refused")
        digest = client.upload_model(artifact_from_keras(model))
        try:
            client.submit(DEMO_DATASET, digest, **GREEDY_JOB)
            print("unexpected: the greedy job was admitted")
            return 1
        except BudgetExceeded as refusal:
            print(f"refused ({refusal.problem['type']}): {refusal.problem['detail']}")
        print(f"\nnode public key id: {keys.key_id(keys.load_public_key(node_dir / 'node.pub'))}")
        print("demo complete")
        return 0
