"""Real ledger activity for tests, without training: admissions through
``gateway.node.admission.admit_job``, charges and refunds through ``ledger.budget``, and officer
dashboard login tokens."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gateway.node.admission import JobRequest, admit_job
from gateway.node.identity import VerifiedRequest
from gateway.node.node import Node
from gateway.protocol.problems import Problem
from ledger import keys
from ledger.budget import commit_budget, refund_budget
from ledger.canonical import sha256_digest
from ledger.models import Dataset, Job
from ledger.officer_login import IssuedToken, issue_login_token
from tests.conftest import make_researcher

FIXTURES = Path(__file__).parent / "fixtures"
DAY = 86400.0


def researcher(node_dir: Path, name: str = "alice") -> VerifiedRequest:
    key = make_researcher(node_dir, name)
    return VerifiedRequest(key_id=keys.key_id(key.public_key()), principal=name,
                           role="researcher", nonce="n", nonce_expires_at=0.0)


def upload_model(node: Node) -> str:
    body = (FIXTURES / "logreg-20x5.json").read_bytes()
    digest = sha256_digest(body)
    (node.deployment.models_dir / (digest.removeprefix("sha256:") + ".json")).write_bytes(body)
    return digest


def submit(node: Node, principal: VerifiedRequest, **fields: Any) -> Job | Problem:
    """Admit a 20-round job on ``demo`` (ε ≈ 2.17 of 4); the refusal if it is denied."""
    body = {"dataset": "demo", "model_digest": upload_model(node), "rounds": 20,
            "clients_per_round": 20, "noise_multiplier": 1.0, "clip": 1.0, **fields}
    try:
        return admit_job(node, principal, JobRequest.from_json(body),
                         sha256_digest(json.dumps(body).encode()))
    except Problem as problem:
        return problem


def settle(node: Node, job: Job, *, commit: bool) -> None:
    """Charge a job for good as a release would (state succeeded), or refund it."""
    with node.session() as s, s.begin():
        if commit:
            commit_budget(s, job.id, reason="released", actor="gateway")
        else:
            refund_budget(s, job.id, reason="failed before data access", actor="gateway")
        row = s.get(Job, job.id)
        assert row is not None
        row.state = "succeeded" if commit else "failed"
        s.add(row)


def demo_activity(node_dir: Path, *, spread_days: float = 0.0) -> dict[str, Any]:
    """Three committed jobs, one refunded, a budget denial and an unknown-dataset denial.

    With ``spread_days`` the dataset and jobs are back-dated over that many days, so a
    chart has a timeline (the audit timestamps stay real).
    """
    node = Node(node_dir)
    alice = researcher(node_dir)
    jobs = [submit(node, alice) for _ in range(2)]
    refunded = submit(node, alice)
    assert isinstance(refunded, Job)
    settle(node, refunded, commit=False)
    jobs.append(submit(node, alice))
    committed = [job for job in jobs if isinstance(job, Job)]
    assert len(committed) == 3
    for job in committed:
        settle(node, job, commit=True)
    over_budget = submit(node, alice, rounds=200)
    unknown = submit(node, alice, dataset="no-such-dataset")
    assert isinstance(over_budget, Problem) and over_budget.slug == "budget-exceeded"
    assert isinstance(unknown, Problem) and unknown.slug == "unknown-dataset"
    if spread_days:
        now = time.time()
        with node.session() as s, s.begin():
            dataset = s.get(Dataset, "demo")
            assert dataset is not None
            dataset.created_at = now - spread_days * DAY
            s.add(dataset)
            for job, age in zip([*committed, refunded], (0.85, 0.6, 0.25, 0.4), strict=True):
                row = s.get(Job, job.id)
                assert row is not None
                row.created_at = now - spread_days * DAY * age
                s.add(row)
    node.engine.dispose()
    return {"committed": committed, "refunded": refunded}


def more_datasets(node_dir: Path, table: Path) -> None:
    """Two more datasets beside ``demo``: ``wide-budget`` (ε_total 12, very large) and
    ``loose-delta`` (δ 1.5e-3, above 1/N̂^1.1 for N̂ = 480 though below 1/N̂)."""
    from gateway.cli import main as fedgate

    for name, epsilon_total, delta in (("wide-budget", "12", "1e-5"), ("loose-delta", "4", "1.5e-3")):
        assert fedgate(["-d", str(node_dir), "dataset", "import", name, str(table),
                        "--user-column", "user_id", "--label-column", "label",
                        "--epsilon-total", epsilon_total, "--delta", delta,
                        "--public-users", "480", "--num-classes", "5"]) == 0


def login_token(node_dir: Path, officer: str = "olivia", *, hours: float = 8.0,
                now: float | None = None) -> IssuedToken:
    node = Node(node_dir)
    with node.session() as s, s.begin():
        issued = issue_login_token(s, officer=officer, hours=hours, actor="owner-cli",
                                   now=time.time() if now is None else now)
    node.engine.dispose()
    return issued
