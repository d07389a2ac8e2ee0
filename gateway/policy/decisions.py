"""Owner policy: validated rows in, explainable ``PolicyDecision`` out.

Rows (``policies/policy.csv``, one per line, ``#`` starts a comment line)::

    p,  SUBJECT, DOMAIN, DATASET, ACTION, allow|deny             grant or forbid an action
    g,  MEMBER, GROUP, DOMAIN                                    group membership
    p2, SUBJECT, DOMAIN, DATASET, ACTION|*, CONSTRAINT, VALUE    constrain matching requests

A ``p2`` row names either a *constraint* (``CONSTRAINTS``: it can refuse a request) or an
*obligation* (``OBLIGATIONS``: it never refuses; it attaches a duty to an allowed ``train``
request — hold the job for owner review, or limit how its result is released).

Contract:

* Rows are data. Names follow ``ledger.names`` (the grammar of every principal, group,
  domain and dataset name); a dataset is a name or a prefix glob ending in ``*``; actions
  and effects come from fixed lists; a constraint's value is parsed by the registered parser
  of its constraint into a typed value (finite numbers, known units, ISO dates, time
  windows). Anything else is refused at load time, so no policy text ever reaches an
  expression evaluator.
* A row *matches* a request when its subject is the requester or one of the requester's
  groups in the row's domain (transitively, at most ``MAX_GROUP_NESTING`` levels), its
  domain is the request's, its dataset equals the request's or is a prefix of it ending in
  ``*``, and its action equals the request's (``p2`` rows may use ``*``): the matchers of
  ``policies/model.conf``. Domains never mix: a row of owner A never matches on owner B.
* A request is allowed iff some ``p`` allow row matches, no ``p`` deny row matches (deny
  overrides) and every matching ``p2`` constraint holds. Constraints only restrict; they
  never grant. Anything else is a denial (fail closed).
* A constraint compares one or more facts of the request (``RequestContext``). A fact the
  request does not state is not compared, except for ``train``, which must state every fact
  a matching constraint reads: an unstated fact denies a ``train`` request.
* Obligations only add duties to an allowed request, never grant or refuse. A ``train``
  request is held for review iff some matching ``require_review`` row's condition holds; a
  condition whose facts are unstated holds (fail safe: the owner looks). A result's output
  policy is the strictest of the matching ``max_result_fetches`` / ``result_available_days``
  rows (``OutputPolicy``).
* Quotas (``max_concurrent_jobs``, ``max_cpu_hours_per_month``, ``max_spend_per_month``) are
  obligations the policy cannot decide alone: they compare a limit with the ledger's current
  use. ``PolicyEngine.quotas`` lists the matching ones (``Quota``); admission checks each in
  the transaction that reserves the job (``gateway.quotas``) and refuses a job that would
  exceed one. A group's quota is one pool shared by all its members.
* ``policy_version`` is the SHA-256 over the model file, the policy file and the group
  memberships from the key registry; it is recorded with every decision.
* The engine is immutable once built and evaluates the model through an index (Casbin's
  enforcer scans every row per request); ``tests/test_policy.py`` checks that both agree.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from casbin.model import Model
from sqlalchemy import func
from sqlmodel import Session, select

from engine.keras_config import MODEL_CLASSES
from gateway.deployment import POLICY_TEMPLATES
from ledger.models import Job, Principal
from ledger.names import GRAMMAR, is_name, is_name_pattern

ACTIONS = ("estimate", "train", "evaluate", "read-audit", "admin")
JOB_ACTIONS = ("estimate", "train", "evaluate")
EFFECTS = ("allow", "deny")
MODEL_FAMILIES = tuple(sorted(set(MODEL_CLASSES.values())))
# Casbin's default role manager follows at most 9 membership hops; deeper chains are refused
# rather than silently cut, so the index and Casbin always agree.
MAX_GROUP_NESTING = 9
# For these actions the request states every fact; an unstated fact a constraint reads denies.
STATES_EVERY_FACT = frozenset({"train"})
# Obligations attach to the requests that create a job and its result.
OBLIGATION_ACTIONS = frozenset({"train"})

_VALUE = re.compile(r"^[A-Za-z0-9_.:/|+ -]+$")
_NUMBER = re.compile(r"^[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]{1,3})?$")


class PolicyInvalid(ValueError):
    """A policy failed validation; ``problems`` holds one ``file:line: message`` per error."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


# ---------------------------------------------------------------------------------------------
# Typed values: each parser accepts exactly one documented grammar or raises ValueError.


def parse_number(text: str) -> float:
    """A finite, non-negative decimal such as ``1``, ``0.8`` or ``1e-3`` (no nan/inf)."""
    value = float(text) if _NUMBER.match(text) else math.nan
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite non-negative number")
    return value


def parse_positive(text: str) -> float:
    value = parse_number(text)
    if value <= 0:
        raise ValueError(f"{text!r} must be greater than 0")
    return value


def parse_integer(text: str) -> int:
    """A whole number ≥ 1 written with digits only."""
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is not a whole number ≥ 1")
    return int(text)


_SIZE_UNITS = {"B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_SIZE = re.compile(r"^(?P<n>[0-9.eE+-]+) ?(?P<unit>[A-Za-z]+)$")


def parse_size(text: str) -> int:
    """A size in bytes with a unit: ``512 B``, ``50 MB``, ``1.5GiB`` (kB/MB/GB are 10³ⁿ)."""
    match = _SIZE.match(text)
    if match is None or match["unit"] not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size with a unit ({', '.join(_SIZE_UNITS)})")
    size = parse_number(match["n"]) * _SIZE_UNITS[match["unit"]]
    if size < 1:
        raise ValueError(f"{text!r} is less than one byte")
    return round(size)


_COUNT = re.compile(r"^(?P<n>[0-9.eE+-]+)(?P<unit>[kM]?)$")


def parse_count(text: str) -> int:
    """A whole count, optionally with ``k`` (10³) or ``M`` (10⁶): ``250000``, ``1.5M``."""
    match = _COUNT.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a count such as 250000, 250k or 1.5M")
    count = parse_number(match["n"]) * {"": 1, "k": 10**3, "M": 10**6}[match["unit"]]
    if count < 1 or count != int(count):
        raise ValueError(f"{text!r} is not a whole count ≥ 1")
    return int(count)


def parse_whole(text: str) -> int:
    """A whole number ≥ 0 written with digits only."""
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"{text!r} is not a whole number ≥ 0")
    return int(text)


_AMOUNT = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,6})?$")


def parse_amount(text: str) -> Decimal:
    """An amount of money ≥ 0 as plain decimal text (``25``, ``12.50``), kept exact."""
    if not _AMOUNT.match(text):
        raise ValueError(f"{text!r} is not an amount such as 25 or 12.50")
    return Decimal(text)


def parse_model_family(text: str) -> str:
    if text not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {text!r} (known: {', '.join(MODEL_FAMILIES)})")
    return text


def parse_model_families(text: str) -> frozenset[str]:
    """One family or several joined by ``|``: ``keras-sequential|keras-functional``."""
    return frozenset(parse_model_family(part.strip()) for part in text.split("|"))


def parse_known_model_families(text: str) -> frozenset[str]:
    """``none`` or families joined by ``|`` (for ``dataset_model_families`` in tests)."""
    return frozenset() if text == "none" else parse_model_families(text)


_DURATION = re.compile(r"^(?P<n>[0-9]{1,4})(?P<unit>[hdw])$")


@dataclass(frozen=True)
class EpsilonAllowance:
    """At most ``limit`` ε per researcher within any rolling ``window`` ending now."""

    limit: float
    window: dt.timedelta
    text: str


def parse_epsilon_allowance(text: str) -> EpsilonAllowance:
    """``LIMIT per DURATION`` with DURATION ``Nh``, ``Nd`` or ``Nw``: ``2 per 30d``."""
    limit, _, duration = text.partition(" per ")
    match = _DURATION.match(duration.strip())
    if match is None or int(match["n"]) == 0:
        raise ValueError(f"{text!r} is not 'LIMIT per DURATION' such as '2 per 30d' "
                         "(durations: Nh, Nd, Nw)")
    hours = int(match["n"]) * {"h": 1, "d": 24, "w": 24 * 7}[match["unit"]]
    return EpsilonAllowance(parse_positive(limit.strip()), dt.timedelta(hours=hours), text)


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(
    r"^(?P<days>daily|[a-z]{3}(-[a-z]{3})?) (?P<start>[0-9]{2}:[0-9]{2})-(?P<end>[0-9]{2}:[0-9]{2})"
    r" (?P<zone>[A-Za-z][A-Za-z0-9_+/-]*)$"
)


@dataclass(frozen=True)
class TimeWindow:
    """Weekdays (0 = Monday) and ``[start, end)`` minutes of the day in one time zone."""

    days: frozenset[int]
    start: int
    end: int
    zone: dt.tzinfo
    text: str

    def contains(self, now: dt.datetime) -> bool:
        local = now.astimezone(self.zone)
        minute = local.hour * 60 + local.minute
        return local.weekday() in self.days and self.start <= minute < self.end


def _minute_of_day(text: str, *, end: bool) -> int:
    hours, minutes = int(text[:2]), int(text[3:])
    if minutes > 59 or hours > 24 or (hours == 24 and (minutes or not end)):
        raise ValueError(f"{text!r} is not a time of day (00:00–23:59, or 24:00 as an end)")
    return hours * 60 + minutes


def parse_time_window(text: str) -> TimeWindow:
    """``DAYS HH:MM-HH:MM ZONE``: ``mon-fri 08:00-18:00 UTC``, ``daily 09:00-17:00 Europe/Berlin``.

    DAYS is ``daily``, one day or a range (``fri-mon`` wraps); the end is exclusive and
    after the start (a window across midnight is written as two windows).
    """
    match = _WINDOW.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a time window such as 'mon-fri 08:00-18:00 UTC'")
    first, _, last = match["days"].partition("-")
    if first == "daily":
        days = frozenset(range(7))
    else:
        if first not in _DAYS or (last and last not in _DAYS):
            raise ValueError(f"{match['days']!r}: days are {', '.join(_DAYS)} or daily")
        a, b = _DAYS.index(first), _DAYS.index(last or first)
        days = frozenset((a + i) % 7 for i in range((b - a) % 7 + 1))
    start, end = _minute_of_day(match["start"], end=False), _minute_of_day(match["end"], end=True)
    if end <= start:
        raise ValueError(f"{text!r}: the window must end after it starts (split windows that "
                         "cross midnight in two)")
    zone_name = match["zone"]
    try:
        zone: dt.tzinfo = dt.UTC if zone_name == "UTC" else ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {zone_name!r} (use UTC or an IANA name such as "
                         "Europe/Berlin)") from None
    return TimeWindow(days, start, end, zone, text)


def parse_time_windows(text: str) -> tuple[TimeWindow, ...]:
    """One window or several joined by ``|`` (a request must fall in one of them)."""
    return tuple(parse_time_window(part.strip()) for part in text.split("|"))


_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_INSTANT = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2})?(Z|[+-][0-9]{2}:[0-9]{2})$")


@dataclass(frozen=True)
class Expiry:
    """A grant holds while ``now < ends``."""

    ends: dt.datetime
    text: str


def parse_instant(text: str) -> dt.datetime:
    """An ISO 8601 instant with an explicit offset: ``2025-06-02T09:00Z``, ``...+02:00``."""
    if not _INSTANT.match(text):
        raise ValueError(f"{text!r} is not an ISO 8601 time with an offset such as "
                         "2025-06-02T09:00Z")
    return dt.datetime.fromisoformat(text)


def parse_expiry(text: str) -> Expiry:
    """An ISO date (valid through that whole day, UTC) or an ISO instant with an offset."""
    if _DATE.match(text):
        try:
            day = dt.date.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a calendar date") from None
        return Expiry(dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC), text)
    try:
        return Expiry(parse_instant(text), text)
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO date (2025-12-31) nor an ISO time with an "
                         "offset (2025-12-31T17:00Z)") from None


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class RequestContext:
    """The facts of one request that constraints compare; ``None`` = not stated.

    ``now`` is timezone-aware. ``epsilon`` is the job's projected ε at the dataset's δ.
    ``researcher_epsilon_spent(window)`` is the sum of ε of the requester's jobs on the
    dataset whose budget is reserved or committed and that were created within ``window``
    before ``now``. ``researcher_committed_jobs`` counts the requester's jobs on the dataset
    whose budget is committed (jobs that ran); ``dataset_model_families`` are the model
    families of every committed job on the dataset.
    """

    now: dt.datetime
    rounds: int | None = None
    noise_multiplier: float | None = None
    clients_per_round: float | None = None
    epsilon: float | None = None
    model_family: str | None = None
    model_bytes: int | None = None
    model_parameters: int | None = None
    researcher_epsilon_spent: Callable[[dt.timedelta], float] | None = None
    researcher_committed_jobs: int | None = None
    dataset_model_families: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.now.tzinfo is None:
            raise ValueError("RequestContext.now must be timezone-aware")


def _constant_spent(text: str) -> Callable[[dt.timedelta], float]:
    spent = parse_number(text)
    return lambda window: spent


# name -> parser, for ``--param NAME=VALUE`` and expectation tables.
REQUEST_PARAMETERS: Mapping[str, Callable[[str], Any]] = {
    "rounds": parse_integer,
    "noise_multiplier": parse_positive,
    "clients_per_round": parse_positive,
    "epsilon": parse_number,
    "researcher_epsilon_spent": _constant_spent,
    "model_family": parse_model_family,
    "model_bytes": parse_size,
    "model_parameters": parse_count,
    "researcher_committed_jobs": parse_whole,
    "dataset_model_families": parse_known_model_families,
}


def context_from_params(params: Mapping[str, str], now: dt.datetime) -> RequestContext:
    """A context from ``NAME=VALUE`` text; raises ValueError naming a bad or unknown one."""
    facts: dict[str, Any] = {}
    for name, text in params.items():
        if name not in REQUEST_PARAMETERS:
            raise ValueError(f"unknown parameter {name!r} (known: {', '.join(REQUEST_PARAMETERS)})")
        try:
            facts[name] = REQUEST_PARAMETERS[name](text.strip())
        except ValueError as exc:
            raise ValueError(f"parameter {name}: {exc}") from None
    return RequestContext(now=now, **facts)


# ---------------------------------------------------------------------------------------------
# Constraints: registered parse and check functions over typed values.

Check = Callable[[Any, RequestContext], str | None]


@dataclass(frozen=True)
class ConstraintKind:
    """A constraint: how to parse its value and how to compare it with a request.

    ``check`` runs only when every fact in ``reads`` is stated; it returns ``None`` when
    the request satisfies the value, else what is required and how to change the request.
    """

    name: str
    reads: tuple[str, ...]
    parse: Callable[[str], Any]
    check: Check
    value_help: str


def _g(x: float) -> str:
    return f"{x:.4g}"


def _bound(fact: str, *, at_most: bool, show: Callable[[Any], str] = _g,
           fix: str = "") -> Check:
    """A check that ``fact ≤ value`` (``at_most``) or ``fact ≥ value``, explaining the fix
    (default: lower or raise the fact to the bound)."""
    op, verb = ("≤", "lower") if at_most else ("≥", "raise")

    def check(value: float, ctx: RequestContext) -> str | None:
        asked = getattr(ctx, fact)
        if (asked <= value) if at_most else (asked >= value):
            return None
        bound = f"{op} {show(value)}"
        return (f"requires {fact} {bound}; you asked {show(asked)} — "
                f"{fix.format(bound=bound) or f'{verb} {fact} to {bound}'}")
    return check


def _check_epsilon_allowance(value: EpsilonAllowance, ctx: RequestContext) -> str | None:
    assert ctx.epsilon is not None and ctx.researcher_epsilon_spent is not None
    spent = ctx.researcher_epsilon_spent(value.window)
    if spent + ctx.epsilon <= value.limit:
        return None
    left = value.limit - spent
    days = value.window / dt.timedelta(days=1)
    window = f"{days:g} days" if days >= 1 else f"{value.window / dt.timedelta(hours=1):g} hours"
    fix = (f"a job with ε ≤ {_g(left)} fits now" if left > 0 else
           "nothing fits until earlier jobs leave the window")
    return (f"allows each researcher ε ≤ {_g(value.limit)} on this dataset per {window}; you "
            f"have {_g(spent)} reserved or spent in that window and this job needs "
            f"{_g(ctx.epsilon)} — {fix}")


def _check_model_families(value: frozenset[str], ctx: RequestContext) -> str | None:
    if ctx.model_family in value:
        return None
    allowed = " or ".join(sorted(value))
    return (f"allows only {allowed} models; yours is {ctx.model_family} — rebuild it as a "
            f"{allowed} model")


def _check_time_windows(value: tuple[TimeWindow, ...], ctx: RequestContext) -> str | None:
    if any(window.contains(ctx.now) for window in value):
        return None
    first = value[0]
    local = ctx.now.astimezone(first.zone)
    zone = "UTC" if first.zone is dt.UTC else str(first.zone)
    return (f"allows requests only {' or '.join(w.text for w in value)}; it is "
            f"{_DAYS[local.weekday()]} {local:%H:%M} {zone} — retry within those hours")


def _check_expiry(value: Expiry, ctx: RequestContext) -> str | None:
    if ctx.now < value.ends:
        return None
    return (f"is valid until {value.text} and expired at {value.ends:%Y-%m-%d %H:%M %Z}"
            " — ask the data owner to renew the grant")


CONSTRAINTS: Mapping[str, ConstraintKind] = {
    kind.name: kind
    for kind in (
        ConstraintKind("max_epsilon", ("epsilon",), parse_positive,
                       _bound("epsilon", at_most=True, fix="raise noise_multiplier or lower "
                              "rounds until `fedgate estimate` shows epsilon {bound}"),
                       "a number, e.g. 1.5"),
        ConstraintKind("max_epsilon_per_researcher", ("epsilon", "researcher_epsilon_spent"),
                       parse_epsilon_allowance, _check_epsilon_allowance,
                       "LIMIT per DURATION, e.g. 2 per 30d"),
        ConstraintKind("min_noise_multiplier", ("noise_multiplier",), parse_positive,
                       _bound("noise_multiplier", at_most=False), "a number, e.g. 1.0"),
        ConstraintKind("max_rounds", ("rounds",), parse_integer,
                       _bound("rounds", at_most=True), "a whole number, e.g. 500"),
        ConstraintKind("min_clients_per_round", ("clients_per_round",), parse_positive,
                       _bound("clients_per_round", at_most=False), "a number, e.g. 100"),
        ConstraintKind("max_model_bytes", ("model_bytes",), parse_size,
                       _bound("model_bytes", at_most=True, show="{:,} bytes".format,
                              fix="upload a model of {bound}"),
                       "a size with a unit, e.g. 50 MB"),
        ConstraintKind("max_model_parameters", ("model_parameters",), parse_count,
                       _bound("model_parameters", at_most=True, show="{:,}".format,
                              fix="use a model with {bound} parameters"),
                       "a count, e.g. 250k or 1.5M"),
        ConstraintKind("allowed_model_families", ("model_family",), parse_model_families,
                       _check_model_families, "families joined by |, e.g. keras-sequential"),
        ConstraintKind("allowed_times", (), parse_time_windows, _check_time_windows,
                       "windows joined by |, e.g. mon-fri 08:00-18:00 UTC"),
        ConstraintKind("valid_until", (), parse_expiry, _check_expiry,
                       "an ISO date, e.g. 2025-12-31 (inclusive, UTC)"),
    )
}


# ---------------------------------------------------------------------------------------------
# Obligations: registered parsers of ``p2`` values that add a duty to an allowed request.


@dataclass(frozen=True)
class ReviewCondition:
    """When a ``require_review`` row holds a ``train`` request for the data owner's review."""

    name: str  # a key of REVIEW_CONDITIONS
    threshold: float | None
    text: str

    @property
    def reads(self) -> tuple[str, ...]:
        return REVIEW_CONDITIONS[self.name]

    def holds(self, ctx: RequestContext, *, subject: str, dataset: str) -> str | None:
        """Why the condition holds for this request, or ``None``.

        A condition whose facts the request does not state holds: when the gateway cannot
        tell, the owner looks (the job is held, never silently started).
        """
        unstated = [name for name in self.reads if getattr(ctx, name) is None]
        if unstated:
            return f"the gateway cannot establish {' and '.join(unstated)}"
        if self.name == "always":
            return "every such job is reviewed"
        if self.name == "first_job":
            return (f"it would be {subject}'s first job to run on {dataset}"
                    if ctx.researcher_committed_jobs == 0 else None)
        if self.name == "epsilon_above":
            assert ctx.epsilon is not None and self.threshold is not None
            return (f"its projected ε {_g(ctx.epsilon)} is above {_g(self.threshold)}"
                    if ctx.epsilon > self.threshold else None)
        assert ctx.dataset_model_families is not None
        return (f"no job has run on {dataset} with a {ctx.model_family} model yet"
                if ctx.model_family not in ctx.dataset_model_families else None)


# condition -> the RequestContext facts it reads
REVIEW_CONDITIONS: Mapping[str, tuple[str, ...]] = {
    "always": (),
    "first_job": ("researcher_committed_jobs",),
    "epsilon_above": ("epsilon",),
    "new_model_family": ("model_family", "dataset_model_families"),
}


def parse_review_condition(text: str) -> ReviewCondition:
    """``always``, ``first_job``, ``new_model_family`` or ``epsilon_above NUMBER``."""
    name, _, argument = text.partition(" ")
    if name not in REVIEW_CONDITIONS:
        raise ValueError(f"unknown review condition {name!r} (known: "
                         f"{', '.join(sorted(REVIEW_CONDITIONS))})")
    if name == "epsilon_above":
        return ReviewCondition(name, parse_number(argument.strip()), text)
    if argument:
        raise ValueError(f"review condition {name} takes no value, got {argument!r}")
    return ReviewCondition(name, None, text)


def parse_review_conditions(text: str) -> tuple[ReviewCondition, ...]:
    """One condition or several joined by ``|`` (review when any of them holds)."""
    return tuple(parse_review_condition(part.strip()) for part in text.split("|"))


@dataclass(frozen=True)
class ObligationKind:
    """An obligation: how to parse its value, and which facts of the request it reads.

    ``stage`` is ``review`` (decided with the ``train`` request: hold the job for the owner)
    or ``output`` (applied when the job's result is fetched, see ``OutputPolicy``) or
    ``quota`` (checked against the ledger when the job is admitted, see ``Quota``).
    """

    name: str
    stage: Literal["review", "output", "quota"]
    parse: Callable[[str], Any]
    reads: Callable[[Any], tuple[str, ...]]
    value_help: str


def _reads_nothing(value: Any) -> tuple[str, ...]:
    return ()


def _review_reads(conditions: tuple[ReviewCondition, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name for condition in conditions for name in condition.reads))


OBLIGATIONS: Mapping[str, ObligationKind] = {
    kind.name: kind
    for kind in (
        ObligationKind("require_review", "review", parse_review_conditions, _review_reads,
                       "conditions joined by |: always, first_job, epsilon_above 1.5, "
                       "new_model_family"),
        ObligationKind("max_result_fetches", "output", parse_integer, _reads_nothing,
                       "a whole number, e.g. 1"),
        ObligationKind("result_available_days", "output", parse_positive, _reads_nothing,
                       "a number of days, e.g. 7"),
        ObligationKind("max_concurrent_jobs", "quota", parse_integer, _reads_nothing,
                       "a whole number of jobs, e.g. 2"),
        ObligationKind("max_cpu_hours_per_month", "quota", parse_positive, _reads_nothing,
                       "CPU-hours per calendar month (UTC), e.g. 40"),
        ObligationKind("max_spend_per_month", "quota", parse_amount, _reads_nothing,
                       "an amount in the [billing] currency per calendar month (UTC), e.g. 25.00"),
    )
}


@dataclass(frozen=True)
class Quota:
    """A quota row matching a ``train`` request: at most ``limit`` (jobs at once, CPU-hours or
    an amount per UTC month) for the jobs of ``members`` on the datasets of ``domain`` that
    match ``dataset_pattern``. ``members`` are the row's subject and, if it is a group, every
    member of the group (transitively): one pool the group shares. ``rule`` cites the row."""

    name: str
    limit: Any
    subject: str
    members: tuple[str, ...]
    domain: str
    dataset_pattern: str
    rule: str


@dataclass(frozen=True)
class OutputPolicy:
    """How a job's released result may be fetched: at most ``max_fetches`` times in all and
    only within ``available_days`` of its release (``None``: no limit). ``*_rule`` cite the
    rows that set each limit, the strictest of all that match."""

    max_fetches: int | None = None
    max_fetches_rule: str | None = None
    available_days: float | None = None
    available_days_rule: str | None = None

    def refusal(self, *, fetches: int, released_at: dt.datetime, now: dt.datetime) -> str | None:
        """Why one more fetch (after ``fetches`` earlier ones) is refused now, or ``None``."""
        if self.max_fetches is not None and fetches >= self.max_fetches:
            return (f"the result may be fetched at most {self.max_fetches} time(s) and was "
                    f"fetched {fetches}: rule {self.max_fetches_rule}")
        if self.available_days is not None:
            ends = released_at + dt.timedelta(days=self.available_days)
            if now >= ends:
                return (f"the result was available for {_g(self.available_days)} days after its "
                        f"release, until {ends:%Y-%m-%d %H:%M} UTC: rule "
                        f"{self.available_days_rule}")
        return None


# ---------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class Rule:
    """One validated row, as written (``cells[0]`` is ``p``, ``p2`` or ``g``)."""

    cells: tuple[str, ...]
    where: str  # "policy.csv:12"
    order: int  # position in the file; explanations cite the first matching rule

    @property
    def subject(self) -> str:
        return self.cells[1]

    @property
    def domain(self) -> str:
        return self.cells[2]

    @property
    def dataset(self) -> str:
        return self.cells[3]

    @property
    def action(self) -> str:
        return self.cells[4]

    @property
    def text(self) -> str:
        return ", ".join(self.cells)


@dataclass(frozen=True)
class Grant(Rule):
    """A ``p`` row: ``allow`` or ``deny``."""

    @property
    def effect(self) -> str:
        return self.cells[5]


@dataclass(frozen=True)
class Constraint(Rule):
    """A ``p2`` row with its parsed value."""

    kind: ConstraintKind
    value: Any


@dataclass(frozen=True)
class Obligation(Rule):
    """A ``p2`` row naming an obligation, with its parsed value."""

    kind: ObligationKind
    value: Any

    @property
    def reads(self) -> tuple[str, ...]:
        return self.kind.reads(self.value)


@dataclass(frozen=True)
class Membership:
    """A ``g`` row, ``cells = ("g", member, group, domain)``, or a key-registry membership."""

    cells: tuple[str, ...]
    where: str

    @property
    def member(self) -> str:
        return self.cells[1]

    @property
    def group(self) -> str:
        return self.cells[2]

    @property
    def domain(self) -> str:
        return self.cells[3]


@dataclass(frozen=True)
class PolicyRows:
    grants: tuple[Grant, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    memberships: tuple[Membership, ...] = ()
    obligations: tuple[Obligation, ...] = ()


def _validate_row(cells: tuple[str, ...]) -> str | None:
    """What is wrong with a row's cells, or ``None``."""
    kind = cells[0]
    shapes = {"p": "p, SUBJECT, DOMAIN, DATASET, ACTION, allow|deny",
              "p2": "p2, SUBJECT, DOMAIN, DATASET, ACTION|*, CONSTRAINT, VALUE",
              "g": "g, MEMBER, GROUP, DOMAIN"}
    if kind not in shapes:
        return f"rows start with p, p2 or g, not {kind!r}"
    if len(cells) != shapes[kind].count(",") + 1:
        return f"{kind!r} rows have {shapes[kind].count(',')} fields: {shapes[kind]}"
    names = cells[1:4] if kind == "g" else cells[1:3]
    for name in names:
        if not is_name(name):
            return f"name {name!r} is not a valid name: use {GRAMMAR}"
    if kind == "g":
        return None
    if not is_name_pattern(cells[3]):
        return (f"dataset {cells[3]!r} must be a name or the beginning of one followed by * "
                f"(a name is {GRAMMAR})")
    actions = (*ACTIONS, "*") if kind == "p2" else ACTIONS
    if cells[4] not in actions:
        return f"unknown action {cells[4]!r} (one of {', '.join(actions)})"
    if kind == "p":
        return None if cells[5] in EFFECTS else f"effect must be allow or deny, not {cells[5]!r}"
    known = CONSTRAINTS.get(cells[5]) or OBLIGATIONS.get(cells[5])
    if known is None:
        return f"unknown constraint {cells[5]!r} (known: {', '.join([*CONSTRAINTS, *OBLIGATIONS])})"
    if not _VALUE.match(cells[6]):
        return (f"value {cells[6]!r} may contain only letters, digits, spaces and . _ : / | + - "
                f"({cells[5]} takes {known.value_help})")
    return None


def parse_policy(text: str, source: str = "policy.csv") -> PolicyRows:
    """Validate every row; raise ``PolicyInvalid`` listing every bad row, else the rows."""
    grants: list[Grant] = []
    constraints: list[Constraint] = []
    obligations: list[Obligation] = []
    memberships: list[Membership] = []
    problems: list[str] = []
    for number, cells in _raw_rows(text):
        where = f"{source}:{number}"
        problem = _validate_row(cells)
        if problem is not None:
            problems.append(f"{where}: {problem}")
        elif cells[0] == "p":
            grants.append(Grant(cells, where, number))
        elif cells[0] == "g":
            memberships.append(Membership(cells, where))
        elif cells[5] in CONSTRAINTS:
            kind = CONSTRAINTS[cells[5]]
            try:
                constraints.append(Constraint(cells, where, number, kind, kind.parse(cells[6])))
            except ValueError as exc:
                problems.append(f"{where}: {cells[5]}: {exc} (takes {kind.value_help})")
        else:
            duty = OBLIGATIONS[cells[5]]
            try:
                obligations.append(Obligation(cells, where, number, duty, duty.parse(cells[6])))
            except ValueError as exc:
                problems.append(f"{where}: {cells[5]}: {exc} (takes {duty.value_help})")
    if problems:
        raise PolicyInvalid(problems)
    return PolicyRows(tuple(grants), tuple(constraints), tuple(memberships), tuple(obligations))


def _raw_rows(policy_text: str) -> list[tuple[int, tuple[str, ...]]]:
    """(line number, cells) of every row, unvalidated."""
    return [(number, tuple(cell.strip() for cell in line.split(",")))
            for number, raw in enumerate(policy_text.splitlines(), start=1)
            if (line := raw.strip()) and not line.startswith("#")]


def declared_groups(policy_text: str) -> frozenset[str]:
    """The GROUP of every ``g`` row. Read without validating the file, so that a principal
    being registered is kept apart from the policy's groups even while the file has errors."""
    return frozenset(cells[2] for _, cells in _raw_rows(policy_text)
                     if cells[0] == "g" and len(cells) > 2)


def rows_naming(policy_text: str, subject: str) -> list[int]:
    """The lines of the ``p`` and ``p2`` rows whose subject is ``subject`` (unvalidated)."""
    return [number for number, cells in _raw_rows(policy_text)
            if cells[0] in ("p", "p2") and len(cells) > 1 and cells[1] == subject]


def check_model(model_text: str, source: str = "model.conf") -> None:
    """Refuse a model that is not the fedgate model (the one the engine implements)."""

    def definitions(text: str) -> dict[tuple[str, str], str]:
        model = Model()
        model.load_model_from_text(text)
        return {(sec, key): a.value for sec, assertions in model.model.items()
                for key, a in assertions.items()}

    try:
        found = definitions(model_text)
    except Exception as exc:  # casbin raises bare exceptions on malformed models
        raise PolicyInvalid([f"{source}: not a Casbin model ({exc})"]) from None
    if any("eval(" in value for value in found.values()):  # reviewed: substring test, runs nothing
        raise PolicyInvalid([f"{source}: matchers must not use eval()"])  # reviewed: message text
    expected = definitions((POLICY_TEMPLATES / "model.conf").read_text())
    differing = sorted({*expected, *found} - {k for k in expected if found.get(k) == expected[k]})
    if differing:
        names = ", ".join(key for _, key in differing)
        raise PolicyInvalid([f"{source}: differs from the fedgate model in {names}; copy "
                             f"{POLICY_TEMPLATES / 'model.conf'} (the engine evaluates that "
                             "model only)"])


# ---------------------------------------------------------------------------------------------
# Decisions

R = TypeVar("R", bound=Rule)


@dataclass
class _Bucket(Generic[R]):
    """Rules of one (domain, subject, action), indexed by dataset name or prefix."""

    exact: dict[str, list[R]] = field(default_factory=dict)
    prefixes: list[R] = field(default_factory=list)

    def add(self, rule: R) -> None:
        if rule.dataset.endswith("*"):
            self.prefixes.append(rule)
        else:
            self.exact.setdefault(rule.dataset, []).append(rule)

    def matching(self, dataset: str) -> list[R]:
        found = list(self.exact.get(dataset, ()))
        found.extend(rule for rule in self.prefixes if dataset.startswith(rule.dataset[:-1]))
        return found


def dataset_matches(pattern: str, dataset: str) -> bool:
    """Casbin's ``keyMatch`` for validated patterns: equality, or a prefix ending in ``*``."""
    return dataset.startswith(pattern[:-1]) if pattern.endswith("*") else dataset == pattern


@dataclass(frozen=True)
class PolicyDecision:
    """The outcome of one policy evaluation, as recorded in the audit log.

    ``rule`` is the deciding row's cells: the allow rule that granted, the deny rule or the
    first violated constraint that refused; ``None`` when no rule granted. ``review`` says
    why an allowed ``train`` request must wait for the owner's review (``None``: it need
    not); the explanation says so too.
    """

    allowed: bool
    rule: tuple[str, ...] | None
    explanation: str
    policy_version: str
    review: str | None = None


def _group_closure(memberships: Iterable[Membership]) -> tuple[dict[tuple[str, str], tuple[str, ...]],
                                                              list[str]]:
    """Every (domain, member)'s groups, nearest first; and the problems (cycles, depth)."""
    parents: dict[tuple[str, str], list[str]] = {}
    for m in memberships:
        groups = parents.setdefault((m.domain, m.member), [])
        if m.group not in groups:
            groups.append(m.group)
    closure: dict[tuple[str, str], tuple[str, ...]] = {}
    problems: list[str] = []
    for (domain, member) in parents:
        seen = {member: 0}
        order: list[str] = []
        queue = deque([member])
        while queue:
            name = queue.popleft()
            for group in parents.get((domain, name), ()):
                if group == member:
                    problems.append(f"group cycle in domain {domain}: {member} is a member of "
                                    f"itself through {name}")
                elif group not in seen:
                    seen[group] = seen[name] + 1
                    order.append(group)
                    queue.append(group)
        deepest = max(seen.values())
        if deepest > MAX_GROUP_NESTING:
            problems.append(f"groups of {member} in domain {domain} nest {deepest} levels deep "
                            f"(at most {MAX_GROUP_NESTING})")
        closure[(domain, member)] = (member, *order)
    return closure, sorted(set(problems))


class PolicyEngine:
    """Validated rows, indexed for decisions; immutable once built.

    Build cost is linear in the rows; a decision costs O(groups of the requester × matching
    rows), independent of the number of other rows and principals.
    """

    def __init__(self, model_text: str, policy_text: str,
                 memberships: Iterable[tuple[str, str, str]] = (), *,
                 source: str = "policy.csv", model_source: str = "model.conf") -> None:
        check_model(model_text, model_source)
        problems: list[str] = []
        try:
            rows = parse_policy(policy_text, source)
        except PolicyInvalid as exc:
            problems.extend(exc.problems)
            rows = PolicyRows()
        member_rows = sorted(("g", *m) for m in memberships)
        registry: list[Membership] = []
        for cells in member_rows:
            problem = _validate_row(cells)
            if problem:
                problems.append(f"key registry: membership {', '.join(cells[1:])}: {problem}")
            else:
                registry.append(Membership(cells, "key registry"))
        self.rows = rows
        self.memberships = (*rows.memberships, *registry)
        self._closure, cycle_problems = _group_closure(self.memberships)
        problems.extend(cycle_problems)
        if problems:
            raise PolicyInvalid(problems)
        digest = hashlib.sha256()
        for part in (model_text.encode(), policy_text.encode(), repr(member_rows).encode()):
            digest.update(hashlib.sha256(part).digest())
        self.version = "sha256:" + digest.hexdigest()
        self._grants: dict[tuple[str, str, str], _Bucket[Grant]] = {}
        for grant in rows.grants:
            self._grants.setdefault((grant.domain, grant.subject, grant.action), _Bucket()).add(grant)
        self._constraints: dict[tuple[str, str, str], _Bucket[Constraint]] = {}
        for rule in rows.constraints:
            key = (rule.domain, rule.subject, rule.action)
            self._constraints.setdefault(key, _Bucket()).add(rule)
        self._obligations: dict[tuple[str, str, str], _Bucket[Obligation]] = {}
        for duty in rows.obligations:
            key = (duty.domain, duty.subject, duty.action)
            self._obligations.setdefault(key, _Bucket()).add(duty)

    @classmethod
    def from_files(cls, model_path: Path, policy_path: Path,
                   memberships: Iterable[tuple[str, str, str]] = ()) -> PolicyEngine:
        return cls(model_path.read_text(encoding="utf-8"), policy_path.read_text(encoding="utf-8"),
                   memberships, source=policy_path.name, model_source=model_path.name)

    def subjects(self, subject: str, domain: str) -> tuple[str, ...]:
        """The requester and its groups in ``domain``, nearest first."""
        return self._closure.get((domain, subject), (subject,))

    def matching_grants(self, subject: str, domain: str, dataset: str, action: str) -> list[Grant]:
        found = [rule for s in self.subjects(subject, domain)
                 if (bucket := self._grants.get((domain, s, action)))
                 for rule in bucket.matching(dataset)]
        return sorted(found, key=lambda rule: rule.order)

    def matching_constraints(self, subject: str, domain: str, dataset: str,
                             action: str) -> list[Constraint]:
        found = [rule for s in self.subjects(subject, domain) for a in (action, "*")
                 if (bucket := self._constraints.get((domain, s, a)))
                 for rule in bucket.matching(dataset)]
        return sorted(found, key=lambda rule: rule.order)

    def matching_obligations(self, subject: str, domain: str, dataset: str,
                             action: str) -> list[Obligation]:
        found = [rule for s in self.subjects(subject, domain) for a in (action, "*")
                 if (bucket := self._obligations.get((domain, s, a)))
                 for rule in bucket.matching(dataset)]
        return sorted(found, key=lambda rule: rule.order)

    def facts_read(self, *, subject: str, domain: str, dataset: str, action: str) -> frozenset[str]:
        """The ``RequestContext`` facts the constraints and obligations matching this request
        compare, so a caller computes only those (projected ε, the model's size, the ε spent)."""
        constraints = self.matching_constraints(subject, domain, dataset, action)
        duties = (self.matching_obligations(subject, domain, dataset, action)
                  if action in OBLIGATION_ACTIONS else [])
        return frozenset({*(name for rule in constraints for name in rule.kind.reads),
                          *(name for duty in duties for name in duty.reads)})

    def decide(self, *, subject: str, domain: str, dataset: str, action: str,
               context: RequestContext | None = None) -> PolicyDecision:
        """Evaluate one request (module contract); never raises, fails closed.

        ``context`` defaults to the current time with no job parameters stated.
        """
        if context is None:
            context = RequestContext(now=dt.datetime.now(dt.UTC))
        if action not in ACTIONS or not all(is_name(v) for v in (subject, domain, dataset)):
            return self._decision(False, None, "request names an invalid subject, dataset or action")
        asked = f"{subject} may not {action} on {dataset}"
        grants = self.matching_grants(subject, domain, dataset, action)
        deny = next((g for g in grants if g.effect == "deny"), None)
        if deny is not None:
            return self._decision(False, deny, f"{asked}: rule '{deny.text}' ({deny.where}) denies "
                                  f"it{self._via(subject, deny)}; a deny overrides every allow, "
                                  "so no parameter change helps — ask the data owner")
        if not grants:
            groups = self.subjects(subject, domain)[1:]
            member = f" or its groups ({', '.join(groups)})" if groups else ""
            return self._decision(False, None, f"{asked}: no rule grants {action} on {dataset} to "
                                  f"{subject}{member} in domain {domain} — ask the data owner for "
                                  f"a grant such as 'p, {subject}, {domain}, {dataset}, {action}, "
                                  "allow'")
        violations: list[tuple[Constraint, str]] = []
        for rule in self.matching_constraints(subject, domain, dataset, action):
            unstated = [name for name in rule.kind.reads if getattr(context, name) is None]
            if unstated:
                if action in STATES_EVERY_FACT:
                    violations.append((rule, f"needs {' and '.join(unstated)}, which the request "
                                             "does not state"))
                continue
            problem = rule.kind.check(rule.value, context)
            if problem is not None:
                violations.append((rule, problem))
        if violations:
            reasons = "; and ".join(f"rule '{rule.text}' ({rule.where}) {problem}"
                                    for rule, problem in violations)
            return self._decision(False, violations[0][0], f"{asked}: {reasons}")
        allow = grants[0]
        explanation = (f"{subject} may {action} on {dataset}: rule '{allow.text}' ({allow.where}) "
                       f"grants it{self._via(subject, allow)}, no deny rule matches and every "
                       "matching constraint holds")
        review = self._review(subject, domain, dataset, action, context)
        if review is not None:
            explanation += f"; the job waits for the data owner's review: {review}"
        return self._decision(True, allow, explanation, review=review)

    def _review(self, subject: str, domain: str, dataset: str, action: str,
                context: RequestContext) -> str | None:
        """Why an allowed request is held for review (every matching row whose condition
        holds, cited), or ``None``."""
        if action not in OBLIGATION_ACTIONS:
            return None
        reasons = []
        for duty in self.matching_obligations(subject, domain, dataset, action):
            if duty.kind.stage != "review":
                continue
            held = next((why for condition in duty.value
                         if (why := condition.holds(context, subject=subject, dataset=dataset))),
                        None)
            if held is not None:
                reasons.append(f"rule '{duty.text}' ({duty.where}) requires review: {held}")
        return "; and ".join(reasons) or None

    def output_policy(self, *, subject: str, domain: str, dataset: str) -> OutputPolicy:
        """The strictest output limits of the rows matching ``subject``'s ``train`` grant on
        ``dataset`` (module contract); no matching row means no limit."""
        policy = OutputPolicy()
        for duty in self.matching_obligations(subject, domain, dataset, "train"):
            cited = f"'{duty.text}' ({duty.where})"
            if (duty.kind.name == "max_result_fetches"
                    and (policy.max_fetches is None or duty.value < policy.max_fetches)):
                policy = replace(policy, max_fetches=duty.value, max_fetches_rule=cited)
            if (duty.kind.name == "result_available_days"
                    and (policy.available_days is None or duty.value < policy.available_days)):
                policy = replace(policy, available_days=duty.value, available_days_rule=cited)
        return policy

    def quotas(self, *, subject: str, domain: str, dataset: str) -> tuple[Quota, ...]:
        """Every quota row matching ``subject``'s ``train`` request on ``dataset`` (each is
        checked on its own; no matching row means no quota)."""
        return tuple(
            Quota(duty.kind.name, duty.value, duty.subject, self.members(duty.subject, domain),
                  domain, duty.dataset, f"'{duty.text}' ({duty.where})")
            for duty in self.matching_obligations(subject, domain, dataset, "train")
            if duty.kind.stage == "quota")

    def members(self, subject: str, domain: str) -> tuple[str, ...]:
        """``subject`` and every principal that is, transitively, in group ``subject``."""
        return tuple(sorted({subject, *(member for (where, member), groups in self._closure.items()
                                        if where == domain and subject in groups)}))

    def _via(self, subject: str, rule: Rule) -> str:
        return "" if rule.subject == subject else f" ({subject} is in group {rule.subject})"

    def _decision(self, allowed: bool, rule: Rule | None, explanation: str, *,
                  review: str | None = None) -> PolicyDecision:
        return PolicyDecision(allowed, rule.cells if rule else None, explanation, self.version,
                              review)


# ---------------------------------------------------------------------------------------------
# Ledger inputs: the only database reads of the policy (the thin shell around the core).


def registry_memberships(session: Session, domain: str) -> list[tuple[str, str, str]]:
    """(principal, group, domain) of every active principal with a group."""
    rows = session.exec(select(Principal.name, Principal.group)  # reviewed: ORM query, not exec
                        .where(Principal.status == "active", Principal.group != "")).all()
    return sorted({(name, group, domain) for name, group in rows})


def researcher_epsilon_spent(session: Session, *, researcher: str, dataset: str,
                             since: dt.datetime) -> float:
    """Σ ε of ``researcher``'s jobs on ``dataset`` with budget reserved or committed,
    created at or after ``since`` (basic composition; an upper bound on the true ε)."""
    total = session.exec(  # reviewed: ORM query, not exec
        select(func.coalesce(func.sum(Job.epsilon), 0.0)).where(
            Job.researcher == researcher, Job.dataset == dataset,
            Job.budget_state.in_(("reserved", "committed")),  # type: ignore[attr-defined]
            Job.created_at >= since.timestamp(),
        )
    ).one()
    return float(total)



def researcher_committed_jobs(session: Session, *, researcher: str, dataset: str) -> int:
    """How many of ``researcher``'s jobs on ``dataset`` ran (budget committed)."""
    return int(session.exec(  # reviewed: ORM query, not exec
        select(func.count()).select_from(Job).where(
            Job.researcher == researcher, Job.dataset == dataset, Job.budget_state == "committed")
    ).one())


def committed_model_digests(session: Session, *, dataset: str) -> frozenset[str]:
    """Digests of the models of every job that ran on ``dataset`` (budget committed)."""
    return frozenset(session.exec(  # reviewed: ORM query, not exec
        select(Job.model_digest).where(Job.dataset == dataset, Job.budget_state == "committed")
        .distinct()
    ).all())
