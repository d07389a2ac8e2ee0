"""The gateway log's job lines: one per admission, refusal and completion of a job.

Beside uvicorn's access lines, the operator reads here what the node decided, without opening
the audit log: which job, dataset and researcher (name and key id), the decision or outcome and
the ε reserved, committed or refunded. Contract:

* Only what the researcher concerned may also know: the job's public parameters and ε, the
  refusal they were sent (problem type and detail), the job's state and budget outcome. Never a
  user count, a sampled count, an engine message or anything else computed from the data (the
  owner reads the engine's own log, ``logs/engine.log``, for that).
* Each line is written after the transaction that made the decision committed, so the audit
  log already holds it (the log is a view, never the record).
* Text a researcher chose (a dataset name in a refused request, a problem detail quoting it) is
  written as a JSON string: one line, control characters escaped, so no request can forge a
  log line.
"""

from __future__ import annotations

import json
import logging

from gateway.node.identity import VerifiedRequest
from gateway.protocol.job_states import RESEARCHER_CANCELLED
from gateway.protocol.problems import Problem
from ledger.models import Job

__all__ = ["LOGGER", "log_admitted", "log_refused", "log_settled", "outcome"]

LOGGER = "fedgate.jobs"
log = logging.getLogger(LOGGER)


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _who(name: str, key_id: str) -> str:
    return f"researcher {_quoted(name)} (key {key_id})"


def log_admitted(job: Job) -> None:
    """``job`` was admitted: its budget is reserved and it is queued or held for review."""
    log.info("admitted job %s on dataset %s for %s: %s, ε %.4g reserved (δ %g)", job.id,
             _quoted(job.dataset), _who(job.researcher, job.researcher_key_id), job.state,
             job.epsilon, job.delta)


def log_refused(principal: VerifiedRequest, dataset: str | None, problem: Problem) -> None:
    """A ``train`` request was refused (nothing reserved); ``dataset`` is None when the
    request did not parse."""
    on = f"dataset {_quoted(dataset)}" if dataset is not None else "an unparsed request"
    log.info("refused job on %s for %s: %s: %s", on, _who(principal.principal, principal.key_id),
             problem.slug, _quoted(problem.detail))


def outcome(job: Job) -> str:
    """How ``job`` ended, as its researcher may know it: a failure's reason only before data
    access (it then depends on the request, the node and the sandbox alone); after data access
    what stopped the job, and when, can depend on the data (the audit log keeps it)."""
    if job.failure is None:
        return str(job.state)
    ended = "cancelled" if job.failure == RESEARCHER_CANCELLED else "failed"
    if job.data_accessed:
        return f"{ended} after data access"
    return f"{ended} before data access" + ("" if ended == "cancelled"
                                            else f" ({_quoted(job.failure)})")


def log_settled(job: Job) -> None:
    """``job`` ended (succeeded, failed or cancelled) and its budget was settled."""
    log.info("completed job %s on dataset %s for %s: %s; ε %.4g %s", job.id,
             _quoted(job.dataset), _who(job.researcher, job.researcher_key_id), outcome(job),
             job.epsilon, job.budget_state)
