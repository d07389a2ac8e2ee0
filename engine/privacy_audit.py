"""One-run empirical privacy audit of the engine's DP-FedAvg mechanism with canary clients.

Method (Andrew et al., ICLR 2024, "One-shot empirical privacy estimation for federated
learning"), reimplemented:

* ``canaries`` extra clients each carry a secret random direction and, every round, take part
  independently with the job's sampling rate q (:func:`engine.training.poisson_sample`); each
  participating canary reaches the aggregator with a model delta of norm ``CANARY_NORM_FACTOR``·C
  along its direction, so the engine's clipping is exercised and cuts it to exactly C (an
  aggregator that does not clip lets it through ten times larger);
* the mechanism runs for T rounds; Δ is the change of the final model;
* statistic: the cosine of Δ with each canary's direction, and with ``null_directions``
  directions drawn the same way but never inserted (the null distribution);
* estimate: a Gaussian is fitted to the canary cosines and another to the null cosines, each
  with its **own** mean and standard deviation, and the estimate is the ε at δ of telling
  N(μ₁, σ₁²) from N(μ₀, σ₀²) apart (:func:`two_gaussian_epsilon`, both directions). The
  canaries' own spread matters: a canary takes part Binomial(T, q) times, which widens its
  cosine distribution, and for unequal spreads the privacy loss is unbounded in the tails.
  (Standardising by the null spread alone — μ-GDP with one σ — understated ε by 1.6–2.2× here
  and passed a mechanism with half the claimed noise.)
* verdict: a percentile bootstrap over canaries and null directions gives a two-sided interval
  at ``confidence``; the audit **fails** when the interval's lower end exceeds the analytic ε
  the ledger reports (:attr:`PrivacyAuditResult.passed`). docs/privacy-audit.md lists the
  measured false-pass and false-fail counts over seeds.

Three paths (:data:`AUDIT_PATHS`), from the aggregator alone to the process jobs run:

* ``"aggregator"``: the canary deltas (random unit vectors of the whole parameter space, scaled)
  are handed to the engine's aggregator (:func:`engine.training.dp_aggregator`: joint L2
  clipping to C, Gaussian noise of std σ ≥ z·C on the sum, division by the constant q·N);
  Δ is the sum of the T aggregates (server SGD with learning rate 1, no momentum:
  post-processing, and the cosine is scale-invariant). Fast.
* ``"training"``: the canaries are TFF clients of the per-user DP-FedAvg process built as
  :func:`engine.training.prepare_training` builds a job's (:func:`_fed_avg_process`:
  ``tff.learning.algorithms.build_unweighted_fed_avg`` over the job's Keras artifact, client
  optimizer, server optimizer and the audited ``dp_aggregator``), beside a synthetic
  population of ``population`` users with real local training.
* ``"shards"``: canaries and synthetic users are users of the vectorized engine
  (:func:`engine.shard_process.prepare_sharded_training`, what every job with a vectorizable
  model and a per-user cap runs): shards of users as TFF clients, each user trained alone,
  clipped inside the shard's work, the shard sums noised at the server. Its noise is always
  fresh (the engine has no seeded copy), so this path is not bit-reproducible.

On both training paths a canary's local data is one example (a·u, y): a random unit feature
direction u scaled to ``CANARY_FEATURE_NORM`` and a random label; one local SGD step moves the
kernel by a rank-one matrix u ⊗ (e_y − p), p the model's softmax on that example, and the client
learning rate is chosen so the step has norm 10·C at the initial (zero) model (the server
learning rate keeps the model near zero at the canaries' inputs: :meth:`AuditConfig.job_spec`).
The canary's probe is u ⊗ Σ_t unit(e_y − p_t), with p_t computed from the server model
broadcast in round t — the same for inserted and never-inserted probes; the statistic is the
cosine with the change of the kernel. An observer who sees every round's model is covered by
the same analytic ε (the accountant composes all rounds).

Randomness: canary and null directions, labels, the synthetic users, participation and the
bootstrap are drawn from ``seed``. The aggregator's Gaussian noise is drawn from ``noise_seed``
(:class:`engine.seeded_noise.SeededGaussianSumQuery`: the job's query with only its random
generator replaced by a stateless seeded one), so an audit is reproducible; with
``noise_seed=None`` it comes from the job's own unseeded generator instead.

Broken mechanisms (:data:`BROKEN_MECHANISMS`, audit only), each the engine's mechanism with
one change, audited against the *configured* job's analytic ε, so the audit must fail:
``"noise"`` (noise multiplier 0) and ``"clipping"`` (no clipping, noise still calibrated to C)
are audit-only switches of :func:`engine.training.dp_aggregator` (on the shards path "noise" is
the vectorized engine's noiseless test build, and "clipping" does not exist); ``"half-noise"``
is the mechanism built for the job with its noise multiplier halved (true ε ≈ 21 for the
defaults' claimed 4.85) — the kind of bug an audit must catch. No job can reach any of them.

Like a job, the audit runs in its own process (:data:`AUDIT_ENTRY`): TFF's ``worker_binary``
listens on all interfaces without authentication, so the process first moves into a
loopback-only network namespace (:func:`engine.netns.isolate_network`), before numpy or
TensorFlow start any thread. One process runs a whole batch of audits (TFF starts once).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import log_ndtr, ndtr

from engine.job import JobSpec
from engine.training import dp_aggregator, poisson_sample
from ledger.accounting import training_epsilon

__all__ = [
    "AUDIT_ENTRY",
    "AUDIT_PATHS",
    "BROKEN_MECHANISMS",
    "CANARY_FEATURE_NORM",
    "CANARY_NORM_FACTOR",
    "AuditConfig",
    "Gaussian",
    "PrivacyAuditFailed",
    "PrivacyAuditResult",
    "audit_aggregator",
    "check_audit",
    "empirical_epsilon",
    "hockey_stick_divergence",
    "run_canary_audit",
    "two_gaussian_epsilon",
]

CANARY_NORM_FACTOR = 10.0
"""A canary's delta has norm 10·C before clipping, so an aggregator that stops clipping shows."""

CANARY_FEATURE_NORM = 10.0
"""Norm a of a training-path canary's single feature vector: the kernel part of its update is
a·|e_y − p| against |e_y − p| for the bias, so 99.5 % of it lies along the rank-one probe."""

AUDIT_PATHS = {
    "aggregator": "canary deltas handed to the engine's aggregator",
    "training": "canary clients trained in the engine's per-user TFF DP-FedAvg process",
    "shards": "canary users trained in the engine's vectorized (sharded) TFF process",
}
"""Where the canaries enter the mechanism, and how reports name it."""

BROKEN_MECHANISMS = {
    "noise": "noise disabled (audit only)",
    "half-noise": "noise multiplier halved (audit only)",
    "clipping": "clipping removed (audit only)",
}
"""Deliberately broken copies of the mechanism the audit must catch, and how reports name them."""

METHOD = ("Andrew et al. 2024 one-shot estimate: cosine of the final model change with canary "
          "directions vs never-inserted directions, one Gaussian fitted to each (own mean and "
          "std), epsilon at delta of telling the two Gaussians apart; percentile bootstrap "
          "interval; fails when the interval's lower end exceeds the analytic epsilon")

AUDIT_ENTRY = ("import os, sys; from engine.netns import isolate_network; isolate_network(); "
               "from engine.privacy_audit import main; os._exit(main(sys.argv[1:]))")
"""``python -c AUDIT_ENTRY REQUESTS_JSON OUT_FILE``: REQUESTS_JSON is a list of
``{"config": AuditConfig fields, "broken": name or null}``; OUT_FILE receives the list of
results. Network isolation first; ``os._exit`` because TF/TFF finalizers can block teardown
(the caller kills the process group, ``worker_binary`` included)."""


class PrivacyAuditFailed(Exception):
    """The empirical ε is significantly above the analytic ε the ledger would report."""


@dataclass(frozen=True)
class AuditConfig:
    """The audited job's privacy parameters and the audit's sizes.

    ``population`` is the number of real training users N; it sets the aggregator's
    denominator q·N exactly as a job on such a dataset would, and on the ``"training"`` path
    it is the number of synthetic users (``examples_per_user`` examples each) who train beside
    the canaries. The model is the linear classifier (``num_features`` × ``num_classes``
    kernel and a bias) that jobs upload. ``seed`` draws canaries, null directions, the
    synthetic users, participation and the bootstrap; ``noise_seed`` draws the aggregator's
    noise (None: the job's unseeded generator, so the run is not reproducible).
    """

    rounds: int = 30
    canaries: int = 1000
    null_directions: int = 5000
    noise_multiplier: float = 1.0
    sampling_rate: float = 0.1
    clip: float = 1.0
    population: int = 500
    num_features: int = 1000
    num_classes: int = 10
    delta: float = 1e-5
    confidence: float = 0.95
    bootstrap_samples: int = 1000
    seed: int = 0
    noise_seed: int | None = 0
    path: str = "aggregator"
    examples_per_user: int = 8

    def __post_init__(self) -> None:
        if self.path not in AUDIT_PATHS:
            raise ValueError(f"unknown audit path {self.path!r}; one of {sorted(AUDIT_PATHS)}")
        if self.path == "shards" and self.noise_seed is not None:
            raise ValueError("the vectorized engine draws fresh noise only: noise_seed must be "
                             "None on the shards path")

    def job_spec(self) -> JobSpec:
        """The job whose mechanism is audited (paths are unused: no data is read).

        Its learning rates serve the training path (the aggregator path uses neither). The
        client rate makes a canary's one SGD step at the zero model exactly
        ``CANARY_NORM_FACTOR``·C long: lr·|e_y − 1/K|·√(a² + 1) = 10·C. The server SGD rate
        η = min(1, q·N / (20·a·C·√T)) keeps the model near zero at the canaries' inputs —
        the noise moves their logits by about a·η·z·C·√T / (q·N) ≤ z/20 — so a canary's
        update keeps its direction from round to round and its probe matches it. The server
        step is post-processing of the noised sum: it changes nothing the ledger accounts.
        """
        label_gap = math.sqrt(1.0 - 1.0 / self.num_classes)  # |e_y − uniform|
        canary_step = label_gap * math.sqrt(CANARY_FEATURE_NORM**2 + 1.0)
        server_rate = min(1.0, self.sampling_rate * self.population
                          / (20.0 * CANARY_FEATURE_NORM * self.clip * math.sqrt(self.rounds)))
        return JobSpec(
            job_id="privacy-audit", dataset_dir=Path("/nonexistent"),
            model_path=Path("/nonexistent"), rounds=self.rounds,
            sampling_rate=self.sampling_rate,
            expected_clients_per_round=self.sampling_rate * self.population,
            noise_multiplier=self.noise_multiplier, clip=self.clip,
            client_learning_rate=CANARY_NORM_FACTOR * self.clip / canary_step,
            server_learning_rate=server_rate, server_momentum=0.0,
            local_epochs=1, batch_size=1, evaluation=None,
        )

    @property
    def weight_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.num_features, self.num_classes), (self.num_classes,)


@dataclass(frozen=True)
class Gaussian:
    """N(mean, std²); ``std`` > 0."""

    mean: float
    std: float

    @classmethod
    def fit(cls, sample: np.ndarray) -> Gaussian:
        """Sample mean and sample standard deviation (ddof 1)."""
        return cls(float(np.mean(sample)), float(np.std(sample, ddof=1)))


@dataclass(frozen=True)
class PrivacyAuditResult:
    config: AuditConfig
    broken: str | None
    analytic_epsilon: float
    empirical_epsilon: float
    interval: tuple[float, float]
    canary_cosines: np.ndarray
    null_cosines: np.ndarray

    @property
    def passed(self) -> bool:
        """True unless the interval's lower end exceeds the analytic ε."""
        return self.interval[0] <= self.analytic_epsilon

    def to_json(self) -> dict[str, Any]:
        canary, null = Gaussian.fit(self.canary_cosines), Gaussian.fit(self.null_cosines)
        return {
            "parameters": asdict(self.config),
            "path": AUDIT_PATHS[self.config.path],
            "mechanism": BROKEN_MECHANISMS[self.broken] if self.broken else "as configured",
            "noise": ("seeded (audit only)" if self.config.noise_seed is not None
                      else "fresh (the job's unseeded generator)"),
            "analytic_epsilon": self.analytic_epsilon,
            "empirical_epsilon": self.empirical_epsilon,
            "empirical_interval": list(self.interval),
            "confidence": self.config.confidence,
            "canary_cosine_mean": canary.mean,
            "canary_cosine_std": canary.std,
            "null_cosine_mean": null.mean,
            "null_cosine_std": null.std,
            "method": METHOD,
            "passed": self.passed,
            "canary_cosines": self.canary_cosines.tolist(),
            "null_cosines": self.null_cosines.tolist(),
        }


def main(argv: list[str]) -> int:
    """Subprocess entry (see :data:`AUDIT_ENTRY`): run each requested audit in turn, write the
    list of their JSON results to OUT_FILE."""
    requests = json.loads(argv[0])
    results = [run_canary_audit(AuditConfig(**request["config"]),
                                broken=request.get("broken")).to_json()
               for request in requests]
    Path(argv[1]).write_text(json.dumps(results))
    return 0


def audit_aggregator(config: AuditConfig, broken: str | None = None) -> Any:
    """The aggregation factory the audit runs: the engine's :func:`dp_aggregator` for the
    configured job, with its noise from ``config.noise_seed`` and, if ``broken`` names one of
    :data:`BROKEN_MECHANISMS`, that one change (half-noise: built for the job with z/2)."""
    return dp_aggregator(_mechanism_spec(config, broken), audit_noise_disabled=broken == "noise",
                         audit_clipping_removed=broken == "clipping",
                         noise_seed=config.noise_seed)


def _mechanism_spec(config: AuditConfig, broken: str | None) -> JobSpec:
    """The job spec the audited mechanism is built from: the configured job's, with the
    noise multiplier halved for ``"half-noise"`` (the analytic ε stays the configured one)."""
    if broken is not None and broken not in BROKEN_MECHANISMS:
        raise ValueError(f"unknown broken mechanism {broken!r}; one of {sorted(BROKEN_MECHANISMS)}")
    spec = config.job_spec()
    if broken == "half-noise":
        spec = replace(spec, noise_multiplier=spec.noise_multiplier / 2)
    return spec


def run_canary_audit(config: AuditConfig, *, broken: str | None = None) -> PrivacyAuditResult:
    """Run ``config.rounds`` rounds of the engine's DP mechanism with canaries; estimate ε.

    ``broken`` (a key of :data:`BROKEN_MECHANISMS`) audits that broken copy of the mechanism;
    the analytic ε is still the configured job's.
    """
    _mechanism_spec(config, broken)  # refuse an unknown mechanism before any work
    if config.path == "shards" and broken == "clipping":
        raise ValueError("the vectorized engine clips inside each shard's work: it has no "
                         "clipping-removed copy; audit 'clipping' on another path")
    analytic = training_epsilon(sampling_rate=config.sampling_rate,
                                noise_multiplier=config.noise_multiplier, rounds=config.rounds,
                                delta=config.delta)
    seeds = np.random.SeedSequence(config.seed).spawn(5)
    direction_seed, participation_seed, null_seed, bootstrap_seed, data_seed = seeds
    run = _aggregator_path if config.path == "aggregator" else _training_path
    canary_cosines, null_cosines = run(
        config, broken, np.random.default_rng(direction_seed),
        np.random.default_rng(null_seed), np.random.default_rng(participation_seed),
        np.random.default_rng(data_seed))
    interval = _bootstrap_interval(np.random.default_rng(bootstrap_seed), canary_cosines,
                                   null_cosines, config)
    return PrivacyAuditResult(
        config=config, broken=broken, analytic_epsilon=analytic,
        empirical_epsilon=empirical_epsilon(canary_cosines, null_cosines, config.delta),
        interval=interval, canary_cosines=canary_cosines, null_cosines=null_cosines,
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


# ---------------------------------------------------------------------------------------------
# The estimator: ε of two Gaussians with their own means and spreads


def empirical_epsilon(canary_cosines: np.ndarray, null_cosines: np.ndarray, delta: float) -> float:
    """The point estimate: :func:`two_gaussian_epsilon` of the two fitted Gaussians."""
    return two_gaussian_epsilon(Gaussian.fit(canary_cosines), Gaussian.fit(null_cosines), delta)


def two_gaussian_epsilon(first: Gaussian, second: Gaussian, delta: float) -> float:
    """Smallest ε ≥ 0 such that N(first) and N(second) are (ε, δ)-indistinguishable both ways.

    The max over both orders of the ε at which :func:`hockey_stick_divergence` falls to
    ``delta``. For equal spreads this is the ε of μ-Gaussian DP with μ = |Δmean| / std (the
    Gaussian mechanism with σ = 1/μ); for unequal spreads the privacy loss is quadratic, hence
    unbounded in the tails, and ε is larger.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    for g in (first, second):
        if not (math.isfinite(g.mean) and math.isfinite(g.std) and g.std > 0.0):
            raise ValueError(f"need a finite mean and a finite std > 0, got {g}")
    return max(_epsilon_at(first, second, delta), _epsilon_at(second, first, delta))


def hockey_stick_divergence(p: Gaussian, q: Gaussian, epsilon: float) -> float:
    """δ(ε) = sup_S P(S) − e^ε·Q(S) = P(L > ε) − e^ε·Q(L > ε), L = log(dP/dQ).

    L(x) = A·x² + B·x + C is quadratic, so {L > ε} is an interval, the complement of one, a
    half-line, ℝ or ∅, and both probabilities are normal CDFs at the roots (in log space, so
    e^ε·Q(S) neither overflows nor cancels).
    """
    a = 0.5 / q.std**2 - 0.5 / p.std**2
    b = p.mean / p.std**2 - q.mean / q.std**2
    c = (0.5 * (q.mean / q.std) ** 2 - 0.5 * (p.mean / p.std) ** 2
         + math.log(q.std / p.std) - epsilon)
    region = _positive_region(a, b, c)
    log_p, log_q = _log_probability(p, region), _log_probability(q, region)
    if log_p == -math.inf or epsilon + log_q >= log_p:
        return 0.0
    return math.exp(log_p) * -math.expm1(epsilon + log_q - log_p)


_Region = tuple[str, float, float]  # ("all"|"none"|"below"|"above"|"inside"|"outside", lo, hi)


def _positive_region(a: float, b: float, c: float) -> _Region:
    """{x : a·x² + b·x + c > 0}, with the numerically stable quadratic roots."""
    if a == 0.0:
        if b == 0.0:
            return ("all" if c > 0 else "none", 0.0, 0.0)
        return ("above", -c / b, 0.0) if b > 0 else ("below", -c / b, 0.0)
    discriminant = b * b - 4.0 * a * c
    if discriminant <= 0.0:
        return ("all" if a > 0 else "none", 0.0, 0.0)
    half = -0.5 * (b + math.copysign(math.sqrt(discriminant), b))  # ≠ 0: discriminant > 0
    roots = sorted([half / a, c / half])
    return ("outside" if a > 0 else "inside", roots[0], roots[1])


def _log_probability(g: Gaussian, region: _Region) -> float:
    kind, lo, hi = region
    zl, zh = (lo - g.mean) / g.std, (hi - g.mean) / g.std
    if kind == "all":
        return 0.0
    if kind == "none":
        return -math.inf
    if kind == "below":
        return float(log_ndtr(zl))
    if kind == "above":
        return float(log_ndtr(-zl))
    if kind == "outside":
        return float(np.logaddexp(log_ndtr(zl), log_ndtr(-zh)))
    # inside (lo, hi): subtract the tail nearer the mean from the farther one, without cancelling
    if zl >= 0.0:
        big, small = float(log_ndtr(-zl)), float(log_ndtr(-zh))
    elif zh <= 0.0:
        big, small = float(log_ndtr(zh)), float(log_ndtr(zl))
    else:
        mass = 1.0 - float(ndtr(zl)) - float(ndtr(-zh))
        return math.log(mass) if mass > 0.0 else -math.inf
    return big + math.log1p(-math.exp(small - big)) if small < big else -math.inf


def _epsilon_at(p: Gaussian, q: Gaussian, delta: float) -> float:
    """Smallest ε ≥ 0 with hockey_stick_divergence(p, q, ε) ≤ delta (it is non-increasing)."""
    if hockey_stick_divergence(p, q, 0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while hockey_stick_divergence(p, q, high) > delta:
        low, high = high, 2.0 * high
    while high - low > 1e-9 * high:
        mid = 0.5 * (low + high)
        low, high = (mid, high) if hockey_stick_divergence(p, q, mid) > delta else (low, mid)
    return high


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


# ---------------------------------------------------------------------------------------------
# The two paths: where canaries enter the mechanism


def _aggregator_path(config: AuditConfig, broken: str | None,
                     directions_rng: np.random.Generator, null_rng: np.random.Generator,
                     participation: np.random.Generator,
                     _data_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Canary deltas straight into the aggregator; cosines over the whole parameter vector."""
    import tensorflow_federated as tff

    value_type = tff.types.StructWithPythonType(
        [tff.types.TensorType(np.float32, shape) for shape in config.weight_shapes], list)
    aggregation = audit_aggregator(config, broken).create(value_type)
    dimension = sum(math.prod(shape) for shape in config.weight_shapes)
    directions = _unit_vectors(directions_rng, config.canaries, dimension)
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
    nulls = _unit_vectors(null_rng, config.null_directions, dimension)
    unit_delta = final_delta / np.linalg.norm(final_delta)
    return directions @ unit_delta, nulls @ unit_delta


def _training_path(config: AuditConfig, broken: str | None,
                   directions_rng: np.random.Generator, null_rng: np.random.Generator,
                   participation: np.random.Generator,
                   data_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Canary clients trained in the job's TFF process (per-user or sharded) beside synthetic
    users; cosines of each probe u ⊗ Σ_t unit(e_y − p_t) with the change of the kernel."""
    import tensorflow as tf

    from engine.artifact import linear_classifier_artifact
    from engine.datastore import Partition

    tf.random.set_seed(config.seed)  # tf.data's shuffle of a user's examples
    features, classes = config.num_features, config.num_classes
    canary_u = _unit_vectors(directions_rng, config.canaries, features)
    canary_y = directions_rng.integers(0, classes, config.canaries).astype(np.int32)
    null_u = _unit_vectors(null_rng, config.null_directions, features)
    null_y = null_rng.integers(0, classes, config.null_directions)
    probe_u, probe_y = np.concatenate([canary_u, null_u]), np.concatenate([canary_y, null_y])
    # Synthetic users: features of norm ≈ 1, labels from a random linear teacher.
    user_x = (data_rng.standard_normal((config.population, config.examples_per_user, features))
              / math.sqrt(features)).astype(np.float32)
    user_y = np.argmax(user_x @ data_rng.standard_normal((features, classes)),
                       axis=-1).astype(np.int32)
    canary_x = (CANARY_FEATURE_NORM * canary_u).astype(np.float32)

    doc = linear_classifier_artifact(features, classes)
    if config.path == "training":
        training = _fed_avg_process(doc, config.job_spec(), audit_aggregator(config, broken))

        def clients(users: np.ndarray, canaries: np.ndarray) -> list[Any]:
            # The job's own dataset pipeline (shuffle, repeat local_epochs, batch) per client.
            return ([training._client_dataset(user_x[i], user_y[i]) for i in users]
                    + [training._client_dataset(canary_x[i:i + 1], canary_y[i:i + 1])
                       for i in canaries])
    else:
        training = _sharded_training(doc, config, broken, data_rng)
        partition = Partition(
            features=np.concatenate([user_x.reshape(-1, features), canary_x]),
            labels=np.concatenate([user_y.reshape(-1), canary_y]),
            offsets=np.concatenate([np.arange(config.population) * config.examples_per_user,
                                    config.population * config.examples_per_user
                                    + np.arange(config.canaries + 1)]))

        def clients(users: np.ndarray, canaries: np.ndarray) -> list[Any]:
            # The job's own shards: users (canaries too) padded to the cap, one TFF client each.
            return training.shards(partition, np.concatenate([users,
                                                              config.population + canaries]))

    kernel_start = np.asarray(training.process.get_model_weights(training.state).trainable[0])
    probe_sums = np.zeros((len(probe_y), classes))
    for _ in range(config.rounds):
        kernel, bias = (np.asarray(w, np.float64)
                        for w in training.process.get_model_weights(training.state).trainable)
        probe_sums += _unit_rows(np.eye(classes)[probe_y]
                                 - _softmax(CANARY_FEATURE_NORM * probe_u @ kernel + bias))
        users = poisson_sample(config.population, config.sampling_rate,
                               random_bytes=participation.bytes)
        canaries = poisson_sample(config.canaries, config.sampling_rate,
                                  random_bytes=participation.bytes)
        training.state = training.process.next(training.state, clients(users, canaries)).state
    kernel_end = np.asarray(training.process.get_model_weights(training.state).trainable[0])
    change = (kernel_end - kernel_start).astype(np.float64)
    cosines = (np.einsum("jf,fk,jk->j", probe_u, change, probe_sums)
               / (np.linalg.norm(change) * np.linalg.norm(probe_sums, axis=1)))
    return cosines[:config.canaries], cosines[config.canaries:]


def _sharded_training(doc: dict[str, Any], config: AuditConfig, broken: str | None,
                      rng: np.random.Generator) -> Any:
    """The vectorized engine's process (:func:`engine.shard_process.prepare_sharded_training`,
    what every job with a vectorizable model runs) for the audited spec, with the users' cap
    ``examples_per_user``. Its noise is always fresh: the engine has no seeded copy. "noise"
    is its noiseless test build; "half-noise" is built for the job with z/2. ``rng`` orders
    each user's examples (the job draws it from the OS CSPRNG)."""
    from engine.shard_process import (
        noiseless_sharded_training_for_tests,
        prepare_sharded_training,
    )

    spec = _mechanism_spec(config, broken)
    build = noiseless_sharded_training_for_tests if broken == "noise" else prepare_sharded_training
    training = build(doc, spec, cap=config.examples_per_user)
    training._rng = rng
    return training


def _fed_avg_process(doc: dict[str, Any], spec: JobSpec, aggregator: Any) -> Any:
    """The job's process with ``aggregator``: :func:`engine.training.prepare_training`'s
    construction (same model function, loss, optimizers and initial weights) with the audited
    aggregator in place of ``dp_aggregator(spec)`` (tests compare the two type signatures)."""
    import tensorflow as tf
    import tensorflow_federated as tff

    from engine.artifact import keras_from_artifact, validate_artifact_structure
    from engine.training import FederatedTraining, tff_optimizer  # the job's optimizer choice

    summary = validate_artifact_structure(doc)
    input_spec = (tf.TensorSpec([None, summary.input_shape[0]], tf.float32),
                  tf.TensorSpec([None], tf.int32))

    def model_fn() -> tff.learning.models.VariableModel:
        return tff.learning.models.from_keras_model(
            keras_from_artifact(doc, load_weights=False),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(
                from_logits=not summary.outputs_probabilities),
            input_spec=input_spec,
        )

    process = tff.learning.algorithms.build_unweighted_fed_avg(
        model_fn, client_optimizer_fn=tff_optimizer(spec, "client"),
        server_optimizer_fn=tff_optimizer(spec, "server"), model_aggregator=aggregator)
    keras_model = keras_from_artifact(doc)
    initial = tff.learning.models.ModelWeights(
        trainable=[w.numpy() for w in keras_model.trainable_weights],
        non_trainable=[w.numpy() for w in keras_model.non_trainable_weights])
    state = process.set_model_weights(process.initialize(), initial)
    return FederatedTraining(process=process, state=state, spec=spec, keras_model=keras_model)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _unit_vectors(rng: np.random.Generator, count: int, dimension: int) -> np.ndarray:
    """``count`` independent directions, uniform on the sphere (normalised Gaussians)."""
    return _unit_rows(rng.standard_normal((count, dimension)))


def _unflatten(vector: np.ndarray, shapes: tuple[tuple[int, ...], ...]) -> list[np.ndarray]:
    parts, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        parts.append(vector[start:start + size].reshape(shape).astype(np.float32))
        start += size
    return parts
