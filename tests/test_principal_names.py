"""Principals and groups never share a name: registration refuses every collision (issue 22).

The policy matches principals and groups in one subject column, so a researcher named like a
group gets the group's grants, and a group named like a researcher gives its members that
researcher's grants. These tests register keys through the owner CLI, as an owner would.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import select

from gateway.cli import main as fedgate
from gateway.node.deployment import init_deployment
from gateway.node.node import Node
from ledger import keys
from ledger.models import Principal


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh deployment (owner ``clinic``, the default policy) with researcher alice."""
    monkeypatch.setenv("FEDGATE_DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    root = tmp_path / "node"
    init_deployment(root, owner="clinic")
    assert add(root, "researcher", "alice") == 0
    return root


def public_key_file(root: Path) -> Path:
    prefix = root.parent / f"key-{len(list(root.parent.glob('key-*.pub')))}"
    return keys.write_key_pair(keys.generate_private_key(), prefix)[1]


def add(root: Path, role: str, name: str, *options: str, action: str = "add") -> int:
    return fedgate(["-d", str(root), role, action, name, "--public-key", str(public_key_file(root)),
                    *options])


def principals(root: Path) -> list[tuple[str, str, str, str]]:
    node = Node(root)
    with node.session() as s:
        rows = [(p.name, p.role, p.group, p.status)
                for p in s.exec(select(Principal).order_by(Principal.created_at)).all()]
    node.engine.dispose()
    return rows


def can_read_the_audit_log(root: Path, name: str) -> bool:
    node = Node(root)
    decision = node.policy().decide(subject=name, domain="clinic", dataset="audit",
                                    action="read-audit")
    node.engine.dispose()
    return decision.allowed


def test_a_researcher_named_officers_does_not_get_the_officer_role(root: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert add(root, "researcher", "officers") == 2
    assert "'officers' is reserved" in capsys.readouterr().err
    assert [p[0] for p in principals(root)] == ["alice"]
    assert not can_read_the_audit_log(root, "alice")


def test_a_second_person_registered_as_alice_does_not_inherit_her_grants(root: Path,
                                                                        capsys) -> None:  # type: ignore[no-untyped-def]
    assert add(root, "researcher", "alice") == 2
    assert "researcher 'alice' is already registered" in capsys.readouterr().err
    assert add(root, "officer", "alice") == 2  # nor under another role
    assert add(root, "researcher", "Alice") == 2  # nor in other letter case
    assert principals(root) == [("alice", "researcher", "researchers", "active")]


def test_a_second_key_of_the_same_researcher_is_added_explicitly(root: Path) -> None:
    assert add(root, "researcher", "alice", action="add-key") == 0
    assert principals(root) == [("alice", "researcher", "researchers", "active")] * 2
    assert add(root, "researcher", "bob", action="add-key") == 2  # add-key never creates one


def test_a_revoked_name_is_not_handed_to_a_new_person(root: Path) -> None:
    assert fedgate(["-d", str(root), "researcher", "revoke", "alice"]) == 0
    assert add(root, "researcher", "alice") == 2


def test_a_group_named_after_a_researcher_does_not_give_its_members_her_grants(root: Path) -> None:
    assert add(root, "researcher", "mallory", "--group", "alice") == 2
    assert [p[0] for p in principals(root)] == ["alice"]


def test_a_researcher_named_after_a_policy_group_is_refused(root: Path) -> None:
    policy = root / "policies" / "policy.csv"
    policy.write_text(policy.read_text() + "p, auditors, clinic, audit, read-audit, allow\n"
                                           "g, olivia, auditors, clinic\n")
    assert add(root, "researcher", "auditors") == 2
    assert add(root, "researcher", "grads", "--group", "alice-lab") == 0
    assert add(root, "researcher", "alice-lab") == 2  # a registry group is a group too


def test_a_researcher_cannot_join_the_officers_group(root: Path) -> None:
    assert add(root, "researcher", "mallory", "--group", "officers") == 2
    assert add(root, "officer", "olivia") == 0
    assert can_read_the_audit_log(root, "olivia")


@pytest.mark.parametrize("name", ["../olivia", "a,b", "team*", "bob\n", "a b", ".hidden",
                                  "a..b", "x" * 65, ""])
def test_a_principal_name_outside_the_grammar_is_refused(root: Path, name: str) -> None:
    assert add(root, "researcher", name) == 2
    assert add(root, "researcher", "bob", "--group", name) == 2
    assert [p[0] for p in principals(root)] == ["alice"]


def test_a_rule_already_naming_a_new_principal_is_pointed_out(root: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    policy = root / "policies" / "policy.csv"
    policy.write_text(policy.read_text() + "p, bob, clinic, *, admin, allow\n")
    capsys.readouterr()
    assert add(root, "researcher", "bob") == 0
    lines = len(policy.read_text().splitlines())
    assert f"policy.csv already names bob in the rules on line(s) {lines}" in capsys.readouterr().err
