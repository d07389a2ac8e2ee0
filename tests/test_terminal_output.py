"""Text a researcher chose never drives the owner's terminal (issue 22): every control
character the ``fedgate`` command prints is escaped, and a field stays on its line."""

from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

import pytest

from gateway.cli import main as fedgate
from gateway.cli.terminal import escape_controls
from gateway.node.deployment import init_deployment
from gateway.node.node import Node
from ledger.audit import append_entry

# Clear the screen, set the window title, ring the bell; then a forged line of its own.
HOSTILE = "\x1b[2J\x1b]0;owned\x07x\n     9  2030-01-01T00:00:00Z  admit    forged=yes"
BIDI = "demo\u202eexe.txt\x9b31m"  # a right-to-left override and an 8-bit CSI


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDGATE_DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    root = init_deployment(tmp_path / "node", owner="clinic").root
    node = Node(root)
    with node.session() as s, s.begin():
        append_entry(s, action="deny", actor="k-mallory", dataset=HOSTILE, reason=BIDI,
                     decision="deny")
    node.engine.dispose()
    return root


def test_an_ansi_escape_in_an_audit_entry_does_not_reach_the_owners_terminal(
        root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fedgate(["-d", str(root), "audit", "show"]) == 0
    out = capsys.readouterr().out
    assert not any(unicodedata.category(c) in ("Cc", "Cf") for c in out.replace("\n", ""))
    assert out.count("\n") == 1  # one entry, one line: the forged line stays inside its field
    assert "dataset=\\u001b[2J\\u001b]0;owned\\u0007x\\u000a" in out


def test_audit_show_json_escapes_controls_and_still_decodes_to_the_entry(
        root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fedgate(["-d", str(root), "audit", "show", "--json"]) == 0
    out = capsys.readouterr().out
    assert not any(unicodedata.category(c) in ("Cc", "Cf") for c in out.replace("\n", ""))
    [entry] = json.loads(out)
    assert (entry["dataset"], entry["reason"]) == (HOSTILE, BIDI)


def test_an_error_message_naming_a_hostile_value_is_escaped_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hostile = tmp_path / "x\x1b[2J"
    assert fedgate(["-d", str(hostile), "budget", "show"]) == 2  # not a deployment
    err = capsys.readouterr().err
    assert "\x1b" not in err and f"{tmp_path}/x\\u001b[2J is not a fedgate deployment" in err


def test_every_control_and_format_character_is_escaped_and_nothing_else() -> None:
    controls = [chr(c) for c in range(sys.maxunicode + 1)
                if unicodedata.category(chr(c)) in ("Cc", "Cf", "Zl", "Zp")]
    escaped = escape_controls("".join(controls))
    assert escaped.isascii() and escaped.isprintable()
    assert escape_controls("alice → ε 1.2 on Zürich-notes\t", keep="\t") == \
        "alice → ε 1.2 on Zürich-notes\t"
    assert escape_controls("a\nb") == "a\\u000ab" and escape_controls("a\nb", keep="\n") == "a\nb"


def test_a_progress_bar_still_redraws_its_line_but_no_other_carriage_return_passes() -> None:
    """The researcher CLI's progress bar (tqdm) starts every redraw with a carriage return;
    that one is layout. A return inside other text could hide what precedes it: escaped."""
    import io

    from gateway.cli.terminal import ControlEscapingStream

    out = io.StringIO()
    stream = ControlEscapingStream(out)
    stream.write("\rjob-1:  50%|█████     | 100/200 [00:20<00:20, ε 1.2/3.0, running]")
    stream.write("name: alice\rmallory\x1b[2J")
    assert out.getvalue() == ("\rjob-1:  50%|█████     | 100/200 [00:20<00:20, ε 1.2/3.0, running]"
                              "name: alice\\u000dmallory\\u001b[2J")
