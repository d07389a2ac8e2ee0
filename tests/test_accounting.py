"""Specification of fedgate's privacy accounting (ledger/accounting.py).

External references: dp-accounting's own accountants, the closed form of the Poisson-sampled
Gaussian RDP at integer orders (Mironov, Talwar, Zhang 2019, eq. for A_α), the analytic
Gaussian mechanism (Balle & Wang 2018), and the worked figure in docs/privacy.md.
"""

import json
import math
from fractions import Fraction

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ledger import accounting
from ledger.accounting import (
    FILTER_ORDERS,
    FilterStatus,
    JobCost,
    add,
    admits,
    calibrate_noise_multiplier,
    calibrate_rounds,
    evaluation_event,
    filter_budget,
    jobs_that_fit,
    pld_epsilon,
    subtract,
    training_epsilon,
    training_event,
    vector_from_json,
    vector_to_json,
    zero,
)

FAST = settings(max_examples=50, deadline=None)

# (q, z, T, δ) and dp-accounting 0.4.3's RDP ε, pinned so an upgrade that moves stored
# figures is noticed.
EPSILON_VECTORS = [
    (0.01, 4.0, 10000, 1e-5, 1.035490066036133),
    (256 / 60000, 1.12, 14040, 1e-5, 2.516462443736885),
    (0.01, 1.0, 1000, 1e-6, 2.436693803022143),
    (0.05, 0.8, 1000, 1e-6, 21.136716538623418),
]

sampling_rates = st.floats(min_value=1e-3, max_value=1.0)
noise_multipliers = st.floats(min_value=0.5, max_value=10.0)
round_counts = st.integers(min_value=1, max_value=5000)


def job(q: float, z: float, rounds: int, z_eval: float | None = None) -> JobCost:
    return JobCost.for_job(
        sampling_rate=q, noise_multiplier=z, rounds=rounds, evaluation_noise_multiplier=z_eval
    )


# dp-accounting computes RDP in binary64: at fractional orders a parameter one ulp "worse" can
# come out lower by up to ~7e-14 per round (measured over 3000 random (q, z)). Monotonicity in
# noise and sampling rate is therefore specified up to 1e-12 per round, absolute.
FLOAT_NOISE_PER_ROUND = 1e-12


def assert_costs_no_less(more: JobCost, less: JobCost, tolerance: float = 0.0) -> None:
    assert all(m >= s - tolerance for m, s in zip(more.rdp(), less.rdp(), strict=True))
    assert more.epsilon(1e-6) >= less.epsilon(1e-6) - tolerance


# --- ε of a single job ------------------------------------------------------------------------


@pytest.mark.parametrize(("q", "z", "rounds", "delta", "pinned"), EPSILON_VECTORS)
def test_single_job_epsilon_matches_dp_accounting_rdp(q, z, rounds, delta, pinned):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    reference = RdpAccountant().compose(event).get_epsilon(delta)

    epsilon = training_epsilon(sampling_rate=q, noise_multiplier=z, rounds=rounds, delta=delta)

    assert epsilon >= reference
    assert epsilon == pytest.approx(reference, rel=1e-9, abs=0)
    assert epsilon == pytest.approx(pinned, rel=1e-9, abs=0)


@settings(max_examples=25, deadline=None)
@given(q=st.floats(0.001, 1.0), z=st.floats(0.3, 20.0), rounds=st.integers(1, 5000))
def test_memoised_rdp_curve_is_bit_identical_to_dp_accounting_composition(q, z, rounds):
    orders = FILTER_ORDERS
    event = training_event(sampling_rate=q, noise_multiplier=z, rounds=rounds)
    reference = tuple(float(r) for r in RdpAccountant(list(orders)).compose(event).rdp)
    assert JobCost(event, None).rdp(orders) == reference
    assert JobCost(event, None).rdp(orders) == reference  # and again, from the cache


def test_pld_epsilon_is_tighter_than_rdp_for_a_single_job():
    params = dict(sampling_rate=0.01, noise_multiplier=1.0, rounds=1000, delta=1e-6)
    assert 0 < pld_epsilon(**params) < training_epsilon(**params)


def test_pld_epsilon_of_one_gaussian_release_matches_the_analytic_gaussian_mechanism():
    z, delta = 1.0, 1e-5

    def analytic_delta(eps: float) -> float:  # Balle & Wang 2018, Theorem 8, sensitivity 1
        phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
        return phi(1 / (2 * z) - eps * z) - math.exp(eps) * phi(-1 / (2 * z) - eps * z)

    low, high = 0.0, 20.0
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if analytic_delta(middle) > delta else (low, middle)

    epsilon = pld_epsilon(sampling_rate=1.0, noise_multiplier=z, rounds=1, delta=delta)

    assert high <= epsilon <= high + 1e-2  # PLD is pessimistic, discretized at 1e-4


def test_integer_order_rdp_matches_the_sampled_gaussian_closed_form():
    q, z, rounds = 0.01, 1.0, 1000

    def closed_form(alpha: int) -> float:  # log A_α / (α−1), A_α a binomial sum
        logs = [
            math.lgamma(alpha + 1)
            - math.lgamma(k + 1)
            - math.lgamma(alpha - k + 1)
            + (alpha - k) * math.log1p(-q)
            + k * math.log(q)
            + (k * k - k) / (2 * z * z)
            for k in range(alpha + 1)
        ]
        top = max(logs)
        return rounds * (top + math.log(math.fsum(math.exp(v - top) for v in logs))) / (alpha - 1)

    rdp = job(q, z, rounds).rdp()

    for alpha, value in zip(FILTER_ORDERS, rdp, strict=True):
        if alpha.is_integer():
            assert value == pytest.approx(closed_form(int(alpha)), rel=1e-9)


def test_evaluation_costs_alpha_over_two_z_squared():
    cost = JobCost(training=evaluation_event(noise_multiplier=4.0), evaluation=None)
    assert cost.rdp() == pytest.approx([a / 32 for a in FILTER_ORDERS], rel=1e-12)


def test_job_with_evaluation_costs_the_max_of_its_parts_not_the_sum():
    training = job(0.01, 1.0, 1000).rdp()
    evaluation = JobCost(evaluation_event(noise_multiplier=2.0), None).rdp()

    combined = job(0.01, 1.0, 1000, z_eval=2.0).rdp()

    assert combined == tuple(max(t, e) for t, e in zip(training, evaluation, strict=True))
    assert any(t > e for t, e in zip(training, evaluation, strict=True))
    assert any(e > t for t, e in zip(training, evaluation, strict=True))


# --- monotonicity ------------------------------------------------------------------------------


@FAST
@example(q=0.5, z=1.0, rounds=1, shrink=math.nextafter(1.0, 0.0))  # lower RDP at α = 1.5
@given(sampling_rates, noise_multipliers, round_counts, st.floats(0.5, 1.0))
def test_less_noise_never_costs_less(q, z, rounds, shrink):
    tolerance = rounds * FLOAT_NOISE_PER_ROUND
    assert_costs_no_less(job(q, z * shrink, rounds), job(q, z, rounds), tolerance)


@FAST
@given(sampling_rates, noise_multipliers, round_counts, st.integers(0, 5000))
def test_more_rounds_never_costs_less(q, z, rounds, extra):
    assert_costs_no_less(job(q, z, rounds + extra), job(q, z, rounds))


@FAST
@given(sampling_rates, noise_multipliers, round_counts, st.floats(0.0, 1.0))
def test_higher_sampling_rate_never_costs_less(q, z, rounds, towards_one):
    higher = q + (1.0 - q) * towards_one
    tolerance = rounds * FLOAT_NOISE_PER_ROUND
    assert_costs_no_less(job(higher, z, rounds), job(q, z, rounds), tolerance)


# --- the filter --------------------------------------------------------------------------------


def test_worked_figure_admits_exactly_nine_identical_jobs():
    budget = filter_budget(epsilon_total=8.0, delta=1e-6)
    cost = job(0.01, 1.0, 1000).rdp()
    spent, admitted = zero(), 0
    while admits(spent=spent, cost=cost, budget=budget):
        spent, admitted = add(spent, cost), admitted + 1

    assert admitted == 9
    assert jobs_that_fit(spent=zero(), cost=cost, budget=budget) == 9
    assert FilterStatus.for_cost(spent=zero(), cost=cost, budget=budget) == FilterStatus(
        fits=True, more_jobs_that_fit=9, best_order=5.0
    )


def test_filter_budget_converts_back_to_epsilon_total_at_delta_over_k_rounded_down():
    epsilon_total, delta = 8.0, 1e-6
    budget = filter_budget(epsilon_total=epsilon_total, delta=delta)

    for alpha, b in zip(FILTER_ORDERS, budget, strict=True):
        exact_formula = (
            epsilon_total
            - math.log1p(-1 / alpha)
            + math.log(delta / len(FILTER_ORDERS) * alpha) / (alpha - 1)
        )
        if exact_formula <= 0:
            assert b == 0
            continue
        converted, _ = compute_epsilon([alpha], [float(b)], delta / len(FILTER_ORDERS))
        assert epsilon_total - 1e-9 <= converted < epsilon_total
        assert b < Fraction(exact_formula)


def test_job_that_does_not_fit_is_refused_and_spent_is_unchanged():
    budget = filter_budget(epsilon_total=3.0, delta=1e-6)
    cost = job(0.05, 0.8, 200).rdp()
    spent = zero()
    while admits(spent=spent, cost=cost, budget=budget):
        spent = add(spent, cost)
    before = vector_to_json(spent)

    status = FilterStatus.for_cost(spent=spent, cost=cost, budget=budget)

    assert not admits(spent=spent, cost=cost, budget=budget)
    assert status.fits is False and status.more_jobs_that_fit == 0
    assert jobs_that_fit(spent=spent, cost=cost, budget=budget) == 0
    assert vector_to_json(spent) == before
    # Each order is either over budget or has less room than one more copy.
    assert all(s + Fraction(c) > b for s, c, b in zip(spent, cost, budget, strict=True))


def test_a_job_too_large_for_an_empty_filter_is_refused():
    budget = filter_budget(epsilon_total=1.0, delta=1e-6)
    cost = job(0.05, 0.8, 1000).rdp()
    assert not admits(spent=zero(), cost=cost, budget=budget)
    assert jobs_that_fit(spent=zero(), cost=cost, budget=budget) == 0


jobs = st.tuples(
    st.sampled_from([0.001, 0.01, 0.1]),
    st.sampled_from([0.7, 1.0, 2.5]),
    st.sampled_from([1, 10, 500]),
    st.sampled_from([None, 3.0]),
)


@FAST
@given(st.lists(jobs, min_size=2, max_size=6), st.randoms(use_true_random=False))
def test_admission_order_never_changes_the_spent_vector(job_specs, random):
    costs = [job(*spec).rdp() for spec in job_specs]
    shuffled = costs[:]
    random.shuffle(shuffled)

    in_order = in_other_order = zero()
    for cost in costs:
        in_order = add(in_order, cost)
    for cost in shuffled:
        in_other_order = add(in_other_order, cost)

    assert in_order == in_other_order


rdp_values = st.floats(min_value=0.0, max_value=1e6)
rdp_vectors = st.lists(rdp_values, min_size=len(FILTER_ORDERS), max_size=len(FILTER_ORDERS))


@FAST
@given(st.lists(rdp_vectors, max_size=5), rdp_vectors)
def test_refund_is_the_exact_inverse_of_a_charge(history, cost):
    spent = zero()
    for earlier in history:
        spent = add(spent, earlier)
    assert subtract(add(spent, cost), cost) == spent


def test_refund_of_a_cost_never_charged_is_refused():
    with pytest.raises(ValueError, match="refund exceeds"):
        subtract(zero(), job(0.01, 1.0, 10).rdp())


def test_an_order_with_infinite_rdp_is_charged_beyond_any_budget_and_refunded_exactly():
    budget = filter_budget(epsilon_total=8.0, delta=1e-6)
    cost = (math.inf,) * (len(FILTER_ORDERS) - 1) + (1.0,)

    assert admits(spent=zero(), cost=cost, budget=budget)  # through the last order
    spent = add(zero(), cost)

    assert all(s >= 2**1024 > b for s, b in zip(spent[:-1], budget[:-1], strict=True))
    assert FilterStatus.for_cost(spent=spent, cost=(1.0,) * 14, budget=budget).best_order == 64.0
    assert subtract(spent, cost) == zero()


def test_a_zero_rdp_is_still_charged_so_jobs_that_fit_is_finite():
    budget = filter_budget(epsilon_total=1.0, delta=1e-6)
    count = jobs_that_fit(spent=zero(), cost=(0.0,) * len(FILTER_ORDERS), budget=budget)
    assert 10**300 < count < 2**1100
    assert add(zero(), (0.0,) * len(FILTER_ORDERS)) != zero()


def test_orders_with_no_budget_admit_nothing():
    budget = filter_budget(epsilon_total=8.0, delta=1e-6)
    assert budget[:3] == (0, 0, 0)
    cheap_only_at_low_orders = (1e-300,) * 3 + (1e6,) * (len(FILTER_ORDERS) - 3)
    assert not admits(spent=zero(), cost=cheap_only_at_low_orders, budget=budget)


# --- serialization -------------------------------------------------------------------------------


@FAST
@given(st.lists(st.fractions(min_value=0), min_size=1, max_size=20))
def test_vector_json_round_trip_is_exact(values):
    vector = tuple(values)
    encoded = json.loads(json.dumps(vector_to_json(vector)))
    assert vector_from_json(encoded) == vector


@pytest.mark.parametrize("entry", ["0.5", "-1/2", "1/0", "1e3", " 1/2", 3])
def test_vector_from_json_rejects_anything_but_nonnegative_fractions(entry):
    with pytest.raises(ValueError):
        vector_from_json([entry])


@FAST
@given(sampling_rates, noise_multipliers, round_counts, st.none() | noise_multipliers)
def test_job_cost_json_round_trip_is_exact(q, z, rounds, z_eval):
    cost = job(q, z, rounds, z_eval)
    restored = JobCost.from_json(json.loads(json.dumps(cost.to_json())))
    assert restored == cost
    assert restored.rdp() == cost.rdp()


def test_job_cost_from_json_rejects_events_outside_the_allowlist():
    stored = job(0.01, 1.0, 10).to_json()
    foreign = json.loads(json.dumps(stored))
    foreign["training"]["event"]["event"] = {
        "module_name": "os",
        "class_name": "system",
        "noise_multiplier": 1.0,
    }
    with pytest.raises(ValueError, match="unsupported DP event"):
        JobCost.from_json(foreign)

    negative = json.loads(json.dumps(stored))
    negative["training"]["event"]["event"]["noise_multiplier"] = -1.0
    with pytest.raises(ValueError, match="noise_multiplier"):
        JobCost.from_json(negative)


def _named_tuple_json(event: dp_accounting.DpEvent) -> dict:
    """The stored form as it was first written: dp-accounting's ``to_named_tuple``, nested."""
    def field(value):
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return dict(zip(value._fields, (field(v) for v in value), strict=True))
        if isinstance(value, (list, tuple)):
            return [field(item) for item in value]
        return value

    return field(event.to_named_tuple())


@pytest.mark.parametrize("event", [
    dp_accounting.GaussianDpEvent(1.3),
    dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(0.7)),
    training_event(sampling_rate=256 / 60000, noise_multiplier=1.12, rounds=14040),
    training_event(sampling_rate=0.05, noise_multiplier=1.0, rounds=7, clipped_count_stddev=3.0),
    training_event(sampling_rate=0.01, noise_multiplier=1.0, rounds=3, clipped_count_stddev=3.0).event.event,
    evaluation_event(noise_multiplier=2.5),
], ids=["gaussian", "poisson-sampled", "self-composed", "adaptive-clipping", "composed", "evaluation"])
def test_stored_event_json_is_byte_for_byte_dp_accountings_named_tuple_form(event):
    assert (json.dumps(accounting.event_to_json(event))
            == json.dumps(_named_tuple_json(event)))
    cost = JobCost(event, evaluation_event(noise_multiplier=4.0))
    assert json.dumps(cost.to_json()) == json.dumps(
        {"training": _named_tuple_json(event), "evaluation": _named_tuple_json(cost.evaluation)})


def test_job_cost_with_unserializable_event_is_refused_on_write():
    cost = JobCost(dp_accounting.LaplaceDpEvent(1.0), None)
    with pytest.raises(ValueError, match="LaplaceDpEvent"):
        cost.to_json()


# --- input handling ------------------------------------------------------------------------------


def test_float32_inputs_give_the_same_epsilon_as_python_floats():
    q, z, z_eval = 0.0078125, 1.25, 2.5  # exactly representable in float32
    as_float32 = job(np.float32(q), np.float32(z), np.int64(1000), np.float32(z_eval))
    as_python = job(q, z, 1000, z_eval)

    assert as_float32 == as_python
    assert as_float32.epsilon(1e-6) == as_python.epsilon(1e-6)
    assert training_epsilon(
        sampling_rate=np.float32(q), noise_multiplier=np.float32(z), rounds=1000, delta=1e-6
    ) == training_epsilon(sampling_rate=q, noise_multiplier=z, rounds=1000, delta=1e-6)
    sampled = as_float32.training.event
    assert type(sampled.sampling_probability) is float
    assert type(sampled.event.noise_multiplier) is float
    assert type(as_float32.training.count) is int
    json.dumps(as_float32.to_json())  # numpy scalars would not serialize


VALID = dict(sampling_rate=0.01, noise_multiplier=1.0, rounds=100, delta=1e-6)


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        ("sampling_rate", math.nan),
        ("sampling_rate", math.inf),
        ("sampling_rate", 1.5),
        ("sampling_rate", 0.0),
        ("noise_multiplier", 0.0),
        ("noise_multiplier", -1.0),
        ("noise_multiplier", math.nan),
        ("rounds", 0),
        ("rounds", 2.5),
        ("rounds", True),
        ("delta", 1.0),
        ("delta", 0.0),
        ("delta", math.inf),
    ],
)
def test_invalid_parameters_raise_value_error_naming_the_parameter(parameter, value):
    with pytest.raises(ValueError, match=parameter):
        training_epsilon(**{**VALID, parameter: value})


def test_invalid_evaluation_and_budget_parameters_are_named():
    with pytest.raises(ValueError, match="evaluation_noise_multiplier"):
        job(0.01, 1.0, 10, z_eval=0.0)
    with pytest.raises(ValueError, match="epsilon_total"):
        filter_budget(epsilon_total=math.nan, delta=1e-6)
    with pytest.raises(ValueError, match="delta"):
        filter_budget(epsilon_total=8.0, delta=1.0)
    with pytest.raises(ValueError, match="orders"):
        filter_budget(epsilon_total=8.0, delta=1e-6, orders=(2.0, 1.0))
    with pytest.raises(ValueError, match="cost has"):
        admits(spent=zero(), cost=(1.0,), budget=zero())


def test_training_event_is_the_documented_dp_accounting_tree():
    assert training_event(sampling_rate=0.01, noise_multiplier=1.0, rounds=7) == (
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0)), 7
        )
    )


# --- calibration ---------------------------------------------------------------------------------


def test_calibrated_noise_multiplier_is_the_smallest_that_meets_the_target():
    params = dict(sampling_rate=0.01, rounds=1000, delta=1e-6)

    z = calibrate_noise_multiplier(target_epsilon=2.0, **params)

    assert training_epsilon(noise_multiplier=z, **params) <= 2.0
    assert training_epsilon(noise_multiplier=z / 1.001, **params) > 2.0


def test_calibrated_rounds_are_the_most_that_meet_the_target():
    params = dict(sampling_rate=0.01, noise_multiplier=1.0, delta=1e-6)

    rounds = calibrate_rounds(target_epsilon=2.0, **params)

    assert training_epsilon(rounds=rounds, **params) <= 2.0
    assert training_epsilon(rounds=rounds + 1, **params) > 2.0


def test_calibrated_rounds_are_zero_when_one_round_is_too_many():
    assert calibrate_rounds(target_epsilon=0.1, sampling_rate=1.0, noise_multiplier=0.5, delta=1e-6) == 0


def test_public_names_are_exported():
    public = [
        "FILTER_ORDERS",
        "training_event",
        "evaluation_event",
        "training_epsilon",
        "pld_epsilon",
        "JobCost",
        "filter_budget",
        "admits",
        "add",
        "subtract",
        "zero",
        "jobs_that_fit",
        "FilterStatus",
        "vector_to_json",
        "vector_from_json",
        "calibrate_noise_multiplier",
        "calibrate_rounds",
    ]
    assert all(hasattr(accounting, name) for name in public)
    assert not hasattr(accounting, "remaining_epsilon_hint")


_rdp_values = st.one_of(st.floats(0.0, 50.0), st.sampled_from([0.0, 5e-324, math.inf]))


@given(spent=st.lists(st.floats(0.0, 40.0), min_size=3, max_size=3),
       cost=st.lists(_rdp_values, min_size=3, max_size=3),
       budget=st.lists(st.floats(0.0, 60.0), min_size=3, max_size=3))
@settings(max_examples=300, deadline=None)
def test_admits_is_exactly_at_least_one_job_that_fits(spent, cost, budget) -> None:  # type: ignore[no-untyped-def]
    """The short-circuiting filter rule and the count of copies agree on every input,
    including costs that round up to the smallest subnormal or to an infinite charge."""
    exact_spent = tuple(Fraction(x) for x in spent)
    exact_budget = tuple(Fraction(x) for x in budget)
    assert admits(spent=exact_spent, cost=cost, budget=exact_budget) == (
        jobs_that_fit(spent=exact_spent, cost=cost, budget=exact_budget) >= 1)
    # at the boundary: a budget that is exactly spent + charge admits, one just below does not
    charges = add(exact_spent, cost)
    if all(math.isfinite(c) for c in cost):
        assert admits(spent=exact_spent, cost=cost, budget=charges)
        tight = tuple(b - Fraction(1, 10**30) for b in charges)
        assert not admits(spent=exact_spent, cost=cost, budget=tight)
