"""The ledger's database engines: schema migration of indexes and read-only snapshot reads,
on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import OperationalError

from ledger.db import create_schema, make_engine, make_read_engine, session
from ledger.models import AuditHead

RESEARCHER_INDEX = "ix_job_dataset_researcher_created"


def _job_indexes(engine) -> set[str]:  # type: ignore[no-untyped-def]
    return {index["name"] for index in inspect(engine).get_indexes("job")}


def test_opening_a_ledger_created_before_an_index_existed_creates_it(db_url: str) -> None:
    engine = make_engine(db_url)
    create_schema(engine)
    with engine.begin() as connection:
        connection.execute(text(f"DROP INDEX {RESEARCHER_INDEX}"))
    assert RESEARCHER_INDEX not in _job_indexes(engine)
    create_schema(engine)
    assert RESEARCHER_INDEX in _job_indexes(engine)
    create_schema(engine)  # idempotent
    engine.dispose()


def test_the_researcher_epsilon_sum_reads_the_composite_index_not_the_whole_dataset(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    create_schema(engine)
    with engine.connect() as connection:
        plan = connection.execute(text(
            "EXPLAIN QUERY PLAN SELECT sum(epsilon) FROM job WHERE researcher = 'a' AND "
            "dataset = 'd' AND budget_state IN ('reserved', 'committed') AND created_at >= 0"
        )).all()
    assert any(RESEARCHER_INDEX in str(row) for row in plan), plan
    engine.dispose()


def test_a_read_session_sees_the_last_commit_and_cannot_write(db_url: str) -> None:
    engine = make_engine(db_url)
    create_schema(engine)
    reads = make_read_engine(db_url, engine)
    with session(engine) as s, s.begin():
        s.get(AuditHead, 1).size = 7  # type: ignore[union-attr]
    with session(reads) as s:
        assert s.get(AuditHead, 1).size == 7  # type: ignore[union-attr]
    if db_url.startswith("sqlite"):
        with pytest.raises(OperationalError, match="readonly"), session(reads) as s, s.begin():
            s.get(AuditHead, 1).size = 8  # type: ignore[union-attr]
        with session(engine) as s:
            assert s.get(AuditHead, 1).size == 7  # type: ignore[union-attr]
    reads.dispose()
    engine.dispose()


def test_a_read_session_does_not_wait_for_an_open_write_transaction(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """While a writer holds SQLite's write lock (BEGIN IMMEDIATE), a snapshot read answers at
    once with the last commit instead of queueing behind it."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    create_schema(engine)
    reads = make_read_engine(url, engine)
    with session(engine) as writer, writer.begin():
        writer.get(AuditHead, 1).size = 5  # type: ignore[union-attr]
        writer.flush()
        with reads.connect() as connection:
            connection.exec_driver_sql("PRAGMA busy_timeout=0")  # waiting would fail, not block
            assert connection.execute(select(AuditHead.size)).scalar_one() == 0
    reads.dispose()
    engine.dispose()


def test_a_busy_gateway_keeps_its_connections_instead_of_reopening_one_per_request(
        db_url: str) -> None:
    """16 requests holding a connection each, twice over, open 16 connections, not 16 + 11:
    SQLAlchemy's default pool of 5 closed every connection beyond it on return, so each busy
    request opened a new one (the SQLite PRAGMAs, or a PostgreSQL server process)."""
    from sqlalchemy import event

    engine = make_engine(db_url)
    reads = make_read_engine(db_url, engine)
    opened = []
    event.listen(reads, "connect", lambda *_: opened.append(1))
    try:
        for _ in range(2):
            held = [reads.connect() for _ in range(16)]
            for connection in held:
                connection.execute(text("SELECT 1"))
            for connection in held:
                connection.close()
        assert len(opened) == 16
    finally:
        reads.dispose()
        engine.dispose()


def test_savepoint_journals_stay_in_memory_not_a_temporary_file_per_batch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every group-committed write runs in a SAVEPOINT, whose statement journal SQLite keeps in
    a temporary file by default: created, unlinked and closed again for every batch (an
    openat, unlink, two access and a close per admission under load). Both engines keep
    temporary storage in memory."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    reads = make_read_engine(url, engine)
    for each in (engine, reads):
        with each.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA temp_store").scalar_one() == 2  # MEMORY
    reads.dispose()
    engine.dispose()
