"""Output policies: how often and until when a job's released result may be fetched.

Contract of ``fetch_release`` (``GET /v1/jobs/{id}/result``):

* Only the key that submitted the job may fetch its result (``gateway.api.app._own_job``).
* The limits are the owner's ``max_result_fetches`` / ``result_available_days`` rows that
  match the researcher's ``train`` grant on the dataset, evaluated at fetch time against the
  policy in force (``PolicyEngine.output_policy``, the strictest row wins). The fetch window
  runs from the manifest's ``released_at``.
* Fail closed: if the policy cannot be evaluated (it does not load, the release time cannot
  be read), the fetch is refused with ``output-policy``, as when a limit is reached.
* Each fetch is counted (``ResultFetch``, numbered 1, 2, ... per job under the job's row
  lock) and audited (``fetch`` with its number) in one transaction *before* the result is
  returned; each refusal is audited as a ``deny``. A fetch that cannot be recorded is not
  served.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time

from sqlalchemy import func
from sqlmodel import select

from gateway.node.identity import VerifiedRequest
from gateway.node.node import Node
from gateway.policy.constraints import OutputPolicy
from gateway.protocol.problems import Problem
from ledger.audit import append_entry
from ledger.models import Dataset, Job, ResultFetch

log = logging.getLogger("fedgate.output_policy")


def _output_policy(node: Node, job: Job) -> tuple[OutputPolicy, dt.datetime]:
    """The output policy for ``job`` and its release time; raises on anything unreadable."""
    with node.session() as s:
        dataset = s.get(Dataset, job.dataset)
    if dataset is None or job.release is None:
        raise LookupError(f"job {job.id} has no dataset or no release")
    policy = node.policy().output_policy(subject=job.researcher, domain=dataset.owner,
                                         dataset=job.dataset)
    released_at = dt.datetime.fromisoformat(json.loads(job.release)["manifest"]["released_at"])
    if released_at.tzinfo is None:
        raise ValueError("released_at has no time zone")
    return policy, released_at


def _refuse(node: Node, principal: VerifiedRequest, job: Job, problem: Problem) -> Problem:
    with node.session() as s, s.begin():
        append_entry(s, action="deny", decision="deny", reason=problem.slug,
                     explanation=problem.detail, actor=principal.key_id,
                     principal=principal.principal, request_action="fetch", job_id=job.id,
                     dataset=job.dataset)
    return problem


def fetch_release(node: Node, principal: VerifiedRequest, job: Job) -> str:
    """The release document of the succeeded ``job``, counted and audited, or the
    ``output-policy`` ``Problem`` that refuses it (module contract)."""
    try:
        policy, released_at = _output_policy(node, job)
    except Exception as exc:  # fail closed on anything that keeps the policy from being applied
        log.error("output policy of job %s cannot be evaluated: %s", job.id, exc)
        raise _refuse(node, principal, job, Problem(
            "output-policy", "the output policy for this result cannot be evaluated, so it is "
            "not released; ask the data owner")) from None
    with node.session() as s, s.begin():
        statement = select(Job).where(Job.id == job.id).with_for_update()
        row = s.exec(statement).one()  # reviewed: ORM query, not exec
        fetches = int(s.exec(select(func.count()).select_from(ResultFetch)  # reviewed: ORM query, not exec
                             .where(ResultFetch.job_id == job.id)).one())
        refusal = policy.refusal(fetches=fetches, released_at=released_at,
                                 now=dt.datetime.now(dt.UTC))
        if refusal is None:
            number = fetches + 1
            s.add(ResultFetch(job_id=job.id, number=number, key_id=principal.key_id,
                              fetched_at=time.time()))
            append_entry(s, action="fetch", actor=principal.key_id, principal=principal.principal,
                         job_id=job.id, dataset=job.dataset, fetch=number,
                         max_fetches=policy.max_fetches)
            assert row.release is not None
            return row.release
    raise _refuse(node, principal, job, Problem("output-policy", f"{refusal}; ask the data "
                                                "owner if you need it again", fetches=fetches))
