"""Synchronous code on an event loop that suspends, instead of blocking, while it waits for
another thread (the ledger's group-commit writer): a request's only thread hop is its write.

Admission is synchronous code (reads, policy, accounting, then one write through
``ledger.group_commit``). Run in a worker thread per step, each request crossed threads three
times and, with dozens of requests in flight, every ``sqlite3`` call handed the GIL to another
thread (hundreds of futex calls per request). Run on the event loop's thread here, it crosses
only to the writer and back.

Contract:

* ``await run_suspending(fn, *args)`` runs ``fn(*args)`` on the calling event loop's thread,
  in a greenlet of its own with a copy of the caller's context variables. Where ``fn`` (or
  anything it calls) waits with :func:`wait` for a future that another thread completes, the
  greenlet is parked and the loop serves other requests until the future is done; then ``fn``
  continues with its result (or its exception raised at the :func:`wait`). ``fn``'s return
  value or exception is ``run_suspending``'s.
* Requests interleave only at those waits: between two of them ``fn`` runs without
  interruption, as it did alone in its thread, and other requests on the loop wait for it.
  So ``fn`` must not block for long anywhere else (its reads are short; the writer does the
  commit and its fsync).
* A wait is not abandoned: if the awaiting task is cancelled while the future is pending, the
  future is still awaited and its outcome given to ``fn``, as a worker thread would have
  finished; the cancellation is raised once ``fn`` has returned.
* :func:`wait` outside ``run_suspending`` blocks the calling thread, as ``future.result()``
  does, except on a thread that runs an event loop, where blocking would stall every request:
  there it raises ``RuntimeError``.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from greenlet import getcurrent, greenlet

T = TypeVar("T")


class _Suspendable(greenlet):  # type: ignore[misc]
    """The greenlet ``run_suspending`` runs its function in (its parent is the loop's)."""


async def run_suspending(fn: Callable[..., T], /, *args: Any) -> T:
    """``fn(*args)`` on this thread, parked at each :func:`wait` (see the module contract)."""
    child = _Suspendable(fn)
    child.gr_context = contextvars.copy_context()
    outcome = child.switch(*args)
    cancelled = False
    while not child.dead:  # ``fn`` switched back with the future it waits for
        pending = asyncio.wrap_future(outcome)
        while not pending.done():
            try:
                await asyncio.shield(pending)
            except asyncio.CancelledError:
                cancelled = cancelled or not pending.done()  # this task's, not the future's
            except BaseException:  # noqa: S110 - the future's own error, given to ``fn`` below
                pass
        error = asyncio.CancelledError() if pending.cancelled() else pending.exception()
        outcome = child.throw(error) if error is not None else child.switch(pending.result())
    if cancelled:
        raise asyncio.CancelledError
    return outcome  # type: ignore[no-any-return]


def wait(future: Future[T]) -> T:
    """``future``'s result: parks the calling ``run_suspending`` function until it is done, or
    blocks a thread that runs no event loop. Raises what the future raised."""
    current = getcurrent()
    if isinstance(current, _Suspendable):
        return current.parent.switch(future)  # type: ignore[no-any-return]
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return future.result()
    raise RuntimeError("waiting for the ledger writer would block this event loop; call the "
                       "function with ledger.suspend.run_suspending or in a worker thread")
