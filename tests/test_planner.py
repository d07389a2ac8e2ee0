"""The parameter planner: a proposal for a target ε from public inputs only (ledger.planner)."""

from __future__ import annotations

import pytest

from ledger.accounting import JobCost
from ledger.planner import Plan, PlanningFailed, plan
from ledger.ranges import RANGES


def _charged(proposal: Plan) -> JobCost:
    return JobCost.for_job(sampling_rate=proposal.sampling_rate,
                           noise_multiplier=proposal.noise_multiplier, rounds=proposal.rounds,
                           evaluation_noise_multiplier=None,
                           clipped_count_stddev=proposal.clipped_count_stddev)


@pytest.mark.parametrize("users, epsilon", [(9_500, 4.0), (927, 4.0)])
def test_a_plan_fits_the_target_epsilon_and_the_admissible_ranges(users, epsilon):
    delta = users**-1.1
    proposal = plan(users=users, epsilon=epsilon, delta=delta, parameters=24_000)
    assert _charged(proposal).epsilon(delta) == proposal.epsilon <= epsilon
    assert proposal.epsilon >= 0.99 * epsilon  # the budget is spent, not left on the table
    assert RANGES["noise_multiplier"].contains(proposal.noise_multiplier)
    assert RANGES["rounds"].contains(proposal.rounds) and proposal.rounds >= 100
    assert proposal.client_updates <= 1_000_000
    assert proposal.expected_clients_per_round == pytest.approx(proposal.sampling_rate * users)
    assert any(f"{proposal.rounds:,} rounds" in line for line in proposal.explanation)


def test_with_room_the_plan_keeps_the_noise_on_the_average_under_the_ratio_and_spends_the_budget():
    proposal = plan(users=9_500, epsilon=4.0, delta=9_500**-1.1, parameters=24_000,
                    noise_ratio=0.01, client_updates=1_000_000)
    assert proposal.noise_ratio <= 0.01
    assert proposal.client_updates >= 0.99 * 1_000_000
    assert proposal.clip_strategy == "adaptive"  # hundreds of clients: the count is cheap
    assert proposal.job_parameters()["clipped_count_stddev"] == pytest.approx(
        0.05 * proposal.expected_clients_per_round)


def test_a_target_nothing_can_meet_is_refused_with_what_to_change():
    with pytest.raises(PlanningFailed, match="raise ε"):
        plan(users=50, epsilon=1e-4, delta=1e-3, parameters=100)


def test_the_node_plans_on_the_datasets_public_count_and_the_plan_submits_as_estimated(
        node_dir):
    """POST /v1/plan: the planner on N̂ and δ, the job fields to submit and their estimate;
    submitting those fields is admitted at the estimated ε. Nothing is charged by planning."""
    from gateway.api.app import create_app
    from tests.conftest import make_researcher
    from tests.test_gateway import signed_client

    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as client:
        public = next(d for d in client.get("/v1/datasets").json()["datasets"]
                      if d["name"] == "demo")
        response = client.post("/v1/plan", json={"dataset": "demo", "target_epsilon": 4.0,
                                                 "parameters": 610, "evaluate": False})
        assert response.status_code == 200, response.text
        proposal = response.json()
        estimate = client.post("/v1/estimate", json=proposal["job"]).json()
        hidden = client.post("/v1/plan", json={"dataset": "secret", "target_epsilon": 4.0})
        malformed = client.post("/v1/plan", json={"dataset": "demo", "target_epsilon": "4"})
    plan_json, job = proposal["plan"], proposal["job"]
    assert plan_json["expected_clients_per_round"] == pytest.approx(
        plan_json["sampling_rate"] * public["public_users"])
    assert job["clients_per_round"] == plan_json["expected_clients_per_round"]
    assert estimate["epsilon"] == proposal["estimate"]["epsilon"] <= 4.0
    assert proposal["estimate"]["fits"]
    assert plan_json["explanation"]
    assert hidden.status_code == 404  # an unknown dataset and a hidden one look the same
    assert malformed.status_code == 422 and malformed.json()["field"] == "target_epsilon"


def test_when_no_rate_keeps_the_noise_ratio_the_plan_still_stays_within_the_compute_budget():
    proposal = plan(users=1_046, epsilon=4.0, delta=1e-4, parameters=8_569, client_updates=5_000)
    assert proposal.client_updates <= 5_000
    assert proposal.noise_ratio > 0.01  # the explanation says it is above the target
    assert any("above the target" in line for line in proposal.explanation)


@pytest.mark.parametrize(("epsilon", "delta"), [(1.0, 1e-5), (4.0, 1e-4), (8.0, 1e-6)])
def test_minimum_users_is_where_full_participation_first_meets_the_noise_target(
        epsilon: float, delta: float) -> None:
    """``minimum_users`` (what `fedgate dataset import` compares the dataset with): with that
    many users, 100 rounds of every user at noise 1 % of the clip on the average fit ε; with 1 %
    fewer they do not, and no sampling rate does better than every user."""
    from ledger.accounting import calibrate_rounds
    from ledger.planner import minimum_users

    needed = minimum_users(epsilon=epsilon, delta=delta)

    def rounds(users: float, q: float = 1.0) -> int:
        return calibrate_rounds(target_epsilon=epsilon, sampling_rate=q,
                                noise_multiplier=0.01 * q * users, delta=delta)

    assert rounds(needed) >= 100
    assert rounds(0.99 * needed) < 100
    assert all(rounds(0.99 * needed, q) < 100 for q in (0.8, 0.5, 0.2))
