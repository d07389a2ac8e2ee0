"""Expectation tables: an owner's CSV of requests and the decision each must get, run against a
policy (``fedgate policy test``). Pure: an engine and plain values in, decisions out."""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass

from gateway.policy.decisions import PolicyDecision, PolicyEngine
from gateway.policy.request import RequestContext, context_from_params
from gateway.policy.rows import ACTIONS
from gateway.policy.values import parse_instant

EXPECTATION_HEADER = ("subject", "dataset", "action", "params", "expect")


@dataclass(frozen=True)
class Expectation:
    """One row of an owner's expectation table: a request and the decision it must get."""

    where: str
    subject: str
    domain: str
    dataset: str
    action: str
    params: str
    context: RequestContext
    allowed: bool
    review: bool = False  # ``expect`` is ``review``: allowed, and held for the owner's review

    @property
    def expected(self) -> str:
        return "review" if self.review else "allow" if self.allowed else "deny"


def parse_params(words: list[str], *, domain: str, now: dt.datetime) -> tuple[str, RequestContext]:
    """``NAME=VALUE`` words: request parameters plus ``at=`` (an ISO time) and ``domain=``."""
    params: dict[str, str] = {}
    for word in words:
        name, sep, value = word.partition("=")
        if not sep or not value:
            raise ValueError(f"{word!r} is not NAME=VALUE")
        if name in params:
            raise ValueError(f"parameter {name} is given twice")
        params[name] = value
    if "at" in params:
        now = parse_instant(params.pop("at"))
    return params.pop("domain", domain), context_from_params(params, now)


def parse_expectations(text: str, *, domain: str, now: dt.datetime,
                       source: str = "expectations.csv") -> list[Expectation]:
    """Parse a CSV table with the header ``subject,dataset,action,params,expect``.

    ``params`` holds space-separated ``NAME=VALUE`` words (``rounds=500 at=2025-06-02T09:00Z``);
    ``expect`` is ``allow``, ``deny`` or ``review`` (allowed, and held for the owner's review;
    ``allow`` then means allowed without review). Blank lines and lines starting with ``#``
    are skipped.
    Raises ValueError naming the line of the first malformed row.
    """
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1)
             if line.strip() and not line.lstrip().startswith("#")]
    rows = [(n, [cell.strip() for cell in cells])
            for (n, _), cells in zip(lines, csv.reader(line for _, line in lines), strict=True)]
    if not rows or tuple(rows[0][1]) != EXPECTATION_HEADER:
        raise ValueError(f"{source}: the first row must be the header {','.join(EXPECTATION_HEADER)}")
    expectations = []
    for number, cells in rows[1:]:
        where = f"{source}:{number}"
        if len(cells) != len(EXPECTATION_HEADER):
            raise ValueError(f"{where}: expected {len(EXPECTATION_HEADER)} cells "
                             f"({','.join(EXPECTATION_HEADER)}), found {len(cells)}")
        subject, dataset, action, params, expect = cells
        if action not in ACTIONS:
            raise ValueError(f"{where}: unknown action {action!r} (one of {', '.join(ACTIONS)})")
        if expect not in ("allow", "deny", "review"):
            raise ValueError(f"{where}: expect must be allow, deny or review, not {expect!r}")
        try:
            row_domain, context = parse_params(params.split(), domain=domain, now=now)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        expectations.append(Expectation(where, subject, row_domain, dataset, action, params,
                                        context, expect != "deny", expect == "review"))
    return expectations


def run_expectations(engine: PolicyEngine, expectations: list[Expectation]
                     ) -> list[tuple[Expectation, PolicyDecision]]:
    """Each expectation with the engine's decision (compare ``outcome(decision)`` with
    ``expectation.expected``)."""
    return [(e, engine.decide(subject=e.subject, domain=e.domain, dataset=e.dataset,
                              action=e.action, context=e.context)) for e in expectations]


def outcome(decision: PolicyDecision) -> str:
    """``allow``, ``deny`` or ``review`` (allowed, and held for the owner's review)."""
    if not decision.allowed:
        return "deny"
    return "review" if decision.review is not None else "allow"
