"""Constraints (registered parse and check functions over typed values: they can refuse a
request) and obligations (registered parsers of ``p2`` values that add a duty to an allowed
request: review, output limits, quotas)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gateway.policy.request import RequestContext
from gateway.policy.values import (
    DAYS,
    EpsilonAllowance,
    Expiry,
    TimeWindow,
    parse_amount,
    parse_count,
    parse_epsilon_allowance,
    parse_expiry,
    parse_integer,
    parse_model_families,
    parse_number,
    parse_positive,
    parse_size,
    parse_time_windows,
)

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
            f"{DAYS[local.weekday()]} {local:%H:%M} {zone} — retry within those hours")


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
