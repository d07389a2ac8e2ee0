"""How much of a dataset's privacy budget is used, now and after each job (pure).

The Rényi filter (``ledger.accounting``) admits a job iff *some* order α still has room
(spent(α) + cost(α) ≤ B(α)). So the honest measure of how much budget is gone is the
fraction used at the order with the most room left, min over α of spent(α) / B(α): it
reaches 1 exactly when no order has room, and it is what limits admission.

The running sum of the jobs' ε is not replayed: the ε of separate jobs does not add up
under RDP composition (the sum may pass ε_total while the filter still admits, or stay
below it for a job whose curve is steep at every order), so it is never a measure of the
remaining budget. ``epsilon_used`` is the ε figure consistent with the filter, and
``more_like_last`` what is left in units of a real job.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ledger import accounting
from ledger.budget import dataset_initial_spent
from ledger.models import Dataset, Job
from ledger.states import CHARGED_BUDGET_STATES

"""Budget states that count against the filter (a refunded job was subtracted exactly)."""


@dataclass(frozen=True)
class FilterUsage:
    """The fraction of the filter used at its best order (``None``: no order has a budget)."""

    fraction: float
    best_order: float | None


def filter_usage(
    spent: accounting.RdpVector, budget: accounting.RdpVector, orders: Sequence[float]
) -> FilterUsage:
    """min over orders with B(α) > 0 of spent(α) / B(α), and that order (ties: the lowest).

    With no order budgeted the filter admits nothing: fully used.
    """
    usable = [(s / b, order) for s, b, order in zip(spent, budget, orders, strict=True) if b > 0]
    if not usable:
        return FilterUsage(1.0, None)
    fraction, order = min(usable)
    return FilterUsage(float(fraction), order)


def dataset_filter_usage(dataset: Dataset) -> FilterUsage:
    """``filter_usage`` of a dataset's stored filter state (spent + reserved vs budget)."""
    return filter_usage(accounting.vector_from_json(json.loads(dataset.spent_rdp)),
                        accounting.vector_from_json(json.loads(dataset.filter_budget)),
                        json.loads(dataset.filter_orders))


def epsilon_used(spent: accounting.RdpVector, orders: Sequence[float], delta: float) -> float:
    """The smallest ε_total whose filter (same δ, same orders) holds ``spent``: min over α of
    spent(α) + log1p(−1/α) − log(δ'α)/(α−1) with δ' = δ/k, the inverse of
    ``accounting.filter_budget``'s conversion; 0 when nothing is spent.

    Such a filter would have admitted every job charged so far (each at the order that is
    best at the end), and the figure reaches the dataset's ε_total exactly when its filter
    is full at its best order. It is a description of the use, not a guarantee of its own.
    """
    if not any(spent):
        return 0.0
    delta_per_order = delta / len(orders)
    return max(0.0, min(float(r) + math.log1p(-1.0 / a) - math.log(delta_per_order * a) / (a - 1.0)
                        for r, a in zip(spent, orders, strict=True)))


@dataclass(frozen=True)
class BurnDownPoint:
    """The dataset's budget use right after one job's charge was reserved."""

    time: float  # the job's admission (Unix seconds)
    job_id: str
    researcher: str
    budget_state: str  # reserved | committed
    epsilon: float  # this job's ε at the dataset's δ
    filter_used: float  # filter_usage() of every job up to this one
    best_order: float | None
    parameters: dict[str, Any]  # the job's public DP and training parameters (its spec)


@dataclass(frozen=True)
class BurnDown:
    """A dataset's budget use replayed job by job, and the ledger's current figure.

    ``matches_ledger`` says the replayed vector equals the dataset's stored spent vector
    exactly (the invariant of ``ledger.models``); if False the chart is not to be trusted.
    ``more_like_last`` is how many more copies of the last admitted job the filter would
    admit now (``accounting.jobs_that_fit``; None before the first job).
    """

    dataset: str
    epsilon_total: float
    delta: float
    public_users: int  # N̂
    start: float  # the dataset's registration (Unix seconds)
    points: tuple[BurnDownPoint, ...]
    current: FilterUsage
    orders: int  # k, the number of RDP orders the filter tracks
    epsilon_used: float  # ``epsilon_used`` of the ledger's spent vector
    more_like_last: int | None
    matches_ledger: bool


def burn_down(dataset: Dataset, jobs: Iterable[Job]) -> BurnDown:
    """Replay the charges of ``dataset``'s reserved and committed jobs in admission order.

    Each job's exact charge (its stored RDP vector, rounded up as at admission) is added
    to the filter as registered (nothing spent, or the charge of a DP-estimated N̂); refunded
    jobs and other datasets' jobs are ignored.
    """
    orders = tuple(float(a) for a in json.loads(dataset.filter_orders))
    budget = accounting.vector_from_json(json.loads(dataset.filter_budget))
    charged = sorted((j for j in jobs
                      if j.dataset == dataset.name and j.budget_state in CHARGED_BUDGET_STATES),
                     key=lambda j: (j.created_at, j.id))
    spent = dataset_initial_spent(dataset)  # the public-count estimate's charge, if any
    points = []
    for job in charged:
        spent = accounting.add(spent, json.loads(job.cost_rdp))
        usage = filter_usage(spent, budget, orders)
        points.append(BurnDownPoint(time=job.created_at, job_id=job.id, researcher=job.researcher,
                                    budget_state=job.budget_state, epsilon=job.epsilon,
                                    filter_used=usage.fraction, best_order=usage.best_order,
                                    parameters=json.loads(job.spec)))
    ledger_spent = accounting.vector_from_json(json.loads(dataset.spent_rdp))
    more_like_last = (accounting.jobs_that_fit(spent=ledger_spent, budget=budget,
                                               cost=json.loads(charged[-1].cost_rdp))
                      if charged else None)
    return BurnDown(dataset=dataset.name, epsilon_total=dataset.epsilon_total, delta=dataset.delta,
                    public_users=dataset.public_users, start=dataset.created_at,
                    points=tuple(points), current=filter_usage(ledger_spent, budget, orders),
                    orders=len(orders), epsilon_used=epsilon_used(ledger_spent, orders, dataset.delta),
                    more_like_last=more_like_last, matches_ledger=spent == ledger_spent)
