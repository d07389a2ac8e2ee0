"""The admissible range of every DP-FedAvg parameter, derived from the float32 arithmetic that runs.

One validator, used by the gateway (estimate, calibrate, submit, review approval, federation,
node configuration) and by the engine (``engine.job.JobSpec``, before any data is read). Pure:
numpy float32 models TensorFlow's float32 exactly for the few operations that matter here.

What executes (``engine.training.dp_aggregator``): TF Privacy's Gaussian sum query in float32.
Each sampled user's delta is clipped with ``tf.clip_by_global_norm(delta, float32(C))``, the
clipped deltas are summed, N(0, σ²) is added with σ = ``float32(stddev)``, and the sum is divided
by the public constant q·N̂ (post-processing, as is everything after the noise). TensorFlow runs
CPU kernels with denormals flushed to zero (FTZ/DAZ). The guarantee the ledger charges needs, in
that arithmetic:

1. **Noise present, at least z·C.** ``noise_stddev`` returns the smallest float32 σ with
   σ ≥ z·float32(C)·(1 + 2⁻¹⁹): the ratio of the noise that runs to the clip that runs is ≥ z,
   with 2⁻¹⁹ ≈ 1.9e-6 of room for the few-ulp rounding of ``clip_by_global_norm``'s scale
   (its output norm is ≤ float32(C)·(1 + 4·2⁻²⁴)). σ must be a *normal* float32 (a subnormal
   would flush to 0: no noise while ε is charged), and far above the subnormal range so that
   σ times a standard normal draw flushes to zero with negligible probability
   (``MIN_NOISE_STDDEV`` = 5e-12 ≤ ``MIN_NOISE_MULTIPLIER`` × ``MIN_CLIP``: a draw must be
   below 3e-27 in magnitude to flush).
2. **Clipping clips.** ``clip_by_global_norm`` computes Σx² in float32; squares below the
   smallest normal (|x| < ~1.5e-19, with ``l2_loss``'s halving) flush to 0, so a delta of d
   such coordinates hides a norm up to 1.5e-19·√d from the clip. With d ≤ ``MAX_PARAMETERS``
   (2·10⁷) that is ≤ 6.9e-16; ``MIN_CLIP`` = 1e-9 keeps the clipped norm within
   (1 + 3e-13)·C. Squares above float32's maximum overflow to inf, which clips the delta to 0:
   still within the ball. A non-finite delta (local training diverged) is replaced by 0 before
   clipping (``engine.training``), so no user can turn the release into NaN (a failure bit).
3. **Sums stay finite.** At most ``MAX_USERS`` (10⁹) users each contribute ≤ C per coordinate;
   with C ≤ ``MAX_CLIP`` (10⁶) and σ ≤ ``MAX_NOISE_STDDEV`` (2·10¹²) the noisy sum is below
   10¹⁵ + 40σ ≪ 3.4·10³⁸ (checked at import below). Learning rates ≤ 100 and a denominator
   q·N̂ ≥ 1 keep each server step finite.
4. **Work is bounded.** rounds, local epochs, batch size and the owner's per-user example cap
   have integer ranges, so the local work of one user is at most
   ``local_epochs × ⌈cap / batch_size⌉`` steps, the same for every sampled user.

Adaptive clipping (:func:`validate_adaptive_clipping`) keeps rules 1–3 for every round's C_t:
the clip is clamped to float32 bounds [``min_clip``, ``max_clip``] inside which σ_t =
float32(C_t × m), with m the smallest float32 ≥ z_Δ·(1 + 2⁻¹⁸), is normal, within
[``MIN_NOISE_STDDEV``, ``MAX_NOISE_STDDEV``] and ≥ z_Δ·C_t·(1 + 2⁻¹⁹) (one rounding to nearest
loses at most 2⁻²⁴). The clipped count is exact (integers, summed in int64) and noised in
float64 with σ_b ≥ 10⁻³, far from any rounding issue.

Refusals raise :class:`MechanismParameterInvalid` naming the field and its admissible range.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ledger.ranges import (
    DEFAULT_MAX_EXAMPLES_PER_USER,
    MAX_CLIP,
    MAX_NOISE_MULTIPLIER,
    MAX_NOISE_STDDEV,
    MAX_PARAMETERS,
    MAX_USERS,
    MIN_CLIP,
    MIN_NOISE_MULTIPLIER,
    MIN_NOISE_STDDEV,
    RANGES,
    ParameterRange,
)

__all__ = [
    "DEFAULT_MAX_EXAMPLES_PER_USER",
    "MAX_CLIP",
    "MAX_NOISE_MULTIPLIER",
    "MAX_PARAMETERS",
    "MAX_USERS",
    "MIN_CLIP",
    "MIN_NOISE_MULTIPLIER",
    "MIN_NOISE_STDDEV",
    "RANGES",
    "AdaptiveClipping",
    "MechanismParameterInvalid",
    "ParameterRange",
    "TrainingMechanism",
    "check_in_range",
    "effective_clip",
    "noise_stddev",
    "validate_adaptive_clipping",
    "validate_evaluation_mechanism",
    "validate_training_mechanism",
]

_NOISE_ROOM = Fraction(1) + Fraction(1, 2**19)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class MechanismParameterInvalid(ValueError):
    """A DP or training parameter lies outside its admissible range.

    ``field`` names the parameter; ``admissible`` states the range in words, for the problem
    detail that tells the researcher what to change.
    """

    def __init__(self, field: str, message: str, admissible: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.admissible = admissible


def check_in_range(field: str, value: object) -> float | int:
    """``value`` if it is a finite number (an int for integer fields) within ``RANGES[field]``.

    Python floats come back as floats, never numpy scalars (which would leak into DP events).
    """
    allowed = RANGES[field]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MechanismParameterInvalid(field, f"{field} must be {allowed.describe()}, got "
                                               f"{value!r}", allowed.describe())
    if allowed.integer:
        if not isinstance(value, numbers.Integral) or not allowed.contains(int(value)):
            raise MechanismParameterInvalid(field, f"{field} must be {allowed.describe()}, got "
                                                   f"{value!r}", allowed.describe())
        return int(value)
    number = float(value)
    if not math.isfinite(number) or not allowed.contains(number):
        raise MechanismParameterInvalid(field, f"{field} must be {allowed.describe()}, got "
                                               f"{value!r}", allowed.describe())
    return number


def _float32_at_least(value: Fraction) -> float:
    """The smallest float32 ≥ ``value`` (as a Python float; exactly representable)."""
    nearest = np.float32(float(value))
    if Fraction(float(nearest)) < value:
        nearest = np.nextafter(nearest, np.float32(np.inf))
    return float(nearest)


def noise_stddev(*, clip: float, noise_multiplier: float) -> float:
    """The noise standard deviation the engine passes to TF (a float32 value, as a float).

    The smallest float32 σ ≥ z·float32(C)·(1 + 2⁻¹⁹), computed exactly: so the noise that runs
    has σ / (the clip that runs) ≥ z even after clip_by_global_norm's rounding. Raises when σ
    would leave [``MIN_NOISE_STDDEV``, ``MAX_NOISE_STDDEV``] (noise that could flush to zero,
    or sums that could overflow).
    """
    clip = float(check_in_range("clip", clip))
    z = float(check_in_range("noise_multiplier", noise_multiplier))
    clip32 = Fraction(float(np.float32(clip)))
    sigma = _float32_at_least(Fraction(z) * clip32 * _NOISE_ROOM)
    if not MIN_NOISE_STDDEV <= sigma <= MAX_NOISE_STDDEV:
        admissible = (f"noise_multiplier × clip in [{MIN_NOISE_STDDEV:g}, "
                      f"{MAX_NOISE_STDDEV:g}]")
        raise MechanismParameterInvalid(
            "noise_multiplier", f"noise_multiplier × clip = {z * clip:g} is outside the range "
            f"float32 noise keeps exact: {admissible}", admissible)
    return sigma


def effective_clip(clip: float) -> float:
    """The clip norm that runs: float32(C) (round to nearest, as ``tf.cast`` does)."""
    return float(np.float32(float(check_in_range("clip", clip))))


@dataclass(frozen=True)
class TrainingMechanism:
    """Validated training parameters and the float32 values the engine runs with."""

    clip: float
    noise_multiplier: float
    stddev: float
    rounds: int
    local_epochs: int
    batch_size: int
    client_learning_rate: float
    server_learning_rate: float


def validate_training_mechanism(*, clip: object, noise_multiplier: object, rounds: object,
                                local_epochs: object, batch_size: object,
                                client_learning_rate: object,
                                server_learning_rate: object) -> TrainingMechanism:
    """Validate every training parameter against :data:`RANGES` and the float32 noise rule.

    Raises :class:`MechanismParameterInvalid` for the first parameter out of range.
    """
    checked = {
        "clip": check_in_range("clip", clip),
        "noise_multiplier": check_in_range("noise_multiplier", noise_multiplier),
        "rounds": check_in_range("rounds", rounds),
        "local_epochs": check_in_range("local_epochs", local_epochs),
        "batch_size": check_in_range("batch_size", batch_size),
        "client_learning_rate": check_in_range("client_learning_rate", client_learning_rate),
        "server_learning_rate": check_in_range("server_learning_rate", server_learning_rate),
    }
    clip_value, z = float(checked["clip"]), float(checked["noise_multiplier"])
    return TrainingMechanism(
        clip=clip_value, noise_multiplier=z,
        stddev=noise_stddev(clip=clip_value, noise_multiplier=z),
        rounds=int(checked["rounds"]), local_epochs=int(checked["local_epochs"]),
        batch_size=int(checked["batch_size"]),
        client_learning_rate=float(checked["client_learning_rate"]),
        server_learning_rate=float(checked["server_learning_rate"]))


def validate_evaluation_mechanism(*, noise_multiplier: object, loss_clip: object) -> None:
    """Validate the DP evaluation's noise multiplier (> 0, in range) and loss clip L.

    Evaluation runs in float64 numpy (``engine.dp_evaluation``), where these ranges are far
    from any rounding issue; the noise multiplier must still be > 0 and at least
    ``MIN_NOISE_MULTIPLIER`` because it is what the evaluation event charges.
    """
    check_in_range("evaluation_noise_multiplier", noise_multiplier)
    check_in_range("evaluation_loss_clip", loss_clip)


@dataclass(frozen=True)
class AdaptiveClipping:
    """Validated adaptive-clipping parameters and the float32 constants the engine runs with.

    Per round t, with C_t the clip (float32, clamped to [min_clip, max_clip]): each sampled
    user's update is clipped to C_t, the sum gets N(0, σ_t²) with σ_t = float32(C_t ×
    ``update_multiplier32``) ≥ z_Δ·C_t; the count of users with norm ≤ C_t, centred (Σ(bᵢ −
    1/2), computed exactly from integer counts) gets N(0, σ_b²) in float64; then
    C_{t+1} = clamp(C_t · exp(−η (b̄ − γ))) with b̄ the noised centred count over q·N̂ plus
    1/2 (post-processing).
    """

    update_noise_multiplier: float
    update_multiplier32: float
    clipped_count_stddev: float
    target_unclipped_quantile: float
    clip_learning_rate: float
    min_clip: float
    max_clip: float


def validate_adaptive_clipping(*, clip: object, noise_multiplier: object,
                               clipped_count_stddev: object, target_unclipped_quantile: object,
                               clip_learning_rate: object) -> AdaptiveClipping:
    """Validate adaptive clipping for a job whose effective noise multiplier is
    ``noise_multiplier`` and initial clip ``clip``; derive z_Δ (as the ledger charges it) and
    the float32 bounds of C_t. Raises :class:`MechanismParameterInvalid`."""
    # Here, not at the top: the accountant loads dp_accounting and SciPy (~1 s), which every
    # owner command would pay for (opening a node validates its evaluation mechanism).
    from ledger.accounting import InvalidPrivacyParameter, adaptive_update_noise_multiplier

    clip_value = float(check_in_range("clip", clip))
    z = float(check_in_range("noise_multiplier", noise_multiplier))
    sigma_b = float(check_in_range("clipped_count_stddev", clipped_count_stddev))
    quantile = float(check_in_range("target_unclipped_quantile", target_unclipped_quantile))
    rate = float(check_in_range("clip_learning_rate", clip_learning_rate))
    try:
        z_update = adaptive_update_noise_multiplier(noise_multiplier=z,
                                                    clipped_count_stddev=sigma_b)
    except InvalidPrivacyParameter as error:
        raise MechanismParameterInvalid(
            "clipped_count_stddev", str(error), f"a number > noise_multiplier / 2 = {z / 2:g}"
        ) from None
    admissible_z = RANGES["noise_multiplier"]
    if not admissible_z.contains(z_update):
        raise MechanismParameterInvalid(
            "clipped_count_stddev", f"the update noise multiplier z_Δ = {z_update:g} this "
            f"clipped_count_stddev leaves is outside {admissible_z.interval()}",
            f"a number well above noise_multiplier / 2 = {z / 2:g}")
    multiplier = np.float32(_float32_at_least(Fraction(z_update) * _NOISE_ROOM * _NOISE_ROOM))
    low = np.float32(_float32_at_least(Fraction(MIN_CLIP)))
    high = min(np.float32(MAX_CLIP), np.float32(MAX_NOISE_STDDEV / float(multiplier)))
    while float(high * multiplier) > MAX_NOISE_STDDEV:  # at most a step or two
        high = np.nextafter(high, np.float32(0))
    if float(low * multiplier) < MIN_NOISE_STDDEV or not low <= np.float32(clip_value) <= high:
        admissible = f"clip in [{float(low):g}, {float(high):g}] for this noise"
        raise MechanismParameterInvalid(
            "clip", f"clip {clip_value:g} with update noise multiplier {z_update:g} leaves the "
            f"range float32 noise keeps exact: {admissible}", admissible)
    return AdaptiveClipping(
        update_noise_multiplier=z_update, update_multiplier32=float(multiplier),
        clipped_count_stddev=sigma_b, target_unclipped_quantile=quantile,
        clip_learning_rate=rate, min_clip=float(low), max_clip=float(high))


def _check_sums_stay_finite() -> None:
    bound = np.float32(MAX_USERS) * np.float32(MAX_CLIP) + np.float32(40.0 * MAX_NOISE_STDDEV)
    if not bound < np.float32(_FLOAT32_MAX) / np.float32(1e6):
        raise AssertionError("the parameter ranges let float32 sums overflow")


_check_sums_stay_finite()
