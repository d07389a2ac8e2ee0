"""Ledger inputs: the only database reads of the policy (the thin shell around the pure core)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func
from sqlalchemy.engine import Connection
from sqlmodel import Session, select

from ledger.fixed_sql import Statement, execute
from ledger.models import Job, Principal
from ledger.researcher_epsilon import running_researcher_epsilon
from ledger.states import CHARGED_BUDGET_STATES, BudgetState


def registry_memberships(session: Session, domain: str) -> list[tuple[str, str, str]]:
    """(principal, group, domain) of every active principal with a group."""
    rows = session.exec(select(Principal.name, Principal.group)  # reviewed: ORM query, not exec
                        .where(Principal.status == "active", Principal.group != "")).all()
    return sorted({(name, group, domain) for name, group in rows})


_CHARGED_STATES = tuple(state.value for state in CHARGED_BUDGET_STATES)
_EPSILON_IN_WINDOW = Statement(  # the composite index ix_job_dataset_researcher_created
    "SELECT coalesce(sum(epsilon), 0.0) FROM job WHERE dataset = ? AND researcher = ? AND "
    "created_at >= ? AND budget_state IN (?, ?)", parameters=3 + len(_CHARGED_STATES))


def researcher_epsilon_spent(connection: Connection, *, researcher: str, dataset: str,
                             since: dt.datetime) -> float:
    """Σ ε of ``researcher``'s jobs on ``dataset`` with budget reserved or committed,
    created at or after ``since`` (basic composition; an upper bound on the true ε).

    The running total the reservations keep (``ledger.researcher_epsilon.count_researcher_epsilon``) when
    every job it counts lies in the window (its ``since`` is not before the window's start);
    otherwise, or without a total, the sum over the jobs themselves."""
    running = running_researcher_epsilon(connection, dataset=dataset, researcher=researcher)
    if running is not None and running[1] >= since.timestamp():
        return float(running[0])
    row = execute(connection, _EPSILON_IN_WINDOW,
                  (dataset, researcher, since.timestamp(), *_CHARGED_STATES)).fetchone()
    return float(row[0])


def researcher_committed_jobs(session: Session, *, researcher: str, dataset: str) -> int:
    """How many of ``researcher``'s jobs on ``dataset`` ran (budget committed)."""
    return int(session.exec(  # reviewed: ORM query, not exec
        select(func.count()).select_from(Job).where(
            Job.researcher == researcher, Job.dataset == dataset, Job.budget_state == BudgetState.COMMITTED)
    ).one())


def committed_model_digests(session: Session, *, dataset: str) -> frozenset[str]:
    """Digests of the models of every job that ran on ``dataset`` (budget committed)."""
    return frozenset(session.exec(  # reviewed: ORM query, not exec
        select(Job.model_digest).where(Job.dataset == dataset, Job.budget_state == BudgetState.COMMITTED)
        .distinct()
    ).all())
