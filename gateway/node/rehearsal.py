"""Rehearsal: run the exact job a researcher would submit, locally, on the dataset's mock data.

Nothing here touches the node's budget or audit log: the node is asked only for the dataset
listing, the public mock data and a free estimate (``POST /v1/estimate``), none of which
reserves, charges or records anything. What runs locally is what the node would run:

* the same artifact bytes, validated against the dataset's schema by the node's check
  (``engine.artifact.validate_artifact``) — a refusal here is the refusal the node would give;
* the same parameters with the node's defaults filled in (``gateway.node.admission.JobRequest``),
  turned into job.json by the node's builder (``gateway.node.jobs.engine_job_document``);
* the same engine (``engine.launcher.run_job`` → ``engine.runner``: TFF DP-FedAvg, DP
  evaluation) on the mock table imported with the node's importer
  (``engine.datastore.import_dataset``), then the node's release gate
  (``gateway.node.release.gate_engine_output``).

Differences, all because the mock is small and public: the mock's users are split for
evaluation with a fixed public key, so rehearsals repeat exactly; ``clients_per_round`` is
capped at the mock's training users (so a round processes as many clients as on the node
when the mock has enough users, which makes the time per round comparable); DP evaluation
uses the default node settings; and the engine runs without the bubblewrap sandbox
(``sandbox = "none"``) on the researcher's machine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import secrets
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any, Protocol, TypeVar

from engine.artifact import ModelRejected, artifact_digest, parse_artifact, validate_artifact
from engine.datastore import import_dataset
from engine.launcher import run_job
from engine.sandbox import SandboxSettings
from gateway.node.admission import JobRequest
from gateway.node.jobs import engine_job_document
from gateway.node.release import ReleaseRefused, gate_engine_output, read_engine_output
from gateway.protocol.problems import Problem
from ledger.accounting import JobCost
from ledger.canonical import canonical_json


class Client(Protocol):
    """What a rehearsal asks of the node (``gateway.sdk.client.Client`` provides it): the free
    estimate, the dataset listing and the public mock data."""

    def estimate(self, dataset: str, **parameters: Any) -> dict[str, Any]: ...

    def datasets(self) -> list[dict[str, Any]]: ...

    def mock_data(self, dataset: str, path: str | Path) -> Path: ...

# The defaults of a node's [engine] evaluation settings; they only change the noise on the
# mock's DP metrics, never shapes, validation or timing.
MOCK_EVALUATION_NOISE_MULTIPLIER = 10.0
MOCK_EVALUATION_LOSS_CLIP = 5.0
ENGINE_LOG_TAIL_LINES = 40
# What TensorFlow prints at every start-up on a machine without a GPU or TensorRT (the
# ``E … Unable to register cuDNN/cuFFT/cuBLAS factory`` lines among them): it says nothing about
# the job, so the researcher's view of a failed rehearsal's engine log leaves it out and keeps
# every other line, TensorFlow's real errors included.
TENSORFLOW_STARTUP_NOISE = re.compile(
    r"Unable to register cu(?:DNN|FFT|BLAS) factory|Could not find cuda drivers"
    r"|TF-TRT Warning: Could not find TensorRT|oneDNN custom operations are on"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|^To enable the following instructions: .*rebuild TensorFlow")
# The mock is public, so its training/evaluation split needs no secret key; a fixed one makes
# every rehearsal of a dataset use the same split.
MOCK_SPLIT_KEY = b"fedgate-rehearsal-split"

T = TypeVar("T")


@dataclass(frozen=True)
class RehearsalReport:
    """What a rehearsal found. ``ok`` iff the artifact passed validation, the engine trained
    and evaluated on the mock, and its output passed the release gate.

    ``refusal`` is the validation refusal the node would give (the engine did not run);
    ``failure`` says how the engine run failed, with ``engine_log`` (the runner's report on
    mock data, safe to show). ``round_seconds`` holds each round's wall time (the first
    includes reading the data and tracing); ``seconds_per_round`` is the mean of the later
    rounds (of the only round if there is one). ``metrics`` are the DP evaluation metrics on
    the mock's held-out users: they show that evaluation runs, but on a small mock the noise
    dominates them and they say nothing about the real data. ``epsilon``/``delta`` are what
    the job would cost on the node, ``fits``/``jobs_that_fit`` whether it fits the budget now.
    """

    dataset: str
    ok: bool
    epsilon: float
    delta: float
    fits: bool
    jobs_that_fit: int
    rounds: int
    mock_training_users: int = 0
    clients_per_round: float = 0.0
    refusal: str | None = None
    failure: str | None = None
    round_seconds: tuple[float, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    engine_log: str = ""

    @property
    def seconds_per_round(self) -> float | None:
        later = self.round_seconds[1:] or self.round_seconds
        return sum(later) / len(later) if later else None

    def summary(self) -> str:
        cost = (f"ε {self.epsilon:.3f} at δ {self.delta:g} on the node (fits now: "
                f"{'yes' if self.fits else 'no'})")
        if self.refusal is not None:
            return f"refused by validation: {self.refusal}; the job would cost {cost}"
        if self.failure is not None:
            return f"failed on the mock data: {self.failure}; the job would cost {cost}"
        return (f"ok: {self.rounds} rounds on {self.mock_training_users} mock users "
                f"({self.clients_per_round:g} expected clients per round), "
                f"{self.seconds_per_round:.2f} s per round; the job would cost {cost}")


def _run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to completion, also from code already inside an event loop
    (a notebook): then in a thread with a loop of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def rehearse(client: Client, artifact: dict[str, Any], dataset: str, parameters: dict[str, Any],
             *, workdir: Path | None = None, timeout_s: float = 3600.0) -> RehearsalReport:
    """Rehearse the job ``(artifact, dataset, parameters)`` on the mock data (module contract).

    Raises the node's refusal (``FedgateError``) if the parameters are invalid or the policy
    does not let this key estimate on ``dataset``; every other finding is in the report.
    """
    estimate = client.estimate(dataset, **parameters)
    listing = next((d for d in client.datasets() if d["name"] == dataset), None)
    if listing is None:
        raise ValueError(f"dataset {dataset!r} is not visible to this key")
    body = canonical_json(artifact)  # the bytes Client.upload_model would send
    try:
        spec = JobRequest.from_json({"dataset": dataset, "model_digest": artifact_digest(body),
                                     **parameters}).spec()
    except Problem as problem:  # the estimate accepted them, so only a bad field type is left
        raise ValueError(problem.detail) from None
    report = RehearsalReport(dataset=dataset, ok=False, epsilon=estimate["epsilon"],
                             delta=estimate["delta"], fits=estimate["fits"],
                             jobs_that_fit=estimate["jobs_that_fit"], rounds=spec["rounds"])
    try:
        validate_artifact(parse_artifact(body), num_features=listing["num_features"],
                          num_classes=listing["num_classes"])
    except ModelRejected as exc:
        return replace(report, refusal=str(exc))
    with tempfile.TemporaryDirectory(prefix="fedgate-rehearsal-", dir=workdir) as tmp:
        return _run_on_mock(client, Path(tmp), report, listing, body, spec, timeout_s)


def engine_log_tail(log: str) -> str:
    """The last ``ENGINE_LOG_TAIL_LINES`` lines of a rehearsal's engine log that are not
    TensorFlow's start-up noise (``TENSORFLOW_STARTUP_NOISE``)."""
    lines = [line for line in log.splitlines() if not TENSORFLOW_STARTUP_NOISE.search(line)]
    return "\n".join(lines[-ENGINE_LOG_TAIL_LINES:])


def _run_on_mock(client: Client, root: Path, report: RehearsalReport, listing: dict[str, Any],
                 body: bytes, spec: dict[str, Any], timeout_s: float) -> RehearsalReport:
    mock = client.mock_data(report.dataset, root / "mock.parquet")
    schema = import_dataset(mock, root / "dataset", name=report.dataset,
                            user_column=listing["user_id_column"],
                            label_column=listing["label_column"],
                            feature_columns=listing["feature_columns"],
                            split_key=MOCK_SPLIT_KEY,
                            num_classes=listing["num_classes"])
    users = schema.partitions["training"].users
    clients = min(float(spec["clients_per_round"]), float(users))
    model_path = root / "model.json"
    model_path.write_bytes(body)
    job_dir = root / "job"
    job_dir.mkdir()
    cost = JobCost.for_job(  # mock data: nothing is charged, but job.json has one source
        sampling_rate=clients / float(users), noise_multiplier=float(spec["noise_multiplier"]),
        rounds=int(spec["rounds"]),
        evaluation_noise_multiplier=MOCK_EVALUATION_NOISE_MULTIPLIER if spec["evaluate"] else None)
    document = engine_job_document(
        job_id=f"rehearsal-{secrets.token_hex(8)}", dataset_dir=root / "dataset",
        model_path=model_path.resolve(), spec={**spec, "clients_per_round": clients},
        cost=cost, evaluation_loss_clip=MOCK_EVALUATION_LOSS_CLIP,
        max_examples_per_user=listing.get("max_examples_per_user"))
    (job_dir / "job.json").write_bytes(canonical_json(document))

    marks: list[float] = []

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] in ("data_access", "round"):
            marks.append(time.monotonic())

    log_path = root / "engine.log"
    outcome = _run_sync(run_job(job_dir, on_event=on_event, timeout_s=timeout_s,
                                stderr_log=log_path, sandbox=SandboxSettings(mode="none")))
    rounds = tuple(b - a for a, b in pairwise(marks))
    report = replace(report, mock_training_users=users, clients_per_round=clients,
                     round_seconds=rounds)
    if not outcome.succeeded or outcome.release_path is None:
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        return replace(report, failure=outcome.failure or "engine failed",
                       engine_log=engine_log_tail(log))
    try:
        _, metrics = gate_engine_output(read_engine_output(outcome.release_path),
                                        parse_artifact(body)["weights"])
    except (ReleaseRefused, ValueError, KeyError) as exc:
        return replace(report, failure=f"the output failed the node's release gate: {exc}")
    return replace(report, ok=True, metrics=metrics)
