"""The gateway's OpenAPI 3.1 document, built from one table of operations.

``OPERATIONS`` describes every route the app mounts; a test checks that the app's routes and
this table are the same set, and that docs/openapi.json equals ``openapi_document()``, so
neither the served document nor the committed one can drift from the code.
"""

from __future__ import annotations

from typing import Any

from gateway.api.middleware import cookie_authenticated
from gateway.protocol.job_parameters import json_schema, markdown
from gateway.protocol.problems import PROBLEM_TYPES, TYPE_PREFIX
from ledger.states import BudgetState, JobState

NUMBER = {"type": "number"}
INTEGER = {"type": "integer"}
STRING = {"type": "string"}


JOB_PARAMETERS: dict[str, Any] = json_schema()
"""The request bodies' parameters, generated from ``gateway.protocol.job_parameters``."""


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {**STRING, "enum": sorted(TYPE_PREFIX + slug for slug in PROBLEM_TYPES)},
            "title": STRING, "status": INTEGER, "detail": STRING,
        },
    },
    "JobRequest": {
        "type": "object", "additionalProperties": False,
        "required": ["dataset", "model_digest", "rounds", "clients_per_round",
                     "noise_multiplier", "clip"],
        "properties": {**JOB_PARAMETERS,
                       "model_digest": {**STRING, "pattern": "^sha256:[0-9a-f]{64}$"},
                       "idempotency_key": {**STRING, "maxLength": 128}},
    },
    "EstimateRequest": {
        "type": "object", "additionalProperties": False,
        "required": ["dataset", "rounds", "clients_per_round", "noise_multiplier", "clip"],
        "properties": JOB_PARAMETERS,
    },
    "CalibrateRequest": {
        "type": "object",
        "required": ["dataset", "clients_per_round", "clip", "target_epsilon", "solve_for"],
        "properties": {**JOB_PARAMETERS, "target_epsilon": {**NUMBER, "exclusiveMinimum": 0},
                       "solve_for": {**STRING, "enum": ["noise_multiplier", "rounds"]}},
    },
    "PlanRequest": {
        "type": "object", "required": ["dataset", "target_epsilon"],
        "properties": {
            "dataset": STRING, "target_epsilon": {**NUMBER, "minimum": 1e-3, "maximum": 1e3},
            "parameters": {**INTEGER, "minimum": 1, "description": "the model's parameter "
                           "count (for the explanation; default 10,000)"},
            "client_updates": {**INTEGER, "minimum": 1000, "description": "compute budget: "
                               "rounds × expected clients per round (default 1,000,000)"},
            "clip": {**NUMBER, "description": "the (initial) clip; default 0.1"},
            "evaluate": {"type": "boolean"}},
    },
    "Plan": {
        "type": "object", "required": ["plan", "job", "estimate"],
        "properties": {"plan": {"type": "object", "description": "ledger.planner.Plan: "
                                "the configuration, its ε and an explanation in words"},
                       "job": {"type": "object", "description": "the fields to submit"},
                       "estimate": _ref("Estimate")},
    },
    "Estimate": {
        "type": "object", "required": ["dataset", "epsilon", "delta", "fits", "jobs_that_fit"],
        "properties": {"dataset": STRING, "epsilon": NUMBER, "delta": NUMBER,
                       "accountant": STRING, "fits": {"type": "boolean"},
                       "jobs_that_fit": INTEGER, "suggestion": STRING,
                       "cost": _ref("CostProjection"), "memory": _ref("MemoryEstimate"),
                       "compute": _ref("ComputeEstimate"),
                       "resources_fit": {"type": "boolean"}, "resources_problem": STRING},
    },
    "ComputeEstimate": {
        "type": "object", "required": ["seconds", "flops", "limit_seconds"],
        "description": "When the estimate names an uploaded model: the expected training time "
                       "(engine.compute, from public parameters only) against the node's job "
                       "time limit; a job that does not fit is refused with job-too-large",
        "properties": {"seconds": NUMBER, "flops": NUMBER, "limit_seconds": NUMBER},
    },
    "MemoryEstimate": {
        "type": "object",
        "required": ["bytes", "per_user_bytes", "users_per_shard", "users_in_flight",
                     "limit_bytes"],
        "description": "When the estimate names an uploaded model: the engine's expected peak "
                       "memory (engine.memory, from public parameters only) against the node's "
                       "per-job limit; a job that does not fit is refused with job-too-large",
        "properties": {"bytes": INTEGER, "per_user_bytes": INTEGER, "users_per_shard": INTEGER,
                       "users_in_flight": INTEGER, "limit_bytes": INTEGER},
    },
    "CostProjection": {
        "type": "object", "required": ["currency", "total", "items", "upper_bound", "basis"],
        "description": "Projected cost when the node has a price list (docs/billing.md): the CPU "
                       "reservation × per_cpu_hour + per_job + per_epsilon × projected ε, exact "
                       "decimals as strings; exactly the charge of a job that reads data",
        "properties": {"currency": STRING, "total": STRING,
                       "items": {"type": "object", "additionalProperties": STRING},
                       "upper_bound": {"type": "boolean",
                                       "description": "always true: nothing is billed on "
                                                      "metered use"},
                       "basis": STRING},
    },
    "JobStatus": {
        "type": "object",
        "required": ["job_id", "dataset", "state", "round", "rounds", "progress", "epsilon",
                     "delta", "budget"],
        "properties": {"job_id": STRING, "dataset": STRING,
                       "state": {**STRING, "enum": [s.value for s in JobState]},
                       "round": INTEGER, "rounds": INTEGER,
                       "progress": {
                           "type": "object", "required": ["round", "rounds", "epsilon_so_far"],
                           "description": "rounds done and the ε they spent, from the job's "
                                          "public parameters only; at the last round "
                                          "epsilon_so_far equals epsilon",
                           "properties": {"round": INTEGER, "rounds": INTEGER,
                                          "epsilon_so_far": NUMBER}},
                       "epsilon": NUMBER, "delta": NUMBER,
                       "budget": {**STRING, "enum": [s.value for s in BudgetState]},
                       "failure": STRING, "review": _ref("Review"),
                       "queue_position": {**INTEGER, "description": "while a queued job waits "
                                          "for a free slot (node setting max_concurrent_jobs): "
                                          "1 = starts next; researchers are served round robin"}},
    },
    "JobList": {
        "type": "object", "required": ["jobs"],
        "properties": {"jobs": {"type": "array", "items": _ref("JobStatus"),
                                "description": "the jobs the signing key submitted, newest "
                                               "first"}},
    },
    "Review": {
        "type": "object", "required": ["state", "reason", "required_because", "expires_at"],
        "description": "The data owner's review of a job the policy held; the budget stays "
                       "reserved while pending and is refunded if denied, expired or withdrawn",
        "properties": {"state": {**STRING, "enum": ["pending", "approved", "denied", "expired",
                                                    "withdrawn"]},
                       "reason": {"type": ["string", "null"],
                                  "description": "the owner's reason, once decided"},
                       "required_because": STRING,
                       "expires_at": {**STRING, "format": "date-time"}},
    },
    "Release": {
        "type": "object", "additionalProperties": False,
        "required": ["manifest", "signature", "weights"],
        "properties": {"manifest": {"type": "object"}, "signature": STRING,
                       "weights": {"type": "array", "items": {"type": "object"}}},
    },
    "NodeDocument": {
        "type": "object", "additionalProperties": False, "required": ["node", "signature"],
        "description": "gateway.protocol.node_document: the key the node signs releases with, "
                       "signed by that key; clients check it against their node.pub before "
                       "submitting",
        "properties": {
            "node": {"type": "object", "additionalProperties": False,
                     "required": ["node_key_id", "public_key", "owner"],
                     "properties": {"node_key_id": STRING,
                                    "public_key": {**STRING, "description": "raw Ed25519 "
                                                   "public key, base64"},
                                    "owner": STRING}},
            "signature": {**STRING, "description": "Ed25519 by the node key over the canonical "
                          "JSON of node, base64"}},
    },
    "ModelArtifact": {
        "type": "object", "required": ["format", "config", "weights"],
        "properties": {"format": {"const": "keras-json-v1"}, "config": {"type": "object"},
                       "weights": {"type": "array", "items": {"type": "object"}}},
    },
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _body(schema_or_content: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema as an application/json body; a ready ``{"content": ...}`` map as is."""
    return schema_or_content if "content" in schema_or_content else _json(schema_or_content)


# The officer dashboard (gateway.dashboard): HTML pages, sign-in by a one-time token.
HTML_PAGE: dict[str, Any] = {"content": {"text/html": {"schema": STRING}}}
LOGIN_FORM: dict[str, Any] = {"content": {"application/x-www-form-urlencoded": {"schema": {
    "type": "object", "required": ["token"],
    "properties": {"token": {**STRING, "maxLength": 128,
                             "description": "one-time token from `fedgate officer token NAME`"}},
}}}}


# (path, method) -> (summary, request schema or None, success status, response schema, public)
OPERATIONS: dict[tuple[str, str], tuple[str, Any, int, Any, bool]] = {
    ("/healthz", "get"): ("Liveness", None, 200, {"type": "object"}, True),
    ("/openapi.json", "get"): ("This document", None, 200, {"type": "object"}, True),
    ("/v1/node", "get"): ("The node's signing key and owner, signed by that key", None, 200,
                          _ref("NodeDocument"), True),
    ("/v1/datasets", "get"): ("Datasets this key may estimate on", None, 200,
                              {"type": "object"}, False),
    ("/v1/datasets/{name}/mock", "get"): ("Public mock data of a dataset (Parquet)", None, 200,
                                          None, False),
    ("/v1/models", "post"): ("Upload a model artifact (content-addressed)", _ref("ModelArtifact"),
                             201, {"type": "object"}, False),
    ("/v1/estimate", "post"): ("ε of a proposed job and whether it fits (nothing charged)",
                               _ref("EstimateRequest"), 200, _ref("Estimate"), False),
    ("/v1/calibrate", "post"): ("Noise or rounds meeting a target ε (nothing charged)",
                                _ref("CalibrateRequest"), 200, _ref("Estimate"), False),
    ("/v1/plan", "post"): ("A proposed job for a target ε, explained (nothing charged)",
                           _ref("PlanRequest"), 200, _ref("Plan"), False),
    ("/v1/jobs", "post"): ("Submit a training job", _ref("JobRequest"), 202, _ref("JobStatus"),
                           False),
    ("/v1/jobs", "get"): ("Your jobs (this key's), newest first", None, 200,
                          _ref("JobList"), False),
    ("/v1/jobs/{job_id}", "get"): ("Job status", None, 200, _ref("JobStatus"), False),
    ("/v1/jobs/{job_id}/model", "get"): ("The job's model artifact as uploaded (its digest is "
                                         "the manifest's model_digest)", None, 200,
                                         _ref("ModelArtifact"), False),
    ("/v1/jobs/{job_id}/result", "get"): ("Signed release of a succeeded job", None, 200,
                                          _ref("Release"), False),
    ("/v1/jobs/{job_id}/cancel", "post"): ("Cancel a job", None, 200, _ref("JobStatus"), False),
    ("/v1/audit/entries", "get"): ("Audit entries by range (officers)", None, 200,
                                   {"type": "object"}, False),
    ("/v1/audit/checkpoint", "get"): ("Latest signed checkpoint (officers)", None, 200,
                                      {"type": "object"}, False),
    ("/v1/audit/proof/inclusion", "get"): ("Inclusion proof (officers)", None, 200,
                                           {"type": "object"}, False),
    ("/v1/audit/proof/consistency", "get"): ("Consistency proof (officers)", None, 200,
                                             {"type": "object"}, False),
    ("/v1/audit/export", "get"): ("Export of the audit log (officers)", None, 200,
                                  {"type": "object"}, False),
    ("/dashboard", "get"): ("Officer dashboard (HTML; needs a dashboard session)", None, 200,
                            HTML_PAGE, False),
    ("/dashboard/billing", "get"): ("Monthly compute charges per researcher, ?month=YYYY-MM (HTML; "
                                    "needs a dashboard session)", None, 200, HTML_PAGE, False),
    ("/dashboard/login", "get"): ("Dashboard sign-in form, or ?token= traded for a session "
                                  "cookie", None, 200, HTML_PAGE, True),
    ("/dashboard/login", "post"): ("Dashboard sign-in: the form's token traded for a session "
                                   "cookie", LOGIN_FORM, 200, HTML_PAGE, True),
    ("/dashboard/logout", "post"): ("End the dashboard session", None, 200, HTML_PAGE, True),
}


def openapi_document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for (path, method), (summary, request, status, response, public) in OPERATIONS.items():
        success = ({"description": summary, **_body(response)} if response is not None else
                   {"description": summary, "content": {"application/vnd.apache.parquet": {
                       "schema": {"type": "string", "format": "binary"}}}})
        operation: dict[str, Any] = {
            "summary": summary,
            "responses": {
                str(status): success,
                "default": {"description": "RFC 9457 problem",
                            "content": {"application/problem+json": {"schema": _ref("Problem")}}},
            },
        }
        for name in ("job_id", "name"):
            if "{" + name + "}" in path:
                operation["parameters"] = [{"name": name, "in": "path", "required": True,
                                            "schema": STRING}]
        if request is not None:
            operation["requestBody"] = {"required": True, **_body(request)}
        if not public and cookie_authenticated(path):
            operation["x-fedgate-session-cookie"] = True  # from /dashboard/login
        elif not public:
            operation["x-fedgate-signed"] = True  # RFC 9421; not an OpenAPI security scheme
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "fedgate gateway", "version": "1",
                 "description": "Every non-public operation needs an RFC 9421 HTTP Message "
                                "Signature (ed25519, tag=\"fedgate\"); see docs/security.md. "
                                "The officer dashboard's pages (x-fedgate-session-cookie) need "
                                "a session from /dashboard/login instead; see "
                                "docs/compliance.md."},
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }


def write_document(path: str = "docs/openapi.json",
                   parameters_page: str = "docs/job-parameters.md") -> None:
    """Regenerate the committed copies (``make openapi``): the OpenAPI document and the job
    parameters' reference page, both from the same table."""
    import json
    from pathlib import Path

    Path(path).write_text(json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n")
    Path(parameters_page).write_text(markdown())


if __name__ == "__main__":
    write_document()
