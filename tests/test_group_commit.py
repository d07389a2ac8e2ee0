"""Group commit (``ledger.group_commit``): concurrent writes decided one after another in one
transaction and one commit, each acknowledged only once that commit is durable — on SQLite
and PostgreSQL, in process and through a gateway killed with SIGKILL mid-burst."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session, select

from gateway.cli import main as fedgate
from gateway.cli.process import start_gateway, stop_gateway
from gateway.sdk.request_signing import SignedRequestAuth
from ledger import accounting
from ledger.audit import append_entry, audit_size, read_entries
from ledger.db import create_schema, make_engine, session
from ledger.group_commit import GroupCommitter
from ledger.models import Dataset, Job
from tests.conftest import make_researcher

FIXTURES = Path(__file__).parent / "fixtures"


def _wait(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _one_batch(committer: GroupCommitter, works: list,  # type: ignore[type-arg]
               on_connection: tuple[int, ...] = ()) -> list:  # type: ignore[type-arg]
    """Run ``works`` from one thread each so that all of them land in the same batch: a first
    request holds the writer until the others are queued (those numbered in ``on_connection``
    with ``run_on_connection``). Returns each result or exception."""
    entered, release = threading.Event(), threading.Event()
    results: list[object] = [None] * len(works)

    def hold(s: Session) -> None:
        entered.set()
        release.wait(30)

    def call(i: int) -> None:
        run = committer.run_on_connection if i in on_connection else committer.run
        try:
            results[i] = run(works[i])
        except Exception as error:
            results[i] = error

    holder = threading.Thread(target=committer.run, args=(hold,))
    holder.start()
    assert entered.wait(30)  # the writer is inside ``hold``
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(works))]
    for thread in threads:
        thread.start()
    _wait(lambda: committer.waiting() == len(works))
    release.set()
    for thread in [holder, *threads]:
        thread.join()
    return results


def test_concurrent_writes_share_one_commit_and_each_sees_the_ones_before(db_url: str) -> None:
    engine = make_engine(db_url)
    create_schema(engine)
    committer = GroupCommitter(engine)
    works = [lambda s, i=i: append_entry(s, action="key", actor=f"writer-{i}") for i in range(16)]
    seqs = _one_batch(committer, works)
    assert sorted(seqs) == list(range(16))  # dense: each saw the entries before it
    assert committer.batches == 2  # the holder's, then all sixteen in one
    with session(engine) as s:
        assert audit_size(s) == 16
    committer.close()
    engine.dispose()


def test_a_failing_write_rolls_back_alone_and_the_rest_of_its_batch_commits(db_url: str) -> None:
    engine = make_engine(db_url)
    create_schema(engine)
    committer = GroupCommitter(engine)

    def fails(s: Session) -> None:
        append_entry(s, action="key", actor="doomed")
        raise RuntimeError("refused after writing")

    outcomes = _one_batch(committer, [
        lambda s: append_entry(s, action="key", actor="first"), fails,
        lambda s: append_entry(s, action="key", actor="last")])
    assert outcomes[0] == 0 and outcomes[2] == 1
    assert isinstance(outcomes[1], RuntimeError)
    with session(engine) as s:
        assert [e["actor"] for e in read_entries(s)] == ["first", "last"]
    committer.close()
    engine.dispose()


def test_fixed_statement_writes_share_the_batch_and_a_failing_one_rolls_back_alone(
        db_url: str) -> None:
    """``run_on_connection`` works (the admission's: fixed statements on the batch's connection,
    in a savepoint issued on the driver) and session works in one batch: each sees those
    before it, and the one that raises after writing leaves nothing behind."""
    engine = make_engine(db_url)
    create_schema(engine)
    committer = GroupCommitter(engine)

    def fails(connection) -> None:  # type: ignore[no-untyped-def]
        append_entry(connection, action="key", actor="doomed")
        raise RuntimeError("refused after writing")

    outcomes = _one_batch(committer, [
        lambda c: append_entry(c, action="key", actor="fixed-1"),
        lambda s: append_entry(s, action="key", actor="session"),
        fails,
        lambda c: append_entry(c, action="key", actor="fixed-2")], on_connection=(0, 2, 3))
    assert outcomes[0] == 0 and outcomes[1] == 1 and outcomes[3] == 2
    assert isinstance(outcomes[2], RuntimeError)
    assert committer.batches == 2  # the holder's, then all four in one
    with session(engine) as s:
        assert [e["actor"] for e in read_entries(s)] == ["fixed-1", "session", "fixed-2"]
    committer.close()
    engine.dispose()


def test_a_savepoint_that_cannot_be_released_fails_its_whole_batch(db_url: str) -> None:
    """A work whose savepoint the writer cannot release, or roll back (here the work released it
    itself), leaves its batch's transaction in an unknown state: nothing of the batch commits
    and every request of it gets the error; none is reported failed yet committed."""
    engine = make_engine(db_url)
    create_schema(engine)
    committer = GroupCommitter(engine)

    def releases_early(connection) -> None:  # type: ignore[no-untyped-def]
        append_entry(connection, action="key", actor="early")
        connection.connection.driver_connection.cursor().execute(
            "RELEASE SAVEPOINT fedgate_work")

    def session_work_releases_early_then_fails(s: Session) -> None:
        append_entry(s, action="key", actor="early, then refused")
        s.connection().connection.driver_connection.cursor().execute(
            "RELEASE SAVEPOINT fedgate_work")
        raise RuntimeError("refused after writing")

    outcomes = _one_batch(committer, [
        lambda c: append_entry(c, action="key", actor="innocent"), releases_early],
        on_connection=(0, 1))
    assert all(isinstance(outcome, Exception) for outcome in outcomes)
    outcomes = _one_batch(committer, [
        lambda c: append_entry(c, action="key", actor="innocent"),
        session_work_releases_early_then_fails], on_connection=(0,))
    assert all(isinstance(outcome, Exception) for outcome in outcomes)
    with session(engine) as s:
        assert audit_size(s) == 0
    assert committer.run_on_connection(lambda c: append_entry(c, action="key", actor="next")) == 0
    committer.close()
    engine.dispose()


def test_a_failed_commit_acknowledges_nothing_of_its_batch(db_url: str) -> None:
    engine = make_engine(db_url)
    create_schema(engine)
    committer = GroupCommitter(engine)

    def breaks_the_transaction(s: Session) -> None:
        append_entry(s, action="key", actor="breaks")
        s.connection().invalidate()  # the connection is gone: neither ROLLBACK TO nor COMMIT

    outcomes = _one_batch(committer, [
        lambda s: append_entry(s, action="key", actor="innocent"), breaks_the_transaction])
    assert all(isinstance(outcome, Exception) for outcome in outcomes)
    with session(engine) as s:
        assert audit_size(s) == 0
    committer.close()
    engine.dispose()


JOB = {"dataset": "demo", "rounds": 5, "clients_per_round": 20, "noise_multiplier": 8.0,
       "clip": 1.0}


def test_kill_during_group_commit_loses_no_acknowledged_admission(
    node_dir: Path, db_url: str, tmp_path: Path
) -> None:
    """SIGKILL the gateway while 16 clients submit jobs as fast as they can; after a restart
    every job a client got a 202 for is there, reserved and audited, and the filter's spent
    vector is exactly the sum of the jobs that are there: nothing was charged for a job
    without its row and its ``admit`` entry, and no acknowledged job was lost."""
    policy = node_dir / "policies" / "policy.csv"  # held for review: no engine starts
    policy.write_text(policy.read_text() + "p2, researchers, owner, demo, train, require_review, "
                                           "always\n")
    keys = [make_researcher(node_dir, f"r{i}") for i in range(16)]
    url, gateway = start_gateway(node_dir, log_path=tmp_path / "gateway.log")
    with httpx.Client(base_url=url, auth=SignedRequestAuth(keys[0]), timeout=30) as client:
        digest = client.post("/v1/models", content=(FIXTURES / "logreg-20x5.json").read_bytes(),
                             headers={"Content-Type": "application/json"}).json()["digest"]
    acknowledged: list[str] = []
    lock = threading.Lock()
    killed = threading.Event()

    def submit(key) -> None:  # type: ignore[no-untyped-def]
        with httpx.Client(base_url=url, auth=SignedRequestAuth(key), timeout=30) as client:
            while not killed.is_set():
                try:
                    response = client.post("/v1/jobs", json={**JOB, "model_digest": digest})
                except httpx.TransportError:
                    return  # the gateway died with this request in flight
                if response.status_code == 202:
                    with lock:
                        acknowledged.append(response.json()["job_id"])

    threads = [threading.Thread(target=submit, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    _wait(lambda: len(acknowledged) >= 40, timeout=120)
    os.killpg(gateway.pid, signal.SIGKILL)
    gateway.wait()
    killed.set()
    for thread in threads:
        thread.join()

    _, restarted = start_gateway(node_dir, log_path=tmp_path / "gateway.log")
    stop_gateway(restarted)
    engine = make_engine(db_url)
    with session(engine) as s:
        jobs = {job.id: job for job in s.exec(select(Job)).all()}
        spent = json.loads(s.get(Dataset, "demo").spent_rdp)  # type: ignore[union-attr]
        admitted = [e["job_id"] for e in read_entries(s) if e["action"] == "admit"]
    engine.dispose()
    assert set(acknowledged) <= set(jobs)
    assert all(jobs[job_id].budget_state == "reserved" for job_id in acknowledged)
    assert sorted(admitted) == sorted(jobs)  # every job row has its entry, and only those
    total = accounting.zero(accounting.FILTER_ORDERS)
    for job in jobs.values():
        total = accounting.add(total, tuple(json.loads(job.cost_rdp)))
    assert spent == accounting.vector_to_json(total)
    assert len(jobs) >= len(acknowledged) >= 40
    export = tmp_path / "audit.json"
    assert fedgate(["-d", str(node_dir), "audit", "checkpoint"]) == 0
    assert fedgate(["-d", str(node_dir), "audit", "export", "--out", str(export)]) == 0
    assert fedgate(["audit", "verify", str(export), "--node-key", str(node_dir / "node.pub")]) == 0


def test_the_writer_outlives_a_base_exception_and_reopens_after_close(tmp_path: Path) -> None:
    """A write that raises even a non-Exception fails its batch (here itself alone) and the
    writer keeps serving (a dead writer would leave every later request waiting forever)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    create_schema(engine)
    committer = GroupCommitter(engine)

    def interrupt(s: Session) -> None:
        raise KeyboardInterrupt  # not an Exception

    with pytest.raises(KeyboardInterrupt):
        committer.run(interrupt)
    assert committer.run(lambda s: append_entry(s, action="key", actor="after")) == 0
    committer.close()
    assert committer.run(lambda s: append_entry(s, action="key", actor="reopened")) == 1
    committer.close()
    engine.dispose()
