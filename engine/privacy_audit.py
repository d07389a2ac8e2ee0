"""One-run empirical privacy audit of the engine's DP-FedAvg mechanism with canary clients.

Method (Andrew et al., ICLR 2024, "One-shot empirical privacy estimation for federated
learning"), reimplemented:

* ``canaries`` extra clients each submit a fixed model delta: a uniformly random direction on
  the unit sphere of the model's parameter space, scaled to ``CANARY_NORM_FACTOR``·clip so
  that the aggregator's clipping is exercised and each canary arrives with norm exactly C
  (an aggregator that does not clip lets them through ten times larger);
* every round, each canary participates independently with the job's sampling rate q
  (:func:`engine.training.poisson_sample`), and the round's participating canaries go through
  the engine's aggregator (:func:`engine.training.dp_aggregator`: joint L2 clipping to C,
  Gaussian noise of std z·C on the sum, division by the constant q·N) for T rounds;
* the final model delta Δ is the sum of the T aggregates (server SGD with learning rate 1 and
  no momentum; the server step is post-processing and the cosine is scale-invariant);
* statistic: cos(Δ, canary direction) for each canary, and for ``null_directions`` fresh random
  directions that were never inserted (the null distribution);
* estimate: with μ = (mean_canary − mean_null) / std_null, the ε at δ of μ-Gaussian DP
  (Dong, Roth & Su), i.e. of the Gaussian mechanism that tells the two fitted Gaussians apart.
  A percentile bootstrap over canaries and null directions gives a two-sided interval at
  ``confidence``.

What is shared with a real job: the sampling function and the aggregator (clipping, noise
scale, denominator) are built by the engine's own functions; only the noise's random generator
is the seeded copy unless ``noise_seed`` is None. What is not: real users' local
training — their updates are data-dependent and nearly orthogonal to random canary directions,
so leaving them out can only make the canaries easier to see (a conservative audit).

Randomness: canary directions, null directions, participation and the bootstrap are drawn
from ``seed``. The aggregator's Gaussian noise is drawn from ``noise_seed``
(:class:`engine.seeded_noise.SeededGaussianSumQuery`: TF Privacy's query with only its random
generator replaced by a stateless seeded one), so an audit is bit-for-bit reproducible; with
``noise_seed=None`` it comes from the job's own unseeded generator instead.

Broken mechanisms (:data:`BROKEN_MECHANISMS`, audit only): ``"noise"`` builds the engine's
aggregator with noise multiplier 0, ``"clipping"`` builds it without clipping (noise still
calibrated to C). Both are keyword-only switches of :func:`engine.training.dp_aggregator`
that no job can reach; the analytic ε stays the configured job's, so the audit must fail.

Like a job, the audit runs in its own process (:data:`AUDIT_ENTRY`): TFF's ``worker_binary``
listens on all interfaces without authentication, so the process first moves into a
loopback-only network namespace (:func:`engine.netns.isolate_network`), before numpy or
TensorFlow start any thread.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import log_ndtr

from engine.job import JobSpec
from engine.training import dp_aggregator, poisson_sample
from ledger.accounting import training_epsilon

__all__ = [
    "AUDIT_ENTRY",
    "BROKEN_MECHANISMS",
    "CANARY_NORM_FACTOR",
    "AuditConfig",
    "PrivacyAuditFailed",
    "PrivacyAuditResult",
    "check_audit",
    "empirical_epsilon",
    "gaussian_dp_epsilon",
    "run_canary_audit",
]

CANARY_NORM_FACTOR = 10.0
"""Canary deltas have norm 10·C before clipping, so an aggregator that stops clipping shows."""

BROKEN_MECHANISMS = {
    "noise": "noise disabled (audit only)",
    "clipping": "clipping removed (audit only)",
}
"""Deliberately broken copies of the mechanism the audit must catch, and how reports name them."""

METHOD = ("Andrew et al. 2024 one-shot estimate: cosine of final delta with random canary "
          "directions vs never-inserted directions, Gaussian fit, mu-GDP epsilon at delta; "
          "percentile bootstrap interval")


AUDIT_ENTRY = ("import os, sys; from engine.netns import isolate_network; isolate_network(); "
               "from engine.privacy_audit import main; os._exit(main(sys.argv[1:]))")
"""``python -c AUDIT_ENTRY CONFIG_JSON OUT_FILE [noise|clipping]``: network isolation first;
``os._exit`` because TF/TFF finalizers can block teardown (the caller kills the process group,
``worker_binary`` included)."""


class PrivacyAuditFailed(Exception):
    """The empirical ε is significantly above the analytic ε the ledger would report."""


@dataclass(frozen=True)
class AuditConfig:
    """The audited job's privacy parameters and the audit's sizes.

    ``population`` is the number of real training users N; it sets the aggregator's
    denominator q·N exactly as a job on such a dataset would. The model is the linear
    classifier (``num_features`` × ``num_classes`` kernel and a bias) that jobs upload.
    ``seed`` draws canaries, null directions, participation and the bootstrap;
    ``noise_seed`` draws the aggregator's noise (None: the job's unseeded generator, so the
    run is not reproducible).
    """

    rounds: int = 30
    canaries: int = 200
    null_directions: int = 1000
    noise_multiplier: float = 1.0
    sampling_rate: float = 0.1
    clip: float = 1.0
    population: int = 500
    num_features: int = 200
    num_classes: int = 10
    delta: float = 1e-5
    confidence: float = 0.95
    bootstrap_samples: int = 1000
    seed: int = 0
    noise_seed: int | None = 0

    def job_spec(self) -> JobSpec:
        """The job whose mechanism is audited (paths are unused: no data is read)."""
        return JobSpec(
            job_id="privacy-audit", dataset_dir=Path("/nonexistent"),
            model_path=Path("/nonexistent"), rounds=self.rounds,
            sampling_rate=self.sampling_rate,
            expected_clients_per_round=self.sampling_rate * self.population,
            noise_multiplier=self.noise_multiplier, clip=self.clip,
            client_learning_rate=1.0, server_learning_rate=1.0, server_momentum=0.0,
            local_epochs=1, batch_size=1, evaluation=None,
        )

    @property
    def weight_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.num_features, self.num_classes), (self.num_classes,)


@dataclass(frozen=True)
class PrivacyAuditResult:
    config: AuditConfig
    broken: str | None
    analytic_epsilon: float
    empirical_epsilon: float
    interval: tuple[float, float]
    mu: float
    canary_cosines: np.ndarray
    null_cosines: np.ndarray

    @property
    def passed(self) -> bool:
        """True unless the interval's lower end exceeds the analytic ε."""
        return self.interval[0] <= self.analytic_epsilon

    def to_json(self) -> dict[str, Any]:
        return {
            "parameters": asdict(self.config),
            "mechanism": BROKEN_MECHANISMS[self.broken] if self.broken else "as configured",
            "noise": ("seeded (audit only)" if self.config.noise_seed is not None
                      else "fresh (the job's unseeded generator)"),
            "analytic_epsilon": self.analytic_epsilon,
            "empirical_epsilon": self.empirical_epsilon,
            "empirical_interval": list(self.interval),
            "confidence": self.config.confidence,
            "mu": self.mu,
            "canary_cosine_mean": float(np.mean(self.canary_cosines)),
            "null_cosine_mean": float(np.mean(self.null_cosines)),
            "null_cosine_std": float(np.std(self.null_cosines, ddof=1)),
            "method": METHOD,
            "passed": self.passed,
            "canary_cosines": self.canary_cosines.tolist(),
            "null_cosines": self.null_cosines.tolist(),
        }


def main(argv: list[str]) -> int:
    """Subprocess entry (see :data:`AUDIT_ENTRY`): run the audit, write its JSON to OUT_FILE."""
    config = AuditConfig(**json.loads(argv[0]))
    result = run_canary_audit(config, broken=argv[2] if len(argv) > 2 else None)
    Path(argv[1]).write_text(json.dumps(result.to_json()))
    return 0


def run_canary_audit(config: AuditConfig, *, broken: str | None = None) -> PrivacyAuditResult:
    """Run ``config.rounds`` rounds of the engine's DP aggregation with canaries; estimate ε.

    ``broken`` (a key of :data:`BROKEN_MECHANISMS`) builds the engine's aggregator with the
    matching audit-only switch of :func:`engine.training.dp_aggregator`; the analytic ε is
    still the configured job's.
    """
    if broken is not None and broken not in BROKEN_MECHANISMS:
        raise ValueError(f"unknown broken mechanism {broken!r}; one of {sorted(BROKEN_MECHANISMS)}")
    import tensorflow_federated as tff

    spec = config.job_spec()
    analytic = training_epsilon(sampling_rate=spec.sampling_rate,
                                noise_multiplier=spec.noise_multiplier, rounds=spec.rounds,
                                delta=config.delta)
    value_type = tff.types.StructWithPythonType(
        [tff.types.TensorType(np.float32, shape) for shape in config.weight_shapes], list)
    aggregation = dp_aggregator(
        spec, audit_noise_disabled=broken == "noise", audit_clipping_removed=broken == "clipping",
        noise_seed=config.noise_seed,
    ).create(value_type)

    direction_seed, participation_seed, null_seed, bootstrap_seed = (
        np.random.SeedSequence(config.seed).spawn(4))
    dimension = sum(math.prod(shape) for shape in config.weight_shapes)
    directions = _unit_vectors(np.random.default_rng(direction_seed), config.canaries, dimension)
    participation = np.random.default_rng(participation_seed)

    state = aggregation.initialize()
    final_delta = np.zeros(dimension)
    for _ in range(config.rounds):
        sampled = poisson_sample(config.canaries, config.sampling_rate,
                                 random_bytes=participation.bytes)
        client_deltas = [_unflatten(CANARY_NORM_FACTOR * config.clip * directions[i],
                                    config.weight_shapes) for i in sampled]
        output = aggregation.next(state, client_deltas)
        state = output.state
        final_delta += np.concatenate([np.ravel(part) for part in output.result])

    nulls = _unit_vectors(np.random.default_rng(null_seed), config.null_directions, dimension)
    unit_delta = final_delta / np.linalg.norm(final_delta)
    canary_cosines, null_cosines = directions @ unit_delta, nulls @ unit_delta
    estimate = empirical_epsilon(canary_cosines, null_cosines, config.delta)
    interval = _bootstrap_interval(np.random.default_rng(bootstrap_seed), canary_cosines,
                                   null_cosines, config)
    return PrivacyAuditResult(
        config=config, broken=broken, analytic_epsilon=analytic,
        empirical_epsilon=estimate, interval=interval, mu=_mu(canary_cosines, null_cosines),
        canary_cosines=canary_cosines, null_cosines=null_cosines,
    )


def check_audit(result: PrivacyAuditResult) -> None:
    """Raise :class:`PrivacyAuditFailed` if the audit shows more leakage than accounted."""
    if not result.passed:
        low, high = result.interval
        raise PrivacyAuditFailed(
            f"empirical ε {result.empirical_epsilon:.2f} ({result.config.confidence:.0%} "
            f"interval [{low:.2f}, {high:.2f}]) exceeds the analytic ε "
            f"{result.analytic_epsilon:.2f}: the mechanism is not as private as accounted"
        )


def empirical_epsilon(canary_cosines: np.ndarray, null_cosines: np.ndarray, delta: float) -> float:
    """The paper's point estimate: ε at ``delta`` of μ-GDP, μ from the two Gaussian fits."""
    return gaussian_dp_epsilon(_mu(canary_cosines, null_cosines), delta)


def gaussian_dp_epsilon(mu: float, delta: float) -> float:
    """Smallest ε ≥ 0 with δ(ε) ≤ ``delta`` for μ-Gaussian DP (Dong, Roth & Su 2022, Cor. 2.13):

    δ(ε) = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2). μ ≤ 0 gives 0, μ = ∞ gives ∞.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if math.isnan(mu):
        raise ValueError("mu is NaN")
    if mu <= 0.0:
        return 0.0
    if math.isinf(mu):
        return math.inf

    def delta_at(eps: float) -> float:
        return float(np.exp(log_ndtr(-eps / mu + mu / 2))
                     - np.exp(eps + log_ndtr(-eps / mu - mu / 2)))

    if delta_at(0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while delta_at(high) > delta:
        low, high = high, 2.0 * high
    for _ in range(100):  # δ(ε) is decreasing: bisect to float precision
        mid = 0.5 * (low + high)
        low, high = (mid, high) if delta_at(mid) > delta else (low, mid)
    return high


def _mu(canary_cosines: np.ndarray, null_cosines: np.ndarray) -> float:
    spread = float(np.std(null_cosines, ddof=1))
    gap = float(np.mean(canary_cosines) - np.mean(null_cosines))
    return gap / spread if spread > 0 else math.copysign(math.inf, gap)


def _bootstrap_interval(rng: np.random.Generator, canary_cosines: np.ndarray,
                        null_cosines: np.ndarray, config: AuditConfig) -> tuple[float, float]:
    estimates = [
        empirical_epsilon(rng.choice(canary_cosines, len(canary_cosines)),
                          rng.choice(null_cosines, len(null_cosines)), config.delta)
        for _ in range(config.bootstrap_samples)
    ]
    tail = 50.0 * (1.0 - config.confidence)
    low, high = np.percentile(estimates, [tail, 100.0 - tail])
    return float(low), float(high)


def _unit_vectors(rng: np.random.Generator, count: int, dimension: int) -> np.ndarray:
    """``count`` independent directions, uniform on the sphere (normalised Gaussians)."""
    vectors = rng.standard_normal((count, dimension))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _unflatten(vector: np.ndarray, shapes: tuple[tuple[int, ...], ...]) -> list[np.ndarray]:
    parts, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        parts.append(vector[start:start + size].reshape(shape).astype(np.float32))
        start += size
    return parts
