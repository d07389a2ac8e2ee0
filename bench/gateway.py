"""Gateway admission throughput and latency over real HTTP, versus a bare Starlette endpoint.

Set-up (SQLite ledger, WAL, synchronous=FULL — the default deployment): 1,000 registered
researcher keys in 100 groups (nested three levels), a 10,000-row policy (the generator of
``bench.policy``: grants, denials and constraint rows on other datasets, plus the rows that
apply here) and 10,000 prior jobs on the benchmark dataset (committed, spread over the
1,000 researchers and the last 30 days; the ``max_epsilon_per_researcher`` row makes every
decision sum the requester's ε over them).

Each request is a real ``POST /v1/jobs`` signed by one of the 1,000 keys (RFC 9421, Ed25519,
fresh nonce; signed before the clock starts), served by ``fedgate serve`` (uvicorn) on
loopback: body limit → signature verification, key lookup and nonce record → Casbin policy
decision (which, for the ``max_epsilon_per_researcher`` row, sums the researcher's ε over
the prior jobs) → model check and cost projection → budget reservation under the dataset
lock with the ``admit`` audit entry, in one transaction → 202 with the job's status.

Why held for review: an admitted job normally starts an engine process (TensorFlow
Federated, ~10 s of imports each), which would measure the engine, not admission. The
policy holds every job on the benchmark dataset for the owner's review
(``require_review, always``), so each request runs the whole admission path — policy,
privacy filter, reservation, audit — and the job then waits in ``pending_review`` with its
budget reserved. This costs one more row and one more audit entry (``review requested``) in
the same transaction than a job that starts at once: if anything, it overstates admission.

Two jobs are measured: the benchmark's (10 rounds of 20 users out of ~480, subsampled —
its privacy accounting is numerical and costs hundreds of ms of CPU), and the same job with
every training user in every round (no subsampling: the accounting is closed-form, ~1 ms),
which shows what the rest of the admission path costs.

The baseline is ``bench.bare_server`` — a Starlette route that returns 204 without reading
anything — served by the same ``uvicorn.run`` call, sent the same signed requests by the same
load generator (``bench.loadgen``, a separate process: a few threads with one keep-alive
httpx connection each), bounded by a request count and a time limit.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, func, insert, text
from sqlmodel import select

from bench import policy as policy_bench
from engine.artifact import linear_classifier_artifact
from engine.datastore import generate_synthetic
from gateway.cli import main as fedgate
from gateway.cli.process import free_port, start_gateway, stop_gateway
from gateway.node.admission import JobRequest, project_cost
from gateway.node.deployment import init_deployment
from gateway.node.node import Node
from gateway.sdk.request_signing import SignedRequestAuth, signature_headers
from ledger import accounting, keys
from ledger.audit import audit_size
from ledger.budget import filter_orders
from ledger.canonical import canonical_json
from ledger.db import DATABASE_URL_ENV, database_reachable
from ledger.models import Dataset, Job
from ledger.registry import add_principal

OWNER = "clinic"  # the domain of bench.policy's rows
DATASET = "bench"
PRINCIPALS = policy_bench.PRINCIPALS
POLICY_ROWS = 10_000
PRIOR_JOBS = 10_000
JOB = {"dataset": DATASET, "rounds": 10, "clients_per_round": 20, "noise_multiplier": 1.0,
       "clip": 1.0}
CONCURRENCIES = (4, 32)
WARMUP = 10
GATEWAY_REQUESTS = 1_000
GATEWAY_SECONDS = {"sampled": 45.0, "every_user": 30.0}
BARE_REQUESTS, BARE_SECONDS = 10_000, 10.0
PROFILED_REQUESTS = 200
SIGNATURE_VALIDITY_SECONDS = 290  # within the gateway's 300 s window
POSTGRES_URL = os.environ.get("FEDGATE_BENCH_POSTGRES_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def policy_csv(rng: random.Random) -> str:
    """``POLICY_ROWS`` rows: bench.policy's policy without its business-hours window (the
    benchmark runs at any hour), the group tree, and the rows for the benchmark dataset."""
    own = [f"p2, staff, {OWNER}, {DATASET}, train, require_review, always",
           f"p2, staff, {OWNER}, {DATASET}, train, max_epsilon_per_researcher, 1000000 per 30d"]
    groups = [f"g, {member}, {group}, {OWNER}" for member, group, _ in _group_tree()]
    generated = policy_bench.policy_text(POLICY_ROWS - len(own) - len(groups) + 1, rng)
    rows = [row for row in generated.splitlines()
            if not row.startswith("p2, staff, clinic, *, *, allowed_times")]
    rows = [*rows, *own, *groups]
    assert len(rows) == POLICY_ROWS
    return "\n".join(rows) + "\n"


def _group_tree() -> list[tuple[str, str, str]]:
    """bench.policy's memberships above the principals: group → division → staff."""
    return [m for m in policy_bench.memberships() if not m[0].startswith("user")]


def build_node(root: Path, scratch: Path) -> tuple[list[Ed25519PrivateKey], int]:
    """Initialise the deployment; returns the researchers' keys and the audit log size."""
    init_deployment(root, owner=OWNER)
    table = generate_synthetic(scratch / "users.parquet", users=600, features=20, classes=5,
                               seed=7)
    with contextlib.redirect_stdout(io.StringIO()):
        assert fedgate(["-d", str(root), "dataset", "import", DATASET, str(table),
                        "--user-column", "user_id", "--label-column", "label",
                        "--epsilon-total", "1000000", "--delta", "1e-6", "--force"]) == 0
    (root / "policies" / "policy.csv").write_text(policy_csv(random.Random(POLICY_ROWS)))
    node = Node(root)
    researcher_keys = [keys.generate_private_key() for _ in range(PRINCIPALS)]
    with node.session() as s, s.begin():
        for i, key in enumerate(researcher_keys):
            public = key.public_key()
            add_principal(s, name=f"user{i}", role="researcher", key_id=keys.key_id(public),
                          public_key_b64=keys.public_key_b64(public),
                          group=f"group{i % policy_bench.GROUPS}", actor="owner-cli")
    _add_prior_jobs(node, researcher_keys)
    with node.session() as s:
        size = audit_size(s)
    node.engine.dispose()
    return researcher_keys, size


def _add_prior_jobs(node: Node, researcher_keys: list[Ed25519PrivateKey]) -> None:
    """``PRIOR_JOBS`` committed jobs like the benchmark's (the audit log's size does not
    matter to admission: an append is O(1), see the audit section)."""
    rng = random.Random(PRIOR_JOBS)
    request = JobRequest.from_json({**JOB, "model_digest": "sha256:" + "1" * 64})
    spec = canonical_json(request.spec()).decode()
    with node.session() as s, s.begin():
        dataset = s.get(Dataset, DATASET)
        assert dataset is not None
        projection = project_cost(node, dataset, request)
        now = time.time()
        rows = []
        for i in range(PRIOR_JOBS):
            researcher = i % PRINCIPALS
            created = now - rng.uniform(0, 30 * 86400)
            rows.append({
                "id": "job-" + uuid.uuid4().hex[:16], "dataset": DATASET,
                "researcher_key_id": keys.key_id(researcher_keys[researcher].public_key()),
                "researcher": f"user{researcher}", "request_digest": "sha256:" + "2" * 64,
                "model_digest": request.model_digest, "spec": spec,
                "cost": json.dumps(projection.cost.to_json()),
                "cost_rdp": json.dumps(list(projection.cost_rdp)), "epsilon": projection.epsilon,
                "delta": projection.delta, "state": "succeeded", "budget_state": "committed",
                "data_accessed": True, "round": request.rounds, "rounds": request.rounds,
                "policy_version": "prior", "created_at": created, "updated_at": created,
            })
        s.execute(insert(Job), rows)
        # PRIOR_JOBS charges of one job, exactly as that many reservations would add up.
        spent = accounting.vector_from_json(json.loads(dataset.spent_rdp))
        charge = accounting.add(accounting.zero(filter_orders(dataset)), projection.cost_rdp)
        spent = tuple(x + PRIOR_JOBS * c for x, c in zip(spent, charge, strict=True))
        dataset.spent_rdp = json.dumps(accounting.vector_to_json(spent))
        s.add(dataset)


def accounting_cost_ms(root: Path, job: dict[str, Any], repeats: int = 5) -> float:
    """Median in-process time (ms) of one ``project_cost`` for ``job``."""
    node = Node(root)
    with node.session() as s:
        dataset = s.get(Dataset, DATASET)
    node.engine.dispose()
    assert dataset is not None
    request = JobRequest.from_json({**job, "model_digest": "sha256:" + "1" * 64})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        project_cost(node, dataset, request)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def upload_model(url: str, key: Ed25519PrivateKey) -> str:
    body = canonical_json(linear_classifier_artifact(num_features=20, num_classes=5))
    with httpx.Client(base_url=url, auth=SignedRequestAuth(key), timeout=30) as client:
        response = client.post("/v1/models", content=body,
                               headers={"Content-Type": "application/json"})
    response.raise_for_status()
    return str(response.json()["digest"])


def signed_requests(url: str, researcher_keys: list[Ed25519PrivateKey], job: dict[str, Any],
                    count: int) -> dict[str, Any]:
    """``count`` submissions of ``job``, each signed by the next of the keys (fresh nonces)."""
    target = url + "/v1/jobs"
    body = json.dumps(job)
    requests = []
    for i in range(count):
        headers = signature_headers(private_key=researcher_keys[i % len(researcher_keys)],
                                    method="POST", url=target, body=body.encode(),
                                    content_type="application/json",
                                    validity_seconds=SIGNATURE_VALIDITY_SECONDS)
        requests.append({"headers": headers, "body": body})
    return {"url": target, "requests": requests}


def load(requests: dict[str, Any], url: str, *, count: int, seconds: float, concurrency: int,
         scratch: Path) -> dict[str, Any]:
    """Run ``bench.loadgen`` in its own process against ``url`` (a path of the server)."""
    path = scratch / f"requests-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps({**requests, "url": url}))
    # A fixed argv of this interpreter, no shell.
    output = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", str(path), "--count", str(count),
         "--max-seconds", str(seconds), "--concurrency", str(concurrency),
         "--warmup", str(WARMUP)],
        check=True, capture_output=True, text=True, timeout=seconds + 120,
    ).stdout
    result = json.loads(output)
    latencies = sorted(result["latencies"])
    return {"completed": result["completed"], "elapsed": result["elapsed"],
            "throughput": result["completed"] / result["elapsed"],
            "p50_ms": statistics.median(latencies) * 1e3,
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3,
            "statuses": result["statuses"]}


@contextlib.contextmanager
def bare_server(log_path: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("ab") as log:
        # A fixed argv of this interpreter, no shell.
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.bare_server", str(port)], stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the bare server did not start")
            time.sleep(0.2)
        yield url
    finally:
        stop_gateway(process)


@contextlib.contextmanager
def ledger_database(ledger: str):  # type: ignore[no-untyped-def]
    """The node's database for ``ledger``: SQLite in the deployment directory (yields None), or
    a fresh schema of the PostgreSQL server at ``POSTGRES_URL`` (yields its URL, set in
    ``FEDGATE_DATABASE_URL`` for the CLI and the gateway process), dropped afterwards."""
    if ledger == "SQLite":
        yield None
        return
    schema = "fg_bench_" + uuid.uuid4().hex[:8]
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))  # a generated name, not input
    url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    previous = os.environ.get(DATABASE_URL_ENV)
    os.environ[DATABASE_URL_ENV] = url
    try:
        yield url
    finally:
        if previous is None:
            os.environ.pop(DATABASE_URL_ENV)
        else:
            os.environ[DATABASE_URL_ENV] = previous
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def postgres_available() -> bool:
    return database_reachable(POSTGRES_URL)


def measure_ledger(ledger: str, bare_url: str) -> dict[str, Any]:
    """Admission on a new node whose ledger is ``ledger``, at every concurrency, both jobs;
    the bare endpoint at ``bare_url`` is measured with the same requests just before each
    concurrency's admission runs, so that each ratio compares runs minutes apart at most on a
    machine whose load changes."""
    with tempfile.TemporaryDirectory() as tmp, ledger_database(ledger):
        scratch = Path(tmp)
        root = scratch / "node"
        started = time.perf_counter()
        researcher_keys, audit_before = build_node(root, scratch)
        setup_seconds = time.perf_counter() - started
        node = Node(root)
        with node.session() as s:
            dataset = s.get(Dataset, DATASET)
        node.dispose()
        assert dataset is not None
        # The benchmark's job (20 users a round), and the same job with every training user in
        # every round: no subsampling, so its privacy accounting is closed-form and cheap.
        jobs = {"sampled": JOB, "every_user": {**JOB, "clients_per_round": dataset.public_users}}
        accounting_ms = {name: accounting_cost_ms(root, job) for name, job in jobs.items()}
        url, process = start_gateway(root, log_path=scratch / "gateway.log")
        gateway: dict[tuple[str, int], dict[str, Any]] = {}
        bare: dict[int, dict[str, Any]] = {}
        try:
            digest = upload_model(url, researcher_keys[0])
            for concurrency in CONCURRENCIES:
                baseline = signed_requests(url, researcher_keys, {**JOB, "model_digest": digest},
                                           WARMUP + GATEWAY_REQUESTS)
                bare[concurrency] = load(baseline, bare_url + "/v1/jobs", count=BARE_REQUESTS,
                                         seconds=BARE_SECONDS, concurrency=concurrency,
                                         scratch=scratch)
                for name, job in jobs.items():
                    # Signed just before their run: every signature is still in its window.
                    requests = signed_requests(url, researcher_keys,
                                               {**job, "model_digest": digest},
                                               WARMUP + GATEWAY_REQUESTS)
                    gateway[name, concurrency] = load(
                        requests, url + "/v1/jobs", count=GATEWAY_REQUESTS,
                        seconds=GATEWAY_SECONDS[name], concurrency=concurrency, scratch=scratch)
        finally:
            stop_gateway(process)
        node = Node(root)
        with node.session() as s:
            audit_after = audit_size(s)
            held = s.exec(select(func.count()).select_from(Job)  # reviewed: ORM query, not exec
                          .where(Job.state == "pending_review")).one()
        node.dispose()
    return {"gateway": gateway, "bare": bare, "setup_seconds": setup_seconds,
            "accounting_ms": accounting_ms, "training_users": dataset.public_users,
            "audit_entries": audit_after - audit_before, "held": int(held)}


def measure() -> dict[str, Any]:
    ledgers = ["SQLite", *(["PostgreSQL"] if postgres_available() else [])]
    with tempfile.TemporaryDirectory() as tmp, bare_server(Path(tmp) / "bare.log") as bare_url:
        measured = {ledger: measure_ledger(ledger, bare_url) for ledger in ledgers}
    # The same admissions in this process, without sockets or load generator: CPU per request.
    from bench import admission_profile  # it builds its node with this module's helpers

    measured["SQLite"]["profile"] = admission_profile.profile(PROFILED_REQUESTS)
    return measured


def _against_targets(measured: dict[str, Any], concurrency: int) -> str:
    """Whether the benchmark job's admission met #26's throughput and p99 targets."""
    floor, row = measured["bare"][concurrency], measured["gateway"]["sampled", concurrency]
    throughput = row["throughput"] / floor["throughput"]
    p99 = row["p99_ms"] / floor["p99_ms"]
    return (f"{concurrency} connections {throughput:.3f}× "
            f"({'met' if throughput >= 0.30 else 'not met'}), p99 {p99:.1f}× "
            f"({'met' if p99 <= 10 else 'not met'})")


def _cpu_bound(sqlite: dict[str, Any]) -> str:
    """The in-process CPU per admission and the throughput one core allows with it."""
    profile = sqlite["profile"]  # bench.admission_profile.AdmissionProfile
    fastest_bare = max(row["throughput"] for row in sqlite["bare"].values())
    return (
        f"CPU per admission, in-process (`bench.admission_profile`, the same node, "
        f"{PROFILED_REQUESTS} admissions through the ASGI app without sockets or load "
        f"generator, after this run): {profile.cpu_ms:.1f} ms, {profile.calls:,.0f} Python "
        f"function calls (both include httpx's client side of each request). Admission "
        f"holds the GIL for its Python work, so one process admits at "
        f"most {1e3 / profile.cpu_ms:,.0f} req/s = {1e3 / profile.cpu_ms / fastest_bare:.2f}× "
        f"the bare endpoint's fastest run above ({fastest_bare:,.0f} req/s), before uvicorn's "
        f"HTTP work and the hand-off to the ledger writer; 0.30× of it needs ≤ "
        f"{1e3 / (0.30 * fastest_bare):.1f} ms of CPU per admission.")


def run() -> str:
    ledgers = measure()
    sqlite = ledgers["SQLite"]
    users = sqlite["training_users"]
    lines = [
        "## Gateway admission over HTTP",
        "",
        f"`python -m bench.run gateway` — signed `POST /v1/jobs` → signature and nonce → "
        f"policy ({POLICY_ROWS:,} rows, {PRINCIPALS:,} principals) → privacy filter and "
        f"reservation ({PRIOR_JOBS:,} prior jobs) → audit append, on `fedgate serve` (uvicorn) "
        "over loopback, with the ledger on SQLite (WAL, synchronous=FULL) and, when the server "
        "at 127.0.0.1:5432 answers, on PostgreSQL (a fresh schema; same machine); load from a "
        f"separate process ({' and '.join(map(str, CONCURRENCIES))} connections, requests "
        f"signed in advance, {WARMUP} warm-up requests not counted; at most "
        f"{GATEWAY_REQUESTS:,} requests or {GATEWAY_SECONDS['sampled']:.0f} s / "
        f"{GATEWAY_SECONDS['every_user']:.0f} s). "
        "Baseline: a bare Starlette endpoint returning 204, same uvicorn settings, same "
        "requests and load generator, at the same number of connections, measured just "
        "before the admission rows below it; ratios are against it (#26 asks for at least "
        "0.30× its throughput and at most 10× its p99 on SQLite). "
        "Every admitted job is held for the owner's review "
        "(`require_review, always`), so no engine starts: each request runs the whole "
        "admission path, with one more audit entry (`review requested`) than a job that "
        "starts at once (see `bench/gateway.py`). Two jobs: 10 rounds of 20 of the dataset's "
        f"{users} training users (subsampled), and the same with all {users} users every "
        "round (no subsampling: closed-form accounting).",
        "",
        "| endpoint | ledger | connections | requests | throughput (req/s) | ratio | p50 (ms) | "
        "ratio | p99 (ms) | ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for ledger, measured in ledgers.items():
        for concurrency in CONCURRENCIES:
            floor = measured["bare"][concurrency]
            gateway = measured["gateway"]
            rows = [("bare Starlette (baseline)", "", floor),
                    (f"admission, 20 of {users} users a round", ledger,
                     gateway["sampled", concurrency]),
                    (f"admission, all {users} users every round", ledger,
                     gateway["every_user", concurrency])]
            for name, ledger_name, row in rows:
                lines.append(
                    f"| {name} | {ledger_name} | {concurrency} | {row['completed']:,} | "
                    f"{row['throughput']:,.1f} | {row['throughput'] / floor['throughput']:.3f}× | "
                    f"{row['p50_ms']:.1f} | {row['p50_ms'] / floor['p50_ms']:.1f}× | "
                    f"{row['p99_ms']:.1f} | {row['p99_ms'] / floor['p99_ms']:.1f}× |")
    outcomes = []
    for ledger, measured in ledgers.items():
        statuses = Counter[str]()
        for row in measured["gateway"].values():
            statuses.update(row["statuses"])
        outcomes.append(
            f"{ledger}: HTTP statuses {', '.join(f'{k}: {v:,}' for k, v in sorted(statuses.items()))}"
            f", {measured['held']:,} jobs held for review at the end (warm-up included), "
            f"{measured['audit_entries']:,} audit entries appended, set-up (keys, policy, prior "
            f"jobs) {measured['setup_seconds']:.0f} s")
    if "PostgreSQL" not in ledgers:
        outcomes.append("PostgreSQL: not measured (no server at 127.0.0.1:5432)")
    lines += [
        "",
        "Outcome (202 = admitted, budget reserved; `admit` and `review requested` entries per "
        "job): " + "; ".join(outcomes) + ".",
        "",
        f"Where the time goes: the privacy accounting of one request (`project_cost`: the "
        f"job's ε over dp-accounting's default orders and its RDP vector at the filter's "
        f"orders) takes {sqlite['accounting_ms']['sampled']:.3f} ms in-process for the "
        f"subsampled job and {sqlite['accounting_ms']['every_user']:.3f} ms without "
        "subsampling, memoised on the request's public parameters; admission computes it once "
        "per request (a matching constraint that reads ε, here `max_epsilon_per_researcher`, "
        "and the reservation share it). "
        "Signature check and admission run on the event loop (`ledger/suspend.py`); each "
        "request's nonce, its reservation, review, compute reservation and audit entries are "
        "one work of the gateway's single ledger writer thread, fixed statements in one "
        "savepoint, and the writer commits all the works waiting at that moment together "
        "(group commit, `ledger/group_commit.py`); every 202 leaves after its commit. "
        "`python -m bench.admission_profile` shows where an admission's CPU goes.",
        "",
        _cpu_bound(sqlite),
        "",
        "Against #26's targets on SQLite (throughput ≥ 0.30× and p99 ≤ 10× the bare endpoint's, "
        "benchmark job): " + "; ".join(_against_targets(sqlite, c) for c in CONCURRENCIES) + ".",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run())
