"""The quickstarts are executable specifications: their code blocks run, in order, as written.

How a quickstart is run (the conventions the docs follow):

* every ```sh block is a step of one bash script (``set -euo pipefail``), so a failing command
  fails the test; state (exported variables, the background gateway) carries over;
* every ```python block carries ``title="FILE"``; it is written to FILE at its place in the
  script, and a following ```sh block runs ``python FILE``;
* ```sh notest is the one-time environment set-up (``make env``, activating ``.venv``), which
  the test suite is already running inside: the test puts this interpreter's ``bin/`` first on
  ``PATH`` instead, and starts in a fresh temporary directory;
* ```text blocks are example output and are not run;
* the default port 8620 is replaced by a free port, so that runs never collide.

The whole script runs in its own session; whatever it left running is killed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.cli.process import free_port

DOCS = Path(__file__).resolve().parent.parent / "docs"
REPO = DOCS.parent
QUICKSTARTS = ("quickstart-owner.md", "quickstart-researcher.md", "review-and-rehearsal.md")
DEFAULT_PORT = "8620"
_FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
_TITLE = re.compile(r'title="(?P<file>[\w.-]+)"')


@dataclass(frozen=True)
class Block:
    language: str
    attributes: str
    body: str


def code_blocks(markdown: str) -> list[Block]:
    blocks = []
    for match in _FENCE.finditer(markdown):
        language, _, attributes = match["info"].strip().partition(" ")
        blocks.append(Block(language, attributes.strip(), match["body"]))
    return blocks


def doc_script(markdown: str) -> str:
    """The bash script a reader runs when following ``markdown`` from top to bottom."""
    lines = ["set -euo pipefail"]
    for block in code_blocks(markdown):
        if block.language == "sh" and block.attributes != "notest":
            lines.append(block.body)
        elif block.language == "python":
            name = _TITLE.search(block.attributes)
            assert name, f"python block without title=\"FILE\":\n{block.body}"
            lines.append(f"cat > {shlex.quote(name['file'])} <<'FEDGATE_DOC_EOF'\n"
                         f"{block.body}FEDGATE_DOC_EOF")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class DocRun:
    workdir: Path
    stdout: str
    stderr: str


def run_doc(name: str, tmp_path: Path, *, timeout: float) -> DocRun:
    """Follow ``docs/NAME`` in a fresh directory, as a reader with ``.venv`` activated."""
    markdown = (DOCS / name).read_text().replace(DEFAULT_PORT, str(free_port()))
    workdir = tmp_path / "reader"
    workdir.mkdir()
    script = tmp_path / "doc.sh"
    script.write_text(doc_script(markdown))
    venv_bin = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGATE_")}
    env.update(PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
               VIRTUAL_ENV=str(venv_bin.parent))
    process = subprocess.Popen(["bash", "-x", str(script)], cwd=workdir, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{name} did not finish in {timeout:g} s\n{stdout[-3000:]}\n{stderr[-5000:]}")
    finally:
        # the gateway the doc started in the background, if the doc did not stop it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    if process.returncode != 0:
        log = workdir / "gateway.log"
        gateway = log.read_text()[-3000:] if log.exists() else ""
        pytest.fail(f"{name} failed (exit {process.returncode})\n--- stdout\n{stdout[-3000:]}"
                    f"\n--- stderr (bash -x)\n{stderr[-6000:]}\n--- gateway.log\n{gateway}")
    return DocRun(workdir, stdout, stderr)


@pytest.mark.parametrize("name", QUICKSTARTS)
def test_quickstart_code_is_either_run_or_marked_as_output(name: str) -> None:
    blocks = code_blocks((DOCS / name).read_text())
    kinds = {(b.language, b.attributes.split("=")[0]) for b in blocks}
    assert kinds <= {("sh", ""), ("sh", "notest"), ("python", "title"), ("text", "")}, kinds
    setup = [b for b in blocks if b.attributes == "notest"]
    assert len(setup) == 1 and "make env" in setup[0].body and "activate" in setup[0].body
    assert blocks.index(setup[0]) == 0, "the environment set-up comes first"


@pytest.mark.parametrize("name", [*QUICKSTARTS, "architecture.md", "privacy-utility.md"])
def test_relative_links_point_to_existing_files(name: str) -> None:
    text = (DOCS / name).read_text()
    targets = re.findall(r"\]\((?!https?:|#)([^)#\s]+)", text)
    missing = [t for t in targets if not (DOCS / t).exists()]
    assert targets and not missing, missing


MODULE_PATH = re.compile(r"\b((?:fedgate|gateway|engine|ledger|bench)/(?:[a-z_]+/)*[a-z_]+\.py)\b")
MODULE_NAME = re.compile(r"`((?:gateway|engine|ledger)(?:\.[a-z_]+)+)")


def _documents() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def test_architecture_names_only_modules_that_exist() -> None:
    modules = set(MODULE_PATH.findall((DOCS / "architecture.md").read_text()))
    assert len(modules) > 20
    assert not [m for m in sorted(modules) if not (REPO / m).exists()]


@pytest.mark.parametrize("document", _documents(), ids=lambda p: p.name)
def test_every_module_a_document_names_exists(document: Path) -> None:
    """Paths (gateway/sdk/client.py) and dotted names (`gateway.sdk.client`, possibly followed
    by an attribute: `gateway.sdk.client.Client`) name modules of this repository."""
    text = document.read_text()
    missing = [m for m in sorted(set(MODULE_PATH.findall(text))) if not (REPO / m).exists()]
    for dotted in sorted(set(MODULE_NAME.findall(text))):
        parts = dotted.split(".")
        # the longest prefix that is a module or package; what follows may be an attribute
        if not any((REPO / Path(*parts[:n])).with_suffix(".py").exists()
                   or (REPO / Path(*parts[:n]) / "__init__.py").exists()
                   for n in range(len(parts), 1, -1)):
            missing.append(dotted)
    assert missing == []


def test_owner_quickstart_runs_as_written(tmp_path: Path) -> None:
    run = run_doc("quickstart-owner.md", tmp_path, timeout=300)
    node = run.workdir / "node"
    assert (node / "fedgate.toml").exists() and (node / "datasets" / "demo" / "schema.json").exists()
    assert "demo: N̂ = " in run.stdout and "(dp-estimate)" in run.stdout  # Alice sees N̂
    assert "privacy filter 0.1% used" in run.stdout  # the DP estimate of N̂ only
    assert "urn:fedgate:problem:policy-denied" in run.stderr  # the edited policy applies
    assert "exit status 3" in run.stdout
    assert re.search(r"^OK: \d+ entries and \d+ signed checkpoints? verified", run.stdout, re.M)


@pytest.mark.tff
def test_researcher_quickstart_trains_a_model_as_written(tmp_path: Path) -> None:
    import json

    run = run_doc("quickstart-researcher.md", tmp_path, timeout=600)
    work = run.workdir
    assert (work / "dp-model.keras").exists()  # Python SDK: DP weights in the Keras model
    released = json.loads((work / "dp-model.json").read_text())  # CLI: the released artifact
    assert released["format"] == "keras-json-v1" and len(released["weights"]) == 2
    job = json.loads((work / "job.json").read_text())
    assert 0 < job["epsilon"] < 8 and set(job["metrics"]) == {"accuracy", "loss"}
    # saved on fetch and converted: `job result` (default path), `model to-keras`, Release.save
    assert json.loads((work / f"{job['job_id']}.model.json").read_text()) == released
    assert (work / "dp-model-cli.keras").exists() and (work / "dp-release.json").exists()
    assert "DP accuracy on held-out users" in run.stdout
    assert "exit status 3" in run.stdout  # the CLI's budget refusal
    assert "urn:fedgate:problem:budget-exceeded" in run.stdout  # the SDK's BudgetExceeded
    assert "404 urn:fedgate:problem:unknown-dataset" in run.stdout


@pytest.mark.tff
def test_review_and_rehearsal_guide_runs_as_written(tmp_path: Path) -> None:
    run = run_doc("review-and-rehearsal.md", tmp_path, timeout=600)
    assert run.stdout
    # the one fetch the policy allows saved the model; a second fetch is refused
    assert len(list(run.workdir.glob("job-*.model.json"))) == 1
    assert "DP weights of the release" in run.stdout
