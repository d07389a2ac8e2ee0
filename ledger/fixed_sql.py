"""Fixed SQL statements run on the DBAPI connection beneath a SQLAlchemy session: the few
statements every admission runs, without SQLAlchemy's per-statement compile and result work
(~50 µs each against ~8 µs for the driver alone).

Contract:

* Every statement is a constant of this codebase, written once with ``?`` placeholders; every
  value is a bound parameter, never formatted into the text (untrusted input is data).
* A statement runs on the session's own DBAPI connection: in the same transaction and the
  same savepoint as the session's other statements, seen by them and rolled back with them.
  Session-held ORM copies of the rows it writes are not refreshed: use these statements only
  on rows the session does not hold (the callers say which).
* PostgreSQL (psycopg) runs the same text with ``%s`` placeholders, and ``FOR UPDATE`` on a
  statement that locks the rows it reads; SQLite's ``BEGIN IMMEDIATE`` already holds the
  database's write lock, and SQLite has no ``FOR UPDATE``.
* ``before_cursor_execute`` listeners of the engine (tracing, tests) see each statement, as
  they see SQLAlchemy's own; without listeners that costs one check.
* Errors are the driver's own exceptions (``sqlite3.Error``, ``psycopg.Error``), not
  SQLAlchemy's: a caller that expects a constraint to fail says so in the statement
  (``ON CONFLICT ... DO NOTHING``) and reads the row count instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session


@dataclass(frozen=True)
class Statement:
    """One fixed statement; ``lock`` appends ``FOR UPDATE`` on PostgreSQL; ``parameters``, if
    given, is the number of ``?`` it must have (e.g. one per state of a constant ``IN`` list,
    written out because the text is never built)."""

    sql: str
    lock: bool = False
    parameters: int | None = None
    _postgresql: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if "%" in self.sql:
            raise ValueError("a fixed statement may not contain '%' (psycopg's placeholders)")
        if self.parameters is not None and self.sql.count("?") != self.parameters:
            raise ValueError(f"{self.sql!r} must bind {self.parameters} parameters")
        text = self.sql.replace("?", "%s") + (" FOR UPDATE" if self.lock else "")
        object.__setattr__(self, "_postgresql", text)

    def text(self, dialect: str) -> str:
        return self.sql if dialect == "sqlite" else self._postgresql


_INSERT_COLUMNS = re.compile(r'INSERT INTO "?(\w+)"? \(([^)]*)\) VALUES')


@dataclass(frozen=True)
class Insert:
    """A fixed ``INSERT`` of one whole row, its statement written out; ``table`` and
    ``columns`` (in the order it binds them) are read from that text, which must bind one
    ``?`` per column. ``matches`` compares them with the table's own columns (tests run it for
    every such constant)."""

    statement: Statement
    table: str = field(init=False)
    columns: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        found = _INSERT_COLUMNS.match(self.statement.sql)
        columns = () if found is None else tuple(
            name.strip().strip('"') for name in found.group(2).split(","))
        if found is None or self.statement.sql.count("?") != len(columns):
            raise ValueError(f"{self.statement.sql!r} must insert one value per column")
        object.__setattr__(self, "table", found.group(1))
        object.__setattr__(self, "columns", columns)

    def matches(self, table: Table) -> bool:
        """Whether this inserts into ``table`` and binds every one of its columns."""
        return (self.table == table.name
                and set(self.columns) == {column.name for column in table.columns})

    def row(self, on: Session | Connection, values: Mapping[str, Any]) -> None:
        """Insert ``values`` (every column; a missing one raises ``KeyError``)."""
        execute(on, self.statement, [values[name] for name in self.columns])


def execute(on: Session | Connection, statement: Statement, parameters: Sequence[Any] = ()) -> Any:
    """Run ``statement`` with ``parameters`` on the DBAPI connection of a session or of a
    SQLAlchemy connection, in its transaction; returns the driver's cursor (``fetchone``,
    ``fetchall``, ``rowcount``)."""
    connection = on.connection() if isinstance(on, Session) else on
    if not connection.in_transaction():  # begin as SQLAlchemy would (the engine's BEGIN hook)
        connection.begin()
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    text, values = statement.text(connection.dialect.name), tuple(parameters)
    listeners = connection.dispatch.before_cursor_execute
    if listeners:  # tracing and tests see these statements as they see SQLAlchemy's own
        listeners(connection, cursor, text, values, None, False)
    cursor.execute(text, values)
    return cursor


def query_now(engine: Engine, statement: Statement, parameters: Sequence[Any] = ()) -> list[Any]:
    """The rows of one read, run alone on a pooled connection of ``engine`` outside any
    transaction (SQLite: an implicit read transaction of that one statement; PostgreSQL: the
    pool rolls back on return). For a single-row read whose caller needs no snapshot shared
    with other reads (a version counter): about a fifth of the calls of ``engine.connect()``
    and a transaction. Listeners do not see it (there is no SQLAlchemy connection)."""
    pooled = engine.raw_connection()
    try:
        cursor = pooled.driver_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(statement.text(engine.dialect.name), tuple(parameters))
        return cursor.fetchall()
    finally:
        pooled.close()
