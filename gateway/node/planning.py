"""``POST /v1/plan``: a proposed job for a target ε on a dataset (``ledger.planner``).

Inputs are the dataset's public user count N̂ and δ, the target ε and the researcher's model
size and compute budget: never data, so the plan and any refusal reveal nothing private. The
policy is asked before any planning work (as for an estimate), then the planned job is
estimated like any other (ε with DP evaluation, whether it fits the filter now, how many such
jobs fit); while it does not fit, the target is lowered by 20 % and planned again (at most 8
times), and the explanation says so. Charges nothing. Planning costs a few seconds of CPU
(bisections over the RDP accountant), so the node plans one request at a time and refuses
others with 429 meanwhile.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from gateway.node.admission import (
    JobRequest,
    dataset_for_estimate,
    estimate_job,
)
from gateway.node.identity import VerifiedRequest
from gateway.node.node import Node
from gateway.protocol.problems import Problem
from ledger.planner import DEFAULT_CLIENT_UPDATES, PlanningFailed, plan

__all__ = ["DEFAULT_INITIAL_CLIP", "plan_job"]

DEFAULT_INITIAL_CLIP = 0.1
"""The clip of a planned job when the request names none (TFF's adaptive clipping starts at
0.1; with adaptive clipping it then moves toward the median update norm)."""
_FIELDS = {"dataset", "target_epsilon", "parameters", "client_updates", "clip", "evaluate"}
_PLANNING = threading.BoundedSemaphore(1)
_FIT_ATTEMPTS, _FIT_STEP = 8, 0.8


def plan_job(node: Node, principal: VerifiedRequest, body: Any) -> dict[str, Any]:
    """The planner's proposal for ``body`` = {dataset, target_epsilon, parameters?,
    client_updates?, clip?, evaluate?}: ``plan`` (the configuration and why), ``job`` (the
    request fields to submit) and ``estimate`` (as ``/v1/estimate`` reports it)."""
    if not isinstance(body, dict):
        raise Problem("invalid-request", "the body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise Problem("invalid-request", f"unknown fields: {', '.join(unknown)}")
    target = _number(body, "target_epsilon", low=1e-3, high=1e3)
    parameters = int(_number(body, "parameters", low=1, high=2e7, default=10_000, integer=True))
    updates = int(_number(body, "client_updates", low=1e3, high=1e9,
                          default=DEFAULT_CLIENT_UPDATES, integer=True))
    evaluate = body.get("evaluate", True)
    if not isinstance(evaluate, bool):
        raise Problem("invalid-request", "evaluate must be true or false", field="evaluate")
    placeholder = JobRequest.from_json({"dataset": body.get("dataset"), "rounds": 1,
                                        "clients_per_round": 1, "noise_multiplier": 1.0,
                                        "clip": body.get("clip", DEFAULT_INITIAL_CLIP),
                                        "evaluate": evaluate}, needs_model=False)
    dataset = dataset_for_estimate(node, principal, placeholder)  # policy before any work
    if not _PLANNING.acquire(blocking=False):
        raise Problem("quota-exceeded", "the node is computing another plan; retry in a few "
                      "seconds")
    try:
        for attempt in range(_FIT_ATTEMPTS):  # lower the target until the plan fits the filter
            aim = target * _FIT_STEP**attempt
            try:
                proposal = plan(users=dataset.public_users, epsilon=aim, delta=dataset.delta,
                                parameters=parameters, client_updates=updates)
            except PlanningFailed as error:
                raise Problem("invalid-request", str(error), field="target_epsilon") from None
            job = {"dataset": dataset.name, "clip": placeholder.clip, "evaluate": evaluate,
                   **proposal.job_parameters()}
            request = JobRequest.from_json(job, needs_model=False)
            estimate = estimate_job(node, principal, request)
            if estimate["fits"]:
                break
    finally:
        _PLANNING.release()
    result = proposal.to_json()
    if aim < target:
        verdict = "fits" if estimate["fits"] else "still does not fit"
        result["explanation"].insert(0, f"Target lowered from ε = {target:g} to {aim:.3g}: the "
                                        f"plan for {target:g} does not fit the dataset's "
                                        f"remaining budget; this one {verdict}.")
    return {"plan": result, "job": job, "estimate": estimate}


def _number(body: dict[str, Any], field: str, *, low: float, high: float,
            default: float | None = None, integer: bool = False) -> float:
    value = body.get(field, default)
    kind = "an integer" if integer else "a number"
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or (integer and not isinstance(value, int))
            or not (math.isfinite(value) and low <= value <= high)):
        raise Problem("invalid-request", f"{field} must be {kind} in [{low:g}, {high:g}]",
                      field=field)
    return float(value)
