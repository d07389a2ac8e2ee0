"""Admission of training jobs: validate → policy → privacy filter → audit.

The order is fixed and fails closed: a request is admitted only if every step allows
it, and every refusal or admission is appended to the audit log in the same
transaction as its effect (``ledger.budget.reserve_budget`` for admissions). Model code
is never executed here: the artifact is validated as JSON data only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection
from sqlmodel import Session

from engine import compute, memory
from engine.artifact import (
    ModelRejected,
    ModelSummary,
    check_fits_dataset,
    parse_artifact,
    validate_artifact_structure,
)
from engine.compute import ComputeEstimate
from engine.functional_model import vectorizable
from engine.job import (
    ADAPTIVE_FIELDS,
    OPTIMIZER_FIELDS,
    OptimizerChoice,
    OptimizerInvalid,
    optimizer_hyperparameters,
)
from engine.memory import MemoryEstimate
from gateway.node import billing
from gateway.node.identity import VerifiedRequest
from gateway.node.node import Node
from gateway.node.nonces import PendingNonce, run_recording
from gateway.node.quotas import QuotaExceeded, enforce_quotas
from gateway.policy.constraints import Quota
from gateway.policy.decisions import PolicyDecision, PolicyEngine
from gateway.policy.ledger_inputs import (
    committed_model_digests,
    researcher_committed_jobs,
    researcher_epsilon_spent,
)
from gateway.policy.request import RequestContext
from gateway.protocol import job_parameters
from gateway.protocol.problems import Problem
from ledger import accounting, mechanism
from ledger.audit import append_entry
from ledger.budget import (
    BudgetExceeded,
    budget_fit,
    filter_orders,
    find_idempotent_job,
    reserve_budget,
)
from ledger.canonical import canonical_json
from ledger.fixed_sql import Statement, execute
from ledger.metering import reserve_compute
from ledger.models import Dataset, Job, JobReview
from ledger.ranges import ADAPTIVE_DEFAULTS, CLIP_STRATEGIES
from ledger.review import open_review
from ledger.row_objects import fetch_row_object, row_object
from ledger.states import BudgetState, JobState

MAX_ROUNDS = int(mechanism.RANGES["rounds"].high)
NO_MODEL = "sha256:" + "0" * 64  # estimates do not need an uploaded model


def mechanism_problem(error: mechanism.MechanismParameterInvalid) -> Problem:
    """The ``invalid-request`` problem for a parameter outside its admissible range."""
    return Problem("invalid-request", f"{error.message}; the admissible range of {error.field} "
                   f"is {error.admissible}", field=error.field, admissible=error.admissible)


@dataclass(frozen=True)
class JobRequest(OptimizerChoice):
    """A researcher's training request, validated field by field.

    Its fields besides ``model_digest`` and ``idempotency_key`` are the parameters of
    ``gateway.protocol.job_parameters`` with their defaults and required set
    (``tests/test_job_parameters.py`` compares them); the table also generates the OpenAPI
    schema, the CLI options and ``docs/job-parameters.md``. The optimizer fields are
    ``engine.job.OptimizerChoice``'s, shared with the job file.

    The optimizers are a closed choice by name (``engine.job.CLIENT_OPTIMIZERS``,
    ``SERVER_OPTIMIZERS``) with range-checked hyperparameters; the defaults (client sgd,
    server sgdm with momentum 0) are the training fedgate always did. They do not enter the
    privacy cost: local training is clipped before the noise, the server step comes after it.
    """

    dataset: str
    model_digest: str
    rounds: int
    clients_per_round: float
    noise_multiplier: float
    clip: float
    client_learning_rate: float = 0.1
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0
    local_epochs: int = 1
    batch_size: int = 16
    evaluate: bool = True
    clip_strategy: str = "fixed"
    clipped_count_stddev: float | None = None
    target_unclipped_quantile: float = ADAPTIVE_DEFAULTS["target_unclipped_quantile"]
    clip_learning_rate: float = ADAPTIVE_DEFAULTS["clip_learning_rate"]
    idempotency_key: str | None = None

    @classmethod
    def from_json(cls, data: Any, *, needs_model: bool = True) -> JobRequest:
        """Validate a request body; an estimate (``needs_model=False``) may omit the model."""
        if not isinstance(data, dict):
            raise Problem("invalid-request", "the body must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise Problem("invalid-request", f"unknown fields: {', '.join(unknown)}")
        if not needs_model:
            data = {"model_digest": NO_MODEL, **data}
        missing = [n for n in ("model_digest", *job_parameters.REQUIRED) if n not in data]
        if missing:
            raise Problem("invalid-request", f"missing fields: {', '.join(missing)}")
        request = cls(**data)
        request._check()
        return request

    def _check(self) -> None:
        def need(ok: bool, field: str, what: str) -> None:
            if not ok:
                raise Problem("invalid-request", f"{field} must be {what}", field=field)

        def finite(value: object) -> bool:
            return (isinstance(value, int | float) and not isinstance(value, bool)
                    and math.isfinite(value))

        need(isinstance(self.dataset, str) and 0 < len(self.dataset) <= 128, "dataset",
             "a dataset name")
        need(isinstance(self.model_digest, str)
             and re.fullmatch(r"sha256:[0-9a-f]{64}", self.model_digest) is not None,
             "model_digest", "'sha256:' + 64 lowercase hex digits")
        need(finite(self.clients_per_round) and self.clients_per_round >= 1,
             "clients_per_round", "a number ≥ 1")
        self.mechanism()
        need(finite(self.server_momentum) and 0 <= self.server_momentum < 1, "server_momentum",
             "a number in [0, 1)")
        need(isinstance(self.evaluate, bool), "evaluate", "true or false")
        need(isinstance(self.clip_strategy, str) and self.clip_strategy in CLIP_STRATEGIES,
             "clip_strategy", "one of " + ", ".join(CLIP_STRATEGIES))
        need(self.clip_strategy == "adaptive" or (
            self.clipped_count_stddev is None
            and self.target_unclipped_quantile == ADAPTIVE_DEFAULTS["target_unclipped_quantile"]
            and self.clip_learning_rate == ADAPTIVE_DEFAULTS["clip_learning_rate"]),
            "clip_strategy", "adaptive for clipped_count_stddev, target_unclipped_quantile and "
            "clip_learning_rate to apply")
        self.adaptive_clipping()
        need(self.idempotency_key is None or (isinstance(self.idempotency_key, str)
             and 0 < len(self.idempotency_key) <= 128), "idempotency_key", "a short string")
        self.optimizers()

    def mechanism(self) -> mechanism.TrainingMechanism:
        """The training parameters checked against the float32 ranges both gateway and engine
        enforce (``ledger.mechanism``); raises ``invalid-request`` naming the range."""
        try:
            return mechanism.validate_training_mechanism(
                clip=self.clip, noise_multiplier=self.noise_multiplier, rounds=self.rounds,
                local_epochs=self.local_epochs, batch_size=self.batch_size,
                client_learning_rate=self.client_learning_rate,
                server_learning_rate=self.server_learning_rate)
        except mechanism.MechanismParameterInvalid as error:
            raise mechanism_problem(error) from None

    def count_stddev(self) -> float | None:
        """σ_b of the clipped-count query (adaptive clipping): the request's, else TFF's
        default of 5 % of the expected clients per round; None for a fixed clip."""
        if self.clip_strategy != "adaptive":
            return None
        if self.clipped_count_stddev is not None:
            return self.clipped_count_stddev
        return ADAPTIVE_DEFAULTS["count_stddev_fraction"] * float(self.clients_per_round)

    def adaptive_clipping(self) -> mechanism.AdaptiveClipping | None:
        """Adaptive clipping's parameters checked by the validator the engine runs too
        (``ledger.mechanism.validate_adaptive_clipping``); None for a fixed clip."""
        if self.clip_strategy != "adaptive":
            return None
        try:
            return mechanism.validate_adaptive_clipping(
                clip=self.clip, noise_multiplier=self.noise_multiplier,
                clipped_count_stddev=self.count_stddev(),
                target_unclipped_quantile=self.target_unclipped_quantile,
                clip_learning_rate=self.clip_learning_rate)
        except mechanism.MechanismParameterInvalid as error:
            raise mechanism_problem(error) from None

    def optimizers(self) -> dict[str, Any]:
        """The optimizer fields with the chosen optimizers' defaults filled in and the
        hyperparameters they do not take left out; raises ``invalid-request`` (with the
        allowed names when a name is unknown)."""
        chosen: dict[str, Any] = {}
        for side in ("client", "server"):
            given = {name.removeprefix(f"{side}_"): getattr(self, name)
                     for name in OPTIMIZER_FIELDS
                     if name.startswith(f"{side}_") and name != f"{side}_optimizer"}
            try:
                resolved = optimizer_hyperparameters(side, getattr(self, f"{side}_optimizer"),
                                                     given)
            except OptimizerInvalid as error:
                extra = {"allowed": list(error.allowed)} if error.allowed else {}
                raise Problem("invalid-request", error.reason, field=error.field,
                              **extra) from None
            chosen[f"{side}_optimizer"] = getattr(self, f"{side}_optimizer")
            chosen.update({f"{side}_{key}": value for key, value in resolved.items()})
        return chosen

    def spec(self) -> dict[str, Any]:
        """The DP and training parameters, as recorded in the audit log and the signed release
        manifest: the optimizers with exactly the hyperparameters they use. A new dict each
        call, computed once per request (its values are numbers and strings)."""
        return dict(self._spec)

    @functools.cached_property
    def _spec(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}  # flat: no asdict copies
        data.pop("idempotency_key")
        for name in (*OPTIMIZER_FIELDS, *ADAPTIVE_FIELDS):
            data.pop(name)
        if self.clip_strategy == "adaptive":  # a fixed clip's spec is what it always was
            data.update(clipped_count_stddev=self.count_stddev(),
                        target_unclipped_quantile=self.target_unclipped_quantile,
                        clip_learning_rate=self.clip_learning_rate)
        else:
            data.pop("clip_strategy")
        return {**data, **self.optimizers()}


@dataclass(frozen=True)
class Projection:
    """A job's privacy cost on a dataset, before anything is reserved."""

    dataset: Dataset
    sampling_rate: float
    cost: accounting.JobCost
    cost_rdp: tuple[float, ...]
    epsilon: float
    delta: float


def sampling_rate(dataset: Dataset, clients_per_round: float) -> float:
    """q = clients_per_round / N̂: the researcher's expected clients per round against the
    dataset's *public* user count N̂ (``ledger.public_count``), never the exact count, so no
    ε, refusal or bound depends on private data. Refuses an expectation above N̂ (q > 1)."""
    if clients_per_round > dataset.public_users:
        raise Problem(
            "invalid-request",
            f"clients_per_round {clients_per_round:g} exceeds the public user count "
            f"N̂ = {dataset.public_users} of {dataset.name}; use at most {dataset.public_users}",
            field="clients_per_round",
        )
    return float(clients_per_round) / float(dataset.public_users)


def project_cost(node: Node, dataset: Dataset, request: JobRequest) -> Projection:
    """Privacy cost of ``request`` on ``dataset`` (pure apart from reading config): a function
    of the request's public parameters and N̂ only (memoised on exactly those)."""
    q = sampling_rate(dataset, request.clients_per_round)
    cost, cost_rdp, epsilon = _projected(_cost_inputs(node, q, request),
                                         filter_orders(dataset), float(dataset.delta))
    return Projection(dataset, q, cost, cost_rdp, epsilon, dataset.delta)


_CostInputs = tuple[float, float, int, "float | None", "float | None"]


def _cost_inputs(node: Node, sampling_rate: float, request: JobRequest) -> _CostInputs:
    """Everything a job's privacy cost depends on: q, z, T, the DP evaluation's z (None
    without it) and σ_b of adaptive clipping (None for a fixed clip); public, hashable."""
    return (sampling_rate, float(request.noise_multiplier), int(request.rounds),
            node.config.evaluation_noise_multiplier if request.evaluate else None,
            request.count_stddev())


def _cost(inputs: _CostInputs) -> accounting.JobCost:
    q, noise_multiplier, rounds, evaluation_noise_multiplier, clipped_count_stddev = inputs
    return accounting.JobCost.for_job(
        sampling_rate=q, noise_multiplier=noise_multiplier, rounds=rounds,
        evaluation_noise_multiplier=evaluation_noise_multiplier,
        clipped_count_stddev=clipped_count_stddev)


@functools.lru_cache(maxsize=1024)
def _projected(inputs: _CostInputs, orders: tuple[float, ...], delta: float,
               ) -> tuple[accounting.JobCost, tuple[float, ...], float]:
    """The job's cost, its RDP at the filter's ``orders`` and its ε at ``delta``."""
    cost = _cost(inputs)
    return cost, cost.rdp(orders), cost.epsilon(delta)


def _suggestion(node: Node, dataset: Dataset, request: JobRequest) -> str:
    """What to change so the job fits now: fewer rounds, or more noise (bisection).

    Each probe computes only the filter's RDP vector (memoised per noise level), never ε, so a
    refusal costs a few dp-accounting calls rather than dozens (found by the soak benchmark)."""
    q = sampling_rate(dataset, request.clients_per_round)
    orders = filter_orders(dataset)

    def fits(**change: Any) -> bool:
        changed = JobRequest(**{**asdict(request), **change})
        return budget_fit(dataset, _cost(_cost_inputs(node, q, changed)).rdp(orders)).fits

    if not fits(rounds=1):
        hint = "even one round does not fit"
    else:
        low, high = 1, request.rounds
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(rounds=mid) else (low, mid)
        hint = f"lower rounds to ≤ {low}"
    z_high = request.noise_multiplier
    for _ in range(12):
        z_high *= 2
        if fits(noise_multiplier=z_high):
            z_low = request.noise_multiplier
            for _ in range(30):
                mid = (z_low + z_high) / 2
                z_low, z_high = (z_low, mid) if fits(noise_multiplier=mid) else (mid, z_high)
            return f"{hint} or raise noise_multiplier to ≥ {math.ceil(z_high * 100) / 100:.2f}"
    return f"{hint}; no noise level makes this job fit the remaining budget"


def node_quotas(node: Node, principal: VerifiedRequest, dataset: Dataset) -> tuple[Quota, ...]:
    """The node's own caps as quotas, checked like the owner's (``gateway.node.quotas``):
    ``[engine] max_jobs_per_researcher`` admitted, unfinished jobs per researcher on this node."""
    limit = node.config.max_jobs_per_researcher
    if limit is None:
        return ()
    return (Quota(name="max_concurrent_jobs", limit=limit, subject=principal.principal,
                  members=(principal.principal,), domain=dataset.owner, dataset_pattern="*",
                  rule="[engine] max_jobs_per_researcher"),)


def _audit_fields(
    principal: VerifiedRequest, request: JobRequest, request_digest: str, node: Node
) -> dict[str, Any]:
    return {
        "actor": principal.key_id,
        "principal": principal.principal,
        "request_action": "train",
        "dataset": request.dataset,
        "request_digest": request_digest,
        "model_digest": request.model_digest,
        "parameters": request.spec(),
        **node.config.engine_audit_fields,
    }


def _deny(node: Node, audit: dict[str, Any], problem: Problem, *, nonce: PendingNonce | None,
          **extra: Any) -> Problem:
    """Audit the refusal, with the rule that decided it (a policy row's cells, a quota's rule)
    when the problem names one, and return it. A pending ``nonce`` is recorded in the same
    write: a replayed request is refused as ``replayed-nonce`` (raised) and audits nothing."""
    decided_by = {"rule": problem.extra["rule"]} if "rule" in problem.extra else {}
    fields = {**audit, **decided_by, **extra, "reason": problem.slug, "explanation": problem.detail}
    # Group-committed with concurrent admissions; the refusal is answered after its commit.
    run_recording(nonce, node.writer,
                  lambda s: append_entry(s, action="deny", decision="deny", **fields),
                  on_connection=True)
    return problem


def not_visible(name: str) -> Problem:
    """The refusal for a dataset that does not exist *or* that no rule grants to the caller:
    one answer for both, so a caller without a grant cannot learn which names exist (a deny
    rule or a violated constraint of a granted dataset still says why, as policy-denied)."""
    return Problem("unknown-dataset", f"no dataset {name!r} visible to this key")


_DATASET_ROW = Statement("SELECT * FROM dataset WHERE name = ?")


def _load_dataset(reads: Connection, name: str) -> Dataset | None:
    """The dataset row ``name`` in ``reads``' snapshot, as a ``Dataset`` held by no session."""
    return fetch_row_object(Dataset, execute(reads, _DATASET_ROW, (name,)))


def check_model(node: Node, dataset: Dataset, request: JobRequest) -> None:
    """The uploaded artifact exists, fits the dataset's schema (data-only checks), the engine
    trains every one of its layers (``engine.functional_model.vectorizable``, pure) and the
    job fits the node's memory and time limits (:func:`check_resources`)."""
    digest = request.model_digest
    try:
        artifact = _uploaded_artifact(node, digest)
    except OSError:
        artifact = None
    if artifact is None:
        raise Problem("unknown-model", f"no model {digest}; upload it to /v1/models first")
    if artifact.summary is None:
        raise Problem("model-rejected", str(artifact.rejected))
    try:
        summary = check_fits_dataset(artifact.summary, num_features=dataset.num_features,
                                     num_classes=dataset.num_classes)
    except ModelRejected as exc:
        raise Problem("model-rejected", str(exc)) from None
    if artifact.unsupported is not None:
        raise Problem("model-rejected", f"the engine cannot train this model: "
                                        f"{artifact.unsupported}")
    check_resources(node, dataset, request, summary)


@dataclass(frozen=True)
class UploadedArtifact:
    """What admission reads of an uploaded model file: its structure (``summary``, or why
    ``validate_artifact_structure`` rejected it), its size in bytes, and the first layer the
    engine cannot train (``vectorizable``), if any. Pure functions of the file's bytes."""

    summary: ModelSummary | None
    rejected: str | None
    size: int
    unsupported: str | None


def _uploaded_artifact(node: Node, digest: str) -> UploadedArtifact | None:
    """The artifact stored for ``digest``, None if there is none; raises ``OSError`` if it
    cannot be read. Parsed once per version of the file (path, mtime, size, inode): every
    admission of the same model reuses the checks of its bytes."""
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        return None
    path = node.deployment.models_dir / (digest.removeprefix("sha256:") + ".json")
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return _artifact_file(str(path), st.st_mtime_ns, st.st_size, st.st_ino)


@functools.lru_cache(maxsize=256)
def _artifact_file(path: str, _mtime_ns: int, _size: int, _inode: int) -> UploadedArtifact:
    """The checks of the file at ``path`` as it is at (mtime, size, inode): the cache key.
    Raises ``OSError`` (not cached) if it cannot be read."""
    raw = Path(path).read_bytes()
    try:
        doc = parse_artifact(raw)
        summary = validate_artifact_structure(doc)
    except ModelRejected as exc:
        return UploadedArtifact(None, str(exc), len(raw), None)
    return UploadedArtifact(summary, None, len(raw), vectorizable(doc["config"]))


def _memory_inputs(dataset: Dataset, request: JobRequest, summary: ModelSummary
                   ) -> dict[str, int]:
    return memory.model_inputs(summary, cap=dataset.max_examples_per_user,
                               local_epochs=request.local_epochs, batch_size=request.batch_size)


def _compute_inputs(dataset: Dataset, request: JobRequest, summary: ModelSummary
                    ) -> dict[str, Any]:
    return {"forward_flops": summary.forward_flops, "cap": dataset.max_examples_per_user,
            "local_epochs": request.local_epochs,
            "clients_per_round": float(request.clients_per_round)}


def _resource_refusal(node: Node, dataset: Dataset, request: JobRequest, summary: ModelSummary,
                      needed: MemoryEstimate, time_needed: ComputeEstimate) -> Problem | None:
    """``job-too-large`` when the estimates exceed the node's ``memory_bytes`` (with the
    largest clients_per_round that fits) or ``job_timeout_seconds`` (with the most rounds)."""
    limit = node.config.sandbox_limits.memory_bytes
    if needed.bytes > limit:
        most = memory.max_clients_per_round(limit, **_memory_inputs(dataset, request, summary))
        fix = (f"lower clients_per_round to ≤ {most:g}" if most >= 1 else
               "even one client per round does not fit: use a smaller model or batch_size")
        return Problem(
            "job-too-large",
            f"the engine would need about {needed.bytes / 2**30:.1f} GiB "
            f"({needed.per_user_bytes / 2**20:.2f} MiB per sampled user, "
            f"{needed.users_in_flight} users in flight) but this node allows "
            f"{limit / 2**30:.1f} GiB per job; {fix}",
            field="clients_per_round")
    time_limit = node.config.job_timeout_seconds
    if time_needed.seconds > time_limit:
        rounds = compute.max_rounds(time_limit, **_compute_inputs(dataset, request, summary))
        fix = (f"lower rounds to ≤ {rounds}" if rounds >= 1 else
               "even one round does not fit: lower clients_per_round or local_epochs")
        return Problem(
            "job-too-large",
            f"training would take about {time_needed.seconds / 60:,.0f} min "
            f"({time_needed.flops:.3g} FLOPs over {request.rounds} rounds) but jobs on this "
            f"node may run {time_limit / 60:,.0f} min; {fix}", field="rounds")
    return None


def check_resources(node: Node, dataset: Dataset, request: JobRequest,
                    summary: ModelSummary) -> tuple[MemoryEstimate, ComputeEstimate]:
    """The job's memory and time estimates (``engine.memory``, ``engine.compute``: public
    inputs only — the architecture, the owner's cap, batch, epochs, rounds, clients per round);
    raises :func:`_resource_refusal`'s ``job-too-large`` when they exceed the node's limits."""
    needed = memory.job_memory(**_memory_inputs(dataset, request, summary),
                               clients_per_round=float(request.clients_per_round))
    time_needed = compute.job_compute(**_compute_inputs(dataset, request, summary),
                                      rounds=request.rounds)
    refusal = _resource_refusal(node, dataset, request, summary, needed, time_needed)
    if refusal is not None:
        raise refusal
    return needed, time_needed


def _stored_model(node: Node, digest: str) -> tuple[ModelSummary, int] | None:
    """Structure summary and size of an uploaded artifact; ``None`` if it cannot be read or
    its structure is rejected."""
    try:
        artifact = _uploaded_artifact(node, digest)
    except OSError:
        return None
    if artifact is None or artifact.summary is None:
        return None
    return artifact.summary, artifact.size


def projected_once(node: Node, dataset: Dataset, request: JobRequest) -> Callable[[], Projection]:
    """:func:`project_cost` of ``request``, computed on first use and then remembered: a
    request's policy fact ``epsilon`` and its reservation use the same projection."""
    return functools.cache(lambda: project_cost(node, dataset, request))


def decide_policy(
    node: Node, principal: VerifiedRequest, dataset: Dataset, action: str, request: JobRequest,
    *, policy: PolicyEngine, projected: Callable[[], Projection], reads: Connection,
) -> PolicyDecision:
    """The owner policy's decision on ``request`` in the dataset owner's domain.

    ``policy`` is the engine the caller took once for the whole request (``Node.policy``),
    ``projected`` the request's cost projection (:func:`projected_once`) and ``reads`` the
    request's read connection (``node.read_engine``), in whose snapshot ``dataset`` was read:
    the ledger facts below are read in it too, one snapshot instead of one per fact.

    The request's parameters are stated as they are; the facts that cost something (the
    projected ε, the model's family and size, the researcher's ε in a window, the jobs that
    ran before) are computed only when a matching constraint or obligation reads them. A fact
    that cannot be computed (an unknown model, more clients than users) stays unstated, which
    denies a ``train`` request whose constraints need it and holds it for review if a review
    condition needs it (``gateway.policy`` contract).
    """
    now = dt.datetime.now(dt.UTC)
    asked = {"subject": principal.principal, "domain": dataset.owner, "dataset": dataset.name,
             "action": action}
    needs = policy.facts_read(**asked)
    facts: dict[str, Any] = {}
    if "epsilon" in needs:
        with contextlib.suppress(Problem):
            facts["epsilon"] = projected().epsilon
    if needs & {"model_family", "model_bytes", "model_parameters"}:
        stored = _stored_model(node, request.model_digest)
        if stored is not None:
            summary, size = stored
            facts.update(model_family=summary.family, model_bytes=size,
                         model_parameters=summary.parameter_count)
    if "researcher_committed_jobs" in needs:
        with Session(bind=reads) as s:
            facts["researcher_committed_jobs"] = researcher_committed_jobs(
                s, researcher=principal.principal, dataset=dataset.name)
    if "dataset_model_families" in needs:
        with Session(bind=reads) as s:
            digests = committed_model_digests(s, dataset=dataset.name)
        # A model that can no longer be read counts as unseen: more reviews, never fewer.
        facts["dataset_model_families"] = frozenset(
            stored[0].family for digest in sorted(digests)
            if (stored := _stored_model(node, digest)) is not None)

    def epsilon_spent(window: dt.timedelta) -> float:
        return researcher_epsilon_spent(reads, researcher=principal.principal,
                                        dataset=dataset.name, since=now - window)

    context = RequestContext(
        now=now, rounds=request.rounds, noise_multiplier=float(request.noise_multiplier),
        clients_per_round=float(request.clients_per_round),
        researcher_epsilon_spent=epsilon_spent, **facts,
    )
    return policy.decide(**asked, context=context)


@dataclass(frozen=True)
class Admitted:
    """An admitted job, with what its admission wrote: ``new`` is False when an earlier request
    with the same idempotency key admitted it (``review`` is then not known here)."""

    job: Job
    review: JobReview | None
    new: bool


def admit_job(
    node: Node, principal: VerifiedRequest, request: JobRequest, request_digest: str, *,
    nonce: PendingNonce | None = None,
) -> Job:
    """:func:`admit`'s job."""
    return admit(node, principal, request, request_digest, nonce=nonce).job


def admit(
    node: Node, principal: VerifiedRequest, request: JobRequest, request_digest: str, *,
    nonce: PendingNonce | None = None,
) -> Admitted:
    """Admit ``request`` and reserve its budget, or raise the ``Problem`` that refused it.

    The admitted job is ``queued``, or ``pending_review`` when the policy holds it for the
    owner's review; either way its budget is reserved in the same transaction as the
    ``admit`` entry (and the review's ``requested`` entry), so held jobs count against the
    privacy filter for every later admission (``ledger.review``). The same transaction
    reserves the job's CPU and checks the owner's compute quotas (``gateway.node.quotas``): a job
    over a quota is refused with ``quota-exceeded`` and nothing stays reserved.

    A pending ``nonce`` (``gateway.node.nonces``) is recorded in the write of the decision,
    the reservation's savepoint or the refusal's: a replay of an admitted request is refused
    as ``replayed-nonce`` and reserves nothing.
    """
    audit = _audit_fields(principal, request, request_digest, node)
    if principal.role != "researcher":
        raise _deny(node, audit, Problem("policy-denied", "only researchers may submit jobs"),
                    nonce=nonce)
    # One engine for the whole request, its decision and its quotas; taken before the read
    # snapshot below is opened, so a rebuild never waits for a connection while holding one.
    policy = node.policy()
    # The dataset and the policy's ledger facts from one read snapshot, released before any
    # write: the privacy filter itself is decided in the reservation's transaction.
    with node.read_engine.connect() as reads, reads.begin():
        dataset = _load_dataset(reads, request.dataset)
        if dataset is not None:
            projected = projected_once(node, dataset, request)
            decision = decide_policy(node, principal, dataset, "train", request, policy=policy,
                                     projected=projected, reads=reads)
    if dataset is None:
        raise _deny(node, audit, not_visible(request.dataset), nonce=nonce)
    audit["policy_version"] = decision.policy_version
    if not decision.allowed:
        refusal = Problem("policy-denied", decision.explanation, rule=list(decision.rule or []))
        _deny(node, audit, refusal, nonce=nonce)  # the audit keeps the policy's reason
        raise not_visible(request.dataset) if decision.rule is None else refusal
    try:
        check_model(node, dataset, request)
        projection = projected()
    except Problem as problem:
        raise _deny(node, audit, problem, nonce=nonce) from None
    audit.update(epsilon=projection.epsilon, delta=projection.delta,
                 policy_explanation=decision.explanation)
    if decision.review is not None:
        audit["review"] = decision.review
    # Compute quotas are checked in the reservation transaction below (``gateway.node.quotas``);
    # every job reserves the node's per-job CPU limit, at which the engine's meter stops it.
    quotas = policy.quotas(subject=principal.principal, domain=dataset.owner,
                           dataset=dataset.name) + node_quotas(node, principal, dataset)
    cpu_reserved = float(node.config.sandbox_limits.cpu_seconds)
    now = time.time()
    job = row_object(Job, dict(
        id="job-" + uuid.uuid4().hex[:16],
        dataset=dataset.name,
        researcher_key_id=principal.key_id,
        researcher=principal.principal,
        idempotency_key=request.idempotency_key,
        request_digest=request_digest,
        model_digest=request.model_digest,
        spec=canonical_json(request.spec()).decode(),
        cost=json.dumps(projection.cost.to_json()),
        cost_rdp="[]",
        epsilon=projection.epsilon,
        delta=projection.delta,
        state=JobState.QUEUED if decision.review is None else JobState.PENDING_REVIEW,
        budget_state=BudgetState.RESERVED,
        rounds=request.rounds,
        policy_version=decision.policy_version,
        created_at=now,
        updated_at=now,
    ))

    def reserve(s: Connection) -> Admitted:
        existing = find_idempotent_job(s, principal.key_id, request.idempotency_key)
        if existing is not None:
            if existing.request_digest != request_digest:
                raise Problem("invalid-request", "idempotency_key was already used for a "
                              "different request; use a new key", field="idempotency_key")
            return Admitted(existing, None, new=False)
        reserved = reserve_budget(s, job, projection.cost_rdp, audit)
        reserve_compute(s, reserved, cpu_reserved)
        review = None
        if decision.review is not None:
            review = open_review(s, reserved, required_because=decision.review,
                                 policy_explanation=decision.explanation,
                                 expires_at=now + node.config.review_expiry_hours * 3600.0,
                                 actor=principal.key_id)
        enforce_quotas(s, quotas, job=reserved, cpu_reserved_seconds=cpu_reserved,
                       prices=node.config.billing, default_reservation=cpu_reserved)
        return Admitted(reserved, review, new=True)

    try:
        # Decided in turn with concurrent admissions, in one transaction sharing one commit
        # (``ledger.group_commit``); returns only once the reservation is on disk.
        return run_recording(nonce, node.writer, reserve, datasets=(dataset.name,),
                             on_connection=True)
    except QuotaExceeded as exc:
        raise _deny(node, audit, exc.problem, nonce=nonce) from None
    except BudgetExceeded as exc:
        problem = Problem(
            "budget-exceeded",
            f"projected ε {projection.epsilon:.3g} (δ {projection.delta:g}) does not fit the "
            f"remaining privacy budget of dataset {dataset.name}; "
            f"{_suggestion(node, dataset, request)}",
            epsilon=projection.epsilon,
            delta=projection.delta,
            more_jobs_that_fit=exc.more_jobs_that_fit,
        )
        raise _deny(node, audit, problem, nonce=nonce, rule=f"privacy filter of {dataset.name}: ε_total "
                    f"{dataset.epsilon_total:g}, δ {dataset.delta:g}") from None


def dataset_for_estimate(node: Node, principal: VerifiedRequest, request: JobRequest) -> Dataset:
    """The requested dataset, if the policy lets this principal estimate on it."""
    policy = node.policy()
    with node.read_engine.connect() as reads, reads.begin():
        dataset = _load_dataset(reads, request.dataset)
        if dataset is None:
            raise not_visible(request.dataset)
        decision = decide_policy(node, principal, dataset, "estimate", request, policy=policy,
                                 projected=projected_once(node, dataset, request), reads=reads)
    if not decision.allowed:
        if decision.rule is None:
            raise not_visible(request.dataset)
        raise Problem("policy-denied", decision.explanation, rule=list(decision.rule))
    return dataset


def estimate_job(node: Node, principal: VerifiedRequest, request: JobRequest) -> dict[str, Any]:
    """Dry run: the job's ε/δ, whether it fits now, how many such jobs fit, and — when the node
    has a price list — its projected cost (``gateway.node.billing.project_cost``: an upper bound of
    the CPU, per-job and ε items at the CPU the job would reserve). Charges nothing."""
    dataset = dataset_for_estimate(node, principal, request)
    projection = project_cost(node, dataset, request)
    fit = budget_fit(dataset, projection.cost_rdp)
    result: dict[str, Any] = {
        "dataset": dataset.name,
        "epsilon": projection.epsilon,
        "delta": projection.delta,
        "accountant": "rdp",
        "fits": fit.fits,
        "jobs_that_fit": fit.jobs_that_fit,
    }
    if not fit.fits:
        result["suggestion"] = _suggestion(node, dataset, request)
    if request.model_digest != NO_MODEL:
        result.update(_resources_report(node, dataset, request))
    if node.config.billing is not None:
        result["cost"] = billing.project_cost(
            node.config.billing, cpu_reserved_seconds=float(node.config.sandbox_limits.cpu_seconds),
            epsilon=projection.epsilon).to_json()
    return result


def _resources_report(node: Node, dataset: Dataset, request: JobRequest) -> dict[str, Any]:
    """The estimate's ``memory`` and ``compute`` members: the engine's expected peak memory
    and training time against the node's limits, and whether the job fits them
    (``resources_problem`` says what to change when it does not)."""
    stored = _stored_model(node, request.model_digest)
    if stored is None:
        raise Problem("unknown-model", f"no model {request.model_digest}; upload it to "
                      "/v1/models first")
    summary = stored[0]
    needed = memory.job_memory(**_memory_inputs(dataset, request, summary),
                               clients_per_round=float(request.clients_per_round))
    time_needed = compute.job_compute(**_compute_inputs(dataset, request, summary),
                                      rounds=request.rounds)
    refusal = _resource_refusal(node, dataset, request, summary, needed, time_needed)
    report: dict[str, Any] = {
        "memory": {**needed.to_json(), "limit_bytes": node.config.sandbox_limits.memory_bytes},
        "compute": {**time_needed.to_json(), "limit_seconds": node.config.job_timeout_seconds},
        "resources_fit": refusal is None}
    if refusal is not None:
        report["resources_problem"] = refusal.detail
    return report


CALIBRATABLE = ("noise_multiplier", "rounds")


def calibrate_job(node: Node, principal: VerifiedRequest, body: Any) -> dict[str, Any]:
    """Given ``target_epsilon``, the smallest noise multiplier or the largest number of rounds
    (``solve_for``) whose *training* ε meets the target; reports the whole job's ε (training
    and DP evaluation, parallel composition) and whether it fits the filter. Charges nothing.
    """
    if not isinstance(body, dict):
        raise Problem("invalid-request", "the body must be a JSON object")
    body = dict(body)
    solve_for = body.pop("solve_for", None)
    target = body.pop("target_epsilon", None)
    if solve_for not in CALIBRATABLE:
        raise Problem("invalid-request", f"solve_for must be one of {CALIBRATABLE}",
                      field="solve_for")
    if not isinstance(target, int | float) or isinstance(target, bool) or not (
        math.isfinite(target) and target > 0
    ):
        raise Problem("invalid-request", "target_epsilon must be a number > 0",
                      field="target_epsilon")
    body[solve_for] = 1
    request = JobRequest.from_json(body, needs_model=False)
    dataset = dataset_for_estimate(node, principal, request)
    q = sampling_rate(dataset, request.clients_per_round)
    if solve_for == "noise_multiplier":
        value: float | int = accounting.calibrate_noise_multiplier(
            target_epsilon=float(target), sampling_rate=q, rounds=request.rounds,
            delta=dataset.delta)
    else:
        value = min(MAX_ROUNDS, accounting.calibrate_rounds(
            target_epsilon=float(target), sampling_rate=q,
            noise_multiplier=float(request.noise_multiplier), delta=dataset.delta))
        if value == 0:
            raise Problem("invalid-request", f"even one round exceeds ε {target:g} at "
                          f"noise_multiplier {request.noise_multiplier:g}; raise it",
                          field="noise_multiplier")
    solved = JobRequest(**{**asdict(request), solve_for: value})
    solved.mechanism()  # the solution must itself be admissible (e.g. z ≥ the float32 floor)
    projection = project_cost(node, dataset, solved)
    fit = budget_fit(dataset, projection.cost_rdp)
    return {"dataset": dataset.name, solve_for: value, "epsilon": projection.epsilon,
            "delta": projection.delta, "fits": fit.fits, "jobs_that_fit": fit.jobs_that_fit}
