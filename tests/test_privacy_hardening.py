"""Privacy hardening as a specification: the mechanism that runs is the mechanism that is charged.

Each attack below was reproduced against the code before this hardening; each test is named
after the attack it stops:

* float32 edge parameters (a subnormal clip zeroes the noise while ε is charged; a huge clip
  overflows the sum) — one validator (``ledger.mechanism``) used by the gateway and the engine;
* the exact user count leaking through ε (q = clients / N) — every figure uses the public N̂;
* a held job running with less evaluation noise than it was charged — job.json is built from
  the stored cost events and the engine refuses any mismatch;
* data-dependent failure details and one user's diverging update (NaN release) — generic
  failures after data access, non-finite deltas zeroed before clipping;
* seeded sampling — Poisson selection from the OS CSPRNG; per-user work capped by sampling.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.datastore import generate_synthetic
from engine.job import JobSpec, JobSpecInvalid
from engine.training import cap_examples, poisson_sample
from gateway.api.app import GENERIC_FAILURE, create_app, researcher_failure
from gateway.cli import main as fedgate
from gateway.node.admission import JobRequest
from gateway.protocol.problems import Problem
from ledger import mechanism
from ledger.accounting import JobCost
from ledger.db import make_engine, session
from ledger.mechanism import (
    MAX_CLIP,
    MAX_NOISE_MULTIPLIER,
    MAX_USERS,
    MIN_CLIP,
    MIN_NOISE_MULTIPLIER,
    MechanismParameterInvalid,
    noise_stddev,
)
from ledger.models import Dataset, Job
from tests.conftest import charged, in_own_process, make_researcher
from tests.test_gateway import JOB, audit_entries, signed_client
from tests.test_review import submit, write_policy

FLOAT32_TINY = float(np.finfo(np.float32).tiny)
FLOAT32_MAX = float(np.finfo(np.float32).max)
ENGINE_JOB = {
    "job_id": "j", "dataset_dir": "/d", "model_path": "/m", "rounds": 3, "sampling_rate": 0.1,
    "expected_clients_per_round": 10.0, "noise_multiplier": 1.0, "clip": 1.0,
    "client_learning_rate": 0.1, "server_learning_rate": 1.0, "server_momentum": 0.0,
    "local_epochs": 1, "batch_size": 16, "evaluation": {"noise_multiplier": 2.0, "loss_clip": 5.0},
}


def _log_uniform(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(math.log(low), math.log(high)).map(math.exp).filter(
        lambda x: low <= x <= high)


# ---------------------------------------------------------------------------------------------
# 1. float32 edges: one admissible range, derived from the arithmetic that runs

@settings(max_examples=400, deadline=None)
@given(clip=_log_uniform(MIN_CLIP, MAX_CLIP), z=_log_uniform(MIN_NOISE_MULTIPLIER,
                                                             MAX_NOISE_MULTIPLIER))
def test_every_admissible_mechanism_has_float32_noise_at_least_z_times_the_clip_that_runs(
    clip: float, z: float
) -> None:
    sigma = np.float32(noise_stddev(clip=clip, noise_multiplier=z))
    clip32 = np.float32(clip)
    assert float(sigma) == noise_stddev(clip=clip, noise_multiplier=z)  # exactly a float32
    assert sigma >= np.float32(FLOAT32_TINY) * 1e6 and clip32 >= FLOAT32_TINY * 1e6  # normal
    assert float(sigma) / float(clip32) >= z * (1 - 1e-6)
    assert float(sigma) >= z * float(clip32)  # with room for clip_by_global_norm's rounding
    # The noisy sum of the largest possible sample stays finite in float32, with 40 σ of tail.
    worst = np.float32(MAX_USERS) * clip32 + np.float32(40) * sigma
    assert np.isfinite(worst) and worst < np.float32(FLOAT32_MAX)


@settings(max_examples=200, deadline=None)
@given(clip=st.one_of(st.floats(max_value=MIN_CLIP, exclude_max=True),
                      st.floats(min_value=MAX_CLIP, exclude_min=True), st.just(math.nan)))
def test_clips_outside_the_range_are_refused_by_the_gateway_and_the_engine(clip: float) -> None:
    with pytest.raises(Problem) as refused:
        JobRequest.from_json({**JOB, "clip": clip}, needs_model=False)
    assert refused.value.slug == "invalid-request"
    assert refused.value.extra["field"] == "clip"
    assert "admissible range of clip is a number in [1e-09, 1e+06]" in refused.value.detail
    with pytest.raises(JobSpecInvalid, match="clip must be"):
        JobSpec.from_json({**ENGINE_JOB, "clip": clip})


@pytest.mark.parametrize("field, value", [
    ("clip", 1e-38),  # float32 subnormal: noise std z·C flushes to 0
    ("clip", 3e38),  # near float32's max: the sum overflows
    ("noise_multiplier", 1e-30), ("noise_multiplier", 0.0), ("rounds", 0),
    ("client_learning_rate", 1e9), ("local_epochs", 1000), ("batch_size", 0),
])
def test_subnormal_or_overflowing_parameters_that_break_the_charged_mechanism_are_refused(
    field: str, value: Any
) -> None:
    with pytest.raises(Problem, match=f"admissible range of {field}"):
        JobRequest.from_json({**JOB, field: value}, needs_model=False)
    with pytest.raises(JobSpecInvalid):
        JobSpec.from_json({**ENGINE_JOB, field: value})


def test_subnormal_clip_is_refused_at_estimate_and_submit_with_the_range(node_dir: Path) -> None:
    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as client:
        estimate = client.post("/v1/estimate", json={**JOB, "clip": 1e-38})
        submitted = submit(client, {**JOB, "clip": 1e-38})
        calibrated = client.post("/v1/calibrate", json={**JOB, "clip": 1e-38, "target_epsilon": 2,
                                                        "solve_for": "noise_multiplier"})
    for response in (estimate, submitted, calibrated):
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["type"].endswith("invalid-request") and body["field"] == "clip"
        assert body["admissible"] == "a number in [1e-09, 1e+06]"


def test_a_held_job_whose_parameters_left_the_range_cannot_be_approved(node_dir: Path,
                                                                      db_url: str) -> None:
    write_policy(node_dir, "p2, researchers, owner, demo, train, require_review, always\n")
    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as client:
        job_id = submit(client, JOB).json()["job_id"]
    engine = make_engine(db_url)
    with session(engine) as s, s.begin():  # a row admitted under an older, laxer validator
        job = s.get(Job, job_id)
        job.spec = json.dumps({**json.loads(job.spec), "clip": 1e-38})
        s.add(job)
    engine.dispose()
    assert fedgate(["-d", str(node_dir), "review", "approve", job_id, "--reason", "ok"]) == 1
    with session(make_engine(db_url)) as s:
        assert s.get(Job, job_id).state == "pending_review"


@pytest.mark.tff
@in_own_process
def test_the_real_aggregator_at_the_smallest_admissible_clip_and_noise_adds_noise() -> None:
    import tensorflow_federated as tff

    from engine.training import dp_aggregator

    spec = JobSpec.from_json({**ENGINE_JOB, "clip": MIN_CLIP, "noise_multiplier":
                              MIN_NOISE_MULTIPLIER, "expected_clients_per_round": 1.0})
    process = dp_aggregator(spec).create(tff.types.TensorType(np.float32, [64]))
    user = np.full(64, MIN_CLIP / 16, np.float32)  # norm C/2: passes the clip unchanged
    neighbours = {"with the user": [user, user], "without": [user]}
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in neighbours}
    state = process.initialize()
    for _ in range(20):
        for name, clients in neighbours.items():
            result = process.next(state, clients)
            state = result.state
            outputs[name].append(np.asarray(result.result, np.float64))
    sigma = spec.noise_stddev()
    for name, runs in outputs.items():
        runs_array = np.stack(runs)
        assert len({r.tobytes() for r in runs}) == len(runs), f"{name}: repeated outputs"
        noise = runs_array - runs_array.mean(axis=0)
        assert 0.7 * sigma < noise.std() < 1.3 * sigma, name  # the charged σ, not 0
    assert not np.array_equal(outputs["with the user"][0], outputs["without"][0])


@pytest.mark.tff
@in_own_process
def test_a_user_whose_local_training_diverges_cannot_turn_the_release_into_nan() -> None:
    import tensorflow_federated as tff

    from engine.training import dp_aggregator

    spec = JobSpec.from_json({**ENGINE_JOB, "expected_clients_per_round": 1.0})
    process = dp_aggregator(spec).create(tff.types.TensorType(np.float32, [8]))
    honest = np.full(8, 0.1, np.float32)
    diverged = [np.full(8, np.nan, np.float32), np.full(8, np.inf, np.float32),
                np.full(8, 1e30, np.float32)]  # the last: finite, but its norm overflows
    state = process.initialize()
    for bad in diverged:
        result = process.next(state, [honest, bad])
        assert np.all(np.isfinite(result.result)), bad[0]


# ---------------------------------------------------------------------------------------------
# 2. The exact user count N is private: every figure uses the public N̂

def _add_dataset(node_dir: Path, name: str, users: int, public_users: int) -> None:
    table = node_dir.parent / f"{name}.parquet"
    generate_synthetic(table, users=users, features=20, classes=5, seed=users, format="parquet")
    assert fedgate(["-d", str(node_dir), "dataset", "import", name, str(table),
                    "--user-column", "user_id", "--label-column", "label", "--num-classes", "5",
                    "--epsilon-total", "4", "--delta", "1e-5",
                    "--public-users", str(public_users)]) == 0


def test_exact_training_user_count_does_not_change_any_epsilon_or_refusal_a_researcher_sees(
    node_dir: Path, db_url: str
) -> None:
    _add_dataset(node_dir, "small", users=500, public_users=400)
    _add_dataset(node_dir, "large", users=540, public_users=400)
    with session(make_engine(db_url)) as s:
        exact = {name: s.get(Dataset, name).training_users for name in ("small", "large")}
    assert exact["small"] != exact["large"]
    (node_dir / "policies" / "policy.csv").write_text(
        "p, researchers, owner, *, estimate, allow\np, researchers, owner, *, train, allow\n")
    alice = make_researcher(node_dir, "alice")
    seen: dict[str, list[Any]] = {"small": [], "large": []}
    with signed_client(create_app(node_dir), alice) as client:
        listing = {d["name"]: d for d in client.get("/v1/datasets").json()["datasets"]}
        for name in seen:
            job = {**JOB, "dataset": name}
            seen[name].append(listing[name]["public_users"])
            seen[name].append(client.post("/v1/estimate", json=job).json())
            seen[name].append(client.post("/v1/calibrate", json={
                **job, "target_epsilon": 2.0, "solve_for": "noise_multiplier"}).json())
            over = client.post("/v1/estimate", json={**job, "clients_per_round": 401}).json()
            seen[name].append(over["detail"].replace(name, "DATASET"))
            status = submit(client, job).json()
            seen[name].append({k: status[k] for k in ("epsilon", "delta", "progress")})
    for answers in seen.values():
        for answer in answers[1:3]:
            assert answer.pop("dataset") in seen
    assert seen["small"] == seen["large"]
    assert "public user count N̂ = 400" in seen["small"][3]


def test_the_public_count_estimate_is_charged_once_at_import_and_the_burn_down_replays_it(
    node_dir: Path, synthetic_table: Path, db_url: str
) -> None:
    from ledger.burndown import burn_down

    assert fedgate(["-d", str(node_dir), "dataset", "import", "estimated", str(synthetic_table),
                    "--user-column", "user_id", "--label-column", "label", "--num-classes", "5",
                    "--epsilon-total", "4", "--delta", "1e-5"]) == 0
    with session(make_engine(db_url)) as s:
        dataset = s.get(Dataset, "estimated")
        declared = s.get(Dataset, "demo")
    assert dataset.public_users_source == "dp-estimate"
    assert dataset.spent_rdp != declared.spent_rdp  # the count's event is charged
    assert abs(dataset.public_users - dataset.training_users) < 20 * 6
    charges = [e for e in audit_entries(db_url)
               if e["action"] == "charge" and e.get("dataset") == "estimated"]
    assert [c["decision"] for c in charges] == ["public-user-count"]
    assert charges[0]["event"]["noise_multiplier"] == 20.0
    assert burn_down(dataset, []).matches_ledger


def test_a_delta_not_below_one_over_the_public_count_is_refused_at_import(
    node_dir: Path, synthetic_table: Path
) -> None:
    assert fedgate(["-d", str(node_dir), "dataset", "import", "loose", str(synthetic_table),
                    "--user-column", "user_id", "--label-column", "label",
                    "--epsilon-total", "4", "--delta", "0.01", "--public-users", "480"]) == 2
    assert not (node_dir / "datasets" / "loose").exists()


# ---------------------------------------------------------------------------------------------
# 3. The evaluation noise that runs is the one charged

def test_a_held_job_approved_after_a_config_change_runs_exactly_the_charged_evaluation_noise(
    node_dir: Path, db_url: str
) -> None:
    from gateway.node.jobs import write_job_directory
    from gateway.node.node import Node

    write_policy(node_dir, "p2, researchers, owner, demo, train, require_review, always\n")
    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as client:
        job_id = submit(client, JOB).json()["job_id"]
    config = node_dir / "fedgate.toml"
    config.write_text(config.read_text().replace("evaluation_noise_multiplier = 10.0",
                                                 "evaluation_noise_multiplier = 0.5"))
    assert fedgate(["-d", str(node_dir), "review", "approve", job_id, "--reason", "ok"]) == 0
    node = Node(node_dir)
    assert node.config.evaluation_noise_multiplier == 0.5
    with node.session() as s:
        job, dataset = s.get(Job, job_id), s.get(Dataset, "demo")
    charged_cost = JobCost.from_json(json.loads(job.cost))
    document = json.loads((write_job_directory(node, job, dataset) / "job.json").read_text())
    assert document["evaluation"]["noise_multiplier"] == 10.0
    spec = JobSpec.from_json(document)
    spec.check_charged()
    assert spec.executed_cost() == charged_cost


def test_the_engine_refuses_a_job_json_whose_noise_differs_from_the_charged_event() -> None:
    job = charged(ENGINE_JOB)
    for tampered in ({**job, "evaluation": {"noise_multiplier": 0.5, "loss_clip": 5.0}},
                     {**job, "noise_multiplier": 0.9}, {**job, "sampling_rate": 0.2},
                     {**job, "rounds": 4}, {**job, "evaluation": None},
                     {k: v for k, v in job.items() if k != "charged_cost"}):
        with pytest.raises(JobSpecInvalid, match="charged"):
            JobSpec.from_json(tampered).check_charged()
    JobSpec.from_json(job).check_charged()


@pytest.mark.parametrize("value", ["0.0", "-1.0", "1e-30"])
def test_a_node_config_with_no_evaluation_noise_is_refused(node_dir: Path, value: str) -> None:
    from gateway.node.node import Node

    config = node_dir / "fedgate.toml"
    config.write_text(config.read_text().replace("evaluation_noise_multiplier = 10.0",
                                                 f"evaluation_noise_multiplier = {value}"))
    with pytest.raises(ValueError, match="evaluation_noise_multiplier must be"):
        _ = Node(node_dir).config


def test_zero_evaluation_noise_in_job_json_is_refused_by_the_engine() -> None:
    with pytest.raises(JobSpecInvalid, match="noise_multiplier must be finite and > 0"):
        JobSpec.from_json({**ENGINE_JOB, "evaluation": {"noise_multiplier": 0.0,
                                                        "loss_clip": 5.0}})


# ---------------------------------------------------------------------------------------------
# 4. What a researcher observes after data access does not depend on the data

def test_failure_reasons_after_data_access_are_not_shown_to_the_researcher() -> None:
    def job(**fields: Any) -> Job:
        return Job(id="job-1", dataset="demo", researcher_key_id="k", researcher="alice",
                   request_digest="d", model_digest="m", spec="{}", cost="{}", cost_rdp="[]",
                   epsilon=1.0, delta=1e-5, state="failed", budget_state="committed", rounds=3,
                   policy_version="v", created_at=0.0, updated_at=0.0, **fields)

    stop = "stopped at its CPU reservation of 600 s"
    assert researcher_failure(job(failure=stop, data_accessed=True)) == GENERIC_FAILURE
    assert researcher_failure(job(failure="timed out after 60 s", data_accessed=True)) \
        == GENERIC_FAILURE
    assert researcher_failure(job(failure="sandbox unavailable", data_accessed=False)) \
        == "sandbox unavailable"
    assert researcher_failure(job(failure="cancelled by the researcher", data_accessed=True)) \
        == "cancelled by the researcher"


def test_each_user_trains_on_at_most_the_owners_cap_of_examples_a_fresh_subset_each_round() -> None:
    rng = np.random.default_rng(0)
    features = np.arange(1000, dtype=np.float32).reshape(500, 2)
    labels = np.arange(500, dtype=np.int32)
    subsets = [cap_examples(rng, features, labels, 64) for _ in range(2)]
    for f, y in subsets:
        assert len(y) == 64 and len(set(y.tolist())) == 64
        assert np.array_equal(f[:, 0] // 2, y)  # rows stay paired
    assert not np.array_equal(subsets[0][1], subsets[1][1])
    small = cap_examples(rng, features[:10], labels[:10], 64)
    assert np.array_equal(small[1], labels[:10])


def test_the_cap_travels_from_the_dataset_to_the_engine_and_is_validated() -> None:
    assert JobSpec.from_json({**ENGINE_JOB, "max_examples_per_user": 32}) \
        .max_examples_per_user == 32
    with pytest.raises(JobSpecInvalid, match="max_examples_per_user"):
        JobSpec.from_json({**ENGINE_JOB, "max_examples_per_user": 0})


# ---------------------------------------------------------------------------------------------
# 6. Selection from the OS CSPRNG

def test_poisson_selection_reads_the_os_csprng_and_never_exceeds_the_charged_rate() -> None:
    calls: list[int] = []

    def recording(n: int) -> bytes:
        calls.append(n)
        return bytes(n)  # all-zero draws: everyone below any threshold > 0

    assert len(poisson_sample(10, 1e-19, random_bytes=recording)) == 10
    assert calls == [80]
    assert len(poisson_sample(10, 0.5, random_bytes=lambda n: b"\xff" * n)) == 0
    assert poisson_sample(7, 1.0).tolist() == list(range(7))
    counts = [len(poisson_sample(10_000, 0.05)) for _ in range(20)]
    assert 0.045 < np.mean(counts) / 10_000 < 0.055  # os.urandom by default
    import inspect

    import engine.training

    assert inspect.signature(poisson_sample).parameters["random_bytes"].default is \
        __import__("os").urandom
    assert "default_rng(" not in inspect.getsource(engine.training.poisson_sample)


def test_mechanism_ranges_are_the_ones_the_engine_parses() -> None:
    from engine import job as engine_job

    assert mechanism.RANGES["rounds"].high == engine_job._MAX_ROUNDS
    with pytest.raises(MechanismParameterInvalid, match="noise_multiplier"):
        noise_stddev(clip=1.0, noise_multiplier=0.0)
