"""Policy decision latency versus policy size (target: flat, well under 1 ms).

The engine indexes rows by (domain, subject, action) and dataset, so a decision looks at
the requester's groups and the rows that name them, whatever the size of the rest of the
policy. Measured: ``PolicyEngine.decide`` with 1,000 principals in 100 groups (three
levels of nesting; the top group is granted everything under two constraints), on policies
of 10, 1,000 and 10,000 rows (10% denials, 10% constraint rows), for a mix of allowed and
refused requests with full job parameters; and the build (validate and index) that a
reload costs. For scale: ``casbin.Enforcer.enforce`` on the same model,
which scans every row per request. The baseline is the 10-row policy, in the same run.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import statistics
import time

import casbin

from gateway.policy.decisions import PolicyEngine
from gateway.policy.request import RequestContext
from gateway.policy.rows import POLICY_TEMPLATES

MODEL = (POLICY_TEMPLATES / "model.conf").read_text()
PRINCIPALS = 1_000
GROUPS = 100
DATASETS = 500
DECISIONS = 5_000
NOW = dt.datetime(2025, 6, 2, 9, 0, tzinfo=dt.UTC)
CONSTRAINTS = ("min_noise_multiplier, 1.0", "max_rounds, 500", "max_epsilon, 2",
               "allowed_times, mon-fri 08:00-18:00 UTC", "max_epsilon_per_researcher, 4 per 30d")


def memberships() -> list[tuple[str, str, str]]:
    rows = [(f"user{i}", f"group{i % GROUPS}", "clinic") for i in range(PRINCIPALS)]
    rows += [(f"group{g}", f"division{g % 10}", "clinic") for g in range(GROUPS)]
    rows += [(f"division{d}", "staff", "clinic") for d in range(10)]
    return rows


def policy_text(rows: int, rng: random.Random) -> str:
    lines = ["p, staff, clinic, *, estimate, allow", "p, staff, clinic, *, train, allow",
             "p2, staff, clinic, *, train, min_noise_multiplier, 1.0",
             "p2, staff, clinic, *, *, allowed_times, mon-fri 08:00-18:00 UTC"]
    for i in range(len(lines), rows):
        subject = f"user{rng.randrange(PRINCIPALS)}" if i % 10 == 0 else f"group{i % GROUPS}"
        dataset = f"ds{rng.randrange(DATASETS)}" if i % 20 else f"ds{rng.randrange(10)}*"
        action = rng.choice(("estimate", "train"))
        if i % 10 == 9:
            lines.append(f"p2, {subject}, clinic, {dataset}, {action}, {rng.choice(CONSTRAINTS)}")
        else:
            effect = "deny" if i % 10 == 8 else "allow"
            lines.append(f"p, {subject}, clinic, {dataset}, {action}, {effect}")
    return "\n".join(lines) + "\n"


def requests(rng: random.Random) -> list[tuple[str, str, str, RequestContext]]:
    return [(f"user{rng.randrange(PRINCIPALS)}", f"ds{rng.randrange(DATASETS)}",
             rng.choice(("estimate", "train")),
             RequestContext(now=NOW, rounds=rng.choice((100, 1000)),
                            noise_multiplier=rng.choice((0.8, 1.2)), clients_per_round=100.0,
                            epsilon=1.0, researcher_epsilon_spent=lambda window: 2.5))
            for _ in range(DECISIONS)]


def measure(rows: int) -> dict[str, float]:
    rng = random.Random(rows)
    text = policy_text(rows, rng)
    start = time.perf_counter()
    engine = PolicyEngine(MODEL, text, memberships())
    build = time.perf_counter() - start
    times, allowed = [], 0
    for subject, dataset, action, context in requests(rng):
        start = time.perf_counter_ns()
        decision = engine.decide(subject=subject, domain="clinic", dataset=dataset, action=action,
                                 context=context)
        times.append(time.perf_counter_ns() - start)
        allowed += decision.allowed
    times.sort()
    return {"rows": rows, "median_us": statistics.median(times) / 1e3,
            "p99_us": times[int(len(times) * 0.99)] / 1e3, "build_ms": build * 1e3,
            "allowed": allowed / len(times)}


def measure_casbin(rows: int, repeats: int = 20) -> float:
    """Median ``casbin.Enforcer.enforce`` time (µs) on the grant rows alone."""
    logging.getLogger("casbin").disabled = True
    rng = random.Random(rows)
    enforcer = casbin.Enforcer(str(POLICY_TEMPLATES / "model.conf"))
    for line in policy_text(rows, rng).splitlines():
        cells = [c.strip() for c in line.split(",")]
        if cells[0] == "p":
            enforcer.add_named_policy("p", cells[1:])
    for member in memberships():
        enforcer.add_named_grouping_policy("g", list(member))
    enforcer.enforce("user0", "clinic", "ds0", "train")  # builds the role links once
    times = []
    for subject, dataset, action, _ in requests(rng)[:repeats]:
        start = time.perf_counter_ns()
        enforcer.enforce(subject, "clinic", dataset, action)
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def run() -> str:
    rows = [measure(n) for n in (10, 1_000, 10_000)]
    base = rows[0]
    casbin_small, casbin_large = measure_casbin(10), measure_casbin(10_000)
    lines = [
        "## Policy decisions versus policy size",
        "",
        f"`python -m bench.run policy` — `PolicyEngine.decide` over {DECISIONS:,} mixed "
        f"requests with job parameters, {PRINCIPALS:,} principals in {GROUPS} groups (nested "
        "three levels; the top group is granted everything under two constraints), 10% deny "
        "and 10% constraint rows; ratio to the 10-row baseline. Build = "
        "validate and index, the cost of a reload.",
        "",
        "| policy rows | decision median (µs) | p99 (µs) | ratio | build (ms) | allowed |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['rows']:,} | {row['median_us']:.1f} | {row['p99_us']:.1f} | "
            f"{row['median_us'] / base['median_us']:.2f}× | {row['build_ms']:.1f} | "
            f"{row['allowed']:.0%} |"
        )
    lines += [
        "",
        f"For scale, `casbin.Enforcer.enforce` on the same model and grant rows (no "
        f"constraints): {casbin_small:,.0f} µs with 10 rows, {casbin_large:,.0f} µs with "
        "10,000 rows (it evaluates the matcher on every row).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run())
