"""The gateway's ASGI application: routes wired to admission, jobs and the ledger.

Handlers are thin: parse → call the pure-ish service function → respond. Every error
is a ``Problem`` rendered as RFC 9457 problem+json; any unexpected exception becomes a
generic ``internal-error`` (fail closed, no details leak).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.artifact import ModelRejected, artifact_digest, parse_artifact, validate_artifact_structure
from engine.datastore import load_schema
from engine.mock import MOCK_FILE
from gateway.api import access_log, audit
from gateway.api.json_body import RequestJsonInvalid, parse_request_json
from gateway.api.middleware import request_middleware
from gateway.api.openapi import openapi_document
from gateway.api.problems import problem_response
from gateway.dashboard.routes import Dashboard, page_refusal
from gateway.node.admission import JobRequest, admit, calibrate_job, estimate_job, not_visible
from gateway.node.decision_log import log_admitted, log_refused
from gateway.node.identity import VerifiedRequest
from gateway.node.jobs import JobRunner, recover_interrupted_jobs
from gateway.node.node import Node
from gateway.node.nonces import PendingNonce, run_recording
from gateway.node.output_policy import fetch_release
from gateway.node.planning import plan_job
from gateway.node.review import review_status, review_watch
from gateway.protocol.job_states import RESEARCHER_CANCELLED
from gateway.protocol.node_document import NodeDocument, sign_node_document
from gateway.protocol.problems import Problem
from ledger.accounting import JobCost
from ledger.audit import append_entry
from ledger.budget import budget_fit
from ledger.burndown import dataset_filter_usage
from ledger.canonical import sha256_digest
from ledger.models import Dataset, Job, JobReview, ModelArtifact
from ledger.review import withdraw_review
from ledger.states import CHARGED_BUDGET_STATES, HELD_JOB_STATES, JobState
from ledger.suspend import run_suspending

log = logging.getLogger("fedgate.gateway")


def _principal(request: Request) -> VerifiedRequest:
    return request.scope["fedgate.principal"]


def _json_body(request: Request) -> Any:
    """The body parsed by the strict parser (``gateway.api.json_body``): depth, duplicate keys,
    non-finite numbers and encoding refused as ``invalid-request``."""
    try:
        return parse_request_json(request.scope.get("fedgate.body", b""))
    except RequestJsonInvalid as error:
        raise Problem("invalid-request", str(error)) from None


async def _parsed(request: Request, action: str, parse: Callable[[Any], Any]) -> Any:
    """``parse(body)``; a refusal (malformed JSON or parameters) is audited as a ``deny`` of
    ``action`` before it is returned."""
    try:
        return parse(_json_body(request))
    except Problem as problem:
        await run_suspending(_audit_invalid_request, request.app.state.node,
                             _principal(request), problem,
                             sha256_digest(request.scope.get("fedgate.body", b"")), action,
                             request.scope.get("fedgate.nonce"))
        raise


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


async def node_document(request: Request) -> Response:
    """The node's key id, public key and owner, signed by the node key
    (``gateway.protocol.node_document``): a client checks it against the node key it was
    given before it submits anything. Public: it names only public facts."""
    node: Node = request.app.state.node
    document = NodeDocument.for_key(node.node_key.public_key(), node.config.owner)
    return JSONResponse(sign_node_document(document, node.node_key))


def _budget_used(dataset: Dataset) -> float:
    """Privacy-filter usage at its best order (1.0 = nothing more fits), rounded."""
    return round(min(dataset_filter_usage(dataset).fraction, 1.0), 4)


async def list_datasets(request: Request) -> Response:
    node: Node = request.app.state.node
    principal = _principal(request)

    def visible() -> list[dict[str, Any]]:
        policy = node.policy()
        with node.session() as s:
            rows = s.exec(select(Dataset).order_by(Dataset.name)).all()  # reviewed: ORM query, not exec
            last = {job.dataset: job for job in s.exec(  # reviewed: ORM query, not exec
                select(Job).where(Job.researcher == principal.principal,
                                  col(Job.budget_state).in_(CHARGED_BUDGET_STATES))
                .order_by(col(Job.created_at))).all()}
        return [
            {
                "name": d.name,
                **_columns(d),
                "num_features": d.num_features,
                "num_classes": d.num_classes,
                "public_users": d.public_users,
                "public_users_source": d.public_users_source,
                "max_examples_per_user": d.max_examples_per_user,
                "epsilon_total": d.epsilon_total,
                "delta": d.delta,
                "budget_used": _budget_used(d),
                "more_like_your_last_job": _more_like(d, last.get(d.name)),
            }
            for d in rows
            if policy.decide(subject=principal.principal, domain=node.config.owner,
                             dataset=d.name, action="estimate").allowed
        ]

    return JSONResponse({"datasets": await run_in_threadpool(visible)})


def _more_like(dataset: Dataset, job: Job | None) -> dict[str, Any] | None:
    """How many more copies of the researcher's own last admitted job on ``dataset`` its filter
    would admit now (what ``POST /v1/estimate`` answers as ``jobs_that_fit`` for that job: a
    function of public charges only); None before their first job there."""
    if job is None:
        return None
    return {"job_id": job.id,
            "jobs_that_fit": budget_fit(dataset, tuple(json.loads(job.cost_rdp))).jobs_that_fit}


def _columns(dataset: Dataset) -> dict[str, Any]:
    """The dataset's column names (public: its mock data has the same columns), so a
    researcher can import the mock exactly as the owner imported the data."""
    schema = load_schema(Path(dataset.path))
    return {"user_id_column": schema.user_id_column, "label_column": schema.label_column,
            "feature_columns": list(schema.feature_columns)}


async def dataset_mock(request: Request) -> Response:
    """The dataset's public mock data (Parquet): same schema, synthetic values."""
    node: Node = request.app.state.node
    principal = _principal(request)
    name = request.path_params["name"]

    def read() -> bytes:
        with node.session() as s:
            dataset = s.get(Dataset, name)
        decision = node.policy().decide(subject=principal.principal, domain=node.config.owner,
                                        dataset=name, action="estimate")
        if dataset is None or not decision.allowed:
            raise not_visible(name)
        path = Path(dataset.path) / MOCK_FILE
        if not path.exists():
            raise Problem("not-found", f"dataset {name} has no mock data")
        return path.read_bytes()

    body = await run_in_threadpool(read)
    return Response(body, media_type="application/vnd.apache.parquet")


async def upload_model(request: Request) -> Response:
    node: Node = request.app.state.node
    principal = _principal(request)
    body: bytes = request.scope.get("fedgate.body", b"")
    digest = artifact_digest(body)

    def store() -> None:
        try:
            validate_artifact_structure(parse_artifact(body))
        except (ValueError, ModelRejected) as exc:
            raise Problem("model-rejected", str(exc)) from None
        path = node.deployment.models_dir / (digest.removeprefix("sha256:") + ".json")
        if not path.exists():  # a temporary name per upload: concurrent uploads may race here
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
            tmp.write_bytes(body)
            tmp.replace(path)
        # Content-addressed, so a concurrent upload of the same bytes that recorded it first
        # is the same outcome.
        with contextlib.suppress(IntegrityError), node.session() as s, s.begin():
            if s.get(ModelArtifact, digest) is None:
                s.add(ModelArtifact(digest=digest, size=len(body), uploaded_by=principal.key_id,
                                    created_at=time.time()))

    await run_in_threadpool(store)
    return JSONResponse({"digest": digest, "size": len(body)}, status_code=201)


async def estimate(request: Request) -> Response:
    node: Node = request.app.state.node
    job_request = await _parsed(request, "estimate",
                                lambda body: JobRequest.from_json(body, needs_model=False))
    result = await run_in_threadpool(estimate_job, node, _principal(request), job_request)
    return JSONResponse(result)


async def calibrate(request: Request) -> Response:
    node: Node = request.app.state.node
    body = await _parsed(request, "calibrate", lambda body: body)
    result = await run_in_threadpool(calibrate_job, node, _principal(request), body)
    return JSONResponse(result)


async def plan(request: Request) -> Response:
    node: Node = request.app.state.node
    body = await _parsed(request, "plan", lambda body: body)
    result = await run_in_threadpool(plan_job, node, _principal(request), body)
    return JSONResponse(result)


def _audit_invalid_request(node: Node, principal: VerifiedRequest, problem: Problem,
                           request_digest: str, action: str = "train",
                           nonce: PendingNonce | None = None) -> None:
    """The ``deny`` entry of a request that did not parse, written with the request's pending
    nonce (``gateway.node.nonces``): a replay raises ``replayed-nonce`` and audits nothing."""
    run_recording(nonce, node.writer, lambda s: append_entry(
        s, action="deny", decision="deny", reason=problem.slug, explanation=problem.detail,
        actor=principal.key_id, principal=principal.principal, request_action=action,
        request_digest=request_digest))


async def submit_job(request: Request) -> Response:
    node: Node = request.app.state.node
    principal = _principal(request)
    request_digest = sha256_digest(request.scope.get("fedgate.body", b""))
    job_request: JobRequest | None = None
    try:  # the refusal's deny entry is already in the audit log when the Problem arrives
        job_request = await _parsed(request, "train", JobRequest.from_json)
        job, status = await run_suspending(_admit, node, principal, job_request,
                                           request_digest, request.scope.get("fedgate.nonce"))
    except Problem as refusal:
        if refusal.slug != "replayed-nonce":  # a replay decides no job
            log_refused(principal, job_request.dataset if job_request else None, refusal)
        raise
    log_admitted(job)
    if job.state == JobState.QUEUED:
        request.app.state.runner.start(job)
    status = _with_queue_position(request, status)
    return JSONResponse(status, status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


def _admit(node: Node, principal: VerifiedRequest, job_request: JobRequest,
           request_digest: str, nonce: PendingNonce | None) -> tuple[Job, dict[str, Any]]:
    """Admission and the admitted job's status in one trip to the thread pool (starting the
    job does not change the status it reports). A new job's status is built from what its
    admission wrote; a job an earlier request admitted (same idempotency key) is read."""
    admitted = admit(node, principal, job_request, request_digest, nonce=nonce)
    if not admitted.new:
        return admitted.job, _job_status(node, admitted.job)
    return admitted.job, _status_document(admitted.job, admitted.review)


def _with_queue_position(request: Request, status: dict[str, Any]) -> dict[str, Any]:
    """``status`` with ``queue_position`` (1 = starts next) while the job waits for a slot
    (``[engine] max_concurrent_jobs``, ``gateway.node.scheduler``)."""
    position = request.app.state.runner.queue_position(status["job_id"])
    return status if position is None else {**status, "queue_position": position}


def _job_status(node: Node, job: Job) -> dict[str, Any]:
    """:func:`_status_document` of ``job`` with its review as the ledger has it."""
    with node.read_session() as s:
        review = s.get(JobReview, job.id)
    return _status_document(job, review)


def _status_document(job: Job, review: JobReview | None) -> dict[str, Any]:
    """The researcher's view of a job; ``review`` when the policy held it for review.

    ``progress.epsilon_so_far`` is the ε of the rounds run so far, from the job's public
    parameters alone (``ledger.accounting.epsilon_after_rounds``; 0 before the first round,
    without reading the stored cost); at the last round it is the job's ``epsilon``. What is
    charged is always ``epsilon`` (also for a job that fails or is cancelled after reading
    data)."""
    epsilon_so_far = 0.0 if job.round == 0 else JobCost.from_json(
        json.loads(job.cost)).epsilon_after_rounds(job.round, job.delta)
    status: dict[str, Any] = {
        "job_id": job.id,
        "dataset": job.dataset,
        "state": job.state,
        "round": job.round,
        "rounds": job.rounds,
        "progress": {"round": job.round, "rounds": job.rounds, "epsilon_so_far": epsilon_so_far},
        "epsilon": job.epsilon,
        "delta": job.delta,
        "budget": job.budget_state,
    }
    if job.failure:
        status["failure"] = researcher_failure(job)
    if review is not None:
        status["review"] = review_status(review)
    return status


GENERIC_FAILURE = ("the job stopped after reading user data; why is not released (it could "
                   "depend on the data); its budget is charged")
"""The one failure text a researcher sees for any failure after data access."""


def researcher_failure(job: Job) -> str:
    """The failure a researcher may see: before data access the reason (it depends only on the
    request, the node and the sandbox, never on user data); after data access one generic
    text, because the reason, and when it happened (a CPU, time or memory stop, a numeric
    failure), can depend on the data. A researcher's own cancel says so. The owner's log and
    the audit log keep the full reason."""
    if job.failure == RESEARCHER_CANCELLED or not job.data_accessed:
        return job.failure or ""
    return GENERIC_FAILURE


def _own_job(request: Request) -> Job:
    node: Node = request.app.state.node
    principal = _principal(request)
    with node.read_session() as s:
        job = s.get(Job, request.path_params["job_id"])
    if job is None or job.researcher_key_id != principal.key_id:
        raise Problem("not-found", "no such job for this key")
    return job


async def jobs(request: Request) -> Response:
    """``/v1/jobs``: GET lists this key's jobs, POST submits one. One route, so that a method
    it does not take is answered 405 with ``Allow: GET, POST`` (two routes on one path made
    the first one's ``Allow`` the answer)."""
    return await (list_jobs(request) if request.method == "GET" else submit_job(request))


async def list_jobs(request: Request) -> Response:
    """The jobs this key submitted, newest first, each as its status (``GET /v1/jobs/{id}``);
    never another researcher's, so the listing reveals nothing a status request would not."""
    node: Node = request.app.state.node
    key_id = _principal(request).key_id

    def own() -> list[dict[str, Any]]:
        with node.session() as s:
            jobs = s.exec(select(Job).where(Job.researcher_key_id == key_id)  # reviewed: ORM query, not exec
                          .order_by(col(Job.created_at).desc(), col(Job.id))).all()
        return [_with_queue_position(request, _job_status(node, job)) for job in jobs]

    return JSONResponse({"jobs": await run_in_threadpool(own)})


async def job_model(request: Request) -> Response:
    """The model artifact the job trained, exactly as uploaded: the researcher's own model, so
    a saved release is a whole model (architecture + DP weights). The client checks its digest
    against the release manifest's signed ``model_digest``."""
    node: Node = request.app.state.node
    job = await run_in_threadpool(_own_job, request)
    path = node.deployment.models_dir / (job.model_digest.removeprefix("sha256:") + ".json")
    body = await run_in_threadpool(path.read_bytes)
    return Response(body, media_type="application/json")


async def job_status(request: Request) -> Response:
    job = await run_in_threadpool(_own_job, request)
    return JSONResponse(_with_queue_position(
        request, await run_in_threadpool(_job_status, request.app.state.node, job)))


def _withdraw(node: Node, job_id: str, actor: str) -> None:
    with node.session() as s, s.begin():
        withdraw_review(s, job_id, actor=actor)


async def cancel_job(request: Request) -> Response:
    """Cancel a job: a held one (pending or approved review) is withdrawn and refunded; a
    queued or running one is stopped and settled by the data-access rule."""
    node: Node = request.app.state.node
    job = await run_in_threadpool(_own_job, request)
    if job.state in HELD_JOB_STATES:
        await run_in_threadpool(_withdraw, node, job.id, _principal(request).key_id)
        job = await run_in_threadpool(_own_job, request)  # the gateway may have claimed it
    if job.state in (JobState.QUEUED, JobState.RUNNING):
        await request.app.state.runner.cancel(job.id)
        job = await run_in_threadpool(_own_job, request)
    return JSONResponse(await run_in_threadpool(_job_status, node, job))


async def job_result(request: Request) -> Response:
    """The signed release, if the job succeeded and its output policy allows one more fetch."""
    job = await run_in_threadpool(_own_job, request)
    if job.state != JobState.SUCCEEDED or job.release is None:
        raise Problem("not-ready", f"job {job.id} is {job.state}; results exist only for "
                                   "succeeded jobs", state=job.state)
    release = await run_in_threadpool(fetch_release, request.app.state.node, _principal(request),
                                      job)
    return Response(release, media_type="application/json")


async def _problem_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem_response(exc)


async def _http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    for_browser = page_refusal(request, exc.status_code)
    if for_browser is not None:
        return for_browser
    if exc.status_code == 405:
        return problem_response(
            Problem("method-not-allowed", f"{request.method} is not allowed on {request.url.path}"),
            headers=dict(exc.headers or {}),
        )
    return problem_response(Problem("not-found", f"no resource at {request.url.path}; see "
                                                 "/openapi.json"))


async def _internal_error_handler(request: Request, exc: Exception) -> Response:
    log.error("unhandled %s on %s", type(exc).__name__, request.url.path)
    return problem_response(Problem("internal-error", "the node could not process the request; "
                                                      "nothing was charged"))


def create_app(root: Path, *, db_url: str | None = None) -> Starlette:
    """Build the gateway for the deployment at ``root``."""
    node = Node(root, db_url=db_url)
    runner = JobRunner(node)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        settled = await run_in_threadpool(recover_interrupted_jobs, node)
        if settled:
            log.warning("settled %d jobs interrupted by a restart", len(settled))
        async with audit.periodic_checkpoints(node), review_watch(node, runner):
            yield
        await runner.shutdown()
        await run_in_threadpool(node.writer.close)  # the writes already queued commit first

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/openapi.json", openapi),
            Route("/v1/node", node_document),
            Route("/v1/datasets", list_datasets),
            Route("/v1/datasets/{name}/mock", dataset_mock),
            Route("/v1/models", upload_model, methods=["POST"]),
            Route("/v1/estimate", estimate, methods=["POST"]),
            Route("/v1/calibrate", calibrate, methods=["POST"]),
            Route("/v1/plan", plan, methods=["POST"]),
            Route("/v1/jobs", jobs, methods=["GET", "POST"]),
            Route("/v1/jobs/{job_id}", job_status),
            Route("/v1/jobs/{job_id}/model", job_model),
            Route("/v1/jobs/{job_id}/result", job_result),
            Route("/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
            *audit.routes(),
            *Dashboard(node).routes(),
        ],
        middleware=request_middleware(node),
        exception_handlers={Problem: _problem_handler, HTTPException: _http_error_handler,
                            Exception: _internal_error_handler},
        lifespan=lifespan,
    )
    # Starlette would answer /dashboard/ with an absolute redirect built from the Host header
    # (a redirect to any host a caller names): every path is exact instead.
    app.router.redirect_slashes = False
    access_log.install()  # sign-in tokens never reach the access log
    app.state.node = node
    app.state.runner = runner
    return app
