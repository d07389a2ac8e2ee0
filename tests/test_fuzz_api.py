"""OpenAPI-driven fuzzing (schemathesis) of every endpoint with valid signatures: no 5xx,
and every response matches the documented schema (problem+json for refusals)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from starlette.testclient import TestClient

from gateway.api.app import create_app
from gateway.api.openapi import openapi_document
from gateway.node.deployment import init_deployment
from gateway.sdk.request_signing import SignedRequestAuth
from ledger import keys

schema = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def signed_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from gateway.cli import main as fedgate

    root = tmp_path_factory.mktemp("fuzz") / "node"
    init_deployment(root)
    key = keys.generate_private_key()
    _, public = keys.write_key_pair(key, root / "fuzzer")
    assert fedgate(["-d", str(root), "researcher", "add", "fuzzer", "--public-key",
                    str(public)]) == 0
    with TestClient(create_app(root), raise_server_exceptions=False) as client:
        client.auth = SignedRequestAuth(key)
        yield client


@schema.parametrize()
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_every_endpoint_answers_fuzzed_signed_requests_without_server_errors(
    case: schemathesis.Case, signed_client: TestClient
) -> None:
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    response = signed_client.request(**{k: v for k, v in kwargs.items()
                                        if k in ("method", "url", "headers", "params", "json",
                                                 "content", "data")})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json"
    case.validate_response(response, excluded_checks=[
        schemathesis.checks.ignored_auth,  # re-sends through its own transport, unsigned
        # Semantic validation (model layers, known datasets) is stricter than any JSON Schema.
        schemathesis.checks.positive_data_acceptance,
    ])


def test_fuzzing_covers_every_documented_operation() -> None:
    operations = {(op.path, op.method) for op in schema.get_all_operations()
                  for op in [op.ok()]}
    documented = {(p, m) for p, ops in openapi_document()["paths"].items() for m in ops}
    assert operations == documented
    assert Path(__file__).exists()
