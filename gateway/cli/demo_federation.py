"""``make demo-federation``: one model trained across three fedgate nodes, end to end.

1. Three owners (hospital-a, hospital-b, hospital-c) each initialise a node of their own: a
   separate directory, SQLite ledger, node key pair and policy. Each imports its own users of
   a synthetic non-IID dataset and sets its own budget. hospital-c's policy denies training
   to the researcher, alice.
2. Each node's gateway runs as a separate process on a loopback port.
3. alice, the coordinator, runs ``fedgate federate``: the admission table (hospital-c
   refuses, with its policy's reason), outer rounds in which both other nodes train in
   parallel and release signed DP weights, the ε each node's own ledger charged.
4. The final model is compared with the initial one on public held-out users (synthetic
   users of the same task that no node holds), every node's audit log is exported and
   verified, and the signed federation manifest is verified.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.artifact import decode_array, linear_classifier_artifact
from gateway.cli.common import Fedgate
from gateway.cli.process import start_gateway, stop_gateway
from ledger import keys

# Imports inside functions, not at the top: the node extra (pyarrow, SQLModel) loads only when
# the demo runs; the CLI imports this module to build its parser, on a light install too.

DATASET = "demo"
FEATURES, CLASSES = 20, 5
# users of each node and the public held-out users, as consecutive slices of one table
USERS = {"hospital-a": 700, "hospital-b": 500, "hospital-c": 400, "held-out": 300}
DENYING_NODE = "hospital-c"
EPSILON_TOTAL, DELTA = 8.0, 1e-5
OUTER_ROUNDS = 2
LOCAL_JOB = {"rounds": 8, "clients_per_round": 50, "noise_multiplier": 1.0, "clip": 1.0,
             "client_learning_rate": 0.5, "batch_size": 16}


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def synthesize_partitions(workdir: Path, users: dict[str, int], *, seed: int = 11) -> dict[str, Path]:
    """One synthetic task (LEAF Synthetic(α, β) with a shared labelling model), its users cut
    into consecutive slices, one Parquet file per slice: the nodes hold disjoint users."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from engine.datastore import generate_synthetic

    table_path = generate_synthetic(workdir / "all-users.parquet", users=sum(users.values()),
                                    features=FEATURES, classes=CLASSES, global_model_std=3.0,
                                    seed=seed)
    table = pq.read_table(table_path)
    user_index = pc.cast(pc.utf8_slice_codeunits(table["user_id"], 1), "int64")
    paths, first = {}, 0
    for name, count in users.items():
        mask = pc.and_(pc.greater_equal(user_index, first), pc.less(user_index, first + count))
        paths[name] = workdir / f"{name}.parquet"
        pq.write_table(table.filter(mask), paths[name])
        first += count
    table_path.unlink()
    return paths


def held_out_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a public held-out table."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    features = np.stack([table[f"f{j}"].to_numpy() for j in range(FEATURES)], axis=1)
    return features.astype(np.float32), table["label"].to_numpy().astype(np.int64)


def linear_accuracy(artifact: dict[str, Any], features: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the demo's linear softmax classifier (``Input → Dense``) on (features,
    labels), computed by the coordinator with numpy (argmax of the logits; softmax keeps the
    order), so that evaluating needs no TensorFlow."""
    kernel, bias = (decode_array(w) for w in artifact["weights"])
    predicted = np.argmax(features @ kernel + bias, axis=1)
    return float(np.mean(predicted == labels))


@dataclass(frozen=True)
class NodeSetup:
    name: str
    root: Path


def make_federation_node(fedgate: Fedgate, root: Path, *, owner: str, table: Path,
                         researcher: str, researcher_public_key: Path, deny_training: bool = False,
                         epsilon_total: float = EPSILON_TOTAL, delta: float = DELTA) -> Path:
    """What one owner does: init a node (own key pair, ledger, policy), import their users with
    a budget, register the researcher; with ``deny_training`` a policy that forbids that
    researcher to train (estimates stay allowed), installed with ``policy reload``.
    ``fedgate`` runs the owner's commands (``gateway.cli.main``)."""

    def run(*argv: str) -> None:
        status = fedgate(list(argv))
        if status != 0:
            raise RuntimeError(f"fedgate {' '.join(argv)} exited with {status}")

    run("init", str(root), "--owner", owner)
    run("-d", str(root), "dataset", "import", DATASET, str(table), "--user-column", "user_id",
        "--label-column", "label", "--epsilon-total", str(epsilon_total), "--delta", str(delta))
    run("-d", str(root), "researcher", "add", researcher, "--public-key",
        str(researcher_public_key))
    if deny_training:
        policy = root / "new-policy.csv"
        policy.write_text((root / "policies" / "policy.csv").read_text()
                          + f"p, {researcher}, {owner}, *, train, deny\n")
        run("-d", str(root), "policy", "reload", "--from", str(policy))
    return root


def start_gateways(roots: dict[str, Path], log_dir: Path
                   ) -> dict[str, tuple[str, subprocess.Popen[bytes]]]:
    """Start one ``fedgate serve`` process per node, concurrently; each on its own port."""
    with ThreadPoolExecutor(max_workers=len(roots)) as pool:
        futures = {name: pool.submit(start_gateway, root, log_path=log_dir / f"{name}-gateway.log")
                   for name, root in roots.items()}
    started = {name: f.result() for name, f in futures.items() if f.exception() is None}
    failed = [f.exception() for f in futures.values() if f.exception() is not None]
    if failed:
        for _, process in started.values():
            stop_gateway(process)
        raise RuntimeError(f"a gateway did not start: {failed[0]}")
    return started


def write_nodes_toml(path: Path, nodes: dict[str, tuple[str, Path]]) -> Path:
    """nodes.toml for the coordinator: name → (url, node public key)."""
    lines = []
    for name, (url, node_key) in nodes.items():
        lines += ["[[node]]", f'name = "{name}"', f'url = "{url}"', f'node_key = "{node_key}"',
                  f'dataset = "{DATASET}"', ""]
    path.write_text("\n".join(lines))
    return path


def verify_node_audit(fedgate: Fedgate, root: Path, out: Path) -> str:
    """Export a node's audit log (owner) and verify it offline with only node.pub (officer)."""
    fedgate(["-d", str(root), "audit", "export", "--out", str(out)])
    from ledger.audit_verify import verify_export

    report = verify_export(out.read_bytes(), keys.load_public_key(root / "node.pub"))
    if not report.ok:
        raise RuntimeError(f"audit log of {root.name} does not verify: {report.summary()}")
    return report.summary().splitlines()[0]


def run_federation_demo(fedgate: Fedgate, *, keep: bool = False) -> int:
    """Three temporary nodes, one federated model; ``fedgate`` is ``gateway.cli.main``."""
    os.environ.pop("FEDGATE_DATABASE_URL", None)  # every node keeps its own SQLite ledger
    workdir = Path(tempfile.mkdtemp(prefix="fedgate-federation-"))
    gateways: list[subprocess.Popen[bytes]] = []
    try:
        _say("Three owners, three nodes: own directory, ledger, key pair and policy each")
        fedgate(["keygen", "--out", str(workdir / "alice")])
        tables = synthesize_partitions(workdir, USERS)
        urls: dict[str, tuple[str, Path]] = {}
        roots: dict[str, Path] = {}
        for name in (n for n in USERS if n != "held-out"):
            roots[name] = make_federation_node(
                fedgate, workdir / name, owner=name, table=tables[name], researcher="alice",
                researcher_public_key=workdir / "alice.pub", deny_training=name == DENYING_NODE)
        for name, (url, process) in start_gateways(roots, workdir).items():
            gateways.append(process)
            urls[name] = (url, roots[name] / "node.pub")
            print(f"{name}: gateway process {process.pid} on {url}")
        print(f"{DENYING_NODE}'s policy: p, alice, {DENYING_NODE}, *, train, deny")
        nodes_toml = write_nodes_toml(workdir / "nodes.toml", urls)
        print(f"\nnodes.toml:\n{nodes_toml.read_text()}")

        _say(f"alice federates: {OUTER_ROUNDS} outer rounds × {LOCAL_JOB['rounds']} local DP "
             "rounds on every node that admits it")
        model = workdir / "model.json"
        initial = linear_classifier_artifact(FEATURES, CLASSES)
        model.write_text(json.dumps(initial))
        job_options = [f"--{name.replace('_', '-')}={value}" for name, value in LOCAL_JOB.items()]
        status = fedgate(["federate", "--nodes", str(nodes_toml), "--model", str(model),
                          "--outer-rounds", str(OUTER_ROUNDS), *job_options, "--min-nodes", "2",
                          "--allow-dropout", "--key", str(workdir / "alice.key"),
                          "--out", str(workdir / "global.json"),
                          "--manifest", str(workdir / "federation.json")])
        if status != 0:
            return status

        _say("alice: the initial vs the final model on public held-out users (no node's data)")
        features, labels = held_out_arrays(tables["held-out"])
        final = json.loads((workdir / "global.json").read_text())
        before = linear_accuracy(initial, features, labels)
        after = linear_accuracy(final, features, labels)
        print(f"held-out accuracy ({len(labels)} examples of {USERS['held-out']} users, "
              f"{CLASSES} classes): initial {before:.3f} -> final {after:.3f}")

        _say("Each owner: what the ledger charged; each officer: the audit log verifies")
        for name, root in roots.items():
            print(f"{name} ledger:", end=" ", flush=True)
            fedgate(["-d", str(root), "budget", "show", DATASET])
            print(f"{name} audit: {verify_node_audit(fedgate, root, workdir / f'{name}-audit.json')}")

        _say("Anyone with alice.pub and the nodes' keys: the federation manifest verifies")
        status = fedgate(["verify-federation", str(workdir / "federation.json"),
                          "--coordinator-key", str(workdir / "alice.pub"),
                          "--nodes", str(nodes_toml)])
        if status != 0 or after <= before:
            return 1
        print("\nfederation demo complete")
        return 0
    finally:
        for process in gateways:
            with contextlib.suppress(Exception):
                stop_gateway(process)
        if keep:
            print(f"deployment kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
