"""Memory is bounded and predictable, and a job that would not fit — or whose model the engine
does not train — is refused before data access.

``engine.memory.job_memory`` estimates the engine's peak from public inputs only (the validated
architecture, the owner's per-user cap, batch, local epochs, clients per round). The gateway's
estimate reports it, admission refuses a job above the node's ``[engine.limits] memory_bytes``
with the largest ``clients_per_round`` that fits (nothing reserved, the refusal audited), and
the engine checks the same estimate against the limit in job.json before it reads data.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from engine.artifact import validate_artifact_structure
from engine.job import JobSpec, JobSpecInvalid
from engine.keras_config import check_model_config
from engine.memory import ENGINE_BASE_BYTES, job_memory, max_clients_per_round
from gateway.api.app import create_app
from tests.conftest import make_researcher
from tests.test_gateway import JOB, audit_entries, signed_client
from tests.test_privacy_hardening import ENGINE_JOB
from tests.test_review import submit

FIXTURES = Path(__file__).parent / "fixtures"


def _logreg_summary() -> Any:
    return validate_artifact_structure(json.loads((FIXTURES / "logreg-20x5.json").read_text()))


def _estimate(clients: float, **changes: Any) -> Any:
    summary = _logreg_summary()
    inputs = dict(parameters=summary.parameter_count, example_floats=20,
                  working_elements=summary.working_elements, cap=256, local_epochs=1,
                  batch_size=16)
    return job_memory(**{**inputs, **changes}, clients_per_round=clients)


def _set_memory_limit(node_dir: Path, limit: int) -> None:
    config = node_dir / "fedgate.toml"
    text, count = re.subn(r"(?m)^memory_bytes = \d+$", f"memory_bytes = {limit}",
                          config.read_text())
    assert count == 1
    config.write_text(text)


def test_memory_grows_with_clients_per_round_cap_and_batch_and_never_reads_data() -> None:
    small = _estimate(100)
    assert small.bytes > ENGINE_BASE_BYTES
    assert _estimate(1000).bytes > small.bytes
    assert _estimate(100, cap=1024).per_user_bytes > small.per_user_bytes
    assert _estimate(100, batch_size=64).per_user_bytes > small.per_user_bytes
    # A batch beyond a user's whole local work (E·cap) costs no more than E·cap.
    assert _estimate(100, batch_size=10**9).bytes == _estimate(100, batch_size=256).bytes
    assert small.users_in_flight >= 100 + 6 * 10  # the Poisson tail, six sigmas


def test_a_tiny_model_with_huge_activations_is_too_large_by_its_working_memory() -> None:
    """A 10-parameter chain of Concatenate layers doubles its activations at every step:
    parameters bound nothing; the working elements of its forward pass do."""
    layers: list[dict[str, Any]] = [
        {"class_name": "InputLayer", "name": "in", "inbound_nodes": [],
         "config": {"name": "in", "batch_input_shape": [None, 20]}},
        {"class_name": "Dense", "name": "d0", "inbound_nodes": [[["in", 0, 0, {}]]],
         "config": {"name": "d0", "units": 1}},
    ]
    previous = "d0"
    for i in range(26):
        layers.append({"class_name": "Concatenate", "name": f"c{i}",
                       "inbound_nodes": [[[previous, 0, 0, {}], [previous, 0, 0, {}]]],
                       "config": {"name": f"c{i}", "axis": -1}})
        previous = f"c{i}"
    layers += [
        {"class_name": "Reshape", "name": "r", "inbound_nodes": [[[previous, 0, 0, {}]]],
         "config": {"name": "r", "target_shape": [-1, 1]}},
        {"class_name": "GlobalAveragePooling1D", "name": "g", "inbound_nodes": [[["r", 0, 0, {}]]],
         "config": {"name": "g"}},
        {"class_name": "Dense", "name": "out", "inbound_nodes": [[["g", 0, 0, {}]]],
         "config": {"name": "out", "units": 2, "activation": "softmax"}},
    ]
    config = {"class_name": "Functional", "config": {
        "name": "chain", "layers": layers, "input_layers": [["in", 0, 0]],
        "output_layers": [["out", 0, 0]]}}
    summary = check_model_config(config)
    assert summary.parameter_count == 25
    assert summary.working_elements > 2**27  # 2^26 floats out of the last Concatenate alone
    estimate = job_memory(parameters=summary.parameter_count, example_floats=20,
                          working_elements=summary.working_elements, cap=64, local_epochs=1,
                          batch_size=16, clients_per_round=10)
    assert estimate.bytes > 8 * 2**30
    assert max_clients_per_round(8 * 2**30, parameters=summary.parameter_count,
                                 example_floats=20, working_elements=summary.working_elements,
                                 cap=64, local_epochs=1, batch_size=16) == 0


def test_an_oversized_job_is_refused_at_admission_with_the_clients_per_round_that_fit(
    node_dir: Path, db_url: str
) -> None:
    limit = _estimate(100).bytes
    _set_memory_limit(node_dir, limit)
    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as client:
        fits = submit(client, {**JOB, "clients_per_round": 100, "noise_multiplier": 5.0,
                                "rounds": 2})
        too_large = submit(client, {**JOB, "clients_per_round": 200})
        digest = client.post("/v1/models", content=(FIXTURES / "logreg-20x5.json").read_bytes(),
                             headers={"Content-Type": "application/json"}).json()["digest"]
        estimate = client.post("/v1/estimate", json={**JOB, "clients_per_round": 200,
                                                     "model_digest": digest}).json()
    assert fits.status_code == 202, fits.text
    assert too_large.status_code == 422, too_large.text
    problem = too_large.json()
    assert problem["type"].endswith("job-too-large") and problem["field"] == "clients_per_round"
    assert "lower clients_per_round to ≤ 100;" in problem["detail"] + ";"
    assert estimate["resources_fit"] is False and estimate["memory"]["limit_bytes"] == limit
    assert estimate["resources_problem"] == problem["detail"]
    entries = audit_entries(db_url)
    denied = [e for e in entries if e["action"] == "deny"]
    assert denied and "job-too-large" in json.dumps(denied[-1])
    assert [e["action"] for e in entries].count("admit") == 1  # nothing reserved for it


def test_the_engine_refuses_a_job_over_the_memory_limit_before_reading_data() -> None:
    summary = _logreg_summary()
    spec = JobSpec.from_json({**ENGINE_JOB, "max_examples_per_user": 256,
                              "memory_limit_bytes": ENGINE_BASE_BYTES})
    with pytest.raises(JobSpecInvalid, match="memory estimate"):
        spec.check_memory(summary)
    roomy = JobSpec.from_json({**ENGINE_JOB, "max_examples_per_user": 256,
                               "memory_limit_bytes": 64 * 2**30})
    assert roomy.check_memory(summary).bytes < 64 * 2**30


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "8GiB"])
def test_a_malformed_memory_limit_in_job_json_is_refused(limit: object) -> None:
    with pytest.raises(JobSpecInvalid):
        JobSpec.from_json({**ENGINE_JOB, "memory_limit_bytes": limit})


def test_a_model_the_engine_cannot_train_is_refused_at_admission_with_the_reason(
    node_dir: Path, db_url: str
) -> None:
    """A regularizer passes the artifact validator but the vectorized engine does not run it:
    refused before anything is reserved, saying why (never a per-user fallback)."""
    doc = json.loads((FIXTURES / "logreg-20x5.json").read_text())
    doc["config"]["config"]["layers"][-1]["config"]["kernel_regularizer"] = {
        "module": "keras.regularizers", "class_name": "L2", "config": {"l2": 0.01},
        "registered_name": None}
    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as client:
        uploaded = client.post("/v1/models", content=json.dumps(doc).encode(),
                               headers={"Content-Type": "application/json"})
        assert uploaded.status_code in (200, 201), uploaded.text
        response = client.post("/v1/jobs", json={**JOB, "model_digest": uploaded.json()["digest"]})
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["type"].endswith("model-rejected")
    assert "the engine cannot train this model" in problem["detail"]
    assert "regularizers" in problem["detail"]
    assert [e["action"] for e in audit_entries(db_url)].count("admit") == 0


def test_forward_flops_count_the_multiply_adds_of_every_kernel() -> None:
    summary = _logreg_summary()
    assert summary.forward_flops == 2 * 20 * 5
    config = {"class_name": "Sequential", "config": {"name": "cnn", "layers": [
        {"class_name": "InputLayer", "config": {"batch_input_shape": [None, 36], "name": "in"}},
        {"class_name": "Reshape", "config": {"name": "r", "target_shape": [6, 6, 1]}},
        {"class_name": "Conv2D", "config": {"name": "c", "filters": 4, "kernel_size": [3, 3]}},
        {"class_name": "Flatten", "config": {"name": "f"}},
        {"class_name": "Dense", "config": {"name": "d", "units": 5}}]}}
    conv, dense = 2 * (4 * 4 * 4) * 9 * 1, 2 * 5 * 64
    reshape, flatten = 36 + 36, 64 + 64  # weight-free: outputs + inputs
    assert check_model_config(config).forward_flops == reshape + conv + flatten + dense


def test_a_job_that_cannot_finish_within_the_node_time_limit_is_refused_before_reserving(
    node_dir: Path, db_url: str
) -> None:
    """Issue 22: 100,000 rounds × 100 local epochs × batch 1 cost ε 0.04, was admitted, ran to
    the timeout and was charged. Its time estimate now refuses it with the rounds that fit."""
    alice = make_researcher(node_dir, "alice")
    attack = {**JOB, "rounds": 100_000, "local_epochs": 100, "batch_size": 1,
              "clients_per_round": 1, "noise_multiplier": 50.0}
    with signed_client(create_app(node_dir), alice) as client:
        refused = submit(client, attack)
    assert refused.status_code == 422, refused.text
    problem = refused.json()
    assert problem["type"].endswith("job-too-large") and problem["field"] == "rounds"
    assert re.search(r"lower rounds to ≤ \d+", problem["detail"])
    assert "may run 60 min" in problem["detail"]
    assert [e["action"] for e in audit_entries(db_url)].count("admit") == 0
