"""End to end over real HTTP: a signed job trains with real TFF DP-FedAvg in a separate
engine process, and the release holds only DP outputs, verified by the client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli.process import running_gateway
from gateway.client import BudgetExceeded, Client
from gateway.node.deployment import init_deployment
from ledger.audit import read_entries
from ledger.db import make_engine, session
from tests.conftest import make_researcher

pytestmark = pytest.mark.tff

JOB = {"rounds": 3, "clients_per_round": 20, "noise_multiplier": 1.0, "clip": 1.0,
       "client_learning_rate": 0.1, "batch_size": 16}


def _worker_binaries() -> set[int]:
    """Live (non-zombie) TFF worker processes on this host."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if b"worker_binary" in (proc / "cmdline").read_bytes() and state != "Z":
                    pids.add(int(proc.name))
            except (OSError, IndexError):
                continue
    return pids


@pytest.fixture
def sqlite_node(tmp_path: Path, synthetic_table: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from gateway.cli import main as fedgate

    monkeypatch.delenv("FEDGATE_DATABASE_URL", raising=False)
    root = tmp_path / "node"
    init_deployment(root)
    assert fedgate(["-d", str(root), "dataset", "import", "demo", str(synthetic_table),
                    "--user-column", "user_id", "--label-column", "label",
                    "--epsilon-total", "4", "--delta", "1e-5", "--public-users", "480",
                    "--num-classes", "5"]) == 0
    return root


def test_signed_job_trains_with_tff_and_releases_only_dp_outputs(
    sqlite_node: Path, tmp_path: Path
) -> None:
    import tensorflow as tf

    alice = make_researcher(sqlite_node, "alice")
    model = tf.keras.Sequential([tf.keras.layers.InputLayer(input_shape=(20,)),
                                 tf.keras.layers.Dense(5, activation="softmax")])
    before = [w.copy() for w in model.get_weights()]
    workers_before = _worker_binaries()
    with running_gateway(sqlite_node, log_path=tmp_path / "gateway.log") as url:
        client = Client(url, key=alice, node_public_key=sqlite_node / "node.pub")
        release = client.train_model(model, "demo", progress=False, **JOB)
        raw = client._get(f"/v1/jobs/{release.job_id}/result")
        with pytest.raises(BudgetExceeded):
            client.submit("demo", release.manifest["model_digest"], **{**JOB, "rounds": 20000,
                                                                      "noise_multiplier": 0.6})
    assert set(raw) == {"manifest", "signature", "weights"}
    assert set(raw["manifest"]["metrics"]) <= {"accuracy", "loss"}
    text = json.dumps(raw)
    for forbidden in ("num_examples", "client_work", "train", "sampled", "stderr"):
        assert f'"{forbidden}"' not in text
    assert 0 < release.epsilon < 4
    assert any((a != b).any() for a, b in zip(before, model.get_weights(), strict=True))
    engine = make_engine(f"sqlite:///{sqlite_node / 'fedgate.db'}")
    with session(engine) as s:
        actions = [e["action"] for e in read_entries(s)]
    engine.dispose()
    admit = actions.index("admit")
    assert actions[admit:admit + 3] == ["admit", "charge", "release"]
    assert actions[-1] == "deny"
    assert _worker_binaries() - workers_before == set()
    # The vectorized engine ran (the job has the dataset's cap) and left no user data behind.
    job_dir = sqlite_node / "jobs" / release.job_id
    assert (job_dir / "shards").is_dir() and not list(job_dir.rglob("shard-*.bin"))
