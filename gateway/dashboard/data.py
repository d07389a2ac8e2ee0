"""What the officer dashboard shows, read from the node's ledger (no HTML here).

Reads only, except that checking the log publishes a checkpoint first (exactly as an
export does), so the verification covers every entry. Entry fields are returned as
stored: they include researcher-supplied strings, which the page layer must escape.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlmodel import select

from gateway.node import audit as node_audit
from gateway.node.billing import statement
from gateway.node.node import Node
from ledger.audit import audit_size
from ledger.audit_verify import verify_export
from ledger.burndown import BurnDown, burn_down
from ledger.metering import month_bounds, month_of
from ledger.models import AuditEntry, BillingCharge, Dataset, Job
from ledger.public_count import DeltaTooLarge, check_delta
from ledger.ranges import EPSILON_TOTAL_WARNING

log = logging.getLogger("fedgate.dashboard")

DECISION_ACTIONS = frozenset({"admit", "deny", "charge", "refund", "release", "review", "policy",
                              "key", "dataset"})
RECENT_DECISIONS = 50
RECENT_SCAN = 2000  # recent decisions are looked for among this many newest entries
VERIFICATION_TTL_SECONDS = 30.0


NEARLY_FULL = 0.9


def budget_warnings(chart: BurnDown) -> tuple[str, ...]:
    """What an officer should look at in a dataset's budget: δ not small against N̂ (refused
    at import from δ ≥ 1/N̂ on, so such a dataset predates that check or was altered), a very
    large ε_total, a filter nearly or entirely full, a chart that does not match the ledger."""
    warnings = []
    try:
        note = check_delta(chart.delta, chart.public_users)
    except DeltaTooLarge:
        note = (f"δ {chart.delta:g} ≥ 1/N̂ = {1.0 / chart.public_users:.3g}: a release may reveal "
                "one user outright")
    if note is not None:
        warnings.append(note)
    if chart.epsilon_total > EPSILON_TOTAL_WARNING:
        warnings.append(f"ε_total {chart.epsilon_total:g} is very large (above "
                        f"{EPSILON_TOTAL_WARNING:g}): the guarantee means little")
    if chart.more_like_last == 0 or chart.current.fraction >= 1.0:
        warnings.append("the filter admits no more job like the last one")
    elif chart.current.fraction >= NEARLY_FULL:
        warnings.append(f"the filter is {chart.current.fraction:.0%} used")
    if not chart.matches_ledger:
        warnings.append("the jobs' charges do not add up to the ledger's total")
    return tuple(warnings)


@dataclass(frozen=True)
class DenialGroup:
    """Denials sharing a reason (problem type) and deciding rule, newest example first."""

    reason: str
    rule: str | None
    count: int
    last_seen: str
    latest_explanation: str
    request_actions: tuple[str, ...]


@dataclass(frozen=True)
class Overview:
    owner: str
    datasets: tuple[BurnDown, ...]
    recent: tuple[dict[str, Any], ...]  # decoded entries, newest first
    job_researchers: dict[str, str]  # job id -> researcher, for the jobs of ``recent``
    denials: tuple[DenialGroup, ...]  # most frequent first
    log_size: int


def load_overview(node: Node) -> Overview:
    """Every panel's data but the verification status (see ``LogVerification``)."""
    with node.session() as s:
        datasets = s.exec(select(Dataset).order_by(Dataset.name)).all()  # reviewed: ORM query, not exec
        jobs = s.exec(select(Job)).all()  # reviewed: ORM query, not exec
        newest = s.exec(select(AuditEntry.entry).order_by(AuditEntry.seq.desc())  # type: ignore[attr-defined]  # reviewed: ORM query, not exec
                        .limit(RECENT_SCAN)).all()
        # Canonical JSON has no spaces and escapes quotes inside strings, so this pattern
        # only matches the action member itself; each hit is still decoded and checked.
        denials = s.exec(select(AuditEntry.entry).where(  # reviewed: ORM query, not exec
            AuditEntry.entry.contains('"action":"deny"'))).all()  # type: ignore[attr-defined]
        log_size = audit_size(s)
    recent = tuple(recent_decisions(json.loads(e) for e in newest))
    named = {str(e["job_id"]) for e in recent if e.get("job_id")}
    return Overview(
        owner=node.config.owner,
        datasets=tuple(burn_down(d, jobs) for d in datasets),
        recent=recent,
        job_researchers={job.id: job.researcher for job in jobs if job.id in named},
        denials=tuple(denials_by_reason(json.loads(e) for e in denials)),
        log_size=log_size,
    )


def recent_decisions(newest_first: Iterable[dict[str, Any]],
                     limit: int = RECENT_DECISIONS) -> list[dict[str, Any]]:
    """The first ``limit`` entries whose action is a decision (``DECISION_ACTIONS``)."""
    found = []
    for entry in newest_first:
        if entry.get("action") in DECISION_ACTIONS:
            found.append(entry)
            if len(found) == limit:
                break
    return found


def denials_by_reason(entries: Iterable[dict[str, Any]]) -> list[DenialGroup]:
    """``deny`` entries grouped by (reason, rule), most frequent first (``deciding_rule``)."""
    groups: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    for entry in entries:
        if entry.get("action") != "deny":
            continue
        key = (str(entry.get("reason", "unspecified")), deciding_rule(entry))
        groups.setdefault(key, []).append(entry)
    result = []
    for (reason, rule), members in groups.items():
        latest = max(members, key=lambda e: e.get("seq", -1))
        result.append(DenialGroup(
            reason=reason, rule=rule, count=len(members), last_seen=str(latest.get("timestamp", "")),
            latest_explanation=str(latest.get("explanation", "")),
            request_actions=tuple(sorted({str(e.get("request_action", "?")) for e in members}))))
    return sorted(result, key=lambda g: (-g.count, g.reason, g.rule or ""))


NO_GRANT = "no rule grants it"


def deciding_rule(entry: dict[str, Any]) -> str | None:
    """What decided a ``deny`` entry, in words: the policy row's cells (``p, bob, owner, demo,
    train, deny``), ``NO_GRANT`` when the policy refused because no row granted the request,
    a quota's or the privacy filter's description; None when the entry names nothing (a
    refusal by validation, e.g. an unknown dataset or a malformed request)."""
    rule = entry.get("rule")
    if isinstance(rule, list):
        return ", ".join(map(str, rule)) if rule else NO_GRANT
    if isinstance(rule, str) and rule:
        return rule
    return None


@dataclass(frozen=True)
class VerificationStatus:
    """The offline verifier's verdict on a fresh export, as of ``checked_at``."""

    ok: bool
    summary: Sequence[str]  # the verifier's report, line by line
    warning: str | None  # set when the node refused to sign a new checkpoint
    checked_at: float


class LogVerification:
    """Runs ``verify_export`` on a fresh export against the node's own public key, at most
    once per ``ttl`` seconds (concurrent callers wait for and share one run).

    This is the same check an officer runs offline; it detects tampering with stored
    entries or checkpoints, but being run by the node on itself it is no substitute for
    an officer verifying an export with a public key obtained independently.
    """

    def __init__(self, node: Node, ttl: float = VERIFICATION_TTL_SECONDS) -> None:
        self.node = node
        self.ttl = ttl
        self._lock = threading.Lock()
        self._status: VerificationStatus | None = None

    def status(self, now: float | None = None) -> VerificationStatus:
        """The cached status, or a new one if older than ``ttl`` (blocking)."""
        with self._lock:
            now = time.time() if now is None else now
            if self._status is None or now - self._status.checked_at >= self.ttl:
                self._status = self._verify(now)
            return self._status

    def _verify(self, now: float) -> VerificationStatus:
        try:
            export, warning = node_audit.export_node_audit(self.node)
            report = verify_export(export, self.node.node_key.public_key())
        except Exception as exc:  # fail closed: the panel says the log could not be verified
            log.exception("dashboard log verification failed to run")
            return VerificationStatus(ok=False, summary=[f"verification could not run "
                                                         f"({type(exc).__name__})"],
                                      warning=None, checked_at=now)
        return VerificationStatus(ok=report.ok and warning is None,
                                  summary=report.summary().splitlines(), warning=warning,
                                  checked_at=now)


MONTH_PATTERN = re.compile(r"\d{4}-(0[1-9]|1[0-2])")


def parse_month(text: str | None, *, now: float) -> str:
    """The ``YYYY-MM`` month (UTC) a billing page is for: ``text``, or ``now``'s month if
    absent. Raises ``ValueError`` for anything but a well-formed month."""
    if text is None:
        return month_of(now)
    if not MONTH_PATTERN.fullmatch(text):
        raise ValueError(f"{text!r} is not a month such as 2026-11")
    try:
        month_bounds(text)
    except (ValueError, OverflowError):
        raise ValueError(f"{text!r} is not a month such as 2026-11") from None
    return text


@dataclass(frozen=True)
class ResearcherBill:
    """One researcher's month: ``statement`` (``gateway.node.billing``) as is, plus the CPU-hours of
    its lines. Researcher-facing: rounds and *expected* client updates, never the exact count."""

    researcher: str
    statement: dict[str, Any]
    cpu_hours: Decimal


@dataclass(frozen=True)
class BillingMonth:
    owner: str
    month: str
    researchers: tuple[ResearcherBill, ...]  # by name
    totals: dict[str, str]  # currency -> exact sum of every researcher's statement
    audit_totals: dict[str, str]  # currency -> exact sum of the month's ``bill`` audit entries
    audit_bills: int

    @property
    def matches_audit_log(self) -> bool:
        """Whether the statements add up to the audit log's ``bill`` entries, per currency."""
        lines = sum(len(r.statement["lines"]) for r in self.researchers)
        return self.totals == self.audit_totals and lines == self.audit_bills


def load_billing(node: Node, month: str) -> BillingMonth:
    """Every researcher's statement for ``month`` and, independently, the sums of the audit
    log's ``bill`` entries of that month (so the page can show whether they agree)."""
    start, end = month_bounds(month)
    with node.session() as s:
        names = s.exec(select(BillingCharge.researcher).where(  # reviewed: ORM query, not exec
            BillingCharge.charged_at >= start, BillingCharge.charged_at < end)  # type: ignore[operator]
            .distinct()).all()
        statements = [statement(s, researcher=name, month=month) for name in sorted(names)]
        bills = s.exec(select(AuditEntry.entry).where(  # reviewed: ORM query, not exec
            AuditEntry.entry.contains('"action":"bill"'))).all()  # type: ignore[attr-defined]
    totals: dict[str, Decimal] = {}
    for document in statements:
        for currency, total in document["totals"].items():
            totals[currency] = totals.get(currency, Decimal(0)) + Decimal(total)
    audit_totals: dict[str, Decimal] = {}
    audit_bills = 0
    for entry in map(json.loads, bills):
        if entry.get("action") == "bill" and entry.get("month") == month:
            currency = str(entry.get("currency"))
            audit_totals[currency] = audit_totals.get(currency, Decimal(0)) + Decimal(str(entry["total"]))
            audit_bills += 1
    return BillingMonth(
        owner=node.config.owner, month=month,
        researchers=tuple(ResearcherBill(d["researcher"], d, _cpu_hours(d["lines"])) for d in statements),
        totals={c: str(t) for c, t in sorted(totals.items())},
        audit_totals={c: str(t) for c, t in sorted(audit_totals.items())},
        audit_bills=audit_bills)


def _cpu_hours(lines: Iterable[dict[str, Any]]) -> Decimal:
    seconds = sum((Decimal(str(line["cpu_seconds"])) for line in lines
                   if line.get("cpu_seconds") is not None), Decimal(0))
    return seconds / 3600
