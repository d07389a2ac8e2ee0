"""Policy constraints at the gateway: admission states the job's real parameters (projected
ε, model family and size, the researcher's ε in the ledger), and a constraint denial comes
back as problem+json ``policy-denied`` naming the rule and the fix, and is audited."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from sqlalchemy import event
from starlette.testclient import TestClient

from gateway.api.app import create_app
from ledger.db import make_engine, session
from ledger.models import Job
from tests.conftest import make_researcher
from tests.test_gateway import JOB, audit_entries, signed_client

FIXTURES = Path(__file__).parent / "fixtures"
GRANTS = "p, researchers, owner, *, estimate, allow\np, researchers, owner, *, train, allow\n"


def write_policy(node_dir: Path, constraints: str) -> None:
    (node_dir / "policies" / "policy.csv").write_text(GRANTS + constraints)


def upload(client: TestClient) -> str:
    response = client.post("/v1/models", content=(FIXTURES / "logreg-20x5.json").read_bytes(),
                           headers={"Content-Type": "application/json"})
    return response.json()["digest"]


def test_a_job_below_the_noise_floor_is_refused_with_the_rule_and_the_fix(
    node_dir: Path, db_url: str
) -> None:
    write_policy(node_dir, "p2, researchers, owner, demo, train, min_noise_multiplier, 1.0\n")
    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as client:
        response = client.post("/v1/jobs", json={**JOB, "noise_multiplier": 0.8,
                                                 "model_digest": upload(client)})
    assert response.status_code == 403
    problem = response.json()
    assert problem["type"] == "urn:fedgate:problem:policy-denied"
    assert ("rule 'p2, researchers, owner, demo, train, min_noise_multiplier, 1.0' (policy.csv:3) "
            "requires noise_multiplier ≥ 1; you asked 0.8") in problem["detail"]
    assert problem["rule"] == ["p2", "researchers", "owner", "demo", "train",
                               "min_noise_multiplier", "1.0"]
    denial = [e for e in audit_entries(db_url) if e["action"] == "deny"][-1]
    assert denial["reason"] == "policy-denied"
    assert denial["parameters"]["noise_multiplier"] == 0.8
    assert "noise_multiplier ≥ 1" in denial["explanation"]


def test_model_constraints_read_the_uploaded_artifact(node_dir: Path) -> None:
    write_policy(node_dir, "p2, researchers, owner, *, *, allowed_model_families, keras-functional\n"
                           "p2, researchers, owner, *, *, max_model_parameters, 50\n")
    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as client:
        response = client.post("/v1/jobs", json={**JOB, "model_digest": upload(client)})
        estimate = client.post("/v1/estimate", json=JOB)  # an estimate states no model
    detail = response.json()["detail"]
    assert "allows only keras-functional models; yours is keras-sequential" in detail
    assert "requires model_parameters ≤ 50; you asked 105" in detail
    assert estimate.status_code == 200


def test_the_researchers_epsilon_in_the_window_comes_from_the_ledger(
    node_dir: Path, db_url: str
) -> None:
    write_policy(node_dir, "p2, researchers, owner, demo, *, max_epsilon_per_researcher, 2 per 30d\n")
    alice = make_researcher(node_dir, "alice")
    engine = make_engine(db_url)
    with session(engine) as s, s.begin():
        now = time.time()
        s.add(Job(id="job-earlier", dataset="demo", researcher_key_id="k", researcher="alice",
                  request_digest="d", model_digest="m", spec="{}", cost="{}", cost_rdp="[]",
                  epsilon=1.95, delta=1e-5, state="succeeded", budget_state="committed",
                  rounds=10, policy_version="v", created_at=now - 86400, updated_at=now))
    engine.dispose()
    with signed_client(create_app(node_dir), alice) as client:
        response = client.post("/v1/estimate", json=JOB)
    assert response.status_code == 403
    detail = response.json()["detail"]
    assert "allows each researcher ε ≤ 2 on this dataset per 30 days" in detail
    assert "you have 1.95 reserved or spent in that window" in detail
    assert "a job with ε ≤ 0.05 fits now" in detail


def test_the_dataset_and_the_researchers_epsilon_are_read_in_one_snapshot(node_dir: Path) -> None:
    write_policy(node_dir, "p2, researchers, owner, demo, *, max_epsilon_per_researcher, 50 per 30d\n"
                           "p2, researchers, owner, demo, *, max_epsilon_per_researcher, 90 per 365d\n")
    alice = make_researcher(node_dir, "alice")
    app = create_app(node_dir)
    statements: list[tuple[int, int, int, str]] = []  # thread, connection, transaction, SQL

    with signed_client(app, alice) as client:
        model_digest = upload(client)

        @event.listens_for(app.state.node.read_engine, "before_cursor_execute")
        def note(connection, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
            statements.append((threading.get_ident(), id(connection.connection.dbapi_connection),
                               id(connection.get_transaction()), statement))

        response = client.post("/v1/jobs", json={**JOB, "model_digest": model_digest})
    assert response.status_code == 202, response.text
    # The admission's reads: its thread's statements before the reservation locks the dataset
    # (on PostgreSQL the writer uses the same engine; on SQLite it has its own).
    first = next(i for i, (*_, sql) in enumerate(statements) if re.search(r"\bFROM dataset\b", sql))
    thread = statements[first][0]
    reads = []
    for entry in statements[first:]:
        if "FOR UPDATE" in entry[3]:
            break
        if entry[0] == thread:
            reads.append(entry)
    assert sum("FROM researcherepsilon" in sql for *_, sql in reads) == 2  # both windows
    assert len({(connection, transaction) for _, connection, transaction, _ in reads}) == 1
