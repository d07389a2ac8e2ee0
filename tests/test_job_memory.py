"""Memory is bounded and predictable, and a job that would not fit is refused before data access.

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
from gateway.app import create_app
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
    assert estimate["memory"]["fits"] is False and estimate["memory"]["limit_bytes"] == limit
    assert estimate["memory"]["problem"] == problem["detail"]
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
