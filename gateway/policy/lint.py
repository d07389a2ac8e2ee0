"""Lint a valid policy: rules that can never apply or never matter (``fedgate policy check``).

Pure: it takes a built engine and plain values (the node's datasets and principals), so tests
and the cookbook use it without a deployment. Validation errors are not found here: a policy
with errors does not build (``PolicyInvalid``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from gateway.policy.decisions import OBLIGATION_ACTIONS, PolicyEngine, dataset_matches
from gateway.policy.rows import AUDIT_OBJECT, JOB_ACTIONS, Constraint, Grant, Obligation
from ledger.names import ROLE_GROUPS, name_key


@dataclass(frozen=True)
class Finding:
    severity: Literal["error", "warning"]
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"


def _covers(broad: str, narrow: str) -> bool:
    """Every dataset ``narrow`` matches is matched by ``broad``."""
    if broad.endswith("*"):
        return narrow.startswith(broad[:-1])
    return broad == narrow


def lint_policy(engine: PolicyEngine, *, owner: str, datasets: Mapping[str, int],
                principals: Collection[str], now: dt.datetime) -> list[Finding]:
    """Warnings about a valid policy: rules that can never apply or never matter.

    ``datasets`` maps the node's dataset names to their training users; ``principals``
    are the registered principal names. Validation errors are not found here: a policy
    with errors does not build (``PolicyInvalid``).
    """
    findings: list[Finding] = []

    def warn(where: str, message: str) -> None:
        findings.append(Finding("warning", where, message))

    groups = {m.group for m in engine.memberships}
    known_subjects = set(principals) | groups | {m.member for m in engine.memberships}
    declared_at = {name_key(m.group): m.where for m in reversed(engine.memberships)}
    declared_at.update({name: "role group" for name in ROLE_GROUPS})
    for principal in sorted(principals):
        if name_key(principal) in declared_at:
            warn(declared_at[name_key(principal)],
                 f"principal {principal!r} is also a group: it gets every grant of the group "
                 "and the group's members get its grants; give the principal or the group "
                 "another name")
    for m in engine.rows.memberships:
        if m.domain != owner:
            warn(m.where, f"membership in domain {m.domain!r} never applies on this node "
                          f"(owner {owner!r})")
        if m.member not in principals and m.member not in groups:
            warn(m.where, f"member {m.member!r} is neither a registered principal nor a group")

    rules: list[Grant | Constraint | Obligation] = [*engine.rows.grants, *engine.rows.constraints,
                                                    *engine.rows.obligations]
    first_seen: dict[tuple[str, ...], str] = {}
    for rule in rules:
        if rule.cells in first_seen:
            warn(rule.where, f"duplicate of {first_seen[rule.cells]}")
            continue
        first_seen[rule.cells] = rule.where
        if rule.domain != owner:
            warn(rule.where, f"domain {rule.domain!r} never applies on this node (owner {owner!r})")
        if rule.subject not in known_subjects:
            warn(rule.where, f"subject {rule.subject!r} is neither a registered principal nor a "
                             "group with members (a typo?)")
        if rule.action == "read-audit":
            if not dataset_matches(rule.dataset, AUDIT_OBJECT):
                warn(rule.where, f"read-audit rules apply to the object {AUDIT_OBJECT!r}, which "
                                 f"{rule.dataset!r} does not match")
        elif rule.dataset != "*" and not any(dataset_matches(rule.dataset, name) for name in datasets):
            kind = "matches no dataset (yet)" if rule.dataset.endswith("*") else "is not a dataset"
            warn(rule.where, f"{rule.dataset!r} {kind} of this node (known: "
                             f"{', '.join(sorted(datasets)) or 'none'})")

    for allow in (g for g in engine.rows.grants if g.effect == "allow"):
        related = engine.subjects(allow.subject, allow.domain)
        for deny in engine.rows.grants:
            if (deny.effect != "deny" or deny.domain != allow.domain
                    or deny.action != allow.action or deny.subject not in related
                    or not _covers(deny.dataset, allow.dataset)):
                continue
            same = deny.subject == allow.subject and deny.dataset == allow.dataset
            verb = "contradicts" if same else "is shadowed by"
            warn(allow.where, f"'{allow.text}' {verb} '{deny.text}' ({deny.where}): deny overrides "
                              "allow, so this rule never grants anything")
            break

    findings.extend(_lint_constraints(engine, datasets=datasets, now=now))
    findings.extend(_lint_obligations(engine))
    return findings


def _lint_obligations(engine: PolicyEngine) -> list[Finding]:
    """Obligations on actions that create no job never apply; repeated output limits."""
    findings: list[Finding] = []
    same_scope: dict[tuple[str, ...], Obligation] = {}
    for duty in engine.rows.obligations:
        if duty.action not in (*OBLIGATION_ACTIONS, "*"):
            findings.append(Finding("warning", duty.where, f"{duty.kind.name} never applies to "
                                    f"{duty.action}: only {', '.join(sorted(OBLIGATION_ACTIONS))} "
                                    "requests create jobs"))
        key = (*duty.cells[1:5], duty.kind.name)
        earlier = same_scope.setdefault(key, duty)
        if earlier is not duty and duty.kind.stage == "output":
            findings.append(Finding("warning", duty.where, f"repeats {duty.kind.name} of "
                                    f"{earlier.where}: both apply, so the stricter one decides"))
    return findings


def _lint_constraints(engine: PolicyEngine, *, datasets: Mapping[str, int],
                      now: dt.datetime) -> list[Finding]:
    findings: list[Finding] = []
    same_scope: dict[tuple[str, ...], Constraint] = {}
    for rule in engine.rows.constraints:
        name = rule.kind.name
        if rule.kind.reads and rule.action not in (*JOB_ACTIONS, "*"):
            findings.append(Finding("warning", rule.where, f"{name} never applies to "
                                    f"{rule.action}: those requests state no job parameters"))
        if name == "valid_until" and now >= rule.value.ends:
            findings.append(Finding("warning", rule.where, f"expired: valid until {rule.value.text}"))
        if name == "min_clients_per_round":
            matched = {d: users for d, users in datasets.items() if dataset_matches(rule.dataset, d)}
            small = sorted(d for d, users in matched.items() if users < rule.value)
            if small:
                findings.append(Finding("warning", rule.where, f"can never hold on {', '.join(small)}: "
                                        "fewer training users than clients_per_round"))
        key = (*rule.cells[1:5], name)
        earlier = same_scope.setdefault(key, rule)
        if earlier is rule:
            continue
        if name == "allowed_model_families" and not earlier.value & rule.value:
            message = (f"contradicts {earlier.where}: no model family is allowed by both, so every "
                       "request with a model is denied")
        else:
            message = f"repeats {name} of {earlier.where}: both apply, so the stricter one decides"
        findings.append(Finding("warning", rule.where, message))
    return findings
