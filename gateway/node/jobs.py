"""Running admitted jobs in the engine and settling their budget.

Contract for every job, whatever happens:

* the engine runs in a separate process (its own process group), never in the gateway;
* ``data_accessed`` is recorded as soon as the engine reports it (and re-checked from the
  engine's on-disk marker at the end), because it decides the budget outcome;
* success → release gate → ``charge`` + ``release`` audit entries and the commit, in one
  transaction, *before* the release becomes fetchable;
* failure → ``charge`` if data access began, else ``refund``; the researcher sees a
  generic failure, the engine's stderr stays in the owner's local log;
* either way the job's metering (and, with a price list, its ``bill`` entry and charge) is
  written in that same settlement transaction (``gateway.node.billing.settle_usage``); the engine
  is stopped once its processes used the job's CPU reservation (``engine.meter``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from engine.job import OPTIMIZER_FIELDS
from engine.launcher import JobOutcome, run_job
from engine.meter import read_counts
from engine.sandbox import SandboxSettings
from gateway.node.billing import settle_usage
from gateway.node.decision_log import log_settled
from gateway.node.node import Node
from gateway.node.release import (
    ReleaseRefused,
    build_release,
    gate_engine_output,
    read_engine_output,
)
from gateway.node.scheduler import FairQueue
from gateway.protocol.job_states import RESEARCHER_CANCELLED
from gateway.protocol.release import manifest_digest
from ledger.accounting import JobCost, clipped_count_stddev_of, training_event
from ledger.audit import append_entry
from ledger.budget import commit_budget, refund_budget
from ledger.canonical import canonical_json
from ledger.models import Dataset, Job, JobMeter
from ledger.review import any_approved_job, claim_approved_jobs
from ledger.states import ENDED_JOB_STATES, JobState

log = logging.getLogger("fedgate.jobs")


class ChargedMechanismMismatch(ValueError):
    """The admitted spec and the stored cost events disagree: the job must not start."""


def engine_job_document(*, job_id: str, dataset_dir: Path, model_path: Path,
                        spec: Mapping[str, Any], cost: JobCost, evaluation_loss_clip: float,
                        max_examples_per_user: int | None,
                        memory_limit_bytes: int | None = None) -> dict[str, Any]:
    """The engine's job.json (``engine.job.JobSpec``) for an admitted job: every noise
    parameter comes from ``cost``, the job's stored (charged) cost events, never from live
    configuration.

    Pure, and the one place a job becomes engine parameters, so a rehearsal on mock data
    (``gateway.node.rehearsal``) runs exactly what the node would. From the charged events: the
    sampling rate q, the noise multiplier z and the rounds T of training, and the evaluation's
    noise multiplier (present iff DP evaluation was charged), and adaptive clipping's
    clipped-count noise σ_b. From the admitted spec: the clip (adaptive: the initial clip, its
    target quantile and learning rate, post-processing),
    the optimizers, local work, and the public normaliser ``clients_per_round`` (= q × N̂). The
    charged events travel along as ``charged_cost``; the runner refuses to read data unless
    the mechanism it runs rebuilds exactly that event (``JobSpec.check_charged``). From the
    node: ``memory_limit_bytes``, which the runner checks its memory estimate against before
    it reads data (``engine.memory``).

    Raises :class:`ChargedMechanismMismatch` when the spec's z, T or evaluation choice differs
    from the charged event (a corrupted row: refused before anything runs).
    """
    sampled = cost.training.event
    q = float(sampled.sampling_probability)
    z = float(spec["noise_multiplier"])  # adaptive: the effective z of the charged pair
    rounds = int(cost.training.count)
    count_stddev = clipped_count_stddev_of(sampled.event)
    adaptive = spec.get("clip_strategy", "fixed") == "adaptive"
    rebuilt = training_event(sampling_rate=q, noise_multiplier=z, rounds=rounds,
                             clipped_count_stddev=count_stddev)
    if (rebuilt != cost.training or adaptive != (count_stddev is not None)
            or bool(spec["evaluate"]) != (cost.evaluation is not None)):
        raise ChargedMechanismMismatch(f"job {job_id}: the admitted parameters differ from the "
                                       "charged DP event")
    clipping = ({"clip_strategy": "adaptive", "clipped_count_stddev": count_stddev,
                 "target_unclipped_quantile": float(spec["target_unclipped_quantile"]),
                 "clip_learning_rate": float(spec["clip_learning_rate"])} if adaptive else {})
    return {
        "job_id": job_id,
        "dataset_dir": str(Path(dataset_dir).resolve()),
        "model_path": str(model_path),
        "rounds": rounds,
        "sampling_rate": q,
        "expected_clients_per_round": float(spec["clients_per_round"]),
        "noise_multiplier": z,
        "clip": float(spec["clip"]),
        "client_learning_rate": float(spec["client_learning_rate"]),
        "server_learning_rate": float(spec["server_learning_rate"]),
        "server_momentum": float(spec.get("server_momentum", 0.0)),
        **{name: spec[name] for name in OPTIMIZER_FIELDS
           if name in spec and name != "server_momentum"},
        "local_epochs": int(spec["local_epochs"]),
        "batch_size": int(spec["batch_size"]),
        "max_examples_per_user": max_examples_per_user,
        "memory_limit_bytes": memory_limit_bytes,
        "evaluation": (
            None if cost.evaluation is None else
            {"noise_multiplier": float(cost.evaluation.noise_multiplier),
             "loss_clip": evaluation_loss_clip}
        ),
        "charged_cost": cost.to_json(),
        **clipping,
    }


def write_job_directory(node: Node, job: Job, dataset: Dataset) -> Path:
    """Create the engine's working directory with its job.json, built from the job's stored
    cost events (``engine_job_document``)."""
    job_dir = node.deployment.jobs_dir / job.id
    job_dir.mkdir(parents=True, exist_ok=False)
    document = engine_job_document(
        job_id=job.id,
        dataset_dir=Path(dataset.path),
        model_path=node.deployment.models_dir / (job.model_digest.removeprefix("sha256:") + ".json"),
        spec=json.loads(job.spec),
        cost=JobCost.from_json(json.loads(job.cost)),
        evaluation_loss_clip=node.config.evaluation_loss_clip,
        max_examples_per_user=dataset.max_examples_per_user,
        memory_limit_bytes=node.config.sandbox_limits.memory_bytes,
    )
    (job_dir / "job.json").write_text(json.dumps(document, indent=2))
    return job_dir


class JobRunner:
    """Starts engine processes for admitted jobs and settles them when they end; at most
    ``[engine] max_concurrent_jobs`` run at once, the others wait in a ``FairQueue``
    (``gateway.node.scheduler``: round robin across researchers)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._waiting = FairQueue()

    def start(self, job: Job) -> None:
        """Run ``job`` now if the node has a free slot, else queue it."""
        if job.id in self._tasks or job.id in self._waiting:
            return
        self._waiting.push(job.researcher, job.id)
        self._start_waiting()

    def queue_position(self, job_id: str) -> int | None:
        """1 if ``job_id`` starts next, …; ``None`` when it is not waiting for a slot."""
        return self._waiting.position(job_id)

    def _start_waiting(self) -> None:
        capacity = self.node.config.max_concurrent_jobs
        while capacity is None or len(self._tasks) < capacity:
            job_id = self._waiting.pop()
            if job_id is None:
                return
            task = asyncio.create_task(self._run(job_id), name=job_id)
            self._tasks[job_id] = task
            task.add_done_callback(lambda _, job_id=job_id: self._ended(job_id))

    def _ended(self, job_id: str) -> None:
        self._tasks.pop(job_id, None)
        self._start_waiting()

    async def start_approved(self) -> list[str]:
        """Claim the jobs the owner approved (``approved`` → ``queued``, ``ledger.review``)
        and start them; returns their ids. Their budget has been reserved since admission."""

        def claim() -> list[Job]:
            # Polled every second: a read first, so that a node with nothing approved takes no
            # write lock (on SQLite it would wait for, then hold up, the admissions' writer).
            with self.node.read_session() as s:
                if not any_approved_job(s):
                    return []
            with self.node.session() as s, s.begin():
                return claim_approved_jobs(s)

        jobs = await run_in_threadpool(claim)
        for job in jobs:
            self.start(job)
        return [job.id for job in jobs]

    async def cancel(self, job_id: str) -> None:
        """Stop a job at the researcher's request and settle it (charged if data was read)."""
        self._waiting.remove(job_id)
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        marker = self.node.deployment.jobs_dir / job_id / "data_access"
        await run_in_threadpool(self._settle_failure, job_id, RESEARCHER_CANCELLED,
                                marker.exists())

    async def shutdown(self) -> None:
        self._waiting = FairQueue()  # waiting jobs are settled at the next start-up
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    def _update(self, job_id: str, **changes: Any) -> None:
        with self.node.session() as s, s.begin():
            job = s.get(Job, job_id, with_for_update=True)
            if job is None:
                return
            for name, value in changes.items():
                setattr(job, name, value)
            job.updated_at = time.time()
            s.add(job)

    async def _run(self, job_id: str) -> None:
        try:
            with self.node.session() as s:
                job = s.get(Job, job_id)
                dataset = s.get(Dataset, job.dataset) if job else None
            if job is None or dataset is None:
                return
            try:
                job_dir = await run_in_threadpool(write_job_directory, self.node, job, dataset)
            except ChargedMechanismMismatch as exc:
                log.error("%s", exc)
                await run_in_threadpool(self._settle_failure, job_id, "refused before data "
                                        "access: parameters differ from the charged event", False)
                return
            await run_in_threadpool(self._update, job_id, state=JobState.RUNNING)

            async def on_event(event: dict[str, Any]) -> None:
                if event["event"] == "data_access":
                    await run_in_threadpool(self._update, job_id, data_accessed=True)
                elif event["event"] == "round":
                    await run_in_threadpool(self._update, job_id, round=int(event["round"]))

            cpu_reserved = await run_in_threadpool(self._cpu_reservation, job_id)
            outcome = await run_job(
                job_dir,
                on_event=on_event,
                timeout_s=self.node.config.job_timeout_seconds,
                stderr_log=self.node.deployment.engine_log,
                sandbox=_with_cpu_limit(self.node.config.sandbox_settings, cpu_reserved),
                cpu_limit_s=cpu_reserved,
            )
            await run_in_threadpool(self._settle, job_id, outcome)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: gateway-side failure", job_id)
            await run_in_threadpool(self._settle_failure, job_id, "internal error", None)
        finally:
            self._tasks.pop(job_id, None)

    def _cpu_reservation(self, job_id: str) -> float:
        """The CPU seconds reserved for the job at admission (``ledger.metering``), else the
        node's per-process CPU limit."""
        with self.node.session() as s:
            meter = s.get(JobMeter, job_id)
        default = float(self.node.config.sandbox_limits.cpu_seconds)
        return meter.cpu_reserved_seconds if meter is not None else default

    def _settle_usage(self, s: Session, job: Job, outcome: JobOutcome | None, *,
                      bytes_released: int, succeeded: bool) -> None:
        settle_usage(s, job=job, usage=outcome.usage if outcome is not None else None,
                     client_updates=read_counts(self.node.deployment.jobs_dir / job.id),
                     bytes_released=bytes_released, succeeded=succeeded,
                     cpu_reserved_seconds=float(self.node.config.sandbox_limits.cpu_seconds),
                     prices=self.node.config.billing, actor=self.node.node_key_id,
                     now=time.time())

    def _settle(self, job_id: str, outcome: JobOutcome) -> None:
        if not outcome.succeeded or outcome.release_path is None:
            self._settle_failure(job_id, outcome.failure or "engine failed", outcome.data_accessed,
                                 outcome)
            return
        with self.node.session() as s:
            job = s.get(Job, job_id)
        assert job is not None
        model_path = self.node.deployment.models_dir / (job.model_digest.removeprefix("sha256:")
                                                        + ".json")
        try:
            weights, metrics = gate_engine_output(
                read_engine_output(outcome.release_path), json.loads(model_path.read_bytes())["weights"]
            )
        except (ReleaseRefused, ValueError, KeyError) as exc:
            log.error("job %s: release refused: %s", job_id, exc)
            self._settle_failure(job_id, "the engine output failed the release gate", True,
                                 outcome)
            return
        release = build_release(job=job, weights=weights, metrics=metrics,
                                node_key=self.node.node_key, node_key_id=self.node.node_key_id)
        release_text = canonical_json(release).decode()
        with self.node.session() as s, s.begin():
            commit_budget(s, job_id, reason="released", actor=self.node.node_key_id)
            append_entry(
                s,
                action="release",
                actor=self.node.node_key_id,
                job_id=job_id,
                dataset=job.dataset,
                epsilon=job.epsilon,
                delta=job.delta,
                release_manifest_digest=manifest_digest(release["manifest"]),
                **self.node.config.engine_audit_fields,
            )
            row = s.get(Job, job_id, with_for_update=True)
            assert row is not None
            row.state = JobState.SUCCEEDED
            row.data_accessed = True
            row.round = row.rounds
            row.release = release_text
            row.updated_at = time.time()
            s.add(row)
            self._settle_usage(s, row, outcome, bytes_released=len(release_text.encode()),
                               succeeded=True)
        log_settled(row)  # after the commit: the audit log holds the release

    def _settle_failure(self, job_id: str, failure: str, data_accessed: bool | None,
                        outcome: JobOutcome | None = None) -> None:
        """Fail a job: charge it if it read data (engine marker or DB flag), else refund;
        record what it used (``outcome``'s metering; None: not measured)."""
        with self.node.session() as s, s.begin():
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.state in ENDED_JOB_STATES:
                return
            accessed = bool(data_accessed) or job.data_accessed
            job.data_accessed = accessed
            job.state = JobState.FAILED
            job.failure = failure
            job.updated_at = time.time()
            s.add(job)
            s.flush()
            if accessed:
                commit_budget(s, job_id, reason=f"failed after data access: {failure}",
                              actor=self.node.node_key_id)
            else:
                refund_budget(s, job_id, reason=f"failed before data access: {failure}",
                              actor=self.node.node_key_id)
            self._settle_usage(s, job, outcome, bytes_released=0, succeeded=False)
        log_settled(job)  # after the commit: the audit log holds the charge or refund


def _with_cpu_limit(settings: SandboxSettings, cpu_seconds: float) -> SandboxSettings:
    """``settings`` with each process's RLIMIT_CPU at most the job's CPU reservation (a
    backstop: the meter stops the job once all its processes together used it)."""
    limit = max(1, min(settings.limits.cpu_seconds, math.ceil(cpu_seconds)))
    return replace(settings, limits=replace(settings.limits, cpu_seconds=limit))


def recover_interrupted_jobs(node: Node) -> list[str]:
    """On start-up, settle jobs a previous gateway process left queued or running.

    No engine survives its gateway (each runs in a process group the launcher kills),
    so such jobs are failed: charged if data access had begun (DB flag or the engine's
    on-disk marker), refunded otherwise. Returns the ids settled.
    """
    from sqlmodel import select

    with node.session() as s:
        stale = s.exec(select(Job).where(Job.state.in_((JobState.QUEUED, JobState.RUNNING)))).all()  # type: ignore[attr-defined]  # reviewed: ORM query, not exec
    runner = JobRunner(node)
    for job in stale:
        marker = node.deployment.jobs_dir / job.id / "data_access"
        runner._settle_failure(job.id, "interrupted by a gateway restart", marker.exists())
    return [job.id for job in stale]
