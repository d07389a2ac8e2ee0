"""Each researcher's running Σε per dataset (``ResearcherEpsilon``): kept in the transactions
that reserve and refund budget, read by the policy's ``max_epsilon_per_researcher``.

Contract:

* ``count_researcher_epsilon`` runs in the caller's reservation or refund transaction, under
  the dataset row lock (``ledger.budget``): the total changes with the reservation or refund
  it counts, or not at all.
* The total is the exact sum (a fraction) of the ε of the researcher's charged jobs
  (reserved or committed) on the dataset; ``since`` is at most the creation time of every
  job it counts and never grows, so a reader whose window starts at or before ``since`` may
  use the total instead of summing the jobs (``gateway.policy.ledger_inputs``).
* This module reads and writes only that table and the job rows (no accountant): the policy
  reads it without loading dp-accounting.
"""

from __future__ import annotations

from fractions import Fraction

from sqlalchemy.engine import Connection
from sqlmodel import Session

from ledger.fixed_sql import Insert, Statement, execute
from ledger.models import Job
from ledger.states import CHARGED_BUDGET_STATES

__all__ = ["count_researcher_epsilon", "running_researcher_epsilon"]

_RESEARCHER_EPSILON = Statement(
    "SELECT epsilon, since FROM researcherepsilon WHERE dataset = ? AND researcher = ?")
_COUNT_RESEARCHER_EPSILON = Statement(
    "UPDATE researcherepsilon SET epsilon = ?, since = ? WHERE dataset = ? AND researcher = ?")
_CHARGED_STATES = tuple(state.value for state in CHARGED_BUDGET_STATES)
_CHARGED_JOBS = Statement(
    "SELECT epsilon, created_at FROM job WHERE dataset = ? AND researcher = ? AND "
    "budget_state IN (?, ?) AND id != ?", parameters=3 + len(_CHARGED_STATES))
_INSERT_TOTAL = Insert(Statement(
    "INSERT INTO researcherepsilon (dataset, researcher, epsilon, since) VALUES (?, ?, ?, ?)"))


def running_researcher_epsilon(on: Session | Connection, *, dataset: str,
                               researcher: str) -> tuple[Fraction, float] | None:
    """``researcher``'s running Σε on ``dataset`` (``ResearcherEpsilon``: the exact sum and the
    earliest creation time of the jobs it counts), as ``on``'s transaction sees it; None
    without a row."""
    row = execute(on, _RESEARCHER_EPSILON, (dataset, researcher)).fetchone()
    return None if row is None else (Fraction(row[0]), float(row[1]))


def count_researcher_epsilon(session: Session | Connection, job: Job, sign: int) -> None:
    """Add (``sign`` +1, at reservation) or subtract (-1, at refund) ``job``'s ε to its
    researcher's running total on its dataset (``ResearcherEpsilon``), in the caller's
    transaction, under the dataset row lock; ``job`` is not yet in the jobs it sums.

    Without a row, a reservation first creates it from the researcher's charged jobs there
    (a ledger written before the row existed); a refund leaves it absent (the reservation
    that creates it will sum the jobs as they are then)."""
    row = running_researcher_epsilon(session, dataset=job.dataset, researcher=job.researcher)
    if row is not None:
        total = row[0] + sign * Fraction(job.epsilon)
        execute(session, _COUNT_RESEARCHER_EPSILON,
                (str(total), min(row[1], job.created_at), job.dataset, job.researcher))
        return
    if sign < 0:
        return
    charged = execute(session, _CHARGED_JOBS, (job.dataset, job.researcher,
                                               *_CHARGED_STATES, job.id)).fetchall()
    total = sum((Fraction(epsilon) for epsilon, _ in charged), Fraction(job.epsilon))
    since = min((created for _, created in charged), default=job.created_at)
    _INSERT_TOTAL.row(session, {"dataset": job.dataset, "researcher": job.researcher,
                                "epsilon": str(total), "since": min(since, job.created_at)})
