"""Every recipe of docs/policies.md, run exactly as printed: the recipe's policy block is
loaded and its expectation table must pass, so the cookbook and the engine cannot drift."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from gateway.policy.decisions import PolicyEngine
from gateway.policy.expectations import outcome, parse_expectations, run_expectations
from gateway.policy.lint import lint_policy

ROOT = Path(__file__).resolve().parent.parent
MODEL = (ROOT / "policies" / "model.conf").read_text()
DOC = (ROOT / "docs" / "policies.md").read_text()
NOW = dt.datetime(2025, 6, 2, 9, 0, tzinfo=dt.UTC)  # a Monday morning


def recipes() -> dict[str, tuple[str, str]]:
    """Title -> (policy block, expectation block) of each ``###`` recipe in the Cookbook."""
    cookbook = DOC.split("\n## Cookbook\n", 1)[1]
    found = {}
    for section in re.split(r"\n### ", cookbook)[1:]:
        title = section.splitlines()[0]
        blocks = re.findall(r"```csv\n(.*?)```", section, flags=re.DOTALL)
        assert len(blocks) == 2, f"recipe {title!r} needs a policy and an expectation block"
        found[title] = (blocks[0], blocks[1])
    return found


RECIPES = recipes()


def test_the_cookbook_has_at_least_eight_recipes() -> None:
    assert len(RECIPES) >= 8


@pytest.mark.parametrize("title", sorted(RECIPES))
def test_recipe_decides_as_its_expectation_table_says(title: str) -> None:
    policy, table = RECIPES[title]
    engine = PolicyEngine(MODEL, policy)
    expectations = parse_expectations(table, domain="clinic", now=NOW)
    assert {e.allowed for e in expectations} == {True, False}, "show an allow and a deny"
    for expectation, decision in run_expectations(engine, expectations):
        assert outcome(decision) == expectation.expected, (expectation.where, decision.explanation)


@pytest.mark.parametrize("title", sorted(RECIPES))
def test_recipe_lints_clean(title: str) -> None:
    policy, table = RECIPES[title]
    engine = PolicyEngine(MODEL, policy)
    datasets = {e.dataset: 1000 for e in parse_expectations(table, domain="clinic", now=NOW)}
    groups = {m.group for m in engine.memberships}
    principals = {m.member for m in engine.memberships} - groups  # a nested group is no principal
    findings = lint_policy(engine, owner="clinic", datasets=datasets, principals=principals, now=NOW)
    assert findings == []
