"""Owner tooling as a specification: `fedgate policy check|test|explain|reload` on a real
deployment (SQLite ledger), the lint rules, expectation tables, and hot reload that keeps
the old policy when the new one fails validation."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
import uuid
from pathlib import Path

import pytest

from gateway.cli import policy as cli_policy
from gateway.node.deployment import init_deployment
from gateway.node.node import Node
from gateway.policy.decisions import PolicyEngine
from gateway.policy.expectations import parse_expectations, run_expectations
from gateway.policy.lint import lint_policy
from ledger import keys
from ledger.audit import read_entries
from ledger.budget import register_dataset
from ledger.models import Job, Principal
from ledger.public_count import declared_count
from ledger.registry import add_principal

MODEL = (Path(__file__).resolve().parent.parent / "policies" / "model.conf").read_text()
NOW = dt.datetime(2025, 6, 2, 9, 0, tzinfo=dt.UTC)
POLICY = """\
p, researchers, clinic, *, estimate, allow
p, researchers, clinic, *, train, allow
p, officers, clinic, audit, read-audit, allow
p, interns, clinic, notes, train, deny
p2, interns, clinic, notes, *, min_noise_multiplier, 1.0
p2, researchers, clinic, *, train, max_rounds, 500
p2, researchers, clinic, notes, *, max_epsilon_per_researcher, 2 per 30d
g, ian, interns, clinic
"""


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A deployment of owner ``clinic`` with datasets notes (500 users) and vitals (80),
    researchers bob and ian and officer olivia."""
    monkeypatch.setenv("FEDGATE_DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    root = tmp_path / "node"
    init_deployment(root, owner="clinic")
    (root / "policies" / "policy.csv").write_text(POLICY)
    node = Node(root)
    with node.session() as s, s.begin():
        for name, users in (("notes", 500), ("vitals", 80)):
            register_dataset(s, name=name, owner="clinic", path=str(root / name),
                             training_users=users, evaluation_users=100, num_features=3,
                             public_users=declared_count(users),
                             num_classes=2, epsilon_total=8, delta=1e-6, actor="test")
        for name, role, group in (("bob", "researcher", "researchers"),
                                  ("ian", "researcher", "researchers"),
                                  ("olivia", "officer", "officers")):
            public = keys.generate_private_key().public_key()
            add_principal(s, name=name, role=role, key_id=keys.key_id(public),
                          public_key_b64=keys.public_key_b64(public), group=group, actor="test")
    node.engine.dispose()
    return root


def fedgate_policy(root: Path, *argv: str) -> int:
    """``fedgate -d ROOT policy ...`` through the parser the top-level CLI builds."""
    parser = argparse.ArgumentParser(prog="fedgate")
    parser.add_argument("-d", "--deployment")
    cli_policy.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["-d", str(root), "policy", *argv])
    return int(args.func(args))


def policy_entries(root: Path) -> list[dict]:
    node = Node(root)
    with node.session() as s:
        entries = [e for e in read_entries(s) if e["action"] == "policy"]
    node.engine.dispose()
    return entries


# ---------------------------------------------------------------------------------------------
# Lint


def lint(policy: str, memberships: list[tuple[str, str, str]] | None = None) -> list[str]:
    engine = PolicyEngine(MODEL, policy, memberships or [("bob", "researchers", "clinic")])
    return [str(f) for f in lint_policy(engine, owner="clinic", datasets={"notes": 500, "vitals": 80},
                                        principals={"bob"}, now=NOW)]


def test_a_clean_policy_has_no_findings() -> None:
    assert lint("p, researchers, clinic, *, train, allow\n"
                "p2, researchers, clinic, notes, train, max_rounds, 500\n") == []


@pytest.mark.parametrize(("policy", "finding"), [
    ("p, researchers, clinic, notez, train, allow", "'notez' is not a dataset of this node"),
    ("p, researchers, clinic, cohort-*, train, allow", "'cohort-*' matches no dataset (yet)"),
    ("p, reseachers, clinic, notes, train, allow", "subject 'reseachers' is neither"),
    ("p, researchers, hospital, notes, train, allow", "domain 'hospital' never applies"),
    ("p, researchers, clinic, notes, read-audit, allow", "read-audit rules apply to the object 'audit'"),
    ("p, researchers, clinic, notes, train, allow\np, researchers, clinic, notes, train, allow",
     "policy.csv:2: duplicate of policy.csv:1"),
    ("p, researchers, clinic, notes, train, allow\np, researchers, clinic, notes, train, deny",
     "contradicts 'p, researchers, clinic, notes, train, deny' (policy.csv:2)"),
    ("p, bob, clinic, notes, train, allow\np, researchers, clinic, *, train, deny",
     "'p, bob, clinic, notes, train, allow' is shadowed by 'p, researchers, clinic, *, train, deny'"),
    ("p2, researchers, clinic, notes, read-audit, max_rounds, 5", "max_rounds never applies to read-audit"),
    ("p2, researchers, clinic, notes, *, valid_until, 2025-01-31", "expired: valid until 2025-01-31"),
    ("p2, researchers, clinic, *, train, min_clients_per_round, 100", "can never hold on vitals"),
    ("p2, researchers, clinic, notes, train, max_rounds, 500\n"
     "p2, researchers, clinic, notes, train, max_rounds, 100", "repeats max_rounds of policy.csv:1"),
    ("p2, researchers, clinic, notes, train, allowed_model_families, keras-sequential\n"
     "p2, researchers, clinic, notes, train, allowed_model_families, keras-functional",
     "no model family is allowed by both"),
])
def test_lint_finds_rules_that_never_apply_or_never_matter(policy: str, finding: str) -> None:
    findings = lint(policy)
    assert any(finding in f for f in findings), findings


# ---------------------------------------------------------------------------------------------
# Expectation tables


def test_an_expectation_table_states_requests_and_their_decisions() -> None:
    engine = PolicyEngine(MODEL, POLICY, [("bob", "researchers", "clinic")])
    table = """\
subject,dataset,action,params,expect
# grads and researchers
bob,notes,train,rounds=500 epsilon=1 researcher_epsilon_spent=0.5,allow
bob,notes,train,rounds=501 epsilon=1 researcher_epsilon_spent=0.5,deny
ian,notes,train,,deny
bob,notes,estimate,domain=hospital,deny
"""
    expectations = parse_expectations(table, domain="clinic", now=NOW)
    assert [e.where for e in expectations] == ["expectations.csv:3", "expectations.csv:4",
                                               "expectations.csv:5", "expectations.csv:6"]
    results = run_expectations(engine, expectations)
    assert [d.allowed for _, d in results] == [e.allowed for e in expectations]


@pytest.mark.parametrize(("table", "message"), [
    ("who,dataset,action,params,expect\n", "the first row must be the header"),
    ("subject,dataset,action,params,expect\nbob,notes,train,,perhaps\n",
     "expect must be allow, deny or review"),
    ("subject,dataset,action,params,expect\nbob,notes,fly,,allow\n", "unknown action 'fly'"),
    ("subject,dataset,action,params,expect\nbob,notes,train,rounds=many,allow\n", "parameter rounds"),
    ("subject,dataset,action,params,expect\nbob,notes,train,speed=3,allow\n", "unknown parameter 'speed'"),
    ("subject,dataset,action,params,expect\nbob,notes,train,at=tomorrow,allow\n", "ISO 8601"),
    ("subject,dataset,action,params,expect\nbob,notes,train,allow\n", "expected 5 cells"),
])
def test_malformed_expectation_rows_are_refused_naming_the_line(table: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_expectations(table, domain="clinic", now=NOW)


# ---------------------------------------------------------------------------------------------
# Commands


def test_check_reports_errors_with_lines_and_exits_1(root: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.csv"
    bad.write_text("p, alice, clinic, notes, train, False) or (True\n"
                   "p2, researchers, clinic, notes, train, max_epsilon, nan\n")
    assert fedgate_policy(root, "check", "--policy", str(bad)) == 1
    out = capsys.readouterr().out
    assert "error: bad.csv:1:" in out and "error: bad.csv:2: max_epsilon" in out
    assert "2 error(s); this policy would not load" in out


def test_check_passes_a_valid_policy_and_strict_fails_on_warnings(root: Path, tmp_path: Path,
                                                                  capsys) -> None:  # type: ignore[no-untyped-def]
    assert fedgate_policy(root, "check") == 0
    assert "valid (4 rules, 3 constraints, 4 memberships), 0 warning(s)" in capsys.readouterr().out
    typo = tmp_path / "typo.csv"
    typo.write_text(POLICY + "p, researchers, clinic, notez, train, allow\n")
    assert fedgate_policy(root, "check", "--policy", str(typo)) == 0
    assert fedgate_policy(root, "check", "--policy", str(typo), "--strict") == 1


def test_check_warns_about_a_principal_that_is_also_a_group(root: Path, tmp_path: Path,
                                                            capsys) -> None:  # type: ignore[no-untyped-def]
    shared = tmp_path / "shared.csv"
    shared.write_text(POLICY + "g, gina, bob, clinic\n")  # gina would get bob's grants
    assert fedgate_policy(root, "check", "--policy", str(shared), "--strict") == 1
    assert ("warning: shared.csv:9: principal 'bob' is also a group"
            in capsys.readouterr().out)
    node = Node(root)  # a ledger from before names were checked: a researcher named officers
    with node.session() as s, s.begin():
        s.add(Principal(key_id="k-legacy", name="officers", role="researcher",
                        group="researchers", public_key="", created_at=0.0))
    node.engine.dispose()
    assert fedgate_policy(root, "check", "--strict") == 1
    assert ("warning: role group: principal 'officers' is also a group"
            in capsys.readouterr().out)


def test_test_runs_an_expectation_table_and_reports_failures(root: Path, tmp_path: Path,
                                                             capsys) -> None:  # type: ignore[no-untyped-def]
    table = tmp_path / "expect.csv"
    table.write_text("subject,dataset,action,params,expect\n"
                     "bob,vitals,train,rounds=500,allow\n"
                     "ian,notes,train,rounds=10 noise_multiplier=2,allow\n")
    assert fedgate_policy(root, "test", str(table)) == 1
    out = capsys.readouterr().out
    assert "ok    expect.csv:2" in out
    assert "FAIL  expect.csv:3  ian train notes rounds=10 noise_multiplier=2: expected allow, got deny" in out
    assert "1 passed, 1 failed" in out


def test_explain_names_the_denying_rule_and_the_fix(root: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = fedgate_policy(root, "explain", "--as", "bob", "--dataset", "notes", "--action", "train",
                          "--param", "rounds=800", "--param", "epsilon=0.5")
    out = capsys.readouterr().out
    assert code == 1
    assert out.startswith("deny: bob may not train on notes: rule 'p2, researchers, clinic, *, "
                          "train, max_rounds, 500' (policy.csv:6) requires rounds ≤ 500; you "
                          "asked 800 — lower rounds to ≤ 500")
    assert "  rule:    p2, researchers, clinic, *, train, max_rounds, 500" in out
    assert "  groups:  researchers" in out


def test_explain_of_an_allowed_request_exits_0(root: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = fedgate_policy(root, "explain", "--as", "ian", "--dataset", "vitals", "--action",
                          "train", "--param", "rounds=500", "--param", "noise_multiplier=0.8")
    assert code == 0  # interns' deny and noise floor are on notes only
    assert capsys.readouterr().out.startswith("allow: ian may train on vitals")


def test_explain_reads_the_researchers_epsilon_from_the_ledger(root: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    node = Node(root)
    now = time.time()
    with node.session() as s, s.begin():
        for state, age_days in (("committed", 3), ("reserved", 1), ("refunded", 1), ("committed", 40)):
            s.add(Job(id=f"job-{uuid.uuid4().hex[:8]}", dataset="notes", researcher_key_id="k",
                      researcher="bob", request_digest="d", model_digest="m", spec="{}", cost="{}",
                      cost_rdp="[]", epsilon=0.7, delta=1e-6, state="succeeded",
                      budget_state=state, rounds=10, policy_version="v",
                      created_at=now - age_days * 86400, updated_at=now))
    node.engine.dispose()
    code = fedgate_policy(root, "explain", "--as", "bob", "--dataset", "notes", "--action",
                          "estimate", "--param", "epsilon=0.7", "--json")
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and not report["allowed"]
    assert "you have 1.4 reserved or spent in that window and this job needs 0.7" in report["explanation"]
    assert report["rule"] == "p2, researchers, clinic, notes, *, max_epsilon_per_researcher, 2 per 30d"


def test_reload_refuses_an_invalid_policy_keeps_the_live_file_and_audits(root: Path,
                                                                        tmp_path: Path) -> None:
    live = root / "policies" / "policy.csv"
    bad = tmp_path / "bad.csv"
    bad.write_text("p, alice, ds, train, False) or (True\n")
    assert fedgate_policy(root, "reload", "--from", str(bad)) == 1
    assert live.read_text() == POLICY
    [entry] = policy_entries(root)
    assert entry["decision"] == "rejected" and entry["actor"] == "owner-cli"
    assert "bad.csv:1" in entry["reason"]


def test_reload_installs_a_valid_policy_atomically_and_records_its_version(root: Path,
                                                                          tmp_path: Path) -> None:
    new = tmp_path / "new.csv"
    new.write_text(POLICY.replace("max_rounds, 500", "max_rounds, 300"))
    assert fedgate_policy(root, "reload", "--from", str(new)) == 0
    assert (root / "policies" / "policy.csv").read_text() == new.read_text()
    node = Node(root)
    [entry] = policy_entries(root)
    assert entry["decision"] == "accepted"
    assert entry["policy_version"] == node.policy().version


# ---------------------------------------------------------------------------------------------
# Hot reload in the running node


def test_a_reload_that_fails_validation_keeps_the_old_policy_and_says_why(root: Path) -> None:
    node = Node(root)
    before = node.policy()
    live = root / "policies" / "policy.csv"
    live.write_text(POLICY + "p2, researchers, clinic, notes, train, max_epsilon, inf\n")
    assert node.policy() is before
    assert node.policy() is before  # the same broken file is refused (and audited) once
    [entry] = policy_entries(root)
    assert entry["decision"] == "rejected" and entry["actor"] == "gateway"
    assert entry["policy_version"] == before.version
    assert "policy.csv:9: max_epsilon" in entry["reason"]
    live.write_text(POLICY + "p2, researchers, clinic, notes, train, max_epsilon, 3\n")
    after = node.policy()
    assert after.version != before.version
    entry = policy_entries(root)[-1]
    assert entry == {**entry, "decision": "reloaded", "policy_version": after.version,
                     "previous_version": before.version}


def test_a_new_group_membership_in_the_registry_reloads_the_policy(root: Path) -> None:
    node = Node(root)
    before = node.policy()
    with node.session() as s, s.begin():
        public = keys.generate_private_key().public_key()
        add_principal(s, name="gina", role="researcher", key_id=keys.key_id(public),
                      public_key_b64=keys.public_key_b64(public), group="interns", actor="test")
    after = node.policy()
    assert after.version != before.version
    assert after.subjects("gina", "clinic") == ("gina", "interns")
