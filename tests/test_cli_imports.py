"""The ``fedgate`` command starts light: its help and the researcher's commands load no server
library and no TensorFlow, so ``fedgate --help`` answers in a fraction of a second (it took
about 5 s when building the parser imported SQLModel and Casbin) and runs on the light install.
Each probe is a fresh interpreter, so nothing an earlier test imported hides a heavy import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli.process import free_port
from ledger import keys

REPO = Path(__file__).resolve().parent.parent
SERVER_AND_TENSORFLOW = ("sqlmodel", "sqlalchemy", "starlette", "uvicorn", "casbin",
                         "tensorflow", "tensorflow_federated", "dp_accounting", "pyarrow")
# What only some commands need: the SDK's HTTP client, arrays, Ed25519.
PER_COMMAND = ("httpx", "numpy", "cryptography")


def _loaded_after(argv: list[str] | None) -> tuple[int, list[str]]:
    """Run ``fedgate ARGV`` (or only ``import gateway.cli`` when None) in a fresh interpreter:
    its exit status and which of the libraries above it loaded."""
    watched = SERVER_AND_TENSORFLOW + PER_COMMAND
    probe = (
        "import json, sys\n"
        "import gateway.cli\n"
        "status = 0\n"
        f"argv = {argv!r}\n"
        "if argv is not None:\n"
        "    try:\n"
        "        status = gateway.cli.main(argv)\n"
        "    except SystemExit as exit:\n"
        "        status = exit.code\n"
        f"print(json.dumps([status, sorted(m for m in {watched!r} if m in sys.modules)]),"
        " file=sys.__stderr__)\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True)
    status, loaded = json.loads(run.stderr.strip().splitlines()[-1])
    return status, loaded


def test_importing_the_cli_loads_no_server_library_tensorflow_or_sdk() -> None:
    assert _loaded_after(None) == (0, [])


@pytest.mark.parametrize("argv", [["--help"], ["policy", "explain", "--help"],
                                  ["train", "--help"], ["federate", "--help"]])
def test_help_loads_no_server_library_tensorflow_or_sdk(argv: list[str]) -> None:
    assert _loaded_after(argv) == (0, [])


def test_a_researcher_command_loads_the_sdk_but_no_server_library_or_tensorflow(
        tmp_path: Path) -> None:
    private, _ = keys.write_key_pair(keys.generate_private_key(), tmp_path / "alice")
    _, node_public = keys.write_key_pair(keys.generate_private_key(), tmp_path / "node")
    status, loaded = _loaded_after(["datasets", "--url", f"http://127.0.0.1:{free_port()}",
                                    "--key", str(private), "--node-key", str(node_public)])
    assert status == 2  # nothing listens there: the one-line network error
    assert "httpx" in loaded  # the probe sees the imports a command makes
    assert not set(loaded) & set(SERVER_AND_TENSORFLOW)


# What an owner command that reads the ledger but computes no ε and calls no node must not load:
# TensorFlow, the accountant (dp-accounting and SciPy, ~1 s) and the researcher SDK (httpx).
NOT_FOR_A_LEDGER_LISTING = ("tensorflow", "tensorflow_federated", "dp_accounting", "scipy",
                            "httpx")


@pytest.mark.parametrize("argv", [["researcher", "list"], ["dataset", "list"],
                                  ["audit", "show"]])
def test_an_owner_listing_loads_no_tensorflow_accountant_or_sdk(tmp_path: Path,
                                                                 argv: list[str]) -> None:
    from gateway.node.deployment import init_deployment

    init_deployment(tmp_path / "node", owner="clinic")
    probe = (
        "import json, sys\n"
        "import gateway.cli\n"
        f"status = gateway.cli.main(['-d', {str(tmp_path / 'node')!r}, *{argv!r}])\n"
        f"print(json.dumps([status, sorted(m for m in {NOT_FOR_A_LEDGER_LISTING!r}"
        " if m in sys.modules)]), file=sys.__stderr__)\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True)
    assert json.loads(run.stderr.strip().splitlines()[-1]) == [0, []]


def test_verifying_an_audit_export_loads_no_server_library_or_tensorflow(tmp_path: Path) -> None:
    """An officer verifies offline, "on any machine with fedgate installed" (compliance.md):
    the light install has no database library, so the verifier must not need one."""
    from gateway.cli import main as fedgate
    from gateway.node.deployment import init_deployment

    deployment = init_deployment(tmp_path / "node", owner="clinic")
    export = tmp_path / "audit.json"
    assert fedgate(["-d", str(deployment.root), "audit", "export", "--out", str(export)]) == 0
    status, loaded = _loaded_after(["audit", "verify", str(export), "--node-key",
                                    str(deployment.node_public_key)])
    assert status == 0 and "cryptography" in loaded
    assert not set(loaded) & set(SERVER_AND_TENSORFLOW)
