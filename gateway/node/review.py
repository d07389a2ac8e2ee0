"""Owner review on a node: what the owner inspects, and the gateway's part of the workflow.

The state machine and its budget invariants live in ``ledger.review``: a held job keeps its
reservation until it is approved (then it runs and the data-access rule settles it) or denied,
expires or is withdrawn (then it is refunded — it never read data). This module adds:

* ``review_watch``: while the gateway runs, every second it expires overdue reviews and
  starts the jobs the owner approved (``JobRunner.start_approved``), so ``fedgate review
  approve`` — a separate process on the node — needs no connection to the gateway;
* ``pending_reviews`` and ``review_details``: plain, JSON-ready views for ``fedgate review``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlmodel import select
from starlette.concurrency import run_in_threadpool

from engine.artifact import ModelRejected, parse_artifact, validate_artifact
from engine.job import JobSpec, JobSpecInvalid
from gateway.node.background import every
from gateway.node.jobs import ChargedMechanismMismatch, JobRunner, engine_job_document
from gateway.node.node import Node
from ledger.accounting import JobCost
from ledger.models import Dataset, Job, JobReview
from ledger.review import ReviewError, expire_review, overdue_reviews

REVIEW_POLL_SECONDS = 1.0

log = logging.getLogger("fedgate.review")


def expire_overdue_reviews(node: Node, *, actor: str, now: float | None = None) -> list[str]:
    """Expire every pending review past its deadline (each refunded in its own transaction);
    returns the job ids expired."""
    now = time.time() if now is None else now
    with node.read_session() as s:  # polled every second: no write lock unless one is due
        overdue = overdue_reviews(s, now=now)
    expired = []
    for job_id in overdue:
        with contextlib.suppress(ReviewError), node.session() as s, s.begin():
            expire_review(s, job_id, actor=actor, now=now)
            expired.append(job_id)
    return expired


@contextlib.asynccontextmanager
async def review_watch(node: Node, runner: JobRunner,
                       interval_seconds: float = REVIEW_POLL_SECONDS) -> AsyncIterator[None]:
    """While open, expire overdue reviews and start approved jobs every ``interval_seconds``.

    Use in the app's lifespan: ``async with review_watch(node, runner): yield``.
    """

    async def step() -> None:
        expired = await run_in_threadpool(expire_overdue_reviews, node, actor=node.node_key_id)
        started = await runner.start_approved()
        for job_id in expired:
            log.info("review of job %s expired; its reservation was refunded", job_id)
        for job_id in started:
            log.info("job %s approved by the data owner; started", job_id)

    async with every(interval_seconds, step, "review watch"):
        yield


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")


def review_status(review: JobReview) -> dict[str, Any]:
    """What the researcher sees of a review (``GET /v1/jobs/{id}``): its state, the owner's
    reason once decided, why the policy asked for it, and its deadline."""
    return {"state": review.state, "reason": review.reason,
            "required_because": review.required_because, "expires_at": _iso(review.expires_at)}


def pending_reviews(node: Node) -> list[dict[str, Any]]:
    """Every job waiting for the owner's review, oldest first."""
    with node.session() as s:
        statement = (select(Job, JobReview)
                     .where(Job.id == JobReview.job_id, JobReview.state == "pending")
                     .order_by(JobReview.requested_at))
        rows = s.exec(statement).all()  # reviewed: ORM query, not exec
    return [{"job_id": job.id, "researcher": job.researcher, "dataset": job.dataset,
             "epsilon": job.epsilon, "delta": job.delta, "requested_at": _iso(review.requested_at),
             "expires_at": _iso(review.expires_at), "required_because": review.required_because}
            for job, review in rows]


def review_details(node: Node, job_id: str) -> dict[str, Any]:
    """Everything the owner needs to decide: the request's parameters, its projected (ε, δ),
    the model's architecture as validated against the dataset (``engine.artifact``), the
    policy's explanation and why review is required."""
    with node.session() as s:
        job = s.get(Job, job_id)
        review = s.get(JobReview, job_id)
        dataset = s.get(Dataset, job.dataset) if job is not None else None
    if job is None or review is None or dataset is None:
        raise ReviewError(f"job {job_id!r} has no review")
    path = node.deployment.models_dir / (job.model_digest.removeprefix("sha256:") + ".json")
    model: dict[str, Any]
    try:
        summary = validate_artifact(parse_artifact(path.read_bytes()),
                                    num_features=dataset.num_features,
                                    num_classes=dataset.num_classes)
        model = {"family": summary.family, "layers": list(summary.layers),
                 "parameters": summary.parameter_count, "input_shape": list(summary.input_shape),
                 "output_units": summary.output_units,
                 "output_activation": summary.output_activation}
    except (OSError, ModelRejected) as exc:
        model = {"problem": str(exc)}
    return {
        "job_id": job.id, "state": job.state, "researcher": job.researcher,
        "researcher_key_id": job.researcher_key_id, "dataset": job.dataset,
        "model_digest": job.model_digest, "model": model, "parameters": json.loads(job.spec),
        "epsilon": job.epsilon, "delta": job.delta, "budget": job.budget_state,
        "policy_version": job.policy_version, "policy_explanation": review.policy_explanation,
        "review": {**review_status(review), "decided_by": review.decided_by,
                   "decided_at": _iso(review.decided_at), "requested_at": _iso(review.requested_at)},
    }


def runnable_problem(node: Node, job_id: str) -> str | None:
    """Why the held job ``job_id`` must not run, or None: every stored parameter must still be
    in the admissible float32 ranges (``ledger.mechanism``) and the engine's job document,
    built from the job's *charged* cost events, must be consistent with its spec
    (``gateway.node.jobs.engine_job_document``). Checked at approval, before anything runs."""
    with node.session() as s:
        job = s.get(Job, job_id)
        dataset = s.get(Dataset, job.dataset) if job is not None else None
    if job is None or dataset is None:
        return None  # the review state machine reports it
    try:
        document = engine_job_document(
            job_id=job.id, dataset_dir=Path(dataset.path), model_path=Path("/unused"),
            spec=json.loads(job.spec), cost=JobCost.from_json(json.loads(job.cost)),
            evaluation_loss_clip=node.config.evaluation_loss_clip,
            max_examples_per_user=dataset.max_examples_per_user)
        JobSpec.from_json(document).check_charged()
    except (ChargedMechanismMismatch, JobSpecInvalid, ValueError) as exc:
        return str(exc)
    return None
