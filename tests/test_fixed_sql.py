"""Fixed statements (``ledger.fixed_sql``) run in the transaction of the session or connection
they are given, on SQLite and PostgreSQL, and never take text from values."""

from __future__ import annotations

import pytest
from sqlmodel import select

from ledger.audit import append_entry, audit_size
from ledger.db import create_schema, make_engine, make_read_engine, session
from ledger.fixed_sql import Statement, execute
from ledger.models import SeenNonce
from ledger.registry import remember_nonce

_COUNT_NONCES = Statement("SELECT count(*) FROM seennonce")


def test_a_statement_with_a_percent_sign_is_refused_before_it_can_run() -> None:
    with pytest.raises(ValueError, match="%"):
        Statement("SELECT 1 WHERE 'a' LIKE '%'")


def test_a_statement_binding_the_wrong_number_of_parameters_is_refused_at_import() -> None:
    with pytest.raises(ValueError, match="must bind 3 parameters"):
        Statement("SELECT 1 FROM job WHERE state IN (?, ?)", parameters=3)
    assert Statement("SELECT 1 FROM job WHERE state IN (?, ?)", parameters=2)


def test_placeholders_and_row_locks_follow_the_dialect() -> None:
    statement = Statement("SELECT size FROM audithead WHERE id = ?", lock=True)
    assert statement.text("sqlite") == "SELECT size FROM audithead WHERE id = ?"
    assert statement.text("postgresql") == "SELECT size FROM audithead WHERE id = %s FOR UPDATE"


def test_fixed_statements_commit_and_roll_back_with_the_session(db_url: str) -> None:
    engine = make_engine(db_url)
    create_schema(engine)
    try:
        with session(engine) as s, s.begin():
            assert remember_nonce(s, key_id="k", nonce="kept", expires_at=1e12)
            with pytest.raises(RuntimeError), s.begin_nested():
                assert remember_nonce(s, key_id="k", nonce="rolled-back", expires_at=1e12)
                append_entry(s, action="key", actor="test")
                raise RuntimeError
            # a refused nonce (ON CONFLICT DO NOTHING) leaves the transaction usable, on
            # PostgreSQL too, where a failed statement would abort it
            assert not remember_nonce(s, key_id="k", nonce="kept", expires_at=1e12)
            assert append_entry(s, action="key", actor="test") == 0
        with session(engine) as s:
            assert s.exec(select(SeenNonce.nonce)).all() == ["kept"]  # reviewed: ORM query, not exec
            assert audit_size(s) == 1
    finally:
        engine.dispose()


def test_a_fixed_statement_on_a_fresh_connection_runs_in_its_snapshot(db_url: str) -> None:
    """On a connection that has not begun, ``execute`` begins it first (the engine's BEGIN
    hook: a deferred snapshot on SQLite), so what it reads and what the connection reads
    after it come from one snapshot."""
    engine = make_engine(db_url)
    create_schema(engine)
    reads = make_read_engine(db_url, engine)
    try:
        with reads.connect() as c:
            assert execute(c, _COUNT_NONCES).fetchone()[0] == 0
            assert c.in_transaction()
            with session(engine) as s, s.begin():
                remember_nonce(s, key_id="k", nonce="later", expires_at=1e12)
            if engine.dialect.name == "sqlite":  # the snapshot predates the commit
                assert execute(c, _COUNT_NONCES).fetchone()[0] == 0
        with reads.connect() as c:
            assert execute(c, _COUNT_NONCES).fetchone()[0] == 1
    finally:
        reads.dispose()
        engine.dispose()


def test_statement_listeners_see_fixed_statements_as_they_see_sqlalchemys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import event

    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    create_schema(engine)
    seen: list[tuple[str, tuple[object, ...]]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def note(_connection, _cursor, statement, parameters, *_rest) -> None:  # type: ignore[no-untyped-def]
        seen.append((statement, parameters))

    try:
        with session(engine) as s, s.begin():
            remember_nonce(s, key_id="k", nonce="n", expires_at=1.0)
        assert any(statement.startswith("INSERT INTO seennonce") and parameters == ("k", "n", 1.0)
                   for statement, parameters in seen)
    finally:
        engine.dispose()


def test_a_read_alone_sees_the_last_commit_and_holds_no_connection_or_snapshot(
        db_url: str) -> None:
    """``query_now`` (the version counters' read): each call sees what was committed before
    it, and it returns its connection at once, leaving no transaction open on it."""
    from ledger.fixed_sql import query_now

    engine = make_engine(db_url)
    create_schema(engine)
    reads = make_read_engine(db_url, engine)
    try:
        assert query_now(reads, _COUNT_NONCES) == [(0,)]
        with session(engine) as s, s.begin():
            assert remember_nonce(s, key_id="k", nonce="n", expires_at=1e12)
        assert query_now(reads, _COUNT_NONCES) == [(1,)]
        assert reads.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        reads.dispose()
        engine.dispose()


def test_each_fixed_insert_binds_exactly_the_columns_of_its_table() -> None:
    """The admission's inserts are written out (no SQL is built from strings); a column added
    to a model without adding it to its insert fails here, not at the first admission."""
    from ledger.budget import _INSERT_JOB
    from ledger.fixed_sql import Insert
    from ledger.metering import _INSERT_METER
    from ledger.models import Job, JobMeter, JobReview, ResearcherEpsilon
    from ledger.researcher_epsilon import _INSERT_TOTAL
    from ledger.review import _INSERT_REVIEW

    for insert, model in ((_INSERT_JOB, Job), (_INSERT_REVIEW, JobReview),
                          (_INSERT_METER, JobMeter), (_INSERT_TOTAL, ResearcherEpsilon)):
        assert insert.matches(model.__table__)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="must insert one value per column"):
        Insert(Statement("INSERT INTO job (id, dataset) VALUES (?)"))
    assert not _INSERT_JOB.matches(JobReview.__table__)  # type: ignore[attr-defined]
