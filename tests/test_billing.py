"""Billing: the owner's price list, exact pricing, charges audited with the settlement,
statements that add up to the audit log to the last digit, and bills that reveal nothing of the
private data (a job that read user data is billed its reservation, not what it used)."""

from __future__ import annotations

import csv
import io
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from engine.launcher import JobOutcome
from engine.meter import ResourceUsage
from gateway.cli import main as fedgate
from gateway.node.deployment import Deployment, init_deployment
from gateway.node.jobs import JobRunner
from gateway.node.node import Node
from gateway.protocol.problems import Problem
from ledger.audit import read_entries
from ledger.metering import month_of
from ledger.models import BillingCharge, Job, JobMeter
from ledger.pricing import BilledQuantities, PriceList, PriceListInvalid, price_job
from tests.ledger_activity import researcher, submit
from tests.test_end_to_end import sqlite_node  # noqa: F401  (fixture)

PRICES = """
[billing]
currency = "EUR"
per_cpu_hour = 0.05
per_job = "0.1"
per_epsilon = 1.5
"""


def _with_prices(root: Path, text: str = PRICES) -> None:
    config = Deployment(root).config_path
    config.write_text(config.read_text() + text)


def test_the_price_list_is_read_from_the_billing_table_as_exact_decimals(tmp_path: Path) -> None:
    init_deployment(tmp_path / "node")
    assert Deployment(tmp_path / "node").load_config().billing is None  # metered, not charged
    _with_prices(tmp_path / "node")
    prices = Deployment(tmp_path / "node").load_config().billing
    assert prices == PriceList(currency="EUR", per_cpu_hour=Decimal("0.05"),
                               per_job=Decimal("0.1"), per_epsilon=Decimal("1.5"))


@pytest.mark.parametrize("table", [
    {"currency": "EUR", "per_cpu_hour": -1},
    {"currency": "EUR", "per_cpu_hour": "1e3"},
    {"currency": "EUR", "per_gpu_hour": 1},
    {"per_cpu_hour": 1},
    {"currency": "EUR", "per_job": True},
])
def test_a_malformed_price_list_is_refused(table: dict[str, Any]) -> None:
    with pytest.raises(PriceListInvalid):
        PriceList.from_table(table)


def test_a_memory_price_is_refused_because_memory_use_depends_on_the_private_data() -> None:
    with pytest.raises(PriceListInvalid, match=r"per_gb_hour is no longer supported.*private data"):
        PriceList.from_table({"currency": "EUR", "per_cpu_hour": 0.05, "per_gb_hour": 0.01})


def test_a_job_is_priced_exactly_item_by_item() -> None:
    prices = PriceList("EUR", Decimal("0.05"), Decimal("0.10"), Decimal("1.5"))
    charge = price_job(prices, BilledQuantities(cpu_seconds="7200.000000", epsilon="0.25"))
    assert charge.items == {"cpu": Decimal("0.100000"), "job": Decimal("0.100000"),
                            "epsilon": Decimal("0.375000")}
    assert charge.total == Decimal("0.575000")
    # 1 CPU second at 0.05/h is 0.0000138…: rounded half-to-even to a millionth, once.
    tiny = price_job(prices, BilledQuantities("1", "0"))
    assert tiny.items["cpu"] == Decimal("0.000014")


def test_without_a_per_epsilon_price_epsilon_costs_nothing() -> None:
    prices = PriceList("EUR", Decimal(0), Decimal("2"))
    charge = price_job(prices, BilledQuantities("10", "3.5"))
    assert charge.items["epsilon"] == Decimal(0) and charge.total == Decimal("2.000000")


USAGE = ResourceUsage(cpu_seconds=360.5, cpu_user_seconds=350.0, cpu_system_seconds=10.5,
                      cpu_sampled_seconds=360.0, wall_seconds=200.0, max_rss_bytes=2 * 10**9,
                      peak_tree_rss_bytes=3 * 10**9)


RESERVATION_CPU_ITEM = Decimal("0.200000")  # the node's 4 CPU-hour reservation at 0.05/h


def _fail_after_data_access(node: Node, job: Job, usage: ResourceUsage | None = USAGE) -> None:
    """Settle ``job`` as the runner does when the engine failed after reading data."""
    outcome = JobOutcome(succeeded=False, data_accessed=True, release_path=None,
                         failure="engine exited with status 1", usage=usage)
    JobRunner(node)._settle(job.id, outcome)


def _epsilon_item(epsilon: float) -> Decimal:
    return (Decimal(repr(epsilon)).quantize(Decimal("0.000001")) * Decimal("1.5")).quantize(
        Decimal("0.000001"))


def _audit_bill_totals(node: Node, researcher_name: str, month: str) -> Decimal:
    with node.session() as s:
        return sum((Decimal(e["total"]) for e in read_entries(s)
                    if e["action"] == "bill" and e["researcher"] == researcher_name
                    and e["month"] == month), Decimal(0))


def test_settlement_meters_charges_and_audits_in_one_transaction(node_dir: Path) -> None:
    _with_prices(node_dir)
    node = Node(node_dir)
    alice = researcher(node_dir, "alice")
    job = submit(node, alice)
    assert isinstance(job, Job)
    _fail_after_data_access(node, job)
    with node.session() as s:
        row = s.get(Job, job.id)
        meter = s.get(JobMeter, job.id)
        charge = s.get(BillingCharge, job.id)
        entries = read_entries(s)
    assert row is not None and row.budget_state == "committed"  # ε: the ledger's failure rule
    assert meter is not None and meter.measured and meter.cpu_seconds == "360.500000"  # owner's
    assert charge is not None
    bill = entries[charge.audit_seq]
    assert [e["action"] for e in entries[-2:]] == ["charge", "bill"]
    assert bill["job_id"] == job.id and bill["total"] == charge.total
    # It read user data: its 4 CPU-hour reservation at 0.05/h (not the 360.5 s it used), 0.1 per
    # job, committed ε at 1.5.
    assert bill["quantities"] == {"cpu_seconds": "14400.000000", "cpu_basis": "reservation",
                                  "epsilon": bill["quantities"]["epsilon"]}
    assert Decimal(charge.total) == RESERVATION_CPU_ITEM + Decimal("0.1") + _epsilon_item(job.epsilon)
    assert "client_updates" not in json.dumps(bill) and "360.5" not in json.dumps(bill)
    JobRunner(node)._settle(job.id, JobOutcome(False, True, None, "again", usage=USAGE))
    with node.session() as s:
        assert sum(e["action"] == "bill" for e in read_entries(s)) == 1  # settled once


def test_researcher_bill_does_not_reveal_metered_cpu_of_private_data(
        node_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The attack: run the same public job twice and read the private data's effect (how many
    users were sampled, how many examples they hold) off the bill or the next quota decision.
    Alice's job ran cheaply and Bob's expensively; everything each of them sees of billing is
    the same, and only the owner's ``usage`` tells the runs apart."""
    _with_prices(node_dir)
    policy = Node(node_dir).deployment.policy_file
    policy.write_text(policy.read_text() + "p2, alice, owner, *, train, max_cpu_hours_per_month, 6\n"
                      "p2, bob, owner, *, train, max_cpu_hours_per_month, 6\n")
    node = Node(node_dir)
    cheap = ResourceUsage(cpu_seconds=1.25, cpu_user_seconds=1.0, cpu_system_seconds=0.25,
                          cpu_sampled_seconds=1.0, wall_seconds=2.0, max_rss_bytes=10**8,
                          peak_tree_rss_bytes=10**8)
    costly = ResourceUsage(cpu_seconds=14040.0, cpu_user_seconds=14000.0, cpu_system_seconds=40.0,
                           cpu_sampled_seconds=14000.0, wall_seconds=7200.0,
                           max_rss_bytes=8 * 10**9, peak_tree_rss_bytes=9 * 10**9)
    seen: dict[str, dict[str, Any]] = {}
    for name, usage in (("alice", cheap), ("bob", costly)):
        who = researcher(node_dir, name)
        job = submit(node, who, rounds=2)
        assert isinstance(job, Job), job
        _fail_after_data_access(node, job, usage)
        line = json.loads(_statement_json(node_dir, name, month_of(time.time()), capsys))["lines"][0]
        with node.session() as s:
            bill = next(e for e in read_entries(s) if e["action"] == "bill" and e["job_id"] == job.id)
        refused = submit(node, who, rounds=2)  # 4 CPU-hours billed + 4 reserved > 6
        assert isinstance(refused, Problem), refused
        seen[name] = {
            "statement": {k: v for k, v in line.items() if k not in ("job_id", "charged_at", "audit_seq")},
            "bill": {k: bill[k] for k in ("currency", "total", "items", "quantities", "prices")},
            "quota": (refused.slug, refused.extra | {"rule": ""},
                      refused.detail.replace(refused.extra["rule"], "").replace(name, "someone")),
        }
    assert seen["alice"] == seen["bob"]
    assert seen["alice"]["statement"]["cpu_seconds"] == "14400.000000"  # the reservation
    assert seen["alice"]["quota"][1]["used"] == "4"
    capsys.readouterr()
    assert fedgate(["-d", str(node_dir), "billing", "usage", "--month", month_of(time.time()),
                    "--json"]) == 0
    measured = sorted(row["cpu_seconds"] for row in json.loads(capsys.readouterr().out))
    assert measured == ["1.250000", "14040.000000"]  # the owner still sees what each job used


def test_a_job_that_never_read_user_data_is_billed_the_cpu_it_measured(node_dir: Path) -> None:
    """Its whole run preceded any private data, so what it used is safe to bill."""
    _with_prices(node_dir)
    node = Node(node_dir)
    job = submit(node, researcher(node_dir, "alice"))
    assert isinstance(job, Job)
    JobRunner(node)._settle(job.id, JobOutcome(False, False, None, "model refused", usage=USAGE))
    with node.session() as s:
        charge = s.get(BillingCharge, job.id)
        assert s.get(Job, job.id).budget_state == "refunded"  # type: ignore[union-attr]
        bill = read_entries(s)[charge.audit_seq] if charge else {}
    assert charge is not None and json.loads(charge.items) == {
        "cpu": "0.005007", "job": "0.100000", "epsilon": "0.000000"}  # 360.5 s at 0.05/h
    assert bill["quantities"]["cpu_basis"] == "measured"


def test_a_job_cancelled_after_reading_user_data_is_charged_its_reservation(node_dir: Path) -> None:
    """A cancelled job has no meter report; having read user data, it is billed as if it had."""
    _with_prices(node_dir)
    node = Node(node_dir)
    job = submit(node, researcher(node_dir, "alice"))
    assert isinstance(job, Job)
    JobRunner(node)._settle_failure(job.id, "cancelled by the researcher", True)
    with node.session() as s:
        charge = s.get(BillingCharge, job.id)
    assert charge is not None
    assert json.loads(charge.items) == {"cpu": str(RESERVATION_CPU_ITEM), "job": "0.100000",
                                        "epsilon": str(_epsilon_item(job.epsilon))}


def test_a_job_refunded_before_it_started_is_neither_metered_as_run_nor_charged(
        node_dir: Path) -> None:
    _with_prices(node_dir)
    node = Node(node_dir)
    job = submit(node, researcher(node_dir, "bob"))
    assert isinstance(job, Job)
    JobRunner(node)._settle(job.id, JobOutcome(False, False, None, "sandbox unavailable"))
    with node.session() as s:
        meter = s.get(JobMeter, job.id)
        assert meter is not None and not meter.measured
        assert s.get(BillingCharge, job.id) is None
        assert s.get(Job, job.id).budget_state == "refunded"  # type: ignore[union-attr]


def test_statements_sum_exactly_to_the_audit_logs_charges(
        node_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _with_prices(node_dir)
    node = Node(node_dir)
    alice, bob = researcher(node_dir, "alice"), researcher(node_dir, "bob")
    usages = [USAGE, ResourceUsage(1.234567, 1.0, 0.234567, 1.2, 3.333333, 10**8, 0),
              ResourceUsage(99.999999, 99.0, 0.999999, 99.0, 77.7, 123456789, 987654321)]
    jobs = []
    for usage, who in zip(usages, (alice, bob, alice), strict=True):
        job = submit(node, who, rounds=3)
        assert isinstance(job, Job)
        _fail_after_data_access(node, job, usage)
        jobs.append(job)
    month = month_of(time.time())
    for name in ("alice", "bob"):
        capsys.readouterr()
        assert fedgate(["-d", str(node_dir), "billing", "statement", "--researcher", name,
                        "--month", month, "--format", "json"]) == 0
        document = json.loads(capsys.readouterr().out)
        audited = _audit_bill_totals(node, name, month)
        assert Decimal(document["totals"]["EUR"]) == audited > 0
        assert sum(Decimal(line["total"]) for line in document["lines"]) == audited
        assert all("client_updates" not in line for line in document["lines"])
        assert fedgate(["-d", str(node_dir), "billing", "statement", "--researcher", name,
                        "--month", month, "--format", "csv"]) == 0
        rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
        assert rows[-1]["job_id"] == "TOTAL" and Decimal(rows[-1]["total"]) == audited
        assert sum(Decimal(r["total"]) for r in rows[:-1]) == audited
    assert len(json.loads(_statement_json(node_dir, "alice", month, capsys))["lines"]) == 2
    assert json.loads(_statement_json(node_dir, "alice", "2001-01", capsys))["totals"] == {}


def _statement_json(node_dir: Path, name: str, month: str,
                    capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert fedgate(["-d", str(node_dir), "billing", "statement", "--researcher", name,
                    "--month", month, "--format", "json"]) == 0
    return capsys.readouterr().out


def test_the_owner_billing_guide_runs_as_written(tmp_path: Path) -> None:
    from tests.test_docs import run_doc

    run = run_doc("billing.md", tmp_path, timeout=120)
    assert "no charges" in run.stdout
    assert (run.workdir / "alice.csv").read_text().startswith("job_id,dataset,")


def test_an_estimate_projects_an_upper_bound_of_the_cost_next_to_epsilon(
        node_dir: Path) -> None:
    from gateway.node.admission import JobRequest, estimate_job

    body = {"dataset": "demo", "rounds": 2, "clients_per_round": 20, "noise_multiplier": 1.0,
            "clip": 1.0}
    alice = researcher(node_dir, "alice")
    assert "cost" not in estimate_job(Node(node_dir), alice, JobRequest.from_json(
        body, needs_model=False))  # no price list: nothing is charged, nothing projected
    _with_prices(node_dir)
    node = Node(node_dir)
    estimate = estimate_job(node, alice, JobRequest.from_json(body, needs_model=False))
    cost = estimate["cost"]
    # The node's per-job CPU limit (4 h) at 0.05/h + 0.10 per job + 1.5 per projected ε.
    epsilon_item = _epsilon_item(estimate["epsilon"])
    assert cost["items"] == {"cpu": "0.200000", "job": "0.100000", "epsilon": str(epsilon_item)}
    assert Decimal(cost["total"]) == Decimal("0.3") + epsilon_item
    assert cost["currency"] == "EUR" and cost["upper_bound"] is True
    assert "CPU reservation (4 CPU-hours)" in cost["basis"] and "memory" not in cost["basis"]
    job = submit(node, alice, rounds=2)
    assert isinstance(job, Job)
    _fail_after_data_access(node, job)  # having read user data, it is charged the projection
    with node.session() as s:
        charge = s.get(BillingCharge, job.id)
    assert charge is not None
    assert json.loads(charge.items) == cost["items"] and charge.total == cost["total"]


def test_the_researcher_cli_shows_the_projected_cost(
        sqlite_node: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography.hazmat.primitives import serialization

    from gateway.cli.process import running_gateway
    from gateway.client import Client
    from tests.conftest import make_researcher

    _with_prices(sqlite_node)
    key_path = tmp_path / "alice.key"
    key_path.write_bytes(make_researcher(sqlite_node, "alice").private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with running_gateway(sqlite_node, log_path=tmp_path / "gateway.log") as url:
        monkeypatch.setenv("FEDGATE_URL", url)
        monkeypatch.setenv("FEDGATE_KEY", str(key_path))
        monkeypatch.setenv("FEDGATE_NODE_KEY", str(sqlite_node / "node.pub"))
        capsys.readouterr()
        assert fedgate(["estimate", "demo", "--rounds", "2", "--clients-per-round", "20",
                        "--noise-multiplier", "1.0", "--clip", "1.0"]) == 0
        shown = capsys.readouterr().out
        with Client(url, key=key_path, node_public_key=sqlite_node / "node.pub") as client:
            cost = client.estimate("demo", rounds=2, clients_per_round=20, noise_multiplier=1.0,
                                   clip=1.0)["cost"]
    assert cost["upper_bound"] is True and "memory" not in cost["basis"]
    assert f"projected cost: {cost['total']} EUR (upper bound: CPU reservation" in shown
