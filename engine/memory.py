"""How much memory a job's engine needs: a pure function of public, validated inputs.

Inputs are the model's validated architecture (``engine.keras_config.ConfigSummary``: its
parameters, its input floats and the floats one example keeps alive through a forward pass),
the owner's per-user cap, and the job's local epochs, batch size and expected clients per
round. Never the data and never the exact user count, so the estimate, and any refusal based
on it, reveals nothing private. The gateway's admission and estimate and the engine (before it
reads data) call the same :func:`job_memory`.

Model of the vectorized engine (:mod:`engine.shard_process`), in bytes:

* one sampled user holds ``cap`` padded examples (features and label, twice: the runner's copy
  and the worker's), ``E·cap`` order indices, :data:`WEIGHT_COPIES` copies of the model's
  parameters (stacked weights, momentum, gradients, the update, TF temporaries) and the working
  tensors of one local batch (``min(B, E·cap)`` examples × working floats × 3: forward values,
  their gradients and temporaries);
* a shard holds as many users as fit :data:`SHARD_MEMORY_BYTES` (at least one);
* TFF's local runtime trains every shard of a round at once, so the users in flight are the
  round's sampled users, bounded by ``m + 6√m`` for m expected clients (a Poisson-binomial
  count exceeds it with probability below 10⁻⁸ per round);
* plus the engine's fixed base :data:`ENGINE_BASE_BYTES` (TensorFlow, TFF, the runner and its
  worker, measured) and :data:`SERVER_COPIES` copies of the model on the server side.

It is an estimate for admission, not an enforced bound: the sandbox's address-space limit is
the backstop. The per-user path (models the vectorized engine does not run) is estimated with
the same formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["ENGINE_BASE_BYTES", "SHARD_MEMORY_BYTES", "MemoryEstimate", "job_memory",
           "model_inputs", "users_per_shard"]

SHARD_MEMORY_BYTES = 256 * 2**20
"""Memory one shard's tensors may take; sets the users per shard."""
ENGINE_BASE_BYTES = 1536 * 2**20
"""Resident memory of an engine doing nothing yet: TensorFlow and TFF in the runner and in TFF's
worker (measured on a 60 → 10 model, 1,000 users per round: runner 0.8 GiB, worker 0.5 GiB
peak resident, rounded up)."""
WEIGHT_COPIES = 6
SERVER_COPIES = 8  # server weights, optimizer state, aggregate, noise, TFF's serialized copies
_WORKING_COPIES = 3
_TAIL_SIGMAS = 6


@dataclass(frozen=True)
class MemoryEstimate:
    """The engine's expected peak memory for one job, and how it was derived."""

    bytes: int
    per_user_bytes: int
    users_per_shard: int
    users_in_flight: int

    def to_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "per_user_bytes": self.per_user_bytes,
                "users_per_shard": self.users_per_shard,
                "users_in_flight": self.users_in_flight}


def model_inputs(summary: Any, *, cap: int, local_epochs: int, batch_size: int
                 ) -> dict[str, int]:
    """The keyword inputs of :func:`job_memory` (without clients per round) for a validated
    model ``summary`` (``ModelSummary`` or ``ConfigSummary``): the gateway and the engine
    estimate from the same numbers."""
    return {"parameters": summary.parameter_count,
            "example_floats": math.prod(summary.input_shape),
            "working_elements": summary.working_elements, "cap": cap,
            "local_epochs": local_epochs, "batch_size": batch_size}


def per_user_bytes(*, parameters: int, example_floats: int, working_elements: int, cap: int,
                   local_epochs: int, batch_size: int) -> int:
    """Bytes one sampled user occupies while their local training runs."""
    batch = min(batch_size, local_epochs * cap)
    floats = (2 * cap * (example_floats + 1) + local_epochs * cap
              + WEIGHT_COPIES * parameters + _WORKING_COPIES * batch * working_elements)
    return 4 * floats


def users_per_shard(per_user: int, memory_bytes: int = SHARD_MEMORY_BYTES) -> int:
    """Users per shard so that a shard's tensors fit ``memory_bytes`` (1 to 4,096)."""
    return max(1, min(4096, memory_bytes // max(1, per_user)))


def job_memory(*, parameters: int, example_floats: int, working_elements: int, cap: int,
               local_epochs: int, batch_size: int, clients_per_round: float) -> MemoryEstimate:
    """The engine's expected peak memory for a job (see the module's model)."""
    per_user = per_user_bytes(parameters=parameters, example_floats=example_floats,
                              working_elements=working_elements, cap=cap,
                              local_epochs=local_epochs, batch_size=batch_size)
    shard = users_per_shard(per_user)
    in_flight = math.ceil(clients_per_round + _TAIL_SIGMAS * math.sqrt(clients_per_round))
    total = ENGINE_BASE_BYTES + 4 * SERVER_COPIES * parameters + in_flight * per_user
    return MemoryEstimate(bytes=total, per_user_bytes=per_user, users_per_shard=shard,
                          users_in_flight=in_flight)


def max_clients_per_round(limit_bytes: int, *, parameters: int, example_floats: int,
                          working_elements: int, cap: int, local_epochs: int,
                          batch_size: int) -> float:
    """The largest expected clients per round (a multiple of 1) whose estimate fits
    ``limit_bytes``; 0 if not even one client fits."""
    def fits(clients: float) -> bool:
        return job_memory(parameters=parameters, example_floats=example_floats,
                          working_elements=working_elements, cap=cap,
                          local_epochs=local_epochs, batch_size=batch_size,
                          clients_per_round=clients).bytes <= limit_bytes

    if not fits(1.0):
        return 0.0
    low, high = 1, 2
    while fits(float(high)) and high < 10**9:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(float(middle)) else (low, middle)
    return float(low)
