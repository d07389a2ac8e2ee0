"""Budget reservations against a dataset's Rényi privacy filter.

Lifecycle of a job's charge (see docs/privacy.md):

* ``reserve_budget`` at admission: under the dataset row lock, admit iff the filter rule
  (``ledger.accounting.admits``) holds, then add the job's RDP vector to the dataset's
  running vector and append the ``admit`` audit entry — all in one transaction, so no
  interleaving of gateway threads or processes can overspend. The same transaction adds the
  job's ε to its researcher's running total on the dataset
  (``ledger.researcher_epsilon.count_researcher_epsilon``),
  which a refund subtracts again.
* ``commit_budget`` at release, or on failure after data access began: the vector stays
  spent forever.
* ``refund_budget`` only when the job failed before reading any user data: the vector is
  subtracted exactly (exact arithmetic), restoring the previous state bit for bit.

All functions run inside the caller's open transaction.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import dp_accounting
from sqlalchemy import func
from sqlalchemy.engine import Connection
from sqlalchemy.orm import make_transient_to_detached
from sqlmodel import Session, select

from ledger import accounting, mechanism
from ledger.audit import append_entry
from ledger.fixed_sql import Insert, Statement, execute
from ledger.models import Dataset, Job
from ledger.names import check_dataset_name, name_key
from ledger.public_count import PublicUserCount, check_delta
from ledger.renyi_filter import RenyiFilter, orders_from_json
from ledger.researcher_epsilon import count_researcher_epsilon
from ledger.row_objects import fetch_row_object
from ledger.states import BudgetState


class LedgerError(Exception):
    """Base class of ledger refusals."""


class UnknownDataset(LedgerError):
    def __init__(self, name: str) -> None:
        super().__init__(f"dataset {name!r} is not registered on this node")
        self.name = name


class BudgetExceeded(LedgerError):
    """The proposed job does not fit the dataset's privacy filter; nothing was reserved."""

    def __init__(self, dataset: str, epsilon: float, more_jobs_that_fit: int) -> None:
        super().__init__(
            f"the job (ε {epsilon:.3g}) does not fit the remaining privacy budget of {dataset!r}"
        )
        self.dataset = dataset
        self.epsilon = epsilon
        self.more_jobs_that_fit = more_jobs_that_fit


@dataclass(frozen=True)
class BudgetFit:
    """Whether a proposed job fits now, and how many such jobs would fit in total."""

    fits: bool
    jobs_that_fit: int


def check_new_dataset_name(session: Session, name: str) -> str:
    """``name`` if a new dataset may take it: a name (``ledger.names``), not reserved, and
    no dataset has it, whatever its case. Raises ``NameInvalid`` or ``ValueError``."""
    check_dataset_name(name)
    taken = session.exec(  # reviewed: ORM query, not exec
        select(Dataset.name).where(func.lower(Dataset.name) == name_key(name))).first()
    if taken is not None:
        raise ValueError(f"dataset {taken!r} already exists"
                         + ("" if taken == name else f"; {name!r} differs from it only in case"))
    return name


def register_dataset(
    session: Session,
    *,
    name: str,
    owner: str,
    path: str,
    training_users: int,
    evaluation_users: int,
    public_users: PublicUserCount,
    num_features: int,
    num_classes: int,
    epsilon_total: float,
    delta: float,
    actor: str,
    max_examples_per_user: int = mechanism.DEFAULT_MAX_EXAMPLES_PER_USER,
) -> Dataset:
    """Register a dataset with a fresh filter: budget B(α) for ε_total at δ.

    Nothing is spent, except when N̂ is a DP estimate: its Gaussian count event is charged to
    the filter here, in the registering transaction, with a ``charge`` audit entry, before N̂
    is used for anything. δ must be below 1/N̂ (``ledger.public_count.check_delta``).
    """
    check_new_dataset_name(session, name)
    check_delta(delta, public_users.value)
    mechanism.check_in_range("max_examples_per_user", max_examples_per_user)
    orders = accounting.FILTER_ORDERS
    budget = accounting.filter_budget(epsilon_total=epsilon_total, delta=delta, orders=orders)
    spent = initial_spent(public_users.event, orders)
    if not any(s <= b for s, b in zip(spent, budget, strict=True)):
        raise BudgetExceeded(name, 0.0, 0)  # the count estimate alone exceeds the budget
    dataset = Dataset(
        name=name,
        owner=owner,
        path=path,
        training_users=training_users,
        evaluation_users=evaluation_users,
        public_users=public_users.value,
        public_users_source=public_users.source,
        public_users_event=json.dumps(None if public_users.event is None
                                      else accounting.event_to_json(public_users.event)),
        max_examples_per_user=max_examples_per_user,
        num_features=num_features,
        num_classes=num_classes,
        epsilon_total=epsilon_total,
        delta=delta,
        filter_orders=json.dumps(list(orders)),
        filter_budget=json.dumps(accounting.vector_to_json(budget)),
        spent_rdp=json.dumps(accounting.vector_to_json(spent)),
        created_at=time.time(),
    )
    append_entry(
        session,
        action="dataset",
        actor=actor,
        dataset=name,
        decision="registered",
        epsilon_total=epsilon_total,
        delta=delta,
        training_users=training_users,
        evaluation_users=evaluation_users,
        public_users=public_users.value,
        public_users_source=public_users.source,
        max_examples_per_user=max_examples_per_user,
    )
    if public_users.event is not None:
        append_entry(session, action="charge", actor=actor, dataset=name,
                     decision="public-user-count",
                     event=accounting.event_to_json(public_users.event),
                     reason="DP estimate of the training-user count N̂, charged once at import")
    session.add(dataset)
    session.flush()
    return dataset


def initial_spent(count_event: dp_accounting.DpEvent | None,
                  orders: tuple[float, ...]) -> accounting.RdpVector:
    """The filter's spent vector before any job: the public-count estimate's charge, if any."""
    spent = accounting.zero(orders)
    if count_event is None:
        return spent
    return accounting.add(spent, accounting.event_rdp(count_event, orders))


def dataset_initial_spent(dataset: Dataset) -> accounting.RdpVector:
    """:func:`initial_spent` of a registered dataset (from its stored count event)."""
    stored = json.loads(dataset.public_users_event)
    event = None if stored is None else accounting.event_from_json(stored)
    return initial_spent(event, tuple(float(a) for a in json.loads(dataset.filter_orders)))


def lock_dataset(session: Session, name: str) -> Dataset:
    """The dataset row, locked for this transaction (``SELECT … FOR UPDATE``).

    Lock order, which every writer follows so PostgreSQL never deadlocks: job row, then dataset
    row, then the audit log head (taken by :func:`ledger.audit.append_entry`)."""
    # populate_existing: a Dataset this session loaded before is refreshed from the row, which
    # reserve_budget changes with Core statements that leave the session's copy as it was.
    statement = (select(Dataset).where(Dataset.name == name).with_for_update()
                 .execution_options(populate_existing=True))
    dataset = session.exec(statement).first()  # reviewed: ORM query, not exec
    if dataset is None:
        raise UnknownDataset(name)
    return dataset


def filter_orders(dataset: Dataset) -> tuple[float, ...]:
    return orders_from_json(dataset.filter_orders)


def renyi_filter(dataset: Dataset) -> RenyiFilter:
    """The dataset's filter as its row stores it (read it under ``lock_dataset`` to change it)."""
    return RenyiFilter.from_json(orders=dataset.filter_orders, budget=dataset.filter_budget,
                                 spent=dataset.spent_rdp)


def budget_fit(dataset: Dataset, cost_rdp: tuple[float, ...]) -> BudgetFit:
    """Pure read of the filter: does ``cost_rdp`` fit now, and how many copies would."""
    current = renyi_filter(dataset)
    return BudgetFit(fits=current.admits(cost_rdp), jobs_that_fit=current.jobs_that_fit(cost_rdp))


_IDEMPOTENT_JOB = Statement("SELECT * FROM job WHERE researcher_key_id = ? AND idempotency_key = ?")


def find_idempotent_job(on: Session | Connection, researcher_key_id: str,
                        key: str | None) -> Job | None:
    """The job already submitted by this key under ``key``, if any (a row object, held by
    no session: ``ledger.row_objects``)."""
    if key is None:
        return None
    return fetch_row_object(Job, execute(on, _IDEMPOTENT_JOB, (researcher_key_id, key)))


_LOCK_FILTER = Statement("SELECT filter_orders, filter_budget, spent_rdp FROM dataset WHERE name = ?",
                         lock=True)
_INSERT_JOB = Insert(Statement(
    "INSERT INTO job (id, dataset, researcher_key_id, researcher, idempotency_key, "
    "request_digest, model_digest, spec, cost, cost_rdp, epsilon, delta, state, "
    'budget_state, data_accessed, "round", rounds, policy_version, failure, '
    '"release", created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '
    "?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"))
_SPEND = Statement("UPDATE dataset SET spent_rdp = ? WHERE name = ?")


def reserve_budget(
    session: Session | Connection, job: Job, cost_rdp: tuple[float, ...], audit: dict[str, Any]
) -> Job:
    """Admit ``job`` and reserve its cost, or raise ``BudgetExceeded`` reserving nothing.

    ``audit`` holds the fields recorded with the decision (actor, policy version, ...).
    The ``admit`` entry is appended in this transaction. On ``BudgetExceeded`` the caller
    must roll back and record the ``deny`` in a transaction of its own.

    The rows are written without the ORM (the admission hot path): the dataset row locked,
    read and updated, and the job inserted, with fixed statements (``ledger.fixed_sql``).
    ``job`` must not be in a session yet; given a session, it is returned attached to it as
    the row it inserted (given a connection, it stays a row object).
    """
    row = execute(session, _LOCK_FILTER, (job.dataset,)).fetchone()
    if row is None:
        raise UnknownDataset(job.dataset)
    current = RenyiFilter.from_json(orders=row[0], budget=row[1], spent=row[2])
    if not current.admits(cost_rdp):
        raise BudgetExceeded(job.dataset, job.epsilon, current.jobs_that_fit(cost_rdp))
    job.budget_state = BudgetState.RESERVED
    job.cost_rdp = json.dumps(list(cost_rdp))
    append_entry(session, action="admit", decision="allow", job_id=job.id, **audit)
    count_researcher_epsilon(session, job, +1)
    execute(session, _SPEND, (current.charge(cost_rdp).spent_json(), job.dataset))
    _INSERT_JOB.row(session, job.__dict__)
    if isinstance(session, Session):
        make_transient_to_detached(job)  # the row just inserted, without a flush of the ORM
        session.add(job)
    return job


def _locked_job(session: Session, job_id: str) -> Job:
    statement = select(Job).where(Job.id == job_id).with_for_update()
    job = session.exec(statement).first()  # reviewed: ORM query, not exec
    if job is None:
        raise LedgerError(f"no job {job_id!r}")
    return job


def commit_budget(session: Session, job_id: str, *, reason: str, actor: str) -> Job:
    """Make a job's reservation a permanent charge (idempotent)."""
    job = _locked_job(session, job_id)
    if job.budget_state == BudgetState.COMMITTED:
        return job
    if job.budget_state != BudgetState.RESERVED:
        raise LedgerError(f"job {job_id} budget is {job.budget_state}, cannot commit")
    append_entry(
        session,
        action="charge",
        actor=actor,
        job_id=job.id,
        dataset=job.dataset,
        epsilon=job.epsilon,
        delta=job.delta,
        reason=reason,
    )
    job.budget_state = BudgetState.COMMITTED
    job.updated_at = time.time()
    session.add(job)
    session.flush()
    return job


def refund_budget(session: Session, job_id: str, *, reason: str, actor: str) -> Job:
    """Release a reservation of a job that never read user data (exact subtraction)."""
    job = _locked_job(session, job_id)
    if job.data_accessed:
        raise LedgerError(f"job {job_id} read user data; its charge cannot be refunded")
    if job.budget_state == BudgetState.REFUNDED:
        return job
    if job.budget_state != BudgetState.RESERVED:
        raise LedgerError(f"job {job_id} budget is {job.budget_state}, cannot refund")
    dataset = lock_dataset(session, job.dataset)
    append_entry(
        session,
        action="refund",
        actor=actor,
        job_id=job.id,
        dataset=job.dataset,
        epsilon=job.epsilon,
        delta=job.delta,
        reason=reason,
    )
    dataset.spent_rdp = renyi_filter(dataset).refund(tuple(json.loads(job.cost_rdp))).spent_json()
    count_researcher_epsilon(session, job, -1)
    job.budget_state = BudgetState.REFUNDED
    job.updated_at = time.time()
    session.add(dataset)
    session.add(job)
    session.flush()
    return job
