"""kill -9 at each lifecycle stage, then restart: every reservation ends charged (data was
read) or refunded (it was not), exactly once, and the audit log still verifies."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from sqlmodel import select

from gateway.cli import main as fedgate
from gateway.cli.process import start_gateway, stop_gateway
from gateway.client import Client
from ledger import accounting
from ledger.db import make_engine, session
from ledger.models import Dataset, Job
from tests.conftest import make_researcher
from tests.test_end_to_end import sqlite_node  # noqa: F401  (fixture)

pytestmark = pytest.mark.tff
FIXTURES = Path(__file__).parent / "fixtures"
LONG_JOB = {"rounds": 400, "clients_per_round": 20, "noise_multiplier": 5.0, "clip": 1.0}


def _runner_pids(job_id: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if b"engine.runner" in cmdline and job_id.encode() in cmdline and state != "Z":
                pids.append(int(proc.name))
    return pids


def _wait(predicate, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _ledger(node: Path) -> tuple[dict[str, Job], list[str]]:
    engine = make_engine(f"sqlite:///{node / 'fedgate.db'}")
    with session(engine) as s:
        jobs = {j.id: j for j in s.exec(select(Job)).all()}
        spent = json.loads(s.get(Dataset, "demo").spent_rdp)
    engine.dispose()
    return jobs, spent


def _expected_spent(jobs: dict[str, Job]) -> list[str]:
    total = accounting.zero(accounting.FILTER_ORDERS)
    for job in jobs.values():
        if job.budget_state in ("reserved", "committed"):
            total = accounting.add(total, tuple(json.loads(job.cost_rdp)))
    return accounting.vector_to_json(total)


def _submit(client: Client) -> str:
    digest = client.upload_model((FIXTURES / "logreg-20x5.json").read_bytes())
    return client.submit("demo", digest, **LONG_JOB).id


def _audit_verifies(node: Path, tmp_path: Path) -> bool:
    export = tmp_path / "audit.json"
    assert fedgate(["-d", str(node), "audit", "checkpoint"]) == 0
    assert fedgate(["-d", str(node), "audit", "export", "--out", str(export)]) == 0
    return fedgate(["audit", "verify", str(export), "--node-key", str(node / "node.pub")]) == 0


def test_engine_killed_mid_round_fails_the_job_and_charges_it(
    sqlite_node: Path, tmp_path: Path  # noqa: F811
) -> None:
    alice = make_researcher(sqlite_node, "alice")
    url, gateway = start_gateway(sqlite_node, log_path=tmp_path / "gateway.log")
    try:
        client = Client(url, key=alice, node_public_key=sqlite_node / "node.pub")
        job_id = _submit(client)
        _wait(lambda: client._get(f"/v1/jobs/{job_id}")["round"] >= 1)
        for pid in _runner_pids(job_id):
            os.kill(pid, signal.SIGKILL)
        _wait(lambda: client._get(f"/v1/jobs/{job_id}")["state"] == "failed")
        status = client._get(f"/v1/jobs/{job_id}")
        assert status["budget"] == "committed"
        assert client._http.get("/healthz").status_code == 200
    finally:
        stop_gateway(gateway)
    jobs, spent = _ledger(sqlite_node)
    assert spent == _expected_spent(jobs)
    assert _audit_verifies(sqlite_node, tmp_path)


@pytest.mark.parametrize("stage", ["before-data-access", "mid-round"])
def test_gateway_killed_then_restarted_settles_the_job_exactly_once(
    sqlite_node: Path, tmp_path: Path, stage: str  # noqa: F811
) -> None:
    alice = make_researcher(sqlite_node, "alice")
    url, gateway = start_gateway(sqlite_node, log_path=tmp_path / "gateway.log")
    client = Client(url, key=alice, node_public_key=sqlite_node / "node.pub")
    job_id = _submit(client)
    if stage == "mid-round":
        _wait(lambda: client._get(f"/v1/jobs/{job_id}")["round"] >= 1)
    os.killpg(gateway.pid, signal.SIGKILL)
    gateway.wait()
    _wait(lambda: _runner_pids(job_id) == [], timeout=30)  # the engine dies with its gateway
    marker = sqlite_node / "jobs" / job_id / "data_access"
    jobs, _ = _ledger(sqlite_node)
    assert jobs[job_id].budget_state == "reserved"  # the crash left it unsettled

    _, restarted = start_gateway(sqlite_node, log_path=tmp_path / "gateway.log")
    stop_gateway(restarted)
    _, again = start_gateway(sqlite_node, log_path=tmp_path / "gateway.log")
    stop_gateway(again)
    jobs, spent = _ledger(sqlite_node)
    assert jobs[job_id].state == "failed"
    assert jobs[job_id].budget_state == ("committed" if marker.exists() else "refunded")
    if stage == "mid-round":
        assert jobs[job_id].budget_state == "committed"
    assert spent == _expected_spent(jobs)
    assert _audit_verifies(sqlite_node, tmp_path)
