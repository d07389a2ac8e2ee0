"""Jupyter (issue 25): the dataset listing and a release render as HTML tables, and the example
notebook (docs/examples/researcher_notebook.ipynb) runs top to bottom in a real kernel, against
a real node, so it cannot rot.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.sdk.client import Client
from gateway.sdk.datasets import Datasets
from tests.test_cli_researcher import researcher_env, sdk  # noqa: F401  (fixtures)
from tests.test_end_to_end import sqlite_node  # noqa: F401  (fixture)

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
NOTEBOOK = EXAMPLES / "researcher_notebook.ipynb"


def test_dataset_listing_is_still_the_nodes_list_of_dicts_and_renders_as_a_table(
    sdk: Client,  # noqa: F811
) -> None:
    datasets = sdk.datasets()
    assert isinstance(datasets, list) and json.loads(json.dumps(datasets)) == datasets
    demo = datasets.named("demo")
    assert datasets == [demo] and demo["public_users"] == 480
    table = datasets._repr_html_()
    assert table.startswith("<table") and table.count("<tr>") == 1 + len(datasets)
    assert "<td>480 (declared)</td>" in table and "<td>demo</td>" in table
    with pytest.raises(KeyError, match="visible: demo"):
        datasets.named("other")


def test_dataset_listing_escapes_what_it_shows() -> None:
    listing = Datasets([{"name": "<b>x</b>", "public_users": 1, "public_users_source": "declared",
                         "num_features": 1, "num_classes": 2, "max_examples_per_user": 3,
                         "epsilon_total": 1.0, "delta": 1e-5, "budget_used": 0.5}])
    assert "&lt;b&gt;x&lt;/b&gt;" in listing._repr_html_() and "<b>" not in listing._repr_html_()
    assert listing._repr_html_().endswith("<td>—</td></tr></tbody></table>")  # no job run yet
    listing[0]["more_like_your_last_job"] = {"job_id": "job-1", "jobs_that_fit": 4}
    assert "<td>about 4 more jobs like your last (job-1)</td>" in listing._repr_html_()
    assert "no datasets" in Datasets()._repr_html_()


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.fixture
def notebook_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The kernel's temporary directory (its node lives there); whatever still runs from it
    afterwards is stopped, by process id."""
    for name in [k for k in os.environ if k.startswith("FEDGATE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    yield tmp_path
    for pid in _processes_mentioning(str(tmp_path)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _outputs(notebook, kind: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Every output of ``kind`` (a MIME type, "stdout" or "stderr") the executed notebook
    shows."""
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("name") == kind:
                found.append(output["text"])
            elif kind in output.get("data", {}):
                found.append(output["data"][kind])
    return found


@pytest.mark.tff
def test_example_notebook_trains_plots_the_released_metrics_and_saves_the_model(
    notebook_tmp: Path,
) -> None:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "commit the notebook without outputs"
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(EXAMPLES)}}).execute()

    html = "".join(_outputs(notebook, "text/html"))
    assert 'class="fedgate-datasets"' in html and 'class="fedgate-release"' in html
    assert len(_outputs(notebook, "image/png")) == 2  # the training curve, the trade-off
    stdout = "".join(_outputs(notebook, "stdout"))
    assert [f"rounds so far {n}," in stdout for n in (10, 20, 30)] == [True] * 3
    assert "saved dp-model.keras" in stdout
    assert "Unable to register" not in "".join(_outputs(notebook, "stderr"))  # quiet TensorFlow
    # the last cell stopped the gateway and removed the node
    assert not list(notebook_tmp.glob("fedgate-notebook-*"))
    assert _processes_mentioning(str(notebook_tmp)) == []
