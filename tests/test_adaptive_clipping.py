"""Adaptive clipping (Andrew et al. 2021) as a job option, specified.

The round releases two Gaussian queries on the same Poisson sample: the sum of updates clipped
to C_t (noise z_Δ·C_t) and the centred count of users whose update norm is at most C_t (each
user adds ±1/2, noise σ_b). The ledger charges their composition; the job's noise_multiplier z
is the effective multiplier, so it costs what a fixed-clip job with z costs; the engine runs
σ_t ≥ z_Δ·C_t in float32 for every C_t it can reach.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.job import JobSpec, JobSpecInvalid
from ledger import accounting
from ledger.accounting import FILTER_ORDERS, JobCost, add, admits, filter_budget, jobs_that_fit, zero
from ledger.mechanism import MechanismParameterInvalid, validate_adaptive_clipping
from ledger.ranges import MAX_NOISE_STDDEV, MIN_NOISE_STDDEV

FAST = settings(max_examples=50, deadline=None)
sampling_rates = st.floats(min_value=1e-3, max_value=1.0)
noise_multipliers = st.floats(min_value=0.5, max_value=10.0)
round_counts = st.integers(min_value=1, max_value=5000)


def job(q: float, z: float, rounds: int) -> JobCost:
    return JobCost.for_job(sampling_rate=q, noise_multiplier=z, rounds=rounds,
                           evaluation_noise_multiplier=None)


# --- the ledger charges the composition -------------------------------------------------------

count_stddevs = st.floats(min_value=0.5, max_value=1e4)


def adaptive_job(q: float, z: float, rounds: int, sigma_b: float) -> JobCost:
    return JobCost.for_job(sampling_rate=q, noise_multiplier=z, rounds=rounds,
                           evaluation_noise_multiplier=None, clipped_count_stddev=sigma_b)


@FAST
@given(sampling_rates, noise_multipliers, round_counts, count_stddevs,
       st.sampled_from([1e-5, 1e-7]))
def test_adaptive_clipping_costs_exactly_the_composition_of_its_two_gaussian_queries(
        q, z, rounds, sigma_b, delta):
    """ε of an adaptive job = dp-accounting's RDP composition of the update query (z_Δ, at
    sensitivity C) and the centred clipped-count query (σ_b at sensitivity 1/2: multiplier
    2σ_b), both on the same Poisson sample, every round; and the effective multiplier is z."""
    if 2 * sigma_b <= z * (1 + 1e-6):
        with pytest.raises(accounting.InvalidPrivacyParameter, match="clipped_count_stddev"):
            adaptive_job(q, z, rounds, sigma_b)
        return
    z_update = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
    direct = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z_update),
                                          dp_accounting.GaussianDpEvent(2 * sigma_b)])), rounds)
    accountant = RdpAccountant()
    accountant.compose(direct)
    cost = adaptive_job(q, z, rounds, sigma_b)
    assert cost.epsilon(delta) == pytest.approx(accountant.get_epsilon(delta), rel=1e-12)
    assert cost.epsilon_after_rounds(rounds, delta) == cost.epsilon(delta)
    assert accounting.effective_noise_multiplier(cost.training.event.event) == pytest.approx(
        z, rel=1e-9)
    assert cost.epsilon(delta) == pytest.approx(job(q, z, rounds).epsilon(delta), rel=1e-6)


@FAST
@given(sampling_rates, noise_multipliers, round_counts, count_stddevs)
def test_an_adaptive_rounds_rdp_is_the_gaussian_of_its_effective_multiplier_bit_for_bit(
        q, z, rounds, sigma_b):
    """The progress bar counts an adaptive round as Gaussian(effective z): the same RDP curve
    dp-accounting computes for the composition, so ε so far never understates the charge."""
    if 2 * sigma_b <= z * (1 + 1e-6):
        return
    cost = adaptive_job(q, z, rounds, sigma_b)
    effective = accounting.effective_noise_multiplier(cost.training.event.event)
    assert cost.rdp() == job(q, effective, rounds).rdp()


@FAST
@given(sampling_rates, noise_multipliers, round_counts, count_stddevs)
def test_adaptive_job_cost_json_round_trip_is_exact(q, z, rounds, sigma_b):
    if 2 * sigma_b <= z * (1 + 1e-6):
        return
    cost = adaptive_job(q, z, rounds, sigma_b)
    restored = JobCost.from_json(json.loads(json.dumps(cost.to_json())))
    assert restored == cost
    assert accounting.clipped_count_stddev_of(restored.training.event.event) == pytest.approx(
        sigma_b, rel=1e-15)


def test_a_stored_composition_of_anything_but_two_gaussians_is_refused():
    stored = adaptive_job(0.01, 1.0, 10, 5.0).to_json()
    three = json.loads(json.dumps(stored))
    inner = three["training"]["event"]["event"]
    inner["events"].append(inner["events"][0])
    with pytest.raises(ValueError, match="exactly two"):
        JobCost.from_json(three)
    laplace = json.loads(json.dumps(stored))
    laplace["training"]["event"]["event"]["events"][1] = {
        "module_name": "dp_accounting.dp_event", "class_name": "LaplaceDpEvent",
        "parameter": 1.0}
    with pytest.raises(ValueError, match="unsupported DP event"):
        JobCost.from_json(laplace)


def test_the_filter_never_admits_adaptive_jobs_beyond_the_budget():
    """A dataset's filter admits adaptive jobs like any job: until the next one would exceed
    (ε_total, δ) at every order; their composition stays within it."""
    epsilon_total, delta = 4.0, 1e-6
    budget = filter_budget(epsilon_total=epsilon_total, delta=delta)
    cost = adaptive_job(0.02, 1.1, 300, 3.0)
    spent, admitted = zero(), 0
    while admits(spent=spent, cost=cost.rdp(), budget=budget):
        spent, admitted = add(spent, cost.rdp()), admitted + 1
    assert admitted == jobs_that_fit(spent=zero(), cost=cost.rdp(), budget=budget) >= 1
    together = RdpAccountant(list(FILTER_ORDERS))
    together.compose(cost.training, admitted)
    assert together.get_epsilon(delta) <= epsilon_total


# --- the float32 mechanism that runs ------------------------------------------------------------

def _log_uniform(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(math.log(low), math.log(high)).map(math.exp).filter(
        lambda x: low <= x <= high)


@settings(max_examples=300, deadline=None)
@given(z=_log_uniform(1e-2, 1e4), headroom=_log_uniform(1.001, 1e4),
       position=st.floats(0.0, 1.0), initial=_log_uniform(1e-9, 1e6))
def test_every_reachable_clip_runs_float32_noise_at_least_z_update_times_that_clip(
        z, headroom, position, initial):
    """Whatever C_t the noised count drives the clip to, it is clamped to [min_clip, max_clip],
    and σ_t = float32(C_t × m) is a normal float32 in the exact range with σ_t ≥ z_Δ·C_t·(1 +
    2⁻¹⁹) (the fixed path's room for the clip's rounding)."""
    try:
        adaptive = validate_adaptive_clipping(
            clip=initial, noise_multiplier=z, clipped_count_stddev=z / 2 * headroom,
            target_unclipped_quantile=0.5, clip_learning_rate=0.2)
    except MechanismParameterInvalid:
        return  # refused: nothing runs
    low, high = np.float32(adaptive.min_clip), np.float32(adaptive.max_clip)
    assert low <= np.float32(initial) <= high
    clip = np.float32(math.exp(math.log(float(low)) * (1 - position)
                               + math.log(float(high)) * position))
    for c in (low, high, np.clip(clip, low, high)):
        sigma = c * np.float32(adaptive.update_multiplier32)  # what the server computes
        assert sigma.dtype == np.float32 and MIN_NOISE_STDDEV <= float(sigma) <= MAX_NOISE_STDDEV
        assert Fraction(float(sigma)) >= (Fraction(adaptive.update_noise_multiplier)
                                          * Fraction(float(c)) * (1 + Fraction(1, 2**19)))


@pytest.mark.parametrize("sigma_b, message", [
    (0.5, "must exceed noise_multiplier / 2"),
    (0.5 + 1e-14, "outside"),
    (-1.0, "clipped_count_stddev must be"),
])
def test_a_clipped_count_noise_that_leaves_no_update_noise_is_refused(sigma_b, message):
    with pytest.raises(MechanismParameterInvalid, match=message) as refused:
        validate_adaptive_clipping(clip=0.1, noise_multiplier=1.0, clipped_count_stddev=sigma_b,
                                   target_unclipped_quantile=0.5, clip_learning_rate=0.2)
    assert refused.value.field == "clipped_count_stddev"


ENGINE_JOB = {
    "job_id": "j", "dataset_dir": "/d", "model_path": "/m", "rounds": 3, "sampling_rate": 0.1,
    "expected_clients_per_round": 10.0, "noise_multiplier": 1.0, "clip": 1.0,
    "client_learning_rate": 0.1, "server_learning_rate": 1.0, "server_momentum": 0.0,
    "local_epochs": 1, "batch_size": 16, "evaluation": None,
}
ADAPTIVE = {"clip_strategy": "adaptive", "clipped_count_stddev": 2.5,
            "target_unclipped_quantile": 0.5, "clip_learning_rate": 0.2}


def test_the_engine_runs_adaptive_clipping_only_as_charged():
    """job.json's clipping fields rebuild the charged event; a job charged as fixed-clip cannot
    run adaptive (its count query was never charged), nor the reverse."""
    adaptive = JobSpec.from_json({**ENGINE_JOB, **ADAPTIVE})
    fixed = JobSpec.from_json(ENGINE_JOB)
    assert adaptive.executed_cost() == JobCost.for_job(
        sampling_rate=0.1, noise_multiplier=1.0, rounds=3, evaluation_noise_multiplier=None,
        clipped_count_stddev=2.5)
    for spec, charged in ((adaptive, fixed), (fixed, adaptive)):
        with pytest.raises(JobSpecInvalid, match="differ from the charged DP event"):
            JobSpec.from_json({**spec.to_json(),
                               "charged_cost": charged.executed_cost().to_json()}).check_charged()


@pytest.mark.parametrize("fields, message", [
    ({"clip_strategy": "adaptive"}, "needs clipped_count_stddev"),
    ({"clipped_count_stddev": 2.5}, "apply to clip_strategy adaptive only"),
    ({"clip_strategy": "quantile"}, "clip_strategy must be one of fixed, adaptive"),
    ({**ADAPTIVE, "clipped_count_stddev": 0.4}, "must exceed noise_multiplier / 2"),
    ({**ADAPTIVE, "target_unclipped_quantile": 1.5}, "target_unclipped_quantile must be"),
])
def test_incomplete_or_inadmissible_clipping_fields_are_refused_before_data_access(
        fields, message):
    with pytest.raises(JobSpecInvalid, match=message):
        JobSpec.from_json({**ENGINE_JOB, **fields})


# --- the gateway admits it like any job and hands the engine what was charged ------------------

def test_an_admitted_adaptive_request_becomes_a_job_json_the_engine_runs_as_charged():
    from gateway.node.admission import JobRequest
    from gateway.node.jobs import engine_job_document

    request = JobRequest.from_json({"dataset": "demo", "rounds": 10, "clients_per_round": 100,
                                    "noise_multiplier": 1.0, "clip": 0.5,
                                    "clip_strategy": "adaptive", "evaluate": False},
                                   needs_model=False)
    assert request.count_stddev() == 5.0  # TFF's default: 5 % of the expected clients
    cost = JobCost.for_job(sampling_rate=0.1, noise_multiplier=1.0, rounds=10,
                           evaluation_noise_multiplier=None, clipped_count_stddev=5.0)
    document = engine_job_document(job_id="j", dataset_dir=Path("/d"), model_path=Path("/m"),
                                   spec=request.spec(), cost=cost, evaluation_loss_clip=1.0,
                                   max_examples_per_user=64)
    spec = JobSpec.from_json(document)
    spec.check_charged()
    assert spec.adaptive_clipping().clipped_count_stddev == 5.0
    assert (spec.target_unclipped_quantile, spec.clip_learning_rate) == (0.5, 0.2)


def test_a_fixed_clip_request_keeps_its_spec_and_refuses_adaptive_only_fields():
    from gateway.node.admission import JobRequest
    from gateway.protocol.problems import Problem

    body = {"dataset": "demo", "rounds": 10, "clients_per_round": 100, "noise_multiplier": 1.0,
            "clip": 0.5}
    spec = JobRequest.from_json(body, needs_model=False).spec()
    assert not {"clip_strategy", "clipped_count_stddev", "target_unclipped_quantile",
                "clip_learning_rate"} & set(spec)  # what fixed-clip manifests always held
    with pytest.raises(Problem, match="adaptive for clipped_count_stddev"):
        JobRequest.from_json({**body, "clipped_count_stddev": 9.0}, needs_model=False)
    with pytest.raises(Problem, match="must exceed noise_multiplier / 2"):  # 5 % of 10 = 0.5
        JobRequest.from_json({**body, "clients_per_round": 10, "clip_strategy": "adaptive"},
                             needs_model=False)
