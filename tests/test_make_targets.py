"""What each `make` target installs (issue 25): a newcomer's `make demo` pulls neither a browser
nor npm packages nor the test tools; `make test` (what CI runs) installs all of them.

Read from the Makefile's graph with ``make -n -B``: every command the target would run on a
brand-new machine, printed and not run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUNTIME_TARGETS = ("env", "demo", "demo-federation", "demo-shakespeare", "openapi", "bench")
TEST_TARGETS = ("test-env", "test", "test-fast", "soak")
TEST_ONLY = re.compile(r"\bnpm\b|chromium|apt-get")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def commands(target: str) -> list[str]:
    """The commands ``make TARGET`` runs when nothing is installed yet."""
    run = subprocess.run(["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True)
    return run.stdout.splitlines()


def uv_syncs(lines: list[str]) -> list[str]:
    return [line for line in lines if re.search(r"\buv sync\b", line)]


@pytest.mark.parametrize("target", RUNTIME_TARGETS)
def test_the_demos_install_neither_test_tools_nor_a_browser(target: str) -> None:
    lines = commands(target)
    assert not [line for line in lines if TEST_ONLY.search(line)]
    syncs = uv_syncs(lines)
    assert syncs and all("--extra node" in s and "--no-dev" in s for s in syncs), syncs


@pytest.mark.parametrize("target", TEST_TARGETS)
def test_the_tests_install_the_dev_group_the_interop_packages_and_chromium(target: str) -> None:
    lines = commands(target)
    assert any("npm ci" in line for line in lines)
    assert any("apt-get install" in line and "chromium" in line for line in lines)
    assert any("--extra node" in s and "--no-dev" not in s for s in uv_syncs(lines))
    # the audit hashing helper, which the tests compare with hashlib, and OpenSSL's headers
    assert any("apt-get install" in line and "libssl-dev" in line for line in lines)
    assert any(re.search(r"\bcc\b.*ledger/native/rfc6962\.c", line) for line in lines)


@pytest.mark.parametrize("target", ("env", "test-env"))
def test_every_sync_compiles_the_installed_packages_to_bytecode(target: str) -> None:
    """Under PYTHONDONTWRITEBYTECODE (CI, containers) nothing else would: each `fedgate` command
    and each of the test suite's subprocesses compiled SQLAlchemy & co. again (~0.9 s each)."""
    syncs = uv_syncs(commands(target))
    assert syncs and all("--compile-bytecode" in s for s in syncs), syncs


def test_lint_installs_the_dev_group_but_no_browser() -> None:
    lines = commands("lint")
    assert not [line for line in lines if TEST_ONLY.search(line)]
    assert any("--no-dev" not in s for s in uv_syncs(lines))


def test_ci_runs_the_target_that_installs_everything() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_readme_says_what_each_command_installs() -> None:
    readme = (REPO / "README.md").read_text()
    for target in ("make demo", "make env", "make test-env", "make test"):
        assert re.search(rf"^\| `{target}` \|", readme, re.M), target
