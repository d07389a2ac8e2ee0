"""Version counters for data a process caches, correct across processes.

Contract:

* ``bump_version(session, name)`` runs inside the write transaction that changes the data
  ``name`` stands for, so the counter and the change commit together or not at all. Every
  writer of that data calls it (``REGISTRY``: ``ledger.registry``, the only writer of keys).
* A reader reads the counter first (``read_version_now``) and the data after it, in a later
  transaction: the data is then at least as new as the counter. Data cached under a counter value is
  therefore never older than that value, and :class:`VersionedCache` hands it out only to a
  reader that read the same value; any other value misses, and the reader reads the database.
* ``create_schema`` creates the counters at 0. A counter without a row reads as ``None``, and
  nothing is cached at ``None``: in doubt, the database is read.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from ledger.fixed_sql import Statement, query_now
from ledger.models import LedgerVersion

REGISTRY = "registry"
"""The key registry: principals, their keys, roles, groups and statuses."""
COUNTERS = (REGISTRY,)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def bump_version(session: Session, name: str) -> None:
    """Count one change of ``name``'s data, in the caller's write transaction."""
    table = LedgerVersion.__table__  # type: ignore[attr-defined]
    changed = session.connection().execute(
        update(table).where(table.c.name == name).values(version=table.c.version + 1))
    if not changed.rowcount:
        session.connection().execute(table.insert().values(name=name, version=1))


_READ_VERSION = Statement("SELECT version FROM ledgerversion WHERE name = ?")


def read_version_now(engine: Engine, name: str) -> int | None:
    """The counter of ``name`` as last committed, read alone (``ledger.fixed_sql.query_now``):
    for a reader that reads the data, if it must, after it and in a later transaction (the
    data is then at least as new as the counter, as the module contract requires)."""
    rows = query_now(engine, _READ_VERSION, (name,))
    return int(rows[0][0]) if rows else None


class VersionedCache(Generic[K, V]):
    """Values read at one version of their data. ``get`` answers only a reader at exactly
    that version; ``put`` at a newer version drops everything older. Thread-safe by
    replacing one (version, values) pair at a time."""

    def __init__(self) -> None:
        self._state: tuple[int, dict[K, V]] = (-1, {})

    def get(self, version: int | None, key: K) -> V | None:
        cached_at, values = self._state
        return values.get(key) if version is not None and cached_at == version else None

    def put(self, version: int | None, key: K, value: V) -> None:
        cached_at, values = self._state
        if version is None:
            return
        if version > cached_at:
            self._state = (version, {key: value})
        elif version == cached_at:
            values[key] = value
