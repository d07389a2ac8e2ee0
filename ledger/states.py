"""A job's two state machines, as the ledger stores them (``ledger.models.Job``: ``state``,
``budget_state``) and ``GET /v1/jobs/{id}`` shows them (``state``, ``budget``). Pure.

``JobState``: ``pending_review`` → ``approved`` (held for the owner's review, no engine) →
``queued`` → ``running`` → ``succeeded`` | ``failed``; a job the policy admits without review
starts ``queued``; a held job withdrawn or denied ends ``failed``.

``BudgetState``: ``reserved`` at admission (the whole projected cost counts against the filter
at once) → ``committed`` once the engine read data (charged for good) | ``refunded`` when it
provably did not (never after data access).

Both are ``str`` enums: a member equals its text, stores and serialises as it (SQLite,
PostgreSQL, JSON) and prints as it, so rows and documents written before they existed read the
same.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["ACTIVE_JOB_STATES", "CHARGED_BUDGET_STATES", "ENDED_JOB_STATES", "HELD_JOB_STATES",
           "RESEARCHER_CANCELLED", "BudgetState", "JobState"]


class JobState(str, Enum):  # noqa: UP042 (StrEnum is 3.11+; the SDK runs on 3.10)
    """Where a job is in its life (module docstring)."""

    PENDING_REVIEW = "pending_review"
    APPROVED = "approved"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


class BudgetState(str, Enum):  # noqa: UP042 (as JobState)
    """What a job's privacy cost is to the dataset's filter (module docstring)."""

    RESERVED = "reserved"
    COMMITTED = "committed"
    REFUNDED = "refunded"

    def __str__(self) -> str:
        return self.value


HELD_JOB_STATES = (JobState.PENDING_REVIEW, JobState.APPROVED)
"""Reserved, waiting for the owner's review: no engine process, refundable."""
ACTIVE_JOB_STATES = (*HELD_JOB_STATES, JobState.QUEUED, JobState.RUNNING)
"""Admitted and not ended (counted against a researcher's concurrent-job quota)."""
ENDED_JOB_STATES = (JobState.SUCCEEDED, JobState.FAILED)
CHARGED_BUDGET_STATES = (BudgetState.RESERVED, BudgetState.COMMITTED)
"""The budget states that count against the filter."""

RESEARCHER_CANCELLED = "cancelled by the researcher"
"""The ``failure`` of a job its researcher cancelled (or withdrew while held for review)."""
