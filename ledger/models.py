"""Ledger tables (SQLModel): one schema for SQLite and PostgreSQL.

Invariants kept by the code that writes these rows (``ledger.budget``, ``ledger.audit``,
``ledger.keys``), not by the tables alone:

* ``Dataset.spent_rdp`` is the exact sum of the RDP vectors of every job whose budget
  is ``reserved`` or ``committed`` on that dataset; it only changes in a transaction
  that holds the dataset row lock and appends the audit entry for the change.
* ``AuditEntry.seq`` is dense (0, 1, 2, ...) and entries are never updated or deleted;
  ``AuditCheckpoint`` rows are signed tree heads of prefixes of that log.
* ``ResearcherEpsilon`` holds, per (dataset, researcher) that has one, the exact Σ ε of that
  researcher's reserved and committed jobs there; ``LedgerVersion`` counters change with the
  data they name (``ledger.versions``).
* A ``SeenNonce`` row exists for every accepted signed request until it expires, so a
  replay is refused even after the gateway restarts.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


class Principal(SQLModel, table=True):
    """A registered public key of a researcher or compliance officer."""

    key_id: str = Field(primary_key=True, max_length=64)
    name: str = Field(index=True, max_length=128)
    role: str = Field(max_length=32)  # "researcher" | "officer"
    group: str = Field(default="", max_length=128)
    public_key: str = Field(max_length=128)  # base64 of the raw 32-byte Ed25519 key
    status: str = Field(default="active", max_length=16)  # "active" | "revoked"
    created_at: float
    revoked_at: float | None = None


class LedgerVersion(SQLModel, table=True):
    """A counter of changes to the data it names (``ledger.versions``): bumped in every
    transaction that changes that data, so a process that caches the data can tell, from one
    row read in its snapshot, whether any process changed it since."""

    name: str = Field(primary_key=True, max_length=64)
    version: int = Field(default=0, sa_type=BigInteger)


class SeenNonce(SQLModel, table=True):
    """A nonce accepted once from one key; kept until its signature expires."""

    __table_args__ = (UniqueConstraint("key_id", "nonce"),)
    id: int | None = Field(default=None, primary_key=True)
    key_id: str = Field(max_length=64)
    nonce: str = Field(max_length=128)
    expires_at: float = Field(index=True)


class Dataset(SQLModel, table=True):
    """A dataset held by the node, with its (ε_total, δ) budget and Rényi-filter state.

    Researchers see N̂ (``public_users``), never the exact counts: every ε and bound they get is
    computed from N̂ (docs/privacy.md, "What a researcher observes")."""

    name: str = Field(primary_key=True, max_length=128)
    owner: str = Field(max_length=128)
    path: str
    training_users: int  # exact: private, never shown to researchers or used in their figures
    evaluation_users: int  # exact: private
    public_users: int  # N̂, the public training-user count (ledger.public_count)
    public_users_source: str = Field(max_length=16)  # "declared" | "dp-estimate"
    public_users_event: str = Field(sa_column=Column(Text, nullable=False))  # JSON event or null
    max_examples_per_user: int  # the owner's cap on one user's local work per round
    num_features: int
    num_classes: int
    epsilon_total: float
    delta: float
    filter_orders: str = Field(sa_column=Column(Text, nullable=False))  # JSON list of floats
    filter_budget: str = Field(sa_column=Column(Text, nullable=False))  # JSON exact fractions
    spent_rdp: str = Field(sa_column=Column(Text, nullable=False))  # JSON exact fractions
    created_at: float


class ModelArtifact(SQLModel, table=True):
    """An uploaded model artifact, content-addressed by the SHA-256 of its bytes."""

    digest: str = Field(primary_key=True, max_length=80)
    size: int
    uploaded_by: str = Field(max_length=64)
    created_at: float


class Job(SQLModel, table=True):
    """A training job and its budget reservation.

    ``budget_state`` lifecycle: ``reserved`` (at admission) → ``committed`` (at release,
    or on failure after data access began) | ``refunded`` (failure before any user
    data was read, including a denied, expired or withdrawn review).

    ``state`` lifecycle: ``queued`` → ``running`` → ``succeeded`` | ``failed``; a job the
    policy holds for owner review starts as ``pending_review`` (budget reserved) and
    becomes ``approved`` → ``queued`` (the gateway starts it) or ``failed`` (refunded).
    """

    # The composite indexes answer the policy's per-researcher ε sums
    # (``gateway.policy.ledger_inputs``) without reading every job of the dataset, and the
    # concurrent-job quota's count of a researcher's active jobs (``gateway.node.quotas``)
    # without reading every active job of the node.
    __table_args__ = (UniqueConstraint("researcher_key_id", "idempotency_key"),
                      Index("ix_job_dataset_researcher_created", "dataset", "researcher",
                            "created_at"),
                      Index("ix_job_researcher_state", "researcher", "state"))
    id: str = Field(primary_key=True, max_length=64)
    dataset: str = Field(index=True, max_length=128)
    researcher_key_id: str = Field(max_length=64)
    researcher: str = Field(max_length=128)
    idempotency_key: str | None = Field(default=None, max_length=128)
    request_digest: str = Field(max_length=80)
    model_digest: str = Field(max_length=80)
    spec: str = Field(sa_column=Column(Text, nullable=False))  # canonical JSON of the job spec
    cost: str = Field(sa_column=Column(Text, nullable=False))  # JobCost JSON (DpEvents)
    cost_rdp: str = Field(sa_column=Column(Text, nullable=False))  # exact RDP vector charged
    epsilon: float
    delta: float
    # pending_review|approved|queued|running|succeeded|failed
    state: str = Field(index=True, max_length=32)
    budget_state: str = Field(max_length=16)  # reserved|committed|refunded
    data_accessed: bool = False
    round: int = 0
    rounds: int
    policy_version: str = Field(max_length=80)
    failure: str | None = None
    release: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: float
    updated_at: float


class ResearcherEpsilon(SQLModel, table=True):
    """The running Σ ε of one researcher's charged jobs (budget ``reserved`` or ``committed``)
    on one dataset, kept by ``ledger.researcher_epsilon`` in the transaction that reserves or
    refunds (``ledger.budget``), so
    the policy's ``max_epsilon_per_researcher`` reads one row instead of summing the jobs.

    ``epsilon`` is the exact sum of the jobs' ε (a fraction ``n/d`` of their float values).
    ``since`` is at most the creation time of every charged job it counts: it never grows, so a
    window that starts at or before it covers them all; a shorter window sums the jobs."""

    dataset: str = Field(primary_key=True, max_length=128)
    researcher: str = Field(primary_key=True, max_length=128)
    epsilon: str = Field(sa_column=Column(Text, nullable=False))
    since: float


class JobReview(SQLModel, table=True):
    """The data owner's review of a job the policy held (``ledger.review``).

    ``state``: ``pending`` → ``approved`` | ``denied`` | ``expired`` (at ``expires_at``) |
    ``withdrawn`` (the researcher cancelled). While pending, the job's budget stays reserved.
    """

    job_id: str = Field(primary_key=True, max_length=64)
    state: str = Field(index=True, max_length=16)
    required_because: str = Field(sa_column=Column(Text, nullable=False))
    policy_explanation: str = Field(sa_column=Column(Text, nullable=False))
    requested_at: float
    expires_at: float
    decided_at: float | None = None
    decided_by: str | None = Field(default=None, max_length=128)
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class ResultFetch(SQLModel, table=True):
    """One fetch of a job's released result; output policies limit how many there may be.

    ``number`` counts a job's fetches 1, 2, ... without gaps (unique per job, so two
    concurrent fetches can never both be the n-th).
    """

    __table_args__ = (UniqueConstraint("job_id", "number"),)
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True, max_length=64)
    number: int
    key_id: str = Field(max_length=64)
    fetched_at: float


class AuditHead(SQLModel, table=True):
    """Single row locked by every audit append, so entry numbers stay dense."""

    id: int = Field(default=1, primary_key=True)
    size: int = 0


class AuditEntry(SQLModel, table=True):
    """One canonical-JSON audit entry and its RFC 6962 leaf hash."""

    seq: int = Field(primary_key=True)
    entry: str = Field(sa_column=Column(Text, nullable=False))
    leaf_hash: str = Field(max_length=64)


class AuditCheckpoint(SQLModel, table=True):
    """A signed checkpoint (``ledger.checkpoints`` text) of the audit log at ``size``.

    At most one per size; never updated or deleted. Each one is consistent with every
    earlier one (``ledger.audit.publish_checkpoint`` refuses to sign otherwise).
    """

    size: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    text: str = Field(sa_column=Column(Text, nullable=False))


class DashboardToken(SQLModel, table=True):
    """A one-time login token for the officer dashboard (``ledger.officer_login``).

    Only the SHA-256 of the token is stored; ``exchanged_at`` is set when it is traded for
    a session, after which it logs nobody in again.
    """

    id: str = Field(primary_key=True, max_length=32)
    token_hash: str = Field(unique=True, max_length=64)
    key_id: str = Field(max_length=64)
    created_at: float
    expires_at: float
    exchanged_at: float | None = None


class DashboardSession(SQLModel, table=True):
    """A dashboard session: the SHA-256 of its opaque cookie value, the officer key it acts
    for and the token it came from. It ends at ``expires_at`` (that of its token)."""

    session_hash: str = Field(primary_key=True, max_length=64)
    key_id: str = Field(max_length=64)
    token_id: str = Field(max_length=32)
    created_at: float
    expires_at: float = Field(index=True)


class JobMeter(SQLModel, table=True):
    """Resources one job reserved and used (``ledger.metering``): one row per job.

    Written at admission with the CPU reservation (``state`` ``reserved``) and completed when
    the job settles (``metered``). CPU, wall time and memory are measured by the engine's meter
    from the kernel (``engine.meter``), never reported by the job. ``client_updates`` is the
    exact, data-dependent count (it reveals how many users were sampled): owner-local only,
    never shown to researchers, who see ``expected_client_updates`` (q·N·rounds from public
    parameters) instead. Quantities are decimal text (``ledger.pricing.decimal_text``).
    """

    job_id: str = Field(primary_key=True, max_length=64)
    researcher: str = Field(index=True, max_length=128)
    dataset: str = Field(max_length=128)
    state: str = Field(default="reserved", max_length=16)  # reserved|metered
    cpu_reserved_seconds: float
    reserved_at: float
    settled_at: float | None = Field(default=None, index=True)
    measured: bool = False  # False: the meter reported nothing (job never started, cancelled)
    cpu_seconds: str = Field(default="0", max_length=32)
    cpu_user_seconds: str = Field(default="0", max_length=32)
    cpu_system_seconds: str = Field(default="0", max_length=32)
    wall_seconds: str = Field(default="0", max_length=32)
    max_rss_bytes: int = Field(default=0, sa_type=BigInteger)
    peak_tree_rss_bytes: int = Field(default=0, sa_type=BigInteger)
    peak_memory_bytes: int = Field(default=0, sa_type=BigInteger)
    rounds_run: int = 0
    expected_client_updates: int = 0
    client_updates: int | None = None
    bytes_released: int = Field(default=0, sa_type=BigInteger)
    stopped: str | None = Field(default=None, max_length=32)
    outcome: str | None = Field(default=None, max_length=16)  # succeeded|failed


class BillingCharge(SQLModel, table=True):
    """The money charged for one job by the owner's price list (``gateway.node.billing``).

    Written in the same transaction as the ``bill`` audit entry whose sequence number it keeps;
    ``total`` is the exact decimal sum of ``items``; ``month`` (UTC, ``YYYY-MM``) is that of
    ``charged_at`` and is what statements group by.
    """

    job_id: str = Field(primary_key=True, max_length=64)
    researcher: str = Field(index=True, max_length=128)
    dataset: str = Field(max_length=128)
    month: str = Field(index=True, max_length=7)
    currency: str = Field(max_length=16)
    total: str = Field(max_length=40)
    items: str = Field(sa_column=Column(Text, nullable=False))  # JSON {item: decimal text}
    audit_seq: int
    charged_at: float
