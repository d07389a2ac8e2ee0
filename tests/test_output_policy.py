"""Output policies as a specification: the owner limits how often and until when a released
result may be fetched; the gateway counts and audits every fetch, refuses past the limit with
``output-policy``, and refuses when the policy cannot be evaluated (deny by default).

The engine's output is simulated (a release of the uploaded model's shapes, settled by the
gateway's own release path), so these tests need no TensorFlow."""

from __future__ import annotations

import datetime as dt
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette

from engine.launcher import JobOutcome
from gateway.api.app import create_app
from gateway.client import verify_release
from gateway.node.jobs import JobRunner
from gateway.policy.constraints import OutputPolicy
from gateway.policy.decisions import PolicyEngine
from ledger.db import make_engine, session
from ledger.keys import load_public_key
from ledger.models import Job
from tests.conftest import make_researcher
from tests.test_gateway import JOB, audit_entries, signed_client
from tests.test_review import GRANTS, MODEL_CONF, submit, write_policy

FIXTURES = Path(__file__).parent / "fixtures"
LAST_WEEK = dt.datetime(2025, 6, 2, 9, 0, tzinfo=dt.UTC)


@pytest.fixture
def no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Admitted jobs are not started; ``release`` below settles them as the engine would."""
    monkeypatch.setattr(JobRunner, "start", lambda self, job: None)


def release(app: Starlette, client: Any, tmp_path: Path) -> str:
    """Admit a job and release it through the gateway's release gate; return its id."""
    job_id = submit(client, JOB).json()["job_id"]
    model = json.loads((FIXTURES / "logreg-20x5.json").read_bytes())
    output = tmp_path / f"{job_id}-release.json"
    output.write_text(json.dumps({"weights": model["weights"],
                                  "metrics": {"accuracy": 0.5, "loss": 1.25}}))
    app.state.runner._settle(job_id, JobOutcome(succeeded=True, data_accessed=True,
                                                release_path=output, failure=None))
    return job_id


def fetch_entries(db_url: str, job_id: str) -> list[tuple[str, Any]]:
    return [(e["action"], e.get("fetch", e.get("reason"))) for e in audit_entries(db_url)
            if e.get("job_id") == job_id and e["action"] in ("fetch", "deny")]


def test_an_output_policy_of_one_release_refuses_the_second_fetch(
    node_dir: Path, db_url: str, tmp_path: Path, no_engine: None
) -> None:
    write_policy(node_dir, "p2, researchers, owner, demo, train, max_result_fetches, 1\n")
    alice = make_researcher(node_dir, "alice")
    app = create_app(node_dir)
    with signed_client(app, alice) as client:
        job_id = release(app, client, tmp_path)
        first = client.get(f"/v1/jobs/{job_id}/result")
        second = client.get(f"/v1/jobs/{job_id}/result")
    assert first.status_code == 200
    assert verify_release(first.json(), load_public_key(node_dir / "node.pub")).job_id == job_id
    assert second.status_code == 403
    problem = second.json()
    assert problem["type"] == "urn:fedgate:problem:output-policy"
    assert "at most 1 time(s)" in problem["detail"] and "max_result_fetches, 1" in problem["detail"]
    assert problem["fetches"] == 1
    assert fetch_entries(db_url, job_id) == [("fetch", 1), ("deny", "output-policy")]


def test_without_an_output_policy_every_fetch_is_served_and_audited_with_its_number(
    node_dir: Path, db_url: str, tmp_path: Path, no_engine: None
) -> None:
    write_policy(node_dir, "")
    alice = make_researcher(node_dir, "alice")
    app = create_app(node_dir)
    with signed_client(app, alice) as client:
        job_id = release(app, client, tmp_path)
        bodies = [client.get(f"/v1/jobs/{job_id}/result").content for _ in range(3)]
    assert len(set(bodies)) == 1
    assert fetch_entries(db_url, job_id) == [("fetch", 1), ("fetch", 2), ("fetch", 3)]


def test_a_result_is_fetchable_only_for_the_days_the_policy_allows(
    node_dir: Path, db_url: str, tmp_path: Path, no_engine: None
) -> None:
    write_policy(node_dir, "p2, researchers, owner, *, train, result_available_days, 7\n")
    alice = make_researcher(node_dir, "alice")
    app = create_app(node_dir)
    with signed_client(app, alice) as client:
        fresh = release(app, client, tmp_path)
        old = release(app, client, tmp_path)
        engine = make_engine(db_url)
        with session(engine) as s, s.begin():  # as if this one had been released 8 days ago
            row = s.get(Job, old)
            assert row is not None and row.release is not None
            document = json.loads(row.release)
            eight_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=8)
            document["manifest"]["released_at"] = eight_days_ago.isoformat()
            row.release = json.dumps(document)
        engine.dispose()
        assert client.get(f"/v1/jobs/{fresh}/result").status_code == 200
        refused = client.get(f"/v1/jobs/{old}/result")
    assert refused.status_code == 403
    assert "available for 7 days after its release" in refused.json()["detail"]


def test_concurrent_fetches_never_exceed_the_limit(
    node_dir: Path, db_url: str, tmp_path: Path, no_engine: None
) -> None:
    write_policy(node_dir, "p2, researchers, owner, demo, train, max_result_fetches, 2\n")
    alice = make_researcher(node_dir, "alice")
    app = create_app(node_dir)
    with signed_client(app, alice) as client:
        job_id = release(app, client, tmp_path)

        def fetch(_: int) -> int:
            return signed_client(app, alice).get(f"/v1/jobs/{job_id}/result").status_code

        with ThreadPoolExecutor(max_workers=6) as pool:
            codes = sorted(pool.map(fetch, range(6)))
    assert codes == [200, 200, 403, 403, 403, 403]
    assert [n for action, n in fetch_entries(db_url, job_id) if action == "fetch"] == [1, 2]


def test_a_policy_that_cannot_be_evaluated_refuses_the_fetch(
    node_dir: Path, db_url: str, tmp_path: Path, no_engine: None
) -> None:
    write_policy(node_dir, "p2, researchers, owner, demo, train, max_result_fetches, 3\n")
    alice = make_researcher(node_dir, "alice")
    app = create_app(node_dir)
    with signed_client(app, alice) as client:
        job_id = release(app, client, tmp_path)
    # The policy file breaks; a gateway started now has no valid policy to apply.
    (node_dir / "policies" / "policy.csv").write_text(GRANTS + "p2, researchers, owner, demo, "
                                                      "train, max_result_fetches, lots\n")
    with signed_client(create_app(node_dir), alice) as client:
        response = client.get(f"/v1/jobs/{job_id}/result")
    assert response.status_code == 403
    assert response.json()["type"] == "urn:fedgate:problem:output-policy"
    assert "cannot be evaluated" in response.json()["detail"]
    assert fetch_entries(db_url, job_id) == [("deny", "output-policy")]


def test_the_strictest_matching_output_limits_apply() -> None:
    engine = PolicyEngine(MODEL_CONF, GRANTS
                          + "p2, researchers, owner, *, train, max_result_fetches, 5\n"
                            "p2, grads, owner, demo, *, max_result_fetches, 2\n"
                            "p2, grads, owner, demo, train, result_available_days, 30\n"
                            "p2, researchers, owner, demo, train, result_available_days, 7.5\n"
                            "p2, grads, owner, other, train, max_result_fetches, 1\n",
                          [("gina", "grads", "owner"), ("grads", "researchers", "owner")])
    policy = engine.output_policy(subject="gina", domain="owner", dataset="demo")
    assert (policy.max_fetches, policy.available_days) == (2, 7.5)
    assert "policy.csv:4" in (policy.max_fetches_rule or "")
    assert engine.output_policy(subject="bob", domain="owner", dataset="demo").max_fetches is None
    assert engine.output_policy(subject="gina", domain="other-owner", dataset="demo") == OutputPolicy()


def test_output_limits_are_compared_with_the_fetch_count_and_the_release_time() -> None:
    policy = OutputPolicy(max_fetches=1, max_fetches_rule="r1", available_days=7,
                          available_days_rule="r2")
    assert policy.refusal(fetches=0, released_at=LAST_WEEK, now=LAST_WEEK) is None
    assert "at most 1" in (policy.refusal(fetches=1, released_at=LAST_WEEK, now=LAST_WEEK) or "")
    just_before = LAST_WEEK + dt.timedelta(days=7, seconds=-1)
    assert policy.refusal(fetches=0, released_at=LAST_WEEK, now=just_before) is None
    expired = policy.refusal(fetches=0, released_at=LAST_WEEK,
                             now=LAST_WEEK + dt.timedelta(days=7))
    assert expired is not None and "until 2025-06-09 09:00 UTC" in expired
    assert OutputPolicy().refusal(fetches=10**6, released_at=LAST_WEEK, now=dt.datetime.now(dt.UTC)) is None
