"""Database engines for the ledger: SQLite (WAL, default) or PostgreSQL by URL.

Concurrency contract: every write transaction that changes budgets or the audit log
takes row locks (``SELECT ... FOR UPDATE`` on PostgreSQL). SQLite has no row locks, so
every SQLite transaction starts with ``BEGIN IMMEDIATE``, which takes the database
write lock up front; together these make admission atomic across threads *and*
processes, never relying on in-process locks.

Reads that change nothing use :func:`make_read_engine`: on SQLite a deferred ``BEGIN`` (a WAL
snapshot that takes no write lock, so a read never queues behind a writer or makes one
wait) on connections that refuse writes (``PRAGMA query_only``); on PostgreSQL the write
engine itself (a plain read takes no row lock).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.schema import CreateIndex
from sqlmodel import Session, SQLModel, create_engine

from ledger import models, versions

DATABASE_URL_ENV = "FEDGATE_DATABASE_URL"


def database_url(deployment_dir: Path) -> str:
    """The URL in ``FEDGATE_DATABASE_URL``, else the deployment's SQLite file."""
    return os.environ.get(DATABASE_URL_ENV) or f"sqlite:///{deployment_dir / 'fedgate.db'}"


def make_engine(url: str) -> Engine:
    """Create an engine with fedgate's transaction semantics for ``url``."""
    if url.startswith("sqlite"):
        return _sqlite_engine(url, begin="BEGIN IMMEDIATE")
    return create_engine(url, pool_pre_ping=True, pool_size=POSTGRES_POOL_SIZE, max_overflow=0)


def make_read_engine(url: str, write_engine: Engine) -> Engine:
    """The engine for reads that change nothing: SQLite connections whose transactions begin
    deferred (a snapshot of the last commit, no write lock) and refuse any write
    (``query_only``: a write attempted through it fails instead of upgrading the lock);
    on PostgreSQL ``write_engine`` itself."""
    if url.startswith("sqlite"):
        return _sqlite_engine(url, begin="BEGIN", query_only=True)
    return write_engine


SQLITE_POOL_SIZE = 40
"""Connections a SQLite engine keeps open: as many as AnyIO's worker threads (40 by default),
each of which may hold one. With SQLAlchemy's default of 5 a busy gateway closed and reopened
connections on every request, each open running the PRAGMAs below."""
POSTGRES_POOL_SIZE = 16
"""Connections a PostgreSQL engine keeps open, and at most opens (no overflow): a new one is a
server process, so they are kept, and a thread beyond them waits for one. The cap stays near
SQLAlchemy's default of 15 so that several gateways fit the server's ``max_connections``."""


def _sqlite_engine(url: str, *, begin: str, query_only: bool = False) -> Engine:
    if sqlite3.sqlite_version_info < (3, 35):  # UPDATE ... RETURNING (ledger.audit)
        raise RuntimeError(f"the ledger needs SQLite 3.35 or newer; this Python has "
                           f"{sqlite3.sqlite_version}")
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60},
                           pool_size=SQLITE_POOL_SIZE)

    @event.listens_for(engine, "connect")
    def _sqlite_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        # Let SQLAlchemy's "begin" hook issue the BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        # Statement journals of savepoints (one per group-committed write) in memory, not a
        # temporary file created and unlinked for every batch.
        cursor.execute("PRAGMA temp_store=MEMORY")
        if query_only:
            cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(connection) -> None:  # type: ignore[no-untyped-def]
        # On the driver's connection: a constant, once per transaction, without SQLAlchemy's
        # statement machinery.
        connection.connection.driver_connection.execute(begin)

    return engine


def create_schema(engine: Engine) -> None:
    """Create all ledger tables, their indexes, the audit head row and the version counters
    (``ledger.versions``) (idempotent).

    An index added to the models after a database was created is created here too (create_all
    only indexes the tables it creates): that is the migration path of an existing node."""
    SQLModel.metadata.create_all(engine)
    # Only the missing ones: CREATE INDEX locks its table even when the index exists (on
    # PostgreSQL a ShareLock, which deadlocked with running admissions in the soak).
    present = inspect(engine)
    for table in SQLModel.metadata.sorted_tables:
        names = {index["name"] for index in present.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in names:
                with engine.begin() as connection:
                    connection.execute(CreateIndex(index, if_not_exists=True))
    with session(engine) as s, s.begin():
        if s.get(models.AuditHead, 1) is None:
            s.add(models.AuditHead(id=1, size=0))
        for name in versions.COUNTERS:
            if s.get(models.LedgerVersion, name) is None:
                s.add(models.LedgerVersion(name=name, version=0))


def session(engine: Engine) -> Session:
    """A session whose objects stay readable after commit."""
    return Session(engine, expire_on_commit=False)


def database_reachable(url: str, *, timeout_seconds: int = 3) -> bool:
    """Whether the PostgreSQL server at ``url`` answers a query within ``timeout_seconds``
    (the tests and the benchmarks use it to decide whether to run their PostgreSQL rows)."""
    try:
        engine = create_engine(url, connect_args={"connect_timeout": timeout_seconds})
        try:
            with engine.connect() as connection:
                connection.execute(text("select 1"))
        finally:
            engine.dispose()
        return True
    except Exception:
        return False
