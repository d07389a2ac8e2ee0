"""The federation coordinator: trains one model across several fedgate nodes.

The coordinator is an ordinary signed client (the researcher's process, or a coordinating
node using the same RFC 9421 signed requests): it has no access to any node's data, ledger
or key. A federation of K outer rounds runs, at each node, K ordinary fedgate jobs:

1. **Admission.** Each node is asked, with free estimates, whether the whole federation fits
   its privacy filter (K copies of the local job) and what it costs there (one job of K·T
   rounds, the exact composition: ``gateway.federation.core.federation_cost_rounds``). The first
   real submission then applies the node's policy to a ``train`` request. A node that
   refuses (unreachable, unknown key, policy, budget, model) is excluded and the reason is
   kept; the federation runs only if at least ``min_nodes`` admitted it.
2. **Outer round k.** The current global model is uploaded to every participating node and
   an ordinary job is submitted there: T rounds of DP-FedAvg over that node's users with the
   node's clipping, noise, policy and ledger; DP evaluation off. Each node releases only its
   signed DP weights; the coordinator verifies the node's signature, the weights' digest
   and that the release names the model it uploaded, then aggregates
   (``gateway.federation.core.aggregate``, post-processing) into the next global model.
3. **Failures.** A node whose job fails, whose release does not verify, that becomes
   unreachable or refuses a later round is dropped if ``allow_dropout``, else the federation
   stops after the round. What a node released or read is charged by its own ledger under
   the single-node rule (charged once the job read user data, refunded before).
4. **Manifest.** Every round's contributions (each node's signed release manifest) and the
   digests that chain the rounds are listed in a federation manifest signed by the
   coordinator's key (``gateway.federation.core.verify_federation_manifest`` checks it).

Privacy: every value the coordinator receives from a node is that node's DP release (or a
refusal, a rounded user count, an ε estimate); what it computes from them is post-processing.
Each node's guarantee is the user-level (ε, δ) of its own jobs under its own filter.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from engine.artifact import (
    artifact_from_keras,
    decode_array,
    encode_array,
    parse_artifact,
    validate_artifact_structure,
)
from gateway.federation.core import (
    FEDERATION_FORMAT,
    Aggregation,
    FederationNode,
    aggregate,
    contribution,
    federation_cost_rounds,
    local_job_parameters,
    model_digest,
    sign_federation_manifest,
)
from gateway.protocol.problems import TYPE_PREFIX
from gateway.sdk.client import (
    AuthenticationFailed,
    Client,
    FedgateError,
    Job,
    JobFailed,
    NodeUnreachable,
    Release,
    ReleaseVerificationFailed,
)
from ledger import keys
from ledger.states import BudgetState, JobState
from ledger.timestamps import utc_timestamp

Progress = Callable[[str], None]


class FederationError(Exception):
    """The federation did not complete; ``admissions`` says which nodes took part and why not."""

    def __init__(self, message: str, admissions: Sequence[Admission],
                 result: FederationResult | None = None) -> None:
        super().__init__(message)
        self.admissions = list(admissions)
        self.result = result


class FederationRefused(FederationError):
    """Fewer than ``min_nodes`` nodes admitted the federation; nothing was trained.

    Round-1 jobs already admitted by some nodes were cancelled (refunded by those nodes if
    they had not yet read user data)."""


class FederationStopped(FederationError):
    """A node failed and dropout was not allowed (or too few nodes remained). ``result`` holds
    the signed manifest of the rounds that ran and the last complete global model."""


@dataclass
class Admission:
    """One row of the admission table the researcher sees."""

    node: str
    admitted: bool
    reason: str | None = None  # why not, in the node's words (problem type and detail)
    problem_type: str | None = None
    epsilon_per_round: float | None = None  # ε of one outer round's job at this node
    epsilon_federation: float | None = None  # ε of all K jobs at this node (exact composition)
    delta: float | None = None
    rounds_that_fit: int | None = None
    public_users: int | None = None


@dataclass
class NodeOutcome:
    """What a node did in the federation and what its own ledger charged for it."""

    node: str
    admitted: bool
    contributions: int = 0
    job_ids: list[str] = field(default_factory=list)
    charged_jobs: int = 0  # jobs the node charged (released, or failed after reading data)
    epsilon_charged: float | None = None  # ε of those jobs composed, from the node's estimate
    delta: float | None = None
    dropped_at_round: int | None = None
    drop_reason: str | None = None


@dataclass
class FederationResult:
    status: str  # "completed" or "stopped"
    artifact: dict[str, Any]  # the global model (keras-json-v1) after the last complete round
    document: dict[str, Any]  # the signed federation manifest
    admissions: list[Admission]
    outcomes: list[NodeOutcome]

    @property
    def manifest(self) -> dict[str, Any]:
        return self.document["manifest"]


class _Participant:
    """A node during one federation: its client, its job parameters and its current job."""

    def __init__(self, node: FederationNode, key: Ed25519PrivateKey, job: dict[str, Any],
                 timeout: float) -> None:
        self.node = node
        self.client = Client(node.url, key=key, node_public_key=node.node_key, timeout=timeout)
        self.parameters = local_job_parameters(job, node.overrides)
        self.admission = Admission(node=node.name, admitted=False)
        self.outcome = NodeOutcome(node=node.name, admitted=False)
        self.job: Job | None = None
        self.active = False

    def refuse(self, exc: BaseException) -> None:
        self.admission.admitted = False
        self.admission.problem_type, self.admission.reason = _describe(exc)


class _Refused(Exception):
    """A node refused or failed for a reason the coordinator found itself."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _describe(exc: BaseException) -> tuple[str, str]:
    """(short problem type, human reason) for a node's refusal or failure."""
    if isinstance(exc, AuthenticationFailed):
        return exc.type.removeprefix(TYPE_PREFIX), f"the node does not accept your key: {exc}"
    if isinstance(exc, NodeUnreachable):
        return "unreachable", f"the node could not be reached: {exc}"
    if isinstance(exc, FedgateError):
        return exc.type.removeprefix(TYPE_PREFIX) or "refused", str(exc)
    if isinstance(exc, httpx.HTTPError):
        return "unreachable", f"the node could not be reached: {type(exc).__name__}"
    kinds = {JobFailed: "job-failed", ReleaseVerificationFailed: "release-unverified",
             TimeoutError: "timeout"}
    if isinstance(exc, _Refused):
        return exc.kind, str(exc)
    for cls, kind in kinds.items():
        if isinstance(exc, cls):
            return kind, str(exc)
    return "error", f"{type(exc).__name__}: {exc}"


def _artifact(model_or_artifact: Any) -> dict[str, Any]:
    if isinstance(model_or_artifact, bytes):
        artifact = parse_artifact(model_or_artifact)
    elif isinstance(model_or_artifact, dict):
        artifact = model_or_artifact
    else:
        artifact = artifact_from_keras(model_or_artifact)
    validate_artifact_structure(artifact)
    return artifact


def _with_weights(artifact: dict[str, Any], weights: Sequence[Any]) -> dict[str, Any]:
    return {"format": artifact["format"], "config": artifact["config"],
            "weights": [encode_array(w) for w in weights]}


def _cancel(p: _Participant) -> None:
    """Cancel the node's current job, best effort (the node settles it by its own rule)."""
    if p.job is not None:
        with contextlib.suppress(FedgateError, httpx.HTTPError):
            p.job.cancel()


def _in_parallel(function: Callable[[_Participant], Any], participants: Sequence[_Participant]) -> None:
    if not participants:
        return
    with ThreadPoolExecutor(max_workers=len(participants)) as pool:
        list(pool.map(function, participants))


class Federation:
    """A federation job over ``nodes``, coordinated with the researcher's ``key``.

    ``job`` holds the local job of each outer round (``rounds`` = T local rounds,
    ``clients_per_round``, ``noise_multiplier``, ``clip`` and optional training parameters;
    a node entry may override ``clients_per_round``). DP evaluation at the nodes is off (the
    coordinator evaluates on data of its own); see docs/federation.md.
    """

    def __init__(self, nodes: Sequence[FederationNode], *, key: Ed25519PrivateKey | str | Path,
                 outer_rounds: int, job: dict[str, Any], min_nodes: int = 1,
                 allow_dropout: bool = False, aggregation: Aggregation | None = None,
                 job_timeout_seconds: float = 3600.0, http_timeout_seconds: float = 60.0,
                 progress: Progress | None = None) -> None:
        if not nodes:
            raise ValueError("a federation needs at least one node")
        if not isinstance(outer_rounds, int) or outer_rounds < 1:
            raise ValueError("outer_rounds must be an integer ≥ 1")
        if not isinstance(min_nodes, int) or not 1 <= min_nodes <= len(nodes):
            raise ValueError(f"min_nodes must be in 1..{len(nodes)}")
        self.key = key if isinstance(key, Ed25519PrivateKey) else keys.load_private_key(Path(key))
        self.outer_rounds = outer_rounds
        self.job = dict(job)
        self.local_rounds = int(local_job_parameters(self.job)["rounds"])
        self.min_nodes = min_nodes
        self.allow_dropout = allow_dropout
        self.aggregation = aggregation or Aggregation()
        self.job_timeout = job_timeout_seconds
        self.participants = [_Participant(n, self.key, self.job, http_timeout_seconds)
                             for n in nodes]
        self.federation_id = "fed-" + uuid.uuid4().hex[:16]
        self._say = progress or (lambda _message: None)

    # --- admission ---------------------------------------------------------------------

    def _estimate(self, p: _Participant) -> None:
        """Free checks: the dataset is visible, K jobs fit, and the federation's ε there."""
        try:
            visible = {d["name"]: d for d in p.client.datasets()}
            dataset = visible.get(p.node.dataset)
            if dataset is None:
                raise _Refused("dataset-not-visible",
                               f"dataset {p.node.dataset!r} is not visible to your key on this "
                               "node (unknown, or the owner's policy does not let you use it)")
            p.admission.public_users = int(dataset["public_users"])
            per_round = p.client.estimate(p.node.dataset, **p.parameters)
            p.admission.epsilon_per_round = float(per_round["epsilon"])
            p.admission.delta = float(per_round["delta"])
            p.admission.rounds_that_fit = int(per_round["jobs_that_fit"])
            if per_round["jobs_that_fit"] < self.outer_rounds:
                raise _Refused(
                    "budget-exceeded", f"only {per_round['jobs_that_fit']} of the {self.outer_rounds} outer "
                    f"rounds fit the remaining privacy budget of {p.node.dataset} (ε "
                    f"{per_round['epsilon']:.3g} per round); lower outer_rounds or rounds, or "
                    "raise noise_multiplier")
            p.admission.epsilon_federation = self._composed_epsilon(p, self.outer_rounds)
            p.admission.admitted = True
        except Exception as exc:  # every failure excludes the node; the reason is shown
            p.refuse(exc)

    def _composed_epsilon(self, p: _Participant, jobs: int) -> float | None:
        """ε at this node of ``jobs`` outer-round jobs composed, from the node's own estimate of
        the equivalent single job (None if the node's policy refuses to estimate that job)."""
        if jobs == 0:
            return 0.0
        rounds = federation_cost_rounds(outer_rounds=jobs, local_rounds=self.local_rounds)
        try:
            return float(p.client.estimate(p.node.dataset, **{**p.parameters, "rounds": rounds})
                         ["epsilon"])
        except (FedgateError, httpx.HTTPError):
            return None

    def _submit(self, p: _Participant, artifact: dict[str, Any], round_number: int) -> None:
        """Upload the global model and submit this round's job; the node's policy, model
        checks and filter apply as to any job."""
        digest = p.client.upload_model(artifact)
        if digest != model_digest(artifact):
            raise _Refused("digest-mismatch", "the node stored the model under a different digest")
        p.job = p.client.submit(p.node.dataset, digest, **p.parameters,
                                idempotency_key=f"{self.federation_id}/{round_number}")
        p.outcome.job_ids.append(p.job.id)

    # --- rounds ------------------------------------------------------------------------

    def _run_job(self, p: _Participant) -> tuple[Release, str]:
        """Wait for the node's job; return its verified release and the node's signature."""
        assert p.job is not None
        try:
            status = p.job.wait(progress=False, timeout_seconds=self.job_timeout)
        except TimeoutError:
            _cancel(p)  # charged by the node if it had read data, refunded otherwise
            raise
        if status["state"] != JobState.SUCCEEDED:
            raise JobFailed(f"job {p.job.id} failed: {status.get('failure')}")
        # Fetched once (an output policy may allow one fetch), keeping the node's signature for
        # the federation manifest.
        return p.job.signed_result()

    def _check_release(self, p: _Participant, release: Release, digest: str,
                       template: Sequence[Any]) -> None:
        """Fail closed on a release that is not the job the coordinator asked for."""
        m = release.manifest
        expected = {"model_digest": digest, "dataset": p.node.dataset,
                    "node_key_id": keys.key_id(p.client.node_public_key)}
        for name, value in expected.items():
            if m.get(name) != value:
                raise _Refused("release-mismatch",
                               f"the release names {name} {m.get(name)!r}, expected {value!r}")
        if [w.shape for w in release.weights] != [w.shape for w in template]:
            raise _Refused("release-mismatch", "the released weights do not have the global model's shapes")

    def run(self, model_or_artifact: Any) -> FederationResult:
        """Run the federation; return the final model and the signed manifest.

        Raises ``FederationRefused`` if fewer than ``min_nodes`` admit it, and
        ``FederationStopped`` (with the partial result) if it cannot finish.
        """
        try:
            return self._run(model_or_artifact)
        finally:
            for p in self.participants:
                p.client.close()

    def _run(self, model_or_artifact: Any) -> FederationResult:
        artifact = _artifact(model_or_artifact)
        initial_digest = model_digest(artifact)
        created_at = utc_timestamp()
        self._say(f"federation {self.federation_id}: {len(self.participants)} nodes, "
                  f"{self.outer_rounds} outer rounds of {self.local_rounds} local rounds")
        _in_parallel(self._estimate, self.participants)
        candidates = [p for p in self.participants if p.admission.admitted]
        if len(candidates) < self.min_nodes:
            raise FederationRefused(self._too_few("estimates", candidates), self.admissions())

        def first_submission(p: _Participant) -> None:
            try:
                self._submit(p, artifact, 1)
                p.active = p.outcome.admitted = True
            except Exception as exc:
                p.refuse(exc)

        _in_parallel(first_submission, candidates)
        active = [p for p in candidates if p.active]
        if len(active) < self.min_nodes:
            _in_parallel(_cancel, active)
            raise FederationRefused(self._too_few("first submission", active), self.admissions())
        for p in self.participants:
            mark = "admitted" if p.active else f"excluded: {p.admission.reason}"
            self._say(f"  {p.node.name}: {mark}")

        rounds: list[dict[str, Any]] = []
        current, current_digest = artifact, initial_digest
        template = [decode_array(w) for w in artifact["weights"]]
        status = "completed"
        for k in range(1, self.outer_rounds + 1):
            record, released, failures = self._round(k, current, current_digest, template)
            rounds.append(record)
            for p, reason in failures:
                p.active = False
                p.outcome.dropped_at_round, p.outcome.drop_reason = k, reason
                record["dropped"].append({"node": p.node.name, "reason": reason})
                self._say(f"  round {k}: {p.node.name} dropped: {reason}")
            if (failures and not self.allow_dropout) or len(released) < self.min_nodes:
                status = "stopped"
                break
            weights = self.aggregation.node_weights(
                [p.admission.public_users or 0 for p, _ in released])
            next_weights = aggregate(template, [r.weights for _, r in released], weights,
                                     server_learning_rate=self.aggregation.server_learning_rate)
            current = _with_weights(artifact, next_weights)
            current_digest = model_digest(current)
            template = next_weights
            record["aggregate_model_digest"] = current_digest
            record["aggregation_weights"] = {
                p.node.name: w for (p, _), w in zip(released, weights, strict=True)}
            self._say(f"round {k}/{self.outer_rounds}: aggregated {len(released)} node "
                      f"release(s) into {current_digest[:19]}…")
        self._settle([p for p in self.participants if p.outcome.admitted])
        manifest = self._manifest(status, created_at, initial_digest, rounds, current_digest)
        result = FederationResult(status=status, artifact=current,
                                  document=sign_federation_manifest(manifest, self.key),
                                  admissions=self.admissions(), outcomes=self.outcomes())
        if status == "stopped":
            raise FederationStopped(f"federation {self.federation_id} stopped after round "
                                    f"{len(rounds)}: {self._stop_reason(rounds)}",
                                    result.admissions, result)
        return result

    def _round(self, k: int, artifact: dict[str, Any], digest: str, template: Sequence[Any]
               ) -> tuple[dict[str, Any], list[tuple[_Participant, Release]],
                          list[tuple[_Participant, str]]]:
        """Submit (after round 1) and wait for every active node in parallel."""
        outcomes: dict[str, Release | BaseException] = {}
        signatures: dict[str, str] = {}

        def work(p: _Participant) -> None:
            try:
                if k > 1:
                    self._submit(p, artifact, k)
                release, signature = self._run_job(p)
                self._check_release(p, release, digest, template)
                outcomes[p.node.name] = release
                signatures[p.node.name] = signature
            except Exception as exc:
                outcomes[p.node.name] = exc

        active = [p for p in self.participants if p.active]
        _in_parallel(work, active)
        released: list[tuple[_Participant, Release]] = []
        failures: list[tuple[_Participant, str]] = []
        contributions = []
        for p in active:
            outcome = outcomes[p.node.name]
            if isinstance(outcome, Release):
                released.append((p, outcome))
                p.outcome.contributions += 1
                contributions.append(contribution(p.node.name, {
                    "manifest": outcome.manifest, "signature": signatures[p.node.name]}))
                self._say(f"  round {k}: {p.node.name} released {outcome.job_id} "
                          f"(ε {outcome.epsilon:.3f}, node signature verified)")
            else:
                failures.append((p, ": ".join(_describe(outcome))))
        record = {"round": k, "model_digest": digest, "contributions": contributions,
                  "dropped": [], "aggregate_model_digest": None, "aggregation_weights": {}}
        return record, released, failures

    def _settle(self, participants: Sequence[_Participant]) -> None:
        """Ask each node what it charged for this federation's jobs, and the composed ε."""
        def settle(p: _Participant) -> None:
            charged = 0
            for job_id in p.outcome.job_ids:
                try:
                    job = Job(p.client, {"job_id": job_id, "rounds": 0, "state": "unknown"})
                    budget = job.status()["budget"]
                except (FedgateError, httpx.HTTPError):
                    budget = "unknown"
                charged += budget != BudgetState.REFUNDED  # unknown counts as charged: fail closed
            p.outcome.charged_jobs = charged
            p.outcome.delta = p.admission.delta
            p.outcome.epsilon_charged = (p.admission.epsilon_federation
                                         if charged == self.outer_rounds
                                         else self._composed_epsilon(p, charged))

        _in_parallel(settle, participants)

    # --- reporting ---------------------------------------------------------------------

    def _too_few(self, stage: str, admitted: Sequence[_Participant]) -> str:
        return (f"only {len(admitted)} of {len(self.participants)} nodes admitted the federation "
                f"({stage}); min_nodes is {self.min_nodes}")

    @staticmethod
    def _stop_reason(rounds: Sequence[dict[str, Any]]) -> str:
        dropped = rounds[-1]["dropped"] if rounds else []
        return "; ".join(f"{d['node']}: {d['reason']}" for d in dropped) or "too few nodes"

    def admissions(self) -> list[Admission]:
        return [p.admission for p in self.participants]

    def outcomes(self) -> list[NodeOutcome]:
        return [p.outcome for p in self.participants]

    def _manifest(self, status: str, created_at: str, initial_digest: str,
                  rounds: list[dict[str, Any]], final_digest: str) -> dict[str, Any]:
        nodes = [{
            "name": p.node.name, "url": p.node.url, "dataset": p.node.dataset,
            "node_key_id": keys.key_id(p.client.node_public_key),
            "admitted": p.outcome.admitted, "reason": p.admission.reason,
            "public_users": p.admission.public_users,
            "contributions": p.outcome.contributions, "job_ids": p.outcome.job_ids,
            "charged_jobs": p.outcome.charged_jobs, "epsilon_charged": p.outcome.epsilon_charged,
            "delta": p.outcome.delta, "dropped_at_round": p.outcome.dropped_at_round,
        } for p in self.participants]
        return {
            "format": FEDERATION_FORMAT,
            "federation_id": self.federation_id,
            "coordinator_key_id": keys.key_id(self.key.public_key()),
            "status": status,
            "parameters": {"outer_rounds": self.outer_rounds, "local_job": self.job,
                           "min_nodes": self.min_nodes, "allow_dropout": self.allow_dropout,
                           "node_evaluation": False},
            "aggregation": self.aggregation.to_json(),
            "nodes": nodes,
            "initial_model_digest": initial_digest,
            "rounds": rounds,
            "final_model_digest": final_digest,
            "created_at": created_at,
            "completed_at": utc_timestamp(),
        }


def federate(nodes: Sequence[FederationNode], model_or_artifact: Any, *,
             key: Ed25519PrivateKey | str | Path, outer_rounds: int, progress: Progress | None = None,
             **options: Any) -> FederationResult:
    """Train ``model_or_artifact`` (Keras model or keras-json-v1 artifact) across ``nodes``.

    ``options``: ``job`` (the local job of each outer round), ``min_nodes``,
    ``allow_dropout``, ``aggregation``, ``job_timeout_seconds``. See ``Federation``.
    """
    federation = Federation(nodes, key=key, outer_rounds=outer_rounds, progress=progress,
                            **options)
    return federation.run(model_or_artifact)

