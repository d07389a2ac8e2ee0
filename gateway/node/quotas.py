"""Compute quotas at admission: the owner's ``max_*`` policy rows against the ledger's use.

Contract:

* ``enforce_quotas`` runs in the transaction that admits a job, after its budget and CPU are
  reserved (``reserve_budget``, ``ledger.metering.reserve_compute``), and first takes the
  usage lock (``ledger.metering.lock_usage``). Use is read after that lock, so it includes
  every admission that committed earlier, and no admission can commit in between: two
  concurrent admissions never jointly exceed a quota, on SQLite or PostgreSQL.
* Use counts the job being admitted (it is already reserved in this transaction):
  ``max_concurrent_jobs`` counts admitted, unsettled jobs (pending review, approved, queued,
  running); ``max_cpu_hours_per_month`` the CPU *billed* for jobs settled in the current UTC
  month (``ledger.metering.billed_cpu``) plus the full CPU reservation of every active job;
  ``max_spend_per_month`` the charges of the month plus the projected cost
  (``gateway.node.billing.project_cost``) of every active job. Active jobs count at their
  reservation because they may still settle this month: never less than what they are billed.
* Data independence: a refusal is seen by the researcher, so use never reads measured
  resources of a job that read user data — only reservations, billed CPU and charges, which
  are functions of public quantities (docs/billing.md, "What the researcher sees").
* Use is summed over the quota's members (the row's subject, or all members of its group)
  and the datasets of the row's domain matching its dataset pattern.
* A job that would exceed any quota raises ``QuotaExceeded``; the caller rolls the whole
  transaction back (nothing stays reserved) and audits the ``deny``. Quotas see no data
  and release nothing: limits, use and reservations are the researcher's own numbers.
* Without a price list nothing is charged, so a spend quota's use is zero.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal

from sqlalchemy.engine import Connection
from sqlmodel import Session

from gateway.node.billing import project_cost, spend_used
from gateway.policy.constraints import Quota
from gateway.policy.decisions import dataset_matches
from gateway.protocol.problems import Problem
from ledger.fixed_sql import Statement, execute
from ledger.metering import active_jobs_per_dataset, cpu_seconds_used, lock_usage, month_bounds, month_of
from ledger.models import Job
from ledger.pricing import PriceList

__all__ = ["QuotaExceeded", "enforce_quotas"]


class QuotaExceeded(Exception):
    """Admitting the job would exceed ``quota``; ``problem`` is the refusal to send."""

    def __init__(self, quota: Quota, problem: Problem) -> None:
        super().__init__(problem.detail)
        self.quota = quota
        self.problem = problem


_DATASET_OWNERS = Statement("SELECT name, owner FROM dataset")


def _on_datasets(session: Session | Connection, quota: Quota) -> Callable[[str], bool]:
    owners = dict(execute(session, _DATASET_OWNERS).fetchall())
    return lambda name: owners.get(name) == quota.domain and dataset_matches(quota.dataset_pattern, name)


def _whose(quota: Quota) -> str:
    others = len(quota.members) - 1
    if others <= 0:
        return f"for {quota.subject}"
    return f"shared by group {quota.subject} ({others} member{'s' if others != 1 else ''})"


def _next_month(month: str) -> str:
    end = month_bounds(month)[1]
    return dt.datetime.fromtimestamp(end, dt.UTC).strftime("%Y-%m-%d 00:00 UTC")


def _refusal(quota: Quota, *, used: str, requested: str, limit: str, unit: str, month: str | None,
             what: str, this_job: str, remedy: str) -> QuotaExceeded:
    where = f" in {month}" if month else ""
    detail = (f"quota {quota.name} = {limit} {unit} of rule {quota.rule}, {_whose(quota)}: "
              f"{used} {unit} {what}{where}, plus {this_job}, would exceed it; {remedy}, or ask "
              "the data owner to raise the quota")
    facts = {"quota": quota.name, "limit": limit, "used": used, "requested": requested,
             "unit": unit, "rule": quota.rule, **({"month": month} if month else {})}
    return QuotaExceeded(quota, Problem("quota-exceeded", detail, **facts))


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.6g}"


def check_quota(session: Session | Connection, quota: Quota, *, job: Job,
                cpu_reserved_seconds: float, prices: PriceList | None, default_reservation: float,
                month: str) -> None:
    """Raise ``QuotaExceeded`` if use of ``quota``, ``job`` included, is above its limit.
    Given the admission's connection, the CPU and spend quotas read through an ORM session
    joined to its transaction (reads only: it holds nothing to write)."""
    if not isinstance(session, Session) and quota.name in {"max_cpu_hours_per_month",
                                                          "max_spend_per_month"}:
        with Session(bind=session) as reads:
            check_quota(reads, quota, job=job, cpu_reserved_seconds=cpu_reserved_seconds,
                        prices=prices, default_reservation=default_reservation, month=month)
        return
    on_dataset = _on_datasets(session, quota)
    if quota.name == "max_concurrent_jobs":
        running = sum(count for name, count in active_jobs_per_dataset(session, quota.members).items()
                      if on_dataset(name))
        if running > quota.limit:
            raise _refusal(quota, used=str(running - 1), requested="1", limit=str(quota.limit),
                           unit="jobs", month=None, what="admitted and not yet finished",
                           this_job="this one",
                           remedy="wait for one to finish, or cancel one")
    elif quota.name == "max_cpu_hours_per_month":
        used = cpu_seconds_used(session, quota.members, month, default_reservation=default_reservation,
                                on_dataset=on_dataset)
        if used > quota.limit * 3600:
            raise _refusal(quota, used=_hours(used - cpu_reserved_seconds),
                           requested=_hours(cpu_reserved_seconds), limit=f"{quota.limit:g}",
                           unit="CPU-hours", month=month,
                           what="billed or reserved by active jobs",
                           this_job=f"this job's reservation of {_hours(cpu_reserved_seconds)} CPU-hours",
                           remedy="cancel a job that has not read user data yet (it is then billed "
                           f"only what it used), or wait until {_next_month(month)}")
    elif quota.name == "max_spend_per_month" and prices is not None:
        spent = spend_used(session, quota.members, month, prices=prices,
                           default_reservation=default_reservation, on_dataset=on_dataset)
        this = project_cost(prices, cpu_reserved_seconds=cpu_reserved_seconds, epsilon=job.epsilon)
        if spent > Decimal(quota.limit):
            raise _refusal(quota, used=str(spent - this.total), requested=str(this.total),
                           limit=str(quota.limit), unit=prices.currency, month=month,
                           what="charged or projected for active jobs",
                           this_job=f"this job's projected cost of {this.total} {prices.currency}",
                           remedy="use fewer rounds or less ε, cancel a job that has not read user "
                           f"data yet, or wait until {_next_month(month)}")


def enforce_quotas(session: Session | Connection, quotas: tuple[Quota, ...], *, job: Job,
                   cpu_reserved_seconds: float, prices: PriceList | None,
                   default_reservation: float) -> None:
    """Check every quota (module contract) in the caller's admission transaction, after the
    job's reservations; raises ``QuotaExceeded`` for the first one exceeded."""
    if not quotas:
        return
    lock_usage(session)
    month = month_of(job.created_at)
    for quota in quotas:
        check_quota(session, quota, job=job, cpu_reserved_seconds=cpu_reserved_seconds,
                    prices=prices, default_reservation=default_reservation, month=month)
