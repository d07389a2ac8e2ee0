"""The researcher CLI and SDK against a live gateway over real HTTP on loopback; the optimizer
choice from request to job.json and manifest; the progress bar's ε so far."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from engine.job import SERVER_OPTIMIZERS, JobSpec, JobSpecInvalid
from gateway.cli import main as fedgate
from gateway.cli.process import running_gateway
from gateway.client import Client, InvalidRequest, progress_postfix
from gateway.node.admission import JobRequest
from gateway.node.jobs import engine_job_document
from gateway.protocol.problems import Problem
from ledger import accounting
from ledger.accounting import JobCost
from tests.conftest import make_researcher
from tests.test_end_to_end import sqlite_node  # noqa: F401  (fixture)

FIXTURES = Path(__file__).parent / "fixtures"
JOB_ARGS = ["--rounds", "2", "--clients-per-round", "20", "--noise-multiplier", "1.0",
            "--clip", "1.0"]
JOB = {"rounds": 2, "clients_per_round": 20, "noise_multiplier": 1.0, "clip": 1.0}


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


@pytest.fixture
def sdk(researcher_env: Path) -> Iterator[Client]:
    import os

    with Client(os.environ["FEDGATE_URL"], key=os.environ["FEDGATE_KEY"],
                node_public_key=os.environ["FEDGATE_NODE_KEY"]) as client:
        yield client


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> object:
    assert fedgate(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.tff
def test_researcher_cli_lists_estimates_calibrates_trains_and_fetches(
    researcher_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # `job result` saves the model here (JOB_ID.model.json)
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
    assert status["progress"] == {"round": 2, "rounds": 2, "epsilon_so_far": status["epsilon"]}
    result = _json(capsys, ["job", "result", trained["job_id"], "--json"])
    assert result["manifest"]["job_id"] == trained["job_id"]
    assert result["out"] == f"{trained['job_id']}.model.json"
    assert json.loads((tmp_path / result["out"]).read_text()) == released


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


# --- optimizer choice -------------------------------------------------------------------------


def test_unknown_optimizer_is_refused_over_http_and_known_ones_do_not_change_epsilon(
    sdk: Client,
) -> None:
    plain = sdk.estimate("demo", **JOB)
    for optimizer in SERVER_OPTIMIZERS:  # post-processing: the accounted mechanism is the same
        assert sdk.estimate("demo", **JOB, server_optimizer=optimizer)["epsilon"] == plain["epsilon"]
    with pytest.raises(InvalidRequest) as refused:
        sdk.estimate("demo", **JOB, server_optimizer="rmsprop")
    problem = refused.value.problem
    assert problem["status"] == 422 and problem["field"] == "server_optimizer"
    assert problem["allowed"] == list(SERVER_OPTIMIZERS)
    assert "adam" in problem["detail"]
    with pytest.raises(InvalidRequest) as refused:
        sdk.submit("demo", "sha256:" + "0" * 64, **JOB, client_optimizer="adam")
    assert refused.value.problem["allowed"] == ["sgd", "sgdm"]


@pytest.mark.parametrize(("parameters", "field"), [
    ({"server_optimizer": "adam", "server_beta_1": 1.0}, "server_beta_1"),
    ({"server_optimizer": "adam", "server_epsilon": 0.0}, "server_epsilon"),
    ({"server_optimizer": "sgdm", "server_beta_2": 0.99}, "server_beta_2"),
    ({"server_optimizer": "adam", "server_momentum": 0.9}, "server_momentum"),
    ({"client_optimizer": "sgd", "client_momentum": 0.9}, "client_momentum"),
    ({"client_optimizer": "sgdm", "client_momentum": -0.1}, "client_momentum"),
    ({"server_optimizer": "yogi", "server_initial_preconditioner_value": 1e9},
     "server_initial_preconditioner_value"),
    ({"server_optimizer": ["adam"]}, "server_optimizer"),
    ({"server_optimizer": "adagrad", "server_epsilon": True}, "server_epsilon"),
])
def test_optimizer_hyperparameters_are_typed_range_checked_and_only_for_their_optimizer(
    parameters: dict[str, object], field: str
) -> None:
    with pytest.raises(Problem) as refused:
        JobRequest.from_json({"dataset": "demo", **JOB, **parameters}, needs_model=False)
    assert refused.value.slug == "invalid-request" and refused.value.extra["field"] == field


def _cost(spec: dict[str, Any]) -> JobCost:
    """The cost a ledger would have charged for ``spec`` on 100 public users."""
    return JobCost.for_job(sampling_rate=spec["clients_per_round"] / 100,
                           noise_multiplier=spec["noise_multiplier"], rounds=spec["rounds"],
                           evaluation_noise_multiplier=1.0 if spec["evaluate"] else None)


def test_default_optimizers_are_the_training_fedgate_always_did() -> None:
    spec = JobRequest.from_json({"dataset": "demo", **JOB}, needs_model=False).spec()
    assert {k: v for k, v in spec.items() if "optimizer" in k or "momentum" in k
            or "learning_rate" in k} == {
        "client_optimizer": "sgd", "client_learning_rate": 0.1,
        "server_optimizer": "sgdm", "server_learning_rate": 1.0, "server_momentum": 0.0}
    document = engine_job_document(job_id="j", dataset_dir=Path("/d"), model_path=Path("/m"),
                                   spec=spec, cost=_cost(spec), evaluation_loss_clip=1.0,
                                   max_examples_per_user=None)
    engine = JobSpec.from_json(document)
    assert engine.optimizer("client") == ("sgd", 0.1, {})
    assert engine.optimizer("server") == ("sgdm", 1.0, {"momentum": 0.0})


def test_optimizer_choice_travels_from_request_to_manifest_parameters_and_job_json() -> None:
    request = JobRequest.from_json({"dataset": "demo", **JOB, "server_optimizer": "yogi",
                                    "server_learning_rate": 0.01, "server_beta_2": 0.99,
                                    "client_optimizer": "sgdm", "client_momentum": 0.5},
                                   needs_model=False)
    spec = request.spec()  # what the audit log and the signed manifest record
    assert {k: spec[k] for k in spec if k.startswith("server_") or k.startswith("client_")} == {
        "client_optimizer": "sgdm", "client_learning_rate": 0.1, "client_momentum": 0.5,
        "server_optimizer": "yogi", "server_learning_rate": 0.01, "server_beta_1": 0.9,
        "server_beta_2": 0.99, "server_epsilon": 1e-3,
        "server_initial_preconditioner_value": 1e-6}
    document = engine_job_document(job_id="j", dataset_dir=Path("/d"), model_path=Path("/m"),
                                   spec=json.loads(json.dumps(spec)), cost=_cost(spec),
                                   evaluation_loss_clip=1.0, max_examples_per_user=None)
    engine = JobSpec.from_json(json.loads(json.dumps(document)))
    assert engine.optimizer("server") == ("yogi", 0.01, {
        "beta_1": 0.9, "beta_2": 0.99, "epsilon": 1e-3, "initial_preconditioner_value": 1e-6})
    assert engine.optimizer("client") == ("sgdm", 0.1, {"momentum": 0.5})
    with pytest.raises(JobSpecInvalid, match="server_optimizer must be one of"):
        JobSpec.from_json({**document, "server_optimizer": "lbfgs"})


# --- ε so far -----------------------------------------------------------------------------------


@pytest.mark.parametrize("evaluation", [None, 1.0, 0.3])
def test_epsilon_so_far_grows_with_rounds_and_is_the_charge_at_the_last_round(
    evaluation: float | None,
) -> None:
    public = {"sampling_rate": 0.04, "noise_multiplier": 1.1, "rounds": 25, "delta": 1e-5,
              "evaluation_noise_multiplier": evaluation}
    so_far = [accounting.epsilon_after_rounds(rounds_done=i, **public) for i in range(26)]
    assert so_far[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(so_far))
    charged = accounting.JobCost.for_job(
        sampling_rate=0.04, noise_multiplier=1.1, rounds=25,
        evaluation_noise_multiplier=evaluation).epsilon(1e-5)
    assert so_far[-1] == charged
    for i in (1, 2, 10, 24):  # before the last round: the training event of i rounds, exactly
        assert so_far[i] == accounting.training_epsilon(sampling_rate=0.04, noise_multiplier=1.1,
                                                        rounds=i, delta=1e-5)
    cost = accounting.JobCost.from_json(accounting.JobCost.for_job(
        sampling_rate=0.04, noise_multiplier=1.1, rounds=25,
        evaluation_noise_multiplier=evaluation).to_json())
    assert [cost.epsilon_after_rounds(i, 1e-5) for i in range(26)] == so_far
    with pytest.raises(accounting.InvalidPrivacyParameter, match="exceeds rounds"):
        accounting.epsilon_after_rounds(rounds_done=26, **public)


def test_progress_bar_text_shows_epsilon_so_far_of_the_job_epsilon() -> None:
    status = {"state": "running", "round": 3, "rounds": 10, "epsilon": 2.5,
              "progress": {"round": 3, "rounds": 10, "epsilon_so_far": 0.91234}}
    assert progress_postfix(status) == "ε 0.912/2.5, running"
    assert progress_postfix({"state": "queued", "epsilon": 2.5}) == "queued"


@pytest.mark.tff
def test_job_with_adam_server_optimizer_trains_and_its_manifest_records_the_choice(
    sdk: Client,
) -> None:
    artifact = json.loads((FIXTURES / "logreg-20x5.json").read_text())
    job = sdk.submit("demo", sdk.upload_model(artifact), **JOB, server_optimizer="adam",
                     server_learning_rate=0.05, server_beta_2=0.99)
    assert job.last_status["progress"] == {"round": 0, "rounds": 2, "epsilon_so_far": 0.0}
    status = job.wait(progress=True)
    assert status["state"] == "succeeded"
    assert status["progress"]["epsilon_so_far"] == status["epsilon"]
    release = job.result()  # node signature verified
    parameters = release.manifest["parameters"]
    assert (parameters["server_optimizer"], parameters["server_beta_2"]) == ("adam", 0.99)
    assert "server_momentum" not in parameters
    assert release.epsilon == sdk.estimate("demo", **JOB)["epsilon"]
    assert [w.shape for w in release.weights] == [(20, 5), (5,)]


@pytest.mark.tff
@pytest.mark.parametrize(("side", "chosen", "expected"), [
    ("client", {}, {"learning_rate": 0.1}),
    ("server", {}, {"learning_rate": 1.0}),  # sgdm without momentum: as before the choice
    ("client", {"client_optimizer": "sgdm", "client_momentum": 0.5},
     {"learning_rate": 0.1, "momentum": 0.5}),
    ("server", {"server_optimizer": "adam", "server_beta_2": 0.99, "server_momentum": 0.0},
     {"learning_rate": 1.0, "beta_1": 0.9, "beta_2": 0.99, "epsilon": 1e-7}),
    ("server", {"server_optimizer": "adagrad", "server_momentum": 0.0},  # (its initial
     {"learning_rate": 1.0, "epsilon": 1e-7}),  # preconditioner is state, not a hyperparameter)
])
def test_engine_builds_the_named_tff_optimizer_with_its_hyperparameters(
    side: str, chosen: dict[str, object], expected: dict[str, float]
) -> None:
    import tensorflow as tf

    from engine import training

    admitted = JobRequest.from_json({"dataset": "demo", **JOB}, needs_model=False).spec()
    spec = JobSpec.from_json({**engine_job_document(
        job_id="j", dataset_dir=Path("/d"), model_path=Path("/m"), spec=admitted,
        cost=_cost(admitted), evaluation_loss_clip=1.0, max_examples_per_user=None),
        "client_learning_rate": 0.1, "server_learning_rate": 1.0, **chosen})
    optimizer = training.tff_optimizer(spec, side)
    hparams = optimizer.get_hparams(optimizer.initialize([tf.TensorSpec((2,), tf.float32)]))
    assert {k: pytest.approx(float(v)) for k, v in hparams.items()} == expected
