"""`fedgate policy`: lint, unit-test, explain and reload the owner policy.

All commands act on a deployment (-d DIR) and read its key registry (group memberships)
and datasets; --policy FILE uses a candidate file instead of the live
policies/policy.csv. Exit codes: 0 success (explain: allowed), 1 findings, failed
expectations, a denial or a refused reload, 2 usage or file errors. See docs/policies.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli.common import open_node
from gateway.cli.usage import add_command, examples
from gateway.policy.request import ACTIONS
from gateway.policy.values import parse_instant

if TYPE_CHECKING:
    from gateway.policy.decisions import PolicyEngine
    from gateway.policy.rows import PolicyInvalid

# Casbin and SQLModel are imported inside the commands, not here: `fedgate --help` builds this
# parser, and loading them would cost it seconds (and a researcher's light install lacks them).

# ---------------------------------------------------------------------------------------------
# Commands (the shell: deployment, ledger, files, output)


def _registry(node) -> tuple[list[tuple[str, str, str]], set[str], dict[str, int]]:  # type: ignore[no-untyped-def]
    """The node's memberships, principal names and datasets (name → training users)."""
    from sqlmodel import select

    from gateway.policy.ledger_inputs import registry_memberships
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
    from gateway.policy.decisions import PolicyEngine

    return PolicyEngine(node.deployment.policy_model.read_text(encoding="utf-8"),
                        path.read_text(encoding="utf-8"), memberships, source=path.name,
                        model_source=node.deployment.policy_model.name)


def _build_or_report(node, path: Path,  # type: ignore[no-untyped-def]
                     memberships: list[tuple[str, str, str]], *,
                     report: bool = True) -> PolicyEngine | PolicyInvalid:
    """The engine for ``path``, or its validation errors after printing each of them (unless
    not ``report``)."""
    from gateway.policy.rows import PolicyInvalid

    try:
        return _build(node, path, memberships)
    except PolicyInvalid as exc:
        if not report:
            return exc
        for problem in exc.problems:
            print(f"error: {problem}")
        print(f"{path}: {len(exc.problems)} error(s); this policy would not load")
        return exc


def _now(args: argparse.Namespace) -> dt.datetime:
    return parse_instant(args.at) if getattr(args, "at", None) else dt.datetime.now(dt.UTC)


def cmd_policy_check(args: argparse.Namespace) -> int:
    from gateway.policy.lint import lint_policy
    from gateway.policy.rows import PolicyInvalid

    node = open_node(args)
    memberships, principals, datasets = _registry(node)
    path = _policy_path(node, args)
    engine = _build_or_report(node, path, memberships, report=not args.json)
    if isinstance(engine, PolicyInvalid):
        if args.json:
            print(json.dumps({"policy": str(path), "valid": False,
                              "errors": [str(problem) for problem in engine.problems]},
                             indent=2, ensure_ascii=False))
        return 1
    findings = lint_policy(engine, owner=node.config.owner, datasets=datasets,
                           principals=principals, now=_now(args))
    rows = engine.rows
    if args.json:
        print(json.dumps({"policy": str(path), "valid": True, "version": engine.version,
                          "rules": len(rows.grants), "constraints": len(rows.constraints),
                          "obligations": len(rows.obligations),
                          "memberships": len(engine.memberships),
                          "warnings": [str(finding) for finding in findings]},
                         indent=2, ensure_ascii=False))
        return 1 if findings and args.strict else 0
    for finding in findings:
        print(finding)
    obligations = f"{len(rows.obligations)} obligations, " if rows.obligations else ""
    print(f"{path}: valid ({len(rows.grants)} rules, {len(rows.constraints)} constraints, "
          f"{obligations}{len(engine.memberships)} memberships), {len(findings)} warning(s); "
          f"version {engine.version}")
    return 1 if findings and args.strict else 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    from gateway.policy.expectations import outcome, parse_expectations, run_expectations

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
    from gateway.policy.expectations import outcome, parse_params
    from gateway.policy.ledger_inputs import researcher_epsilon_spent
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
            with node.read_engine.connect() as c:
                return researcher_epsilon_spent(c, researcher=args.subject, dataset=args.dataset,
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
    from gateway.policy.lint import lint_policy
    from gateway.policy.rows import PolicyInvalid
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
    group = add_command(
        commands, "policy", help="check, test, explain and reload the owner policy (owner)",
        description=__doc__,
        examples=examples(
            "fedgate -d ./node policy check --policy new-policy.csv",
            "fedgate -d ./node policy test expectations.csv --policy new-policy.csv",
            "fedgate -d ./node policy explain --as bob --dataset notes --action train \\",
            "    --param rounds=500 --param noise_multiplier=0.8",
            "fedgate -d ./node policy reload --from new-policy.csv"))
    sub = group.add_subparsers(dest="policy_command", required=True, metavar="ACTION")

    def policy_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--policy", help="policy file to use instead of policies/policy.csv")

    p = add_command(sub, "check", help="lint: syntax, values, unknown datasets and subjects, "
                    "shadowed or contradictory rules",
                    examples=examples("fedgate -d ./node policy check",
                                      "fedgate -d ./node policy check --policy new-policy.csv "
                                      "--strict --json"))
    policy_option(p)
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p.add_argument("--at", help="judge expiry at this ISO time (default: now)")
    p.add_argument("--json", action="store_true", help="print the verdict, errors and "
                   "warnings as JSON")
    p.set_defaults(func=cmd_policy_check)

    p = add_command(sub, "test", help="run an expectation table (subject,dataset,action,params,"
                    "expect) against the policy",
                    examples=examples("fedgate -d ./node policy test expectations.csv",
                                      "fedgate -d ./node policy test expectations.csv "
                                      "--policy new-policy.csv"))
    p.add_argument("expectations", help="CSV file; see docs/policies.md")
    policy_option(p)
    p.add_argument("--at", help="default time of the requests (ISO, default: now)")
    p.set_defaults(func=cmd_policy_test)

    p = add_command(sub, "explain", help="decide one request and say why",
                    examples=examples(
                        "fedgate -d ./node policy explain --as bob --dataset notes --action train",
                        "fedgate -d ./node policy explain --as bob --dataset notes --action train "
                        "\\",
                        "    --param rounds=500 --param noise_multiplier=0.8 --json"))
    p.add_argument("--as", dest="subject", required=True, help="principal name")
    p.add_argument("--dataset", required=True, help="the dataset the request names")
    p.add_argument("--action", dest="request_action", required=True, choices=ACTIONS,
                   help="the requested action")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a request parameter, e.g. rounds=500 noise_multiplier=0.8 "
                        "epsilon=1.2 model_family=keras-sequential model_bytes=3MB; repeatable")
    p.add_argument("--at", help="time of the request (ISO, default: now)")
    policy_option(p)
    p.add_argument("--json", action="store_true", help="print the decision as JSON")
    p.set_defaults(func=cmd_policy_explain)

    p = add_command(sub, "reload", help="validate and install the policy; the gateway switches "
                    "at its next request, a refused policy changes nothing",
                    examples=examples("fedgate -d ./node policy reload",
                                      "fedgate -d ./node policy reload --from new-policy.csv"))
    p.add_argument("--from", dest="source", help="install this file as policies/policy.csv "
                   "if it is valid (default: re-validate the live file)")
    p.set_defaults(func=cmd_policy_reload)
