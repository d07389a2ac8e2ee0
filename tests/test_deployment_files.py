"""What `fedgate init` and `fedgate dataset import` write, and where (issue 22).

A dataset's name becomes a directory under the deployment, a policy cell and a URL segment,
so it follows the one name grammar (``ledger.names``) before anything is written; and the
deployment is readable by its owner only, except what a root gateway's job sandbox must read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.sandbox import SANDBOX_ID, UidSwitch
from engine.sandbox_launch import _check_readable
from gateway.cli import main as fedgate
from gateway.node.deployment import init_deployment

AS_ROOT = os.geteuid() == 0


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The common umask 022 (files 0644, directories 0755 unless fedgate says otherwise)."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, usual_umask: None) -> Path:
    """A deployment with its own SQLite ledger (fedgate.db), created under umask 022."""
    monkeypatch.delenv("FEDGATE_DATABASE_URL", raising=False)
    return init_deployment(tmp_path / "deploy" / "node", owner="clinic").root


@pytest.fixture
def table(tmp_path: Path) -> Path:
    rows = "".join(f"u{u},{u % 2},{u * 0.5},{u % 7}\n" for u in range(60) for _ in range(3))
    path = tmp_path / "users.csv"
    path.write_text("user_id,label,f0,f1\n" + rows)
    return path


def import_(root: Path, name: str, table: Path) -> int:
    return fedgate(["-d", str(root), "dataset", "import", name, str(table),
                    "--user-column", "user_id", "--label-column", "label", "--num-classes", "2",
                    "--public-users", "48", "--epsilon-total", "4", "--delta", "1e-5",
                    "--mock-users", "10"])


def test_a_dataset_named_dot_dot_is_not_written_outside_the_deployment(root: Path,
                                                                       table: Path) -> None:
    assert import_(root, "../../escaped-ds", table) == 2
    assert not list(root.parent.parent.rglob("*escaped-ds*"))
    assert list((root / "datasets").iterdir()) == []


@pytest.mark.parametrize("name", ["a,b", "demo*", "de\nmo", "x y", ".hidden", "a..b", "_x",
                                  "n" * 65, "audit"])
def test_a_dataset_name_a_policy_row_or_path_cannot_hold_is_refused(root: Path, table: Path,
                                                                    name: str) -> None:
    assert import_(root, name, table) == 2
    assert list((root / "datasets").iterdir()) == []


def test_a_dataset_name_differing_only_in_case_is_refused(root: Path, table: Path) -> None:
    assert import_(root, "demo", table) == 0
    assert import_(root, "Demo", table) == 2
    assert [p.name for p in (root / "datasets").iterdir()] == ["demo"]


def test_an_owner_name_a_policy_row_cannot_hold_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="owner name 'clinic, x'"):
        init_deployment(tmp_path / "node", owner="clinic, x")
    assert not (tmp_path / "node").exists()


def test_no_deployment_file_is_readable_by_other_users(root: Path, table: Path) -> None:
    assert import_(root, "demo", table) == 0
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for name in ("fedgate.db", "node.key", "split.key", "fedgate.toml", "policies/policy.csv"):
        assert stat.S_IMODE((root / name).stat().st_mode) == 0o600, name
    for path in (root, *root.rglob("*")):
        assert path.stat().st_mode & 0o007 == 0, f"{path} is readable by others"


@pytest.mark.skipif(not AS_ROOT, reason="only a root gateway runs jobs as the sandbox uid")
def test_a_root_gateways_sandbox_uid_still_reads_an_imported_dataset(root: Path,
                                                                     table: Path) -> None:
    assert import_(root, "demo", table) == 0
    dataset = root / "datasets" / "demo"
    switch = UidSwitch(SANDBOX_ID, SANDBOX_ID, "/usr/bin/setpriv")
    for path in (dataset, dataset / "schema.json", dataset / "training" / "features.npy"):
        _check_readable(path, switch)  # raises SandboxUnavailable if the job could not read it
        assert path.stat().st_gid == SANDBOX_ID
        assert stat.S_IMODE(path.stat().st_mode) in (0o750, 0o640)
