"""Compute quotas from the owner's policy: typed rows, checked at admission in the reservation
transaction, refusing with ``quota-exceeded`` and reserving nothing."""

from __future__ import annotations

import asyncio
import json
import threading
from decimal import Decimal
from pathlib import Path

import pytest
from sqlmodel import select

from engine.launcher import JobOutcome
from engine.meter import ResourceUsage
from gateway.node.admission import JobRequest, admit_job
from gateway.node.jobs import JobRunner
from gateway.node.node import Node
from gateway.policy.decisions import PolicyEngine
from gateway.policy.rows import PolicyInvalid
from gateway.protocol.problems import Problem
from ledger.audit import read_entries
from ledger.models import Dataset, Job, JobMeter
from tests.ledger_activity import researcher, submit, upload_model
from tests.test_billing import _with_prices

ROOT = Path(__file__).resolve().parent.parent
MODEL = (ROOT / "policies" / "model.conf").read_text()
GRANTS = ("p, researchers, clinic, *, train, allow\n"
          "g, alice, researchers, clinic\ng, bob, researchers, clinic\n")
HOUR = 3600.0
SMALL = {"rounds": 2}  # ε ≈ 1.6 of the demo's 4: several fit, so only quotas refuse


def _quota_rows(node_dir: Path, *rows: str) -> None:
    policy = Node(node_dir).deployment.policy_file
    policy.write_text(policy.read_text() + "".join(f"p2, {row}\n" for row in rows))


def _settle(node: Node, job: Job, cpu_seconds: float = 360.0, *, read_user_data: bool = True) -> None:
    """Settle ``job`` as a failure after (or, ``read_user_data`` False, before) reading data."""
    usage = ResourceUsage(cpu_seconds=cpu_seconds, cpu_user_seconds=cpu_seconds,
                          cpu_system_seconds=0.0, cpu_sampled_seconds=cpu_seconds,
                          wall_seconds=cpu_seconds, max_rss_bytes=10**8, peak_tree_rss_bytes=10**8)
    JobRunner(node)._settle(job.id, JobOutcome(False, read_user_data, None, "engine exited",
                                               usage=usage))


def _spent_rdp(node: Node) -> str:
    with node.session() as s:
        dataset = s.get(Dataset, "demo")
        assert dataset is not None
        return dataset.spent_rdp


def test_quota_rows_are_typed_and_a_bad_value_is_refused_at_load_time() -> None:
    engine = PolicyEngine(MODEL, GRANTS + "p2, alice, clinic, *, train, max_concurrent_jobs, 2\n"
                          "p2, researchers, clinic, icu*, *, max_cpu_hours_per_month, 12.5\n"
                          "p2, researchers, clinic, *, train, max_spend_per_month, 25.10\n")
    quotas = {q.name: q for q in engine.quotas(subject="alice", domain="clinic", dataset="icu-notes")}
    assert quotas["max_concurrent_jobs"].limit == 2 and quotas["max_concurrent_jobs"].members == ("alice",)
    assert quotas["max_cpu_hours_per_month"].limit == 12.5
    assert quotas["max_spend_per_month"].limit == Decimal("25.10")
    assert quotas["max_spend_per_month"].members == ("alice", "bob", "researchers")  # one pool
    assert {q.name for q in engine.quotas(subject="alice", domain="clinic", dataset="notes")} == {
        "max_concurrent_jobs", "max_spend_per_month"}
    assert engine.decide(subject="alice", domain="clinic", dataset="notes", action="train").allowed
    for bad in ("max_concurrent_jobs, 0", "max_cpu_hours_per_month, -1", "max_spend_per_month, 1e3",
                "max_spend_per_month, 5 EUR"):
        with pytest.raises(PolicyInvalid, match=bad.split(",")[0]):
            PolicyEngine(MODEL, GRANTS + f"p2, alice, clinic, *, train, {bad}\n")


def test_concurrent_job_quota_refuses_with_a_clear_reason_and_reserves_nothing(
        node_dir: Path) -> None:
    _quota_rows(node_dir, "alice, owner, *, train, max_concurrent_jobs, 1")
    node = Node(node_dir)
    alice = researcher(node_dir, "alice")
    first = submit(node, alice, **SMALL)
    assert isinstance(first, Job)
    spent = _spent_rdp(node)
    refused = submit(node, alice, **SMALL)
    assert isinstance(refused, Problem) and refused.slug == "quota-exceeded"
    assert refused.status == 429
    assert refused.extra | {"rule": ""} == {"quota": "max_concurrent_jobs", "limit": "1", "used": "1",
                                            "requested": "1", "unit": "jobs", "rule": ""}
    assert "max_concurrent_jobs = 1 jobs" in refused.detail and "wait for one to finish" in refused.detail
    assert _spent_rdp(node) == spent  # the refused job's budget reservation was rolled back
    with node.session() as s:
        # reviewed: SQLModel query object, not Python exec
        assert len(s.exec(select(JobMeter)).all()) == 1
        deny = read_entries(s)[-1]
    assert deny["action"] == "deny" and deny["reason"] == "quota-exceeded"
    assert deny["explanation"] == refused.detail
    assert isinstance(submit(node, researcher(node_dir, "bob"), **SMALL), Job)  # alice's quota only
    _settle(node, first)
    assert isinstance(submit(node, alice, **SMALL), Job)  # a slot freed when the job ended


def test_a_group_quota_is_one_pool_shared_by_its_members(node_dir: Path) -> None:
    _quota_rows(node_dir, "researchers, owner, *, train, max_concurrent_jobs, 1")
    node = Node(node_dir)
    assert isinstance(submit(node, researcher(node_dir, "alice"), **SMALL), Job)
    refused = submit(node, researcher(node_dir, "bob"), **SMALL)
    assert isinstance(refused, Problem) and refused.slug == "quota-exceeded"
    assert "shared by group researchers" in refused.detail


def test_monthly_cpu_quota_counts_a_job_that_read_data_at_its_reservation_not_its_use(
        node_dir: Path) -> None:
    # Each job reserves the node's per-job CPU limit (4 CPU-hours by default).
    _quota_rows(node_dir, "alice, owner, *, train, max_cpu_hours_per_month, 10")
    node = Node(node_dir)
    alice = researcher(node_dir, "alice")
    jobs = [submit(node, alice, **SMALL) for _ in range(2)]
    assert all(isinstance(job, Job) for job in jobs)
    refused = submit(node, alice, **SMALL)
    assert isinstance(refused, Problem) and refused.slug == "quota-exceeded"
    assert (refused.extra["used"], refused.extra["requested"], refused.extra["limit"]) == ("8", "4", "10")
    assert "CPU-hours" in refused.detail and "until" in refused.detail, refused.detail
    with node.session() as s:
        meters = [s.get(JobMeter, job.id) for job in jobs if isinstance(job, Job)]
    assert [m.cpu_reserved_seconds for m in meters if m] == [4 * HOUR, 4 * HOUR]
    first, second = jobs
    assert isinstance(first, Job) and isinstance(second, Job)
    # It read user data: what it used (0.5 h) depends on the data, so it stays billed at 4 h.
    _settle(node, first, cpu_seconds=0.5 * HOUR)
    still = submit(node, alice, **SMALL)
    assert isinstance(still, Problem) and still.extra == refused.extra
    # It failed before reading user data: its unused 3.5 h are released.
    _settle(node, second, cpu_seconds=0.5 * HOUR, read_user_data=False)
    assert isinstance(submit(node, alice, **SMALL), Job)  # 4 + 0.5 + 4 ≤ 10
    again = submit(node, alice, **SMALL)
    assert isinstance(again, Problem) and again.extra["used"] == "8.5"


def test_monthly_spend_quota_counts_charges_and_projected_costs(node_dir: Path) -> None:
    _with_prices(node_dir, '[billing]\ncurrency = "EUR"\nper_cpu_hour = 0.25\nper_job = 0.1\n')
    _quota_rows(node_dir, "alice, owner, *, train, max_spend_per_month, 2.00")
    node = Node(node_dir)
    alice = researcher(node_dir, "alice")
    first = submit(node, alice, **SMALL)
    assert isinstance(first, Job), first.detail
    refused = submit(node, alice, **SMALL)  # projected: 4 CPU-hours × 0.25 + 0.1 per job
    assert isinstance(refused, Problem) and refused.slug == "quota-exceeded"
    assert refused.extra | {"rule": ""} == {"quota": "max_spend_per_month", "limit": "2.00",
                                            "used": "1.100000", "requested": "1.100000",
                                            "unit": "EUR", "month": refused.extra["month"], "rule": ""}
    _settle(node, first, cpu_seconds=360.0)  # read data: charged the projected 1.1, not 0.125
    still = submit(node, alice, **SMALL)
    assert isinstance(still, Problem) and still.extra == refused.extra


def test_a_spend_quota_without_a_price_list_never_refuses(node_dir: Path) -> None:
    _quota_rows(node_dir, "alice, owner, *, train, max_spend_per_month, 0")
    node = Node(node_dir)
    assert isinstance(submit(node, researcher(node_dir, "alice"), **SMALL), Job)


def test_concurrent_admissions_never_jointly_exceed_a_quota(node_dir: Path) -> None:
    _quota_rows(node_dir, "alice, owner, *, train, max_concurrent_jobs, 2")
    node = Node(node_dir)
    alice = researcher(node_dir, "alice")
    body = {"dataset": "demo", "model_digest": upload_model(node), "rounds": 2,
            "clients_per_round": 20, "noise_multiplier": 1.0, "clip": 1.0}
    node.policy()
    results: list[Job | Problem] = []
    barrier = threading.Barrier(5)

    def admit() -> None:
        barrier.wait()
        try:
            results.append(admit_job(node, alice, JobRequest.from_json(body), "sha256:" + "1" * 64))
        except Problem as problem:
            results.append(problem)

    threads = [threading.Thread(target=admit) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(isinstance(r, Job) for r in results) == 2
    assert sorted(r.slug for r in results if isinstance(r, Problem)) == ["quota-exceeded"] * 3
    with node.session() as s:
        denies = [e for e in read_entries(s) if e["action"] == "deny"]
    assert len(denies) == 3 and all(json.dumps(e).count("max_concurrent_jobs") for e in denies)


def test_over_http_a_waiting_job_shows_its_queue_position_and_a_quota_refusal_is_429(
        node_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.testclient import TestClient

    from gateway.api.app import create_app
    from gateway.sdk.request_signing import SignedRequestAuth
    from tests.conftest import make_researcher

    async def engine_that_keeps_running(self: JobRunner, job_id: str) -> None:
        await asyncio.sleep(3600)  # cancelled when the app shuts down

    monkeypatch.setattr(JobRunner, "_run", engine_that_keeps_running)
    config = Node(node_dir).deployment.config_path
    config.write_text(config.read_text().replace("max_concurrent_jobs = 2", "max_concurrent_jobs = 1"))
    _quota_rows(node_dir, "alice, owner, *, train, max_concurrent_jobs, 2")
    body = {"dataset": "demo", "rounds": 2, "clients_per_round": 20, "noise_multiplier": 1.0,
            "clip": 1.0, "model_digest": upload_model(Node(node_dir))}
    with TestClient(create_app(node_dir)) as client:
        client.auth = SignedRequestAuth(make_researcher(node_dir, "alice"))
        running = client.post("/v1/jobs", json=body).json()
        waiting = client.post("/v1/jobs", json=body)
        refused = client.post("/v1/jobs", json=body)
        status = client.get(f"/v1/jobs/{waiting.json()['job_id']}").json()
    assert "queue_position" not in running
    assert waiting.status_code == 202 and waiting.json()["queue_position"] == 1
    assert status["state"] == "queued" and status["queue_position"] == 1
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"] == "urn:fedgate:problem:quota-exceeded"
    assert refused.json()["quota"] == "max_concurrent_jobs" and refused.json()["used"] == "2"


def test_one_researcher_cannot_flood_the_node_with_jobs_by_default(node_dir: Path) -> None:
    """Issue 22: no default cap on concurrent jobs — 11,507 cheap jobs "fit" the budget. A new
    node runs at most 2 jobs at once and admits at most ``max_jobs_per_researcher`` unfinished
    jobs per researcher (node caps, checked in the admission transaction like quotas)."""
    config = Node(node_dir).config
    assert config.max_concurrent_jobs == 2 and config.max_jobs_per_researcher == 8
    toml = Node(node_dir).deployment.config_path
    toml.write_text(toml.read_text().replace("max_jobs_per_researcher = 8",
                                             "max_jobs_per_researcher = 2"))
    node = Node(node_dir)
    alice = researcher(node_dir, "alice")
    cheap = {"rounds": 1, "noise_multiplier": 20.0}
    admitted = [submit(node, alice, **cheap) for _ in range(2)]
    assert all(isinstance(job, Job) for job in admitted)
    refused = submit(node, alice, **cheap)
    assert isinstance(refused, Problem) and refused.slug == "quota-exceeded", refused
    assert refused.extra["rule"] == "[engine] max_jobs_per_researcher"
    assert isinstance(submit(node, researcher(node_dir, "bob"), **cheap), Job)  # per researcher
    _settle(node, admitted[0])
    assert isinstance(submit(node, alice, **cheap), Job)
