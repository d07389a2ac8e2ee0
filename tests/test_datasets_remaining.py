"""``GET /v1/datasets`` and ``fedgate datasets`` say what is left of each budget in units a
researcher understands: about how many more jobs like their own last one the filter admits
(the figure ``POST /v1/estimate`` gives as ``jobs_that_fit`` for that job; public charges only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.api.app import create_app
from gateway.cli.researcher import dataset_line
from gateway.node.jobs import JobRunner
from tests.conftest import make_researcher
from tests.test_gateway import JOB, signed_client
from tests.test_review import submit


@pytest.fixture
def no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(JobRunner, "start", lambda self, job: None)


def _demo(client) -> dict:  # type: ignore[no-untyped-def]
    [demo] = client.get("/v1/datasets").json()["datasets"]
    return demo


def test_remaining_budget_is_counted_in_jobs_like_the_researchers_last(
    node_dir: Path, no_engine: None,
) -> None:
    alice, bob = make_researcher(node_dir, "alice"), make_researcher(node_dir, "bob")
    app = create_app(node_dir)
    with signed_client(app, alice) as as_alice, signed_client(app, bob) as as_bob:
        assert _demo(as_alice)["more_like_your_last_job"] is None  # no job yet
        job = submit(as_alice, JOB).json()
        estimate = as_alice.post("/v1/estimate", json=JOB).json()
        demo = _demo(as_alice)
        assert demo["more_like_your_last_job"] == {"job_id": job["job_id"],
                                                   "jobs_that_fit": estimate["jobs_that_fit"]}
        assert estimate["jobs_that_fit"] >= 1
        assert _demo(as_bob)["more_like_your_last_job"] is None  # alice's job is not bob's
    assert dataset_line(demo).endswith(
        f"; remaining: about {estimate['jobs_that_fit']} more jobs like your last "
        f"({job['job_id']})")
