"""Ledger inputs: the only database reads of the policy (the thin shell around the pure core)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func
from sqlmodel import Session, select

from ledger.models import Job, Principal
from ledger.states import CHARGED_BUDGET_STATES, BudgetState


def registry_memberships(session: Session, domain: str) -> list[tuple[str, str, str]]:
    """(principal, group, domain) of every active principal with a group."""
    rows = session.exec(select(Principal.name, Principal.group)  # reviewed: ORM query, not exec
                        .where(Principal.status == "active", Principal.group != "")).all()
    return sorted({(name, group, domain) for name, group in rows})


def researcher_epsilon_spent(session: Session, *, researcher: str, dataset: str,
                             since: dt.datetime) -> float:
    """Σ ε of ``researcher``'s jobs on ``dataset`` with budget reserved or committed,
    created at or after ``since`` (basic composition; an upper bound on the true ε)."""
    total = session.exec(  # reviewed: ORM query, not exec
        select(func.coalesce(func.sum(Job.epsilon), 0.0)).where(
            Job.researcher == researcher, Job.dataset == dataset,
            Job.budget_state.in_(CHARGED_BUDGET_STATES),  # type: ignore[attr-defined]
            Job.created_at >= since.timestamp(),
        )
    ).one()
    return float(total)



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
