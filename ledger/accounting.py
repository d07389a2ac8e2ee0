"""Privacy accounting for fedgate jobs: DP events, ε, and the Rényi privacy filter.

Pure functions over plain values; no I/O. The contract, proved in docs/privacy.md:

* Privacy unit: one **user**. Adjacency: add or remove one user (with all their examples).
* Training: DP-FedAvg, each round samples every training user independently with probability
  q (Poisson), clips each sampled user's model delta to L2 norm C and adds N(0, (z·C)²) to the
  sum. T rounds compose to the event ``SelfComposed(PoissonSampled(q, Gaussian(z)), T)``.
* Adaptive clipping (Andrew et al. 2021) adds a second query on the same sampled users in the
  same round: the count of users whose update norm is at most C, centred (each user adds
  ±1/2, sensitivity 1/2) and noised with N(0, σ_b²). The round's event is the composition
  ``PoissonSampled(q, Composed([Gaussian(z_Δ), Gaussian(2σ_b)]))``, a Gaussian mechanism of
  effective noise multiplier (z_Δ⁻² + (2σ_b)⁻²)^(-1/2) (:func:`effective_noise_multiplier`;
  dp-accounting composes it the same way). A job asks for the effective z and σ_b; the update
  noise z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2) is derived (:func:`adaptive_update_noise_multiplier`), so
  the job costs what a fixed-clip job with z costs, up to rounding, and the charged event is
  exactly the two queries that run. The clip C_t then moves with the noised count
  (post-processing).
* Evaluation: one Gaussian release with noise multiplier z_eval on held-out users.
* Held-out users are a fixed, data-independent partition (by user id) disjoint from training
  users, so adding or removing one user changes the input of exactly one of the two parts:
  a job's Rényi DP at each order α is the **parallel composition**
  ``max(ρ_train(α), ρ_eval(α))``, even though evaluation reads the trained model.
* Admission: a Rényi privacy filter over ``FILTER_ORDERS`` kept in exact rational arithmetic.
  A dataset with budget (ε_total, δ) gives order α the budget B(α) that converts to ε_total at
  δ/k (k orders); a job is admitted iff some α has spent(α) + cost(α) ≤ B(α). By the union
  bound over the k orders, the whole adaptively chosen sequence of admitted jobs is
  (ε_total, δ)-DP. Budgets are rounded down and charges up, so the exact comparison never
  favours the researcher.

Numbers shown to people (``training_epsilon``, ``JobCost.epsilon``) come from dp-accounting's
``RdpAccountant``; ``pld_epsilon`` is the tighter PLD figure for a single job only.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import re
from collections import namedtuple
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import dp_accounting
from dp_accounting.dp_event import DpEventNamedTuple
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, compute_epsilon

# fmt: off
FILTER_ORDERS: tuple[float, ...] = (
    1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 32.0, 64.0,
)
# fmt: on

RdpVector = tuple[Fraction, ...]
"""Exact RDP values, one per filter order (spent amounts and budgets)."""

# A charge at an order where the job's RDP is infinite: more than any finite float, hence more
# than any budget, so that order never admits again (until an exact refund removes it).
_INFINITE_CHARGE = Fraction(2) ** 1024

# Relative allowance for the binary64 error of evaluating B(α) (a handful of roundings, each
# ≤ 2⁻⁵³ relative to the terms); 2⁻⁴⁰ exceeds it by more than three orders of magnitude.
_BUDGET_MARGIN = Fraction(1, 2**40)

_EVENT_MODULE = "dp_accounting.dp_event"
_VECTOR_ENTRY = re.compile(r"[0-9]+/[0-9]+")


class InvalidPrivacyParameter(ValueError):
    """A DP parameter is out of range; the message names the parameter."""


# --- parameter validation ---------------------------------------------------------------


def _real(name: str, value: object) -> float:
    """``value`` as a finite Python float (never a numpy float32, which would stay in events)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidPrivacyParameter(f"{name} must be a real number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise InvalidPrivacyParameter(f"{name} must be finite, got {result}")
    return result


def _sampling_rate(value: object, name: str = "sampling_rate") -> float:
    q = _real(name, value)
    if not 0.0 < q <= 1.0:
        raise InvalidPrivacyParameter(f"{name} must be in (0, 1], got {q}")
    return q


def _positive(name: str, value: object) -> float:
    x = _real(name, value)
    if x <= 0.0:
        raise InvalidPrivacyParameter(f"{name} must be > 0, got {x}")
    return x


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidPrivacyParameter(f"{name} must be an integer, got {value!r}")
    n = int(value)
    if n < 1:
        raise InvalidPrivacyParameter(f"{name} must be ≥ 1, got {n}")
    return n


def _delta(value: object) -> float:
    d = _real("delta", value)
    if not 0.0 < d < 1.0:
        raise InvalidPrivacyParameter(f"delta must be in (0, 1), got {d}")
    return d


def _orders(orders: Sequence[float]) -> tuple[float, ...]:
    result = tuple(_real("orders", a) for a in orders)
    if not result or any(a <= 1.0 for a in result):
        raise InvalidPrivacyParameter(f"orders must be a non-empty sequence of α > 1, got {orders}")
    if any(a >= b for a, b in itertools.pairwise(result)):
        raise InvalidPrivacyParameter(f"orders must be strictly increasing, got {orders}")
    return result


# dp-accounting's 156 default orders, validated once: every admission's ε and every status
# poll's progress ε are computed at them.
_DEFAULT_ORDERS = _orders(DEFAULT_RDP_ORDERS)


# --- events and ε --------------------------------------------------------------------------


def training_event(*, sampling_rate: float, noise_multiplier: float, rounds: int,
                   clipped_count_stddev: float | None = None) -> dp_accounting.DpEvent:
    """The DP event of ``rounds`` rounds of DP-FedAvg with Poisson sampling of users.

    Each round includes each training user independently with probability ``sampling_rate``,
    clips each included user's update to L2 norm C and adds Gaussian noise of standard
    deviation ``noise_multiplier``·C to the sum (user-level, add/remove adjacency). Fields are
    Python floats/ints whatever the input type.

    ``clipped_count_stddev`` σ_b (adaptive clipping): the round also releases the centred count
    of unclipped users with N(0, σ_b²); ``noise_multiplier`` is then the *effective* multiplier
    of the two queries together and the update noise is
    :func:`adaptive_update_noise_multiplier`. The inner event is
    ``Composed([Gaussian(z_Δ), Gaussian(2σ_b)])`` (events as a tuple: hashable).

    Raises:
        InvalidPrivacyParameter: a parameter is not finite or out of range (σ_b must exceed
            z/2, else no update noise gives the effective z).
    """
    z = _positive("noise_multiplier", noise_multiplier)
    one_round: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(z)
    if clipped_count_stddev is not None:
        count_multiplier = 2.0 * _positive("clipped_count_stddev", clipped_count_stddev)
        one_round = dp_accounting.ComposedDpEvent((
            dp_accounting.GaussianDpEvent(adaptive_update_noise_multiplier(
                noise_multiplier=z, clipped_count_stddev=clipped_count_stddev)),
            dp_accounting.GaussianDpEvent(count_multiplier)))
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(_sampling_rate(sampling_rate), one_round),
        _count("rounds", rounds),
    )


def adaptive_update_noise_multiplier(*, noise_multiplier: float,
                                     clipped_count_stddev: float) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2): the update noise that, composed with the clipped-count
    query's N(0, σ_b²) at sensitivity 1/2, gives the effective multiplier z (TFF's
    ``DifferentiallyPrivateFactory.gaussian_adaptive`` splits it the same way).

    Raises:
        InvalidPrivacyParameter: 2σ_b ≤ z (the count query alone would cost more than z).
    """
    z = _positive("noise_multiplier", noise_multiplier)
    count_multiplier = 2.0 * _positive("clipped_count_stddev", clipped_count_stddev)
    remaining = z**-2 - count_multiplier**-2
    if not remaining > 0.0:
        raise InvalidPrivacyParameter(
            f"clipped_count_stddev {clipped_count_stddev:g} must exceed noise_multiplier / 2 = "
            f"{z / 2:g}: the clipped-count query alone would cost more than the job's z")
    z_update = remaining**-0.5
    if not math.isfinite(z_update):
        raise InvalidPrivacyParameter(
            f"clipped_count_stddev {clipped_count_stddev:g} is too close to noise_multiplier / 2 "
            f"= {z / 2:g}: the update noise would be unbounded")
    return float(z_update)


def effective_noise_multiplier(event: dp_accounting.DpEvent) -> float:
    """The noise multiplier of the single Gaussian equivalent to ``event``: a
    ``GaussianDpEvent``, or a ``ComposedDpEvent`` of them ((Σ zᵢ⁻²)^(-1/2), with
    dp-accounting's own operations in its order, so the RDP of ``Gaussian(effective)`` is its
    RDP of the composition, bit for bit; a test checks it)."""
    if isinstance(event, dp_accounting.GaussianDpEvent):
        return float(event.noise_multiplier)
    if isinstance(event, dp_accounting.ComposedDpEvent):
        inverse_squares = 0
        for part in event.events:
            inverse_squares += effective_noise_multiplier(part) ** -2
        return float(inverse_squares**-0.5)
    raise InvalidPrivacyParameter(f"not a Gaussian event or a composition of them: {event}")


def clipped_count_stddev_of(event: dp_accounting.DpEvent) -> float | None:
    """σ_b of a training round's inner event (None: fixed clipping): the second Gaussian of
    the composition is the count query at sensitivity 1/2, so σ_b is half its multiplier."""
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return float(event.events[1].noise_multiplier) / 2.0
    return None


def evaluation_event(*, noise_multiplier: float) -> dp_accounting.DpEvent:
    """The DP event of one evaluation release on held-out users.

    Per-user metric contributions are clipped to L2 norm C (jointly, over all released metrics)
    and summed; Gaussian noise of standard deviation ``noise_multiplier``·C is added.
    """
    return dp_accounting.GaussianDpEvent(_positive("noise_multiplier", noise_multiplier))


@functools.lru_cache(maxsize=1024)
def _event_rdp(event: dp_accounting.DpEvent, orders: tuple[float, ...]) -> tuple[float, ...]:
    """dp-accounting's RDP curve of ``event`` at ``orders``, memoised on the (frozen) event.

    ``RdpAccountant`` composes ``SelfComposedDpEvent(e, n)`` as ``n ×`` the curve of ``e``
    (binary64, added to zeros), so computing the one-step curve once and scaling it gives the
    same bits (a test checks it) while a job's T rounds, the suggestion's bisection over rounds
    and repeated admissions share one dp-accounting call instead of one each.
    """
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return tuple(event.count * r for r in _event_rdp(event.event, orders))
    return tuple(float(r) for r in RdpAccountant(list(orders)).compose(event).rdp)


@functools.lru_cache(maxsize=1024)
def _job_epsilon(cost: JobCost, delta: float, orders: tuple[float, ...]) -> float:
    """:meth:`JobCost.epsilon` at validated ``delta`` and ``orders``, memoised on the (frozen)
    cost: admissions of the same job parameters share one RDP→(ε, δ) conversion."""
    epsilon, _ = compute_epsilon(orders, cost._rdp(orders), delta)
    return float(epsilon)


def event_rdp(event: dp_accounting.DpEvent,
              orders: Sequence[float] = FILTER_ORDERS) -> tuple[float, ...]:
    """dp-accounting's RDP curve of a fedgate event at ``orders`` (e.g. the public-count
    estimate charged at import); possibly ``inf``."""
    return _event_rdp(event, _orders(orders))


def event_to_json(event: dp_accounting.DpEvent) -> dict[str, Any]:
    """A fedgate DP event as nested JSON objects (``JobCost.to_json``'s form for one event)."""
    return _event_to_json(event)


def event_from_json(data: object) -> dp_accounting.DpEvent:
    """Inverse of :func:`event_to_json`; only fedgate's event classes, every field validated."""
    return _event_from_json(data)


@dataclass(frozen=True)
class JobCost:
    """The privacy cost of one job: its training event and optional evaluation event.

    Training and evaluation read disjoint users, so the job's RDP curve is the elementwise
    maximum of the two parts' curves (parallel composition), not their sum.
    """

    training: dp_accounting.DpEvent
    evaluation: dp_accounting.DpEvent | None

    @classmethod
    def for_job(
        cls,
        *,
        sampling_rate: float,
        noise_multiplier: float,
        rounds: int,
        evaluation_noise_multiplier: float | None,
        clipped_count_stddev: float | None = None,
    ) -> JobCost:
        """The cost of a job spec; ``evaluation_noise_multiplier`` None means no DP evaluation,
        ``clipped_count_stddev`` None means a fixed clip (:func:`training_event`)."""
        training = training_event(
            sampling_rate=sampling_rate, noise_multiplier=noise_multiplier, rounds=rounds,
            clipped_count_stddev=clipped_count_stddev,
        )
        if evaluation_noise_multiplier is None:
            return cls(training, None)
        z_eval = _positive("evaluation_noise_multiplier", evaluation_noise_multiplier)
        return cls(training, evaluation_event(noise_multiplier=z_eval))

    def rdp(self, orders: Sequence[float] = FILTER_ORDERS) -> tuple[float, ...]:
        """RDP of the whole job at each order: max over its parts (parallel composition).

        Values are dp-accounting's binary64 results, possibly ``inf``; the filter rounds them up
        when charging.
        """
        return self._rdp(_orders(orders))

    def _rdp(self, orders: tuple[float, ...]) -> tuple[float, ...]:
        """:meth:`rdp` at ``orders`` already validated by ``_orders``."""
        curves = [_event_rdp(self.training, orders)]
        if self.evaluation is not None:
            curves.append(_event_rdp(self.evaluation, orders))
        return tuple(max(values) for values in zip(*curves, strict=True))

    def epsilon(self, delta: float, orders: Sequence[float] | None = None) -> float:
        """ε of this job alone at ``delta``, by dp-accounting's RDP→(ε, δ) conversion.

        ``orders`` None means ``RdpAccountant``'s default orders, so a training-only job gets
        exactly the ε dp-accounting reports. This is the figure shown to people; admission
        uses the filter, never this number.
        """
        return _job_epsilon(self, _delta(delta),
                            _DEFAULT_ORDERS if orders is None else _orders(orders))

    def epsilon_after_rounds(self, rounds_done: int, delta: float) -> float:
        """:func:`epsilon_after_rounds` with this job's parameters, read from its events (an
        adaptive-clipping round counts as the Gaussian of its effective multiplier: the same
        RDP, bit for bit)."""
        sampled = self.training.event
        return epsilon_after_rounds(
            sampling_rate=float(sampled.sampling_probability),
            noise_multiplier=effective_noise_multiplier(sampled.event),
            rounds=int(self.training.count),
            rounds_done=rounds_done, delta=delta,
            evaluation_noise_multiplier=(None if self.evaluation is None
                                         else float(self.evaluation.noise_multiplier)))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict: each event in dp-accounting's named-tuple form, as nested objects."""
        return {
            "training": _event_to_json(self.training),
            "evaluation": None if self.evaluation is None else _event_to_json(self.evaluation),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobCost:
        """Inverse of ``to_json`` (exact: floats survive JSON unchanged).

        Only the event classes fedgate emits are accepted and every parameter is re-validated,
        so stored or received JSON never makes dp-accounting import or build anything else.
        """
        if not isinstance(data, dict) or set(data) != {"training", "evaluation"}:
            raise ValueError("job cost JSON must have exactly 'training' and 'evaluation'")
        evaluation = data["evaluation"]
        return cls(
            _event_from_json(data["training"]),
            None if evaluation is None else _event_from_json(evaluation),
        )


# Event classes fedgate serializes, with the validator of each field, fields in dp-accounting's
# attribute order: the order ``to_named_tuple`` gives them and so the order they are stored in.
_EVENT_FIELDS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "GaussianDpEvent": {"noise_multiplier": lambda v: _positive("noise_multiplier", v)},
    "PoissonSampledDpEvent": {
        "sampling_probability": lambda v: _sampling_rate(v, "sampling_probability"),
        "event": lambda v: _event_from_json(v).to_named_tuple(),
    },
    "SelfComposedDpEvent": {
        "event": lambda v: _event_from_json(v).to_named_tuple(),
        "count": lambda v: _count("count", v),
    },
    "ComposedDpEvent": {"events": lambda v: _gaussian_pair(v)},
}


def _gaussian_pair(data: object) -> list[DpEventNamedTuple]:
    """The only composition fedgate emits: [update Gaussian, clipped-count Gaussian]."""
    if not isinstance(data, list) or len(data) != 2:
        raise ValueError("a ComposedDpEvent must hold exactly two events")
    events = [_event_from_json(item) for item in data]
    if not all(isinstance(e, dp_accounting.GaussianDpEvent) for e in events):
        raise ValueError("a ComposedDpEvent may only compose Gaussian events")
    return [e.to_named_tuple() for e in events]


def _event_to_json(event: dp_accounting.DpEvent) -> dict[str, Any]:
    """``event`` in dp-accounting's ``to_named_tuple`` form, as nested objects, read from its
    fields directly: ``to_named_tuple`` makes a new NamedTuple class on every call, four per
    admission. A test checks the JSON is byte for byte the named-tuple route's."""
    cls = type(event)
    if cls.__module__ != _EVENT_MODULE or cls.__name__ not in _EVENT_FIELDS:
        raise ValueError(f"cannot serialize {cls.__module__}.{cls.__name__}")
    data: dict[str, Any] = {"module_name": _EVENT_MODULE, "class_name": cls.__name__}
    for field in _EVENT_FIELDS[cls.__name__]:
        data[field] = _field_to_json(getattr(event, field))
    return data


def _field_to_json(value: object) -> object:
    if isinstance(value, dp_accounting.DpEvent):
        return _event_to_json(value)
    if isinstance(value, (list, tuple)):
        return [_field_to_json(item) for item in value]
    return value


@functools.cache
def _named_tuple_type(class_name: str) -> type:
    """The named-tuple class ``DpEvent.from_named_tuple`` reads for ``class_name``, made once
    (making one per parse was a tenth of an admission's accounting time)."""
    return namedtuple(f"_{class_name}", ["module_name", "class_name", *_EVENT_FIELDS[class_name]])


def _event_from_json(data: object) -> dp_accounting.DpEvent:
    if not isinstance(data, dict):
        raise ValueError(f"a DP event must be a JSON object, got {data!r}")
    class_name = data.get("class_name")
    fields = _EVENT_FIELDS.get(class_name) if isinstance(class_name, str) else None
    if data.get("module_name") != _EVENT_MODULE or fields is None:
        raise ValueError(f"unsupported DP event {data.get('module_name')}.{class_name}")
    if set(data) != {"module_name", "class_name", *fields}:
        raise ValueError(f"{class_name} must have exactly the fields {sorted(fields)}")
    values = {name: validate(data[name]) for name, validate in fields.items()}
    event = dp_accounting.DpEvent.from_named_tuple(
        _named_tuple_type(class_name)(module_name=_EVENT_MODULE, class_name=class_name, **values)
    )
    if isinstance(event, dp_accounting.ComposedDpEvent):  # as training_event builds it
        event = dp_accounting.ComposedDpEvent(tuple(event.events))
    return event


def training_epsilon(*, sampling_rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε of a training run alone at ``delta``: dp-accounting's ``RdpAccountant`` with its
    default orders and conversion (the figure researchers see)."""
    training = training_event(sampling_rate=sampling_rate, noise_multiplier=noise_multiplier, rounds=rounds)
    return JobCost(training, None).epsilon(delta)


@functools.lru_cache(maxsize=4096)
def epsilon_after_rounds(*, sampling_rate: float, noise_multiplier: float, rounds: int,
                         rounds_done: int, delta: float,
                         evaluation_noise_multiplier: float | None = None) -> float:
    """ε spent after ``rounds_done`` of a job's ``rounds`` training rounds (its progress bar).

    A function of the job's public parameters only (q, z, T, δ and the DP evaluation's noise
    multiplier), never of data or of how many users a round really sampled: 0 before the
    first round, then the RDP ε of ``rounds_done`` rounds of the job's training event
    (``training_epsilon``), and at ``rounds_done == rounds`` the whole job's ε — training and
    DP evaluation in parallel composition, i.e. exactly ``JobCost.for_job(...).epsilon(delta)``,
    the ε charged. Non-decreasing in ``rounds_done``. Cached, and the one-round RDP curve is
    computed once per (q, z): the gateway calls this on every status poll.
    """
    total = _count("rounds", rounds)
    if rounds_done == 0:
        return 0.0
    done = _count("rounds_done", rounds_done)
    if done > total:
        raise InvalidPrivacyParameter(f"rounds_done {done} exceeds rounds {total}")
    if done == total:
        return JobCost.for_job(
            sampling_rate=sampling_rate, noise_multiplier=noise_multiplier, rounds=total,
            evaluation_noise_multiplier=evaluation_noise_multiplier,
        ).epsilon(delta)
    # RdpAccountant composes T rounds as T × (one round's RDP), so this is bit-for-bit
    # training_epsilon(rounds=done) (a test checks it) without recomputing the curve.
    orders = _DEFAULT_ORDERS
    one_round = _one_round_rdp(_sampling_rate(sampling_rate),
                               _positive("noise_multiplier", noise_multiplier))
    epsilon, _ = compute_epsilon(orders, [done * r for r in one_round], _delta(delta))
    return float(epsilon)


@functools.lru_cache(maxsize=256)
def _one_round_rdp(sampling_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    event = training_event(sampling_rate=sampling_rate, noise_multiplier=noise_multiplier, rounds=1)
    return _event_rdp(event, _DEFAULT_ORDERS)


def pld_epsilon(*, sampling_rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε of a training run by dp-accounting's ``PLDAccountant`` (pessimistic discretization).

    Tighter, single job only: PLDs of adaptively chosen jobs cannot be composed into an
    admission rule, so this number is shown beside the RDP ε and never used for the filter.
    """
    event = training_event(sampling_rate=sampling_rate, noise_multiplier=noise_multiplier, rounds=rounds)
    return float(PLDAccountant().compose(event).get_epsilon(_delta(delta)))


# --- calibration -----------------------------------------------------------------------------

_CALIBRATION_RELATIVE_TOLERANCE = 1e-3
_MAX_ROUNDS = 2**53  # far beyond any real job; stops the search for absurd targets


def calibrate_noise_multiplier(
    *, target_epsilon: float, sampling_rate: float, rounds: int, delta: float
) -> float:
    """The smallest noise multiplier z with ``training_epsilon`` ≤ ``target_epsilon``, up to
    1e-3 relative: the result always meets the target and is at most 1.001·z*.

    Bisection on z, valid because ε decreases as z grows.
    """
    target = _positive("target_epsilon", target_epsilon)
    sampling_rate, rounds = _sampling_rate(sampling_rate), _count("rounds", rounds)
    delta = _delta(delta)

    def meets_target(z: float) -> bool:
        epsilon = training_epsilon(
            sampling_rate=sampling_rate, noise_multiplier=z, rounds=rounds, delta=delta
        )
        return epsilon <= target

    low, high = 0.5, 1.0  # invariant once bracketed: low misses the target, high meets it
    while not meets_target(high):
        low, high = high, 2.0 * high
    while meets_target(low):
        low, high = low / 2.0, low
    while high > low * (1.0 + _CALIBRATION_RELATIVE_TOLERANCE):
        middle = (low + high) / 2.0
        low, high = (low, middle) if meets_target(middle) else (middle, high)
    return high


def calibrate_rounds(
    *, target_epsilon: float, sampling_rate: float, noise_multiplier: float, delta: float
) -> int:
    """The largest number of rounds T with ``training_epsilon`` ≤ ``target_epsilon``; 0 if even
    one round exceeds it. Exponential then binary search, valid because ε grows with T.

    Raises:
        InvalidPrivacyParameter: also when the target allows more than 2**53 rounds.
    """
    target = _positive("target_epsilon", target_epsilon)
    sampling_rate = _sampling_rate(sampling_rate)
    noise_multiplier = _positive("noise_multiplier", noise_multiplier)
    delta = _delta(delta)

    def meets_target(rounds: int) -> bool:
        epsilon = training_epsilon(
            sampling_rate=sampling_rate,
            noise_multiplier=noise_multiplier,
            rounds=rounds,
            delta=delta,
        )
        return epsilon <= target

    if not meets_target(1):
        return 0
    low, high = 1, 2  # invariant: low meets the target, high misses it
    while meets_target(high):
        if high >= _MAX_ROUNDS:
            raise InvalidPrivacyParameter(f"target_epsilon {target} allows more than 2**53 rounds")
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if meets_target(middle) else (low, middle)
    return low


# --- the Rényi privacy filter ---------------------------------------------------------------


def filter_budget(
    *, epsilon_total: float, delta: float, orders: Sequence[float] = FILTER_ORDERS
) -> RdpVector:
    """Per-order RDP budgets B(α) of a dataset with total budget (ε_total, δ).

    B(α) is the RDP value that dp-accounting's conversion
    ε = r + log1p(−1/α) − log(δ'·α)/(α−1) turns into exactly ε_total at δ' = δ/k:
    B(α) = ε_total − log1p(−1/α) + log(δ'·α)/(α−1). Any adaptive sequence whose total RDP
    at α stays ≤ B(α) is (ε_total, δ/k)-DP; the union over the k orders gives (ε_total, δ).

    Rounded down, because it is a budget: B is evaluated in binary64 and then lowered, in exact
    arithmetic, by 2⁻⁴⁰ × (|ε_total| + |log1p(−1/α)| + |log(δ'α)/(α−1)| + 1), which exceeds the
    few-ulp error of the float evaluation (including the rounding of δ/k). A single nextafter
    would not do: near B = 0 the float error is a few ulps of the *terms*, not of B. An order
    whose budget is ≤ 0 gets 0 and can admit nothing (every charge is > 0).
    """
    epsilon_total = _positive("epsilon_total", epsilon_total)
    delta = _delta(delta)
    orders = _orders(orders)
    delta_per_order = delta / len(orders)
    budget = []
    for alpha in orders:
        terms = (
            epsilon_total,
            -math.log1p(-1.0 / alpha),
            math.log(delta_per_order * alpha) / (alpha - 1.0),
        )
        rounded_down = Fraction(sum(terms)) - _BUDGET_MARGIN * Fraction(sum(abs(t) for t in terms) + 1.0)
        budget.append(max(rounded_down, Fraction(0)))
    return tuple(budget)


def _charge(rdp: float) -> Fraction:
    """An RDP value as an exact charge, rounded up, because it is a charge.

    The charge is the next float above the value, so converting never lowers it and 0.0
    (possibly an underflowed positive value) still charges the smallest subnormal: no charge
    is ever 0. ``inf`` charges more than any budget. The same float always gives the same
    charge, so a refund subtracts exactly what was added.

    The value itself is dp-accounting's binary64 RDP, trusted as is: its own rounding error
    (measured ≤ 1e-13 per round, see docs/privacy.md) is not covered by this rounding.
    """
    if math.isnan(rdp) or rdp < 0.0:
        raise ValueError(f"an RDP cost must be ≥ 0, got {rdp}")
    above = math.nextafter(rdp, math.inf)
    return _INFINITE_CHARGE if math.isinf(above) else Fraction(above)


def _charges(cost: Sequence[float], length: int) -> tuple[Fraction, ...]:
    if len(cost) != length:
        raise ValueError(f"cost has {len(cost)} orders, the filter has {length}")
    return _charges_of(tuple(float(c) for c in cost))


@functools.lru_cache(maxsize=1024)
def _charges_of(cost: tuple[float, ...]) -> tuple[Fraction, ...]:
    """:func:`_charge` of each value, memoised: a job's admission checks and then charges the
    same cost, and jobs of the same parameters have the same cost."""
    return tuple(_charge(c) for c in cost)


def zero(orders: Sequence[float] = FILTER_ORDERS) -> RdpVector:
    """The spent vector of a dataset no job has touched."""
    return tuple(Fraction(0) for _ in _orders(orders))


def add(spent: RdpVector, cost: Sequence[float]) -> RdpVector:
    """``spent`` plus the job's RDP ``cost`` (charged upward), order by order, exactly.

    Exact rational addition is associative and commutative, so the spent vector of a set of
    jobs does not depend on the order in which they were admitted.
    """
    return tuple(s + c for s, c in zip(spent, _charges(cost, len(spent)), strict=True))


def subtract(spent: RdpVector, cost: Sequence[float]) -> RdpVector:
    """Refund: the exact inverse of ``add`` — ``subtract(add(s, c), c) == s``.

    Only for a job that failed before reading any user data. Raises ValueError if the refund
    exceeds what was spent at some order (it was never charged).
    """
    result = tuple(s - c for s, c in zip(spent, _charges(cost, len(spent)), strict=True))
    if any(r < 0 for r in result):
        raise ValueError("refund exceeds the spent budget; was this cost ever charged?")
    return result


def admits(*, spent: RdpVector, cost: Sequence[float], budget: RdpVector) -> bool:
    """The filter rule: True iff some order α has spent(α) + cost(α) ≤ B(α), exactly.

    ``spent`` holds every reserved and committed job; ``cost`` is the job's RDP
    (``JobCost.rdp``), charged upward. Exactly ``jobs_that_fit(...) >= 1`` (every charge
    c > 0, so ⌊(B − s) / c⌋ ≥ 1 ⟺ s + c ≤ B), without its divisions: it stops at the first
    order that admits.
    """
    if len(spent) != len(budget):
        raise ValueError(f"spent has {len(spent)} orders, the budget has {len(budget)}")
    return any(s + c <= b for s, c, b in zip(spent, _charges(cost, len(spent)), budget,
                                             strict=True))


def jobs_that_fit(*, spent: RdpVector, cost: Sequence[float], budget: RdpVector) -> int:
    """How many copies of this job, this one included, the filter would admit one after another:
    max over α of ⌊(B(α) − spent(α)) / cost(α)⌋, at least 0.

    Always finite: every charge is > 0 (see ``_charge``). ``admits`` is exactly "≥ 1".
    """
    return _copies_that_fit(spent, cost, budget)[0]


def _copies_that_fit(spent: RdpVector, cost: Sequence[float], budget: RdpVector) -> tuple[int, int]:
    """(copies that fit, index of the order with the most room in units of this cost)."""
    if len(spent) != len(budget):
        raise ValueError(f"spent has {len(spent)} orders, the budget has {len(budget)}")
    charges = _charges(cost, len(spent))
    room = [(b - s) / c for s, c, b in zip(spent, charges, budget, strict=True)]
    best = max(range(len(room)), key=room.__getitem__)  # ties: the lowest order
    return max(math.floor(room[best]), 0), best


@dataclass(frozen=True)
class FilterStatus:
    """What the filter says about a proposed job, for the researcher and the audit log.

    ``more_jobs_that_fit`` counts copies of the proposed job, itself included, so ``fits`` is
    ``more_jobs_that_fit ≥ 1``. ``best_order`` is the order with the most room measured in
    copies of this job (when it does not fit: the order closest to fitting). No "remaining ε"
    is reported: subtracting per-job ε values from ε_total is not a valid accounting.
    """

    fits: bool
    more_jobs_that_fit: int
    best_order: float

    @classmethod
    def for_cost(
        cls,
        *,
        spent: RdpVector,
        cost: Sequence[float],
        budget: RdpVector,
        orders: Sequence[float] = FILTER_ORDERS,
    ) -> FilterStatus:
        """The filter's answer for ``cost`` given ``spent`` and ``budget`` over ``orders``."""
        orders = _orders(orders)
        if len(orders) != len(spent):
            raise ValueError(f"spent has {len(spent)} orders, {len(orders)} orders were given")
        copies, best = _copies_that_fit(spent, cost, budget)
        return cls(fits=copies >= 1, more_jobs_that_fit=copies, best_order=orders[best])


def vector_to_json(vector: RdpVector) -> list[str]:
    """Exact JSON form of an RDP vector: one "numerator/denominator" string per order."""
    return [f"{x.numerator}/{x.denominator}" for x in vector]


def vector_from_json(data: Sequence[str]) -> RdpVector:
    """Inverse of ``vector_to_json``; entries must be non-negative "n/d" strings."""
    result = []
    for entry in data:
        if not isinstance(entry, str) or not _VECTOR_ENTRY.fullmatch(entry):
            raise ValueError(f'RDP vector entries must be "n/d" strings, got {entry!r}')
        numerator, denominator = entry.split("/")
        if int(denominator) == 0:
            raise ValueError(f"RDP vector entry {entry!r} has a zero denominator")
        result.append(Fraction(int(numerator), int(denominator)))
    return tuple(result)
