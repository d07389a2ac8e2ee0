"""Owner review of held jobs: a state machine whose every step is one audited transaction.

A job the policy holds for review (``PolicyDecision.review``) is admitted like any other job —
its budget is *reserved* at admission under the dataset row lock
(``ledger.budget.reserve_budget``), so the reservations of pending reviews count against the
privacy filter for every later admission — but it starts in ``pending_review`` instead of
``queued``. From there, each step is one transaction holding the job's row lock, with its
``review`` audit entry:

* ``open_review`` (inside the admission transaction): review ``pending``; budget reserved.
* ``approve_review``: ``pending`` → ``approved``, job ``approved``; budget still reserved.
  The gateway then claims it (``claim_approved_jobs``: ``approved`` → ``queued``) and starts
  it like any admitted job, so the usual data-access rule settles it from there.
* ``deny_review``: ``pending`` → ``denied``; job ``failed``; budget refunded.
* ``expire_review``: ``pending`` at or after ``expires_at`` → ``expired``; job ``failed``;
  budget refunded. Approving or denying an overdue review expires it instead.
* ``withdraw_review``: the researcher cancels a ``pending_review`` or ``approved`` job that the
  gateway has not claimed yet; job ``failed``; budget refunded.

Every refund here is exact and sound (docs/privacy.md): a job in ``pending_review`` or
``approved`` has no job directory and no engine process, so it cannot have read user data.
All functions run inside the caller's open transaction.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Literal

from sqlalchemy.engine import Connection
from sqlmodel import Session, select

from ledger.audit import append_entry
from ledger.budget import LedgerError, lock_dataset, refund_budget
from ledger.fixed_sql import Insert, Statement
from ledger.metering import record_usage
from ledger.models import Job, JobReview
from ledger.row_objects import row_object
from ledger.states import HELD_JOB_STATES, RESEARCHER_CANCELLED, BudgetState, JobState

REVIEW_STATES = ("pending", "approved", "denied", "expired", "withdrawn")
MAX_REASON_CHARS = 2000


class ReviewError(LedgerError):
    """A review step that does not apply to the job's current state; nothing changed."""


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")


def _reason(text: str) -> str:
    reason = " ".join(text.split())
    if not reason or len(reason) > MAX_REASON_CHARS:
        raise ReviewError(f"give a reason of 1 to {MAX_REASON_CHARS} characters; the researcher "
                          "reads it")
    return reason


def _locked(session: Session, job_id: str) -> tuple[Job, JobReview]:
    statement = select(Job).where(Job.id == job_id).with_for_update()
    job = session.exec(statement).first()  # reviewed: ORM query, not exec
    review = session.exec(  # reviewed: ORM query, not exec
        select(JobReview).where(JobReview.job_id == job_id).with_for_update()).first()
    if job is None or review is None:
        raise ReviewError(f"job {job_id!r} has no review")
    return job, review


def _audit(session: Session | Connection, job: Job, decision: str, *, actor: str,
           **fields: object) -> None:
    append_entry(session, action="review", actor=actor, job_id=job.id, dataset=job.dataset,
                 principal=job.researcher, decision=decision, **fields)


_INSERT_REVIEW = Insert(Statement(
    "INSERT INTO jobreview (job_id, state, required_because, policy_explanation, "
    "requested_at, expires_at, decided_at, decided_by, reason) VALUES (?, ?, ?, ?, ?,"
    " ?, ?, ?, ?)"))


def open_review(session: Session | Connection, job: Job, *, required_because: str,
                policy_explanation: str, expires_at: float, actor: str) -> JobReview:
    """Hold the just-admitted ``job`` (budget reserved, state ``pending_review``) for review.
    The row is written as a fixed statement: the review returned is not attached to ``session``."""
    if job.state != JobState.PENDING_REVIEW or job.budget_state != BudgetState.RESERVED:
        raise ReviewError(f"job {job.id} is {job.state} with budget {job.budget_state}; only a "
                          "pending_review job with a reservation can be held")
    review = row_object(JobReview, dict(
        job_id=job.id, state="pending", required_because=required_because,
        policy_explanation=policy_explanation, requested_at=time.time(), expires_at=expires_at))
    _audit(session, job, "requested", actor=actor, required_because=required_because,
           epsilon=job.epsilon, delta=job.delta, expires_at=_iso(expires_at))
    _INSERT_REVIEW.row(session, review.__dict__)  # a fixed statement: one row
    return review


def _close(session: Session, job: Job, review: JobReview, state: Literal["denied", "expired",
           "withdrawn"], *, actor: str, reason: str, failure: str) -> JobReview:
    """End a held job without running it: review ``state``, job failed, budget refunded.

    The dataset row is locked before the review's audit entry takes the audit head, in the
    order admission takes them (dataset, then audit head); the other order deadlocked against
    concurrent admissions on PostgreSQL (found by tests/test_soak.py)."""
    lock_dataset(session, job.dataset)
    now = time.time()
    if review.state == "pending":
        review.state = state
        review.decided_at = now
        review.decided_by = actor
        review.reason = reason
    _audit(session, job, state, actor=actor, reason=reason)
    job.state = JobState.FAILED
    job.failure = failure
    job.updated_at = now
    session.add_all([review, job])
    session.flush()
    refund_budget(session, job.id, reason=f"review {state}: {reason}", actor=actor)
    # Its CPU reservation ends here too: never started, so nothing measured or billed.
    record_usage(session, job, usage=None, client_updates=None, bytes_released=0,
                 succeeded=False, cpu_reserved_seconds=0.0, now=now)
    return review


def _pending(session: Session, job_id: str, *, now: float) -> tuple[Job, JobReview, bool]:
    """The locked job and its pending review, and whether the review is overdue."""
    job, review = _locked(session, job_id)
    if review.state != "pending" or job.state != JobState.PENDING_REVIEW:
        raise ReviewError(f"job {job_id} is {job.state} and its review is {review.state}; only "
                          "pending reviews can be decided")
    return job, review, now >= review.expires_at


def expire_review(session: Session, job_id: str, *, actor: str, now: float | None = None
                  ) -> JobReview:
    """Expire a pending review whose deadline has passed: the job fails, refunded."""
    now = time.time() if now is None else now
    job, review, overdue = _pending(session, job_id, now=now)
    if not overdue:
        raise ReviewError(f"the review of job {job_id} is open until {_iso(review.expires_at)}")
    return _close(session, job, review, "expired", actor=actor,
                  reason=f"no decision before {_iso(review.expires_at)}",
                  failure="the data owner's review expired without a decision; nothing was "
                          "charged")


def approve_review(session: Session, job_id: str, *, reason: str, actor: str,
                   now: float | None = None) -> JobReview:
    """Approve a pending review: the job becomes ``approved`` and keeps its reservation.

    An overdue review is expired instead (refunded); the returned review's ``state`` says
    which happened.
    """
    now = time.time() if now is None else now
    reason = _reason(reason)
    job, review, overdue = _pending(session, job_id, now=now)
    if overdue:
        return expire_review(session, job_id, actor=actor, now=now)
    review.state, review.decided_at, review.decided_by, review.reason = "approved", now, actor, reason
    job.state = JobState.APPROVED
    job.updated_at = now
    _audit(session, job, "approved", actor=actor, reason=reason)
    session.add_all([review, job])
    session.flush()
    return review


def deny_review(session: Session, job_id: str, *, reason: str, actor: str,
                now: float | None = None) -> JobReview:
    """Deny a pending review: the job fails with the reason and its budget is refunded.

    An overdue review is expired instead (also refunded).
    """
    now = time.time() if now is None else now
    reason = _reason(reason)
    job, review, overdue = _pending(session, job_id, now=now)
    if overdue:
        return expire_review(session, job_id, actor=actor, now=now)
    return _close(session, job, review, "denied", actor=actor, reason=reason,
                  failure=f"denied by the data owner's review: {reason}")


def withdraw_review(session: Session, job_id: str, *, actor: str) -> JobReview | None:
    """The researcher cancels a held job: failed and refunded. ``None`` if the job is no
    longer held (the gateway claimed it, or it ended): cancel it the usual way then."""
    job, review = _locked(session, job_id)
    if job.state not in HELD_JOB_STATES:
        return None
    return _close(session, job, review, "withdrawn", actor=actor,
                  reason=RESEARCHER_CANCELLED, failure=RESEARCHER_CANCELLED)


def overdue_reviews(session: Session, *, now: float) -> list[str]:
    """Job ids of pending reviews whose deadline has passed."""
    return list(session.exec(select(JobReview.job_id).where(  # reviewed: ORM query, not exec
        JobReview.state == "pending", JobReview.expires_at <= now).order_by(JobReview.job_id)
    ).all())


def any_approved_job(session: Session) -> bool:
    """Whether some job waits approved (a read: the claim below writes only when one does)."""
    return session.exec(select(Job.id).where(  # reviewed: ORM query, not exec
        Job.state == JobState.APPROVED).limit(1)).first() is not None


def claim_approved_jobs(session: Session) -> list[Job]:
    """Move every ``approved`` job to ``queued`` and return them, for the caller to start.

    Under the row locks only one gateway process claims a job; a job withdrawn meanwhile is
    no longer ``approved`` and is not claimed.
    """
    statement = select(Job).where(Job.state == JobState.APPROVED).with_for_update()
    jobs = list(session.exec(statement).all())  # reviewed: ORM query, not exec
    now = time.time()
    for job in jobs:
        job.state = JobState.QUEUED
        job.updated_at = now
        session.add(job)
    session.flush()
    return jobs
