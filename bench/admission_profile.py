"""Where one signed admission's CPU goes: ``python -m bench.admission_profile [N]``.

Builds the gateway benchmark's node (``bench.gateway.build_node``: 10,000 policy rows, 1,000
principals, 10,000 prior jobs, every job held for review) on SQLite, then sends ``N`` (300)
signed ``POST /v1/jobs`` one after another, after as many unprofiled ones from the same keys
(twice: a warm-up, then a run timed without the profiler),
to the Starlette app in this process (httpx's
ASGI transport, no sockets) under cProfile. Admission runs on the event loop's thread
(``ledger.suspend``); so that one profiler sees all the work, the ledger writer commits each
request in that thread too (``GroupCommitter._commit`` of a batch of one: the same savepoint,
transaction and commit).
Prints the CPU ms per request of a run without the profiler and the function calls per
request of the profiled run, then of the profiled run the
stages of admission (cumulative ms per request; stages nest, so
they do not add up), then the functions by cumulative time.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import pstats
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.gateway import JOB, build_node, signed_requests
from engine.artifact import linear_classifier_artifact
from gateway.api.app import create_app
from ledger.canonical import canonical_json, sha256_digest
from ledger.group_commit import GroupCommitter, _Request

ORIGIN = "http://127.0.0.1:8000"
STAGES = {  # (module path suffix, function name): what it is
    ("gateway/api/middleware.py", "_authenticate"): "authenticate (signature, key, nonce)",
    ("gateway/api/signatures.py", "verify_signature"): "  verify the signature",
    ("gateway/node/node.py", "lookup_key"): "    key lookup",
    ("gateway/api/middleware.py", "record"): "  record the nonce (writer work)",
    ("gateway/api/app.py", "submit_job"): "submit_job (route)",
    ("gateway/node/admission.py", "admit"): "  admit",
    ("gateway/node/node.py", "policy"): "    Node.policy (version check)",
    ("gateway/node/admission.py", "decide_policy"): "    decide_policy",
    ("gateway/node/admission.py", "epsilon_spent"): "      researcher ε sum",
    ("gateway/node/admission.py", "check_model"): "    check_model",
    ("gateway/node/admission.py", "project_cost"): "    project_cost",
    ("gateway/node/admission.py", "reserve"): "    reserve (writer work)",
    ("ledger/budget.py", "reserve_budget"): "      reserve_budget",
    ("ledger/audit.py", "append_entry"): "      append_entry (every call)",
    ("ledger/review.py", "open_review"): "      open_review",
    ("gateway/api/app.py", "_status_document"): "  _status_document (the 202 body)",
    ("ledger/group_commit.py", "_commit"): "writer transactions (all)",
    ("~", "<method 'commit' of 'sqlite3.Connection' objects>"): "  sqlite3 commit (fsync)",
}


def _inline_writer(writer: GroupCommitter) -> None:
    def run(request: _Request) -> Any:
        writer._commit([request])
        return request.done.result()
    writer._run = run  # type: ignore[method-assign]


async def _send(app: Any, requests: list[dict[str, Any]]) -> list[int]:
    transport = httpx.ASGITransport(app=app)
    statuses = []
    async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as client:
        for request in requests:
            response = await client.post("/v1/jobs", content=request["body"],
                                         headers=request["headers"])
            statuses.append(response.status_code)
    return statuses


@dataclass(frozen=True)
class AdmissionProfile:
    """CPU ms per admission (unprofiled), Python function calls per admission (profiled: the
    same on every machine, a steadier measure of work than time on a shared one), the report."""

    cpu_ms: float
    calls: float
    report: str


def profile(count: int) -> AdmissionProfile:
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        root = scratch / "node"
        researcher_keys, _ = build_node(root, scratch)
        artifact = canonical_json(linear_classifier_artifact(num_features=20, num_classes=5))
        digest = sha256_digest(artifact)
        models = root / "models"
        models.mkdir(exist_ok=True)
        (models / (digest.removeprefix("sha256:") + ".json")).write_bytes(artifact)
        app = create_app(root)
        node = app.state.node
        _inline_writer(node.writer)
        job = {**JOB, "model_digest": digest}
        # The warm-up submits once with every key the profile uses, as the benchmark's later
        # runs find them: keys and running ε totals are then in the caches that keep them.
        warmup = signed_requests(ORIGIN, researcher_keys, job, count)["requests"]
        measured = signed_requests(ORIGIN, researcher_keys, job, count)["requests"]
        assert set(asyncio.run(_send(app, warmup))) == {202}
        timed = signed_requests(ORIGIN, researcher_keys, job, count)["requests"]
        # CPU time of this process, unprofiled: what admission is short of under load, and
        # less disturbed than wall time by the other work of a shared machine.
        started = time.process_time()
        statuses = asyncio.run(_send(app, timed))
        cpu = time.process_time() - started
        profiler = cProfile.Profile()
        profiler.enable()
        statuses += asyncio.run(_send(app, measured))
        profiler.disable()
        node.dispose()
    assert set(statuses) == {202}, statuses
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    cumulative = {(path, name): 0.0 for path, name in STAGES}
    for (path, _, name), (_, _, _, total, _) in stats.stats.items():  # type: ignore[attr-defined]
        for suffix, stage in STAGES:
            if name == stage and path.endswith(suffix):
                cumulative[suffix, stage] += total
    for key, label in STAGES.items():
        print(f"{label:<45} {cumulative[key] / count * 1e3:6.2f} ms", file=out)
    stats.sort_stats("cumulative").print_stats(60)
    calls = stats.total_calls / count  # type: ignore[attr-defined]
    return AdmissionProfile(
        cpu / count * 1e3, calls,
        f"{count} admissions: {cpu / count * 1e3:.1f} ms of CPU per request (unprofiled); "
        f"{calls:,.0f} function calls per request (profiled)\n" + out.getvalue())


if __name__ == "__main__":
    print(profile(int(sys.argv[1]) if len(sys.argv) > 1 else 300).report)
