"""Officer endpoints over real signed HTTP (Starlette TestClient, real Casbin policy, real
ledger on SQLite and PostgreSQL): every proof handed out verifies against a checkpoint
the node signed; researchers are refused and the refusal is audited."""

from __future__ import annotations

import asyncio
import base64
import uuid
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from gateway.api import audit as audit_api
from gateway.api.app import create_app
from gateway.node.deployment import init_deployment
from gateway.node.node import Node
from gateway.sdk.request_signing import SignedRequestAuth
from ledger import keys
from ledger.audit import append_entry, latest_checkpoint_text, read_entries
from ledger.audit_verify import verify_export
from ledger.checkpoints import parse_and_verify_checkpoint
from ledger.merkle import verify_consistency, verify_inclusion
from tests.conftest import make_researcher


@pytest.fixture
def deployment(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDGATE_DATABASE_URL", db_url)
    root = tmp_path / "node"
    init_deployment(root, owner="owner")
    return root


def make_officer(root: Path, name: str = "olivia"):  # type: ignore[no-untyped-def]
    from gateway.cli import main as fedgate

    private_key = keys.generate_private_key()
    _, public_path = keys.write_key_pair(private_key, root / f"{name}-{uuid.uuid4().hex[:6]}")
    assert fedgate(["-d", str(root), "officer", "add", name, "--public-key", str(public_path)]) == 0
    return private_key


def signed_client(app, private_key) -> TestClient:  # type: ignore[no-untyped-def]
    # Starlette 1.x's TestClient takes no ``auth`` argument; httpx's attribute still works.
    client = TestClient(app)
    client.auth = SignedRequestAuth(private_key)
    return client


def append(root: Path, count: int) -> None:
    node = Node(root)
    with node.session() as s, s.begin():
        for n in range(count):
            append_entry(s, action="dataset", actor="owner-cli", dataset=f"d{n}", decision="added")
    node.engine.dispose()


def node_public_key(root: Path):  # type: ignore[no-untyped-def]
    return keys.load_public_key(root / "node.pub")


def test_officer_gets_a_signed_checkpoint_and_proofs_that_verify_against_it(deployment: Path) -> None:
    officer = make_officer(deployment)
    with signed_client(create_app(deployment), officer) as client:
        first = client.get("/v1/audit/checkpoint").json()
        append(deployment, 6)
        second = client.get("/v1/audit/checkpoint").json()
        inclusion = client.get("/v1/audit/proof/inclusion", params={"index": 3}).json()
        consistency = client.get("/v1/audit/proof/consistency",
                                 params={"old": first["size"]}).json()
    public_key = node_public_key(deployment)
    old = parse_and_verify_checkpoint(first["checkpoint"], public_key)
    new = parse_and_verify_checkpoint(second["checkpoint"], public_key)
    assert (old.size, new.size) == (1, 7)  # the officer's own registration, then 6 entries
    assert inclusion["size"] == new.size and inclusion["checkpoint"] == second["checkpoint"]
    assert verify_inclusion(bytes.fromhex(inclusion["leaf_hash"]), 3, new.size,
                            [bytes.fromhex(h) for h in inclusion["proof"]], new.root)
    assert verify_consistency(old.size, new.size, old.root, new.root,
                              [bytes.fromhex(h) for h in consistency["proof"]])


def test_officer_pages_through_entries_and_exports_a_verifiable_log(deployment: Path) -> None:
    officer = make_officer(deployment)
    append(deployment, 5)
    with signed_client(create_app(deployment), officer) as client:
        page = client.get("/v1/audit/entries", params={"start": 2, "end": 4}).json()
        export = client.get("/v1/audit/export")
    assert page["size"] == 6
    assert [e["seq"] for e in page["entries"]] == [2, 3]
    assert page["entries"][0]["entry"]["dataset"] == "d1"
    assert export.headers["content-type"] == "application/json"
    report = verify_export(export.content, node_public_key(deployment))
    assert report.ok and report.verified_size == 6, report.summary()


@pytest.mark.parametrize(("path", "params"), [
    ("/v1/audit/proof/inclusion", {"index": 99}),
    ("/v1/audit/proof/inclusion", {"index": "-1"}),
    ("/v1/audit/proof/inclusion", {}),
    ("/v1/audit/proof/consistency", {"old": 5, "new": 2}),
    ("/v1/audit/proof/consistency", {"old": 1, "new": 99}),
    ("/v1/audit/entries", {"start": 3, "end": 1}),
    ("/v1/audit/entries", {"start": "x"}),
])
def test_out_of_range_or_malformed_queries_are_invalid_requests(
    deployment: Path, path: str, params: dict[str, object]
) -> None:
    officer = make_officer(deployment)
    append(deployment, 3)
    with signed_client(create_app(deployment), officer) as client:
        response = client.get(path, params=params)
    assert response.status_code == 422
    assert response.json()["type"] == "urn:fedgate:problem:invalid-request"


def test_researcher_is_refused_read_audit_and_the_refusal_is_audited(deployment: Path) -> None:
    alice = make_researcher(deployment, "alice")
    with signed_client(create_app(deployment), alice) as client:
        response = client.get("/v1/audit/export")
    assert response.status_code == 403
    assert response.json()["type"] == "urn:fedgate:problem:policy-denied"
    node = Node(deployment)
    with node.session() as s:
        denial = read_entries(s)[-1]
    node.engine.dispose()
    assert (denial["action"], denial["request_action"], denial["principal"]) == (
        "deny", "read-audit", "alice")


def test_periodic_publisher_signs_a_checkpoint_when_the_log_grows(deployment: Path) -> None:
    node = Node(deployment)

    def latest_size() -> int:
        with node.session() as s:
            text = latest_checkpoint_text(s)
        return -1 if text is None else parse_and_verify_checkpoint(text, node.node_key.public_key()).size

    async def wait_for_checkpoint(size: int) -> None:
        for _ in range(200):
            if latest_size() == size:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"no checkpoint for size {size}; latest is {latest_size()}")

    async def scenario() -> None:
        async with audit_api.periodic_checkpoints(node, interval_seconds=0.05):
            await wait_for_checkpoint(0)
            append(deployment, 2)
            await wait_for_checkpoint(2)
            append(deployment, 3)
            await wait_for_checkpoint(5)

    asyncio.run(scenario())
    node.engine.dispose()


def test_checkpoint_text_is_served_verbatim(deployment: Path) -> None:
    officer = make_officer(deployment)
    with signed_client(create_app(deployment), officer) as client:
        body = client.get("/v1/audit/checkpoint").json()
    lines = body["checkpoint"].split("\n")
    assert lines[:4] == [body["origin"], str(body["size"]),
                         base64.b64encode(bytes.fromhex(body["root"])).decode(), body["timestamp"]]
