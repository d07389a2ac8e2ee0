"""The Rényi filter as one value (``ledger.renyi_filter``): it admits exactly what the filter
rule admits, charges and refunds exactly, and survives the dataset row's JSON unchanged."""

from __future__ import annotations

import json

import pytest

from ledger import accounting
from ledger.renyi_filter import RenyiFilter


def _filter(epsilon_total: float = 2.0) -> RenyiFilter:
    budget = accounting.filter_budget(epsilon_total=epsilon_total, delta=1e-5)
    return RenyiFilter(orders=accounting.FILTER_ORDERS, budget=budget,
                       spent=accounting.zero(accounting.FILTER_ORDERS))


def _cost(noise_multiplier: float, rounds: int = 100) -> tuple[float, ...]:
    event = accounting.training_event(sampling_rate=0.01, noise_multiplier=noise_multiplier,
                                      rounds=rounds)
    return accounting.event_rdp(event, accounting.FILTER_ORDERS)


def test_admits_jobs_until_the_budget_is_used_then_refuses() -> None:
    cost = _cost(1.0)
    current, admitted = _filter(), 0
    fit = current.jobs_that_fit(cost)
    while current.admits(cost):
        current = current.charge(cost)
        admitted += 1
    assert admitted == fit >= 1
    assert current.jobs_that_fit(cost) == 0 and not current.status(cost).fits


def test_a_refund_is_the_exact_inverse_of_a_charge() -> None:
    start = _filter().charge(_cost(2.0))
    assert start.charge(_cost(1.0)).refund(_cost(1.0)) == start
    with pytest.raises(ValueError, match="refund exceeds"):
        _filter().refund(_cost(1.0))


def test_the_dataset_rows_json_round_trips_exactly() -> None:
    current = _filter().charge(_cost(1.5))
    stored = RenyiFilter.from_json(
        orders=json.dumps(list(current.orders)),
        budget=json.dumps(accounting.vector_to_json(current.budget)),
        spent=current.spent_json())
    assert stored == current


def test_a_vector_remembered_from_its_text_is_the_one_parsing_the_text_gives() -> None:
    """The filter keeps the vectors of texts it recently read or wrote (an admission reads back
    the spent vector the previous one wrote): whether remembered or parsed, a text gives the
    same exact vector, and the memory stays bounded."""
    from ledger import renyi_filter

    current = _filter()
    for noise in (1.0, 1.5, 2.0, 3.0):
        current = current.charge(_cost(noise))
        text = current.spent_json()
        assert renyi_filter._vector(text) == accounting.vector_from_json(json.loads(text))
    for i in range(renyi_filter._PARSED_MAX + 10):
        renyi_filter._vector(json.dumps([f"{i}/1"] * len(accounting.FILTER_ORDERS)))
    assert len(renyi_filter._PARSED) <= renyi_filter._PARSED_MAX
