"""Group commit: concurrent write transactions decided one after another by a single writer
inside one database transaction, sharing one commit (one fsync).

Contract:

* ``GroupCommitter.run(work)`` waits until ``work``'s effects are committed and on disk,
  then returns its result (a caller on the event loop, in ``ledger.suspend.run_suspending``,
  is parked meanwhile and the loop serves other requests; a worker thread blocks); nothing
  is acknowledged before the commit, so a caller that answers only after ``run`` returns
  never acknowledges a write a crash can lose.
* The writer thread takes every waiting request (at most ``max_batch``), opens one write
  transaction (``BEGIN IMMEDIATE`` on SQLite) on one connection, and runs each ``work`` in
  order inside a SAVEPOINT of its own, issued on the driver (``run``: the work gets an ORM
  session joined to that transaction, flushed before the savepoint is released, and replaced
  after a work that fails; ``run_on_connection``, for fixed statements only: the connection
  itself): each sees the effects of those before it, exactly as if they had committed one by
  one in that order, so invariants checked inside a transaction (the privacy filter's, under
  the dataset row lock) hold unchanged. A ``work`` that raises has its savepoint rolled back
  and its exception re-raised to its caller alone; the others commit. If the commit itself
  fails, or a savepoint cannot be opened, rolled back or released, every request of the
  batch gets the error and none of them took effect.
* On PostgreSQL one transaction of several requests would hold the audit head's lock while
  it takes a later request's dataset lock, against the fixed lock order (job → dataset →
  audit head) that other writers follow: ``run`` names the dataset rows each ``work`` will
  lock, and the writer locks the batch's rows in name order before any ``work`` runs.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session

from ledger.audit import lock_head
from ledger.fixed_sql import Statement, execute
from ledger.suspend import wait

T = TypeVar("T")

MAX_BATCH = 64
IDLE_SECONDS = 1.0
"""The writer thread leaves after this long without work (the next ``run`` starts another):
an idle node holds no thread, and a committer nobody closed lets its engine, with that
engine's pooled connections, be collected."""


@dataclass
class _Request:
    work: Callable[[Any], Any]
    datasets: tuple[str, ...]
    on_connection: bool = False
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
        return self._run(_Request(work, tuple(datasets)))

    def run_on_connection(self, work: Callable[[Connection], T], *,
                          datasets: Iterable[str] = ()) -> T:
        """:meth:`run` for a ``work`` that writes with fixed statements only
        (``ledger.fixed_sql``) and holds no ORM objects: it gets the batch's connection, in a
        savepoint issued on the driver, without an ORM session or its savepoint machinery
        (the admission hot path)."""
        return self._run(_Request(work, tuple(datasets), on_connection=True))

    def _run(self, request: _Request) -> Any:
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
            with self.engine.connect() as connection:
                connection.begin()  # BEGIN IMMEDIATE on SQLite (``ledger.db``)
                _lock_datasets(connection, sorted({name for r in batch for name in r.datasets}))
                orm: Session | None = None  # joins the connection's transaction, if needed
                for request in batch:
                    try:
                        if request.on_connection:
                            outcomes.append((True, _in_savepoint(connection, request.work)))
                            continue
                        if orm is None:
                            orm = Session(bind=connection, expire_on_commit=False)
                        outcomes.append((True, _in_savepoint(
                            connection, functools.partial(_flushed, orm, request.work))))
                    except Exception as error:  # re-raised to its own caller only
                        outcomes.append((False, error))
                        if orm is not None and not request.on_connection:
                            orm.close()  # objects of the rolled-back work: a new session next
                            orm = None
                if orm is not None:
                    orm.close()  # leaves the connection's transaction to the commit below
                connection.commit()
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


def _flushed(orm: Session, work: Callable[[Session], T], _: Connection) -> T:
    """``work(orm)``, its changes flushed to the connection (inside the caller's savepoint)."""
    result = work(orm)
    orm.flush()
    return result


def _in_savepoint(connection: Connection, work: Callable[[Connection], T]) -> T:
    """``work(connection)`` in a SAVEPOINT issued on the driver: rolled back alone if it raises.
    SQLAlchemy's own savepoints (ORM works) are never open around or inside it. If the
    savepoint itself cannot be opened, rolled back or released, the transaction's state is
    unknown: the connection is invalidated, so the batch's commit fails and no request of it
    is acknowledged (rather than committing a work reported as failed, or the reverse)."""
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    _savepoint(connection, cursor, "SAVEPOINT fedgate_work")
    try:
        result = work(connection)
    except BaseException:
        _savepoint(connection, cursor, "ROLLBACK TO SAVEPOINT fedgate_work",
                   "RELEASE SAVEPOINT fedgate_work")
        raise
    _savepoint(connection, cursor, "RELEASE SAVEPOINT fedgate_work")
    return result


def _savepoint(connection: Connection, cursor: Any, *statements: str) -> None:
    try:
        for statement in statements:  # constants above: no values
            cursor.execute(statement)
    except BaseException:
        # End the transaction before closing: SQLite keeps a connection closed with a live
        # statement open, and its write lock held, until that statement is collected.
        with contextlib.suppress(Exception):
            connection.connection.driver_connection.rollback()  # type: ignore[union-attr]
        cursor.close()
        connection.invalidate()
        raise


_LOCK_DATASET = Statement("SELECT name FROM dataset WHERE name = ?", lock=True)


def _lock_datasets(connection: Connection, names: list[str]) -> None:
    """Lock the batch's dataset rows in name order, then the audit head (PostgreSQL's
    ``FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE`` already holds the whole database)."""
    if connection.dialect.name == "sqlite" or not names:
        return
    for name in names:
        execute(connection, _LOCK_DATASET, (name,)).fetchall()
    lock_head(connection)
