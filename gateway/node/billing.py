"""Charging researchers for compute: settlement-time billing, projections and statements.

Contract:

* ``settle_usage`` runs inside the transaction that settles a job (``gateway.node.jobs``): it
  records the job's metering (``ledger.metering``) and, when the node has a price list
  (``[billing]`` in ``fedgate.toml``) and the job ran (the meter reported, or it read user
  data), prices it (``ledger.pricing.price_job``), appends the ``bill`` audit entry and stores
  the ``BillingCharge`` row — entry and row commit together with the settlement, or not at all
  ("every decision audited before it takes effect").
* Data independence (docs/billing.md, "What the researcher sees"): a charge, its ``bill``
  entry and a statement are functions of public quantities only — the CPU *billed*
  (``ledger.metering.billed_cpu``: the admission-time reservation once the job has read user
  data), the committed ε, the price list, rounds and *expected* client updates. Measured CPU,
  wall time, memory and the exact client-update count of a job that read user data never
  reach them; they stay in ``JobMeter`` for the owner (``fedgate billing usage``).
* A ``bill`` entry carries everything needed to recompute its amount: the priced quantities,
  the price list and the rounded items.
* ``statement`` sums ``BillingCharge`` rows of one researcher and month (by ``charged_at``,
  UTC); each line cites its audit entry, and the totals equal the sum of those ``bill``
  entries exactly (``tests/test_billing.py``).
* ``project_cost`` (estimates, spend quotas) prices a job before it runs at its CPU
  reservation and projected ε: exactly what it will be charged if it reads user data, an
  upper bound otherwise; ``spend_used`` (``gateway.node.quotas``) adds a month's charges and the
  projections of active jobs.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlmodel import Session, select

from engine.meter import ResourceUsage
from ledger.audit import append_entry
from ledger.metering import (
    active_reservations,
    billed_cpu,
    month_bounds,
    month_of,
    record_usage,
    researcher_usage,
)
from ledger.models import BillingCharge, Job, JobMeter
from ledger.pricing import BilledQuantities, PriceList, decimal_text, price_job
from ledger.states import BudgetState

__all__ = ["STATEMENT_COLUMNS", "CostProjection", "charge_job", "project_cost", "settle_usage",
           "spend_used", "statement", "statement_csv"]


def settle_usage(session: Session, *, job: Job, usage: ResourceUsage | None,
                 client_updates: int | None, bytes_released: int, succeeded: bool,
                 cpu_reserved_seconds: float, prices: PriceList | None, actor: str,
                 now: float) -> BillingCharge | None:
    """Record ``job``'s metering and, if priced, charge it (caller's settlement transaction,
    after the job's budget outcome and ``data_accessed`` so the committed ε and the billed CPU
    are known). A job is charged if it ran: the meter reported, or it read user data (a job
    cancelled while running has no meter report, and is charged its reservation)."""
    meter = record_usage(session, job, usage=usage, client_updates=client_updates,
                         bytes_released=bytes_released, succeeded=succeeded,
                         cpu_reserved_seconds=cpu_reserved_seconds, now=now)
    if prices is None or not (meter.measured or job.data_accessed):
        return None
    return charge_job(session, job=job, meter=meter, prices=prices, actor=actor, now=now)


def charge_job(session: Session, *, job: Job, meter: JobMeter, prices: PriceList, actor: str,
               now: float) -> BillingCharge:
    """Price a settled job from its data-independent quantities (module contract) and record
    the charge with its ``bill`` audit entry (idempotent)."""
    existing = session.get(BillingCharge, job.id)
    if existing is not None:
        return existing
    epsilon = decimal_text(job.epsilon) if job.budget_state == BudgetState.COMMITTED else "0"
    cpu = billed_cpu(meter, read_user_data=job.data_accessed)
    quantities = BilledQuantities(cpu_seconds=cpu.seconds, epsilon=epsilon)
    charge = price_job(prices, quantities)
    month = month_of(now)
    seq = append_entry(
        session,
        action="bill",
        actor=actor,
        job_id=job.id,
        researcher=job.researcher,
        dataset=job.dataset,
        month=month,
        currency=charge.currency,
        total=str(charge.total),
        items={name: str(amount) for name, amount in charge.items.items()},
        quantities={"cpu_seconds": quantities.cpu_seconds, "cpu_basis": cpu.basis,
                    "epsilon": quantities.epsilon},
        prices=prices.to_json(),
    )
    row = BillingCharge(job_id=job.id, researcher=job.researcher, dataset=job.dataset,
                        month=month, currency=charge.currency, total=str(charge.total),
                        items=json.dumps({k: str(v) for k, v in charge.items.items()}),
                        audit_seq=seq, charged_at=now)
    session.add(row)
    session.flush()
    return row


@dataclass(frozen=True)
class CostProjection:
    """A job's projected cost before it runs, in ``currency``: ``ledger.pricing.price_job`` at
    the job's CPU reservation and projected ε. It is exactly what the job will be charged if it
    reads user data (billed at its reservation, committing its ε), and an upper bound if it
    fails before (billed the CPU it measured, at most the reservation; ε refunded)."""

    currency: str
    items: dict[str, Decimal]
    total: Decimal
    cpu_reserved_seconds: float

    def to_json(self) -> dict[str, Any]:
        basis = (f"upper bound: CPU reservation ({self.cpu_reserved_seconds / 3600:g} CPU-hours) "
                 "× per_cpu_hour + per_job + per_epsilon × projected ε; exactly the charge once "
                 "the job reads user data")
        return {"currency": self.currency, "total": str(self.total),
                "items": {name: str(amount) for name, amount in self.items.items()},
                "upper_bound": True, "basis": basis}


def project_cost(prices: PriceList, *, cpu_reserved_seconds: float, epsilon: float) -> CostProjection:
    """What a job reserving ``cpu_reserved_seconds`` and committing ``epsilon`` is charged
    (``CostProjection``). Pure, and a function of public quantities only."""
    charge = price_job(prices, BilledQuantities(cpu_seconds=decimal_text(cpu_reserved_seconds),
                                                epsilon=decimal_text(epsilon)))
    return CostProjection(prices.currency, charge.items, charge.total, float(cpu_reserved_seconds))


def spend_used(session: Session, researchers: Iterable[str], month: str, *, prices: PriceList,
               default_reservation: float,
               on_dataset: Callable[[str], bool] = lambda name: True) -> Decimal:
    """What ``researchers`` spent in ``month`` on datasets ``on_dataset`` accepts: their
    charges in that month plus the projected cost (``project_cost``) of their active jobs,
    which may still be charged this month (a job without a stored reservation counts
    ``default_reservation``)."""
    names = sorted(set(researchers))
    start, end = month_bounds(month)
    charges = session.exec(select(BillingCharge).where(  # reviewed: ORM query, not exec
        BillingCharge.researcher.in_(names), BillingCharge.charged_at >= start,  # type: ignore[attr-defined]
        BillingCharge.charged_at < end)).all()
    total = sum((Decimal(c.total) for c in charges if on_dataset(c.dataset)), Decimal(0))
    for job, reserved in active_reservations(session, names, default_reservation=default_reservation,
                                             on_dataset=on_dataset):
        total += project_cost(prices, cpu_reserved_seconds=reserved, epsilon=job.epsilon).total
    return total


STATEMENT_COLUMNS = ("job_id", "dataset", "charged_at", "audit_seq", "rounds_run",
                     "expected_client_updates", "cpu_seconds", "cpu_basis", "cpu", "job",
                     "epsilon", "total", "currency")


def statement(session: Session, *, researcher: str, month: str) -> dict[str, Any]:
    """One researcher's charges in ``month`` (``YYYY-MM``, UTC), line by line, with totals per
    currency (exact decimal sums). Researcher-facing: each line holds only data-independent
    quantities (module contract; ``cpu_seconds`` is the CPU billed). Raises ValueError for a
    malformed month."""
    start, end = month_bounds(month)
    charges = session.exec(select(BillingCharge).where(  # reviewed: ORM query, not exec
        BillingCharge.researcher == researcher, BillingCharge.charged_at >= start,
        BillingCharge.charged_at < end).order_by(BillingCharge.charged_at,
                                                 BillingCharge.job_id)).all()
    lines = []
    totals: dict[str, Decimal] = {}
    for charge in charges:
        meter = session.get(JobMeter, charge.job_id)
        job = session.get(Job, charge.job_id)
        usage = researcher_usage(meter, job) if meter is not None and job is not None else {}
        items = json.loads(charge.items)
        lines.append({
            "job_id": charge.job_id,
            "dataset": charge.dataset,
            "charged_at": dt.datetime.fromtimestamp(charge.charged_at, dt.UTC)
            .isoformat(timespec="seconds").replace("+00:00", "Z"),
            "audit_seq": charge.audit_seq,
            "rounds_run": usage.get("rounds_run"),
            "expected_client_updates": usage.get("expected_client_updates"),
            "cpu_seconds": usage.get("cpu_seconds"),
            "cpu_basis": usage.get("cpu_basis"),
            **items,
            "total": charge.total,
            "currency": charge.currency,
        })
        totals[charge.currency] = totals.get(charge.currency, Decimal(0)) + Decimal(charge.total)
    return {"researcher": researcher, "month": month, "lines": lines,
            "totals": {currency: str(total) for currency, total in sorted(totals.items())}}


def statement_csv(document: dict[str, Any]) -> str:
    """A statement as CSV: one row per charge, then one ``TOTAL`` row per currency."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(STATEMENT_COLUMNS)
    for line in document["lines"]:
        writer.writerow([line.get(column, "") for column in STATEMENT_COLUMNS])
    for currency, total in document["totals"].items():
        writer.writerow(["TOTAL", *[""] * (len(STATEMENT_COLUMNS) - 3), total, currency])
    return out.getvalue()
