"""The admissible ranges of DP and training parameters, and the node's hard limits.

Pure data, no numpy: the researcher SDK and CLI (``pip install fedgate`` without the node
extra) read the same ranges the gateway and the engine enforce. How a value is checked in the
float32 arithmetic that executes is :mod:`ledger.mechanism`'s concern, which imports these.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ADAPTIVE_DEFAULTS",
    "CLIENT_OPTIMIZERS",
    "CLIP_STRATEGIES",
    "DEFAULT_MAX_EXAMPLES_PER_USER",
    "EPSILON_TOTAL_LIMIT",
    "EPSILON_TOTAL_WARNING",
    "HYPERPARAMETER_RANGES",
    "MAX_CLIP",
    "MAX_NOISE_MULTIPLIER",
    "MAX_NOISE_STDDEV",
    "MAX_PARAMETERS",
    "MAX_USERS",
    "MIN_CLIP",
    "MIN_NOISE_MULTIPLIER",
    "MIN_NOISE_STDDEV",
    "OPTIMIZER_HYPERPARAMETERS",
    "RANGES",
    "SERVER_OPTIMIZERS",
    "ParameterRange",
]

MAX_PARAMETERS = 20_000_000
"""Largest trainable parameter count a model may have (``engine.artifact`` enforces it)."""
MAX_USERS = 1_000_000_000
"""Largest number of users a dataset may hold (``engine.datastore`` enforces it at import)."""

DEFAULT_MAX_EXAMPLES_PER_USER = 256
"""The per-user example cap of a dataset whose owner sets none (``fedgate dataset import``)."""

EPSILON_TOTAL_WARNING = 10.0
EPSILON_TOTAL_LIMIT = 100.0
"""A dataset budget ε_total above the first is a weak guarantee (the import warns, the
dashboard flags it: at ε = 10 an observer's odds about any one user may shift by a factor
e¹⁰ ≈ 22,000); above the second it is no meaningful guarantee at all (the import refuses it
unless forced)."""

MIN_CLIP = 1e-9
MAX_CLIP = 1e6
MIN_NOISE_MULTIPLIER = 1e-2
MAX_NOISE_MULTIPLIER = 1e6
MIN_NOISE_STDDEV = 5e-12
MAX_NOISE_STDDEV = 2e12


@dataclass(frozen=True)
class ParameterRange:
    """A closed or half-open numeric range; ``integer`` ranges take ints only (not bools)."""

    low: float
    high: float
    low_inclusive: bool = True
    integer: bool = False
    high_inclusive: bool = True

    def interval(self) -> str:
        """``[0, 1)``-style, or ``1..100`` for integers."""
        if self.integer:
            return f"{int(self.low)}..{int(self.high)}"
        return (f"{'[' if self.low_inclusive else '('}{self.low:g}, {self.high:g}"
                f"{']' if self.high_inclusive else ')'}")

    def describe(self) -> str:
        return f"{'an integer' if self.integer else 'a number'} in {self.interval()}"

    def contains(self, value: float) -> bool:
        above = value >= self.low if self.low_inclusive else value > self.low
        below = value <= self.high if self.high_inclusive else value < self.high
        return above and below


RANGES: dict[str, ParameterRange] = {
    "clip": ParameterRange(MIN_CLIP, MAX_CLIP),
    "noise_multiplier": ParameterRange(MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER),
    "evaluation_noise_multiplier": ParameterRange(MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER),
    "evaluation_loss_clip": ParameterRange(1e-6, 1e6),
    "rounds": ParameterRange(1, 100_000, integer=True),
    "local_epochs": ParameterRange(1, 100, integer=True),
    "batch_size": ParameterRange(1, 10_000, integer=True),
    "max_examples_per_user": ParameterRange(1, 1_000_000, integer=True),
    "client_learning_rate": ParameterRange(0.0, 100.0, low_inclusive=False),
    "server_learning_rate": ParameterRange(0.0, 100.0, low_inclusive=False),
    "clipped_count_stddev": ParameterRange(1e-3, 1e9),
    "target_unclipped_quantile": ParameterRange(0.0, 1.0),
    "clip_learning_rate": ParameterRange(0.0, 10.0),
}
"""Every bounded parameter's admissible range: the one table the gateway and engine share."""


CLIP_STRATEGIES = ("fixed", "adaptive")
"""How the clip norm C evolves: ``fixed`` (the job's C every round) or ``adaptive`` (Andrew et
al. 2021: C_t moves geometrically toward the ``target_unclipped_quantile`` of the users' update
norms, estimated by a noised count; ``ledger.accounting.training_event`` charges the count)."""

ADAPTIVE_DEFAULTS = {"target_unclipped_quantile": 0.5, "clip_learning_rate": 0.2,
                     "count_stddev_fraction": 0.05}
"""TFF's ``gaussian_adaptive`` defaults: the median, η = 0.2, σ_b = 5 % of the expected
clients per round (Andrew et al. 2021)."""


# Optimizers: a closed choice from tff.learning.optimizers, by name (``engine.job`` builds
# them). Privacy: the client optimizer is part of each user's local training, whose result is
# clipped to C before it is noised; the server optimizer transforms the noised aggregate
# (post-processing). Neither changes the mechanism the ledger accounts, so neither changes ε.

CLIENT_OPTIMIZERS = ("sgd", "sgdm")
SERVER_OPTIMIZERS = ("sgd", "sgdm", "adam", "yogi", "adagrad")

OPTIMIZER_HYPERPARAMETERS: dict[str, dict[str, float]] = {
    "sgd": {},
    "sgdm": {"momentum": 0.0},
    "adam": {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7},
    "yogi": {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-3,
             "initial_preconditioner_value": 1e-6},
    "adagrad": {"initial_preconditioner_value": 0.1, "epsilon": 1e-7},
}
"""The hyperparameters each optimizer takes besides its learning rate, with the defaults of
its ``tff.learning.optimizers.build_*`` function (sgdm's momentum defaults to 0: plain SGD)."""

HYPERPARAMETER_RANGES: dict[str, ParameterRange] = {
    "momentum": ParameterRange(0.0, 1.0, high_inclusive=False),
    "beta_1": ParameterRange(0.0, 1.0, high_inclusive=False),
    "beta_2": ParameterRange(0.0, 1.0, high_inclusive=False),
    "epsilon": ParameterRange(0.0, 1.0, low_inclusive=False),
    "initial_preconditioner_value": ParameterRange(0.0, 100.0),
}
"""The admissible range of each optimizer hyperparameter (whichever optimizer takes it)."""
