"""Database engines for the ledger: SQLite (WAL, default) or PostgreSQL by URL.

Concurrency contract: every write transaction that changes budgets or the audit log
takes row locks (``SELECT ... FOR UPDATE`` on PostgreSQL). SQLite has no row locks, so
every SQLite transaction starts with ``BEGIN IMMEDIATE``, which takes the database
write lock up front; together these make admission atomic across threads *and*
processes, never relying on in-process locks.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, create_engine

from ledger import models

DATABASE_URL_ENV = "FEDGATE_DATABASE_URL"


def database_url(deployment_dir: Path) -> str:
    """The URL in ``FEDGATE_DATABASE_URL``, else the deployment's SQLite file."""
    return os.environ.get(DATABASE_URL_ENV) or f"sqlite:///{deployment_dir / 'fedgate.db'}"


def make_engine(url: str) -> Engine:
    """Create an engine with fedgate's transaction semantics for ``url``."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            # Let SQLAlchemy's "begin" hook issue BEGIN IMMEDIATE itself.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection) -> None:  # type: ignore[no-untyped-def]
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def create_schema(engine: Engine) -> None:
    """Create all ledger tables and the audit head row (idempotent)."""
    SQLModel.metadata.create_all(engine)
    with session(engine) as s, s.begin():
        if s.get(models.AuditHead, 1) is None:
            s.add(models.AuditHead(id=1, size=0))


def session(engine: Engine) -> Session:
    """A session whose objects stay readable after commit."""
    return Session(engine, expire_on_commit=False)
