"""Rehearsal as a specification: the researcher runs exactly the job they would submit,
locally on the dataset's public mock data, and learns about validation refusals, time per
round and the ε it would cost — while the node reserves, charges and records nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlmodel import select
from starlette.applications import Starlette

from engine.artifact import linear_classifier_artifact
from gateway.api.app import create_app
from gateway.client import Client
from gateway.node.deployment import init_deployment
from ledger.db import make_engine, session
from ledger.models import Dataset, Job, ModelArtifact
from tests.conftest import make_researcher
from tests.test_gateway import audit_entries, signed_client

JOB = {"rounds": 2, "clients_per_round": 20, "noise_multiplier": 1.0, "clip": 1.0}


def sdk(app: Starlette, key: Ed25519PrivateKey, node_dir: Path) -> Client:
    """The researcher SDK, talking to ``app`` in-process."""
    client = Client("http://testserver", key=key, node_public_key=node_dir / "node.pub")
    client._http.close()
    client._http = signed_client(app, key)
    return client


def ledger_state(db_url: str) -> dict[str, Any]:
    """Everything a rehearsal must leave untouched on the node."""
    engine = make_engine(db_url)
    with session(engine) as s:
        dataset = s.get(Dataset, "demo")
        state = {"spent": dataset.spent_rdp if dataset else None,
                 "jobs": len(s.exec(select(Job)).all()),
                 "models": len(s.exec(select(ModelArtifact)).all())}
    engine.dispose()
    return {**state, "audit": len(audit_entries(db_url))}


def test_rehearsal_catches_a_model_whose_input_shape_does_not_match_with_nothing_reserved(
    node_dir: Path, db_url: str
) -> None:
    alice = make_researcher(node_dir, "alice")
    before = ledger_state(db_url)
    with sdk(create_app(node_dir), alice, node_dir) as client:
        report = client.rehearse(linear_classifier_artifact(21, 5), "demo", **JOB)
        estimate = client.estimate("demo", **JOB)
    assert not report.ok
    assert report.refusal == ("model input shape [21] does not match the dataset's 20 features "
                              "(expected [20])")
    assert report.epsilon == estimate["epsilon"] and report.delta == estimate["delta"]
    assert "refused by validation" in report.summary()
    assert ledger_state(db_url) == before
    assert list((node_dir / "models").iterdir()) == []


def test_fedgate_train_rehearse_prints_the_refusal_and_exits_1(
    tmp_path: Path, synthetic_table: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main as fedgate
    from gateway.cli.process import running_gateway

    node = mock_node(tmp_path, synthetic_table, monkeypatch)
    key = make_researcher(node, "alice")
    key_path = tmp_path / "alice.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    model = tmp_path / "wide.json"
    model.write_text(json.dumps(linear_classifier_artifact(20, 7)))
    with running_gateway(node, log_path=tmp_path / "gateway.log") as url:
        code = fedgate(["train", "demo", "--model", str(model), "--rehearse", "--url", url,
                        "--key", str(key_path), "--node-key", str(node / "node.pub"),
                        *[f"--{k.replace('_', '-')}={v}" for k, v in JOB.items()]])
    out = capsys.readouterr().out
    assert code == 1
    assert "refused by validation: model output has 7 units but the dataset has 5 classes" in out
    assert ledger_state(f"sqlite:///{node / 'fedgate.db'}")["jobs"] == 0


def mock_node(tmp_path: Path, table: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A SQLite node whose dataset ``demo`` has 100 mock users."""
    from gateway.cli import main as fedgate

    monkeypatch.delenv("FEDGATE_DATABASE_URL", raising=False)
    root = tmp_path / "node"
    init_deployment(root, owner="owner")
    assert fedgate(["-d", str(root), "dataset", "import", "demo", str(table),
                    "--user-column", "user_id", "--label-column", "label", "--epsilon-total",
                    "4", "--delta", "1e-5", "--mock-users", "100"]) == 0
    return root


@pytest.mark.tff
def test_rehearsal_of_a_good_model_reports_time_per_round_and_epsilon(
    tmp_path: Path, synthetic_table: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = mock_node(tmp_path, synthetic_table, monkeypatch)
    db_url = f"sqlite:///{node / 'fedgate.db'}"
    alice = make_researcher(node, "alice")
    before = ledger_state(db_url)
    with sdk(create_app(node), alice, node) as client:
        report = client.rehearse(linear_classifier_artifact(20, 5), "demo", **JOB)
        estimate = client.estimate("demo", **JOB)
    assert report.ok, (report.failure, report.engine_log)
    assert report.refusal is None and report.failure is None
    assert len(report.round_seconds) == 2 and all(t > 0 for t in report.round_seconds)
    assert report.seconds_per_round == report.round_seconds[1]
    assert report.epsilon == estimate["epsilon"] and report.fits
    assert 50 < report.mock_training_users < 100 and report.clients_per_round == 20
    assert set(report.metrics) == {"accuracy", "loss"}
    assert "s per round" in report.summary()
    assert ledger_state(db_url) == before


def test_a_failed_rehearsals_engine_log_leaves_out_tensorflows_startup_noise_only() -> None:
    """The researcher sees why the engine failed, not TensorFlow's ``E … Unable to register
    cuDNN/cuFFT/cuBLAS factory`` start-up lines (real ones: TensorFlow is started here)."""
    import os
    import subprocess
    import sys

    from gateway.node.rehearsal import engine_log_tail

    start = ("from engine.netns import isolate_network; isolate_network()\n"
             "import sys, tensorflow\n"
             "print('engine: model output has 7 units but the dataset has 5 classes',"
             " file=sys.stderr)\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    log = subprocess.run([sys.executable, "-c", start], capture_output=True, text=True,
                         env=env, timeout=300, check=True).stderr
    assert "Unable to register cuDNN factory" in log  # TensorFlow did print its start-up lines
    shown = engine_log_tail(log)
    assert shown == "engine: model output has 7 units but the dataset has 5 classes"
