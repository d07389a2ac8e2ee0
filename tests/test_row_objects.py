"""``ledger.row_objects``: a table-model object built from a complete row is the object the
model's constructor builds, without its per-attribute cost; a row that names a column the model
lacks, or lacks one without a default, is refused."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import make_transient_to_detached

from ledger.models import Dataset, Job, JobReview
from ledger.row_objects import row_object, row_values

JOB = dict(id="job-1", dataset="demo", researcher_key_id="k1", researcher="alice",
           request_digest="sha256:" + "1" * 64, model_digest="sha256:" + "2" * 64, spec="{}",
           cost="{}", cost_rdp="[]", epsilon=1.5, delta=1e-5, state="queued",
           budget_state="reserved", rounds=10, policy_version="sha256:" + "3" * 64,
           created_at=1.0, updated_at=2.0)


def test_a_row_object_is_the_object_the_constructor_builds() -> None:
    built, constructed = row_object(Job, JOB), Job(**JOB)
    assert built.model_dump() == constructed.model_dump()
    assert built.round == 0 and built.failure is None  # the model's defaults
    review = dict(job_id="job-1", state="pending", required_because="always",
                  policy_explanation="p2", requested_at=1.0, expires_at=2.0)
    assert row_object(JobReview, review).model_dump() == JobReview(**review).model_dump()


def test_a_row_object_changes_and_attaches_like_a_loaded_row() -> None:
    job = row_object(Job, JOB)
    job.state = "pending_review"  # instrumented attributes still work
    assert job.state == "pending_review"
    make_transient_to_detached(job)  # the identity comes from the row's key
    assert job.id == "job-1"


def test_a_row_naming_an_unknown_column_or_missing_a_required_one_is_refused() -> None:
    with pytest.raises(TypeError, match=r"unknown columns \['epsilon_total_typo'\]"):
        row_object(Job, {**JOB, "epsilon_total_typo": 1.0})
    without_dataset = {k: v for k, v in JOB.items() if k != "dataset"}
    with pytest.raises(TypeError, match=r"missing \['dataset'\]"):
        row_values(Job, without_dataset)
    with pytest.raises(TypeError, match="missing"):
        row_object(Dataset, {"name": "demo"})


def test_a_fetched_row_leaves_out_columns_the_model_lacks_and_none_is_none() -> None:
    """``fetch_row_object`` reads a driver cursor of ``SELECT *``: a column added to the
    table but not to the model (a newer schema) is left out; no row is None."""
    import sqlite3

    from ledger.row_objects import fetch_row_object

    db = sqlite3.connect(":memory:")
    columns = ", ".join(JOB)
    db.execute(f"CREATE TABLE job ({columns}, round, failure, data_accessed, release, extra)")
    db.execute(f"INSERT INTO job VALUES ({', '.join('?' * (len(JOB) + 5))})",
               (*JOB.values(), 0, None, False, None, "newer schema"))
    job = fetch_row_object(Job, db.execute("SELECT * FROM job"))
    assert job is not None and job.id == "job-1" and "extra" not in job.__dict__
    assert fetch_row_object(Job, db.execute("SELECT * FROM job WHERE id = 'none'")) is None
