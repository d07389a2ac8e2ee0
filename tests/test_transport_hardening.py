"""Red-team findings at the request layer (issue 22), against real gateways (`fedgate serve`
on loopback): a signature binds the node it was made for."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway import keys
from gateway.cli import main as fedgate
from gateway.process import start_gateway, stop_gateway
from gateway.request_signing import signature_headers
from tests.conftest import make_node

JOB = {"dataset": "demo", "rounds": 10, "clients_per_round": 20, "noise_multiplier": 1.0,
       "clip": 1.0}


def _node(root: Path, table: Path, monkeypatch: pytest.MonkeyPatch, **gateway: object) -> Path:
    """A deployment on its own SQLite ledger (its own nonce store, as separate nodes have), with
    ``[gateway]`` settings overridden."""
    make_node(root, table, f"sqlite:///{root / 'fedgate.db'}", monkeypatch)
    monkeypatch.delenv("FEDGATE_DATABASE_URL")
    config = root / "fedgate.toml"
    text = config.read_text()
    for name, value in gateway.items():
        line = f"{name} = {json.dumps(value)}"
        text, found = re.subn(rf"^{name} = .*$", line, text, flags=re.MULTILINE)
        if not found:
            text = text.replace("[gateway]\n", f"[gateway]\n{line}\n", 1)
    config.write_text(text)
    return root


def _register(root: Path, name: str, public_key: Path) -> None:
    assert fedgate(["-d", str(root), "researcher", "add", name, "--public-key",
                    str(public_key)]) == 0


@contextlib.contextmanager
def _gateway(root: Path, log_dir: Path) -> Iterator[tuple[str, int]]:
    """A running ``fedgate serve``: its URL and pid."""
    url, process = start_gateway(root, log_path=log_dir / f"{root.name}-gateway.log")
    try:
        yield url, process.pid
    finally:
        stop_gateway(process)


def _signed_estimate(key, url: str) -> tuple[bytes, dict[str, str]]:  # type: ignore[no-untyped-def]
    body = json.dumps(JOB).encode()
    return body, signature_headers(private_key=key, method="POST", url=url + "/v1/estimate",
                                   body=body, content_type="application/json")


# --- Cross-node replay ----------------------------------------------------------------------


def test_request_signed_for_node_a_and_replayed_to_node_b_is_refused(
    tmp_path: Path, synthetic_table: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alice is a researcher on two nodes. Whoever sees a request she signed for node A (A's
    operator, a proxy, the network) sends it to node B, whose nonce store never saw it: B
    refuses it, whatever Host it claims, and spends nothing of alice's."""
    alice = keys.generate_private_key()
    _, alice_pub = keys.write_key_pair(alice, tmp_path / "alice")
    roots = [_node(tmp_path / name, synthetic_table, monkeypatch) for name in ("a", "b")]
    for root in roots:
        _register(root, "alice", alice_pub)
    with _gateway(roots[0], tmp_path) as (url_a, _), _gateway(roots[1], tmp_path) as (url_b, _):
        body, headers = _signed_estimate(alice, url_a)
        at_a = httpx.post(url_a + "/v1/estimate", content=body, headers=headers)
        as_if_a = httpx.post(url_b + "/v1/estimate", content=body,
                             headers={**headers, "Host": url_a.removeprefix("http://")})
        as_b = httpx.post(url_b + "/v1/estimate", content=body, headers=headers)
        body_b, headers_b = _signed_estimate(alice, url_b)
        signed_for_b = httpx.post(url_b + "/v1/estimate", content=body_b, headers=headers_b)
    assert at_a.status_code == 200, at_a.text
    assert as_if_a.status_code == 421
    assert as_if_a.json()["type"] == "urn:fedgate:problem:wrong-node"
    assert as_if_a.json()["origin"] == url_b
    assert as_b.status_code == 401
    assert as_b.json()["type"] == "urn:fedgate:problem:signature-invalid"
    assert signed_for_b.status_code == 200, signed_for_b.text


def test_node_behind_a_reverse_proxy_checks_signatures_against_its_public_origin(
    node_dir: Path,
) -> None:
    """Behind a proxy the connection arrives at an internal address; requests signed for the
    configured public origin are accepted, requests naming the internal address are not."""
    from starlette.testclient import TestClient

    from gateway.app import create_app
    from tests.conftest import make_researcher

    config = node_dir / "fedgate.toml"
    config.write_text(config.read_text().replace(
        "[gateway]\n", '[gateway]\npublic_origin = "https://node.example"\n', 1))
    alice = make_researcher(node_dir, "alice")
    internal = "http://127.0.0.1:8620"

    def signed_for(origin: str) -> dict[str, str]:
        return signature_headers(private_key=alice, method="GET", url=origin + "/v1/datasets",
                                 body=b"", content_type=None)

    with TestClient(create_app(node_dir), base_url=internal) as client:
        proxied = client.get("/v1/datasets", headers={**signed_for("https://node.example"),
                                                      "Host": "node.example"})
        direct = client.get("/v1/datasets", headers=signed_for(internal))
    assert proxied.status_code == 200, proxied.text
    assert direct.status_code == 421
    assert direct.json()["origin"] == "https://node.example"


def test_public_origin_must_be_an_origin(node_dir: Path) -> None:
    from gateway.deployment import Deployment

    config = node_dir / "fedgate.toml"
    config.write_text(config.read_text().replace(
        "[gateway]\n", '[gateway]\npublic_origin = "https://node.example/fedgate"\n', 1))
    with pytest.raises(ValueError, match="public_origin"):
        Deployment(node_dir).load_config()

