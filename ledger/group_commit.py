"""Group commit: concurrent write transactions decided one after another by a single writer
inside one database transaction, sharing one commit (one fsync).

Contract:

* ``GroupCommitter.run(work)`` waits until ``work``'s effects are committed and on disk,
  then returns its result (a caller on the event loop, in ``ledger.suspend.run_suspending``,
  is parked meanwhile and the loop serves other requests; a worker thread blocks); nothing
  is acknowledged before the commit, so a caller that answers only after ``run`` returns
  never acknowledges a write a crash can lose.
* The writer thread takes every waiting request (at most ``max_batch``), opens one write
  transaction (``BEGIN IMMEDIATE`` on SQLite), and runs each ``work`` in order inside a
  SAVEPOINT of its own: each sees the effects of those before it, exactly as if they had
  committed one by one in that order, so invariants checked inside a transaction (the
  privacy filter's, under the dataset row lock) hold unchanged. A ``work`` that raises has
  its savepoint rolled back and its exception re-raised to its caller alone; the others
  commit. If the commit itself fails, every request of the batch gets the error and none
  of them took effect.
* On PostgreSQL one transaction of several requests would hold the audit head's lock while
  it takes a later request's dataset lock, against the fixed lock order (job → dataset →
  audit head) that other writers follow: ``run`` names the dataset rows each ``work`` will
  lock, and the writer locks the batch's rows in name order before any ``work`` runs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from ledger.db import session
from ledger.models import AuditHead, Dataset
from ledger.suspend import wait

T = TypeVar("T")

MAX_BATCH = 64
IDLE_SECONDS = 1.0
"""The writer thread leaves after this long without work (the next ``run`` starts another):
an idle node holds no thread, and a committer nobody closed lets its engine, with that
engine's pooled connections, be collected."""


@dataclass
class _Request:
    work: Callable[[Session], Any]
    datasets: tuple[str, ...]
    done: Future[Any] = field(default_factory=Future)


class GroupCommitter:
    """One writer thread for ``engine``; started on first use, gone after
    :data:`IDLE_SECONDS` without work or on :meth:`close`."""

    def __init__(self, engine: Engine, *, max_batch: int = MAX_BATCH) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.batches = 0  # commits made (for tests and benchmarks)

    def run(self, work: Callable[[Session], T], *, datasets: Iterable[str] = ()) -> T:
        """``work(session)`` inside the next group transaction; returns its result once the
        transaction is committed, or raises what ``work`` (or the commit) raised."""
        request = _Request(work, tuple(datasets))
        with self._lock:  # the put too: an idle writer cannot leave between the check and it
            if self._thread is None:  # first use, or the last writer left idle or was closed
                self._thread = threading.Thread(target=self._write, name="fedgate-group-commit",
                                                daemon=True)
                self._thread.start()
            self._queue.put(request)
        return wait(request.done)  # parks a caller on the event loop (``ledger.suspend``)

    def waiting(self) -> int:
        """How many requests are queued for the writer (not yet in a transaction)."""
        return self._queue.qsize()

    def close(self) -> None:
        """Stop the writer after the requests already queued (it starts again if used)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _write(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:  # leave only if nothing came meanwhile (run puts under it)
                    if self._queue.empty() and self._thread is threading.current_thread():
                        self._thread = None
                        return
                continue
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(more)
            self._commit(batch)

    def _commit(self, batch: list[_Request]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            with session(self.engine) as s, s.begin():
                _lock_datasets(s, sorted({name for r in batch for name in r.datasets}))
                for request in batch:
                    try:
                        with s.begin_nested():
                            outcomes.append((True, request.work(s)))
                    except Exception as error:  # re-raised to its own caller only
                        outcomes.append((False, error))
        except BaseException as error:  # nothing of the batch happened; the writer goes on
            for request in batch:
                request.done.set_exception(error)
            return
        self.batches += 1
        for request, (ok, value) in zip(batch, outcomes, strict=True):
            if ok:
                request.done.set_result(value)
            else:
                request.done.set_exception(value)


def _lock_datasets(s: Session, names: list[str]) -> None:
    """Lock the batch's dataset rows in name order, then the audit head (PostgreSQL's
    ``FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE`` already holds the whole database)."""
    if s.get_bind().dialect.name == "sqlite" or not names:
        return
    # reviewed: ORM query with bound parameters (dataset names), not exec of text
    s.exec(select(Dataset.name).where(Dataset.name.in_(names))  # type: ignore[attr-defined]  # reviewed: ORM query, not exec
           .order_by(Dataset.name).with_for_update()).all()
    s.exec(select(AuditHead.id).where(AuditHead.id == 1)  # reviewed: ORM query, not exec
           .with_for_update()).all()
