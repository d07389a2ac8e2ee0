"""Fault injection: a failing audit write or a dropped database connection during admission
fails closed (problem+json 500) and leaves the ledger exactly as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import select
from starlette.testclient import TestClient

from gateway.api.app import create_app
from gateway.sdk.request_signing import SignedRequestAuth
from ledger.audit import read_entries
from ledger.db import make_engine, session
from ledger.models import Dataset, Job
from tests.conftest import make_node, make_researcher

FIXTURES = Path(__file__).parent / "fixtures"
JOB = {"dataset": "demo", "rounds": 10, "clients_per_round": 20, "noise_multiplier": 1.0,
       "clip": 1.0}


def _ledger_state(db_url: str) -> tuple[str, int, int]:
    engine = make_engine(db_url)
    with session(engine) as s:
        spent = s.get(Dataset, "demo").spent_rdp
        jobs = len(s.exec(select(Job)).all())
        entries = len(read_entries(s))
    engine.dispose()
    return spent, jobs, entries


def _submit(node_dir: Path, monkeypatch: pytest.MonkeyPatch, fault) -> object:  # type: ignore[no-untyped-def]
    alice = make_researcher(node_dir, "alice")
    app = create_app(node_dir)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.auth = SignedRequestAuth(alice)
        digest = client.post("/v1/models", content=(FIXTURES / "logreg-20x5.json").read_bytes(),
                             headers={"Content-Type": "application/json"}).json()["digest"]
        fault()
        return client.post("/v1/jobs", json={**JOB, "model_digest": digest})


def test_audit_log_write_failure_fails_closed_and_reserves_nothing(
    node_dir: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ledger.budget

    def disk_full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    before = None

    def inject() -> None:
        nonlocal before
        before = _ledger_state(db_url)
        monkeypatch.setattr(ledger.budget, "append_entry", disk_full)

    response = _submit(node_dir, monkeypatch, inject)
    assert response.status_code == 500
    assert response.json()["type"] == "urn:fedgate:problem:internal-error"
    assert _ledger_state(db_url) == before


@pytest.mark.postgres
def test_dropped_database_connection_mid_admission_fails_closed(
    tmp_path: Path, synthetic_table: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ledger.budget

    db_url = postgres_url
    node_dir = make_node(tmp_path / "node", synthetic_table, db_url, monkeypatch)

    real_reserve = ledger.budget.reserve_budget
    before = None

    def reserve_then_lose_connection(s, *args, **kwargs):  # type: ignore[no-untyped-def]
        job = real_reserve(s, *args, **kwargs)
        s.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return job

    def inject() -> None:
        nonlocal before
        before = _ledger_state(db_url)
        monkeypatch.setattr("gateway.node.admission.reserve_budget", reserve_then_lose_connection)

    response = _submit(node_dir, monkeypatch, inject)
    assert response.status_code == 500
    assert json.loads(response.text)["type"] == "urn:fedgate:problem:internal-error"
    assert _ledger_state(db_url) == before
