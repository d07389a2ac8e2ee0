"""Concurrency soak: several gateway processes (real uvicorn) share one node, on SQLite and on
PostgreSQL, while several client processes send a mix of signed requests for a while —
admissions, over-budget requests, invalid requests, bad signatures, replays across gateway
processes, cancellations and status reads — and the owner denies held jobs as they come.

Every job the policy admits is held for the owner's review (``require_review, always``), so
admission runs in full (policy, privacy filter, reservation, audit) without starting an
engine per job; reviews can also expire during the run (a short ``[review] expiry_hours``),
so held jobs end in three ways: denied by the owner, expired, withdrawn by the researcher.

Then, with everything stopped:

* no overspend: replaying the audit log in order, the reservations outstanding never exceed
  the number of such jobs the filter admits on an empty budget, and the dataset's spent
  vector equals, exactly, the sum of the jobs still charged (the empty vector again when no
  job ran: every held job was refunded);
* no lost or phantom audit entry: every decision a client saw has exactly one audit entry
  (``admit`` with its job id, ``deny`` with its request digest and reason), each cancellation
  the matching ``review`` entry; refusals before authentication (bad signature, replay) have
  none and created nothing; a request that got no response (a dropped connection, rare)
  was decided at most once; the log verifies offline against the node key;
* every job ends in a terminal state with its budget settled, every review closed;
* no client ever saw a 5xx and no owner decision failed (this soak found a PostgreSQL
  deadlock between admission and closing a review, fixed by one lock order: job, dataset,
  audit head — ``ledger.budget.lock_dataset``).

``make test`` runs the short profile (about a minute for both databases); ``make soak``
(``FEDGATE_SOAK=long``) runs the long one, which also lets one approved job train with TFF.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import subprocess
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from sqlalchemy.exc import OperationalError
from sqlmodel import select

from gateway.cli import main as fedgate
from gateway.cli.process import start_gateway, stop_gateway
from gateway.sdk.request_signing import SignedRequestAuth, signature_headers
from ledger import accounting, keys
from ledger.audit import read_entries
from ledger.canonical import sha256_digest
from ledger.db import make_engine, session
from ledger.models import Dataset, Job, JobReview
from tests.conftest import make_researcher

FIXTURES = Path(__file__).parent / "fixtures"
POLICY = ("p, researchers, owner, *, estimate, allow\n"
          "p, researchers, owner, *, train, allow\n"
          "p2, researchers, owner, demo, train, require_review, always\n")


@dataclass(frozen=True)
class Profile:
    gateways: int
    clients: int
    seconds: float  # of load, per client
    max_ops: int  # per client
    review_expiry_seconds: float
    approved_jobs: int  # jobs the owner approves, which then train with TFF


PROFILES = {
    "short": Profile(gateways=3, clients=3, seconds=8.0, max_ops=60, review_expiry_seconds=3.0,
                     approved_jobs=0),
    "long": Profile(gateways=4, clients=6, seconds=240.0, max_ops=2_000,
                    review_expiry_seconds=20.0, approved_jobs=1),
}
PROFILE_NAME = os.environ.get("FEDGATE_SOAK", "short")
OPERATIONS = {"submit": 35, "over_budget": 8, "invalid": 8, "bad_signature": 10, "replay": 8,
              "cancel": 20, "status": 11}


def _slug(response: httpx.Response) -> str | None:
    if response.headers.get("content-type") != "application/problem+json":
        return None
    return str(response.json()["type"]).rsplit(":", 1)[-1]


# ---------------------------------------------------------------------------------------------
# The client processes


def _outcome(send: Any) -> dict[str, Any]:
    """Status, problem slug and JSON body of one request; status 0 if no response came (the
    connection dropped: after an unhandled error uvicorn closes it, and an idle keep-alive
    connection can close as a request is sent), which is not a decision the client saw."""
    try:
        response = send()
    except httpx.TransportError as exc:
        return {"status": 0, "slug": None, "body": {}, "error": type(exc).__name__}
    body = response.json() if response.content else {}
    return {"status": response.status_code, "slug": _slug(response), "body": body}


def client_process(urls: list[str], key_bytes: bytes, job: dict[str, Any],
                   over_budget: dict[str, Any], seconds: float, max_ops: int,
                   seed: int) -> list[dict[str, Any]]:
    """One researcher's load: random operations on random gateways until the time or the
    operation count runs out. Returns what it saw, one record per request."""
    rng = random.Random(seed)
    key = Ed25519PrivateKey.from_private_bytes(key_bytes)
    key_id = keys.key_id(key.public_key())
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them, so a
    # request rarely races a closing connection (a lost response then shows as status 0).
    clients = [httpx.Client(base_url=url, auth=SignedRequestAuth(key), timeout=120.0,
                            limits=httpx.Limits(keepalive_expiry=2.0))
               for url in urls]
    seen: list[dict[str, Any]] = []
    open_jobs: list[str] = []

    def body_of(template: dict[str, Any]) -> bytes:
        return json.dumps({**template, "idempotency_key": uuid.uuid4().hex}).encode()

    def decided(op: str, body: bytes, outcome: dict[str, Any]) -> dict[str, Any]:
        record = {"op": op, "digest": sha256_digest(body), **outcome}
        if outcome["status"] == 202:
            record["job_id"] = outcome["body"]["job_id"]
            open_jobs.append(record["job_id"])
        seen.append(record)
        return record

    def submit(op: str, body: bytes) -> None:
        client = rng.choice(clients)
        decided(op, body, _outcome(lambda: client.post(
            "/v1/jobs", content=body, headers={"Content-Type": "application/json"})))

    def signed(signer: Ed25519PrivateKey, url: str, body: bytes) -> dict[str, str]:
        return signature_headers(private_key=signer, method="POST", url=url + "/v1/jobs",
                                 body=body, content_type="application/json", key_id=key_id)

    deadline = time.monotonic() + seconds
    names, weights = zip(*OPERATIONS.items(), strict=True)
    for _ in range(max_ops):
        if time.monotonic() >= deadline:
            break
        op = rng.choices(names, weights)[0]
        if op == "submit":
            submit(op, body_of(job))
        elif op == "over_budget":
            submit(op, body_of(over_budget))
        elif op == "invalid":
            submit(op, body_of({**job, "rounds": 0}))
        elif op == "bad_signature":  # signed by another key, claiming this one's id
            body, url = body_of(job), rng.choice(urls)
            headers = signed(keys.generate_private_key(), url, body)
            seen.append({"op": op, "digest": sha256_digest(body), **_outcome(lambda: httpx.post(
                url + "/v1/jobs", content=body, headers=headers, timeout=120.0))})
        elif op == "replay":  # a request one gateway decided, replayed to one of them
            body = body_of(job)
            first, second = rng.choice(urls), rng.choice(urls)
            headers = signed(key, first, body)
            original = decided("submit", body, _outcome(lambda: httpx.post(
                first + "/v1/jobs", content=body, headers=headers, timeout=120.0)))
            # The same Host (so @target-uri would verify): the same gateway refuses it from
            # the nonce store; another gateway, listening on another origin without a
            # public_origin, refuses it as addressed to another node (wrong-node).
            replayed = {**headers, "Host": first.removeprefix("http://")}
            seen.append({"op": op, "digest": sha256_digest(body), "original": original["status"],
                         "same_gateway": first == second,
                         **_outcome(lambda: httpx.post(second + "/v1/jobs", content=body,
                                                       headers=replayed, timeout=120.0))})
        elif op in ("cancel", "status") and open_jobs:
            client = rng.choice(clients)
            if op == "cancel":
                job_id = open_jobs.pop(rng.randrange(len(open_jobs)))
                outcome = _outcome(lambda: client.post(f"/v1/jobs/{job_id}/cancel"))
            else:
                job_id = rng.choice(open_jobs)
                outcome = _outcome(lambda: client.get(f"/v1/jobs/{job_id}"))
            seen.append({"op": op, "job_id": job_id, **outcome})
    for client in clients:
        client.close()
    return seen


# ---------------------------------------------------------------------------------------------
# The owner


class Owner(threading.Thread):
    """Denies a random held job every so often with ``fedgate review deny``, until stopped."""

    def __init__(self, node_dir: Path, db_url: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.node_dir, self.db_url, self.interval = node_dir, db_url, interval
        self.stopped = threading.Event()
        self.rng = random.Random(1)
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            pending = [job.id for job in _jobs(self.db_url) if job.state == "pending_review"]
            # A job withdrawn or expired meanwhile is not denied: nothing happens then.
            if pending and (error := deny(self.node_dir, self.rng.choice(pending))) is not None:
                self.errors.append(error)


def deny(node_dir: Path, job_id: str) -> str | None:
    """``fedgate review deny``; the database's error if it aborted the transaction."""
    try:
        fedgate(["-d", str(node_dir), "review", "deny", job_id, "--reason", "soak test"])
    except OperationalError as exc:
        return str(exc.orig)
    return None


# ---------------------------------------------------------------------------------------------
# Reading the ledger


def _jobs(db_url: str) -> list[Job]:
    engine = make_engine(db_url)
    with session(engine) as s:
        # reviewed: SQLModel query object, not Python exec
        rows = list(s.exec(select(Job)).all())
    engine.dispose()
    return rows


def _ledger(db_url: str) -> tuple[Dataset, list[Job], list[JobReview], list[dict[str, Any]]]:
    engine = make_engine(db_url)
    with session(engine) as s:
        dataset = s.get(Dataset, "demo")
        # reviewed: SQLModel query object, not Python exec
        jobs = list(s.exec(select(Job)).all())
        # reviewed: SQLModel query object, not Python exec
        reviews = list(s.exec(select(JobReview)).all())
        entries = read_entries(s)
    engine.dispose()
    assert dataset is not None
    return dataset, jobs, reviews, entries


def _charged(jobs: list[Job]) -> list[str]:
    total = accounting.zero(accounting.FILTER_ORDERS)
    for job in jobs:
        if job.budget_state in ("reserved", "committed"):
            total = accounting.add(total, tuple(json.loads(job.cost_rdp)))
    return accounting.vector_to_json(total)


def _audit_verifies(node_dir: Path, tmp_path: Path) -> bool:
    export = tmp_path / "audit.json"
    assert fedgate(["-d", str(node_dir), "audit", "checkpoint"]) == 0
    assert fedgate(["-d", str(node_dir), "audit", "export", "--out", str(export)]) == 0
    return fedgate(["audit", "verify", str(export), "--node-key", str(node_dir / "node.pub")]) == 0


# ---------------------------------------------------------------------------------------------
# The soak


def _job_template(client: httpx.Client, training_users: int) -> tuple[dict[str, Any], int]:
    """A job of which a handful fit the empty budget (clients_per_round = every training user:
    no subsampling, so the gateway's accounting is cheap), and how many fit."""
    digest = client.post("/v1/models", content=(FIXTURES / "logreg-20x5.json").read_bytes(),
                         headers={"Content-Type": "application/json"}).json()["digest"]
    for rounds in (1, 2, 3, 5, 8, 13, 20, 30, 50):
        job = {"dataset": "demo", "model_digest": digest, "rounds": rounds,
               "clients_per_round": training_users, "noise_multiplier": 10.0, "clip": 1.0,
               "batch_size": 16}
        fit = client.post("/v1/estimate", json=job).json()["jobs_that_fit"]
        if fit <= 8:
            return job, fit
    raise AssertionError("no job size fits the budget a handful of times")


def _check_the_audit_matches_what_clients_saw(seen: list[dict[str, Any]],
                                              entries: list[dict[str, Any]],
                                              jobs: list[Job]) -> None:
    decisions: dict[str, list[dict[str, Any]]] = {}
    by_job: dict[str, list[tuple[str, str | None]]] = {}
    for entry in entries:
        if entry["action"] in ("admit", "deny") and "request_digest" in entry:
            decisions.setdefault(entry["request_digest"], []).append(entry)
        if "job_id" in entry:
            by_job.setdefault(entry["job_id"], []).append((entry["action"], entry.get("decision")))
    job_digests = {job.request_digest for job in jobs}
    for record in seen:
        found = decisions.get(record.get("digest", ""), [])
        if record["status"] == 0:  # no response: decided at most once, unseen
            assert len(found) <= 1, record
            continue
        if record["status"] >= 500:  # failed closed: nothing decided (see _failures_in_logs)
            assert (record["status"], record["slug"]) == (500, "internal-error"), record
            assert not found, record
            continue
        op = record["op"]
        if op in ("submit", "over_budget", "invalid"):
            assert len(found) == 1, (record, found)  # exactly one decision per request
            if record["status"] == 202:
                assert found[0]["action"] == "admit" and found[0]["job_id"] == record["job_id"]
                assert record["body"]["state"] == "pending_review", record
            else:
                assert found[0]["action"] == "deny" and found[0]["reason"] == record["slug"]
        if op == "over_budget":
            assert record["slug"] == "budget-exceeded", record
        if op == "invalid":
            assert record["slug"] == "invalid-request", record
        if op == "bad_signature":  # refused before anything was decided or created
            assert (record["status"], record["slug"]) == (401, "signature-invalid"), record
            assert not found and record["digest"] not in job_digests, record
        if op == "replay":  # refused; the original's one decision (if it got one) stands
            expected = (401, "replayed-nonce") if record["same_gateway"] else (421, "wrong-node")
            assert (record["status"], record["slug"]) == expected, record
            assert len(found) == (0 if record["original"] >= 500 else 1), record
        if op == "cancel":
            status = record["body"]
            assert (record["status"], status["state"], status["budget"]) == (
                200, "failed", "refunded"), record
            assert ("review", status["review"]["state"]) in by_job[record["job_id"]], record
        if op == "status":
            assert record["status"] == 200 and record["body"]["state"] in (
                "pending_review", "failed"), record


def _check_no_overspend(dataset: Dataset, jobs: list[Job], entries: list[dict[str, Any]],
                        fit: int) -> int:
    """Replays reservations in audit order; returns the most ever outstanding."""
    outstanding, most = set(), 0
    for entry in entries:
        if entry["action"] == "admit":
            outstanding.add(entry["job_id"])
        elif entry["action"] == "refund":
            outstanding.remove(entry["job_id"])
        most = max(most, len(outstanding))
    assert most <= fit
    assert json.loads(dataset.spent_rdp) == _charged(jobs)  # exact, order by order
    spent = accounting.vector_from_json(json.loads(dataset.spent_rdp))
    budget = accounting.vector_from_json(json.loads(dataset.filter_budget))
    assert any(s <= b for s, b in zip(spent, budget, strict=True))
    return most


def _failures_in_logs(tmp_path: Path) -> list[str]:
    """The gateways' log lines of unhandled errors (each a 500 that a client saw)."""
    return [line for log in sorted(tmp_path.glob("gateway-*.log"))
            for line in log.read_text().splitlines() if line.startswith("unhandled ")]


def _wait(predicate, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def soak(node_dir: Path, db_url: str, tmp_path: Path, profile: Profile) -> dict[str, Any]:
    config = node_dir / "fedgate.toml"
    config.write_text(config.read_text().replace(
        "expiry_hours = 72", f"expiry_hours = {profile.review_expiry_seconds / 3600:.8f}"))
    (node_dir / "policies" / "policy.csv").write_text(POLICY)
    researchers = [make_researcher(node_dir, f"r{i}") for i in range(profile.clients)]
    steady = make_researcher(node_dir, "steady")
    dataset, _, _, _ = _ledger(db_url)
    empty = dataset.spent_rdp

    gateways: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        with ThreadPoolExecutor(profile.gateways) as starting:
            for started in [starting.submit(start_gateway, node_dir,
                                            log_path=tmp_path / f"gateway-{i}.log")
                            for i in range(profile.gateways)]:
                gateways.append(started.result())
        urls = [url for url, _ in gateways]
        with httpx.Client(base_url=urls[0], auth=SignedRequestAuth(steady), timeout=120) as client:
            job, fit = _job_template(client, dataset.public_users)
            over_budget = {**job, "rounds": 1_000, "noise_multiplier": 1.0}  # fits the time limit
            approved = []
            for _ in range(profile.approved_jobs):
                held = client.post("/v1/jobs", json=job).json()["job_id"]
                assert fedgate(["-d", str(node_dir), "review", "approve", held, "--reason",
                                "soak test"]) == 0
                approved.append(held)
            owner = Owner(node_dir, db_url, interval=2.0)
            owner.start()
            context = multiprocessing.get_context("spawn")
            raw = [key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
                   for key in researchers]
            with context.Pool(profile.clients) as pool:
                results = pool.starmap(client_process, [
                    (urls, raw[i], job, over_budget, profile.seconds, profile.max_ops, i)
                    for i in range(profile.clients)])
            owner.stopped.set()
            owner.join()
            for job_id in approved:  # a real engine job: it must end, and be charged
                _wait(lambda job_id=job_id: client.get(f"/v1/jobs/{job_id}").json()["state"]
                      in ("succeeded", "failed"), timeout=600)
        # Every review still open is closed by the owner or by its deadline.
        owner_errors = owner.errors
        for job_id in [j.id for j in _jobs(db_url) if j.state == "pending_review"]:
            if (error := deny(node_dir, job_id)) is not None:
                owner_errors.append(error)  # the review then expires
        _wait(lambda: all(j.state in ("succeeded", "failed") for j in _jobs(db_url)), timeout=60)
    finally:
        for _, process in gateways:
            stop_gateway(process)

    seen = [record for records in results for record in records]
    dataset, jobs, reviews, entries = _ledger(db_url)
    _check_the_audit_matches_what_clients_saw(seen, entries, jobs)
    most = _check_no_overspend(dataset, jobs, entries, fit)
    assert all(j.state in ("succeeded", "failed") for j in jobs)
    assert all(j.budget_state in ("committed", "refunded") for j in jobs)
    assert all(r.state in ("approved", "denied", "expired", "withdrawn") for r in reviews)
    if not approved:
        assert dataset.spent_rdp == empty  # every reservation refunded, exactly
    for job_id in approved:
        assert next(j for j in jobs if j.id == job_id).budget_state == "committed"
    assert _audit_verifies(node_dir, tmp_path)
    report = {"ops": Counter(r["op"] for r in seen), "statuses": Counter(r["status"] for r in seen),
              "no_response": [r.get("error") for r in seen if r["status"] == 0],
              "reviews": Counter(r.state for r in reviews), "most_outstanding": most, "fit": fit,
              "jobs": len(jobs), "audit_entries": len(entries), "owner_errors": len(owner_errors)}
    print(report)  # shown with -s, and on failure
    lost = sum(r["status"] == 0 for r in seen)
    assert lost <= max(3, len(seen) // 50), f"{lost} of {len(seen)} requests got no response"
    assert _failures_in_logs(tmp_path) == []
    assert [r for r in seen if r["status"] >= 500] == []
    assert owner_errors == []
    return report


@pytest.mark.skipif(PROFILE_NAME != "short", reason="FEDGATE_SOAK selects the long profile")
def test_gateways_sharing_a_node_under_mixed_load_never_overspend_or_lose_an_audit_entry(
    node_dir: Path, db_url: str, tmp_path: Path
) -> None:
    report = soak(node_dir, db_url, tmp_path, PROFILES["short"])
    assert report["ops"]["submit"] > 0 and report["ops"]["cancel"] > 0
    assert report["reviews"]["denied"] + report["reviews"]["expired"] > 0


@pytest.mark.tff
@pytest.mark.skipif(PROFILE_NAME != "long", reason="the long soak runs with FEDGATE_SOAK=long "
                                                   "(make soak)")
def test_long_soak_with_one_approved_training_job(node_dir: Path, db_url: str,
                                                   tmp_path: Path) -> None:
    report = soak(node_dir, db_url, tmp_path, PROFILES["long"])
    assert report["most_outstanding"] == report["fit"]  # the filter was filled, never overfilled
