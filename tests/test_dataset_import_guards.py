"""``fedgate dataset import`` guards the owner against budgets that protect no one and against
imports that silently leave data out: ε_total > 100 is refused unless --force, > 10 warned;
columns left out of the features and declared labels no row uses are warned about, and so is a
dataset with fewer training users than the job planner needs at its budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main as fedgate


@pytest.fixture
def node_and_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.delenv("FEDGATE_DATABASE_URL", raising=False)
    node, table = tmp_path / "node", tmp_path / "users.csv"
    assert fedgate(["init", str(node)]) == 0
    assert fedgate(["dataset", "synthesize", str(table), "--users", "200", "--features", "3",
                    "--classes", "3"]) == 0
    return node, table


def _import(node: Path, table: Path, *options: str) -> int:
    return fedgate(["-d", str(node), "dataset", "import", "demo", str(table), "--user-column",
                    "user_id", "--label-column", "label", "--public-users", "160", "--delta",
                    "1e-4", *options])


def test_an_absurd_epsilon_total_is_refused_unless_forced(
    node_and_table: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    node, table = node_and_table
    capsys.readouterr()
    assert _import(node, table, "--epsilon-total", "150", "--num-classes", "3") == 2
    assert "ε_total 150 is above 100" in capsys.readouterr().err
    assert not (node / "datasets" / "demo").exists()
    assert _import(node, table, "--epsilon-total", "150", "--num-classes", "3", "--force") == 0
    assert "warning: ε_total 150 is above 10" in capsys.readouterr().err


def test_a_large_epsilon_total_is_warned_and_a_modest_one_is_not(
    node_and_table: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    node, table = node_and_table
    capsys.readouterr()
    assert _import(node, table, "--epsilon-total", "4", "--num-classes", "3") == 0
    assert "warning: ε_total" not in capsys.readouterr().err


def test_columns_left_out_and_unused_labels_are_named(
    node_and_table: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    node, table = node_and_table
    capsys.readouterr()
    assert _import(node, table, "--epsilon-total", "4", "--num-classes", "5",
                   "--feature-columns", "f0,f1") == 0
    err = capsys.readouterr().err
    assert "warning: columns left out of the features: f2" in err
    assert "warning: declared labels no row uses: 3, 4 (of 0..4)" in err


def test_a_too_small_dataset_says_how_many_users_it_has_and_needs(
    node_and_table: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    from ledger.planner import minimum_users

    node, table = node_and_table
    capsys.readouterr()
    assert _import(node, table, "--epsilon-total", "4", "--num-classes", "3", "--json") == 0
    out, err = capsys.readouterr()
    imported = json.loads(out)
    needed = minimum_users(epsilon=4, delta=1e-4)
    assert imported["minimum_training_users"] == needed > imported["training_users"]
    assert (f"warning: too few users: {imported['training_users']} training users (plus "
            f"{imported['evaluation_users']} held out), and at ε_total 4, δ 0.0001 the planner "
            f"needs {needed} to train 100 rounds") in err


def test_a_dataset_with_enough_users_for_its_budget_is_not_called_too_small(
    node_and_table: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    node, table = node_and_table  # 200 users, ~160 training: enough at ε_total 100
    capsys.readouterr()
    assert _import(node, table, "--epsilon-total", "100", "--num-classes", "3", "--json") == 0
    out, err = capsys.readouterr()
    imported = json.loads(out)
    assert imported["training_users"] >= imported["minimum_training_users"]
    assert "too few users" not in err
