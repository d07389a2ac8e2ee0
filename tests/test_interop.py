"""A request signed by an independent RFC 9421 implementation — the npm package
``http-message-signatures`` (tests/interop/) — is accepted by the gateway."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from gateway.api.app import create_app
from ledger import keys
from tests.conftest import make_researcher

INTEROP = Path(__file__).parent / "interop"
JOB = {"dataset": "demo", "rounds": 10, "clients_per_round": 20, "noise_multiplier": 1.0,
       "clip": 1.0}


def _sign_with_node(key_path: Path, key_id: str, method: str, url: str, body_path: Path) -> dict:
    node = shutil.which("node")
    if node is None or not (INTEROP / "node_modules").exists():
        pytest.fail("node and tests/interop/node_modules are required (make test-env installs them)")
    out = subprocess.run(
        [node, str(INTEROP / "sign_request.mjs"), str(key_path), key_id, method, url,
         str(body_path)],
        check=True, capture_output=True, timeout=60,
    )
    return json.loads(out.stdout)


def test_request_signed_by_an_independent_rfc9421_implementation_is_accepted(
    node_dir: Path, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization

    alice = make_researcher(node_dir, "alice")
    key_path = tmp_path / "alice.pem"
    key_path.write_bytes(alice.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    body = json.dumps(JOB).encode()
    body_path = tmp_path / "body.json"
    body_path.write_bytes(body)
    headers = _sign_with_node(key_path, keys.key_id(alice.public_key()), "POST",
                              "http://testserver/v1/estimate", body_path)
    assert 'tag="fedgate"' in headers["Signature-Input"]
    with TestClient(create_app(node_dir)) as client:
        accepted = client.post("/v1/estimate", content=body, headers=headers)
        replayed = client.post("/v1/estimate", content=body, headers=headers)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["fits"] is True
    assert replayed.json()["type"] == "urn:fedgate:problem:replayed-nonce"
