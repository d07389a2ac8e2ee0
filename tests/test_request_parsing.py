"""Untrusted request bodies are data: every malformed body is a 422 problem+json, audited.

Each attack below was reproduced against the gateway before this hardening (issue 22, low):
JSON nested a thousand deep raised RecursionError (500, unaudited); a noise multiplier of
1e±300 gave 500; ``true`` was taken for 1 in integer fields; a key given twice was silently
merged (the last value won, so what a reviewer reads first is not what runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.api.app import create_app
from gateway.api.json_body import MAX_DEPTH, RequestJsonInvalid, parse_request_json
from tests.conftest import make_researcher
from tests.test_gateway import JOB, audit_entries, signed_client
from tests.test_review import submit

ROUTES = ("/v1/estimate", "/v1/jobs", "/v1/calibrate")


def _post_raw(client: Any, path: str, raw: bytes) -> Any:
    return client.post(path, content=raw, headers={"Content-Type": "application/json"})


def test_json_nested_a_thousand_deep_is_a_422_on_every_route_and_the_refusal_is_audited(
    node_dir: Path, db_url: str
) -> None:
    alice = make_researcher(node_dir, "alice")
    deep = b'{"dataset": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with signed_client(create_app(node_dir), alice) as client:
        responses = [_post_raw(client, path, deep) for path in ROUTES]
    for response in responses:
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert "nested" in response.json()["detail"]
    denied = [e for e in audit_entries(db_url) if e["action"] == "deny"]
    assert any("nested" in e.get("explanation", "") for e in denied)


@pytest.mark.parametrize("z", [1e300, -1e300, 1e-300, 5e-324])
def test_extreme_noise_multipliers_are_a_422_naming_the_range(node_dir: Path, z: float) -> None:
    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as client:
        estimate = client.post("/v1/estimate", json={**JOB, "noise_multiplier": z})
        submitted = submit(client, {**JOB, "noise_multiplier": z})
        calibrated = client.post("/v1/calibrate", json={**JOB, "noise_multiplier": z,
                                                        "target_epsilon": 2,
                                                        "solve_for": "rounds"})
    for response in (estimate, submitted, calibrated):
        assert response.status_code == 422, response.text
        assert response.json()["field"] == "noise_multiplier"


@pytest.mark.parametrize("field", ["rounds", "local_epochs", "batch_size", "clients_per_round"])
def test_true_is_not_taken_for_one_in_a_number_field(node_dir: Path, field: str) -> None:
    alice = make_researcher(node_dir, "alice")
    with signed_client(create_app(node_dir), alice) as client:
        response = client.post("/v1/estimate", json={**JOB, field: True})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field


def test_a_key_given_twice_is_refused_not_merged(node_dir: Path) -> None:
    alice = make_researcher(node_dir, "alice")
    raw = (b'{"dataset": "demo", "rounds": 10, "clients_per_round": 20, '
           b'"noise_multiplier": 5.0, "noise_multiplier": 0.1, "clip": 1.0}')
    with signed_client(create_app(node_dir), alice) as client:
        response = _post_raw(client, "/v1/estimate", raw)
    assert response.status_code == 422, response.text
    assert "noise_multiplier" in response.json()["detail"]


@pytest.mark.parametrize("raw, reason", [
    (b'{"a": NaN}', "NaN"), (b'{"a": Infinity}', "Infinity"), (b'{"a": 1e999}', "finite"),
    (b'\xff\xfe', "UTF-8"), (b'{"a": 1', "valid JSON"),
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "nested"),
    (b'{"a": 1, "a": 1}', "twice"),
])
def test_the_strict_parser_names_what_is_wrong(raw: bytes, reason: str) -> None:
    with pytest.raises(RequestJsonInvalid, match=reason):
        parse_request_json(raw)


def test_the_strict_parser_accepts_ordinary_bodies_to_its_depth_limit() -> None:
    assert parse_request_json(b'{"a": [1, 2.5, "x", true, null, {"b": {}}]}') == {
        "a": [1, 2.5, "x", True, None, {"b": {}}]}
    nested = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert parse_request_json(nested) is not None
