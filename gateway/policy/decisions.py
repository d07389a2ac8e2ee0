"""Policy decisions: ``PolicyEngine`` indexes validated rows and decides requests (the contract
of :mod:`gateway.policy`); ``PolicyDecision`` is what the audit log records."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, TypeVar

from gateway.policy.constraints import OutputPolicy, Quota
from gateway.policy.request import RequestContext
from gateway.policy.rows import (
    ACTIONS,
    Constraint,
    Grant,
    Membership,
    Obligation,
    PolicyInvalid,
    PolicyRows,
    Rule,
    check_model,
    parse_policy,
    validate_row,
)
from ledger.names import is_name

# Casbin's default role manager follows at most 9 membership hops; deeper chains are refused
# rather than silently cut, so the index and Casbin always agree.
MAX_GROUP_NESTING = 9
# For these actions the request states every fact; an unstated fact a constraint reads denies.
STATES_EVERY_FACT = frozenset({"train"})
# Obligations attach to the requests that create a job and its result.
OBLIGATION_ACTIONS = frozenset({"train"})

R = TypeVar("R", bound=Rule)


@dataclass
class _Bucket(Generic[R]):
    """Rules of one (domain, subject, action), indexed by dataset name or prefix."""

    exact: dict[str, list[R]] = field(default_factory=dict)
    prefixes: list[R] = field(default_factory=list)

    def add(self, rule: R) -> None:
        if rule.dataset.endswith("*"):
            self.prefixes.append(rule)
        else:
            self.exact.setdefault(rule.dataset, []).append(rule)

    def matching(self, dataset: str) -> list[R]:
        found = list(self.exact.get(dataset, ()))
        found.extend(rule for rule in self.prefixes if dataset.startswith(rule.dataset[:-1]))
        return found


def dataset_matches(pattern: str, dataset: str) -> bool:
    """Casbin's ``keyMatch`` for validated patterns: equality, or a prefix ending in ``*``."""
    return dataset.startswith(pattern[:-1]) if pattern.endswith("*") else dataset == pattern


@dataclass(frozen=True)
class PolicyDecision:
    """The outcome of one policy evaluation, as recorded in the audit log.

    ``rule`` is the deciding row's cells: the allow rule that granted, the deny rule or the
    first violated constraint that refused; ``None`` when no rule granted. ``review`` says
    why an allowed ``train`` request must wait for the owner's review (``None``: it need
    not); the explanation says so too.
    """

    allowed: bool
    rule: tuple[str, ...] | None
    explanation: str
    policy_version: str
    review: str | None = None


def _group_closure(memberships: Iterable[Membership]) -> tuple[dict[tuple[str, str], tuple[str, ...]],
                                                              list[str]]:
    """Every (domain, member)'s groups, nearest first; and the problems (cycles, depth)."""
    parents: dict[tuple[str, str], list[str]] = {}
    for m in memberships:
        groups = parents.setdefault((m.domain, m.member), [])
        if m.group not in groups:
            groups.append(m.group)
    closure: dict[tuple[str, str], tuple[str, ...]] = {}
    problems: list[str] = []
    for (domain, member) in parents:
        seen = {member: 0}
        order: list[str] = []
        queue = deque([member])
        while queue:
            name = queue.popleft()
            for group in parents.get((domain, name), ()):
                if group == member:
                    problems.append(f"group cycle in domain {domain}: {member} is a member of "
                                    f"itself through {name}")
                elif group not in seen:
                    seen[group] = seen[name] + 1
                    order.append(group)
                    queue.append(group)
        deepest = max(seen.values())
        if deepest > MAX_GROUP_NESTING:
            problems.append(f"groups of {member} in domain {domain} nest {deepest} levels deep "
                            f"(at most {MAX_GROUP_NESTING})")
        closure[(domain, member)] = (member, *order)
    return closure, sorted(set(problems))


MATCHING_CACHE = 4096
"""Requests (subject, domain, dataset, action) whose matching rows an engine remembers."""

_Matching = tuple[tuple["Grant", ...], tuple["Constraint", ...], tuple["Obligation", ...]]


def _row_order(rule: Grant | Constraint | Obligation) -> int:
    return rule.order


class PolicyEngine:
    """Validated rows, indexed for decisions; immutable once built.

    Build cost is linear in the rows; a decision costs O(groups of the requester × matching
    rows), independent of the number of other rows and principals.
    """

    def __init__(self, model_text: str, policy_text: str,
                 memberships: Iterable[tuple[str, str, str]] = (), *,
                 source: str = "policy.csv", model_source: str = "model.conf") -> None:
        check_model(model_text, model_source)
        problems: list[str] = []
        try:
            rows = parse_policy(policy_text, source)
        except PolicyInvalid as exc:
            problems.extend(exc.problems)
            rows = PolicyRows()
        member_rows = sorted(("g", *m) for m in memberships)
        registry: list[Membership] = []
        for cells in member_rows:
            problem = validate_row(cells)
            if problem:
                problems.append(f"key registry: membership {', '.join(cells[1:])}: {problem}")
            else:
                registry.append(Membership(cells, "key registry"))
        self.rows = rows
        self.memberships = (*rows.memberships, *registry)
        self._closure, cycle_problems = _group_closure(self.memberships)
        problems.extend(cycle_problems)
        if problems:
            raise PolicyInvalid(problems)
        digest = hashlib.sha256()
        for part in (model_text.encode(), policy_text.encode(), repr(member_rows).encode()):
            digest.update(hashlib.sha256(part).digest())
        self.version = "sha256:" + digest.hexdigest()
        self._grants: dict[tuple[str, str, str], _Bucket[Grant]] = {}
        for grant in rows.grants:
            self._grants.setdefault((grant.domain, grant.subject, grant.action), _Bucket()).add(grant)
        self._constraints: dict[tuple[str, str, str], _Bucket[Constraint]] = {}
        for rule in rows.constraints:
            key = (rule.domain, rule.subject, rule.action)
            self._constraints.setdefault(key, _Bucket()).add(rule)
        self._obligations: dict[tuple[str, str, str], _Bucket[Obligation]] = {}
        for duty in rows.obligations:
            key = (duty.domain, duty.subject, duty.action)
            self._obligations.setdefault(key, _Bucket()).add(duty)
        self._matched: dict[tuple[str, str, str, str], _Matching] = {}

    @classmethod
    def from_files(cls, model_path: Path, policy_path: Path,
                   memberships: Iterable[tuple[str, str, str]] = ()) -> PolicyEngine:
        return cls(model_path.read_text(encoding="utf-8"), policy_path.read_text(encoding="utf-8"),
                   memberships, source=policy_path.name, model_source=model_path.name)

    def subjects(self, subject: str, domain: str) -> tuple[str, ...]:
        """The requester and its groups in ``domain``, nearest first."""
        return self._closure.get((domain, subject), (subject,))

    def matching_grants(self, subject: str, domain: str, dataset: str, action: str) -> list[Grant]:
        return list(self._matching(subject, domain, dataset, action)[0])

    def matching_constraints(self, subject: str, domain: str, dataset: str,
                             action: str) -> list[Constraint]:
        return list(self._matching(subject, domain, dataset, action)[1])

    def matching_obligations(self, subject: str, domain: str, dataset: str,
                             action: str) -> list[Obligation]:
        return list(self._matching(subject, domain, dataset, action)[2])

    def _matching(self, subject: str, domain: str, dataset: str, action: str) -> _Matching:
        """The grants, constraints and obligations matching a request, each in row order:
        a pure function of the (immutable) engine and these four names, remembered for the
        most recent :data:`MATCHING_CACHE` requests."""
        key = (subject, domain, dataset, action)
        found = self._matched.get(key)
        if found is None:
            subjects = self.subjects(subject, domain)
            grants = [rule for s in subjects if (bucket := self._grants.get((domain, s, action)))
                      for rule in bucket.matching(dataset)]
            constraints = [rule for s in subjects for a in (action, "*")
                           if (bucket := self._constraints.get((domain, s, a)))
                           for rule in bucket.matching(dataset)]
            duties = [rule for s in subjects for a in (action, "*")
                      if (bucket := self._obligations.get((domain, s, a)))
                      for rule in bucket.matching(dataset)]
            found = (tuple(sorted(grants, key=_row_order)),
                     tuple(sorted(constraints, key=_row_order)),
                     tuple(sorted(duties, key=_row_order)))
            if len(self._matched) >= MATCHING_CACHE:
                self._matched.clear()
            self._matched[key] = found
        return found

    def facts_read(self, *, subject: str, domain: str, dataset: str, action: str) -> frozenset[str]:
        """The ``RequestContext`` facts the constraints and obligations matching this request
        compare, so a caller computes only those (projected ε, the model's size, the ε spent)."""
        constraints = self.matching_constraints(subject, domain, dataset, action)
        duties = (self.matching_obligations(subject, domain, dataset, action)
                  if action in OBLIGATION_ACTIONS else [])
        return frozenset({*(name for rule in constraints for name in rule.kind.reads),
                          *(name for duty in duties for name in duty.reads)})

    def decide(self, *, subject: str, domain: str, dataset: str, action: str,
               context: RequestContext | None = None) -> PolicyDecision:
        """Evaluate one request (the contract of :mod:`gateway.policy`); never raises, fails
        closed.

        ``context`` defaults to the current time with no job parameters stated.
        """
        if context is None:
            context = RequestContext(now=dt.datetime.now(dt.UTC))
        if action not in ACTIONS or not all(is_name(v) for v in (subject, domain, dataset)):
            return self._decision(False, None, "request names an invalid subject, dataset or action")
        asked = f"{subject} may not {action} on {dataset}"
        grants = self.matching_grants(subject, domain, dataset, action)
        deny = next((g for g in grants if g.effect == "deny"), None)
        if deny is not None:
            return self._decision(False, deny, f"{asked}: rule '{deny.text}' ({deny.where}) denies "
                                  f"it{self._via(subject, deny)}; a deny overrides every allow, "
                                  "so no parameter change helps — ask the data owner")
        if not grants:
            groups = self.subjects(subject, domain)[1:]
            member = f" or its groups ({', '.join(groups)})" if groups else ""
            return self._decision(False, None, f"{asked}: no rule grants {action} on {dataset} to "
                                  f"{subject}{member} in domain {domain} — ask the data owner for "
                                  f"a grant such as 'p, {subject}, {domain}, {dataset}, {action}, "
                                  "allow'")
        violations: list[tuple[Constraint, str]] = []
        for rule in self.matching_constraints(subject, domain, dataset, action):
            unstated = [name for name in rule.kind.reads if getattr(context, name) is None]
            if unstated:
                if action in STATES_EVERY_FACT:
                    violations.append((rule, f"needs {' and '.join(unstated)}, which the request "
                                             "does not state"))
                continue
            problem = rule.kind.check(rule.value, context)
            if problem is not None:
                violations.append((rule, problem))
        if violations:
            reasons = "; and ".join(f"rule '{rule.text}' ({rule.where}) {problem}"
                                    for rule, problem in violations)
            return self._decision(False, violations[0][0], f"{asked}: {reasons}")
        allow = grants[0]
        explanation = (f"{subject} may {action} on {dataset}: rule '{allow.text}' ({allow.where}) "
                       f"grants it{self._via(subject, allow)}, no deny rule matches and every "
                       "matching constraint holds")
        review = self._review(subject, domain, dataset, action, context)
        if review is not None:
            explanation += f"; the job waits for the data owner's review: {review}"
        return self._decision(True, allow, explanation, review=review)

    def _review(self, subject: str, domain: str, dataset: str, action: str,
                context: RequestContext) -> str | None:
        """Why an allowed request is held for review (every matching row whose condition
        holds, cited), or ``None``."""
        if action not in OBLIGATION_ACTIONS:
            return None
        reasons = []
        for duty in self.matching_obligations(subject, domain, dataset, action):
            if duty.kind.stage != "review":
                continue
            held = next((why for condition in duty.value
                         if (why := condition.holds(context, subject=subject, dataset=dataset))),
                        None)
            if held is not None:
                reasons.append(f"rule '{duty.text}' ({duty.where}) requires review: {held}")
        return "; and ".join(reasons) or None

    def output_policy(self, *, subject: str, domain: str, dataset: str) -> OutputPolicy:
        """The strictest output limits of the rows matching ``subject``'s ``train`` grant on
        ``dataset`` (the contract of :mod:`gateway.policy`); no matching row means no limit."""
        policy = OutputPolicy()
        for duty in self.matching_obligations(subject, domain, dataset, "train"):
            cited = f"'{duty.text}' ({duty.where})"
            if (duty.kind.name == "max_result_fetches"
                    and (policy.max_fetches is None or duty.value < policy.max_fetches)):
                policy = replace(policy, max_fetches=duty.value, max_fetches_rule=cited)
            if (duty.kind.name == "result_available_days"
                    and (policy.available_days is None or duty.value < policy.available_days)):
                policy = replace(policy, available_days=duty.value, available_days_rule=cited)
        return policy

    def quotas(self, *, subject: str, domain: str, dataset: str) -> tuple[Quota, ...]:
        """Every quota row matching ``subject``'s ``train`` request on ``dataset`` (each is
        checked on its own; no matching row means no quota)."""
        return tuple(
            Quota(duty.kind.name, duty.value, duty.subject, self.members(duty.subject, domain),
                  domain, duty.dataset, f"'{duty.text}' ({duty.where})")
            for duty in self.matching_obligations(subject, domain, dataset, "train")
            if duty.kind.stage == "quota")

    def members(self, subject: str, domain: str) -> tuple[str, ...]:
        """``subject`` and every principal that is, transitively, in group ``subject``."""
        return tuple(sorted({subject, *(member for (where, member), groups in self._closure.items()
                                        if where == domain and subject in groups)}))

    def _via(self, subject: str, rule: Rule) -> str:
        return "" if rule.subject == subject else f" ({subject} is in group {rule.subject})"

    def _decision(self, allowed: bool, rule: Rule | None, explanation: str, *,
                  review: str | None = None) -> PolicyDecision:
        return PolicyDecision(allowed, rule.cells if rule else None, explanation, self.version,
                              review)
