"""A job on two loopback TFF remote workers gives the same result shape and charges the same ε.

Two ``worker_binary`` processes (TFF's C++ worker, ``--port N``) serve on loopback; the same
small job (500-user Synthetic(1, 1), 60 → 10 softmax, 2 rounds of DP-FedAvg, DP evaluation)
runs through :func:`engine.launcher.run_job` in the default bubblewrap sandbox once on TFF's
local runtime and once with ``SandboxSettings.remote_workers`` naming both workers. The job has a
per-user cap, so it runs on the vectorized engine (``engine.shard_process``): each round has one
shard of users per worker, and each worker trains and sums its shard. The sandbox
keeps its loopback-only network; the launcher's relay is its way to the workers.

The workers listen on all interfaces without authentication, so the whole scenario runs in a
driver process that first moves into a private loopback-only network namespace
(:func:`engine.netns.isolate_network`): nothing outside the test can reach the workers. The
driver and the workers share one process group, which the fixture kills and then checks empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from engine.job import JobSpec
from engine.sandbox import REMOTE_WORKERS_ENV, Runtime, WorkerAddress, job_binds, sandbox_environment
from ledger.accounting import JobCost
from tests.conftest import charged

REPOSITORY = Path(__file__).resolve().parent.parent
ROUNDS = 2
CLIENTS_PER_ROUND = 20.0
DELTA = 1e-5
_ENTRY = ("import os, sys; from engine.netns import isolate_network; isolate_network(); "
          "from tests.test_remote_workers import drive; drive(sys.argv[1]); os._exit(0)")


def worker_binary() -> str:
    import importlib.util

    spec = importlib.util.find_spec("tensorflow_federated")
    assert spec is not None and spec.origin is not None
    return str(Path(spec.origin).parent / "data" / "worker_binary")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_workers(count: int) -> list[int]:
    """``count`` worker_binary processes in this process's group; returns their ports once
    each accepts connections."""
    ports = [free_port() for _ in range(count)]
    for port in ports:
        subprocess.Popen([worker_binary(), f"--port={port}"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    for port in ports:
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, f"worker on port {port} did not start"
            time.sleep(0.2)
    return ports


def write_job(root: Path, ds_dir: Path, training_users: int) -> Path:
    from engine.artifact import linear_classifier_artifact

    root.mkdir(parents=True)
    job_dir = root / "job"
    job_dir.mkdir()
    model_path = root / "model.json"
    model_path.write_text(json.dumps(linear_classifier_artifact(60, 10)))
    job = {
        "job_id": root.name, "dataset_dir": str(ds_dir), "model_path": str(model_path),
        "rounds": ROUNDS, "sampling_rate": CLIENTS_PER_ROUND / training_users,
        "expected_clients_per_round": CLIENTS_PER_ROUND, "noise_multiplier": 1.0, "clip": 1.0,
        "client_learning_rate": 0.1, "server_learning_rate": 1.0, "server_momentum": 0.9,
        "local_epochs": 1, "batch_size": 16, "max_examples_per_user": 64,
        "evaluation": {"noise_multiplier": 1.0, "loss_clip": 5.0},
    }
    (job_dir / "job.json").write_text(json.dumps(charged(job)))
    return job_dir


def drive(out: str) -> None:
    """The scenario, inside the private network namespace: one dataset, workers, three jobs
    (local, remote, remote with a worker down); writes what the test checks to ``out``."""
    from engine.datastore import generate_synthetic, import_dataset
    from engine.launcher import run_job
    from engine.sandbox import SandboxSettings, WorkerAddress

    root = Path(out).parent
    generate_synthetic(root / "users.parquet", users=500, seed=11)
    schema = import_dataset(root / "users.parquet", root / "ds", name="synthetic-500",
                            user_column="user_id", label_column="label", split_key=b"test")
    users = schema.partitions["training"].users
    ports = start_workers(2)
    workers = tuple(WorkerAddress("127.0.0.1", port) for port in ports)
    down = WorkerAddress("127.0.0.1", free_port())  # nothing listens there
    results: dict[str, Any] = {"ports": ports}
    for name, remote in (("local", ()), ("remote", workers), ("unreachable", (workers[0], down))):
        job_dir = write_job(root / name, root / "ds", users)
        events: list[dict[str, Any]] = []
        runner_children: list[str] = []

        def on_event(event: dict[str, Any], job_dir: Path = job_dir,
                     events: list[dict[str, Any]] = events,
                     children: list[str] = runner_children) -> None:
            events.append(event)
            if event.get("round") == 1:
                children.extend(child_names(job_dir))

        outcome = asyncio.run(run_job(job_dir, on_event=on_event, timeout_s=600,
                                      stderr_log=root / f"{name}.log",
                                      sandbox=SandboxSettings(remote_workers=remote)))
        release = None
        if outcome.release_path is not None:
            release = json.loads(outcome.release_path.read_text())
        log = (root / f"{name}.log").read_text() if (root / f"{name}.log").exists() else ""
        results[name] = {"succeeded": outcome.succeeded, "failure": outcome.failure,
                         "data_accessed": outcome.data_accessed, "events": events,
                         "release": release, "log": log, "job_dir": str(job_dir),
                         "runner_children": runner_children}
    Path(out).write_text(json.dumps(results))


def child_names(job_dir: Path) -> list[str]:
    """Names of the child processes of the job's runner (not bwrap or the launcher's meter,
    whose command lines end with the runner's)."""
    for entry in os.scandir("/proc"):
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv[1:4] == [b"-I", b"-m", b"engine.runner"] and str(job_dir).encode() in argv:
            children = []
            for task in os.scandir(f"/proc/{entry.name}/task"):
                with contextlib.suppress(OSError), open(f"{task.path}/children") as f:
                    children += f.read().split()
            names = []
            for pid in children:
                with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
                    names.append(f.read().strip())
            return names
    return []


def group_members(group: int) -> list[str]:
    """Live (non-zombie) processes of a process group, as "pid name"."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        state, _, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == group and state != "Z":
            members.append(f"{entry.name} {stat[stat.index('(') + 1:stat.rindex(')')]}")
    return members


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Runs :func:`drive`; afterwards kills its process group (driver and both workers) and
    asserts that nothing of it survives."""
    out = tmp_path_factory.mktemp("remote-workers") / "results.json"
    driver = subprocess.Popen([sys.executable, "-c", _ENTRY, str(out)], cwd=REPOSITORY,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        driver.wait(timeout=900)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 10
        while group_members(driver.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert group_members(driver.pid) == []
    assert driver.returncode == 0, driver.returncode
    return json.loads(out.read_text())


def epsilon_charged(job_dir: str) -> float:
    """The ε the gateway charges: computed from the admitted job specification alone (the
    engine's runtime has no say in it)."""
    spec = JobSpec.load(Path(job_dir))
    assert spec.evaluation is not None
    cost = JobCost.for_job(sampling_rate=spec.sampling_rate,
                           noise_multiplier=spec.noise_multiplier, rounds=spec.rounds,
                           evaluation_noise_multiplier=spec.evaluation.noise_multiplier)
    return cost.epsilon(DELTA)


def shapes(release: dict[str, Any]) -> tuple[list[tuple[int, ...]], list[str]]:
    from engine.artifact import decode_array

    return ([decode_array(w).shape for w in release["weights"]], sorted(release["metrics"]))


@pytest.mark.tff
def test_a_job_on_two_remote_workers_succeeds_with_the_local_result_shape_and_epsilon(
        scenario: dict[str, Any]) -> None:
    local, remote = scenario["local"], scenario["remote"]
    assert local["succeeded"] and remote["succeeded"], (local["failure"], remote["failure"])
    assert remote["events"] == local["events"]
    assert shapes(remote["release"]) == shapes(local["release"]) == (
        [(60, 10), (10,)], ["accuracy", "loss"])
    assert epsilon_charged(remote["job_dir"]) == epsilon_charged(local["job_dir"])


@pytest.mark.tff
def test_both_remote_workers_did_the_training(scenario: dict[str, Any]) -> None:
    ports = scenario["ports"]
    relayed = [line for line in scenario["remote"]["log"].splitlines()
               if "remote-worker connections relayed" in line]
    assert len(relayed) == 1
    counts = dict(part.rsplit(": ", 1) for part in relayed[0].split("relayed: ", 1)[1].split(", "))
    assert set(counts) == {f"127.0.0.1:{port}" for port in ports}
    assert all(int(count) >= 1 for count in counts.values())
    assert "connections relayed" not in scenario["local"]["log"]
    # TFF's local runtime starts a worker_binary of its own; with remote workers there is none.
    assert "worker_binary" in scenario["local"]["runner_children"]
    assert "worker_binary" not in scenario["remote"]["runner_children"]


@pytest.mark.tff
def test_a_job_whose_remote_worker_is_down_fails_before_data_access(
        scenario: dict[str, Any]) -> None:
    unreachable = scenario["unreachable"]
    assert not unreachable["succeeded"]
    assert unreachable["failure"] == "remote workers unreachable"
    assert not unreachable["data_accessed"]  # the gateway refunds it
    assert unreachable["events"] == []
    assert "is unreachable" in unreachable["log"]


@pytest.mark.parametrize("text", ["10.0.0.5", "10.0.0.5:0", "10.0.0.5:65536", ":8000",
                                  "unix:/tmp/x", "host name:1", "h;x:1", "[::1:80", 8000])
def test_a_remote_worker_must_be_exactly_host_colon_port(text: object) -> None:
    with pytest.raises(ValueError, match="remote worker"):
        WorkerAddress.parse(text)


def test_remote_workers_are_read_from_the_engine_config(tmp_path: Path) -> None:
    from gateway.node.deployment import Deployment, init_deployment

    deployment = init_deployment(tmp_path / "node")
    assert deployment.load_config().remote_workers == ()  # the default: TFF's local runtime
    text = deployment.config_path.read_text().replace(
        "remote_workers = []", 'remote_workers = ["127.0.0.1:8000", "[::1]:8001"]')
    deployment.config_path.write_text(text)
    config = Deployment(deployment.root).load_config()
    assert config.sandbox_settings.remote_workers == (WorkerAddress("127.0.0.1", 8000),
                                                      WorkerAddress("::1", 8001))
    deployment.config_path.write_text(text.replace("[::1]:8001", "127.0.0.1:8000"))
    with pytest.raises(ValueError, match="twice"):
        Deployment(deployment.root).load_config()


def test_audit_entries_name_the_remote_workers_only_when_configured(tmp_path: Path) -> None:
    from gateway.node.deployment import Deployment, init_deployment

    deployment = init_deployment(tmp_path / "node")
    assert deployment.load_config().engine_audit_fields == {"sandbox": "bwrap"}
    deployment.config_path.write_text(deployment.config_path.read_text().replace(
        "remote_workers = []", 'remote_workers = ["127.0.0.1:8000", "[::1]:8001"]'))
    assert Deployment(deployment.root).load_config().engine_audit_fields == {
        "sandbox": "bwrap", "remote_workers": ["127.0.0.1:8000", "[::1]:8001"]}


def test_the_sandbox_sees_the_relay_sockets_read_only_and_no_network_address(
        tmp_path: Path) -> None:
    relay = tmp_path / "relay"
    binds = job_binds(tmp_path / "job", None, None, Runtime.current(), relay)
    assert [bind.writable for bind in binds if bind.path == relay] == [False]
    env = sandbox_environment("FD", 3, (f"unix:{relay}/0.sock", f"unix:{relay}/1.sock"))
    assert env[REMOTE_WORKERS_ENV] == f"unix:{relay}/0.sock,unix:{relay}/1.sock"
    assert REMOTE_WORKERS_ENV not in sandbox_environment("FD", 3)
