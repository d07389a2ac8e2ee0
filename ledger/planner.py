"""Propose DP-FedAvg parameters for a target ε: a pure, documented heuristic.

Inputs are public only: the dataset's public training-user estimate N̂ (never the exact count),
the target (ε, δ), the model's parameter count and a compute budget in client updates. Nothing
here reads data, so a plan (and a refusal to plan) reveals nothing private.

The heuristic (DP-FedAvg's utility is driven by the noise on the averaged update, z·C/(q·N̂),
relative to the clip C, and by how much training happens, rounds × clients per round):

1. For each sampling rate q on a geometric grid (expected clients m = q·N̂ from
   ``min_clients`` up to N̂), allow the most noise the *noise ratio* z/m ≤ ρ permits
   (``noise_ratio``, default 1 %: the noise on the average is at most 1 % of the clip per
   coordinate) and take the most rounds T that keep ε(q, z, T) ≤ target
   (``ledger.accounting.calibrate_rounds``), capped by the compute budget (T·m client
   updates) and ``max_rounds``; keep q if both allow ``min_rounds`` (default 100) rounds.
2. If the budget caps some q (T·m is then the whole budget), lower z to the least that meets
   the target with the capped rounds (``calibrate_noise_multiplier``) and choose the smallest
   such q, hence the most rounds, whose ratio stays ≤ ρ (a binary search: at a fixed budget
   the ratio falls as q grows, z growing about like √q while m grows like q).
   Otherwise choose the q with the most client updates T·m. If no q keeps the ratio, train
   ``min_rounds`` rounds (fewer if the budget cannot afford them even at the smallest q) at
   whichever of the largest affordable q's needs the smallest ratio, and say so.
3. Clip strategy: adaptive (target median, TFF's defaults) when the clipped-count noise
   σ_b = m/20 costs at most 5 % more update noise (z_Δ ≤ 1.05·z); the initial clip then
   matters little. Otherwise fixed, and the explanation says to tune C.

Every proposed job is charged like any other: the caller still asks the filter.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ledger.accounting import (
    JobCost,
    adaptive_update_noise_multiplier,
    calibrate_noise_multiplier,
    calibrate_rounds,
)
from ledger.ranges import ADAPTIVE_DEFAULTS, RANGES

__all__ = ["Plan", "PlanningFailed", "minimum_users", "plan"]

DEFAULT_NOISE_RATIO = 0.01
DEFAULT_MIN_ROUNDS = 100
DEFAULT_CLIENT_UPDATES = 1_000_000
"""About 15 minutes of the demo model on a 2-core node (docs/performance.md)."""
ADAPTIVE_NOISE_PREMIUM = 1.05
COUNT_STDDEV_FRACTION = ADAPTIVE_DEFAULTS["count_stddev_fraction"]
_GRID_POINTS = 16
_FALLBACK_POINTS = 4
_USELESS_RATIO = 1.0


class PlanningFailed(ValueError):
    """No configuration meets the target: the message says what to change."""


@dataclass(frozen=True)
class Plan:
    """A proposed job configuration, its ε and why it was chosen."""

    sampling_rate: float
    expected_clients_per_round: float
    noise_multiplier: float
    rounds: int
    clip_strategy: str
    clipped_count_stddev: float | None
    epsilon: float
    delta: float
    noise_ratio: float
    """z / (q·N̂): the noise std on the averaged update, in units of the clip."""
    client_updates: int
    explanation: list[str] = field(default_factory=list)

    def job_parameters(self) -> dict[str, Any]:
        """The fields a job request takes (adaptive clipping with TFF's defaults)."""
        parameters: dict[str, Any] = {
            "clients_per_round": self.expected_clients_per_round,
            "noise_multiplier": self.noise_multiplier,
            "rounds": self.rounds, "clip_strategy": self.clip_strategy}
        if self.clip_strategy == "adaptive":
            parameters.update(
                clipped_count_stddev=self.clipped_count_stddev,
                target_unclipped_quantile=ADAPTIVE_DEFAULTS["target_unclipped_quantile"],
                clip_learning_rate=ADAPTIVE_DEFAULTS["clip_learning_rate"])
        return parameters

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Candidate:
    q: float
    m: float
    z: float
    rounds: int
    capped: bool

    @property
    def updates(self) -> int:
        return int(self.rounds * self.m)

    @property
    def ratio(self) -> float:
        return self.z / self.m


def plan(*, users: int, epsilon: float, delta: float, parameters: int,
         client_updates: int = DEFAULT_CLIENT_UPDATES, noise_ratio: float = DEFAULT_NOISE_RATIO,
         min_clients: float = 10.0, min_rounds: int = DEFAULT_MIN_ROUNDS,
         max_rounds: int | None = None) -> Plan:
    """The configuration the heuristic in the module docstring proposes for a dataset with the
    public training-user estimate ``users`` (N̂). Raises :class:`PlanningFailed` when even the
    least noisy candidate needs more noise than the engine admits."""
    max_rounds = int(RANGES["rounds"].high) if max_rounds is None else max_rounds
    if users < 1 or epsilon <= 0 or not 0 < delta < 1 or parameters < 1:
        raise PlanningFailed("users, epsilon, parameters must be positive and delta in (0, 1)")
    if not 1 <= min_rounds <= max_rounds:
        raise PlanningFailed("min_rounds must be between 1 and max_rounds")
    low_q = min(1.0, min_clients / users)
    grid = sorted({min(1.0, low_q * (1.0 / low_q) ** (i / (_GRID_POINTS - 1)))
                   for i in range(_GRID_POINTS)})
    quiet: list[_Candidate] = []
    for q in grid:  # one cheap search over rounds per q (the one-round RDP curve is cached)
        m = q * users
        z = max(RANGES["noise_multiplier"].low, noise_ratio * m)
        rounds = calibrate_rounds(target_epsilon=epsilon, sampling_rate=q, noise_multiplier=z,
                                  delta=delta)
        cap = min(max_rounds, max(1, int(client_updates // m)))
        if rounds >= min_rounds and cap >= min_rounds:
            quiet.append(_Candidate(q=q, m=m, z=z, rounds=min(rounds, cap), capped=rounds > cap))
    capped = sorted((c for c in quiet if c.capped), key=lambda c: c.q)
    if capped:  # the budget binds: the most rounds whose least noise keeps the ratio
        best = _calibrated(capped[-1], epsilon, delta)
        low, high = 0, len(capped) - 1  # capped[high] keeps the ratio (its z only fell)
        while low < high:
            middle = (low + high) // 2
            candidate = _calibrated(capped[middle], epsilon, delta)
            if candidate.ratio <= noise_ratio:
                best, high = candidate, middle
            else:
                low = middle + 1
    elif quiet:
        best = max(quiet, key=lambda c: (c.updates, -c.ratio))
    else:  # nothing keeps the ratio: min_rounds rounds (within the budget), least noise ratio
        affordable = [q for q in grid if q * users * min_rounds <= client_updates] or grid[:1]
        best = min((_Candidate(q=q, m=q * users, rounds=min(min_rounds, cap), capped=False,
                               z=calibrate_noise_multiplier(target_epsilon=epsilon,
                                                            sampling_rate=q,
                                                            rounds=min(min_rounds, cap),
                                                            delta=delta))
                    for q in affordable[-_FALLBACK_POINTS:]
                    for cap in [min(max_rounds, max(1, int(client_updates // (q * users))))]),
                   key=lambda c: c.ratio)
    if not RANGES["noise_multiplier"].contains(best.z) or best.ratio > _USELESS_RATIO:
        raise PlanningFailed(
            f"training {best.rounds} rounds within ε = {epsilon:g} needs a noise multiplier of "
            f"{best.z:.3g}: noise on the average of {best.ratio:.3g} clips per coordinate, "
            "nothing a model can learn from: raise ε, or train on a dataset with more users")
    return _explained(best, users=users, epsilon=epsilon, delta=delta, parameters=parameters,
                      noise_ratio=noise_ratio, client_updates=client_updates,
                      quiet=best.ratio <= noise_ratio * (1 + 1e-9))


def minimum_users(*, epsilon: float, delta: float, noise_ratio: float = DEFAULT_NOISE_RATIO,
                  min_rounds: int = DEFAULT_MIN_ROUNDS) -> int:
    """The fewest training users with which the heuristic above can meet its noise target at
    (``epsilon``, ``delta``): ``min_rounds`` rounds whose noise on the averaged update is at
    most ``noise_ratio`` clips, spending the whole ε on one job.

    The most favourable case is every user in every round (q = 1, no sampling to amplify
    privacy but the largest sum to divide the noise by): with z the least noise multiplier that
    fits ``min_rounds`` such rounds into ε, the ratio z/N is within target iff N ≥ z/ρ. With
    fewer users every plan is noisier than the target (``fedgate dataset import`` warns).
    Public inputs only; a bisection of the accountant (about 0.1 s)."""
    z = calibrate_noise_multiplier(target_epsilon=epsilon, sampling_rate=1.0, rounds=min_rounds,
                                   delta=delta)
    return math.ceil(z / noise_ratio)


def _calibrated(candidate: _Candidate, epsilon: float, delta: float) -> _Candidate:
    """``candidate`` with the least noise that meets ε with its (capped) rounds."""
    z = calibrate_noise_multiplier(target_epsilon=epsilon, sampling_rate=candidate.q,
                                   rounds=candidate.rounds, delta=delta)
    return _Candidate(q=candidate.q, m=candidate.m, z=z, rounds=candidate.rounds, capped=True)


def _explained(best: _Candidate, *, users: int, epsilon: float, delta: float, parameters: int,
               noise_ratio: float, client_updates: int, quiet: bool) -> Plan:
    sigma_b = COUNT_STDDEV_FRACTION * best.m
    premium = (adaptive_update_noise_multiplier(noise_multiplier=best.z,
                                                clipped_count_stddev=sigma_b) / best.z
               if 2 * sigma_b > best.z else math.inf)  # z_Δ / z at the same ε
    adaptive = premium <= ADAPTIVE_NOISE_PREMIUM
    strategy = "adaptive" if adaptive else "fixed"
    cost = JobCost.for_job(sampling_rate=best.q, noise_multiplier=best.z, rounds=best.rounds,
                           evaluation_noise_multiplier=None,
                           clipped_count_stddev=sigma_b if adaptive else None)
    spent = cost.epsilon(delta)
    words = [
        f"{best.m:,.0f} expected clients per round (q = {best.q:.4g} of N̂ = {users:,}) for "
        f"{best.rounds:,} rounds: {best.updates:,} client updates "
        f"(budget {client_updates:,}).",
        f"Noise multiplier {best.z:.3g}: the noise on the averaged update is "
        f"{best.ratio:.2%} of the clip per coordinate "
        + ("(target ≤ " if quiet else "(above the target ") + f"{noise_ratio:.2%}); over the "
        f"model's {parameters:,} parameters its norm is {best.ratio * math.sqrt(parameters):.2g}"
        " clips.",
        f"ε = {spent:.3g} at δ = {delta:.2g} (target {epsilon:g}).",
    ]
    if not quiet:
        words.append("No sampling rate keeps the noise ratio under the target at this ε: "
                     "this is the least noisy plan; expect low utility, or raise ε.")
    if adaptive:
        words.append(f"Adaptive clipping toward the median update norm (clipped-count noise "
                     f"σ_b = {sigma_b:.3g}, {premium - 1:.1%} more "
                     "update noise at the same ε): the initial clip matters little.")
    else:
        words.append("Fixed clip: with this few clients per round the clipped-count query "
                     "would cost more than 5 % extra noise; tune C (the median update norm "
                     "of a non-private run on public data is a good start).")
    return Plan(sampling_rate=best.q, expected_clients_per_round=best.m,
                noise_multiplier=best.z, rounds=best.rounds, clip_strategy=strategy,
                clipped_count_stddev=sigma_b if adaptive else None, epsilon=spent, delta=delta,
                noise_ratio=best.ratio, client_updates=best.updates, explanation=words)

