"""The budget ledger: reservations against the Rényi filter are exact, atomic and
durable — on SQLite and on PostgreSQL, across processes."""

from __future__ import annotations

import json
import multiprocessing
import time
import uuid
from fractions import Fraction

from ledger import accounting
from ledger.budget import (
    BudgetExceeded,
    commit_budget,
    refund_budget,
    register_dataset,
    reserve_budget,
)
from ledger.db import create_schema, make_engine, session
from ledger.models import Dataset, Job
from ledger.public_count import declared_count

COST = accounting.JobCost.for_job(sampling_rate=0.01, noise_multiplier=1.0, rounds=1000,
                                  evaluation_noise_multiplier=None)


def _setup(db_url: str, epsilon_total: float = 8.0, delta: float = 1e-6) -> None:
    engine = make_engine(db_url)
    create_schema(engine)
    with session(engine) as s, s.begin():
        register_dataset(s, name="ds", owner="owner", path="/nonexistent", training_users=10_000,
                         evaluation_users=2_000,
                         public_users=declared_count(10_000), num_features=3, num_classes=2,
                         epsilon_total=epsilon_total, delta=delta, actor="test")
    engine.dispose()


def _job(epsilon: float = 1.0) -> Job:
    now = time.time()
    return Job(id="job-" + uuid.uuid4().hex[:16], dataset="ds", researcher_key_id="k-1",
               researcher="alice", request_digest="sha256:x", model_digest="sha256:y", spec="{}",
               cost=json.dumps(COST.to_json()), cost_rdp="[]", epsilon=epsilon, delta=1e-6,
               state="queued", budget_state="reserved", rounds=1000, policy_version="v",
               created_at=now, updated_at=now)


def _try_reserve(db_url: str, attempts: int) -> int:
    """Worker: attempt ``attempts`` admissions; return how many were admitted."""
    engine = make_engine(db_url)
    cost_rdp = COST.rdp(accounting.FILTER_ORDERS)
    admitted = 0
    for _ in range(attempts):
        try:
            with session(engine) as s, s.begin():
                reserve_budget(s, _job(), cost_rdp, {"actor": "k-1"})
            admitted += 1
        except BudgetExceeded:
            pass
    engine.dispose()
    return admitted


def _spent(db_url: str) -> str:
    engine = make_engine(db_url)
    with session(engine) as s:
        spent = s.get(Dataset, "ds").spent_rdp
    engine.dispose()
    return spent


def test_the_worked_figure_admits_exactly_nine_identical_jobs(db_url: str) -> None:
    _setup(db_url)
    assert _try_reserve(db_url, 12) == 9


def test_concurrent_admissions_from_several_processes_never_overspend(db_url: str) -> None:
    _setup(db_url)
    context = multiprocessing.get_context("spawn")
    with context.Pool(8) as pool:  # 200 admissions from 8 processes
        admitted = sum(pool.starmap(_try_reserve, [(db_url, 25)] * 8))
    assert admitted == 9
    engine = make_engine(db_url)
    with session(engine) as s:
        dataset = s.get(Dataset, "ds")
        spent = accounting.vector_from_json(json.loads(dataset.spent_rdp))
        budget = accounting.vector_from_json(json.loads(dataset.filter_budget))
    engine.dispose()
    assert any(sp <= b for sp, b in zip(spent, budget, strict=True))


def test_refund_restores_the_filter_exactly_and_commit_keeps_the_charge(db_url: str) -> None:
    _setup(db_url)
    before = _spent(db_url)
    engine = make_engine(db_url)
    cost_rdp = COST.rdp(accounting.FILTER_ORDERS)
    with session(engine) as s, s.begin():
        refunded = reserve_budget(s, _job(), cost_rdp, {"actor": "k-1"})
        kept = reserve_budget(s, _job(), cost_rdp, {"actor": "k-1"})
    with session(engine) as s, s.begin():
        refund_budget(s, refunded.id, reason="failed before data access", actor="node")
        commit_budget(s, kept.id, reason="released", actor="node")
    engine.dispose()
    one_job = accounting.vector_to_json(accounting.add(
        accounting.vector_from_json(json.loads(before)), cost_rdp))
    assert json.loads(_spent(db_url)) == one_job


def test_a_job_that_read_data_cannot_be_refunded(db_url: str) -> None:
    import pytest

    from ledger.budget import LedgerError

    _setup(db_url)
    engine = make_engine(db_url)
    with session(engine) as s, s.begin():
        job = reserve_budget(s, _job(), COST.rdp(accounting.FILTER_ORDERS), {"actor": "k-1"})
        job.data_accessed = True
        s.add(job)
    with pytest.raises(LedgerError), session(engine) as s, s.begin():
        refund_budget(s, job.id, reason="x", actor="node")
    engine.dispose()


def test_the_running_epsilon_total_is_the_sum_over_the_researchers_charged_jobs(
    db_url: str,
) -> None:
    import datetime as dt

    from sqlalchemy import delete

    from gateway.policy.ledger_inputs import researcher_epsilon_spent
    from ledger.models import ResearcherEpsilon

    _setup(db_url, epsilon_total=1e6)
    engine = make_engine(db_url)
    cost_rdp = COST.rdp(accounting.FILTER_ORDERS)
    with session(engine) as s, s.begin():
        legacy = reserve_budget(s, _job(0.1), cost_rdp, {"actor": "k-1"})
        s.execute(delete(ResearcherEpsilon))  # a ledger from before the running totals
    jobs = []
    for epsilon in (0.2, 0.3, 0.7):
        with session(engine) as s, s.begin():
            jobs.append(reserve_budget(s, _job(epsilon), cost_rdp, {"actor": "k-1"}))
    with session(engine) as s, s.begin():
        refund_budget(s, jobs[1].id, reason="failed before data access", actor="node")
        commit_budget(s, jobs[2].id, reason="released", actor="node")
        refund_budget(s, legacy.id, reason="failed before data access", actor="node")

    def spent(window: dt.timedelta) -> float:
        with engine.connect() as c:
            return researcher_epsilon_spent(c, researcher="alice", dataset="ds",
                                            since=dt.datetime.now(dt.UTC) - window)

    with session(engine) as s:
        running = s.get(ResearcherEpsilon, ("ds", "alice"))
    assert running is not None and running.epsilon == str(Fraction(0.2) + Fraction(0.7))
    assert spent(dt.timedelta(days=1)) == float(Fraction(0.2) + Fraction(0.7))  # the running total
    assert spent(dt.timedelta(0)) == 0.0  # a window after every job: summed over the jobs
    engine.dispose()
