"""Owner policy on Casbin: validated rows in, explainable ``PolicyDecision`` out.

Contract:

* Policy rows are data. Every cell must match ``[A-Za-z0-9_.*-]+`` and the effect must
  be ``allow`` or ``deny``; anything else (quotes, parentheses, spaces, operators) is
  refused at load time, so no policy text can reach Casbin's matcher evaluator.
* Deny overrides allow; no matching allow rule means deny (fail closed).
* ``policy_version`` is the SHA-256 over the model file, the policy file and the group
  memberships from the key registry; it is recorded with every decision.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import casbin

ACTIONS = ("estimate", "train", "evaluate", "read-audit", "admin")
_CELL = re.compile(r"^[A-Za-z0-9_.*-]+$")
_EFFECTS = ("allow", "deny")


class PolicyInvalid(ValueError):
    """A policy file or row failed validation; the message names the line."""


@dataclass(frozen=True)
class PolicyDecision:
    """The outcome of one policy evaluation, as recorded in the audit log."""

    allowed: bool
    rule: tuple[str, ...] | None
    explanation: str
    policy_version: str


def parse_policy_rows(text: str, source: str = "policy") -> list[tuple[str, ...]]:
    """Parse and validate CSV policy rows (``p, ...`` and ``g, ...``); comments with #."""
    rows: list[tuple[str, ...]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        cells = tuple(cell.strip() for cell in line.split(","))
        where = f"{source}:{number}"
        bad = [cell for cell in cells if not _CELL.match(cell)]
        if bad:
            raise PolicyInvalid(
                f"{where}: cell {bad[0]!r} may contain only letters, digits and . _ - *"
            )
        kind = cells[0]
        if kind == "p":
            if len(cells) != 6:
                raise PolicyInvalid(f"{where}: 'p' rows need 5 fields: subject, domain, "
                                    "dataset, action, allow|deny")
            if cells[4] not in ACTIONS:
                raise PolicyInvalid(f"{where}: unknown action {cells[4]!r} (one of {ACTIONS})")
            if cells[5] not in _EFFECTS:
                raise PolicyInvalid(f"{where}: effect must be allow or deny, not {cells[5]!r}")
        elif kind == "g":
            if len(cells) != 4:
                raise PolicyInvalid(f"{where}: 'g' rows need 3 fields: principal, group, domain")
        else:
            raise PolicyInvalid(f"{where}: rows start with 'p' or 'g', not {kind!r}")
        rows.append(cells)
    return rows


class PolicyEngine:
    """A Casbin enforcer built from validated rows; immutable once built."""

    def __init__(
        self, model_path: Path, policy_path: Path, memberships: Iterable[tuple[str, str, str]]
    ) -> None:
        model_text = model_path.read_bytes()
        policy_text = policy_path.read_bytes()
        rows = parse_policy_rows(policy_text.decode("utf-8"), str(policy_path.name))
        member_rows = sorted(("g", *m) for m in memberships)
        for row in member_rows:
            parse_policy_rows(", ".join(row), "key registry")
        digest = hashlib.sha256()
        for part in (model_text, policy_text, repr(member_rows).encode()):
            digest.update(hashlib.sha256(part).digest())
        self.version = "sha256:" + digest.hexdigest()
        self._enforcer = casbin.Enforcer(str(model_path))
        for row in [*rows, *member_rows]:
            if row[0] == "p":
                self._enforcer.add_named_policy("p", list(row[1:]))
            else:
                self._enforcer.add_named_grouping_policy("g", list(row[1:]))

    def decide(self, *, subject: str, domain: str, dataset: str, action: str) -> PolicyDecision:
        """Evaluate one request; never raises for a well-formed request (fails closed)."""
        if action not in ACTIONS or not all(_CELL.match(v) for v in (subject, domain, dataset)):
            return PolicyDecision(False, None, "request names an invalid subject, dataset or "
                                  "action", self.version)
        allowed, explain = self._enforcer.enforce_ex(subject, domain, dataset, action)
        rule = tuple(explain) if explain else None
        if allowed:
            text = f"{subject} may {action} on {dataset}: an allow rule matched and no deny rule did"
        elif rule is not None and rule[-1] == "deny":
            text = (f"{subject} may not {action} on {dataset}: denied by rule "
                    f"'p, {', '.join(rule)}'")
        else:
            text = (f"{subject} may not {action} on {dataset}: no rule grants it "
                    f"(ask the data owner for a '{action}' grant on {dataset})")
        return PolicyDecision(bool(allowed), rule, text, self.version)
