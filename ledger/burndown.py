"""How much of a dataset's privacy budget is used, now and after each job (pure).

The Rényi filter (``ledger.accounting``) admits a job iff *some* order α still has room
(spent(α) + cost(α) ≤ B(α)). So the honest measure of how much budget is gone is the
fraction used at the order with the most room left, min over α of spent(α) / B(α): it
reaches 1 exactly when no order has room, and it is what limits admission.

The running sum of the jobs' ε is replayed too, for reference only: the ε of separate
jobs does not add up under RDP composition (the sum may pass ε_total while the filter
still admits, or stay below it for a job whose curve is steep at every order), so it
is never a measure of the remaining budget.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ledger import accounting
from ledger.budget import dataset_initial_spent
from ledger.models import Dataset, Job

CHARGED_STATES = ("reserved", "committed")
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
    epsilon_sum: float  # Σ ε of every job up to this one (reference only)


@dataclass(frozen=True)
class BurnDown:
    """A dataset's budget use replayed job by job, and the ledger's current figure.

    ``matches_ledger`` says the replayed vector equals the dataset's stored spent vector
    exactly (the invariant of ``ledger.models``); if False the chart is not to be trusted.
    """

    dataset: str
    epsilon_total: float
    delta: float
    start: float  # the dataset's registration (Unix seconds)
    points: tuple[BurnDownPoint, ...]
    current: FilterUsage
    matches_ledger: bool

    @property
    def epsilon_sum(self) -> float:
        return self.points[-1].epsilon_sum if self.points else 0.0


def burn_down(dataset: Dataset, jobs: Iterable[Job]) -> BurnDown:
    """Replay the charges of ``dataset``'s reserved and committed jobs in admission order.

    Each job's exact charge (its stored RDP vector, rounded up as at admission) is added
    to the filter as registered (nothing spent, or the charge of a DP-estimated N̂); refunded
    jobs and other datasets' jobs are ignored.
    """
    orders = tuple(float(a) for a in json.loads(dataset.filter_orders))
    budget = accounting.vector_from_json(json.loads(dataset.filter_budget))
    charged = sorted((j for j in jobs if j.dataset == dataset.name and j.budget_state in CHARGED_STATES),
                     key=lambda j: (j.created_at, j.id))
    spent = dataset_initial_spent(dataset)  # the public-count estimate's charge, if any
    epsilon_sum = 0.0
    points = []
    for job in charged:
        spent = accounting.add(spent, json.loads(job.cost_rdp))
        epsilon_sum += job.epsilon
        usage = filter_usage(spent, budget, orders)
        points.append(BurnDownPoint(time=job.created_at, job_id=job.id, researcher=job.researcher,
                                    budget_state=job.budget_state, epsilon=job.epsilon,
                                    filter_used=usage.fraction, best_order=usage.best_order,
                                    epsilon_sum=epsilon_sum))
    ledger_spent = accounting.vector_from_json(json.loads(dataset.spent_rdp))
    return BurnDown(dataset=dataset.name, epsilon_total=dataset.epsilon_total, delta=dataset.delta,
                    start=dataset.created_at, points=tuple(points),
                    current=filter_usage(ledger_spent, budget, orders),
                    matches_ledger=spent == ledger_spent)
