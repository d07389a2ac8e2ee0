"""The researcher CLI against a live gateway over real HTTP on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.cli import main as fedgate
from gateway.process import running_gateway
from tests.conftest import make_researcher
from tests.test_end_to_end import sqlite_node  # noqa: F401  (fixture)

FIXTURES = Path(__file__).parent / "fixtures"
JOB_ARGS = ["--rounds", "2", "--clients-per-round", "20", "--noise-multiplier", "1.0",
            "--clip", "1.0"]


@pytest.fixture
def researcher_env(sqlite_node: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    key = make_researcher(sqlite_node, "alice")
    key_path = tmp_path / "alice.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    with running_gateway(sqlite_node, log_path=tmp_path / "gateway.log") as url:
        monkeypatch.setenv("FEDGATE_URL", url)
        monkeypatch.setenv("FEDGATE_KEY", str(key_path))
        monkeypatch.setenv("FEDGATE_NODE_KEY", str(sqlite_node / "node.pub"))
        yield sqlite_node


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> object:
    assert fedgate(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.tff
def test_researcher_cli_lists_estimates_calibrates_trains_and_fetches(
    researcher_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    datasets = _json(capsys, ["datasets", "--json"])
    assert [d["name"] for d in datasets] == ["demo"]
    estimate = _json(capsys, ["estimate", "demo", *JOB_ARGS, "--json"])
    assert estimate["fits"] is True
    calibrated = _json(capsys, ["calibrate", "demo", "--target-epsilon", "3", "--rounds", "2",
                                "--clients-per-round", "20", "--clip", "1.0", "--json"])
    assert calibrated["noise_multiplier"] > 0
    out = tmp_path / "dp-model.json"
    trained = _json(capsys, ["train", "demo", "--model", str(FIXTURES / "logreg-20x5.json"),
                             *JOB_ARGS, "--out", str(out), "--json"])
    assert trained["epsilon"] == pytest.approx(estimate["epsilon"])
    released = json.loads(out.read_text())
    assert released["format"] == "keras-json-v1" and len(released["weights"]) == 2
    status = _json(capsys, ["job", "status", trained["job_id"], "--json"])
    assert status["state"] == "succeeded" and status["budget"] == "committed"
    result = _json(capsys, ["job", "result", trained["job_id"], "--json"])
    assert result["manifest"]["job_id"] == trained["job_id"]


@pytest.mark.tff
def test_cancelled_job_is_settled_by_the_data_access_rule(
    researcher_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    submitted = _json(capsys, ["train", "demo", "--model", str(FIXTURES / "logreg-20x5.json"),
                               "--rounds", "500", "--clients-per-round", "20",
                               "--noise-multiplier", "5.0", "--clip", "1.0", "--no-wait",
                               "--json"])
    cancelled = _json(capsys, ["job", "cancel", submitted["job_id"], "--json"])
    assert cancelled["state"] == "failed"
    marker = researcher_env / "jobs" / submitted["job_id"] / "data_access"
    assert cancelled["budget"] == ("committed" if marker.exists() else "refunded")


def test_researcher_cli_without_connection_settings_says_what_to_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("FEDGATE_URL", "FEDGATE_KEY", "FEDGATE_NODE_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert fedgate(["datasets"]) == 2
    assert "FEDGATE_URL" in capsys.readouterr().err
