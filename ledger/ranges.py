"""The admissible ranges of DP and training parameters, and the node's hard limits.

Pure data, no numpy: the researcher SDK and CLI (``pip install fedgate`` without the node
extra) read the same ranges the gateway and the engine enforce. How a value is checked in the
float32 arithmetic that executes is :mod:`ledger.mechanism`'s concern, which imports these.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_EXAMPLES_PER_USER",
    "MAX_CLIP",
    "MAX_NOISE_MULTIPLIER",
    "MAX_NOISE_STDDEV",
    "MAX_PARAMETERS",
    "MAX_USERS",
    "MIN_CLIP",
    "MIN_NOISE_MULTIPLIER",
    "MIN_NOISE_STDDEV",
    "RANGES",
    "ParameterRange",
]

MAX_PARAMETERS = 20_000_000
"""Largest trainable parameter count a model may have (``engine.artifact`` enforces it)."""
MAX_USERS = 1_000_000_000
"""Largest number of users a dataset may hold (``engine.datastore`` enforces it at import)."""

DEFAULT_MAX_EXAMPLES_PER_USER = 256
"""The per-user example cap of a dataset whose owner sets none (``fedgate dataset import``)."""

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

    def describe(self) -> str:
        left = "[" if self.low_inclusive else "("
        if self.integer:
            return f"an integer in {int(self.low)}..{int(self.high)}"
        return f"a number in {left}{self.low:g}, {self.high:g}]"

    def contains(self, value: float) -> bool:
        above = value >= self.low if self.low_inclusive else value > self.low
        return above and value <= self.high


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
}
"""Every bounded parameter's admissible range: the one table the gateway and engine share."""
