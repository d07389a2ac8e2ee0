"""A dataset's Rényi privacy filter as one value: the budget, what is spent, and the rule.

Invariant (Feldman & Zrnic's Rényi filter, ``docs/privacy.md``): ``spent(α)`` is the exact sum
of the RDP costs, each rounded up (``ledger.accounting``), of every job whose budget is reserved
or committed, plus the dataset's own count query when N̂ was estimated; a job is admitted iff
some order α has ``spent(α) + cost(α) ≤ budget(α)``, where ``budget(α)`` (rounded down) is the
RDP that converts to exactly (ε_total, δ/k) at α. Any adaptive sequence the filter admits is
(ε_total, δ)-DP. Pure and exact (``fractions.Fraction``); ``ledger.budget`` loads it from and
stores it into the dataset row, under the row lock.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ledger import accounting
from ledger.accounting import FilterStatus, RdpVector

__all__ = ["RenyiFilter"]


@dataclass(frozen=True)
class RenyiFilter:
    """Budget and spent vectors over ``orders``; charging and refunding return a new filter."""

    orders: tuple[float, ...]
    budget: RdpVector
    spent: RdpVector

    @classmethod
    def from_json(cls, *, orders: str, budget: str, spent: str) -> RenyiFilter:
        """The filter a dataset row stores (``filter_orders``, ``filter_budget``,
        ``spent_rdp``: JSON, the vectors as exact "n/d" strings)."""
        return cls(orders=orders_from_json(orders), budget=_vector(budget), spent=_vector(spent))

    def spent_json(self) -> str:
        text = json.dumps(accounting.vector_to_json(self.spent))
        _remember(text, self.spent)  # the next admission reads back exactly this text
        return text

    def admits(self, cost: Sequence[float]) -> bool:
        """The filter rule for a job of RDP ``cost`` (charged upward), exactly."""
        return accounting.admits(spent=self.spent, cost=cost, budget=self.budget)

    def jobs_that_fit(self, cost: Sequence[float]) -> int:
        """Copies of this job, itself included, the filter would admit one after another."""
        return accounting.jobs_that_fit(spent=self.spent, cost=cost, budget=self.budget)

    def status(self, cost: Sequence[float]) -> FilterStatus:
        return FilterStatus.for_cost(spent=self.spent, cost=cost, budget=self.budget,
                                     orders=self.orders)

    def charge(self, cost: Sequence[float]) -> RenyiFilter:
        """Reserve ``cost`` (the caller checked :meth:`admits` under the same lock)."""
        return replace(self, spent=accounting.add(self.spent, cost))

    def refund(self, cost: Sequence[float]) -> RenyiFilter:
        """The exact inverse of :meth:`charge`, for a job that never read user data."""
        return replace(self, spent=accounting.subtract(self.spent, cost))


# The vectors of recently read or written JSON texts (a pure function of the text): a dataset's
# budget is read on every admission, and its spent vector is the one the previous admission
# wrote. Bounded; entries leave oldest first.
_PARSED: dict[str, RdpVector] = {}
_PARSED_MAX = 256
_PARSED_LOCK = threading.Lock()


def _remember(text: str, vector: RdpVector) -> None:
    with _PARSED_LOCK:
        if len(_PARSED) >= _PARSED_MAX:
            del _PARSED[next(iter(_PARSED))]
        _PARSED[text] = vector


def _vector(text: str) -> RdpVector:
    vector = _PARSED.get(text)
    if vector is None:
        vector = accounting.vector_from_json(json.loads(text))
        _remember(text, vector)
    return vector


@functools.lru_cache(maxsize=64)
def orders_from_json(text: str) -> tuple[float, ...]:
    """A dataset's ``filter_orders`` column as the filter's orders (parsed once per text)."""
    return tuple(json.loads(text))
