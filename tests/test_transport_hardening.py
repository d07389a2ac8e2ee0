"""Red-team findings at the request layer (issue 22), most against real gateways (`fedgate
serve` on loopback): a signature binds the node it was made for; an unauthenticated body is
never read and authenticated uploads are read a few at a time; slow headers cannot hold a
connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.cli import main as fedgate
from gateway.cli.process import start_gateway, stop_gateway
from gateway.sdk.request_signing import signature_headers
from ledger import keys
from tests.conftest import make_node

JOB = {"dataset": "demo", "rounds": 10, "clients_per_round": 20, "noise_multiplier": 1.0,
       "clip": 1.0}
MIB = 1024 * 1024


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

    from gateway.api.app import create_app
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
    from gateway.node.deployment import Deployment

    config = node_dir / "fedgate.toml"
    config.write_text(config.read_text().replace(
        "[gateway]\n", '[gateway]\npublic_origin = "https://node.example/fedgate"\n', 1))
    with pytest.raises(ValueError, match="public_origin"):
        Deployment(node_dir).load_config()


# --- Pre-authentication memory --------------------------------------------------------------


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of a process, from /proc, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def _upload(port: int, head: bytes, body: bytes) -> bytes:
    """Send ``head`` and ``body`` (1 MiB at a time) on a raw connection; the response's status
    line."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as conn:
        conn.sendall(head)
        view = memoryview(body)
        for start in range(0, len(body), MIB):
            conn.sendall(view[start:start + MIB])
        return conn.recv(4096).split(b"\r\n", 1)[0]


def test_unsigned_upload_is_refused_from_its_headers_before_its_body_is_sent(
    tmp_path: Path, synthetic_table: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _node(tmp_path / "node", synthetic_table, monkeypatch)
    with _gateway(root, tmp_path) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(f"POST /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
                         f"application/json\r\nContent-Length: {64 * MIB}\r\n\r\n".encode())
            status = conn.recv(4096).split(b"\r\n", 1)[0]
    assert status == b"HTTP/1.1 401 Unauthorized"


def test_unauthenticated_64_mib_uploads_do_not_grow_gateway_memory(
    tmp_path: Path, synthetic_table: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 connections each POST 64 MiB to /v1/models at once, half unsigned, half signed by a
    key the node does not know: all are refused from their headers, no body is buffered, and
    the gateway's peak resident memory grows by less than 100 MB (the red team saw 2.4 GB)."""
    root = _node(tmp_path / "node", synthetic_table, monkeypatch)
    body = bytes(64 * MIB)
    with _gateway(root, tmp_path) as (url, pid):
        port = int(url.rsplit(":", 1)[1])
        head = (f"POST /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
        signed = signature_headers(private_key=keys.generate_private_key(), method="POST",
                                   url=url + "/v1/models", body=body,
                                   content_type="application/json")
        signature = "".join(f"{k}: {v}\r\n" for k, v in signed.items() if k != "Content-Type")
        heads = [f"{head}\r\n".encode(), f"{head}{signature}\r\n".encode()]
        before = _memory_kib(pid)
        statuses: list[bytes] = []
        threads = [threading.Thread(target=lambda i=i: statuses.append(
            _upload(port, heads[i % 2], body))) for i in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        after = _memory_kib(pid)
        assert httpx.get(url + "/healthz").status_code == 200
    assert statuses == [b"HTTP/1.1 401 Unauthorized"] * 20
    growth_mb = (after["VmHWM"] - before["VmRSS"]) * 1024 / 1e6
    assert growth_mb < 100, f"the gateway's peak RSS grew by {growth_mb:.0f} MB"


def test_model_uploads_beyond_the_upload_slots_wait_with_their_bodies_unread() -> None:
    """Authenticated uploads hold at most max_concurrent_uploads bodies in memory: one more
    waits for a slot before a byte of its body is read; requests on other paths do not."""
    from gateway.api.middleware import BodyLimit, BodyLimitMiddleware

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = BodyLimitMiddleware(
        app, max_concurrent_uploads=1,
        limit_for_path=lambda path: BodyLimit(100, upload=path == "/v1/models"))
    reads: list[str] = []

    async def request(name: str, path: str, gate: asyncio.Event | None) -> None:
        async def receive():  # type: ignore[no-untyped-def]
            reads.append(name)
            if gate is not None:
                await gate.wait()
            return {"type": "http.request", "body": b"x", "more_body": False}

        async def send(message):  # type: ignore[no-untyped-def]
            pass

        scope = {"type": "http", "path": path, "headers": [(b"content-length", b"1")]}
        await middleware(scope, receive, send)

    async def scenario() -> None:
        slow = asyncio.Event()
        first = asyncio.create_task(request("first upload", "/v1/models", slow))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(request("second upload", "/v1/models", None))
        await request("estimate", "/v1/estimate", None)
        await asyncio.sleep(0.05)
        assert reads == ["first upload", "estimate"]
        slow.set()
        await asyncio.gather(first, second)

    asyncio.run(scenario())
    assert reads == ["first upload", "estimate", "second upload"]


# --- Slow and oversized headers -------------------------------------------------------------


def _seconds_until_closed(conn: socket.socket, drip: bytes, limit: float) -> float | None:
    """Send ``drip`` every 0.2 s (a slowloris client's headers) until the server closes the
    connection; the seconds that took, or None if it stayed open for ``limit`` seconds."""
    conn.settimeout(0.2)
    started = time.monotonic()
    while time.monotonic() - started < limit:
        try:
            conn.sendall(drip)
            if conn.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return None


def test_slowloris_connection_is_closed_when_its_headers_are_late(
    tmp_path: Path, synthetic_table: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends its headers a line at a time, forever, loses the connection after
    header_timeout_seconds, on its first request and on a later one on the same connection."""
    root = _node(tmp_path / "node", synthetic_table, monkeypatch, header_timeout_seconds=1)
    with _gateway(root, tmp_path) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            first = _seconds_until_closed(conn, b"X-Slow: 1\r\n", limit=8)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")
            later = _seconds_until_closed(conn, b"X-Slow: 1\r\n", limit=8)
        assert httpx.get(url + "/healthz").status_code == 200
    assert first is not None and first < 4
    assert later is not None and later < 4


def test_connections_beyond_the_cap_are_answered_503(
    tmp_path: Path, synthetic_table: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections held open (idle or slow) cannot make the gateway take unbounded more: past
    max_connections a request is answered 503 at once, and served again once they close."""
    root = _node(tmp_path / "node", synthetic_table, monkeypatch, max_connections=3)
    with _gateway(root, tmp_path) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        for conn in held:
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.5)
        over_the_cap = httpx.get(url + "/healthz", timeout=10).status_code
        for conn in held:
            conn.close()
        time.sleep(0.5)
        after = httpx.get(url + "/healthz", timeout=10).status_code
    assert (over_the_cap, after) == (503, 200)

