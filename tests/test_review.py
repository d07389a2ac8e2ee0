"""Owner review as a specification: a policy can hold a job in ``pending_review`` with its
budget reserved; the owner approves (the gateway then runs it) or denies it with a reason
(refunded, and the researcher sees why); an unanswered review expires (refunded); held
reservations count against the privacy filter like any other. Real HTTP signatures, real
policy, real ledger on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gateway.api.app import create_app
from gateway.cli import main as fedgate
from gateway.policy.decisions import PolicyEngine
from gateway.policy.lint import lint_policy
from gateway.policy.request import RequestContext
from ledger.db import make_engine, session
from ledger.models import Dataset, Job, JobMeter
from tests.conftest import make_researcher
from tests.test_end_to_end import sqlite_node  # noqa: F401  (fixture)
from tests.test_gateway import JOB, audit_entries, signed_client

FIXTURES = Path(__file__).parent / "fixtures"
MODEL_CONF = (Path(__file__).resolve().parent.parent / "policies" / "model.conf").read_text()
GRANTS = ("p, researchers, owner, *, estimate, allow\n"
          "p, researchers, owner, *, train, allow\n")


def write_policy(node_dir: Path, rows: str) -> None:
    (node_dir / "policies" / "policy.csv").write_text(GRANTS + rows)


def spent_rdp(db_url: str) -> str:
    engine = make_engine(db_url)
    with session(engine) as s:
        dataset = s.get(Dataset, "demo")
    engine.dispose()
    assert dataset is not None
    return dataset.spent_rdp


def jobs(db_url: str) -> list[Job]:
    from sqlmodel import select

    engine = make_engine(db_url)
    with session(engine) as s:
        rows = list(s.exec(select(Job)).all())
    engine.dispose()
    return rows


def submit(client: Any, job: dict[str, Any]) -> Any:
    model = (FIXTURES / "logreg-20x5.json").read_bytes()
    digest = client.post("/v1/models", content=model,
                         headers={"Content-Type": "application/json"}).json()["digest"]
    return client.post("/v1/jobs", json={**job, "model_digest": digest})


def review_actions(db_url: str, job_id: str) -> list[tuple[str, str | None]]:
    return [(e["action"], e.get("decision")) for e in audit_entries(db_url)
            if e.get("job_id") == job_id]


# ---------------------------------------------------------------------------------------------
# The policy decides when a review is required


def decide_train(rows: str, **facts: Any) -> Any:
    engine = PolicyEngine(MODEL_CONF, GRANTS + rows, [("bob", "researchers", "owner")])
    context = RequestContext(now=dt.datetime.now(dt.UTC), **facts)
    return engine.decide(subject="bob", domain="owner", dataset="demo", action="train",
                         context=context)


@pytest.mark.parametrize(("condition", "held", "free", "why"), [
    ("always", {}, None, "every such job is reviewed"),
    ("first_job", {"researcher_committed_jobs": 0}, {"researcher_committed_jobs": 1},
     "bob's first job to run on demo"),
    ("epsilon_above 1.5", {"epsilon": 1.51}, {"epsilon": 1.5}, "projected ε 1.51 is above 1.5"),
    ("new_model_family", {"model_family": "keras-functional",
                          "dataset_model_families": frozenset({"keras-sequential"})},
     {"model_family": "keras-sequential",
      "dataset_model_families": frozenset({"keras-sequential"})},
     "no job has run on demo with a keras-functional model yet"),
])
def test_each_review_condition_holds_a_request_only_when_it_applies(
    condition: str, held: dict[str, Any], free: dict[str, Any] | None, why: str
) -> None:
    row = f"p2, researchers, owner, demo, train, require_review, {condition}"
    decision = decide_train(row + "\n", **held)
    assert decision.allowed
    assert decision.review is not None and why in decision.review
    assert f"rule '{row}' (policy.csv:3) requires review" in decision.review
    assert "waits for the data owner's review" in decision.explanation
    if free is not None:
        assert decide_train(row + "\n", **free).review is None


def test_a_review_condition_the_gateway_cannot_establish_holds_the_job() -> None:
    decision = decide_train("p2, researchers, owner, demo, train, require_review, first_job\n")
    assert decision.allowed
    assert "cannot establish researcher_committed_jobs" in (decision.review or "")


def test_review_conditions_join_with_a_bar_and_never_refuse_or_grant() -> None:
    row = "p2, researchers, owner, demo, train, require_review, first_job | epsilon_above 2\n"
    assert decide_train(row, researcher_committed_jobs=3, epsilon=2.5).review is not None
    assert decide_train(row, researcher_committed_jobs=3, epsilon=1.0).review is None
    ungranted = PolicyEngine(MODEL_CONF, row, [("bob", "researchers", "owner")])
    assert not ungranted.decide(subject="bob", domain="owner", dataset="demo",
                                action="train").allowed


def test_the_gateway_is_asked_only_for_the_facts_matching_review_conditions_read() -> None:
    engine = PolicyEngine(MODEL_CONF, GRANTS
                          + "p2, researchers, owner, demo, train, require_review, first_job\n"
                            "p2, researchers, owner, demo, *, require_review, new_model_family\n"
                            "p2, researchers, owner, other, train, require_review, epsilon_above 1\n",
                          [("bob", "researchers", "owner")])
    asked = {"subject": "bob", "domain": "owner", "dataset": "demo"}
    assert engine.facts_read(**asked, action="train") == {
        "researcher_committed_jobs", "model_family", "dataset_model_families"}
    assert engine.facts_read(**asked, action="estimate") == set()


def test_obligations_on_actions_that_create_no_job_are_flagged_by_the_linter() -> None:
    engine = PolicyEngine(MODEL_CONF, GRANTS
                          + "p2, researchers, owner, demo, estimate, require_review, always\n"
                            "p2, researchers, owner, demo, train, max_result_fetches, 2\n"
                            "p2, researchers, owner, demo, train, max_result_fetches, 1\n",
                          [("bob", "researchers", "owner")])
    findings = [str(f) for f in lint_policy(engine, owner="owner", datasets={"demo": 500},
                                            principals={"bob"}, now=dt.datetime.now(dt.UTC))]
    assert findings == [
        "warning: policy.csv:3: require_review never applies to estimate: only train requests "
        "create jobs",
        "warning: policy.csv:5: repeats max_result_fetches of policy.csv:4: both apply, so the "
        "stricter one decides"]


# ---------------------------------------------------------------------------------------------
# The workflow on a node


def test_a_policy_requiring_review_holds_the_job_with_its_budget_reserved(
    node_dir: Path, db_url: str
) -> None:
    write_policy(node_dir, "p2, researchers, owner, demo, train, require_review, always\n")
    alice = make_researcher(node_dir, "alice")
    before = spent_rdp(db_url)
    with signed_client(create_app(node_dir), alice) as client:
        response = submit(client, JOB)
        time.sleep(1.5)  # the gateway's review watch runs every second: it must not start it
        status = client.get(f"/v1/jobs/{response.json()['job_id']}").json()
    assert response.status_code == 202
    assert status["state"] == "pending_review" and status["budget"] == "reserved"
    assert status["review"]["state"] == "pending" and status["review"]["reason"] is None
    assert "require_review, always" in status["review"]["required_because"]
    assert spent_rdp(db_url) != before
    assert not (node_dir / "jobs" / status["job_id"]).exists()
    assert review_actions(db_url, status["job_id"]) == [("admit", "allow"),
                                                        ("review", "requested")]


def test_a_denial_refunds_the_reservation_and_tells_the_researcher_why(
    node_dir: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    write_policy(node_dir, "p2, researchers, owner, demo, train, require_review, always\n")
    alice = make_researcher(node_dir, "alice")
    before = spent_rdp(db_url)
    with signed_client(create_app(node_dir), alice) as client:
        job_id = submit(client, JOB).json()["job_id"]
        assert fedgate(["-d", str(node_dir), "review", "deny", job_id, "--reason",
                        "use noise_multiplier >= 1.2 on demo"]) == 0
        status = client.get(f"/v1/jobs/{job_id}").json()
    assert status["state"] == "failed" and status["budget"] == "refunded"
    assert status["review"]["state"] == "denied"
    assert status["review"]["reason"] == "use noise_multiplier >= 1.2 on demo"
    assert "use noise_multiplier >= 1.2 on demo" in status["failure"]
    assert spent_rdp(db_url) == before  # refunded exactly
    assert review_actions(db_url, job_id) == [("admit", "allow"), ("review", "requested"),
                                              ("review", "denied"), ("refund", None)]
    assert "refunded" in capsys.readouterr().out
    with session(make_engine(db_url)) as s:
        meter = s.get(JobMeter, job_id)
        assert meter is not None and meter.state == "metered" and not meter.measured


def test_an_expired_review_refunds_the_reservation(node_dir: Path, db_url: str) -> None:
    config = node_dir / "fedgate.toml"
    config.write_text(config.read_text().replace("expiry_hours = 72", "expiry_hours = 0.0005"))
    write_policy(node_dir, "p2, researchers, owner, demo, train, require_review, always\n")
    alice = make_researcher(node_dir, "alice")
    before = spent_rdp(db_url)
    with signed_client(create_app(node_dir), alice) as client:
        job_id = submit(client, JOB).json()["job_id"]
        deadline = time.monotonic() + 30
        while (status := client.get(f"/v1/jobs/{job_id}").json())["state"] != "failed":
            assert time.monotonic() < deadline, status
            time.sleep(0.3)
    assert status["budget"] == "refunded" and status["review"]["state"] == "expired"
    assert "expired" in status["failure"]
    assert spent_rdp(db_url) == before
    assert review_actions(db_url, job_id)[-2:] == [("review", "expired"), ("refund", None)]


def test_deciding_an_overdue_review_expires_it_instead(node_dir: Path, db_url: str) -> None:
    config = node_dir / "fedgate.toml"
    config.write_text(config.read_text().replace("expiry_hours = 72", "expiry_hours = 0.0001"))
    write_policy(node_dir, "p2, researchers, owner, demo, train, require_review, always\n")
    alice = make_researcher(node_dir, "alice")
    client = signed_client(create_app(node_dir), alice)  # no lifespan: no review watch
    job_id = submit(client, JOB).json()["job_id"]
    time.sleep(0.5)
    assert fedgate(["-d", str(node_dir), "review", "approve", job_id, "--reason", "ok"]) == 1
    status = client.get(f"/v1/jobs/{job_id}").json()
    assert status["state"] == "failed" and status["review"]["state"] == "expired"
    assert status["budget"] == "refunded"


def test_reservations_held_by_pending_reviews_count_toward_the_budget(
    node_dir: Path, db_url: str
) -> None:
    write_policy(node_dir, "p2, researchers, owner, demo, train, require_review, always\n")
    alice = make_researcher(node_dir, "alice")
    app = create_app(node_dir)
    with signed_client(app, alice) as client:
        # A job of which exactly one fits the dataset's budget (ε ≈ 3 of 4; the number of
        # training users, and so the rounds that cost that much, depend on the split key).
        BIG_JOB = next(job for rounds in range(40, 100, 5)
                       if (job := {**JOB, "rounds": rounds})
                       and client.post("/v1/estimate", json=job).json()["jobs_that_fit"] == 1)

        # Three concurrent submissions, each of which fits only on its own: the filter admits
        # exactly one, which waits for review holding its reservation.
        def submit_one(_: int) -> Any:
            return submit(signed_client(app, alice), BIG_JOB)  # no second lifespan

        with ThreadPoolExecutor(max_workers=3) as pool:
            responses = list(pool.map(submit_one, range(3)))
        codes = sorted(r.status_code for r in responses)
        assert codes == [202, 403, 403]
        held = next(r.json() for r in responses if r.status_code == 202)
        assert held["state"] == "pending_review"
        refused = [r.json() for r in responses if r.status_code == 403]
        assert {p["type"] for p in refused} == {"urn:fedgate:problem:budget-exceeded"}

        # The held reservation still counts later, and its refund frees the budget again.
        assert submit(client, BIG_JOB).status_code == 403
        assert fedgate(["-d", str(node_dir), "review", "deny", held["job_id"], "--reason",
                        "too expensive"]) == 0
        again = submit(client, BIG_JOB)
    assert again.status_code == 202 and again.json()["state"] == "pending_review"


def test_a_pending_review_survives_a_gateway_restart(node_dir: Path, db_url: str) -> None:
    write_policy(node_dir, "p2, researchers, owner, demo, train, require_review, always\n")
    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as client:
        job_id = submit(client, JOB).json()["job_id"]
    with signed_client(create_app(node_dir), alice) as restarted:  # recovery runs at start-up
        status = restarted.get(f"/v1/jobs/{job_id}").json()
    assert status["state"] == "pending_review" and status["budget"] == "reserved"


def test_the_sdk_waits_through_review_and_reports_the_owners_reason(
    node_dir: Path, db_url: str
) -> None:
    import threading

    from gateway.client import Client, JobFailed

    write_policy(node_dir, "p2, researchers, owner, demo, train, require_review, always\n")
    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as http:
        client = Client("http://testserver", key=alice, node_public_key=node_dir / "node.pub")
        client._http = http
        digest = client.upload_model((FIXTURES / "logreg-20x5.json").read_bytes())
        job = client.submit("demo", digest, **{k: v for k, v in JOB.items() if k != "dataset"})
        owner = threading.Timer(1.0, fedgate, [["-d", str(node_dir), "review", "deny", job.id,
                                                "--reason", "not this quarter"]])
        owner.start()
        status = job.wait(progress=False, review_poll_seconds=0.2, timeout_seconds=0.1)
        owner.join()
        with pytest.raises(JobFailed, match="not this quarter"):
            job.result()
    assert status["state"] == "failed" and status["review"]["reason"] == "not this quarter"


def test_the_sdk_polls_slowly_only_while_the_owner_decides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``pending_review`` can last days: polled every ``review_poll_seconds``. ``approved`` lasts
    until the gateway's next review tick (a second): polled every ``poll_seconds``, so a
    researcher waiting on an approved job does not sit out a whole review interval."""
    from gateway.sdk.client import Job

    states = iter(["pending_review", "approved", "queued", "running", "succeeded"])

    class Node:
        def _get(self, path: str) -> dict[str, Any]:
            return {"job_id": "job-1", "rounds": 3, "state": next(states)}

    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    job = Job(Node(), {"job_id": "job-1", "rounds": 3, "state": "pending_review"})  # type: ignore[arg-type]
    status = job.wait(progress=False, poll_seconds=0.5, review_poll_seconds=5.0)
    assert status["state"] == "succeeded"
    assert slept == [5.0, 0.5, 0.5, 0.5]


def test_cancelling_a_held_job_withdraws_the_review_and_refunds(node_dir: Path, db_url: str) -> None:
    write_policy(node_dir, "p2, researchers, owner, demo, train, require_review, always\n")
    alice = make_researcher(node_dir, "alice")
    before = spent_rdp(db_url)
    with signed_client(create_app(node_dir), alice) as client:
        job_id = submit(client, JOB).json()["job_id"]
        status = client.post(f"/v1/jobs/{job_id}/cancel").json()
    assert status["state"] == "failed" and status["budget"] == "refunded"
    assert status["review"]["state"] == "withdrawn"
    assert spent_rdp(db_url) == before
    assert fedgate(["-d", str(node_dir), "review", "approve", job_id, "--reason", "ok"]) == 1


def test_only_the_first_job_of_a_researcher_is_held(
    node_dir: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``first_job`` reads the ledger: a researcher with a job that ran is not held again."""
    from gateway.node.jobs import JobRunner

    monkeypatch.setattr(JobRunner, "start", lambda self, job: None)  # admission only
    write_policy(node_dir, "p2, researchers, owner, demo, train, require_review, first_job\n")
    alice = make_researcher(node_dir, "alice")
    client = signed_client(create_app(node_dir), alice)  # no lifespan: nothing starts
    first = submit(client, JOB).json()
    assert first["state"] == "pending_review"
    engine = make_engine(db_url)
    with session(engine) as s, s.begin():  # as if an earlier job of alice had run
        ran = s.get(Job, first["job_id"])
        assert ran is not None
        ran.budget_state, ran.state = "committed", "succeeded"
    engine.dispose()
    second = submit(client, {**JOB, "idempotency_key": "second"}).json()
    assert second["state"] == "queued" and "review" not in second


def test_the_owner_lists_and_inspects_what_waits_for_review(
    node_dir: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    write_policy(node_dir, "p2, researchers, owner, demo, train, require_review, epsilon_above 0.5\n")
    alice = make_researcher(node_dir, "alice")
    client = signed_client(create_app(node_dir), alice)
    job = submit(client, JOB).json()
    capsys.readouterr()

    def run(*argv: str) -> str:
        assert fedgate(["-d", str(node_dir), "review", *argv]) == 0
        return capsys.readouterr().out

    listed = json.loads(run("list", "--json"))["pending"]
    assert [(r["job_id"], r["researcher"], r["dataset"]) for r in listed] == [
        (job["job_id"], "alice", "demo")]
    shown = run("show", job["job_id"])
    for expected in ("keras-sequential", "105 parameters", "input [20] → 5", "rounds=10",
                     "noise_multiplier=1.0", f"ε {job['epsilon']:.4f}",
                     "alice may train on demo", "projected ε", "is above 0.5"):
        assert expected in shown, (expected, shown)
    details = json.loads(run("show", job["job_id"], "--json"))
    assert details["model"]["parameters"] == 105 and details["parameters"]["clip"] == 1.0
    run("approve", job["job_id"], "--reason", "small model")
    assert json.loads(run("list", "--json"))["pending"] == []
    assert client.get(f"/v1/jobs/{job['job_id']}").json()["state"] == "approved"
    assert review_actions(db_url, job["job_id"])[-1] == ("review", "approved")


def test_review_steps_that_do_not_apply_are_refused_and_change_nothing(
    node_dir: Path, db_url: str
) -> None:
    write_policy(node_dir, "p2, researchers, owner, demo, train, require_review, always\n")
    alice = make_researcher(node_dir, "alice")
    client = signed_client(create_app(node_dir), alice)
    job_id = submit(client, JOB).json()["job_id"]

    def review(*argv: str) -> int:
        return fedgate(["-d", str(node_dir), "review", *argv])

    assert review("approve", job_id, "--reason", "   ") == 1  # a reason is required
    assert review("approve", "job-unknown", "--reason", "ok") == 1
    assert review("approve", job_id, "--reason", "ok") == 0
    entries = len(audit_entries(db_url))
    assert review("deny", job_id, "--reason", "changed my mind") == 1  # already decided
    assert review("approve", job_id, "--reason", "again") == 1
    assert len(audit_entries(db_url)) == entries


# ---------------------------------------------------------------------------------------------
# End to end: an approved job runs


@pytest.mark.tff
def test_a_job_held_for_review_trains_after_the_owner_approves_it(
    tmp_path: Path, sqlite_node: Path  # noqa: F811
) -> None:
    from gateway.cli.process import running_gateway
    from gateway.client import Client

    write_policy(sqlite_node, "p2, researchers, owner, demo, train, require_review, first_job\n")
    alice = make_researcher(sqlite_node, "alice")
    model = (FIXTURES / "logreg-20x5.json").read_bytes()
    with running_gateway(sqlite_node, log_path=tmp_path / "gateway.log") as url:
        client = Client(url, key=alice, node_public_key=sqlite_node / "node.pub")
        parameters = {k: v for k, v in JOB.items() if k != "dataset"}
        job = client.submit("demo", client.upload_model(model),
                            **{**parameters, "rounds": 2, "evaluate": False})
        assert job.last_status["state"] == "pending_review"
        time.sleep(2)
        assert job.status()["state"] == "pending_review"
        assert not (sqlite_node / "jobs" / job.id).exists()
        assert fedgate(["-d", str(sqlite_node), "review", "approve", job.id, "--reason",
                        "linear model, fine"]) == 0
        status = job.wait(progress=False, poll_seconds=0.5, timeout_seconds=600)
        release = job.result()
    assert status["state"] == "succeeded" and status["budget"] == "committed"
    assert status["review"] == {**status["review"], "state": "approved",
                                "reason": "linear model, fine"}
    assert release.job_id == job.id
    db = f"sqlite:///{sqlite_node / 'fedgate.db'}"
    assert review_actions(db, job.id) == [
        ("admit", "allow"), ("review", "requested"), ("review", "approved"),
        ("charge", None), ("release", None), ("fetch", None)]



def test_polling_for_reviews_takes_no_write_lock_while_nothing_is_due(
    node_dir: Path, db_url: str
) -> None:
    """The review watch polls every second. With no approved job and no overdue review it only
    reads: a write transaction per poll (BEGIN IMMEDIATE on SQLite) waited for the admissions'
    writer and then held it up (SQLite's busy handler sleeping 1 to 100 ms)."""
    import asyncio

    from sqlalchemy import event

    from gateway.node.jobs import JobRunner
    from gateway.node.node import Node
    from gateway.node.review import expire_overdue_reviews

    node = Node(node_dir)
    write_transactions, statements = [], []
    if node.engine is not node.read_engine:  # SQLite: the write engine begins IMMEDIATE
        event.listen(node.engine, "begin", lambda *_: write_transactions.append(1))
    event.listen(node.engine, "before_cursor_execute",
                 lambda _c, _k, sql, *_: statements.append(sql.upper()))
    try:
        assert expire_overdue_reviews(node, actor="node") == []
        assert asyncio.run(JobRunner(node).start_approved()) == []
        assert write_transactions == []
        assert not [sql for sql in statements
                    if "FOR UPDATE" in sql or sql.lstrip().startswith(("UPDATE", "INSERT"))]
    finally:
        node.dispose()
