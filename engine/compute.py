"""How long a job's training takes: a pure function of public, validated inputs.

Like :mod:`engine.memory`, the inputs are the validated architecture (its forward FLOPs per
example, ``engine.keras_config.ConfigSummary.forward_flops``), the owner's per-user cap, and the
job's rounds, local epochs and expected clients per round — never the data or the exact user
count. The gateway compares the estimate with the node's job time limit
(``[engine] job_timeout_seconds``) at admission, so a job that cannot finish is refused before
any budget is reserved or data read (issue 22: 100,000 rounds × 100 epochs × batch 1 cost
ε 0.04 and ran until the timeout, charged).

Model of the vectorized engine (constants measured on a shared 2-core VM, docs/performance.md,
rounded so that the estimate errs long):

* every round costs :data:`ROUND_SECONDS` (TFF's fixed cost: broadcast, aggregation, noise,
  server optimizer, one shard file);
* every expected client costs :data:`UPDATE_SECONDS` (sampling, gathering, padding) plus the
  arithmetic of their padded local work, ``3 × forward FLOPs × E × cap`` (forward and backward),
  at :data:`FLOPS_PER_SECOND` — the rate the engine reaches on small per-user models, far below
  the machine's matmul peak.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["FLOPS_PER_SECOND", "ROUND_SECONDS", "UPDATE_SECONDS", "ComputeEstimate",
           "job_compute", "max_rounds"]

ROUND_SECONDS = 0.05
UPDATE_SECONDS = 30e-6
FLOPS_PER_SECOND = 5e9


@dataclass(frozen=True)
class ComputeEstimate:
    """A job's expected training time and arithmetic."""

    seconds: float
    flops: float

    def to_json(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 1), "flops": self.flops}


def job_compute(*, forward_flops: int, cap: int, local_epochs: int, rounds: int,
                clients_per_round: float) -> ComputeEstimate:
    """The expected training time of a job (see the module's model)."""
    per_update = 3.0 * forward_flops * local_epochs * cap
    flops = rounds * clients_per_round * per_update
    seconds = rounds * (ROUND_SECONDS + clients_per_round
                        * (UPDATE_SECONDS + per_update / FLOPS_PER_SECOND))
    return ComputeEstimate(seconds=seconds, flops=flops)


def max_rounds(limit_seconds: float, *, forward_flops: int, cap: int, local_epochs: int,
               clients_per_round: float) -> int:
    """The most rounds whose estimate fits ``limit_seconds`` (0 if not even one)."""
    one = job_compute(forward_flops=forward_flops, cap=cap, local_epochs=local_epochs,
                      rounds=1, clients_per_round=clients_per_round).seconds
    return int(limit_seconds // one)
