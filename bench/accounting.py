"""Admission cost versus the number of prior jobs on a dataset (target: flat).

The Rényi filter keeps a running RDP vector per dataset, so admission reads one row and
does O(k) exact arithmetic, whatever the number of prior jobs. Measured: the pure filter
check (``budget_fit``) and the whole reservation transaction (lock, check, update, audit
append, commit) on SQLite, with 10, 1,000 and 10,000 prior jobs. The baseline is the
same measurement with 10 prior jobs, in the same run.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from ledger import accounting
from ledger.budget import budget_fit, register_dataset, reserve_budget
from ledger.db import create_schema, make_engine, session
from ledger.models import Dataset, Job
from ledger.public_count import declared_count

COST = accounting.JobCost.for_job(sampling_rate=0.01, noise_multiplier=1.0, rounds=100,
                                  evaluation_noise_multiplier=10.0)


def _job() -> Job:
    now = time.time()
    return Job(id="job-" + uuid.uuid4().hex[:16], dataset="ds", researcher_key_id="k-1",
               researcher="alice", request_digest="sha256:x", model_digest="sha256:y", spec="{}",
               cost=json.dumps(COST.to_json()), cost_rdp="[]", epsilon=1.0, delta=1e-6,
               state="succeeded", budget_state="committed", rounds=100, policy_version="v",
               created_at=now, updated_at=now)


def _prepare(path: Path, prior_jobs: int):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{path}")
    create_schema(engine)
    cost_rdp = COST.rdp(accounting.FILTER_ORDERS)
    with session(engine) as s, s.begin():
        dataset = register_dataset(s, name="ds", owner="o", path="/x", training_users=100_000,
                                   evaluation_users=20_000,
                         public_users=declared_count(100_000), num_features=10, num_classes=2,
                                   epsilon_total=1e9, delta=1e-6, actor="bench")
        spent = accounting.zero(accounting.FILTER_ORDERS)
        for _ in range(prior_jobs):
            spent = accounting.add(spent, cost_rdp)
            s.add(_job())
        dataset.spent_rdp = json.dumps(accounting.vector_to_json(spent))
        s.add(dataset)
    return engine, cost_rdp


def measure(prior_jobs: int, repeats: int = 200) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        engine, cost_rdp = _prepare(Path(tmp) / "bench.db", prior_jobs)
        with session(engine) as s:
            dataset = s.get(Dataset, "ds")
        check_times = []
        for _ in range(repeats):
            start = time.perf_counter()
            budget_fit(dataset, cost_rdp)
            check_times.append(time.perf_counter() - start)
        reserve_times = []
        for _ in range(repeats // 4):
            start = time.perf_counter()
            with session(engine) as s, s.begin():
                reserve_budget(s, _job(), cost_rdp, {"actor": "bench"})
            reserve_times.append(time.perf_counter() - start)
        engine.dispose()
    return {
        "prior_jobs": prior_jobs,
        "filter_check_ms": statistics.median(check_times) * 1e3,
        "reserve_transaction_ms": statistics.median(reserve_times) * 1e3,
    }


def run() -> str:
    rows = [measure(n) for n in (10, 1_000, 10_000)]
    base = rows[0]
    lines = [
        "## Admission accounting versus prior jobs",
        "",
        "`python -m bench.run accounting` — median of 200 filter checks and 50 reservation "
        "transactions (SQLite, WAL, synchronous=FULL), ratio to the 10-job baseline.",
        "",
        "| prior jobs | filter check (ms) | ratio | reserve transaction (ms) | ratio |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['prior_jobs']:,} | {row['filter_check_ms']:.3f} | "
            f"{row['filter_check_ms'] / base['filter_check_ms']:.2f}× | "
            f"{row['reserve_transaction_ms']:.2f} | "
            f"{row['reserve_transaction_ms'] / base['reserve_transaction_ms']:.2f}× |"
        )
    return "\n".join(lines) + "\n"
