"""The gateway log says what the node decided: one line per admission, refusal and completion
of a job, naming the job, the dataset, the researcher (name and key id), the decision or
outcome and the ε reserved, committed or refunded; never a user count, and a name a researcher
chose cannot break a line. ``fedgate serve`` writes these lines beside uvicorn's access lines.

The engine is not run: a released job is settled from a simulated engine output through the
gateway's own release path (as in test_output_policy), a cancelled one through the API."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlmodel import select

from engine.launcher import JobOutcome
from gateway.api.app import create_app
from gateway.cli.process import free_port
from gateway.node.decision_log import LOGGER
from gateway.node.jobs import JobRunner
from gateway.sdk.request_signing import SignedRequestAuth
from ledger import keys
from ledger.db import make_engine, session
from ledger.models import Dataset
from tests.conftest import make_researcher
from tests.test_gateway import JOB, signed_client
from tests.test_review import submit

FIXTURES = Path(__file__).parent / "fixtures"
GREEDY = {**JOB, "rounds": 5000, "noise_multiplier": 0.8}


@pytest.fixture
def no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Admitted jobs are not started; the test settles them."""
    monkeypatch.setattr(JobRunner, "start", lambda self, job: None)


def _job_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def _exact_user_counts(db_url: str) -> set[int]:
    with session(make_engine(db_url)) as s:
        demo = s.exec(select(Dataset).where(Dataset.name == "demo")).one()  # reviewed: ORM query, not exec
        return {demo.training_users, demo.evaluation_users,
                demo.training_users + demo.evaluation_users}


def test_admission_refusal_and_completions_are_one_line_each(
    node_dir: Path, db_url: str, tmp_path: Path, no_engine: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    alice = make_researcher(node_dir, "alice")
    key_id = keys.key_id(alice.public_key())
    app = create_app(node_dir)
    with signed_client(app, alice) as client:
        released = submit(client, JOB).json()
        cancelled = submit(client, JOB).json()
        refused = submit(client, GREEDY)
        assert refused.status_code == 403
        model = json.loads((FIXTURES / "logreg-20x5.json").read_bytes())
        output = tmp_path / "release.json"
        output.write_text(json.dumps({"weights": model["weights"],
                                      "metrics": {"accuracy": 0.5, "loss": 1.25}}))
        app.state.runner._settle(released["job_id"], JobOutcome(
            succeeded=True, data_accessed=True, release_path=output, failure=None))
        assert client.post(f"/v1/jobs/{cancelled['job_id']}/cancel").status_code == 200

    lines = _job_lines(caplog)
    who = f'researcher "alice" (key {key_id})'
    assert lines == [
        f"admitted job {released['job_id']} on dataset \"demo\" for {who}: queued, "
        f"ε {released['epsilon']:.4g} reserved (δ 1e-05)",
        f"admitted job {cancelled['job_id']} on dataset \"demo\" for {who}: queued, "
        f"ε {cancelled['epsilon']:.4g} reserved (δ 1e-05)",
        f"refused job on dataset \"demo\" for {who}: budget-exceeded: "
        + json.dumps(refused.json()["detail"], ensure_ascii=False),
        f"completed job {released['job_id']} on dataset \"demo\" for {who}: succeeded; "
        f"ε {released['epsilon']:.4g} committed",
        f"completed job {cancelled['job_id']} on dataset \"demo\" for {who}: cancelled before "
        f"data access; ε {cancelled['epsilon']:.4g} refunded",
    ]
    for count in _exact_user_counts(db_url):  # the owner's exact counts never appear
        # as a number of its own: not inside a job id's or key id's hex, which may hold its digits
        assert not any(re.search(rf"(?<![\w.]){count}(?![\w.])", line) for line in lines)


def test_a_failure_after_data_access_is_logged_without_its_reason(
    node_dir: Path, db_url: str, no_engine: None, caplog: pytest.LogCaptureFixture,
) -> None:
    """What stopped a job after it read data, and when, can depend on the data."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    alice = make_researcher(node_dir, "alice")
    app = create_app(node_dir)
    with signed_client(app, alice) as client:
        job = submit(client, JOB).json()
        app.state.runner._settle(job["job_id"], JobOutcome(
            succeeded=False, data_accessed=True, release_path=None,
            failure="engine killed by signal 9"))
    completed = _job_lines(caplog)[-1]
    assert completed.endswith(f"failed after data access; ε {job['epsilon']:.4g} committed")
    assert "signal" not in completed


def test_a_refused_request_cannot_forge_a_log_line(
    node_dir: Path, db_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as client:
        response = submit(client, {**JOB, "dataset": "demo\nINFO:     admitted job x"})
    assert response.status_code >= 400
    [line] = _job_lines(caplog)
    assert "\n" not in line and line.startswith("refused job on ")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_fedgate_serve_writes_the_job_lines_beside_the_access_lines(
    node_dir: Path, tmp_path: Path,
) -> None:
    alice = make_researcher(node_dir, "alice")
    port = free_port()
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "-d", str(node_dir), "serve", "--port",
             str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert gateway.poll() is None, log_path.read_text()
            time.sleep(0.2)
        with httpx.Client(base_url=url, auth=SignedRequestAuth(alice)) as client:
            assert submit(client, GREEDY).status_code == 403
    finally:
        os.killpg(gateway.pid, signal.SIGINT)
        gateway.wait(timeout=30)
    text = log_path.read_text()
    assert re.search(r'INFO: +fedgate\.jobs: refused job on dataset "demo" for researcher '
                     r'"alice" \(key \S+\): budget-exceeded: ', text), text
    assert '"POST /v1/jobs HTTP/1.1" 403' in text  # and uvicorn's access line
