"""``ledger.suspend``: synchronous code on the event loop parks at its ledger waits instead of
blocking the loop, gets the writer's outcome (result or error) where it waits, is never
abandoned mid-write, and a wait that would block an event loop is refused."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from ledger.audit import append_entry, audit_size
from ledger.db import create_schema, make_engine, session
from ledger.group_commit import GroupCommitter
from ledger.suspend import run_suspending, wait

REQUEST = contextvars.ContextVar("REQUEST", default="none")


def _completed_later(result: object = None, error: BaseException | None = None,
                     gate: threading.Event | None = None) -> Future[object]:
    """A future another thread completes (after ``gate`` is set, if given)."""
    future: Future[object] = Future()

    def complete() -> None:
        if gate is not None:
            gate.wait(30)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    threading.Thread(target=complete).start()
    return future


def test_a_parked_function_lets_the_loop_serve_others_until_its_future_is_done() -> None:
    gate = threading.Event()
    order: list[str] = []

    def first() -> object:
        order.append("first waits")
        value = wait(_completed_later("written", gate=gate))
        order.append("first resumes")
        return value

    def second() -> str:
        order.append("second runs")  # while first is parked
        gate.set()
        return "done"

    async def both() -> list[object]:
        return list(await asyncio.gather(run_suspending(first), run_suspending(second)))

    assert asyncio.run(both()) == ["written", "done"]
    assert order == ["first waits", "second runs", "first resumes"]


def test_the_futures_error_is_raised_where_the_function_waits_and_it_may_wait_again() -> None:
    def admit() -> str:
        try:
            wait(_completed_later(error=LookupError("over budget")))
        except LookupError as refusal:  # the deny is written in a second wait
            return f"denied ({refusal}): " + str(wait(_completed_later("deny audited")))
        return "admitted"

    assert asyncio.run(run_suspending(admit)) == "denied (over budget): deny audited"


def test_the_functions_own_error_and_result_are_run_suspendings() -> None:
    def refuses(x: int) -> int:
        raise ValueError(f"refused {x}")

    with pytest.raises(ValueError, match="refused 3"):
        asyncio.run(run_suspending(refuses, 3))
    assert asyncio.run(run_suspending(lambda a, b: a + b, 2, 5)) == 7


def test_a_cancelled_request_still_hands_its_write_to_the_function_then_is_cancelled() -> None:
    gate = threading.Event()
    seen: list[object] = []

    def records() -> None:
        seen.append(wait(_completed_later("committed", gate=gate)))  # e.g. nonce recorded

    async def cancel_while_parked() -> None:
        task = asyncio.ensure_future(run_suspending(records))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # the write is not abandoned
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_while_parked())
    assert seen == ["committed"]


def test_the_function_sees_the_callers_context_variables() -> None:
    async def in_request() -> str:
        REQUEST.set("req-1")
        return await run_suspending(REQUEST.get)

    assert asyncio.run(in_request()) == "req-1"


def test_waiting_on_an_event_loop_outside_run_suspending_is_refused_not_blocking() -> None:
    async def on_the_loop() -> None:
        with pytest.raises(RuntimeError, match="would block this event loop"):
            wait(_completed_later("x"))

    asyncio.run(on_the_loop())
    assert wait(_completed_later("in a plain thread")) == "in a plain thread"


def test_group_commit_from_the_loop_parks_each_writer_and_shares_commits(tmp_path: Path) -> None:
    """Sixteen writes started together from one event loop are all committed, in fewer
    commits than writes, and no request thread is used: the callers park on the loop."""
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    create_schema(engine)
    committer = GroupCommitter(engine)

    def write(i: int) -> int:
        return committer.run(lambda s: append_entry(s, action="key", actor=f"w{i}"))

    async def many() -> list[int]:
        threads = threading.active_count()
        seqs = await asyncio.gather(*(run_suspending(write, i) for i in range(16)))
        assert threading.active_count() <= threads + 1  # the writer thread, nothing more
        return list(seqs)

    assert sorted(asyncio.run(many())) == list(range(16))
    assert committer.batches < 16
    committer.close()
    with session(engine) as s:
        assert audit_size(s) == 16
    engine.dispose()
