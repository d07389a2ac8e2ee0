"""How ``fedgate`` explains itself: every subcommand has a description and examples of itself,
every option a help text, no reStructuredText in any of it; ``--version``; bare ``fedgate``
prints its help; a typo gets "did you mean"; the commands a script calls answer ``--json``."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import build_parser
from gateway.cli import main as fedgate
from gateway.cli.usage import fedgate_version

RST = re.compile(r"``|:(?:class|func|meth|mod|attr|ref|data):`|::$", re.MULTILINE)


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def _fedgate(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *argv], capture_output=True,
                          text=True, timeout=120, check=False)


TREE = list(_parsers(build_parser()))


@pytest.mark.parametrize(("path", "parser"), TREE[1:], ids=[" ".join(p) for p, _ in TREE[1:]])
def test_every_subcommand_has_a_description_and_an_example_of_itself(
    path: tuple[str, ...], parser: argparse.ArgumentParser,
) -> None:
    assert parser.description, f"fedgate {' '.join(path)} has no description"
    examples = (parser.epilog or "").partition("examples:\n")[2]
    itself = re.compile(rf"^\s*fedgate(?: -d \S+)? {re.escape(' '.join(path))}(?:\s|$)",
                        re.MULTILINE)
    assert itself.search(examples), f"fedgate {' '.join(path)} --help shows no example of itself"


@pytest.mark.parametrize(("path", "parser"), TREE, ids=[" ".join(p) or "fedgate" for p, _ in TREE])
def test_every_option_has_help_and_no_help_text_has_rst_markup(
    path: tuple[str, ...], parser: argparse.ArgumentParser,
) -> None:
    undocumented = [action.dest for action in parser._actions
                    if not action.help and not isinstance(action, argparse._SubParsersAction)]
    assert undocumented == [], f"fedgate {' '.join(path)}: options without help {undocumented}"
    texts = [parser.description or "", parser.epilog or "",
             *(str(action.help or "") for action in parser._actions)]
    assert [text for text in texts if RST.search(text)] == []
    assert parser.format_help()  # renders every text: a bare % in one would raise here


def test_version_prints_the_installed_version() -> None:
    result = _fedgate("--version")
    assert (result.returncode, result.stdout) == (0, f"fedgate {fedgate_version()}\n")


def test_bare_fedgate_prints_its_help_and_exits_2() -> None:
    result = _fedgate()
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("usage: fedgate")
    assert "datasets" in result.stderr and "examples:" in result.stderr


def test_a_group_without_its_action_prints_the_groups_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        fedgate(["dataset"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("usage: fedgate dataset") and "import" in err and "synthesize" in err


def test_a_mistyped_subcommand_is_answered_with_did_you_mean() -> None:
    result = _fedgate("datset", "list")
    assert result.returncode == 2
    assert "invalid choice: 'datset'; did you mean 'dataset'?" in result.stderr


def test_a_mistyped_action_is_answered_with_did_you_mean(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        fedgate(["audit", "verfy", "audit.json", "--node-key", "node.pub"])
    assert "did you mean 'verify'?" in capsys.readouterr().err


def test_nothing_close_gets_no_guess(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        fedgate(["zzzzzz"])
    err = capsys.readouterr().err
    assert "invalid choice: 'zzzzzz'" in err and "did you mean" not in err


def _json(capsys: pytest.CaptureFixture[str], argv: list[str], status: int = 0) -> object:
    capsys.readouterr()
    assert fedgate(argv) == status
    return json.loads(capsys.readouterr().out)


def test_init_keygen_policy_check_and_audit_answer_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FEDGATE_DATABASE_URL", raising=False)
    node = tmp_path / "node"
    created = _json(capsys, ["init", str(node), "--owner", "clinic", "--json"])
    assert created["owner"] == "clinic" and Path(created["node_public_key"]).is_file()
    key = _json(capsys, ["keygen", "--out", str(tmp_path / "alice"), "--json"])
    assert Path(key["public_key"]).is_file() and len(key["key_id"]) > 8
    check = _json(capsys, ["-d", str(node), "policy", "check", "--json"])
    assert check["valid"] is True and check["version"]
    broken = tmp_path / "broken.csv"
    broken.write_text("p, nobody\n")
    invalid = _json(capsys, ["-d", str(node), "policy", "check", "--policy", str(broken),
                             "--json"], status=1)
    assert invalid["valid"] is False and invalid["errors"]
    table = tmp_path / "users.parquet"
    assert fedgate(["dataset", "synthesize", str(table), "--users", "300", "--features", "4",
                    "--classes", "3"]) == 0
    imported = _json(capsys, ["-d", str(node), "dataset", "import", "demo", str(table),
                              "--user-column", "user_id", "--label-column", "label",
                              "--num-classes", "3", "--public-users", "240", "--epsilon-total",
                              "4", "--delta", "1e-5", "--json"])
    assert imported["public_users"] == 240 and imported["public_users_source"] == "declared"
    assert imported["training_users"] + imported["evaluation_users"] == 300  # owner only
    assert fedgate(["-d", str(node), "policy", "reload"]) == 0  # an audit entry
    export = tmp_path / "audit.json"
    written = _json(capsys, ["-d", str(node), "audit", "export", "--out", str(export), "--json"])
    assert written["out"] == str(export) and written["entries"] >= 1
    verified = _json(capsys, ["audit", "verify", str(export), "--node-key",
                              created["node_public_key"], "--json"])
    assert verified["ok"] is True and verified["entries"] == written["entries"]
    assert verified["problem"] is None
    export.write_bytes(export.read_bytes().replace(b'"accepted"', b'"rejected"', 1))
    tampered = _json(capsys, ["audit", "verify", str(export), "--node-key",
                              created["node_public_key"], "--json"], status=1)
    assert tampered["ok"] is False and tampered["problem"]["reason"]


def test_model_from_keras_prints_no_tensorflow_startup_lines_and_answers_json(
    tmp_path: Path,
) -> None:
    """TensorFlow's C++ start-up errors (cuDNN/cuFFT/cuBLAS factories on a machine without a
    GPU, absl) are not the researcher's business: from-keras sets the level before TF loads."""
    source, out = tmp_path / "model.keras", tmp_path / "model.json"
    make = ("import tensorflow as tf\n"
            "tf.keras.Sequential([tf.keras.layers.InputLayer(input_shape=(4,)),\n"
            f"                     tf.keras.layers.Dense(3)]).save({str(source)!r})\n")
    subprocess.run([sys.executable, "-c", make], check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "model", "from-keras",
                             str(source), str(out), "--json"], capture_output=True, text=True,
                            timeout=300, check=False, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"output": str(out), "format": "keras-json-v1",
                                         "parameters": 15}
    assert not re.search(r"cuDNN|cuFFT|cuBLAS|^E\d{4}|absl|^\S+ \S+: [EW] ", result.stderr,
                         re.MULTILINE), result.stderr
    assert json.loads(out.read_text())["format"] == "keras-json-v1"
