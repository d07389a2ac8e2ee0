"""`fedgate policy`: lint, unit-test, explain and reload the owner policy.

All commands act on a deployment (-d DIR) and read its key registry (group memberships)
and datasets; --policy FILE uses a candidate file instead of the live
policies/policy.csv. Exit codes: 0 success (explain: allowed), 1 findings, failed
expectations, a denial or a refused reload, 2 usage or file errors. See docs/policies.md.

Examples:

    fedgate -d ./node policy check --policy new-policy.csv
    fedgate -d ./node policy test expectations.csv --policy new-policy.csv
    fedgate -d ./node policy explain --as bob --dataset notes --action train \\
        --param rounds=500 --param noise_multiplier=0.8
    fedgate -d ./node policy reload --from new-policy.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from gateway.audit_api import AUDIT_OBJECT
from gateway.cli_common import open_node
from gateway.policy import (
    ACTIONS,
    JOB_ACTIONS,
    OBLIGATION_ACTIONS,
    Constraint,
    Grant,
    Obligation,
    PolicyDecision,
    PolicyEngine,
    PolicyInvalid,
    RequestContext,
    context_from_params,
    dataset_matches,
    parse_instant,
)
from ledger.names import ROLE_GROUPS, name_key

# Imports inside the commands, not at the top: each command loads only what it needs (this
# module itself needs the node extra; `fedgate --help` stubs it on a light install).

# ---------------------------------------------------------------------------------------------
# Lint (the pure parts, lint and expectation tables, take an engine and plain values, so tests
# and the cookbook use them without a deployment)


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


# ---------------------------------------------------------------------------------------------
# Expectation tables


EXPECTATION_HEADER = ("subject", "dataset", "action", "params", "expect")


@dataclass(frozen=True)
class Expectation:
    """One row of an owner's expectation table: a request and the decision it must get."""

    where: str
    subject: str
    domain: str
    dataset: str
    action: str
    params: str
    context: RequestContext
    allowed: bool
    review: bool = False  # ``expect`` is ``review``: allowed, and held for the owner's review

    @property
    def expected(self) -> str:
        return "review" if self.review else "allow" if self.allowed else "deny"


def parse_params(words: list[str], *, domain: str, now: dt.datetime) -> tuple[str, RequestContext]:
    """``NAME=VALUE`` words: request parameters plus ``at=`` (an ISO time) and ``domain=``."""
    params: dict[str, str] = {}
    for word in words:
        name, sep, value = word.partition("=")
        if not sep or not value:
            raise ValueError(f"{word!r} is not NAME=VALUE")
        if name in params:
            raise ValueError(f"parameter {name} is given twice")
        params[name] = value
    if "at" in params:
        now = parse_instant(params.pop("at"))
    return params.pop("domain", domain), context_from_params(params, now)


def parse_expectations(text: str, *, domain: str, now: dt.datetime,
                       source: str = "expectations.csv") -> list[Expectation]:
    """Parse a CSV table with the header ``subject,dataset,action,params,expect``.

    ``params`` holds space-separated ``NAME=VALUE`` words (``rounds=500 at=2025-06-02T09:00Z``);
    ``expect`` is ``allow``, ``deny`` or ``review`` (allowed, and held for the owner's review;
    ``allow`` then means allowed without review). Blank lines and lines starting with ``#``
    are skipped.
    Raises ValueError naming the line of the first malformed row.
    """
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1)
             if line.strip() and not line.lstrip().startswith("#")]
    rows = [(n, [cell.strip() for cell in cells])
            for (n, _), cells in zip(lines, csv.reader(line for _, line in lines), strict=True)]
    if not rows or tuple(rows[0][1]) != EXPECTATION_HEADER:
        raise ValueError(f"{source}: the first row must be the header {','.join(EXPECTATION_HEADER)}")
    expectations = []
    for number, cells in rows[1:]:
        where = f"{source}:{number}"
        if len(cells) != len(EXPECTATION_HEADER):
            raise ValueError(f"{where}: expected {len(EXPECTATION_HEADER)} cells "
                             f"({','.join(EXPECTATION_HEADER)}), found {len(cells)}")
        subject, dataset, action, params, expect = cells
        if action not in ACTIONS:
            raise ValueError(f"{where}: unknown action {action!r} (one of {', '.join(ACTIONS)})")
        if expect not in ("allow", "deny", "review"):
            raise ValueError(f"{where}: expect must be allow, deny or review, not {expect!r}")
        try:
            row_domain, context = parse_params(params.split(), domain=domain, now=now)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        expectations.append(Expectation(where, subject, row_domain, dataset, action, params,
                                        context, expect != "deny", expect == "review"))
    return expectations


def run_expectations(engine: PolicyEngine, expectations: list[Expectation]
                     ) -> list[tuple[Expectation, PolicyDecision]]:
    """Each expectation with the engine's decision (compare ``outcome(decision)`` with
    ``expectation.expected``)."""
    return [(e, engine.decide(subject=e.subject, domain=e.domain, dataset=e.dataset,
                              action=e.action, context=e.context)) for e in expectations]


def outcome(decision: PolicyDecision) -> str:
    """``allow``, ``deny`` or ``review`` (allowed, and held for the owner's review)."""
    if not decision.allowed:
        return "deny"
    return "review" if decision.review is not None else "allow"


# ---------------------------------------------------------------------------------------------
# Commands (the shell: deployment, ledger, files, output)


def _registry(node) -> tuple[list[tuple[str, str, str]], set[str], dict[str, int]]:  # type: ignore[no-untyped-def]
    """The node's memberships, principal names and datasets (name → training users)."""
    from sqlmodel import select

    from gateway.policy import registry_memberships
    from ledger.models import Dataset, Principal

    with node.session() as s:
        memberships = registry_memberships(s, node.config.owner)
        people = s.exec(select(Principal)).all()  # reviewed: ORM query, not exec
        principals = {p.name for p in people if p.status == "active"}
        rows = s.exec(select(Dataset)).all()  # reviewed: ORM query, not exec
        datasets = {d.name: d.training_users for d in rows}
    return memberships, principals, datasets


def _policy_path(node, args: argparse.Namespace) -> Path:  # type: ignore[no-untyped-def]
    candidate = getattr(args, "policy", None) or getattr(args, "source", None)
    return Path(candidate) if candidate else node.deployment.policy_file


def _build(node, path: Path, memberships: list[tuple[str, str, str]]) -> PolicyEngine:  # type: ignore[no-untyped-def]
    return PolicyEngine(node.deployment.policy_model.read_text(encoding="utf-8"),
                        path.read_text(encoding="utf-8"), memberships, source=path.name,
                        model_source=node.deployment.policy_model.name)


def _build_or_report(node, path: Path,  # type: ignore[no-untyped-def]
                     memberships: list[tuple[str, str, str]]) -> PolicyEngine | PolicyInvalid:
    """The engine for ``path``, or its validation errors after printing each of them."""
    try:
        return _build(node, path, memberships)
    except PolicyInvalid as exc:
        for problem in exc.problems:
            print(f"error: {problem}")
        print(f"{path}: {len(exc.problems)} error(s); this policy would not load")
        return exc


def _now(args: argparse.Namespace) -> dt.datetime:
    return parse_instant(args.at) if getattr(args, "at", None) else dt.datetime.now(dt.UTC)


def cmd_policy_check(args: argparse.Namespace) -> int:
    node = open_node(args)
    memberships, principals, datasets = _registry(node)
    path = _policy_path(node, args)
    engine = _build_or_report(node, path, memberships)
    if isinstance(engine, PolicyInvalid):
        return 1
    findings = lint_policy(engine, owner=node.config.owner, datasets=datasets,
                           principals=principals, now=_now(args))
    for finding in findings:
        print(finding)
    rows = engine.rows
    obligations = f"{len(rows.obligations)} obligations, " if rows.obligations else ""
    print(f"{path}: valid ({len(rows.grants)} rules, {len(rows.constraints)} constraints, "
          f"{obligations}{len(engine.memberships)} memberships), {len(findings)} warning(s); "
          f"version {engine.version}")
    return 1 if findings and args.strict else 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    node = open_node(args)
    memberships, _, _ = _registry(node)
    path = _policy_path(node, args)
    engine = _build(node, path, memberships)
    table = Path(args.expectations)
    expectations = parse_expectations(table.read_text(encoding="utf-8"), domain=node.config.owner,
                                      now=_now(args), source=table.name)
    failed = 0
    for expectation, decision in run_expectations(engine, expectations):
        want, got = expectation.expected, outcome(decision)
        request = (f"{expectation.subject} {expectation.action} {expectation.dataset} "
                   f"{expectation.params}").rstrip()
        if want == got:
            print(f"ok    {expectation.where}  {request} → {got}")
        else:
            failed += 1
            print(f"FAIL  {expectation.where}  {request}: expected {want}, got {got}: "
                  f"{decision.explanation}")
    print(f"{len(expectations) - failed} passed, {failed} failed against {path} "
          f"(version {engine.version})")
    return 1 if failed else 0


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from gateway.policy import researcher_epsilon_spent
    from ledger.models import Dataset

    node = open_node(args)
    memberships, _, _ = _registry(node)
    engine = _build(node, _policy_path(node, args), memberships)
    with node.session() as s:
        dataset = s.get(Dataset, args.dataset)
    domain = dataset.owner if dataset is not None else node.config.owner
    words = [*args.param, *([f"at={args.at}"] if args.at else [])]
    domain, context = parse_params(words, domain=domain, now=dt.datetime.now(dt.UTC))
    if context.researcher_epsilon_spent is None:
        now = context.now

        def spent(window: dt.timedelta) -> float:  # from the ledger unless --param gives it
            with node.session() as s:
                return researcher_epsilon_spent(s, researcher=args.subject, dataset=args.dataset,
                                                since=now - window)

        context = replace(context, researcher_epsilon_spent=spent)
    decision = engine.decide(subject=args.subject, domain=domain, dataset=args.dataset,
                             action=args.request_action, context=context)
    report: dict[str, Any] = {
        "allowed": decision.allowed,
        "explanation": decision.explanation,
        "rule": ", ".join(decision.rule) if decision.rule else None,
        "groups": list(engine.subjects(args.subject, domain)[1:]),
        "policy_version": decision.policy_version,
        "review": decision.review,
    }
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(f"{outcome(decision)}: {decision.explanation}")
        print(f"  rule:    {report['rule'] or '(none)'}")
        print(f"  groups:  {', '.join(report['groups']) or '(none)'}")
        print(f"  policy:  {decision.policy_version}")
    return 0 if decision.allowed else 1


def cmd_policy_reload(args: argparse.Namespace) -> int:
    """Validate the policy; if valid, install it (``--from``) atomically and nudge the
    gateway, which switches at its next request. Either outcome is audited; a refused
    policy changes nothing, so the running gateway keeps its current policy."""
    from ledger.audit import append_entry

    node = open_node(args)
    memberships, principals, datasets = _registry(node)
    live = node.deployment.policy_file
    path = _policy_path(node, args)
    engine = _build_or_report(node, path, memberships)
    if isinstance(engine, PolicyInvalid):
        with node.session() as s, s.begin():
            append_entry(s, action="policy", actor="owner-cli", decision="rejected",
                         source=path.name, reason=str(engine))
        print("refused: the gateway keeps its current policy")
        return 1
    for finding in lint_policy(engine, owner=node.config.owner, datasets=datasets,
                               principals=principals, now=dt.datetime.now(dt.UTC)):
        print(finding)
    if path.resolve() != live.resolve():
        staged = live.with_name(live.name + ".tmp")
        staged.write_bytes(path.read_bytes())
        staged.replace(live)  # atomic: the gateway sees the old file or the new one
    else:
        os.utime(live)  # a new mtime makes the gateway rebuild at its next request
    with node.session() as s, s.begin():
        append_entry(s, action="policy", actor="owner-cli", decision="accepted",
                     source=path.name, policy_version=engine.version)
    print(f"accepted policy {engine.version}; the gateway switches to it at its next request")
    return 0


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``fedgate policy check|test|explain|reload`` to the top-level subcommands."""
    group = commands.add_parser(
        "policy", help="check, test, explain and reload the owner policy (owner)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = group.add_subparsers(dest="policy_command", required=True, metavar="ACTION")

    def policy_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--policy", help="policy file to use instead of policies/policy.csv")

    p = sub.add_parser("check", help="lint: syntax, values, unknown datasets and subjects, "
                       "shadowed or contradictory rules")
    policy_option(p)
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p.add_argument("--at", help="judge expiry at this ISO time (default: now)")
    p.set_defaults(func=cmd_policy_check)

    p = sub.add_parser("test", help="run an expectation table (subject,dataset,action,params,"
                       "expect) against the policy")
    p.add_argument("expectations", help="CSV file; see docs/policies.md")
    policy_option(p)
    p.add_argument("--at", help="default time of the requests (ISO, default: now)")
    p.set_defaults(func=cmd_policy_test)

    p = sub.add_parser("explain", help="decide one request and say why")
    p.add_argument("--as", dest="subject", required=True, help="principal name")
    p.add_argument("--dataset", required=True)
    p.add_argument("--action", dest="request_action", required=True, choices=ACTIONS)
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a request parameter, e.g. rounds=500 noise_multiplier=0.8 "
                        "epsilon=1.2 model_family=keras-sequential model_bytes=3MB; repeatable")
    p.add_argument("--at", help="time of the request (ISO, default: now)")
    policy_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_policy_explain)

    p = sub.add_parser("reload", help="validate and install the policy; the gateway switches at "
                       "its next request, a refused policy changes nothing")
    p.add_argument("--from", dest="source", help="install this file as policies/policy.csv "
                   "if it is valid (default: re-validate the live file)")
    p.set_defaults(func=cmd_policy_reload)
