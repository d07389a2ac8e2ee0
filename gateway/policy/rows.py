"""Policy rows: validated ``p``, ``p2`` and ``g`` rows, and the check that the Casbin model is
the fedgate model."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from casbin.model import Model

from gateway.policy.constraints import CONSTRAINTS, OBLIGATIONS, ConstraintKind, ObligationKind
from gateway.policy.request import ACTIONS
from ledger.names import GRAMMAR, is_name, is_name_pattern

# The shipped Casbin model and default policy (``fedgate init`` copies them into a deployment).
POLICY_TEMPLATES = Path(__file__).resolve().parents[2] / "policies"

JOB_ACTIONS = ("estimate", "train", "evaluate")
EFFECTS = ("allow", "deny")
# The object ``read-audit`` rules name: the node's audit log.
AUDIT_OBJECT = "audit"

_VALUE = re.compile(r"^[A-Za-z0-9_.:/|+ -]+$")


class PolicyInvalid(ValueError):
    """A policy failed validation; ``problems`` holds one ``file:line: message`` per error."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class Rule:
    """One validated row, as written (``cells[0]`` is ``p``, ``p2`` or ``g``)."""

    cells: tuple[str, ...]
    where: str  # "policy.csv:12"
    order: int  # position in the file; explanations cite the first matching rule

    @property
    def subject(self) -> str:
        return self.cells[1]

    @property
    def domain(self) -> str:
        return self.cells[2]

    @property
    def dataset(self) -> str:
        return self.cells[3]

    @property
    def action(self) -> str:
        return self.cells[4]

    @property
    def text(self) -> str:
        return ", ".join(self.cells)


@dataclass(frozen=True)
class Grant(Rule):
    """A ``p`` row: ``allow`` or ``deny``."""

    @property
    def effect(self) -> str:
        return self.cells[5]


@dataclass(frozen=True)
class Constraint(Rule):
    """A ``p2`` row with its parsed value."""

    kind: ConstraintKind
    value: Any


@dataclass(frozen=True)
class Obligation(Rule):
    """A ``p2`` row naming an obligation, with its parsed value."""

    kind: ObligationKind
    value: Any

    @property
    def reads(self) -> tuple[str, ...]:
        return self.kind.reads(self.value)


@dataclass(frozen=True)
class Membership:
    """A ``g`` row, ``cells = ("g", member, group, domain)``, or a key-registry membership."""

    cells: tuple[str, ...]
    where: str

    @property
    def member(self) -> str:
        return self.cells[1]

    @property
    def group(self) -> str:
        return self.cells[2]

    @property
    def domain(self) -> str:
        return self.cells[3]


@dataclass(frozen=True)
class PolicyRows:
    grants: tuple[Grant, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    memberships: tuple[Membership, ...] = ()
    obligations: tuple[Obligation, ...] = ()


def validate_row(cells: tuple[str, ...]) -> str | None:
    """What is wrong with a row's cells, or ``None``."""
    kind = cells[0]
    shapes = {"p": "p, SUBJECT, DOMAIN, DATASET, ACTION, allow|deny",
              "p2": "p2, SUBJECT, DOMAIN, DATASET, ACTION|*, CONSTRAINT, VALUE",
              "g": "g, MEMBER, GROUP, DOMAIN"}
    if kind not in shapes:
        return f"rows start with p, p2 or g, not {kind!r}"
    if len(cells) != shapes[kind].count(",") + 1:
        return f"{kind!r} rows have {shapes[kind].count(',')} fields: {shapes[kind]}"
    names = cells[1:4] if kind == "g" else cells[1:3]
    for name in names:
        if not is_name(name):
            return f"name {name!r} is not a valid name: use {GRAMMAR}"
    if kind == "g":
        return None
    if not is_name_pattern(cells[3]):
        return (f"dataset {cells[3]!r} must be a name or the beginning of one followed by * "
                f"(a name is {GRAMMAR})")
    actions = (*ACTIONS, "*") if kind == "p2" else ACTIONS
    if cells[4] not in actions:
        return f"unknown action {cells[4]!r} (one of {', '.join(actions)})"
    if kind == "p":
        return None if cells[5] in EFFECTS else f"effect must be allow or deny, not {cells[5]!r}"
    known = CONSTRAINTS.get(cells[5]) or OBLIGATIONS.get(cells[5])
    if known is None:
        return f"unknown constraint {cells[5]!r} (known: {', '.join([*CONSTRAINTS, *OBLIGATIONS])})"
    if not _VALUE.match(cells[6]):
        return (f"value {cells[6]!r} may contain only letters, digits, spaces and . _ : / | + - "
                f"({cells[5]} takes {known.value_help})")
    return None


def parse_policy(text: str, source: str = "policy.csv") -> PolicyRows:
    """Validate every row; raise ``PolicyInvalid`` listing every bad row, else the rows."""
    grants: list[Grant] = []
    constraints: list[Constraint] = []
    obligations: list[Obligation] = []
    memberships: list[Membership] = []
    problems: list[str] = []
    for number, cells in _raw_rows(text):
        where = f"{source}:{number}"
        problem = validate_row(cells)
        if problem is not None:
            problems.append(f"{where}: {problem}")
        elif cells[0] == "p":
            grants.append(Grant(cells, where, number))
        elif cells[0] == "g":
            memberships.append(Membership(cells, where))
        elif cells[5] in CONSTRAINTS:
            kind = CONSTRAINTS[cells[5]]
            try:
                constraints.append(Constraint(cells, where, number, kind, kind.parse(cells[6])))
            except ValueError as exc:
                problems.append(f"{where}: {cells[5]}: {exc} (takes {kind.value_help})")
        else:
            duty = OBLIGATIONS[cells[5]]
            try:
                obligations.append(Obligation(cells, where, number, duty, duty.parse(cells[6])))
            except ValueError as exc:
                problems.append(f"{where}: {cells[5]}: {exc} (takes {duty.value_help})")
    if problems:
        raise PolicyInvalid(problems)
    return PolicyRows(tuple(grants), tuple(constraints), tuple(memberships), tuple(obligations))


def _raw_rows(policy_text: str) -> list[tuple[int, tuple[str, ...]]]:
    """(line number, cells) of every row, unvalidated."""
    return [(number, tuple(cell.strip() for cell in line.split(",")))
            for number, raw in enumerate(policy_text.splitlines(), start=1)
            if (line := raw.strip()) and not line.startswith("#")]


def declared_groups(policy_text: str) -> frozenset[str]:
    """The GROUP of every ``g`` row. Read without validating the file, so that a principal
    being registered is kept apart from the policy's groups even while the file has errors."""
    return frozenset(cells[2] for _, cells in _raw_rows(policy_text)
                     if cells[0] == "g" and len(cells) > 2)


def rows_naming(policy_text: str, subject: str) -> list[int]:
    """The lines of the ``p`` and ``p2`` rows whose subject is ``subject`` (unvalidated)."""
    return [number for number, cells in _raw_rows(policy_text)
            if cells[0] in ("p", "p2") and len(cells) > 1 and cells[1] == subject]


def check_model(model_text: str, source: str = "model.conf") -> None:
    """Refuse a model that is not the fedgate model (the one the engine implements)."""

    def definitions(text: str) -> dict[tuple[str, str], str]:
        model = Model()
        model.load_model_from_text(text)
        return {(sec, key): a.value for sec, assertions in model.model.items()
                for key, a in assertions.items()}

    try:
        found = definitions(model_text)
    except Exception as exc:  # casbin raises bare exceptions on malformed models
        raise PolicyInvalid([f"{source}: not a Casbin model ({exc})"]) from None
    if any("eval(" in value for value in found.values()):  # reviewed: substring test, runs nothing
        raise PolicyInvalid([f"{source}: matchers must not use eval()"])  # reviewed: message text
    expected = definitions((POLICY_TEMPLATES / "model.conf").read_text())
    differing = sorted({*expected, *found} - {k for k in expected if found.get(k) == expected[k]})
    if differing:
        names = ", ".join(key for _, key in differing)
        raise PolicyInvalid([f"{source}: differs from the fedgate model in {names}; copy "
                             f"{POLICY_TEMPLATES / 'model.conf'} (the engine evaluates that "
                             "model only)"])
