"""Per-job resource metering in the ledger: reservations at admission, usage at settlement.

Contract:

* ``reserve_compute`` runs in the admission transaction: the job's CPU reservation (what its
  quota check counted, and the limit the engine's meter stops it at) is stored with the job.
  The reservation is fixed before the job runs from the node's configuration: public.
* ``record_usage`` runs in the settlement transaction (``gateway.node.jobs``) and fills in what the
  meter measured from the kernel (``engine.meter``): CPU seconds, wall seconds, peak memory —
  plus rounds run (from the engine's progress events), client updates and bytes released.
* Privacy invariant: what a job *used* after it began reading user data depends on that data
  (how many users Poisson sampling picked, how many examples each holds), so measured
  resources and the exact client-update count (``JobMeter.client_updates``) stay with the
  owner (``fedgate billing usage``). Everything a researcher sees, or that decides for them —
  statements, charges, quota refusals — goes through :func:`billed_cpu` and
  :func:`researcher_usage`, which are functions of public quantities only: the reservation,
  whether the job read user data (already public: it decides whether its ε is committed),
  rounds, and the *expected* client updates clients_per_round × rounds. A job that never read
  user data is billed what it measured: its whole run preceded any private data.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy.engine import Connection
from sqlmodel import Session, select

from engine.meter import ResourceUsage
from ledger.audit import lock_head
from ledger.fixed_sql import Insert, Statement, execute
from ledger.models import Job, JobMeter
from ledger.pricing import decimal_text
from ledger.row_objects import row_values
from ledger.states import ACTIVE_JOB_STATES

__all__ = [
    "ACTIVE_JOB_STATES",
    "BilledCpu",
    "active_jobs",
    "active_jobs_per_dataset",
    "active_reservations",
    "billed_cpu",
    "cpu_seconds_used",
    "expected_client_updates",
    "lock_usage",
    "month_bounds",
    "month_of",
    "record_usage",
    "researcher_usage",
    "reserve_compute",
]

"""Admitted and not yet settled: such a job counts fully against concurrency and CPU quotas."""


def expected_client_updates(clients_per_round: float, rounds: int) -> int:
    """q·N·rounds = clients_per_round × rounds, rounded: the data-independent stand-in for the
    exact count (public parameters only)."""
    return round(float(clients_per_round) * int(rounds))


def month_of(timestamp: float) -> str:
    """``YYYY-MM`` (UTC) of a POSIX timestamp: the month a charge or usage belongs to."""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m")


def month_bounds(month: str) -> tuple[float, float]:
    """[start, end) POSIX timestamps of ``YYYY-MM`` in UTC; ValueError if malformed."""
    start = dt.datetime.strptime(month + "-01", "%Y-%m-%d").replace(tzinfo=dt.UTC)
    end = (start + dt.timedelta(days=32)).replace(day=1)
    return start.timestamp(), end.timestamp()


_INSERT_METER = Insert(Statement(
    "INSERT INTO jobmeter (job_id, researcher, dataset, state, cpu_reserved_seconds, "
    "reserved_at, settled_at, measured, cpu_seconds, cpu_user_seconds, "
    "cpu_system_seconds, wall_seconds, max_rss_bytes, peak_tree_rss_bytes, "
    "peak_memory_bytes, rounds_run, expected_client_updates, client_updates, "
    "bytes_released, stopped, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
    " ?, ?, ?, ?, ?, ?, ?, ?)"))


def reserve_compute(session: Session | Connection, job: Job, cpu_reserved_seconds: float) -> None:
    """Store ``job``'s CPU reservation (in the caller's admission transaction): a new meter
    row, the model's defaults but for the job, its researcher and dataset, the reservation
    and its time, written as one fixed statement (no ORM object)."""
    _INSERT_METER.row(session, row_values(JobMeter, {
        "job_id": job.id, "researcher": job.researcher, "dataset": job.dataset,
        "cpu_reserved_seconds": float(cpu_reserved_seconds), "reserved_at": job.created_at}))


def record_usage(session: Session, job: Job, *, usage: ResourceUsage | None,
                 client_updates: int | None, bytes_released: int, succeeded: bool,
                 cpu_reserved_seconds: float, now: float | None = None) -> JobMeter:
    """Complete (or create) ``job``'s meter row in the caller's settlement transaction.

    ``usage`` None (the job never started, or was cancelled before the meter reported) is
    recorded as ``measured = False`` with zero resources. Idempotent for a metered job.
    """
    now = time.time() if now is None else now
    meter = session.get(JobMeter, job.id, with_for_update=True)
    if meter is None:
        meter = JobMeter(job_id=job.id, researcher=job.researcher, dataset=job.dataset,
                         cpu_reserved_seconds=float(cpu_reserved_seconds),
                         reserved_at=job.created_at)
    if meter.state == "metered":
        return meter
    spec_clients = _clients_per_round(job)
    meter.state = "metered"
    meter.settled_at = now
    meter.outcome = "succeeded" if succeeded else "failed"
    meter.rounds_run = job.rounds if succeeded else job.round
    meter.expected_client_updates = expected_client_updates(spec_clients, meter.rounds_run)
    meter.client_updates = client_updates
    meter.bytes_released = bytes_released
    if usage is not None:
        meter.measured = True
        meter.cpu_seconds = decimal_text(usage.cpu_seconds)
        meter.cpu_user_seconds = decimal_text(usage.cpu_user_seconds)
        meter.cpu_system_seconds = decimal_text(usage.cpu_system_seconds)
        meter.wall_seconds = decimal_text(usage.wall_seconds)
        meter.max_rss_bytes = usage.max_rss_bytes
        meter.peak_tree_rss_bytes = usage.peak_tree_rss_bytes
        meter.peak_memory_bytes = usage.peak_memory_bytes
        meter.stopped = usage.stopped
    session.add(meter)
    session.flush()
    return meter


def _clients_per_round(job: Job) -> float:
    return float(json.loads(job.spec)["clients_per_round"])


@dataclass(frozen=True)
class BilledCpu:
    """The CPU seconds (decimal text) a settled job is charged for and counts against CPU
    quotas, and on what ``basis``: ``reservation``, ``measured`` or ``none``."""

    seconds: str
    basis: str


def billed_cpu(meter: JobMeter, *, read_user_data: bool) -> BilledCpu:
    """The data-independent CPU of a settled job (module invariant). Pure.

    * The job read user data: its reservation, whatever it used. What it used depends on the
      private data; the reservation was fixed at admission from public configuration, and the
      engine's meter stops the job there, so it is also what the job could have used.
    * It did not, and the meter reported: what was measured, at most the reservation. That
      whole run happened before any private data was read.
    * Neither (never started, or cancelled before data access): nothing.

    ``read_user_data`` is the job's ``data_accessed`` flag, the same fact that decides whether
    its ε is committed or refunded, which the researcher already sees.
    """
    reserved = Decimal(decimal_text(meter.cpu_reserved_seconds))
    if read_user_data:
        return BilledCpu(format(reserved, "f"), "reservation")
    if meter.measured:
        return BilledCpu(format(min(Decimal(meter.cpu_seconds), reserved), "f"), "measured")
    return BilledCpu("0", "none")


def researcher_usage(meter: JobMeter, job: Job) -> dict[str, Any]:
    """What a researcher may see of a settled job's metering (module invariant): rounds, the
    *expected* client updates, the CPU reservation and the CPU billed (``billed_cpu``), the
    size of the release they receive. Never a measured resource of a job that read user data,
    nor the exact client-update count."""
    billed = billed_cpu(meter, read_user_data=job.data_accessed)
    return {
        "rounds_run": meter.rounds_run,
        "expected_client_updates": meter.expected_client_updates,
        "cpu_reserved_seconds": meter.cpu_reserved_seconds,
        "cpu_seconds": billed.seconds,
        "cpu_basis": billed.basis,
        "bytes_released": meter.bytes_released,
    }


def active_jobs(session: Session, researchers: Iterable[str]) -> list[Job]:
    """Admitted, unsettled jobs (``ACTIVE_JOB_STATES``) of any of ``researchers``."""
    names = sorted(set(researchers))
    return list(session.exec(select(Job).where(  # reviewed: ORM query, not exec
        Job.researcher.in_(names), Job.state.in_(ACTIVE_JOB_STATES))).all())  # type: ignore[attr-defined]


_ACTIVE_STATES = tuple(state.value for state in ACTIVE_JOB_STATES)
_ACTIVE_PER_DATASET = Statement("SELECT dataset, count(*) FROM job WHERE researcher = ? AND "
                                "state IN (?, ?, ?, ?) GROUP BY dataset",
                                parameters=1 + len(_ACTIVE_STATES))


def active_jobs_per_dataset(session: Session | Connection,
                            researchers: Iterable[str]) -> dict[str, int]:
    """How many admitted, unsettled jobs (``ACTIVE_JOB_STATES``) of any of ``researchers``
    each dataset holds: one indexed count per researcher (``ix_job_researcher_state``), no
    job rows loaded."""
    counts: dict[str, int] = {}
    for researcher in sorted(set(researchers)):
        for name, count in execute(session, _ACTIVE_PER_DATASET,
                                   (researcher, *_ACTIVE_STATES)).fetchall():
            counts[name] = counts.get(name, 0) + int(count)
    return counts


def cpu_seconds_used(session: Session, researchers: Iterable[str], month: str, *,
                     default_reservation: float,
                     on_dataset: Callable[[str], bool] = lambda name: True) -> float:
    """CPU seconds *billed* (``billed_cpu``: data-independent) for ``researchers``' jobs
    settled in ``month`` plus the full reservations of their active jobs (which may still
    settle this month; a job admitted before reservations were stored counts
    ``default_reservation``), on datasets ``on_dataset`` accepts."""
    names = sorted(set(researchers))
    start, end = month_bounds(month)
    query = select(JobMeter, Job).join(Job, Job.id == JobMeter.job_id).where(
        JobMeter.researcher.in_(names), JobMeter.state == "metered",  # type: ignore[attr-defined]
        JobMeter.settled_at >= start, JobMeter.settled_at < end)  # type: ignore[operator]
    settled = session.exec(query).all()  # reviewed: ORM query, not exec
    total = sum(float(billed_cpu(meter, read_user_data=job.data_accessed).seconds)
                for meter, job in settled if on_dataset(meter.dataset))
    return total + sum(reserved for _, reserved in active_reservations(
        session, names, default_reservation=default_reservation, on_dataset=on_dataset))


def active_reservations(session: Session, researchers: Iterable[str], *,
                        default_reservation: float,
                        on_dataset: Callable[[str], bool] = lambda name: True) -> list[tuple[Job, float]]:
    """``researchers``' active jobs on datasets ``on_dataset`` accepts, each with its CPU
    reservation (``default_reservation`` for a job admitted before reservations were stored)."""
    found = []
    for job in active_jobs(session, researchers):
        if on_dataset(job.dataset):
            meter = session.get(JobMeter, job.id)
            found.append((job, meter.cpu_reserved_seconds if meter is not None else default_reservation))
    return found


def lock_usage(session: Session | Connection) -> None:
    """Serialise quota checks: take the audit log head's row lock (``SELECT … FOR UPDATE``;
    SQLite's ``BEGIN IMMEDIATE`` already holds the database write lock). Every admission
    appends an ``admit`` entry under this lock, so usage read after it includes every admission
    that committed before, and none can commit until this transaction ends. Call it after
    ``reserve_budget`` (dataset row, then audit head: the order every writer takes them)."""
    lock_head(session)
