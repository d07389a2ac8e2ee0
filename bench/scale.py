"""Scale: one job of 1,000 rounds × 1,000 expected clients of the demo model through fedgate.

The issue's target: such a job finishes in under 15 minutes on a 2-core machine, end to end
through ``fedgate`` with the sandbox. The benchmark sets up a real local node as ``make demo``
does (``fedgate init``, ``fedgate dataset synthesize``, ``fedgate dataset import`` with the
default per-user cap, ``fedgate researcher add``, ``fedgate serve`` with the configured sandbox),
uploads the demo's Keras model (``Input(60) → Dense(10, softmax)``) with the SDK, submits one
job (:data:`JOB`: z 3, clip 1, plain server SGD) and waits for the verified release.

It reports the wall time from submit to the verified release, the engine's own wall time (the
node's metering of the sandboxed process, owner-side), expected client updates per second,
the ε charged and the released DP accuracy. The floor it compares with is the plain-TensorFlow
round of :mod:`bench.vectorized` (no TFF, no shards, no gateway, no sandbox) on the node's own
training partition at the node's cap, timed for a few rounds and extrapolated to the job's
expected client updates.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import shutil
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.isolated import run_isolated

DATASET = "demo"
TARGET_S = 15 * 60
JOB = {"noise_multiplier": 3.0, "clip": 1.0, "client_learning_rate": 0.1,
       "server_learning_rate": 1.0, "local_epochs": 1, "batch_size": 16}


@dataclass(frozen=True)
class Sizes:
    users: int = 20_000
    clients: int = 1000
    rounds: int = 1000
    floor_rounds: int = 10


FULL = Sizes()
TINY = Sizes(users=2000, clients=100, rounds=20, floor_rounds=2)


def _fedgate(*argv: str) -> str:
    """Run one ``fedgate`` command in this process; its printed output."""
    from gateway.cli import main as fedgate

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = fedgate(list(argv))
    if status != 0:
        raise RuntimeError(f"fedgate {' '.join(argv)} failed:\n{out.getvalue()}")
    return out.getvalue()


def _owner_sets_up_node(workdir: Path, users: int) -> Path:
    """The demo's node with ``users`` synthetic users and a budget no job here exhausts."""
    node = workdir / "node"
    table = workdir / "users.parquet"
    _fedgate("init", str(node), "--owner", "bench-owner")
    _fedgate("dataset", "synthesize", str(table), "--users", str(users))
    _fedgate("-d", str(node), "dataset", "import", DATASET, str(table), "--user-column",
             "user_id", "--label-column", "label", "--epsilon-total", "50", "--delta", "1e-5")
    _fedgate("keygen", "--out", str(workdir / "alice"))
    _fedgate("-d", str(node), "researcher", "add", "alice", "--public-key",
             str(workdir / "alice.pub"))
    table.unlink()
    return node


def _sandbox(node: Path) -> str:
    """The sandbox the node's jobs run in: the configured one (``fedgate init``: bwrap); where
    bubblewrap cannot run, the node is switched to ``sandbox = "none"`` and the output says so."""
    from engine.sandbox import SandboxUnavailable
    from engine.sandbox_launch import find_bwrap

    config = node / "fedgate.toml"
    mode = str(tomllib.loads(config.read_text())["engine"]["sandbox"])
    if mode == "bwrap":
        try:
            find_bwrap()
        except SandboxUnavailable as exc:
            config.write_text(config.read_text().replace('sandbox = "bwrap"', 'sandbox = "none"'))
            return f'**none: bubblewrap is unavailable here ({exc})**, so no sandbox was measured'
    return f"{mode} (the node's default)" if mode == "bwrap" else mode


def _run_job(node: Path, workdir: Path, sizes: Sizes) -> dict[str, Any]:
    """Submit the job with the SDK as a researcher; time it by polling its status."""
    from engine.artifact import artifact_from_keras
    from gateway.cli.demo import demo_model
    from gateway.cli.process import running_gateway
    from gateway.sdk.client import Client

    job = {**JOB, "rounds": sizes.rounds, "clients_per_round": sizes.clients}
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(running_gateway(node, log_path=workdir / "gateway.log"))
        client = stack.enter_context(Client(url, key=workdir / "alice.key",
                                            node_public_key=node / "node.pub"))
        info = next(d for d in client.datasets() if d["name"] == DATASET)
        digest = client.upload_model(artifact_from_keras(
            demo_model(info["num_features"], info["num_classes"])))
        submitted = time.monotonic()
        handle = client.submit(DATASET, digest, **job)
        first_round = None
        while (status := handle.status())["state"] not in ("succeeded", "failed"):
            if first_round is None and status["round"] >= 1:
                first_round = time.monotonic() - submitted
            time.sleep(1.0)
        release = handle.result()
        wall = time.monotonic() - submitted
    return {"job": job, "public_users": info["public_users"], "wall_s": wall,
            "first_round_s": first_round, "epsilon": release.epsilon, "delta": release.delta,
            "accuracy": release.metrics.get("accuracy"), "job_id": release.job_id}


def _metered(node: Path, job_id: str) -> dict[str, Any]:
    """The owner's metering of the job (``fedgate billing usage``): the sandboxed engine's wall
    and CPU time and the realised client updates. Owner-side numbers, never released."""
    month = f"{dt.datetime.now(dt.UTC):%Y-%m}"
    rows = json.loads(_fedgate("-d", str(node), "billing", "usage", "--month", month, "--json"))
    return next(row for row in rows if row["job_id"] == job_id)


def measure_floor(config: dict[str, Any]) -> dict[str, Any]:
    """(In an isolated child) :func:`bench.vectorized._plain_tf` on the node's partition."""
    from bench import vectorized
    from engine.datastore import open_partition

    # _plain_tf pads every user to the module's CAP; give it the node's cap, as the engine has.
    vectorized.CAP = config["cap"]
    partition = open_partition(Path(config["dataset_dir"]), "training")
    return vectorized._plain_tf("softmax", partition, config["clients"], config["rounds"])


def run(sizes: Sizes = FULL, timeout_s: float = 1800) -> str:
    load = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="fedgate-bench-scale-"))
    try:
        node = _owner_sets_up_node(workdir, sizes.users)
        sandbox = _sandbox(node)
        cap = json.loads(_fedgate("-d", str(node), "dataset", "list", "--json"))[0][
            "max_examples_per_user"]
        result = _run_job(node, workdir, sizes)
        meter = _metered(node, result["job_id"])
        floor = run_isolated("bench.scale", "measure_floor", {
            "dataset_dir": str(node / "datasets" / DATASET), "clients": sizes.clients,
            "rounds": sizes.floor_rounds, "cap": cap}, timeout_s)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    job, wall, engine = result["job"], result["wall_s"], float(meter["wall_seconds"])
    expected = sizes.rounds * sizes.clients
    floor_s = expected * floor["seconds"] / floor["updates"]
    q = sizes.clients / result["public_users"]
    first = result["first_round_s"] if result["first_round_s"] is not None else wall
    accuracy = result["accuracy"]
    verdict = "**met**" if wall < TARGET_S else "**missed**"
    lines = [
        f"## Scale: {sizes.rounds:,} rounds × {sizes.clients:,} expected clients through "
        "fedgate",
        "",
        f"`python -m bench.run scale` — a local node set up as `make demo` sets one up "
        f"(`fedgate dataset synthesize --users {sizes.users}`: {result['public_users']:,} "
        f"training users N̂, cap {cap} examples per user; sandbox: {sandbox}), one job "
        f"submitted with the SDK: the demo model `Input(60) → Dense(10, softmax)`, "
        f"{sizes.rounds:,} rounds, {sizes.clients:,} expected clients per round (q = {q:.4f}), "
        f"z {job['noise_multiplier']:g}, clip {job['clip']:g}, client lr "
        f"{job['client_learning_rate']:g} (1 local epoch, batch {job['batch_size']}), server lr "
        f"{job['server_learning_rate']:g}. One-minute load average before it started: {load:.2f} "
        f"on {os.cpu_count()} cores.",
        "",
        "| | seconds | expected client updates/s |",
        "| --- | ---: | ---: |",
        f"| submit → verified release (gateway, sandbox, engine, release) | {wall:,.1f} | "
        f"{expected / wall:,.0f} |",
        f"| engine process, sandboxed (node's metering) | {engine:,.1f} | "
        f"{expected / engine:,.0f} |",
        f"| of which submit → first round done (admission, sandbox, TF start-up, round 1) | "
        f"{first:,.1f} | |",
        f"| of which rounds 2–{sizes.rounds:,} and the release (status polled every second) | "
        f"{wall - first:,.1f} | {(sizes.rounds - 1) * sizes.clients / (wall - first):,.0f} |",
        f"| floor: plain TF vectorized (`bench.vectorized`), {floor['updates']:,} updates in "
        f"{sizes.floor_rounds} rounds, extrapolated | {floor_s:,.1f} | "
        f"{floor['updates'] / floor['seconds']:,.0f} |",
        "",
        f"{expected:,} expected client updates ({sizes.rounds:,} × {sizes.clients:,}; realised "
        f"{meter['client_updates']:,}, owner-side); engine CPU {float(meter['cpu_seconds']):,.0f} s. "
        f"ε charged {result['epsilon']:.3f} (δ {result['delta']:g}); released DP accuracy on "
        f"held-out users "
        f"{'not evaluated' if accuracy is None else f'{accuracy:.3f}'}. Target: under "
        f"{TARGET_S // 60} minutes end to end — {verdict} ({wall / 60:.1f} min). fedgate end "
        f"to end / plain-TF floor: **{wall / floor_s:.2f}×** (engine process alone "
        f"{engine / floor_s:.2f}×).",
    ]
    return "\n".join(lines) + "\n"
