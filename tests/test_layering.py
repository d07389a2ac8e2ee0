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
FIRST_PARTY = ("fedgate", "gateway", "engine", "ledger")

# The ledger modules gateway.protocol may use: pure functions and data over plain values
# (ledger.keys: Ed25519 key ids, for the signed node document; ledger.states: job states).
PURE_LEDGER_FOR_PROTOCOL = frozenset({"ledger.canonical", "ledger.keys", "ledger.ranges",
                                      "ledger.states"})
# The one library it may use: Ed25519 for the release signature (the light install has it).
PROTOCOL_LIBRARIES = frozenset({"cryptography"})

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
    # gateway.sdk.client imports gateway.node.rehearsal only inside a method (the engine stays lazy).
    assert "gateway.node.rehearsal" in imports_of("gateway.sdk.client")
    assert "ledger.keys" in imports_of("gateway.sdk.client")  # written `from ledger import keys`


@pytest.mark.parametrize("layer", ["ledger", "engine"])
def test_layer_never_imports_gateway(layer: str) -> None:
    upward = {
        module: sorted(target for target in imports_of(module) if _in_package(target, "gateway"))
        for module in _modules_in(layer)
    }
    assert {module: targets for module, targets in upward.items() if targets} == {}


def test_protocol_imports_only_the_standard_library_ed25519_pure_ledger_and_itself() -> None:
    modules = _modules_in("gateway.protocol")
    assert "gateway.protocol.problems" in modules
    allowed_stdlib = set(sys.stdlib_module_names) | {"__future__"}
    outside = {}
    for module in modules:
        wrong = sorted(
            target
            for target in imports_of(module)
            if target.split(".")[0] not in allowed_stdlib
            and target.split(".")[0] not in PROTOCOL_LIBRARIES
            and not _in_package(target, "gateway.protocol")
            and target not in PURE_LEDGER_FOR_PROTOCOL
        )
        if wrong:
            outside[module] = wrong
    assert outside == {}


@pytest.mark.parametrize("sdk_module", ["fedgate", "gateway.sdk", "gateway.client",
                                        "gateway.cli.researcher", "gateway.cli"])
def test_researcher_sdk_loads_no_server_library_or_tensorflow(sdk_module: str) -> None:
    probe = (
        f"import json, sys, {sdk_module}\n"
        f"print(json.dumps(sorted(m for m in {HEAVY_LIBRARIES!r} if m in sys.modules)))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True)
    assert json.loads(run.stdout) == []


# What the researcher's light install has: pyproject's default dependencies (tomli: Python 3.10).
LIGHT_LIBRARIES = frozenset({"httpx", "cryptography", "http_message_signatures", "tqdm", "numpy",
                             "tomli"})
# Contracts both sides read, TensorFlow-free at import: key ids, canonical JSON, parameter
# ranges, timestamps, the model format and its allowlist.
SHARED_CONTRACTS = frozenset({"ledger.keys", "ledger.canonical", "ledger.ranges",
                              "ledger.states", "ledger.timestamps", "engine.artifact",
                              "engine.keras_config"})
# Imported by the SDK only inside the function that needs them (the probe above checks that
# importing the SDK loads neither): converting a Keras model, rehearsing on mock data.
SDK_ON_DEMAND = {"tensorflow": "engine.artifact's Keras conversion",
                 "gateway.node.rehearsal": "Client.rehearse runs the engine locally (node extra)"}


# What a researcher's light install runs: the SDK, the protocol, the federation coordinator and
# the researcher's commands of the CLI (with gateway.cli.usage, their help, and
# gateway.cli.terminal, their escaped tables: standard library).
RESEARCHER_SIDE = ("fedgate", "gateway.sdk", "gateway.protocol", "gateway.federation",
                   "gateway.cli.researcher", "gateway.cli.federation", "gateway.cli.usage",
                   "gateway.cli.terminal")


def test_researcher_side_imports_nothing_from_the_server_side() -> None:
    """Everything the researcher's side (``RESEARCHER_SIDE``) reaches, following first-party
    imports through the shared contracts, is the standard library, a light dependency, itself, a
    shared contract or an on-demand import named above."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    roots = [m for m in first_party_modules()
             if any(_in_package(m, side) for side in RESEARCHER_SIDE)]
    seen, queue, wrong = set(roots), list(roots), {}
    while queue:
        module = queue.pop()
        for target in imports_of(module):
            top = target.split(".")[0]
            if top in stdlib or top in LIGHT_LIBRARIES or target in SDK_ON_DEMAND \
                    or top in SDK_ON_DEMAND:
                continue
            if target in first_party_modules() and (
                    target in SHARED_CONTRACTS
                    or any(_in_package(target, side) for side in RESEARCHER_SIDE)):
                if target not in seen:
                    seen.add(target)
                    queue.append(target)
                continue
            wrong.setdefault(module, []).append(target)
    assert wrong == {}


# The rooms of gateway/ (docs/architecture.md, "Rooms by role") and the rooms each may import.
# Layers, top to bottom: cli -> api -> dashboard -> node -> policy -> protocol on the node's
# side, cli -> federation -> sdk -> protocol on the researcher's side.
ROOMS: dict[str, frozenset[str]] = {
    "gateway.protocol": frozenset(),
    "gateway.sdk": frozenset({"gateway.protocol"}),
    "gateway.federation": frozenset({"gateway.sdk", "gateway.protocol"}),
    "gateway.policy": frozenset({"gateway.protocol"}),
    "gateway.node": frozenset({"gateway.policy", "gateway.protocol"}),
    "gateway.dashboard": frozenset({"gateway.node", "gateway.policy", "gateway.protocol"}),
    "gateway.api": frozenset({"gateway.dashboard", "gateway.node", "gateway.policy",
                              "gateway.protocol"}),
    "gateway.cli": frozenset({"gateway.api", "gateway.dashboard", "gateway.node",
                              "gateway.policy", "gateway.federation", "gateway.sdk",
                              "gateway.protocol"}),
}
# The gateway modules outside the rooms: the package and the SDK's old spelling.
OUTSIDE_THE_ROOMS = {"gateway": frozenset(), "gateway.client": frozenset({"gateway.sdk"})}


def _room(module: str) -> str | None:
    return next((room for room in ROOMS if _in_package(module, room)), None)


def test_every_gateway_module_lives_in_a_room() -> None:
    assert [m for m in _modules_in("gateway")
            if _room(m) is None and m not in OUTSIDE_THE_ROOMS] == []


def test_each_room_imports_only_the_rooms_beneath_it() -> None:
    """Imports inside functions count; the SDK's on-demand import of the node's rehearsal
    (``SDK_ON_DEMAND``) is the one exception. So the node never imports the API, the dashboard
    or the CLI, and the policy and the protocol import no other room."""
    wrong = {}
    for module in _modules_in("gateway"):
        room = _room(module)
        allowed = ROOMS[room] | {room} if room else OUTSIDE_THE_ROOMS[module]
        upward = sorted(target for target in imports_of(module)
                        if _in_package(target, "gateway") and target not in SDK_ON_DEMAND
                        and _room(target) not in allowed)
        if upward:
            wrong[module] = upward
    assert wrong == {}


def test_the_room_check_sees_a_node_module_importing_the_api(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = imports_of

    def with_an_upward_import(module: str) -> frozenset[str]:
        extra = {"gateway.node.jobs": {"gateway.api.app"}}
        return real(module) | extra.get(module, set())

    monkeypatch.setattr(sys.modules[__name__], "imports_of", with_an_upward_import)
    with pytest.raises(AssertionError, match=r"gateway\.api\.app"):
        test_each_room_imports_only_the_rooms_beneath_it()


def _import_cycles() -> list[list[str]]:
    """Strongly connected components (> 1 module) of the first-party import graph."""
    modules = first_party_modules()
    graph = {m: sorted(t for t in imports_of(m) if t in modules and t != m) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return sorted(cycles)


def test_no_import_cycles_among_first_party_modules() -> None:
    """Counting imports inside functions and under TYPE_CHECKING: a lazy import cannot hide a
    cycle (the demos receive the CLI as a function; the rehearsal types its client as a
    Protocol)."""
    assert _import_cycles() == []


def test_the_cycle_finder_finds_a_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    real = imports_of

    def with_a_cycle(module: str) -> frozenset[str]:
        extra = {"ledger.keys": {"ledger.canonical"}, "ledger.canonical": {"ledger.keys"}}
        return real(module) | extra.get(module, set())

    monkeypatch.setattr(sys.modules[__name__], "imports_of", with_a_cycle)
    assert ["ledger.canonical", "ledger.keys"] in _import_cycles()
