"""Dependencies point down: the layers of docs/architecture.md, read from the source.

Every first-party module's imports are read with ``ast``, including imports inside
functions and under ``TYPE_CHECKING``, so a lazy import cannot hide a wrong-way edge.
The researcher SDK is also imported in a fresh interpreter to see what it really loads.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("gateway", "engine", "ledger")

# The ledger modules gateway.protocol may use: pure functions over plain values.
PURE_LEDGER_FOR_PROTOCOL = frozenset({"ledger.canonical"})

# Server libraries and TensorFlow: a researcher installing the SDK must not need them.
HEAVY_LIBRARIES = ("starlette", "sqlmodel", "sqlalchemy", "casbin", "tensorflow",
                   "tensorflow_federated")


@cache
def first_party_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in FIRST_PARTY:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


@cache
def imports_of(module: str) -> frozenset[str]:
    """Every module ``module`` imports, anywhere in its body; ``from a import b`` counts as
    ``a.b`` when that is a first-party module, else as ``a``."""
    path = first_party_modules()[module]
    is_package = path.name == "__init__.py"
    known = first_party_modules()
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return frozenset(found)


def _in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _modules_in(package: str) -> list[str]:
    return [name for name in first_party_modules() if _in_package(name, package)]


def test_the_import_scan_sees_imports_inside_functions() -> None:
    # gateway.client imports engine.artifact only inside methods (TensorFlow stays lazy).
    assert "engine.artifact" in imports_of("gateway.client")
    assert "ledger.keys" in imports_of("gateway.client")  # written `from ledger import keys`


@pytest.mark.parametrize("layer", ["ledger", "engine"])
def test_layer_never_imports_gateway(layer: str) -> None:
    upward = {
        module: sorted(target for target in imports_of(module) if _in_package(target, "gateway"))
        for module in _modules_in(layer)
    }
    assert {module: targets for module, targets in upward.items() if targets} == {}


def test_protocol_imports_only_the_standard_library_pure_ledger_and_itself() -> None:
    modules = _modules_in("gateway.protocol")
    assert "gateway.protocol.problems" in modules
    allowed_stdlib = set(sys.stdlib_module_names) | {"__future__"}
    outside = {}
    for module in modules:
        wrong = sorted(
            target
            for target in imports_of(module)
            if target.split(".")[0] not in allowed_stdlib
            and not _in_package(target, "gateway.protocol")
            and target not in PURE_LEDGER_FOR_PROTOCOL
        )
        if wrong:
            outside[module] = wrong
    assert outside == {}


@pytest.mark.parametrize("sdk_module", ["gateway.client", "gateway.cli_researcher"])
def test_researcher_sdk_loads_no_server_library_or_tensorflow(sdk_module: str) -> None:
    probe = (
        f"import json, sys, {sdk_module}\n"
        f"print(json.dumps(sorted(m for m in {HEAVY_LIBRARIES!r} if m in sys.modules)))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True)
    assert json.loads(run.stdout) == []
