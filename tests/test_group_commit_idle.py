"""The group-commit writer holds nothing while idle: its thread leaves after
``IDLE_SECONDS`` without work, so a node nobody disposes (a dropped app, a test's node) lets its
engine and that engine's pooled database connections be collected. Before, the writer thread
waited forever and kept every such engine, and a PostgreSQL connection each, alive: a test
run exhausted the server's 100 connections."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path

from ledger import group_commit
from ledger.audit import append_entry
from ledger.db import create_schema, make_engine
from ledger.group_commit import GroupCommitter


def _writers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fedgate-group-commit"]


def test_an_idle_writer_leaves_and_a_dropped_committer_is_collected(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    create_schema(engine)
    before = set(_writers())
    committer = GroupCommitter(engine)
    assert committer.run(lambda s: append_entry(s, action="key", actor="first")) == 0
    deadline = time.monotonic() + group_commit.IDLE_SECONDS + 5.0
    while set(_writers()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(_writers()) - before == set()
    # idle, it serves again: a new writer starts for the next request
    assert committer.run(lambda s: append_entry(s, action="key", actor="second")) == 1
    committer.close()
    dropped = weakref.ref(committer)
    del committer
    gc.collect()
    assert dropped() is None
    engine.dispose()


def test_requests_arriving_as_the_writer_leaves_are_all_committed(tmp_path: Path) -> None:
    # Requests spaced about one idle period apart race the writer's exit; none may hang.
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    create_schema(engine)
    committer = GroupCommitter(engine)
    indices = []
    for i in range(4):
        indices.append(committer.run(lambda s, i=i: append_entry(s, action="key", actor=f"a{i}")))
        time.sleep(group_commit.IDLE_SECONDS * (0.9 + 0.1 * i))
    assert indices == [0, 1, 2, 3]
    committer.close()
    engine.dispose()
