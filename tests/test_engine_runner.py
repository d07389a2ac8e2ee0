"""The engine runner, run for real through the launcher in its default sandbox (bubblewrap,
seccomp, unprivileged uid; TensorFlow Federated, subprocesses).

A small job: 500-user Synthetic(1, 1) dataset, 60 → 10 softmax regression, 3 rounds of
DP-FedAvg with about 20 clients per round, DP evaluation on held-out users.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.artifact import decode_array, linear_classifier_artifact
from engine.datastore import generate_synthetic, import_dataset
from engine.job import DATA_ACCESS_MARKER, RELEASE_FILE
from engine.launcher import JobOutcome, run_job
from engine.sandbox import SANDBOX_ID
from tests.conftest import charged

pytestmark = pytest.mark.tff

ROUNDS = 3
CLIENTS_PER_ROUND = 20.0


@dataclass
class Process:
    pid: int
    name: str
    state: str
    group: int


def processes() -> list[Process]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        state, _, group = stat[stat.rindex(")") + 2:].split()[:3]
        found.append(Process(int(entry.name), name, state, int(group)))
    return found


def live_members(group: int) -> list[Process]:
    """Processes of a process group that still run (zombies hold no sockets or files)."""
    return [p for p in processes() if p.group == group and p.state != "Z"]


def credentials(pid: int) -> dict[str, str]:
    """The uid, capabilities and seccomp mode of a process, from the host's view."""
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    return {key: status[key].split()[0] for key in ("Uid", "CapEff", "NoNewPrivs", "Seccomp")}


def runner_pid(job_dir: Path) -> int | None:
    """The runner itself (the command lines of bwrap and of the meter around it name the
    runner too), if still running."""
    for entry in os.scandir("/proc"):
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry.name}/comm") as f:
                name = f.read().strip()
        except (OSError, ValueError):
            continue
        if (name != "bwrap" and b"engine.meter" not in argv and b"engine.runner" in argv
                and str(job_dir).encode() in argv):
            return int(entry.name)
    return None


@dataclass
class Run:
    job_dir: Path
    outcome: JobOutcome | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    group: int | None = None
    members_during_training: list[Process] = field(default_factory=list)
    worker_network_namespace: str | None = None
    credentials: dict[str, dict[str, str]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("dataset")
    generate_synthetic(root / "users.parquet", users=500, seed=11)
    schema = import_dataset(root / "users.parquet", root / "ds", name="synthetic-500",
                            user_column="user_id", label_column="label", split_key=b"test")
    return root / "ds", schema.partitions["training"].users


def write_job(root: Path, dataset: tuple[Path, int], artifact: dict[str, Any],
              **overrides: Any) -> Path:
    ds_dir, training_users = dataset
    job_dir = root / "job"
    job_dir.mkdir(parents=True)
    model_path = root / "model.json"
    model_path.write_text(json.dumps(artifact))
    clients = overrides.pop("clients_per_round", CLIENTS_PER_ROUND)
    job = {
        "job_id": root.name, "dataset_dir": str(ds_dir), "model_path": str(model_path),
        "rounds": ROUNDS, "sampling_rate": clients / training_users,
        "expected_clients_per_round": clients, "noise_multiplier": 1.0, "clip": 1.0,
        "client_learning_rate": 0.1, "server_learning_rate": 1.0, "server_momentum": 0.9,
        "local_epochs": 1, "batch_size": 16, "max_examples_per_user": 64,
        "evaluation": {"noise_multiplier": 1.0, "loss_clip": 5.0},
    }
    job.update(overrides)
    if "charged_cost" not in job:
        with contextlib.suppress(Exception):  # an invalid job.json is the test's point
            job = charged(job)
    (job_dir / "job.json").write_text(json.dumps(job))
    return job_dir


def launch(run: Run, *, timeout_s: float = 300, cancel_after_round: int | None = None) -> None:
    """Run the job through the launcher, observing its process group during round 1."""

    async def on_event(event: dict[str, Any]) -> None:
        run.events.append(event)
        if event == {"event": "round", "round": 1, "rounds": event.get("rounds")}:
            pid = runner_pid(run.job_dir)
            run.group = next((p.group for p in processes() if p.pid == pid), None)
            run.members_during_training = live_members(run.group) if run.group else []
            for member in run.members_during_training:
                run.credentials[member.name] = credentials(member.pid)
            workers = [p for p in run.members_during_training if p.name == "worker_binary"]
            if workers:
                run.worker_network_namespace = os.readlink(f"/proc/{workers[0].pid}/ns/net")
        if cancel_after_round is not None and event.get("round") == cancel_after_round:
            job.cancel()  # as the gateway does when a job is withdrawn or it shuts down

    async def main() -> None:
        nonlocal job
        job = asyncio.create_task(run_job(run.job_dir, on_event=on_event, timeout_s=timeout_s,
                                          stderr_log=run.job_dir.parent / "engine.log"))
        run.outcome = await job

    job: asyncio.Task[JobOutcome]
    asyncio.run(main())


@pytest.fixture(scope="module")
def completed(tmp_path_factory: pytest.TempPathFactory, dataset: tuple[Path, int]) -> Run:
    job_dir = write_job(tmp_path_factory.mktemp("ok"), dataset,
                        linear_classifier_artifact(60, 10))
    run = Run(job_dir)
    launch(run)
    return run


def test_job_succeeds_and_reports_data_access(completed: Run) -> None:
    outcome = completed.outcome
    assert outcome is not None and outcome.failure is None, outcome
    assert outcome.succeeded and outcome.data_accessed
    assert outcome.release_path == completed.job_dir / RELEASE_FILE
    assert (completed.job_dir / DATA_ACCESS_MARKER).exists()
    assert outcome.ignored_progress_lines == 0


def test_progress_events_arrive_in_order(completed: Run) -> None:
    assert completed.events == [
        {"event": "data_access"},
        *({"event": "round", "round": i, "rounds": ROUNDS} for i in range(1, ROUNDS + 1)),
        {"event": "evaluation"},
        {"event": "done"},
    ]


def test_release_holds_only_weights_and_dp_metrics(completed: Run) -> None:
    release = json.loads((completed.job_dir / RELEASE_FILE).read_text())
    assert set(release) == {"weights", "metrics"}
    assert set(release["metrics"]) == {"accuracy", "loss"}
    assert 0.0 <= release["metrics"]["accuracy"] <= 1.0
    assert 0.0 <= release["metrics"]["loss"] <= 5.0
    weights = [decode_array(w) for w in release["weights"]]
    assert [w.shape for w in weights] == [(60, 10), (10,)]
    assert all(np.isfinite(w).all() for w in weights)
    assert np.abs(weights[0]).sum() > 0  # trained (and noised) away from the zero init


def test_worker_binary_runs_in_the_job_group_in_a_private_network(completed: Run) -> None:
    names = {p.name for p in completed.members_during_training}
    assert "worker_binary" in names
    assert completed.worker_network_namespace is not None
    assert completed.worker_network_namespace != os.readlink("/proc/self/ns/net")


@pytest.mark.skipif(os.geteuid() != 0, reason="the gateway switches uid only as root")
def test_runner_and_worker_run_as_the_sandbox_uid_under_seccomp(completed: Run) -> None:
    confined = {"Uid": str(SANDBOX_ID), "CapEff": "0000000000000000", "NoNewPrivs": "1",
                "Seccomp": "2"}
    assert {"python", "worker_binary"} <= set(completed.credentials)
    for name, found in completed.credentials.items():
        if name != "bwrap":  # bwrap's pid 1 reaper stays root, outside the filter
            assert found == confined, name


def test_no_worker_binary_survives_the_job(completed: Run) -> None:
    assert completed.group is not None
    assert live_members(completed.group) == []


def test_a_job_directory_cannot_be_run_twice(completed: Run) -> None:
    release = (completed.job_dir / RELEASE_FILE).read_bytes()
    rerun = Run(completed.job_dir)
    launch(rerun)
    assert rerun.outcome is not None and not rerun.outcome.succeeded
    assert rerun.outcome.failure == "engine exited with status 2"
    assert (completed.job_dir / RELEASE_FILE).read_bytes() == release


def test_invalid_model_fails_before_data_access(tmp_path: Path,
                                                dataset: tuple[Path, int]) -> None:
    artifact = linear_classifier_artifact(60, 10)
    artifact["config"]["config"]["layers"][1]["class_name"] = "Lambda"
    run = Run(write_job(tmp_path, dataset, artifact))
    launch(run)
    outcome = run.outcome
    assert outcome is not None
    assert not outcome.succeeded and not outcome.data_accessed
    assert outcome.failure == "engine exited with status 2"  # generic: no stderr content
    assert outcome.release_path is None
    assert not (run.job_dir / DATA_ACCESS_MARKER).exists()
    assert run.events == []
    assert "layer class 'Lambda' is not allowed" in (tmp_path / "engine.log").read_text()


def test_timeout_kills_the_job(tmp_path: Path, dataset: tuple[Path, int]) -> None:
    run = Run(write_job(tmp_path, dataset, linear_classifier_artifact(60, 10)))
    launch(run, timeout_s=2)
    assert run.outcome is not None
    assert replace(run.outcome, usage=None) == JobOutcome(
        succeeded=False, data_accessed=False, release_path=None, failure="timed out after 2 s")
    assert not [p for p in processes() if p.state != "Z" and _is_job(p, run.job_dir)]


def _is_job(process: Process, job_dir: Path) -> bool:
    try:
        with open(f"/proc/{process.pid}/cmdline", "rb") as f:
            return str(job_dir).encode() in f.read()
    except OSError:
        return False


def test_cancellation_during_training_kills_the_whole_group(tmp_path: Path,
                                                            dataset: tuple[Path, int]) -> None:
    run = Run(write_job(tmp_path, dataset, linear_classifier_artifact(60, 10), rounds=10_000))
    with pytest.raises(asyncio.CancelledError):
        launch(run, cancel_after_round=1)
    assert "worker_binary" in {p.name for p in run.members_during_training}
    assert run.group is not None
    assert live_members(run.group) == []
    assert (run.job_dir / DATA_ACCESS_MARKER).exists()  # budget must be committed, not refunded


def test_rounds_without_sampled_users_still_add_noise(tmp_path: Path,
                                                      dataset: tuple[Path, int]) -> None:
    """q ≈ 1e-4: almost every round samples nobody; the release is then pure noise."""
    run = Run(write_job(tmp_path, dataset, linear_classifier_artifact(60, 10),
                        clients_per_round=0.04, rounds=2, evaluation=None))
    launch(run)
    assert run.outcome is not None and run.outcome.succeeded, run.outcome
    release = json.loads((run.job_dir / RELEASE_FILE).read_text())
    assert release["metrics"] == {}
    kernel = decode_array(release["weights"][0])
    # noise std per coordinate per round: z·C / expected clients = 1 / 0.04 = 25
    assert 5 < kernel.std() < 500
    assert [e["event"] for e in run.events] == ["data_access", "round", "round", "done"]
