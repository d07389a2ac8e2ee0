"""Shared fixtures: real deployments, real databases (SQLite and PostgreSQL), real keys.

PostgreSQL tests run against the server at 127.0.0.1:5432 (trust auth, database
``test``), each in a schema of its own. When ``CI`` is set they must run: an absent
server is a failure there, not a skip.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from gateway.node.deployment import init_deployment
from ledger import keys
from ledger.db import database_reachable

POSTGRES_URL = os.environ.get(
    "FEDGATE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _postgres_available() -> bool:
    return database_reachable(POSTGRES_URL)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    if not _postgres_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI but not reachable at {POSTGRES_URL}")
        pytest.skip("PostgreSQL not reachable (set CI to make this a failure)")
    schema = "fg_" + uuid.uuid4().hex[:12]
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with admin.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each ledger test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def synthetic_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.datastore import generate_synthetic

    path = tmp_path_factory.mktemp("data") / "users.parquet"
    generate_synthetic(path, users=600, features=20, classes=5, global_model_std=3.0, seed=7,
                       format="parquet")
    return path


def make_node(root: Path, table: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Initialise a deployment on ``db_url`` with dataset ``demo`` (ε_total 4, δ 1e-5, public
    user count N̂ = 480 declared, 5 classes)."""
    from gateway.cli import main as fedgate

    monkeypatch.setenv("FEDGATE_DATABASE_URL", db_url)
    init_deployment(root, owner="owner")
    assert fedgate(["-d", str(root), "dataset", "import", "demo", str(table),
                    "--user-column", "user_id", "--label-column", "label",
                    "--epsilon-total", "4", "--delta", "1e-5", "--public-users", "480",
                    "--num-classes", "5"]) == 0
    return root


@pytest.fixture
def node_dir(tmp_path: Path, synthetic_table: Path, db_url: str,
             monkeypatch: pytest.MonkeyPatch) -> Path:
    """An initialised deployment with dataset ``demo``, on SQLite and on PostgreSQL."""
    return make_node(tmp_path / "node", synthetic_table, db_url, monkeypatch)


def make_researcher(node_dir: Path, name: str, *, group: str = "researchers"):  # type: ignore[no-untyped-def]
    """Register a fresh researcher key; returns the private key."""
    from gateway.cli import main as fedgate

    private_key = keys.generate_private_key()
    _, public_path = keys.write_key_pair(private_key, node_dir / f"{name}-{uuid.uuid4().hex[:6]}")
    assert fedgate(["-d", str(node_dir), "researcher", "add", name, "--public-key",
                    str(public_path), "--group", group]) == 0
    return private_key


def charged(job: dict) -> dict:  # type: ignore[type-arg]
    """``job`` (a job.json document written by a test, not by the gateway) with the
    ``charged_cost`` a ledger would have stored for it: exactly the event it executes."""
    from engine.job import JobSpec

    return {**job, "charged_cost": JobSpec.from_json(job).executed_cost().to_json()}


ISOLATED_ENV = "FEDGATE_TEST_IN_OWN_PROCESS"


_SELECTED: list[str] = []
"""The node ids of this session's selected tests (``pytest_collection_modifyitems``)."""
_CHILD_OUTCOMES: dict[str, tuple[str, str]] = {}
"""Outcomes from a child process that ran cases of one test: node id → ("passed" | "skipped"
| "failed", what the child reported)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _SELECTED[:] = [item.nodeid for item in items]


def in_own_process(test):  # type: ignore[no-untyped-def]
    """Run a test that executes TFF computations in a child pytest process of its own.

    TFF's runtime starts gRPC in the process; a process that later forks (every engine launch
    and sandbox probe does) can then abort in the child (gRPC's fork handlers, seen as bwrap
    exiting with SIGABRT). The child runs the same test id; its process group is killed when
    it ends, TFF's ``worker_binary`` included, and its output is shown if it fails. The
    selected cases of a parametrized test share one child (TensorFlow is imported once): the
    first case runs them all and each case then reports its own outcome.
    """
    import functools

    @functools.wraps(test)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        if os.environ.get(ISOLATED_ENV):
            return test(*args, **kwargs)
        node_id = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]
        if node_id not in _CHILD_OUTCOMES:
            function = node_id.split("[", 1)[0]
            cases = [n for n in _SELECTED if n.split("[", 1)[0] == function
                     and n not in _CHILD_OUTCOMES] or [node_id]
            if node_id not in cases:
                cases = [node_id]
            _CHILD_OUTCOMES.update(_run_in_child(cases))
        outcome, report = _CHILD_OUTCOMES.pop(node_id)
        if outcome == "skipped":
            pytest.skip(report)
        assert outcome == "passed", report

    return wrapper


def _run_in_child(node_ids: list[str]) -> dict[str, tuple[str, str]]:
    """Run ``node_ids`` in one child pytest (its process group killed at the end); each id's
    outcome as the child's JUnit report has it, with the tail of the child's output if it
    failed (or left no report: a crash fails every case)."""
    import signal
    import subprocess
    import sys
    import tempfile
    import xml.etree.ElementTree as ElementTree

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile() as output:
        report = Path(tmp) / "report.xml"
        child = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             f"--junitxml={report}", "-o", "junit_family=xunit1", *node_ids],
            env={**os.environ, ISOLATED_ENV: "1"}, stdout=output, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, cwd=root)
        try:
            child.wait(timeout=900 * len(node_ids))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        output.seek(0)
        text = output.read().decode(errors="replace")
        outcomes: dict[str, tuple[str, str]] = {}
        if report.exists() and child.returncode in (0, 1):  # 1: some case failed
            for case in ElementTree.parse(report).getroot().iter("testcase"):
                problems = {p.tag: p for p in case if p.tag in ("failure", "error", "skipped")}
                kind = ("failed" if "failure" in problems or "error" in problems else
                        "skipped" if problems else "passed")
                detail = "\n".join(f"{p.get('message') or ''}\n{p.text or ''}"
                                   for p in problems.values())
                outcomes[f"{case.get('file')}::{case.get('name')}"] = (kind, detail)
    tail = f"\n--- child output (exit {child.returncode}) ---\n{text[-6000:]}"
    results = {}
    for node in node_ids:
        kind, detail = outcomes.get(node, ("failed", "no result for this case"))
        results[node] = (kind, detail if kind != "failed" else detail + tail)
    return results


_SESSION_ENV = "FEDGATE_TEST_SESSION"


def _worker_binaries() -> set[int]:
    """Pids of live TFF ``worker_binary`` processes started under this test session (they
    inherit its marker variable; other sessions' and benchmarks' workers are not ours)."""
    marker = f"{_SESSION_ENV}={os.environ.get(_SESSION_ENV, '')}".encode()
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if b"worker_binary" not in f.read().split(b"\0")[0]:
                        continue
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        found.add(int(entry.name))
    return found


_WORKERS_AT_START: set[int] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    os.environ.setdefault(_SESSION_ENV, uuid.uuid4().hex)  # child sessions keep the parent's
    _WORKERS_AT_START.update(_worker_binaries())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No TFF worker_binary may outlive the test session: a leaked one can hold CI's output
    pipe open forever. Leaked workers are killed and the session fails, naming them."""
    import signal

    if os.environ.get(ISOLATED_ENV):
        return  # a child session of in_own_process: its parent kills its process group
    leaked = _worker_binaries() - _WORKERS_AT_START
    for pid in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if leaked:
        print(f"\nfedgate tests: {len(leaked)} TFF worker_binary process(es) outlived the "
              "session (killed); run TFF computations under tests.conftest.in_own_process")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
