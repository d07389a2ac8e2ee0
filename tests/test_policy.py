"""The policy engine as a specification: validation refuses anything but data, deny
overrides allow, groups inherit, domains never mix, every constraint type compares typed
values, and decisions agree with casbin.Enforcer on the same model."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import casbin
import pytest
import simpleeval
from casbin.core_enforcer import EnforceContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.policy.constraints import CONSTRAINTS
from gateway.policy.decisions import MAX_GROUP_NESTING, PolicyEngine
from gateway.policy.request import RequestContext
from gateway.policy.rows import PolicyInvalid, parse_policy

MODEL_PATH = Path(__file__).resolve().parent.parent / "policies" / "model.conf"
MODEL = MODEL_PATH.read_text()
MONDAY_9_UTC = dt.datetime(2025, 6, 2, 9, 0, tzinfo=dt.UTC)


def engine(policy: str, memberships: list[tuple[str, str, str]] | None = None) -> PolicyEngine:
    return PolicyEngine(MODEL, policy, memberships or [])


def decide(e: PolicyEngine, subject: str, dataset: str, action: str = "train", *,
           domain: str = "clinic", now: dt.datetime = MONDAY_9_UTC, **facts):  # type: ignore[no-untyped-def]
    return e.decide(subject=subject, domain=domain, dataset=dataset, action=action,
                    context=RequestContext(now=now, **facts))


# ---------------------------------------------------------------------------------------------
# Validation: rows are data


@pytest.mark.parametrize("row", [
    "p, alice, ds, train, False) or (True",
    "p, alice, clinic, ds, train, allow) or (True",
    "p, alice, clinic, ds, train, False) or (True",
    'p, alice", clinic, ds, train, allow',
    "p, alice, clinic, ds') || ('x, train, allow",
    "p, alice, clinic, eval(p.sub), train, allow",
    "p, alice || true, clinic, ds, train, allow",
    "p, __import__('os'), clinic, ds, train, allow",
    "p, alice, clinic, d*s, train, allow",
    "p, *, clinic, ds, train, allow",
    "g, bob, researchers) or (True, clinic",
    "p2, alice, clinic, ds, train, max_rounds, 1) or (True",
    "p2, alice, clinic, ds, train, max_rounds, 1 or True",
    "p2, alice, clinic, ds, train, max_rounds, __import__('os').system('id')",
    "p2, alice, clinic, ds, train, min_noise_multiplier, 1.0 if True else 0",
    "p2, alice, clinic, ds, train, eval, 1",
    "m, alice, clinic, ds, train, allow",
])
def test_rows_that_are_not_plain_data_are_rejected(row: str) -> None:
    with pytest.raises(PolicyInvalid, match=r"policy\.csv:1"):
        parse_policy(row)


def test_decisions_never_reach_an_expression_evaluator(monkeypatch: pytest.MonkeyPatch) -> None:
    e = engine("p, researchers, clinic, *, train, allow\n"
               "p, interns, clinic, notes, train, deny\n"
               "p2, researchers, clinic, *, *, min_noise_multiplier, 1.0\n",
               [("bob", "researchers", "clinic"), ("ian", "interns", "clinic")])

    def forbidden(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("an expression evaluator ran")

    monkeypatch.setattr(simpleeval.SimpleEval, "eval", forbidden)
    assert decide(e, "bob", "notes", noise_multiplier=1.0).allowed
    assert not decide(e, "bob", "notes", noise_multiplier=0.5).allowed
    assert not decide(e, "ian", "notes").allowed


@pytest.mark.parametrize(("row", "message"), [
    ("p, alice, clinic, ds, fly, allow", "unknown action 'fly'"),
    ("p, alice, clinic, ds, train, maybe", "effect must be allow or deny"),
    ("p, alice, clinic, ds, train", "'p' rows have 5 fields"),
    ("g, bob, researchers", "'g' rows have 3 fields"),
    ("p2, alice, clinic, ds, train, max_speed, 5", "unknown constraint 'max_speed'"),
    ("p2, alice, clinic, ds, train, max_epsilon, nan", "not a finite non-negative number"),
    ("p2, alice, clinic, ds, train, max_epsilon, inf", "not a finite non-negative number"),
    ("p2, alice, clinic, ds, train, max_epsilon, 1e999", "not a finite non-negative number"),
    ("p2, alice, clinic, ds, train, max_epsilon, -1", "not a finite non-negative number"),
    ("p2, alice, clinic, ds, train, max_epsilon, 0", "must be greater than 0"),
    ("p2, alice, clinic, ds, train, min_noise_multiplier, 1.0.0", "not a finite"),
    ("p2, alice, clinic, ds, train, max_rounds, 10.5", "not a whole number"),
    ("p2, alice, clinic, ds, train, max_rounds, 0", "not a whole number"),
    ("p2, alice, clinic, ds, train, max_model_bytes, 50", "not a size with a unit"),
    ("p2, alice, clinic, ds, train, max_model_bytes, 50 parsecs", "not a size with a unit"),
    ("p2, alice, clinic, ds, train, max_model_parameters, 1.5k2", "not a count"),
    ("p2, alice, clinic, ds, train, max_model_parameters, 0.5", "whole count"),
    ("p2, alice, clinic, ds, train, allowed_model_families, pytorch", "unknown model family"),
    ("p2, alice, clinic, ds, train, max_epsilon_per_researcher, 2", "LIMIT per DURATION"),
    ("p2, alice, clinic, ds, train, max_epsilon_per_researcher, 2 per month", "LIMIT per DURATION"),
    ("p2, alice, clinic, ds, train, valid_until, 2025-02-30", "not a calendar date"),
    ("p2, alice, clinic, ds, train, valid_until, 2025-12-31T17:00", "ISO time with an offset"),
    ("p2, alice, clinic, ds, train, allowed_times, mon-fry 08:00-18:00 UTC", "days are"),
    ("p2, alice, clinic, ds, train, allowed_times, mon-fri 18:00-08:00 UTC", "end after it starts"),
    ("p2, alice, clinic, ds, train, allowed_times, mon-fri 08:00-25:00 UTC", "not a time of day"),
    ("p2, alice, clinic, ds, train, allowed_times, mon-fri 08:00-18:00 Mars/Olympus", "unknown time zone"),
    ("p2, alice, clinic, ds, train, allowed_times, mon-fri 8-18", "not a time window"),
])
def test_invalid_rows_and_values_are_rejected_with_a_reason(row: str, message: str) -> None:
    with pytest.raises(PolicyInvalid, match=message):
        parse_policy(row)


def test_every_invalid_row_is_reported_with_its_line() -> None:
    text = ("# comment\n"
            "p, researchers, clinic, *, train, allow\n"
            "p, alice, clinic, ds, fly, allow\n"
            "\n"
            "p2, alice, clinic, ds, train, max_rounds, lots\n")
    with pytest.raises(PolicyInvalid) as raised:
        parse_policy(text)
    assert [p.split(":")[1] for p in raised.value.problems] == ["3", "5"]


def test_a_model_with_another_matcher_or_eval_is_refused() -> None:
    widened = MODEL.replace("&& r.act == p.act\n", "\n")
    with pytest.raises(PolicyInvalid, match="differs from the fedgate model in m"):
        PolicyEngine(widened, "")
    evaluating = MODEL.replace("&& r.act == p.act\n", "&& eval(p.act)\n")
    with pytest.raises(PolicyInvalid, match=r"must not use eval\(\)"):
        PolicyEngine(evaluating, "")


def test_an_invalid_membership_from_the_key_registry_is_refused() -> None:
    with pytest.raises(PolicyInvalid, match="key registry"):
        engine("", [("bob", "grad students", "clinic")])


# ---------------------------------------------------------------------------------------------
# Grants, denials, groups, domains


def test_no_rule_means_deny_and_the_explanation_says_no_rule_granted() -> None:
    decision = decide(engine("p, researchers, clinic, notes, estimate, allow"), "bob", "notes",
                      "train")
    assert not decision.allowed and decision.rule is None
    assert "no rule grants train on notes to bob" in decision.explanation
    assert "p, bob, clinic, notes, train, allow" in decision.explanation


def test_deny_overrides_allow_even_a_personal_allow() -> None:
    e = engine("p, ian, clinic, notes, train, allow\n"
               "p, researchers, clinic, *, train, allow\n"
               "p, interns, clinic, notes, train, deny\n",
               [("ian", "interns", "clinic"), ("ian", "researchers", "clinic")])
    decision = decide(e, "ian", "notes")
    assert not decision.allowed
    assert decision.rule == ("p", "interns", "clinic", "notes", "train", "deny")
    assert "policy.csv:3" in decision.explanation and "ian is in group interns" in decision.explanation
    assert decide(e, "ian", "vitals").allowed


def test_groups_inherit_transitively_and_the_explanation_names_the_group() -> None:
    e = engine("p, staff, clinic, *, estimate, allow\n"
               "g, grads, researchers, clinic\n"
               "g, researchers, staff, clinic\n",
               [("alice", "grads", "clinic")])
    decision = decide(e, "alice", "notes", "estimate")
    assert decision.allowed
    assert "alice is in group staff" in decision.explanation
    assert e.subjects("alice", "clinic") == ("alice", "grads", "researchers", "staff")


def test_owner_a_policy_never_grants_on_owner_b() -> None:
    e = engine("p, researchers, clinicA, *, train, allow\n"
               "p, bob, clinicA, notes, train, allow\n"
               "g, bob, researchers, clinicA\n"
               "p, researchers, clinicB, vitals, train, allow\n")
    assert decide(e, "bob", "notes", domain="clinicA").allowed
    assert not decide(e, "bob", "notes", domain="clinicB").allowed
    assert not decide(e, "bob", "vitals", domain="clinicB").allowed  # membership is per domain


def test_dataset_globs_are_prefixes() -> None:
    e = engine("p, partners, clinic, cohort-*, train, allow", [("pat", "partners", "clinic")])
    assert decide(e, "pat", "cohort-2024").allowed
    assert decide(e, "pat", "cohort-").allowed
    assert not decide(e, "pat", "cohort").allowed
    assert not decide(e, "pat", "notes").allowed


def test_group_cycles_and_too_deep_nesting_are_refused() -> None:
    with pytest.raises(PolicyInvalid, match="group cycle"):
        engine("g, a, b, clinic\ng, b, a, clinic\n")
    chain = "".join(f"g, l{i}, l{i + 1}, clinic\n" for i in range(MAX_GROUP_NESTING + 1))
    with pytest.raises(PolicyInvalid, match="nest 10 levels"):
        engine(chain)
    engine("".join(f"g, l{i}, l{i + 1}, clinic\n" for i in range(MAX_GROUP_NESTING)))


def test_the_version_hashes_model_policy_and_memberships() -> None:
    policy = "p, researchers, clinic, *, train, allow\n"
    base = engine(policy, [("bob", "researchers", "clinic")]).version
    assert base == engine(policy, [("bob", "researchers", "clinic")]).version
    assert base != engine(policy, [("eve", "researchers", "clinic")]).version
    assert base != engine(policy + "# a comment\n", [("bob", "researchers", "clinic")]).version
    assert base.startswith("sha256:")


# ---------------------------------------------------------------------------------------------
# Constraints

GRANT = "p, researchers, clinic, *, train, allow\np, researchers, clinic, *, estimate, allow\n"
MEMBERS = [("bob", "researchers", "clinic")]


def constrained(row: str) -> PolicyEngine:
    return engine(GRANT + row, MEMBERS)


def spent(amount: float):  # type: ignore[no-untyped-def]
    return lambda window: amount


# (constraint row value, facts that satisfy it, facts that violate it, text of the fix)
CASES = {
    "max_epsilon": ("1.5", {"epsilon": 1.5}, {"epsilon": 1.51},
                    "requires epsilon ≤ 1.5; you asked 1.51 — raise noise_multiplier or lower rounds"),
    "max_epsilon_per_researcher": (
        "2 per 30d", {"epsilon": 0.5, "researcher_epsilon_spent": spent(1.5)},
        {"epsilon": 0.8, "researcher_epsilon_spent": spent(1.5)},
        "you have 1.5 reserved or spent in that window and this job needs 0.8 — a job with "
        "ε ≤ 0.5 fits now"),
    "min_noise_multiplier": ("1.0", {"noise_multiplier": 1.0}, {"noise_multiplier": 0.8},
                             "requires noise_multiplier ≥ 1; you asked 0.8 — raise "
                             "noise_multiplier to ≥ 1"),
    "max_rounds": ("500", {"rounds": 500}, {"rounds": 501},
                   "requires rounds ≤ 500; you asked 501 — lower rounds to ≤ 500"),
    "min_clients_per_round": ("100", {"clients_per_round": 100.0}, {"clients_per_round": 99.5},
                              "raise clients_per_round to ≥ 100"),
    "max_model_bytes": ("50 MB", {"model_bytes": 50_000_000}, {"model_bytes": 50_000_001},
                        "requires model_bytes ≤ 50,000,000 bytes; you asked 50,000,001 bytes"),
    "max_model_parameters": ("1.5M", {"model_parameters": 1_500_000},
                             {"model_parameters": 1_500_001},
                             "requires model_parameters ≤ 1,500,000; you asked 1,500,001"),
    "allowed_model_families": ("keras-sequential", {"model_family": "keras-sequential"},
                               {"model_family": "keras-functional"},
                               "allows only keras-sequential models; yours is keras-functional"),
    "allowed_times": ("mon-fri 08:00-18:00 UTC", {"now": MONDAY_9_UTC},
                      {"now": MONDAY_9_UTC.replace(hour=18)},
                      "allows requests only mon-fri 08:00-18:00 UTC; it is mon 18:00 UTC"),
    "valid_until": ("2025-06-02", {"now": MONDAY_9_UTC.replace(hour=23, minute=59)},
                    {"now": MONDAY_9_UTC + dt.timedelta(days=1)},
                    "is valid until 2025-06-02 and expired at 2025-06-03 00:00 UTC"),
}


def test_every_registered_constraint_has_a_case() -> None:
    assert set(CASES) == set(CONSTRAINTS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_constraint_allows_at_its_limit_and_denies_past_it_naming_the_fix(name: str) -> None:
    value, satisfying, violating, fix = CASES[name]
    row = f"p2, researchers, clinic, notes, train, {name}, {value}"
    e = constrained(row)
    allowed = decide(e, "bob", "notes", **satisfying)
    assert allowed.allowed, allowed.explanation
    denied = decide(e, "bob", "notes", **violating)
    assert not denied.allowed
    assert denied.rule == tuple(cell.strip() for cell in row.split(","))
    assert f"rule '{row}' (policy.csv:3)" in denied.explanation
    assert fix in denied.explanation


def test_explanation_of_a_denial_names_every_violated_rule_and_the_fix() -> None:
    e = engine("p, interns, clinic, notes, train, allow\n"
               "p2, interns, clinic, notes, *, min_noise_multiplier, 1.0\n"
               "p2, interns, clinic, notes, train, max_rounds, 500\n",
               [("ian", "interns", "clinic")])
    decision = decide(e, "ian", "notes", rounds=1000, noise_multiplier=0.8)
    assert decision.explanation == (
        "ian may not train on notes: rule 'p2, interns, clinic, notes, *, min_noise_multiplier, "
        "1.0' (policy.csv:2) requires noise_multiplier ≥ 1; you asked 0.8 — raise "
        "noise_multiplier to ≥ 1; and rule 'p2, interns, clinic, notes, train, max_rounds, 500' "
        "(policy.csv:3) requires rounds ≤ 500; you asked 1000 — lower rounds to ≤ 500")


def test_constraints_restrict_but_never_grant() -> None:
    e = engine("p2, bob, clinic, notes, train, max_rounds, 500")
    decision = decide(e, "bob", "notes", rounds=10)
    assert not decision.allowed and "no rule grants" in decision.explanation


def test_all_matching_constraints_apply_so_the_stricter_wins() -> None:
    e = engine(GRANT + "p2, researchers, clinic, *, train, max_rounds, 500\n"
                       "p2, grads, clinic, *, train, max_rounds, 100\n",
               [("bob", "grads", "clinic"), ("grads", "researchers", "clinic")])
    assert decide(e, "bob", "notes", rounds=100).allowed
    assert "rounds ≤ 100" in decide(e, "bob", "notes", rounds=101).explanation


def test_a_constraint_applies_only_to_its_action_unless_it_says_any() -> None:
    e = constrained("p2, researchers, clinic, *, train, max_rounds, 500\n"
                    "p2, researchers, clinic, *, *, min_noise_multiplier, 1.0\n")
    assert decide(e, "bob", "notes", "estimate", rounds=5000, noise_multiplier=1.0).allowed
    assert not decide(e, "bob", "notes", "estimate", rounds=5000, noise_multiplier=0.5).allowed


def test_unstated_facts_deny_train_but_not_other_actions() -> None:
    e = constrained("p2, researchers, clinic, *, *, allowed_model_families, keras-sequential\n")
    train = decide(e, "bob", "notes", "train")
    assert not train.allowed
    assert "needs model_family, which the request does not state" in train.explanation
    assert decide(e, "bob", "notes", "estimate").allowed  # an estimate names no model


def test_the_epsilon_allowance_asks_for_the_sum_over_its_window() -> None:
    windows: list[dt.timedelta] = []

    def ledger(window: dt.timedelta) -> float:
        windows.append(window)
        return 1.9

    e = constrained("p2, researchers, clinic, notes, *, max_epsilon_per_researcher, 2 per 4w")
    decision = decide(e, "bob", "notes", epsilon=0.2, researcher_epsilon_spent=ledger)
    assert windows == [dt.timedelta(weeks=4)]
    assert "per 28 days" in decision.explanation and "ε ≤ 0.1 fits now" in decision.explanation
    exhausted = decide(e, "bob", "notes", epsilon=0.2, researcher_epsilon_spent=spent(2.0))
    assert "nothing fits until earlier jobs leave the window" in exhausted.explanation


@pytest.mark.parametrize(("window", "when", "inside"), [
    ("mon-fri 08:00-18:00 UTC", "2025-06-02T08:00Z", True),  # start is inclusive
    ("mon-fri 08:00-18:00 UTC", "2025-06-02T07:59Z", False),
    ("mon-fri 08:00-18:00 UTC", "2025-06-06T17:59Z", True),  # friday
    ("mon-fri 08:00-18:00 UTC", "2025-06-07T12:00Z", False),  # saturday
    ("fri-mon 00:00-24:00 UTC", "2025-06-08T23:59Z", True),  # sunday, in a wrapping range
    ("fri-mon 00:00-24:00 UTC", "2025-06-04T12:00Z", False),  # wednesday
    ("daily 09:00-17:00 Europe/Berlin", "2025-06-02T07:00Z", True),  # 09:00 CEST
    ("daily 09:00-17:00 Europe/Berlin", "2025-01-06T07:00Z", False),  # 08:00 CET
    ("mon-fri 08:00-12:00 UTC | sat 10:00-11:00 UTC", "2025-06-07T10:30Z", True),
])
def test_time_windows_use_their_zone_and_half_open_hours(window: str, when: str, inside: bool) -> None:
    e = constrained(f"p2, researchers, clinic, *, *, allowed_times, {window}")
    now = dt.datetime.fromisoformat(when)
    assert decide(e, "bob", "notes", now=now).allowed is inside


def test_facts_read_lists_only_what_matching_constraints_compare() -> None:
    e = constrained("p2, researchers, clinic, notes, train, max_epsilon_per_researcher, 2 per 30d\n"
                    "p2, researchers, clinic, *, *, max_model_bytes, 5 MB\n"
                    "p2, others, clinic, *, *, max_rounds, 5\n")
    assert e.facts_read(subject="bob", domain="clinic", dataset="notes", action="train") == {
        "epsilon", "researcher_epsilon_spent", "model_bytes"}
    assert e.facts_read(subject="bob", domain="clinic", dataset="vitals", action="train") == {
        "model_bytes"}


# ---------------------------------------------------------------------------------------------
# The index agrees with Casbin on the same model

NAMES = st.sampled_from(["alice", "bob", "grads", "staff", "interns"])
DATASETS = st.sampled_from(["notes", "notes-2", "vitals"])
PATTERNS = st.sampled_from(["notes", "notes-2", "vitals", "notes*", "*", "v*"])
DOMAINS = st.sampled_from(["clinicA", "clinicB"])
SMALL_ACTIONS = st.sampled_from(["train", "estimate"])
P_ROWS = st.tuples(NAMES, DOMAINS, PATTERNS, SMALL_ACTIONS, st.sampled_from(["allow", "deny"]))
P2_ROWS = st.tuples(NAMES, DOMAINS, PATTERNS, st.sampled_from(["train", "estimate", "*"]))
G_ROWS = st.tuples(NAMES, NAMES, DOMAINS).filter(lambda g: g[0] != g[1])
REQUESTS = st.tuples(NAMES, DOMAINS, DATASETS, SMALL_ACTIONS)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p_rows=st.lists(P_ROWS, max_size=8), p2_rows=st.lists(P2_ROWS, max_size=4),
       g_rows=st.lists(G_ROWS, max_size=5), requests=st.lists(REQUESTS, min_size=1, max_size=6))
def test_decisions_agree_with_casbin_enforcer(p_rows, p2_rows, g_rows, requests) -> None:  # type: ignore[no-untyped-def]
    text = "".join(f"p, {', '.join(r)}\n" for r in p_rows)
    text += "".join(f"p2, {', '.join(r)}, max_rounds, 10\n" for r in p2_rows)
    text += "".join(f"g, {', '.join(r)}\n" for r in g_rows)
    try:
        ours = engine(text)
    except PolicyInvalid as exc:
        assert any("group cycle" in p for p in exc.problems)
        return
    logging.getLogger("casbin").disabled = True
    reference = casbin.Enforcer(str(MODEL_PATH))
    for kind, rows in (("p", p_rows), ("p2", [(*r, "max_rounds", "10") for r in p2_rows]),
                       ("g", g_rows)):
        for row in rows:
            if kind == "g":
                reference.add_named_grouping_policy("g", list(row))
            else:
                reference.add_named_policy(kind, list(row))
    constraints = EnforceContext("r", "p2", "e2", "m2")
    for subject, domain, dataset, action in requests:
        decision = ours.decide(subject=subject, domain=domain, dataset=dataset, action=action,
                               context=RequestContext(now=MONDAY_9_UTC, rounds=1))
        assert decision.allowed == reference.enforce(subject, domain, dataset, action)
        applicable = bool(ours.matching_constraints(subject, domain, dataset, action))
        assert applicable == reference.enforce(constraints, subject, domain, dataset, action)


def test_remembered_matching_rows_are_a_fresh_engines_and_their_memory_is_bounded() -> None:
    """An engine remembers which rows match a (subject, domain, dataset, action); the same
    request decided again, or by a new engine of the same rows, gets the same decision, and
    the memory never exceeds ``MATCHING_CACHE`` requests."""
    from gateway.policy import decisions

    policy = ("p, researchers, clinic, ds*, train, allow\n"
              "p2, researchers, clinic, ds1, train, max_rounds, 5\n"
              "p, mallory, clinic, ds1, train, deny\n")
    members = [(name, "researchers", "clinic") for name in ("alice", "mallory")]
    e = engine(policy, members)
    for subject, dataset, rounds, allowed in [("alice", "ds1", 3, True), ("alice", "ds1", 9, False),
                                              ("mallory", "ds1", 3, False),
                                              ("alice", "ds2", 9, True)]:
        first = decide(e, subject, dataset, rounds=rounds)
        again = decide(e, subject, dataset, rounds=rounds)
        fresh = decide(engine(policy, members), subject, dataset, rounds=rounds)
        assert first.allowed == again.allowed == fresh.allowed == allowed
        assert first.explanation == again.explanation == fresh.explanation
    for i in range(decisions.MATCHING_CACHE + 10):
        e.matching_grants(f"user{i}", "clinic", "ds1", "train")
    assert len(e._matched) <= decisions.MATCHING_CACHE
