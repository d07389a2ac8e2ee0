"""Researcher SDK: signed requests to a fedgate node and verified results.

Every request is signed (RFC 9421, ``gateway.sdk.request_signing``). Every release is
verified before it is returned: the Ed25519 signature of the node over the canonical
manifest, and the digest of the weights named in the manifest. Refusals raise typed
exceptions that carry the server's problem+json document.

Example::

    client = Client("http://127.0.0.1:8620", key="alice.key", node_public_key="node.pub")
    job = dict(rounds=20, clients_per_round=50, noise_multiplier=1.0, clip=0.5)
    print(client.rehearse(model, "demo", **job).summary())  # locally, on mock data: free
    result = client.train_model(model, "demo", **job)
    print(result.epsilon, result.metrics)
"""

from __future__ import annotations

import socket
import ssl
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from engine.artifact import artifact_from_keras, parse_artifact
from gateway.protocol.job_states import ENDED_STATES, shown_state
from gateway.protocol.node_document import (
    NodeDocument,
    NodeDocumentInvalid,
    NodeKeyMismatch,
    verify_node_document,
)
from gateway.protocol.problems import TYPE_PREFIX
from gateway.protocol.release import ReleaseVerificationFailed
from gateway.sdk.datasets import Datasets
from gateway.sdk.progress import progress_display, progress_postfix
from gateway.sdk.release import Release, verify_release
from gateway.sdk.request_signing import SignedRequestAuth
from ledger import keys
from ledger.canonical import canonical_json
from ledger.states import HELD_JOB_STATES, JobState

if TYPE_CHECKING:
    from gateway.node.rehearsal import RehearsalReport

# Imported inside Client.rehearse, not at the top: a rehearsal runs the node's engine locally
# (TensorFlow, TFF: the node extra), which a researcher's light install does not have.

__all__ = [
    "HELD_STATES",
    "AuthenticationFailed",
    "BudgetExceeded",
    "Client",
    "Datasets",
    "FedgateError",
    "InvalidRequest",
    "Job",
    "JobFailed",
    "ModelRejected",
    "NodeDocumentInvalid",
    "NodeKeyMismatch",
    "NodeUnreachable",
    "OutputPolicyRefused",
    "PolicyDenied",
    "Release",
    "ReleaseVerificationFailed",
    "progress_postfix",
    "verify_release",
]



class FedgateError(Exception):
    """A refusal by the node; ``problem`` is its RFC 9457 document."""

    def __init__(self, problem: dict[str, Any]) -> None:
        super().__init__(problem.get("detail") or problem.get("title") or "request refused")
        self.problem = problem
        self.status = problem.get("status")
        self.type = str(problem.get("type", ""))


class AuthenticationFailed(FedgateError):
    """The node did not accept the request's signature (HTTP 401)."""


class PolicyDenied(FedgateError):
    """The data owner's policy refused the request; ``problem['rule']`` names the rule."""


class BudgetExceeded(FedgateError):
    """The job does not fit the dataset's privacy budget; ``detail`` says what to change."""


class InvalidRequest(FedgateError):
    """A parameter is malformed or out of range; ``problem['field']`` names it and, for a
    closed choice such as an optimizer, ``problem['allowed']`` lists the valid values."""


class ModelRejected(FedgateError):
    """The model artifact was refused by validation."""


class OutputPolicyRefused(FedgateError):
    """The owner's output policy refuses this fetch (e.g. a single release was fetched)."""


class NodeUnreachable(FedgateError):
    """No answer from the node: a URL without ``http://``, a name that does not resolve, a
    refused connection, TLS against a plain-HTTP node, or no reply in time. The message is one
    line that says what to fix; ``problem`` is a client-side document (no ``status``: the node
    never answered), ``url`` the address tried."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__({"title": "node unreachable", "detail": detail, "url": url})
        self.url = url


def _unreachable(url: str, error: httpx.TransportError) -> NodeUnreachable:
    """The one-line diagnosis of a transport failure, from the OS error behind httpx's."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, (ssl.SSLError, socket.gaierror,
                                                       ConnectionRefusedError)):
        cause = cause.__cause__ or cause.__context__
    host = httpx.URL(url).host
    if isinstance(cause, ConnectionRefusedError):
        detail = (f"connection refused by {url}: is the gateway running (`fedgate serve`) and "
                  "is the port right?")
    elif isinstance(cause, socket.gaierror):
        detail = f"cannot resolve the host {host!r} of {url}: check the URL"
    elif isinstance(cause, ssl.SSLError):
        plain = "http://" + url.removeprefix("https://")
        detail = (f"TLS handshake with {url} failed ({cause.reason or cause}); if the node "
                  f"serves plain HTTP, use {plain}")
    elif isinstance(error, httpx.TimeoutException):
        detail = f"no answer from {url} in time: check the URL, or that the node is not overloaded"
    else:
        detail = f"cannot reach {url}: {error or type(error).__name__}"
    return NodeUnreachable(url, detail)


def _node_url(url: str) -> str:
    """``url`` without a trailing slash, refused at once unless it is http:// or https://."""
    if not url.startswith(("http://", "https://")):
        raise NodeUnreachable(url, f"the node URL {url!r} has no http:// or https:// scheme: "
                                   f"use e.g. http://{url.split('://')[-1]}")
    return url.rstrip("/")


class JobFailed(Exception):
    """The job ended without a release."""


_ERRORS: dict[str, type[FedgateError]] = {
    "policy-denied": PolicyDenied,
    "budget-exceeded": BudgetExceeded,
    "invalid-request": InvalidRequest,
    "model-rejected": ModelRejected,
    "output-policy": OutputPolicyRefused,
}
# States of a job held for the data owner's review (its budget is reserved meanwhile).
HELD_STATES = HELD_JOB_STATES


def _raise_for_problem(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        problem = response.json()
    except ValueError:
        problem = {"status": response.status_code, "detail": response.text[:200]}
    slug = str(problem.get("type", "")).removeprefix(TYPE_PREFIX)
    if response.status_code == 401:
        raise AuthenticationFailed(problem)
    raise _ERRORS.get(slug, FedgateError)(problem)


def _load_private(key: Ed25519PrivateKey | str | Path) -> Ed25519PrivateKey:
    return key if isinstance(key, Ed25519PrivateKey) else keys.load_private_key(Path(key))


def _load_public(key: Ed25519PublicKey | str | Path) -> Ed25519PublicKey:
    return key if isinstance(key, Ed25519PublicKey) else keys.load_public_key(Path(key))


def _artifact(model_or_artifact: Any) -> dict[str, Any]:
    """A keras-json-v1 artifact from a Keras model, an artifact dict or its bytes."""
    if isinstance(model_or_artifact, dict):
        return model_or_artifact
    if isinstance(model_or_artifact, bytes):
        return parse_artifact(model_or_artifact)
    return artifact_from_keras(model_or_artifact)


class Job:
    """Handle of a submitted job (``Client.submit``, ``Client.job(job_id)``, ``Client.jobs()``)."""

    def __init__(self, client: Client, status: dict[str, Any]) -> None:
        self.client = client
        self.id: str = status["job_id"]
        self.last_status = status

    def __repr__(self) -> str:
        return f"<Job {self.id}: {shown_state(self.last_status)}>"

    def reattach_hint(self) -> str:
        """What to say when the researcher stops waiting: the job goes on, and how to come back
        to it or stop it."""
        return (f"{self.id} keeps running on the node: only the waiting stopped, and its "
                f"budget stays reserved.\n"
                f"  reattach: fedgate job wait {self.id}    "
                f"(Python: client.job({self.id!r}).wait())\n"
                f"  cancel:   fedgate job cancel {self.id}  "
                f"(Python: client.job({self.id!r}).cancel())")

    def status(self) -> dict[str, Any]:
        self.last_status = self.client._get(f"/v1/jobs/{self.id}")
        return self.last_status

    def cancel(self) -> dict[str, Any]:
        """Stop the job. It is charged if it had begun reading data, refunded otherwise."""
        self.last_status = self.client._post(f"/v1/jobs/{self.id}/cancel", b"")
        return self.last_status

    def wait(self, *, progress: bool = True, poll_seconds: float = 0.5,
             timeout_seconds: float = 3600.0, review_poll_seconds: float = 5.0) -> dict[str, Any]:
        """Poll until the job ends; show its progress when ``progress`` (``gateway.sdk.progress``:
        a tqdm bar in a terminal or Jupyter, one plain line per change in a pipe or log) with
        rounds i/T, the ε spent so far and the phase (``engine starting`` before round 1;
        ``cancelled`` for a job you cancelled).

        Ctrl-C (``KeyboardInterrupt``) stops only the waiting: the job keeps running on the
        node; ``wait`` says how to reattach (``fedgate job wait JOB``, ``client.job(JOB)``) or
        cancel, and re-raises.

        The ε so far is the node's ``progress.epsilon_so_far``: the ε of i rounds from the
        job's public parameters (never from data or realised client counts); at the last round
        it is the job's ε, which is also what a job that fails after reading data is charged.

        A job the owner's policy holds for review (``pending_review``) is polled every
        ``review_poll_seconds``; once ``approved`` (the gateway starts it within a second) it is
        polled every ``poll_seconds`` again. Time spent in review (``pending_review``, then
        ``approved``) does not count toward ``timeout_seconds``: the review's own deadline
        bounds it (an expired review ends the job, refunded). The bar shows the state;
        ``status()['review']`` has the owner's reason.
        """
        display = progress_display(self.id, self.last_status["rounds"]) if progress else None
        deadline = time.monotonic() + timeout_seconds
        try:
            while True:
                status = self.status()
                held = status["state"] in HELD_STATES
                if display is not None:
                    display.update(status)
                if status["state"] in ENDED_STATES:
                    return status
                if held:
                    deadline = time.monotonic() + timeout_seconds
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} still {status['state']}")
                awaiting_owner = status["state"] == JobState.PENDING_REVIEW
                time.sleep(review_poll_seconds if awaiting_owner else poll_seconds)
        except KeyboardInterrupt:
            if display is not None:
                display.close()
                display = None
            print(f"\n{self.reattach_hint()}", file=sys.stderr, flush=True)
            raise
        finally:
            if display is not None:
                display.close()

    def result(self) -> Release:
        """Fetch and verify the release with the model it trained (``Release.save`` writes
        it); raises if the job failed or was cancelled."""
        return self.signed_result(with_model=True)[0]

    def signed_result(self, *, with_model: bool = False) -> tuple[Release, str]:
        """The verified release and the node's signature over its manifest (for a record that
        cites it, e.g. a federation manifest); one counted fetch, raises if the job failed.

        ``with_model``: also the job's model artifact (``GET /v1/jobs/{id}/model``, free),
        checked against the manifest's ``model_digest``; fetched first, so a fetch the output
        policy counts is never spent on a release that could not be saved whole."""
        if self.last_status["state"] == JobState.FAILED:
            ended = shown_state(self.last_status)
            raise JobFailed(f"job {self.id} was cancelled" if ended == "cancelled" else
                            f"job {self.id} failed: {self.last_status.get('failure')}")
        model = (self.client._request("GET", f"/v1/jobs/{self.id}/model").content
                 if with_model else None)
        document = self.client._get(f"/v1/jobs/{self.id}/result")
        release = verify_release(document, self.client.node_public_key, model=model)
        return release, document["signature"]


class Client:
    """A researcher's connection to one fedgate node."""

    def __init__(self, url: str, key: Ed25519PrivateKey | str | Path,
                 node_public_key: Ed25519PublicKey | str | Path, *, timeout: float = 60.0) -> None:
        self.url = _node_url(url)
        self.private_key = _load_private(key)
        self.node_public_key = _load_public(node_public_key)
        self.key_id = keys.key_id(self.private_key.public_key())
        self._http = httpx.Client(base_url=self.url, auth=SignedRequestAuth(self.private_key),
                                  timeout=timeout)
        self._node: NodeDocument | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **options: Any) -> httpx.Response:
        """One signed request; a refusal raises its typed problem, no answer ``NodeUnreachable``."""
        try:
            response = self._http.request(method, path, **options)
        except httpx.TransportError as error:
            raise _unreachable(self.url, error) from None
        _raise_for_problem(response)
        return response

    def _get(self, path: str) -> Any:
        return self._request("GET", path).json()

    def _post(self, path: str, body: bytes, content_type: str = "application/json") -> Any:
        return self._request("POST", path, content=body,
                             headers={"Content-Type": content_type}).json()

    def node(self) -> NodeDocument:
        """The node's signed description (``GET /v1/node``), verified against the node public
        key this client was given; fetched once per client.

        Raises :class:`NodeKeyMismatch` (naming the node's key id and yours) when the node signs
        with another key, i.e. every release it makes would be refused, and
        :class:`NodeDocumentInvalid` when its answer does not verify. ``submit`` and
        ``train_model`` call it first, so a wrong ``node.pub`` costs no ε.
        """
        if self._node is None:
            try:
                signed = self._get("/v1/node")
            except ValueError:
                raise NodeDocumentInvalid("the node's /v1/node answer is not JSON") from None
            self._node = verify_node_document(signed, self.node_public_key)
        return self._node

    def job(self, job_id: str) -> Job:
        """A handle on one of your jobs, e.g. to reattach after Ctrl-C:
        ``client.job("job-…").wait()``; its ``last_status`` is fetched now."""
        return Job(self, self._get(f"/v1/jobs/{job_id}"))

    def jobs(self) -> list[Job]:
        """Your jobs (this key's), newest first, each with its status in ``last_status``."""
        return [Job(self, status) for status in self._get("/v1/jobs")["jobs"]]

    def datasets(self) -> Datasets:
        """The datasets this key may use: a list of the node's dicts (name, columns, N̂,
        features, classes, ε_total, δ, budget used), shown as a table in Jupyter."""
        return Datasets(self._get("/v1/datasets")["datasets"])

    def mock_data(self, dataset: str, path: str | Path) -> Path:
        """Download the dataset's public mock data (Parquet, same schema, synthetic values)."""
        response = self._request("GET", f"/v1/datasets/{dataset}/mock")
        Path(path).write_bytes(response.content)
        return Path(path)

    def upload_model(self, artifact: dict[str, Any] | bytes) -> str:
        """Upload a keras-json-v1 artifact; returns its content digest."""
        body = artifact if isinstance(artifact, bytes) else canonical_json(artifact)
        return self._post("/v1/models", body)["digest"]

    def estimate(self, dataset: str, **parameters: Any) -> dict[str, Any]:
        """ε, δ of a proposed job, whether it fits now and how many such jobs fit; with the
        node's price list also ``cost``, its projected cost (an upper bound, see its ``basis``)."""
        body = {"dataset": dataset, **parameters}
        return self._post("/v1/estimate", canonical_json(body))

    def calibrate(self, dataset: str, *, target_epsilon: float, solve_for: str = "noise_multiplier",
                  **parameters: Any) -> dict[str, Any]:
        """The smallest noise_multiplier (or largest rounds) whose training ε meets the target."""
        body = {"dataset": dataset, "target_epsilon": target_epsilon, "solve_for": solve_for,
                **parameters}
        return self._post("/v1/calibrate", canonical_json(body))

    def plan(self, dataset: str, *, target_epsilon: float, **options: Any) -> dict[str, Any]:
        """The node's proposed job for ``target_epsilon`` on ``dataset`` (``ledger.planner``):
        ``plan`` (sampling rate, noise multiplier, rounds, clip strategy, its ε and an
        ``explanation`` in words), ``job`` (the fields to pass to ``train_model``) and
        ``estimate`` (whether it fits the remaining budget). Options: ``parameters`` (your
        model's parameter count), ``client_updates`` (compute budget), ``clip``, ``evaluate``.
        Charges nothing::

            proposal = client.plan("demo", target_epsilon=4, parameters=610)
            print("\n".join(proposal["plan"]["explanation"]))
            job = {k: v for k, v in proposal["job"].items() if k != "dataset"}
            release = client.train_model(model, "demo", **job)
        """
        body = {"dataset": dataset, "target_epsilon": target_epsilon, **options}
        return self._post("/v1/plan", canonical_json(body))

    def rehearse(self, model_or_artifact: Any, dataset: str, *, timeout_seconds: float = 3600.0,
                 **parameters: Any) -> RehearsalReport:
        """Run the job you would submit locally on ``dataset``'s mock data; reserves nothing.

        ``model_or_artifact`` is a Keras model or a keras-json-v1 artifact (dict or bytes).
        The report has the validation refusal the node would give, or the engine's failure,
        or the time per round and the mock DP metrics; and the job's ε on the node (from the
        free estimate). Needs TensorFlow Federated locally. See ``gateway.node.rehearsal``.
        """
        from gateway.node.rehearsal import rehearse

        return rehearse(self, _artifact(model_or_artifact), dataset, parameters,
                        timeout_s=timeout_seconds)

    def submit(self, dataset: str, model_digest: str, **parameters: Any) -> Job:
        """Submit a job for an uploaded model; returns its handle at once (see ``train_model``
        for the parameters). Refuses before sending anything if the node signs with another
        key than this client's node public key (:meth:`node`)."""
        self.node()
        body = {"dataset": dataset, "model_digest": model_digest, **parameters}
        return Job(self, self._post("/v1/jobs", canonical_json(body)))

    def train_model(self, model: Any, dataset: str, *, progress: bool = True,
                    **parameters: Any) -> Release:
        """Upload a Keras model, train it under DP on ``dataset``, load the DP weights.

        Blocks until the job ends (progress bar of rounds and ε so far), verifies the node's
        signature on the result and sets the released weights on ``model``.

        ``parameters`` are the job request's fields: ``rounds``, ``clients_per_round``,
        ``noise_multiplier``, ``clip`` (these four set ε); ``local_epochs``, ``batch_size``,
        ``evaluate``; and the optimizers, a closed choice from ``tff.learning.optimizers``:
        ``client_optimizer`` "sgd" (default) or "sgdm" with ``client_learning_rate`` (0.1) and
        ``client_momentum``; ``server_optimizer`` "sgd", "sgdm" (default; ``server_momentum``
        0), "adam", "yogi" or "adagrad" with ``server_learning_rate`` (1.0) and, as the optimizer
        takes them, ``server_beta_1``, ``server_beta_2``, ``server_epsilon``,
        ``server_initial_preconditioner_value``. The optimizers do not change ε (local training
        is clipped before the noise, the server step comes after it). An unknown name or an
        out-of-range value is refused with ``invalid-request`` naming the field (and the
        allowed names).
        """
        self.node()  # a wrong node key is found before the upload
        digest = self.upload_model(artifact_from_keras(model))
        job = self.submit(dataset, digest, **parameters)
        job.wait(progress=progress)
        release = job.result()
        model.set_weights(release.weights)
        return release
