"""Metering: the engine's meter measures a job from the kernel, in the sandbox a job gets.

Probes (plain Python programs run by the launcher exactly where the runner would run) burn CPU
in threads and child processes, hold memory, or spin until they are killed; the meter's report
is compared with what the program measured of itself and with the OS's own account of the
test process's children (``RUSAGE_CHILDREN``). One real TFF job is metered too (slow subset).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from engine.launcher import JobOutcome, run_job
from engine.meter import POLL_S, ResourceUsage, read_counts
from engine.sandbox import SandboxSettings
from ledger.db import create_schema, make_engine, session
from ledger.metering import billed_cpu, expected_client_updates, record_usage, researcher_usage
from ledger.models import Job, JobMeter
from tests.conftest import charged

# Burns CPU in the main thread, two threads (hashlib releases the GIL, so they run in
# parallel) and a forked child; holds 200 MB for a while; records its own rusage.
BURN = """
import hashlib, json, os, resource, sys, threading, time
job_dir = sys.argv[-1]
def burn(seconds):
    data = b"x" * (1 << 20)
    while time.thread_time() < seconds:
        hashlib.sha256(data).digest()
held = bytearray(200 * 10**6)
for i in range(0, len(held), 4096):
    held[i] = 1
threads = [threading.Thread(target=burn, args=(0.6,)) for _ in range(2)]
for t in threads: t.start()
child = os.fork()
if child == 0:
    burn(0.6)
    os._exit(0)
burn(0.4)
for t in threads: t.join()
os.waitpid(child, 0)
time.sleep(1.2)
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
with open(os.path.join(job_dir, "burn.json"), "w") as f:
    json.dump({"cpu": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime}, f)
"""

# Spins in two processes until killed, writing its own CPU time every 0.1 s.
SPIN = """
import os, sys, time
job_dir = sys.argv[-1]
if os.fork() == 0:
    while True: pass
while True:
    end = time.monotonic() + 0.1
    while time.monotonic() < end: pass
    t = os.times()
    with open(os.path.join(job_dir, "spin.tmp"), "w") as f:
        f.write(str(t.user + t.system))
    os.replace(os.path.join(job_dir, "spin.tmp"), os.path.join(job_dir, "spin.txt"))
"""


@pytest.fixture
def node(tmp_path: Path) -> Path:
    root = tmp_path / "node"
    for directory in ("datasets/demo", "models", "jobs", "logs"):
        (root / directory).mkdir(parents=True)
    (root / "datasets" / "demo" / "schema.json").write_text("{}")
    (root / "models" / "m.json").write_text("{}")
    return root


def _job_dir(node: Path) -> Path:
    job_id = "probe-" + secrets.token_hex(4)
    job_dir = node / "jobs" / job_id
    job_dir.mkdir()
    spec = {
        "job_id": job_id, "dataset_dir": str(node / "datasets" / "demo"),
        "model_path": str(node / "models" / "m.json"), "rounds": 1, "sampling_rate": 0.1,
        "expected_clients_per_round": 1.0, "noise_multiplier": 1.0, "clip": 1.0,
        "client_learning_rate": 0.1, "server_learning_rate": 1.0, "server_momentum": 0.0,
        "local_epochs": 1, "batch_size": 1, "evaluation": None,
    }
    (job_dir / "job.json").write_text(json.dumps(charged(spec)))
    return job_dir


def _run(job_dir: Path, source: str, *, timeout_s: float = 60, cpu_limit_s: float | None = None,
         mode: str = "bwrap") -> JobOutcome:
    return asyncio.run(run_job(job_dir, on_event=lambda event: None, timeout_s=timeout_s,
                               stderr_log=job_dir.parent.parent / "logs" / "engine.log",
                               sandbox=SandboxSettings(mode=mode),  # type: ignore[arg-type]
                               program=("-c", source), cpu_limit_s=cpu_limit_s))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _job_processes(job_dir: Path) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and str(job_dir).encode() in Path(
                    f"/proc/{entry.name}/cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("mode", ["bwrap", "none"])
def test_cpu_of_every_thread_and_child_process_is_metered_as_the_os_counts_it(
        node: Path, mode: str) -> None:
    job_dir = _job_dir(node)
    before = _children_cpu()
    outcome = _run(job_dir, BURN, mode=mode)
    os_measured = _children_cpu() - before  # the meter and everything it reaped
    usage = outcome.usage
    assert usage is not None, (node / "logs" / "engine.log").read_text()
    self_measured = json.loads((job_dir / "burn.json").read_text())["cpu"]
    assert self_measured >= 1.8  # 0.4 + 2 × 0.6 + 0.6 s of CPU in four threads/processes
    # Everything the job did, plus bwrap/setpriv/interpreter start-up; nothing the job says.
    assert self_measured <= usage.cpu_seconds <= self_measured + 1.0
    # The OS's account of the meter's whole tree also holds the meter's own polling.
    assert usage.cpu_seconds <= os_measured <= usage.cpu_seconds + 0.5
    assert usage.cpu_seconds == pytest.approx(usage.cpu_user_seconds + usage.cpu_system_seconds)
    assert usage.max_rss_bytes >= 200 * 10**6  # one process held 200 MB
    assert usage.peak_tree_rss_bytes >= 200 * 10**6  # seen by sampling (held 1.2 s)
    assert usage.wall_seconds >= 1.2
    assert usage.stopped is None


def test_a_job_killed_at_its_timeout_is_metered_by_sampling_the_live_tree(node: Path) -> None:
    """A killed pid namespace's processes are reaped without rusage: the samples count."""
    job_dir = _job_dir(node)
    outcome = _run(job_dir, SPIN, timeout_s=3)
    assert outcome.failure == "timed out after 3 s"
    usage = outcome.usage
    assert usage is not None
    parent_cpu = float((job_dir / "spin.txt").read_text())  # its last word: a lower bound
    assert usage.cpu_seconds >= parent_cpu - POLL_S
    assert usage.cpu_seconds <= usage.wall_seconds * (os.cpu_count() or 1) + 0.5
    assert usage.cpu_sampled_seconds > usage.cpu_user_seconds + usage.cpu_system_seconds
    assert _job_processes(job_dir) == []


def test_a_runaway_job_is_stopped_at_its_cpu_reservation_across_processes(node: Path) -> None:
    job_dir = _job_dir(node)
    started = time.monotonic()
    outcome = _run(job_dir, SPIN, timeout_s=60, cpu_limit_s=1.5)
    assert time.monotonic() - started < 30
    assert outcome.succeeded is False
    assert outcome.failure == "stopped at its CPU reservation of 1.5 s"
    usage = outcome.usage
    assert usage is not None and usage.stopped == "cpu_limit"
    # Two spinning processes, sampled every POLL_S: stopped within one interval of the limit.
    assert 1.5 <= usage.cpu_seconds <= 1.5 + 2 * POLL_S * (os.cpu_count() or 1) + 0.5
    assert _job_processes(job_dir) == []
    assert "stopped at its CPU reservation" in (node / "logs" / "engine.log").read_text()


def test_client_update_counts_are_read_only_from_a_regular_file(tmp_path: Path) -> None:
    assert read_counts(tmp_path) is None
    (tmp_path / "counts.json").write_text('{"client_updates": 57}')
    assert read_counts(tmp_path) == 57
    (tmp_path / "counts.json").write_text('{"client_updates": -1}')
    assert read_counts(tmp_path) is None
    (tmp_path / "counts.json").unlink()
    (tmp_path / "elsewhere.json").write_text('{"client_updates": 3}')
    (tmp_path / "counts.json").symlink_to(tmp_path / "elsewhere.json")
    assert read_counts(tmp_path) is None


def _job(**overrides: Any) -> Job:
    values: dict[str, Any] = dict(
        id="job-" + secrets.token_hex(8), dataset="demo", researcher_key_id="k",
        researcher="alice", request_digest="sha256:x", model_digest="sha256:y",
        spec=json.dumps({"clients_per_round": 20.0, "rounds": 7}), cost="{}", cost_rdp="[]",
        epsilon=1.0, delta=1e-5, state="running", budget_state="committed", round=3, rounds=7,
        policy_version="v", created_at=time.time(), updated_at=time.time())
    values.update(overrides)
    return Job(**values)


USAGE = ResourceUsage(cpu_seconds=12.5, cpu_user_seconds=12.0, cpu_system_seconds=0.5,
                      cpu_sampled_seconds=12.0, wall_seconds=8.25, max_rss_bytes=10**9,
                      peak_tree_rss_bytes=2 * 10**9)


def test_settled_usage_is_recorded_and_researchers_see_nothing_measured_of_a_run_on_data(
        db_url: str) -> None:
    engine = make_engine(db_url)
    create_schema(engine)
    with session(engine) as s, s.begin():
        failed = _job(data_accessed=True)
        done = _job()
        s.add_all([failed, done])
        s.flush()
        record_usage(s, failed, usage=USAGE, client_updates=61, bytes_released=0,
                     succeeded=False, cpu_reserved_seconds=3600.0)
        record_usage(s, done, usage=None, client_updates=None, bytes_released=1234,
                     succeeded=True, cpu_reserved_seconds=3600.0)
    with session(engine) as s:
        meter = s.get(JobMeter, failed.id)
        assert meter is not None and meter.state == "metered" and meter.measured
        assert (meter.cpu_seconds, meter.wall_seconds, meter.peak_memory_bytes) == (
            "12.500000", "8.250000", 2 * 10**9)
        assert meter.rounds_run == 3 and meter.client_updates == 61  # owner-local
        assert meter.expected_client_updates == expected_client_updates(20.0, 3) == 60
        shown = researcher_usage(meter, failed)
        assert "client_updates" not in shown and 61 not in shown.values()
        assert shown == {"rounds_run": 3, "expected_client_updates": 60,
                         "cpu_reserved_seconds": 3600.0, "cpu_seconds": "3600.000000",
                         "cpu_basis": "reservation", "bytes_released": 0}
        unmeasured = s.get(JobMeter, done.id)
        assert unmeasured is not None and not unmeasured.measured
        assert (unmeasured.rounds_run, unmeasured.bytes_released) == (7, 1234)
    engine.dispose()


def test_billed_cpu_is_the_reservation_once_a_job_has_read_user_data() -> None:
    """The CPU a researcher is billed for (and their CPU quota counts) never depends on what a
    run on private data used; a run that never read data is billed what it measured."""
    def meter(cpu_seconds: str, *, measured: bool = True) -> JobMeter:
        return JobMeter(job_id="j", researcher="alice", dataset="demo", reserved_at=0.0,
                        cpu_reserved_seconds=3600.0, cpu_seconds=cpu_seconds, measured=measured)

    on_data = {billed_cpu(meter(used), read_user_data=True) for used in ("1.5", "3599.9", "3600.4")}
    assert {(b.seconds, b.basis) for b in on_data} == {("3600.000000", "reservation")}
    assert billed_cpu(meter("12.500000"), read_user_data=False).seconds == "12.500000"
    assert billed_cpu(meter("3600.400000"), read_user_data=False).seconds == "3600.000000"  # capped
    assert billed_cpu(meter("0", measured=False), read_user_data=False).basis == "none"


@pytest.mark.tff
def test_a_real_tff_job_is_metered_within_bounds_of_the_os_account(tmp_path: Path) -> None:
    from engine.artifact import linear_classifier_artifact
    from engine.datastore import generate_synthetic, import_dataset
    from tests.test_engine_runner import write_job

    generate_synthetic(tmp_path / "users.parquet", users=300, seed=5)
    schema = import_dataset(tmp_path / "users.parquet", tmp_path / "ds", name="s",
                            user_column="user_id", label_column="label", split_key=b"k")
    job_dir = write_job(tmp_path / "run", (tmp_path / "ds", schema.partitions["training"].users),
                        linear_classifier_artifact(60, 10))
    before = _children_cpu()
    outcome = asyncio.run(run_job(job_dir, on_event=lambda event: None, timeout_s=600,
                                  stderr_log=tmp_path / "engine.log"))
    os_measured = _children_cpu() - before
    assert outcome.succeeded, (tmp_path / "engine.log").read_text()
    usage = outcome.usage
    assert usage is not None
    # TensorFlow alone takes seconds of CPU to import; the meter's polling is all it adds.
    assert usage.cpu_seconds > 2.0
    assert usage.cpu_seconds <= os_measured <= usage.cpu_seconds + 1.0
    assert usage.max_rss_bytes > 200 * 2**20  # the runner with TF/TFF loaded
    assert usage.peak_memory_bytes >= usage.max_rss_bytes
    assert read_counts(job_dir) is not None  # the exact count, for the owner
