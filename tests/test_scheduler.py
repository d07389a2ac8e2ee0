"""Fair scheduling: with ``[engine] max_concurrent_jobs`` admitted jobs beyond capacity wait and
start round robin across researchers, so one researcher's flood cannot starve another."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.node.deployment import Deployment, init_deployment
from gateway.node.jobs import JobRunner
from gateway.node.node import Node
from gateway.node.scheduler import FairQueue


def test_waiting_jobs_start_round_robin_across_researchers_in_admission_order() -> None:
    queue = FairQueue()
    for n in (1, 2, 3):
        queue.push("alice", f"a{n}")
    for n in (1, 2):
        queue.push("bob", f"b{n}")
    queue.push("carol", "c1")
    assert queue.order() == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert [queue.position(job) for job in ("a1", "b1", "a3")] == [1, 2, 6]
    assert queue.pop() == "a1"
    queue.push("alice", "a4")  # alice was just served: bob and carol go first
    assert queue.order() == ["b1", "c1", "a2", "b2", "a3", "a4"]
    assert queue.remove("b1") and not queue.remove("b1") and queue.position("b1") is None
    # A cancelled job is not a turn: bob, never served and earlier than carol, still goes first.
    assert [queue.pop() for _ in range(len(queue))] == ["b2", "c1", "a2", "a3", "a4"]
    assert queue.pop() is None


def _runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capacity: int | None,
            started: list[str]) -> JobRunner:
    """A runner whose engine is a fake that takes a few milliseconds per job."""
    monkeypatch.delenv("FEDGATE_DATABASE_URL", raising=False)
    init_deployment(tmp_path / "node")
    config = Deployment(tmp_path / "node").config_path
    config.write_text(config.read_text().replace(
        "max_concurrent_jobs = 2\n",
        "" if capacity is None else f"max_concurrent_jobs = {capacity}\n"))
    runner = JobRunner(Node(tmp_path / "node"))

    async def fake_run(job_id: str) -> None:
        started.append(job_id)
        await asyncio.sleep(0.01)

    monkeypatch.setattr(runner, "_run", fake_run)
    return runner


def _job(job_id: str) -> Any:
    return SimpleNamespace(id=job_id, researcher={"a": "alice", "b": "bob"}[job_id[0]])


def test_a_flood_from_one_researcher_does_not_starve_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []
    runner = _runner(tmp_path, monkeypatch, 1, started)
    assert runner.node.config.max_concurrent_jobs == 1

    async def flood() -> dict[str, int | None]:
        for job_id in ("a1", "a2", "a3", "a4", "b1", "b2"):
            runner.start(_job(job_id))
        positions = {job_id: runner.queue_position(job_id) for job_id in ("a1", "a2", "b1", "b2")}
        while len(started) < 6 or runner._tasks:
            await asyncio.sleep(0.005)
        return positions

    positions = asyncio.run(flood())
    assert positions == {"a1": None, "a2": 2, "b1": 1, "b2": 3}  # a1 runs; bob is next
    assert started == ["a1", "b1", "a2", "b2", "a3", "a4"]


def test_a_new_node_runs_at_most_two_jobs_at_once(tmp_path: Path) -> None:
    init_deployment(tmp_path / "node")
    assert Node(tmp_path / "node").config.max_concurrent_jobs == 2


def test_without_a_limit_every_admitted_job_starts_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []
    runner = _runner(tmp_path, monkeypatch, None, started)
    assert runner.node.config.max_concurrent_jobs is None

    async def submit() -> int:
        for job_id in ("a1", "a2", "b1"):
            runner.start(_job(job_id))
        running = len(runner._tasks)
        await asyncio.gather(*runner._tasks.values())
        return running

    assert asyncio.run(submit()) == 3 and started == ["a1", "a2", "b1"]
    assert runner.queue_position("a1") is None


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "true", '"2"'])
def test_a_bad_concurrency_limit_is_refused(tmp_path: Path, value: str) -> None:
    init_deployment(tmp_path / "node")
    config = Deployment(tmp_path / "node").config_path
    config.write_text(config.read_text().replace("max_concurrent_jobs = 2",
                                                 f"max_concurrent_jobs = {value}"))
    with pytest.raises(ValueError, match="max_concurrent_jobs"):
        Deployment(tmp_path / "node").load_config()
