"""Crash recovery and retries: whatever state a gateway dies in, a restart settles every
reservation by the rule (charge after data access, refund before), exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.node.admission import JobRequest, admit_job
from gateway.node.identity import VerifiedRequest
from gateway.node.jobs import recover_interrupted_jobs
from gateway.node.node import Node
from gateway.protocol.problems import Problem
from ledger import accounting
from ledger.audit import read_entries
from ledger.canonical import sha256_digest
from ledger.models import Dataset, Job
from tests.ledger_activity import researcher, upload_model


def _admit(node: Node, principal: VerifiedRequest, digest: str, **extra) -> Job:  # type: ignore[no-untyped-def]
    body = {"dataset": "demo", "model_digest": digest, "rounds": 10, "clients_per_round": 20,
            "noise_multiplier": 1.0, "clip": 1.0, **extra}
    return admit_job(node, principal, JobRequest.from_json(body), sha256_digest(json.dumps(body).encode()))


def _spent(node: Node) -> list[str]:
    with node.session() as s:
        return json.loads(s.get(Dataset, "demo").spent_rdp)


def _job(node: Node, job_id: str) -> Job:
    with node.session() as s:
        job = s.get(Job, job_id)
    assert job is not None
    return job


def test_restart_refunds_jobs_that_never_read_data_and_charges_those_that_did(
    node_dir: Path,
) -> None:
    node = Node(node_dir)
    principal = researcher(node_dir)
    digest = upload_model(node)
    empty = _spent(node)
    queued = _admit(node, principal, digest)
    with_marker = _admit(node, principal, digest)
    flagged = _admit(node, principal, digest)
    (node.deployment.jobs_dir / with_marker.id).mkdir(parents=True)
    (node.deployment.jobs_dir / with_marker.id / "data_access").write_text("")
    with node.session() as s, s.begin():
        row = s.get(Job, flagged.id)
        row.state, row.data_accessed = "running", True
        s.add(row)
    charged_two = accounting.vector_to_json(accounting.add(
        accounting.add(accounting.vector_from_json(empty), tuple(json.loads(with_marker.cost_rdp))),
        tuple(json.loads(flagged.cost_rdp))))

    assert sorted(recover_interrupted_jobs(Node(node_dir))) == sorted(
        [queued.id, with_marker.id, flagged.id])
    assert [_job(node, j.id).budget_state for j in (queued, with_marker, flagged)] == [
        "refunded", "committed", "committed"]
    assert all(_job(node, j.id).state == "failed" for j in (queued, with_marker, flagged))
    assert _spent(node) == charged_two
    assert recover_interrupted_jobs(Node(node_dir)) == []  # idempotent
    assert _spent(node) == charged_two
    with node.session() as s:
        settled = [e for e in read_entries(s) if e["action"] in ("charge", "refund")]
    assert sorted(e["action"] for e in settled) == ["charge", "charge", "refund"]


def test_a_retried_submission_with_the_same_idempotency_key_is_charged_once(node_dir: Path) -> None:
    node = Node(node_dir)
    principal = researcher(node_dir)
    digest = upload_model(node)
    first = _admit(node, principal, digest, idempotency_key="retry-1")
    spent = _spent(node)
    again = _admit(node, principal, digest, idempotency_key="retry-1")
    assert again.id == first.id
    assert _spent(node) == spent
    with pytest.raises(Problem) as refused:
        _admit(node, principal, digest, idempotency_key="retry-1", rounds=11)
    assert refused.value.slug == "invalid-request"
    assert _spent(node) == spent
