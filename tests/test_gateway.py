"""The gateway's admission path over real HTTP semantics (Starlette TestClient):
real Ed25519 signatures, real Casbin, real ledger on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from gateway.api.app import create_app
from gateway.sdk.request_signing import SignedRequestAuth, signature_headers
from ledger import keys
from ledger.audit import read_entries
from ledger.db import make_engine, session
from tests.conftest import make_researcher

FIXTURES = Path(__file__).parent / "fixtures"
JOB = {"dataset": "demo", "rounds": 10, "clients_per_round": 20, "noise_multiplier": 1.0,
       "clip": 1.0}


@pytest.fixture
def model_bytes() -> bytes:
    return (FIXTURES / "logreg-20x5.json").read_bytes()


def signed_client(app, private_key) -> TestClient:  # type: ignore[no-untyped-def]
    client = TestClient(app)
    client.auth = SignedRequestAuth(private_key)
    return client


def audit_entries(db_url: str) -> list[dict]:
    engine = make_engine(db_url)
    with session(engine) as s:
        entries = read_entries(s)
    engine.dispose()
    return entries


def test_health_is_public_and_everything_else_needs_a_signature(node_dir: Path) -> None:
    with TestClient(create_app(node_dir)) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        response = anonymous.get("/v1/datasets")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "urn:fedgate:problem:signature-missing"


def test_registered_researcher_sees_the_dataset_with_rounded_user_counts(node_dir: Path) -> None:
    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as client:
        datasets = client.get("/v1/datasets").json()["datasets"]
    assert [d["name"] for d in datasets] == ["demo"]
    assert datasets[0]["public_users"] == 480 and datasets[0]["public_users_source"] == "declared"
    assert "training_users" not in datasets[0] and "evaluation_users_rounded" not in datasets[0]


def test_request_signed_by_unregistered_key_is_refused_like_a_forged_one(node_dir: Path) -> None:
    """Probing which key ids are registered: an unknown key gets the same answer as a
    signature that does not verify."""
    alice = make_researcher(node_dir, "alice")
    stranger = keys.generate_private_key()
    forged = signature_headers(private_key=stranger, method="GET",
                               url="http://testserver/v1/datasets", body=b"", content_type=None,
                               key_id=keys.key_id(alice.public_key()))
    with signed_client(create_app(node_dir), stranger) as client:
        unknown = client.get("/v1/datasets")
    with TestClient(create_app(node_dir)) as client:
        bad = client.get("/v1/datasets", headers=forged)
    assert unknown.status_code == bad.status_code == 401
    assert unknown.json() == bad.json()
    assert unknown.json()["type"] == "urn:fedgate:problem:signature-invalid"


def test_bad_signature_is_refused(node_dir: Path) -> None:
    alice = make_researcher(node_dir, "alice")
    impostor = keys.generate_private_key()
    url = "http://testserver/v1/datasets"
    # Signed by another key but claiming alice's key id.
    headers = signature_headers(private_key=impostor, method="GET", url=url, body=b"",
                                content_type=None, key_id=keys.key_id(alice.public_key()))
    with TestClient(create_app(node_dir)) as client:
        response = client.get("/v1/datasets", headers=headers)
    assert response.status_code == 401
    assert response.json()["type"] == "urn:fedgate:problem:signature-invalid"


def test_body_altered_after_signing_is_refused(node_dir: Path) -> None:
    alice = make_researcher(node_dir, "alice")
    url = "http://testserver/v1/estimate"
    body = json.dumps(JOB).encode()
    headers = signature_headers(private_key=alice, method="POST", url=url, body=body,
                                content_type="application/json")
    tampered = body.replace(b'"rounds": 10', b'"rounds": 11')
    with TestClient(create_app(node_dir)) as client:
        response = client.post("/v1/estimate", content=tampered, headers=headers)
    assert response.status_code == 401
    assert response.json()["type"] == "urn:fedgate:problem:digest-mismatch"


def test_replayed_request_is_refused_even_after_restart(node_dir: Path) -> None:
    alice = make_researcher(node_dir, "alice")
    headers = signature_headers(private_key=alice, method="GET",
                                url="http://testserver/v1/datasets", body=b"", content_type=None)
    with TestClient(create_app(node_dir)) as client:
        assert client.get("/v1/datasets", headers=headers).status_code == 200
        assert client.get("/v1/datasets", headers=headers).status_code == 401
    with TestClient(create_app(node_dir)) as restarted:
        response = restarted.get("/v1/datasets", headers=headers)
    assert response.json()["type"] == "urn:fedgate:problem:replayed-nonce"


HELD_FOR_REVIEW = ("p, researchers, owner, *, train, allow\n"
                   "p2, researchers, owner, demo, train, require_review, always\n")


@contextlib.contextmanager
def _held_for_review_with_model(node_dir: Path, model_bytes: bytes):  # type: ignore[no-untyped-def]
    """A node whose policy holds alice's jobs for review, alice's signed client and the digest
    of a model she uploaded: (app, alice's key, client, digest)."""
    (node_dir / "policies" / "policy.csv").write_text(HELD_FOR_REVIEW)
    alice = make_researcher(node_dir, "alice")
    app = create_app(node_dir)
    with signed_client(app, alice) as client:
        digest = client.post("/v1/models", content=model_bytes,
                             headers={"Content-Type": "application/json"}).json()["digest"]
        yield app, alice, client, digest


def _submit_twice(client: TestClient, private_key, body: bytes):  # type: ignore[no-untyped-def]
    headers = signature_headers(private_key=private_key, method="POST",
                                url="http://testserver/v1/jobs", body=body,
                                content_type="application/json")
    return [client.post("/v1/jobs", content=body, headers=headers) for _ in range(2)]


def test_replayed_admission_is_refused_and_reserves_nothing_more(
    node_dir: Path, db_url: str, model_bytes: bytes
) -> None:
    with _held_for_review_with_model(node_dir, model_bytes) as (_, alice, client, digest):
        client.auth = None  # the requests below carry their own signatures
        first, replay = _submit_twice(client, alice,
                                      json.dumps({**JOB, "model_digest": digest}).encode())
    assert first.status_code == 202 and first.json()["state"] == "pending_review"
    assert replay.status_code == 401
    assert replay.json()["type"] == "urn:fedgate:problem:replayed-nonce"
    entries = audit_entries(db_url)
    assert [e["action"] for e in entries].count("admit") == 1
    assert not [e for e in entries if e["action"] == "deny"]


def test_replaying_a_captured_admission_costs_the_gateway_no_admission_work(
    node_dir: Path, model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever captures a signed submission (without the key) can resend it until it expires:
    each replay is refused before policy, accounting or a ledger write run."""
    from gateway.api import app as app_module

    admissions = []
    real_admit = app_module._admit
    monkeypatch.setattr(app_module, "_admit", lambda *a: admissions.append(1) or real_admit(*a))
    with _held_for_review_with_model(node_dir, model_bytes) as (app, alice, client, digest):
        client.auth = None  # the requests below carry their own signatures
        body = json.dumps({**JOB, "model_digest": digest}).encode()
        headers = signature_headers(private_key=alice, method="POST",
                                    url="http://testserver/v1/jobs", body=body,
                                    content_type="application/json")
        assert client.post("/v1/jobs", content=body, headers=headers).status_code == 202
        batches = app.state.node.writer.batches
        replays = [client.post("/v1/jobs", content=body, headers=headers) for _ in range(5)]
        assert app.state.node.writer.batches == batches  # not even a trip to the ledger
    assert {r.json()["type"] for r in replays} == {"urn:fedgate:problem:replayed-nonce"}
    assert len(admissions) == 1


def test_an_admission_is_one_trip_to_the_ledger_writer(
    node_dir: Path, model_bytes: bytes
) -> None:
    with _held_for_review_with_model(node_dir, model_bytes) as (app, _, client, digest):
        batches = app.state.node.writer.batches
        response = client.post("/v1/jobs", json={**JOB, "model_digest": digest})
        # The nonce, the reservation, the review and their audit entries: one commit.
        assert app.state.node.writer.batches - batches == 1
    assert response.status_code == 202


def test_an_admission_crosses_threads_only_to_the_ledger_writer(
    node_dir: Path, model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Authentication and admission run on the event loop, parked while the writer commits
    (``ledger.suspend``): no worker-thread hop per step, whose GIL hand-offs cost more CPU
    than the steps under load."""
    import anyio.to_thread

    hops = []
    real_run_sync = anyio.to_thread.run_sync

    async def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        hops.append(args[0])
        return await real_run_sync(*args, **kwargs)

    with _held_for_review_with_model(node_dir, model_bytes) as (_, _, client, digest):
        monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
        response = client.post("/v1/jobs", json={**JOB, "model_digest": digest})
        assert response.status_code == 202
        assert hops == []


def test_the_202_of_an_admission_is_the_status_the_ledger_then_reports(
    node_dir: Path, model_bytes: bytes
) -> None:
    with _held_for_review_with_model(node_dir, model_bytes) as (_, _, client, digest):
        body = {**JOB, "model_digest": digest, "idempotency_key": "first"}
        admitted = client.post("/v1/jobs", json=body)
        again = client.post("/v1/jobs", json=body)  # the same job, read from the ledger
        status = client.get(admitted.headers["Location"])
    assert admitted.status_code == again.status_code == 202
    assert admitted.json()["review"]["state"] == "pending"
    assert admitted.json() == again.json() == status.json()


@pytest.mark.parametrize("body", [
    {**JOB, "dataset": "nowhere", "model_digest": "sha256:" + "0" * 64},  # denied (unknown)
    {**JOB, "model_digest": "sha256:" + "0" * 64},  # denied after the policy (no such model)
])
def test_replayed_refusal_is_refused_as_a_replay_and_audited_once(
    node_dir: Path, db_url: str, body: dict
) -> None:
    alice = make_researcher(node_dir, "alice")
    with TestClient(create_app(node_dir)) as client:
        first, replay = _submit_twice(client, alice, json.dumps(body).encode())
    assert first.status_code in (403, 404, 422)
    assert replay.json()["type"] == "urn:fedgate:problem:replayed-nonce"
    assert len([e for e in audit_entries(db_url) if e["action"] == "deny"]) == 1


def test_replayed_unparsable_job_and_digest_mismatch_are_refused_as_replays(
    node_dir: Path, db_url: str
) -> None:
    alice = make_researcher(node_dir, "alice")
    with TestClient(create_app(node_dir)) as client:
        first, replay = _submit_twice(client, alice, b'{"rounds": ')
        assert first.json()["type"] == "urn:fedgate:problem:invalid-request"
        assert replay.json()["type"] == "urn:fedgate:problem:replayed-nonce"
        body = json.dumps(JOB).encode()
        headers = signature_headers(private_key=alice, method="POST",
                                    url="http://testserver/v1/jobs", body=body,
                                    content_type="application/json")
        tampered = [client.post("/v1/jobs", content=body.replace(b"10", b"11"), headers=headers)
                    for _ in range(2)]
        # The body is checked after the nonce is taken, as on every other path.
        assert tampered[0].json()["type"] == "urn:fedgate:problem:digest-mismatch"
        assert tampered[1].json()["type"] == "urn:fedgate:problem:replayed-nonce"
        genuine = client.post("/v1/jobs", content=body, headers=headers)
    assert genuine.json()["type"] == "urn:fedgate:problem:replayed-nonce"
    assert len([e for e in audit_entries(db_url) if e["action"] == "deny"]) == 1


def test_revoked_key_is_refused_on_the_next_request(node_dir: Path) -> None:
    from gateway.cli import main as fedgate

    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as client:
        assert client.get("/v1/datasets").status_code == 200
        assert fedgate(["-d", str(node_dir), "researcher", "revoke", "alice"]) == 0
        response = client.get("/v1/datasets")
    assert response.json()["type"] == "urn:fedgate:problem:revoked-key"


def test_oversize_body_is_refused_with_413(node_dir: Path) -> None:
    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as client:
        response = client.post("/v1/estimate", content=b"x" * (1024 * 1024 + 1),
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_policy_denied_job_is_refused_with_403_and_audited(
    node_dir: Path, db_url: str, model_bytes: bytes
) -> None:
    (node_dir / "policies" / "policy.csv").write_text(
        "p, researchers, owner, *, train, allow\n"
        "p, interns, owner, demo, train, deny\n"
        "g, bob, interns, owner\n"
    )
    bob = make_researcher(node_dir, "bob")
    with signed_client(create_app(node_dir), bob) as client:
        digest = client.post("/v1/models", content=model_bytes,
                             headers={"Content-Type": "application/json"}).json()["digest"]
        response = client.post("/v1/jobs", json={**JOB, "model_digest": digest})
    assert response.status_code == 403
    problem = response.json()
    assert problem["type"] == "urn:fedgate:problem:policy-denied"
    assert "interns" in problem["detail"]
    denial = [e for e in audit_entries(db_url) if e["action"] == "deny"][-1]
    assert denial["reason"] == "policy-denied"
    assert denial["principal"] == "bob"
    assert denial["policy_version"].startswith("sha256:")


def test_job_exceeding_the_budget_is_refused_with_a_fix_and_audited(
    node_dir: Path, db_url: str, model_bytes: bytes
) -> None:
    alice = make_researcher(node_dir, "alice")
    greedy = {**JOB, "rounds": 5000, "noise_multiplier": 0.8}
    with signed_client(create_app(node_dir), alice) as client:
        digest = client.post("/v1/models", content=model_bytes,
                             headers={"Content-Type": "application/json"}).json()["digest"]
        response = client.post("/v1/jobs", json={**greedy, "model_digest": digest})
    assert response.status_code == 403
    problem = response.json()
    assert problem["type"] == "urn:fedgate:problem:budget-exceeded"
    assert "lower rounds to ≤" in problem["detail"]
    assert "noise_multiplier" in problem["detail"]
    assert problem["more_jobs_that_fit"] == 0
    denial = [e for e in audit_entries(db_url) if e["action"] == "deny"][-1]
    assert denial["reason"] == "budget-exceeded"
    assert denial["parameters"]["rounds"] == 5000


def test_estimate_is_a_dry_run_that_charges_nothing(node_dir: Path, db_url: str) -> None:
    alice = make_researcher(node_dir, "alice")
    before = len(audit_entries(db_url))
    with signed_client(create_app(node_dir), alice) as client:
        first = client.post("/v1/estimate", json=JOB)
        second = client.post("/v1/estimate", json=JOB)
    assert first.status_code == 200
    assert first.json() == second.json()
    assert first.json()["fits"] is True and first.json()["epsilon"] > 0
    assert len(audit_entries(db_url)) == before


def test_invalid_parameters_are_refused_naming_the_field(node_dir: Path) -> None:
    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as client:
        response = client.post("/v1/jobs", json={**JOB, "noise_multiplier": -1,
                                                 "model_digest": "sha256:" + "0" * 64})
    assert response.status_code == 422
    assert response.json()["field"] == "noise_multiplier"


def test_model_with_a_lambda_layer_is_rejected_at_upload(node_dir: Path, model_bytes: bytes) -> None:
    alice = make_researcher(node_dir, "alice")
    doc = json.loads(model_bytes)
    doc["config"]["config"]["layers"][-1]["class_name"] = "Lambda"
    with signed_client(create_app(node_dir), alice) as client:
        response = client.post("/v1/models", content=json.dumps(doc).encode(),
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert "Lambda" in response.json()["detail"]


def test_rotated_key_replaces_the_old_one_and_keeps_the_group(node_dir: Path, db_url: str) -> None:
    from gateway.cli import main as fedgate

    old = make_researcher(node_dir, "alice")
    new = keys.generate_private_key()
    _, new_pub = keys.write_key_pair(new, node_dir / "alice-new")
    assert fedgate(["-d", str(node_dir), "researcher", "rotate", "alice",
                    "--public-key", str(new_pub)]) == 0
    app = create_app(node_dir)
    with signed_client(app, old) as client:
        assert client.get("/v1/datasets").json()["type"] == "urn:fedgate:problem:revoked-key"
    with signed_client(app, new) as client:
        assert [d["name"] for d in client.get("/v1/datasets").json()["datasets"]] == ["demo"]
    key_changes = [(e["decision"], e["key_id"]) for e in audit_entries(db_url) if e["action"] == "key"]
    assert key_changes[-2:] == [("revoked", keys.key_id(old.public_key())),
                                ("added", keys.key_id(new.public_key()))]


def test_calibration_finds_the_noise_or_rounds_that_meet_a_target_epsilon(node_dir: Path) -> None:
    alice = make_researcher(node_dir, "alice")
    base = {"dataset": "demo", "clients_per_round": 20, "clip": 1.0, "evaluate": False}
    with signed_client(create_app(node_dir), alice) as client:
        noise = client.post("/v1/calibrate", json={**base, "rounds": 50, "target_epsilon": 3.0,
                                                   "solve_for": "noise_multiplier"}).json()
        rounds = client.post("/v1/calibrate", json={**base, "noise_multiplier": 1.0,
                                                    "target_epsilon": 3.0,
                                                    "solve_for": "rounds"}).json()
        assert "rounds" in rounds, rounds
        more = client.post("/v1/estimate", json={**base, "noise_multiplier": 1.0,
                                                 "rounds": rounds["rounds"] + 1}).json()
    assert 2.9 < noise["epsilon"] <= 3.0
    assert rounds["epsilon"] <= 3.0 < more["epsilon"]


def test_openapi_document_lists_exactly_the_mounted_routes_and_matches_docs(node_dir: Path) -> None:
    from starlette.routing import Route

    from gateway.api.openapi import openapi_document

    app = create_app(node_dir)
    mounted = {(r.path, m.lower()) for r in app.routes if isinstance(r, Route)
               for m in (r.methods or ()) if m != "HEAD"}
    document = openapi_document()
    documented = {(p, m) for p, ops in document["paths"].items() for m in ops}
    assert mounted == documented
    with TestClient(app) as anonymous:
        assert anonymous.get("/openapi.json").json() == document
    committed = json.loads((Path(__file__).parent.parent / "docs" / "openapi.json").read_text())
    assert committed == document, "docs/openapi.json is stale: run make openapi"


def test_mock_data_has_the_private_schema_and_no_private_value(
    node_dir: Path, synthetic_table: Path, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as client:
        response = client.get("/v1/datasets/demo/mock")
        missing = client.get("/v1/datasets/other/mock")
    assert response.status_code == 200
    assert missing.json()["type"] == "urn:fedgate:problem:unknown-dataset"
    path = tmp_path / "mock.parquet"
    path.write_bytes(response.content)
    mock, private = pq.read_table(path), pq.read_table(synthetic_table)
    assert mock.schema.names == private.schema.names
    private_users = set(private.column("user_id").to_pylist())
    assert not private_users & set(mock.column("user_id").to_pylist())
    assert set(mock.column("label").to_pylist()) <= set(range(5))
    # The mock is a function of the schema alone: the same schema with every private value
    # changed yields the same mock.
    from engine.datastore import load_schema
    from engine.mock import generate_mock_table

    schema = load_schema(node_dir / "datasets" / "demo")
    assert generate_mock_table(schema).equals(mock)
