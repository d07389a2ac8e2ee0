"""The public user count N̂ of a dataset: the only user count a researcher ever sees or depends on.

The exact number N of training users is private under add/remove-one-user adjacency: releasing
it (or any function of it, such as ε computed from q = clients/N) is a non-private release.
So every public figure is derived from N̂, which is one of:

* **declared** — a figure the data owner declares public at import (``--public-users``), e.g.
  a published cohort size. Declaring it is the owner's statement that it is public; fedgate
  charges nothing for it.
* **dp-estimate** — N̂ = max(1, round(N + Z)) with Z ~ N(0, σ²), σ = ``COUNT_NOISE_STD``: the
  Gaussian mechanism on a count of sensitivity 1, DP event ``GaussianDpEvent(σ)``, charged once
  to the dataset's privacy filter at import (``ledger.budget.register_dataset``). Rounding and
  clamping are post-processing. Noise from the OS CSPRNG.

How N̂ is used (docs/privacy.md): a job's sampling rate is q = clients_per_round / N̂ (the
researcher's public parameter is the expected clients per round against N̂); each real user is
sampled with probability q, the noisy sum is divided by q·N̂ = clients_per_round; every ε, every
refusal and every bound a researcher sees is a function of (q, z, T, δ, N̂) only.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import dp_accounting

__all__ = [
    "COUNT_NOISE_STD",
    "DeltaTooLarge",
    "PublicUserCount",
    "check_delta",
    "declared_count",
    "dp_count_estimate",
]

COUNT_NOISE_STD = 20.0
"""σ of the Gaussian noise on the training-user count (sensitivity 1): RDP α/800 per order,
ε ≈ 0.3 at δ = 1e-6 on its own; a few percent of a typical dataset budget at the low orders."""

DELTA_WARNING_EXPONENT = 1.1
"""δ above 1/N̂^1.1 draws a warning at import; δ ≥ 1/N̂ is refused."""


@dataclass(frozen=True)
class PublicUserCount:
    """N̂ and how it was obtained; ``event`` is the DP event charged for it (None: declared)."""

    value: int
    source: str  # "declared" | "dp-estimate"
    event: dp_accounting.DpEvent | None


class DeltaTooLarge(ValueError):
    """δ is not small against 1/N̂: a mechanism could release one user's data with prob. δ."""


def declared_count(value: int) -> PublicUserCount:
    """An owner-declared public count (≥ 1); charges nothing."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"the public user count must be an integer ≥ 1, got {value!r}")
    return PublicUserCount(value, "declared", None)


def dp_count_estimate(true_count: int, *, noise_std: float = COUNT_NOISE_STD,
                      rng: random.Random | None = None) -> PublicUserCount:
    """N̂ = max(1, round(N + N(0, σ²))): the Gaussian mechanism on the training-user count.

    Adding or removing one user changes N by at most 1 (sensitivity 1), so the release is the
    ``GaussianDpEvent(σ)`` returned with it, which the caller must charge before N̂ is used.
    ``rng`` defaults to the OS CSPRNG (``random.SystemRandom``); pass a seeded one in tests.
    """
    if not math.isfinite(noise_std) or noise_std <= 0:
        raise ValueError(f"noise_std must be > 0, got {noise_std}")
    draw = (rng or random.SystemRandom()).gauss(0.0, noise_std)
    return PublicUserCount(max(1, round(true_count + draw)), "dp-estimate",
                           dp_accounting.GaussianDpEvent(float(noise_std)))


def check_delta(delta: float, public_users: int) -> str | None:
    """Refuse δ ≥ 1/N̂ (raises :class:`DeltaTooLarge`); return a warning when δ > 1/N̂^1.1."""
    if delta >= 1.0 / public_users:
        raise DeltaTooLarge(
            f"δ {delta:g} is not below 1/N̂ = {1.0 / public_users:.3g} (N̂ = {public_users}): "
            f"with such a δ a release may reveal one user outright; use δ ≤ "
            f"{public_users ** -DELTA_WARNING_EXPONENT:.2g}")
    if delta > public_users ** -DELTA_WARNING_EXPONENT:
        return (f"δ {delta:g} is above 1/N̂^{DELTA_WARNING_EXPONENT:g} = "
                f"{public_users ** -DELTA_WARNING_EXPONENT:.2g}; a smaller δ is recommended")
    return None
