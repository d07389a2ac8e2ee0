"""Network mistakes a researcher makes (no scheme, wrong port, https against an http node, a
host that does not resolve, a node that does not answer) end in one line that says what to fix:
exit 2 from the ``fedgate`` command, ``NodeUnreachable`` from the SDK, never an httpx traceback."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli.process import free_port
from gateway.sdk.client import Client, FedgateError, NodeUnreachable
from ledger import keys


@pytest.fixture
def key_files(tmp_path: Path) -> tuple[Path, Path]:
    private, _ = keys.write_key_pair(keys.generate_private_key(), tmp_path / "alice")
    _, node_public = keys.write_key_pair(keys.generate_private_key(), tmp_path / "node")
    return private, node_public


@pytest.fixture
def plain_http_node() -> Iterator[str]:
    """A plain-HTTP server on loopback (what `fedgate serve` is without a TLS proxy)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def silent_node() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def _fedgate_datasets(url: str, key_files: tuple[Path, Path]) -> subprocess.CompletedProcess[str]:
    private, node_public = key_files
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "datasets", "--url", url, "--key", str(private),
         "--node-key", str(node_public)],
        capture_output=True, text=True, timeout=120, check=False)


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("fedgate: error: ")
    return lines[0]


def test_cli_against_a_closed_port_says_connection_refused_and_exits_2(
    key_files: tuple[Path, Path],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    line = _one_line_error(_fedgate_datasets(url, key_files))
    assert f"connection refused by {url}" in line and "fedgate serve" in line


def test_cli_with_a_url_without_scheme_says_which_url_to_use(
    key_files: tuple[Path, Path],
) -> None:
    line = _one_line_error(_fedgate_datasets("127.0.0.1:8620", key_files))
    assert "no http:// or https:// scheme" in line and "http://127.0.0.1:8620" in line


def test_cli_speaking_tls_to_a_plain_http_node_suggests_http(
    key_files: tuple[Path, Path], plain_http_node: str,
) -> None:
    line = _one_line_error(_fedgate_datasets(f"https://{plain_http_node}", key_files))
    assert "TLS handshake" in line and f"use http://{plain_http_node}" in line


def test_cli_with_a_host_that_does_not_resolve_says_check_the_url(
    key_files: tuple[Path, Path],
) -> None:
    line = _one_line_error(_fedgate_datasets("http://fedgate-node.invalid:8620", key_files))
    assert "cannot resolve the host 'fedgate-node.invalid'" in line


def test_sdk_raises_node_unreachable_with_the_same_message(
    key_files: tuple[Path, Path], silent_node: str,
) -> None:
    private, node_public = key_files
    closed = f"http://127.0.0.1:{free_port()}"
    with Client(closed, key=private, node_public_key=node_public) as client, \
            pytest.raises(NodeUnreachable, match="connection refused by") as refused:
        client.datasets()
    assert isinstance(refused.value, FedgateError) and refused.value.url == closed
    assert refused.value.__cause__ is None and refused.value.status is None
    with pytest.raises(NodeUnreachable, match="no http:// or https:// scheme"):
        Client("localhost:8620", key=private, node_public_key=node_public)
    with Client(silent_node, key=private, node_public_key=node_public, timeout=0.5) as client, \
            pytest.raises(NodeUnreachable, match=f"no answer from {silent_node} in time"):
        client.datasets()
